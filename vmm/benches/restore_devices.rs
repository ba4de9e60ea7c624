//! Restore of a clone with vhost-user devices, eager copy against lazy, one
//! run side by side: a 512 MiB test guest (every page non-zero, as in a
//! guest that has used its memory) with `vhost-tap`'s block backend and its
//! net backend (replay mode, frames pushed in process) serves a request,
//! is snapshotted (full), and a clone is restored twice, each time with new
//! backends over a copy of the disk at the cut:
//!
//! - `SharedCopy`: the memory file is copied into the shared memfd first;
//! - `SharedLazy`: pages come in on first access (vCPU or backend, both
//!   backends taking part in postcopy) while a background thread copies
//!   the rest.
//!
//! Columns: restore start to `resume()` returned (vCPUs running, both
//! devices' rings started); to the clone's answer to its first request
//! (disk write and reply frame through both devices); to every page
//! present.
//!
//! `cargo bench -p vmr-vmm --bench restore_devices` (needs /dev/kvm, make
//! and gcc, and userfaultfd: root or `vm.unprivileged_userfaultfd = 1`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_tap::blk::disk::map_path;
use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::metrics::Metrics;
use vhost_tap::net::{ChannelReplaySource, NetBackend, NetConfig};
use vhost_tap::server::Server;
use vhost_tap::Mode;
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::guest_abi::{build_test_guest, TestPorts};
use vmr_vmm::serial::SharedBuffer;
use vmr_vmm::snapshot::{MemoryKind, RestoreMemory};
use vmr_vmm::vm::{BootSource, RestoreOptions, Vm, VmConfig};

/// `CMD_NET_DISK` of `guest/test-guest/workload.h`.
const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const MEM: u64 = 512 << 20;
const WAIT: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn request(payload: &[u8]) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

fn wait_serial(serial: &SharedBuffer, needle: &str) {
    let start = Instant::now();
    while !String::from_utf8_lossy(&serial.contents()).contains(needle) {
        assert!(
            start.elapsed() < WAIT,
            "guest never printed {needle:?}; console:\n{}",
            String::from_utf8_lossy(&serial.contents())
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
}

/// The block and net backends of one VM.
struct Backends {
    blk: Server,
    net: Server,
    rx: Arc<ChannelReplaySource>,
}

fn serve(dir: &Path, name: &str, image: &Path) -> Backends {
    let blk = BlockBackend::new(
        BlockConfig::new("vda"),
        Disk::open(image, Some(&dir.join(format!("{name}.overlay"))), false).expect("image"),
        None,
        None,
        Arc::new(Metrics::default()),
    )
    .expect("block config");
    let blk = Server::spawn("blk", blk, &dir.join(format!("{name}-blk.sock")), true)
        .expect("socket free");
    let rx = Arc::new(ChannelReplaySource::new().expect("eventfd"));
    let mut cfg = NetConfig::new("net0");
    cfg.mac = GUEST_MAC;
    cfg.mode = Mode::Replay;
    let net = NetBackend::new(
        cfg,
        None,
        Some(rx.clone()),
        None,
        None,
        Arc::new(Metrics::default()),
    )
    .expect("net config");
    let net = Server::spawn("net", net, &dir.join(format!("{name}-net.sock")), true)
        .expect("socket free");
    Backends { blk, net, rx }
}

struct Measured {
    running: f64,
    first_reply: f64,
    populated: f64,
    note: String,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list.
    }
    common::require_kvm("restore_devices");
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let dir = tmp.path();
    let elf = build_test_guest(&dir.join("guest")).unwrap_or_else(|e| panic!("{e}"));
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("disk image");

    // The original.
    let a = serve(dir, "a", &image);
    let serial = SharedBuffer::default();
    let mut vm = Vm::new(VmConfig {
        mem_size: MEM,
        serial_out: Some(Box::new(serial.clone())),
        ..Default::default()
    })
    .expect("VM");
    common::fill_pages(&vm);
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports");
    let log = Arc::new(DirtyLog::new(MEM).expect("memfd"));
    for (kind, sock) in [
        (DeviceKind::Block, "a-blk.sock"),
        (DeviceKind::Net, "a-net.sock"),
    ] {
        devices::attach(
            &vm,
            VirtioSpec {
                kind,
                socket: dir.join(sock),
                local_config: kind.local_config(1 << 20, GUEST_MAC),
            },
            Some(log.clone()),
        )
        .expect("backend reachable");
    }
    vm.load(&BootSource::Elf(elf)).expect("load");
    vm.start().expect("start");
    ports.push_commands(&[CMD_NET_DISK]);
    wait_serial(&serial, "vmr-guest: net ready");
    a.rx.push(request(b"request 0: before the snapshot"));
    wait_serial(&serial, &done_line(0));
    vm.pause().expect("pause");
    vm.set_sync_snapshots(false);
    let snap = dir.join("snap");
    let info = vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    drop(vm);
    let _ = a.blk.stop();
    let _ = a.net.stop();

    let mut results = Vec::new();
    for (name, mode) in [
        ("b", RestoreMemory::SharedCopy),
        ("c", RestoreMemory::SharedLazy),
    ] {
        let overlay = dir.join(format!("{name}.overlay"));
        std::fs::copy(dir.join("a.overlay"), &overlay).expect("overlay copy");
        std::fs::copy(map_path(&dir.join("a.overlay")), map_path(&overlay)).expect("map copy");
        // Both clones read the memory file from the page cache (the
        // snapshot was just written).
        let b = serve(dir, name, &image);
        let serial = SharedBuffer::default();
        let t0 = Instant::now();
        let (clone, states) = Vm::restore(
            &snap,
            RestoreOptions {
                memory: mode,
                serial_out: Some(Box::new(serial.clone())),
                dirty_log: true,
            },
        )
        .expect("restore");
        TestPorts::new().attach(&clone.pio_bus()).expect("ports");
        let restored = devices::restore(
            &clone,
            &states,
            |_, kind| match kind {
                DeviceKind::Block => dir.join(format!("{name}-blk.sock")),
                DeviceKind::Net => dir.join(format!("{name}-net.sock")),
            },
            Some(Arc::new(DirtyLog::new(MEM).expect("memfd"))),
        )
        .expect("devices reconnect");
        assert_eq!(restored.len(), 2);
        clone.resume().expect("resume");
        let running = t0.elapsed();
        b.rx.push(request(b"request 1: after the restore"));
        wait_serial(&serial, &done_line(1));
        let first_reply = t0.elapsed();
        let (populated, note) = match clone.memory().lazy() {
            Some(lazy) => {
                lazy.wait_populated(WAIT).expect("populated");
                let s = lazy.stats();
                assert!(s.error.is_none(), "{s:?}");
                (
                    s.populated_after.expect("complete"),
                    format!(
                        "{} data pages: {} prefetched, {} vCPU/VMM faults, {} backend faults",
                        s.data_pages, s.prefetched, s.vmm_faults, s.backend_faults
                    ),
                )
            }
            None => (
                running,
                format!("{} pages copied before the run", info.pages),
            ),
        };
        results.push((
            mode,
            Measured {
                running: ms(running),
                first_reply: ms(first_reply),
                populated: ms(populated),
                note,
            },
        ));
        drop(clone);
        let _ = b.blk.stop();
        let _ = b.net.stop();
    }

    println!();
    println!(
        "restore of a 512 MiB clone with vhost-user blk + net (vhost-tap), every page non-zero, one run"
    );
    println!(
        "{:<12} {:>18} {:>22} {:>20}  notes",
        "memory", "to running (ms)", "to first reply (ms)", "all pages (ms)"
    );
    println!("{}", "-".repeat(130));
    for (mode, r) in &results {
        println!(
            "{:<12} {:>18.1} {:>22.1} {:>20.1}  {}",
            format!("{mode:?}"),
            r.running,
            r.first_reply,
            r.populated,
            r.note
        );
    }
}
