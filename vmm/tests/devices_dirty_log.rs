//! The dirty-page log shared with a real `vhost-tap` block backend (in
//! process, over a unix socket): the transport negotiates `LOG_SHMFD` and
//! `LOG_ALL`, hands over the log with `SET_LOG_BASE`, and the pages the
//! backend writes while serving a read (data buffer, status byte, used ring)
//! show up in the log. No KVM is needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::metrics::Metrics;
use vhost_tap::server::Server;
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::{
    regs, status, DeviceKind, MmioDeviceConfig, VirtioMmioDevice, VmResources,
};

mod common;
use common::{wr, Memory, MEM_SIZE};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x7000;
const DATA: u64 = 0x8000;
const STATUS: u64 = 0x9000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

#[test]
fn backend_writes_land_in_the_shared_dirty_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.raw");
    let mut content = vec![0u8; 64 << 10];
    content[..4].copy_from_slice(b"VMR!");
    std::fs::write(&image, &content).expect("temp dir is writable");
    let disk = Disk::open(&image, None, false).expect("raw image opens");
    let backend = BlockBackend::new(
        BlockConfig::new("vda"),
        disk,
        None,
        None,
        Arc::new(Metrics::default()),
    )
    .expect("valid block config");
    let socket = dir.path().join("blk.sock");
    let server = Server::spawn("blk", backend, &socket, true).expect("socket path is free");

    let mem = Memory::new();
    let log = Arc::new(DirtyLog::new(MEM_SIZE as u64).expect("memfd works"));
    let mut dev = VirtioMmioDevice::new(
        MmioDeviceConfig {
            kind: DeviceKind::Block,
            socket: socket.clone(),
            mmio_base: 0xd000_0000,
            gsi: 5,
            local_config: DeviceKind::Block.local_config(64 << 10, [0; 6]),
        },
        VmResources {
            vm: None,
            irqchip: false,
            regions: vec![mem.region()],
            dirty_log: Some(log.clone()),
            lazy: None,
        },
    )
    .expect("backend is listening");
    assert!(
        dev.connection().supports_dirty_log(),
        "vhost-tap-blk offers LOG_SHMFD + LOG_ALL"
    );

    // Capacity comes from the backend's config space (GET_CONFIG).
    let mut cap = [0u8; 8];
    dev.mmio_read(regs::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);

    wr(&mut dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut dev, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut dev, regs::DRIVER_FEATURES, 1);
    wr(
        &mut dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    wr(&mut dev, regs::QUEUE_SEL, 0);
    wr(&mut dev, regs::QUEUE_NUM, 8);
    wr(&mut dev, regs::QUEUE_DESC_LOW, DESC as u32);
    wr(&mut dev, regs::QUEUE_DRIVER_LOW, AVAIL as u32);
    wr(&mut dev, regs::QUEUE_DEVICE_LOW, USED as u32);
    wr(&mut dev, regs::QUEUE_READY, 1);
    wr(
        &mut dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(dev.is_activated());
    assert!(dev.is_logging(), "LOG_ALL negotiated and the log shared");
    assert!(log.dirty_pages().is_empty(), "nothing written yet");

    // A virtio-blk read of sector 0: header, 512-byte data (device-writable),
    // status (device-writable).
    let mut hdr = 0u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_IN
    hdr.extend_from_slice(&[0; 4]);
    hdr.extend_from_slice(&0u64.to_le_bytes());
    mem.write(HDR, &hdr);
    mem.write(STATUS, &[0xff]);
    mem.write(DESC, &desc(HDR, 16, 1, 1));
    mem.write(DESC + 16, &desc(DATA, 512, 1 | 2, 2));
    mem.write(DESC + 32, &desc(STATUS, 1, 2, 0));
    mem.write(AVAIL + 4, &0u16.to_le_bytes());
    mem.write(AVAIL + 2, &1u16.to_le_bytes());
    wr(&mut dev, regs::QUEUE_NOTIFY, 0);

    let start = Instant::now();
    while mem.read(USED + 2, 2) != [1, 0] {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "backend did not complete the read"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(&mem.read(DATA, 4), b"VMR!");
    assert_eq!(mem.read(STATUS, 1), [0]);
    let pages = log.dirty_pages();
    for (what, gpa) in [
        ("data buffer", DATA),
        ("status byte", STATUS),
        ("used ring", USED),
    ] {
        assert!(
            pages.contains(&(gpa / 4096)),
            "{what} page {:#x} not logged: {pages:?}",
            gpa / 4096
        );
    }
    assert!(
        !pages.contains(&(HDR / 4096)),
        "device-readable pages are not logged: {pages:?}"
    );
    let words = log.drain();
    assert_ne!(words[0] & (1 << (DATA / 4096)), 0);
    assert!(log.dirty_pages().is_empty(), "drain clears the log");
    drop(dev);
    let _ = server.stop();
}
