//! The test guest's virtio-blk driver in the microVM against a real
//! `vhost-tap` block backend (in process): the guest negotiates features,
//! reads the capacity from config space and sector 0, writes sector 1 and
//! reads it back, with queue notifications through the ioeventfd.

mod common;

use std::sync::Arc;

use common::{guest_elf, require_kvm, wait_done};
use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::metrics::Metrics;
use vhost_tap::server::Server;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::guest_abi::TestPorts;
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

/// `CMD_BLK_SELFTEST` of `guest/test-guest/workload.h`.
const CMD_BLK_SELFTEST: u32 = 0x12;

#[test]
// Heavy: needs /dev/kvm.
fn guest_driver_reads_and_writes_through_vhost_tap_blk() {
    require_kvm();
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.raw");
    let overlay = dir.path().join("disk.overlay");
    let mut content = vec![0u8; 256 << 10];
    content[..4].copy_from_slice(&0xfeed_f00du32.to_le_bytes());
    std::fs::write(&image, &content).expect("temp dir is writable");
    let metrics = Arc::new(Metrics::default());
    let backend = BlockBackend::new(
        BlockConfig::new("vda"),
        Disk::open(&image, Some(&overlay), false).expect("image opens"),
        None,
        None,
        metrics.clone(),
    )
    .expect("valid config");
    let socket = dir.path().join("blk.sock");
    let server = Server::spawn("blk", backend, &socket, true).expect("socket free");

    let mut vm = Vm::new(VmConfig {
        mem_size: 32 << 20,
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    let dev = devices::attach(
        &vm,
        VirtioSpec {
            kind: DeviceKind::Block,
            socket,
            local_config: DeviceKind::Block.local_config(0, [0; 6]),
        },
        None,
    )
    .expect("backend reachable");
    vm.load(&BootSource::Elf(elf)).expect("guest loads");
    vm.start().expect("vCPUs start");
    ports.push_commands(&[CMD_BLK_SELFTEST]);
    wait_done(&ports, 1);
    ports.with(|s| {
        assert_eq!(s.done, vec![0], "guest self-test result");
        assert_eq!(
            s.values,
            vec![512, 0xfeed_f00d],
            "capacity (from the backend) and sector 0"
        );
    });
    {
        let d = dev.device().lock().expect("not poisoned");
        assert!(d.is_activated());
        // Both are optional (notifications then go through MMIO exits, and
        // the polling guest needs no interrupt); when KVM offers them, they
        // must be in use.
        assert_eq!(
            d.notify_uses_ioeventfd(0),
            vm.capabilities().ioeventfd,
            "QueueNotify ioeventfd"
        );
        assert_eq!(
            d.raises_interrupts(),
            vm.has_irqchip(),
            "irqfd on the device's GSI"
        );
    }
    assert!(metrics.requests.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    drop(vm);
    let _ = server.stop();
    let written = std::fs::read(&overlay).expect("overlay written");
    assert!(
        written.windows(7).any(|w| w == b"BLKTEST"),
        "the guest's write reached the overlay"
    );
}
