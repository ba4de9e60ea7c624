//! The virtio-mmio transport driven register by register against a real
//! vhost-user backend (a small in-test device built on `vhost-user-backend`
//! that completes every request by filling its writable buffers), over a
//! real Unix socket, with guest memory in a memfd shared with the backend.
//! No KVM is needed: notifications take the MMIO-exit path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::{Listener, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmr_vmm::devices::mmio::{
    regs, status, DeviceKind, MmioDeviceConfig, VirtioMmioDevice, VmResources,
};
use vmr_vmm::devices::persist::{MmioConstructorArgs, Persist};

mod common;
use common::{rd, wr, Memory};

const FILL: u8 = 0xab;

/// A device that completes each descriptor chain by filling its writable
/// buffers with `FILL`, and serves an 8-byte config space.
struct FillDevice {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    config: Vec<u8>,
}

impl VhostUserBackendMut for FillDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (o, s) = (offset as usize, size as usize);
        self.config
            .get(o..o + s)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let vring = &vrings[device_event as usize];
        let mem = self
            .mem
            .as_ref()
            .expect("memory arrives before kicks")
            .memory();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            std::iter::from_fn(|| q.pop_descriptor_chain(mem.clone())).collect()
        };
        for chain in chains {
            let head = chain.head_index();
            let mut len = 0;
            for d in chain.clone() {
                if d.is_write_only() {
                    let buf = vec![FILL; d.len() as usize];
                    vm_memory::Bytes::write_slice(&*mem, &buf, d.addr())
                        .map_err(std::io::Error::other)?;
                    len += d.len();
                }
            }
            vring.add_used(head, len).map_err(std::io::Error::other)?;
        }
        vring.signal_used_queue()
    }
}

/// Serves one connection on `path` in a background thread.
fn serve(path: &Path) -> std::thread::JoinHandle<()> {
    let mut listener = Listener::new(path, true).expect("socket path in a fresh temp dir");
    let backend = Arc::new(RwLock::new(FillDevice {
        mem: None,
        config: vec![1, 2, 3, 4, 5, 6, 7, 8],
    }));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new("fill".into(), backend, mem).expect("daemon setup cannot fail");
    std::thread::spawn(move || {
        daemon.start(&mut listener).expect("frontend connects");
        let _ = daemon.wait();
    })
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x8000;
const QSIZE: u16 = 8;

/// Puts a one-descriptor, device-writable chain in slot `n` and notifies.
fn submit(mem: &Memory, dev: &mut VirtioMmioDevice, n: u16) {
    let slot = u64::from(n % QSIZE);
    let mut d = Vec::new();
    d.extend_from_slice(&(BUF + slot * 64).to_le_bytes());
    d.extend_from_slice(&16u32.to_le_bytes());
    d.extend_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    d.extend_from_slice(&0u16.to_le_bytes());
    mem.write(DESC + slot * 16, &d);
    mem.write(AVAIL + 4 + 2 * slot, &(slot as u16).to_le_bytes());
    mem.write(AVAIL + 2, &(n + 1).to_le_bytes());
    wr(dev, regs::QUEUE_NOTIFY, 0);
}

fn wait_used(mem: &Memory, idx: u16) {
    let start = Instant::now();
    while mem.read_u16(USED + 2) != idx {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "backend did not complete request {idx}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn socket(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn driver_handshake_requests_save_serialize_restore() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mem = Memory::new();
    let res = VmResources {
        vm: None,
        irqchip: false,
        regions: vec![mem.region()],
        dirty_log: None,
        lazy: None,
    };
    let sock1 = socket(&dir, "a.sock");
    let t1 = serve(&sock1);
    let mut dev = VirtioMmioDevice::new(
        MmioDeviceConfig {
            kind: DeviceKind::Block,
            socket: sock1.clone(),
            mmio_base: 0xd000_0000,
            gsi: 5,
            local_config: vec![0; 36],
        },
        res.clone(),
    )
    .expect("backend is listening");

    assert_eq!(rd(&mut dev, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut dev, regs::VERSION), 2);
    assert_eq!(rd(&mut dev, regs::DEVICE_ID), 2);
    // Config comes from the backend through GET_CONFIG.
    let mut cfg = [0u8; 4];
    dev.mmio_read(regs::CONFIG + 4, &mut cfg);
    assert_eq!(cfg, [5, 6, 7, 8]);

    wr(&mut dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut dev, regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        rd(&mut dev, regs::DEVICE_FEATURES) & 1,
        1,
        "VERSION_1 offered"
    );
    wr(&mut dev, regs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        rd(&mut dev, regs::DEVICE_FEATURES) & (1 << 30),
        0,
        "vhost-user bits hidden"
    );
    // Acking a feature the device lacks is refused at FEATURES_OK.
    wr(&mut dev, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut dev, regs::DRIVER_FEATURES, 1 << 3);
    wr(&mut dev, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut dev, regs::DRIVER_FEATURES, 1);
    wr(
        &mut dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut dev, regs::STATUS) & status::FEATURES_OK, 0);
    wr(&mut dev, regs::STATUS, 0);
    wr(&mut dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut dev, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut dev, regs::DRIVER_FEATURES, 1);
    wr(
        &mut dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(&mut dev, regs::STATUS) & status::FEATURES_OK, 0);

    wr(&mut dev, regs::QUEUE_SEL, 0);
    assert_eq!(rd(&mut dev, regs::QUEUE_NUM_MAX), 256);
    wr(&mut dev, regs::QUEUE_NUM, u32::from(QSIZE));
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
    assert_eq!(rd(&mut dev, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);

    for n in 0..3 {
        submit(&mem, &mut dev, n);
        wait_used(&mem, n + 1);
    }
    assert_eq!(mem.read(BUF, 16), vec![FILL; 16]);
    // The relay thread turned the backend's call into InterruptStatus.
    let start = Instant::now();
    while rd(&mut dev, regs::INTERRUPT_STATUS) & 1 == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no used-buffer interrupt status"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    wr(&mut dev, regs::INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut dev, regs::INTERRUPT_STATUS), 0);

    // Snapshot: stop the rings, save, serialize.
    dev.pause().expect("backend answers GET_VRING_BASE");
    let state = Persist::save(&dev);
    assert!(state.activated);
    assert_eq!(state.queues[0].next_avail, 3);
    assert_eq!(state.queues[0].size, QSIZE);
    assert_eq!(state.queues[0].desc, DESC);
    let json = serde_json::to_vec(&state).expect("state serializes");
    drop(dev);
    // The first backend's session ends with the hang-up; its threads idle
    // until the test process exits.
    drop(t1);

    // Restore into a fresh device with a fresh backend process-equivalent.
    let sock2 = socket(&dir, "b.sock");
    let _t2 = serve(&sock2);
    let back: vmr_vmm::devices::mmio::MmioDeviceState =
        serde_json::from_slice(&json).expect("state deserializes");
    assert_eq!(back, state);
    let mut dev2 =
        <VirtioMmioDevice as Persist>::restore(MmioConstructorArgs { socket: sock2, res }, &back)
            .expect("restore reconnects and restarts the ring");
    assert!(dev2.is_activated());
    assert_eq!(Persist::save(&dev2).queues, state.queues);
    assert_eq!(rd(&mut dev2, regs::STATUS), state.status);
    // The restored ring continues at index 3: the next request completes
    // and nothing before it is processed again.
    mem.write(BUF + 3 * 64, &[0; 16]);
    mem.write(BUF, &[0; 16]);
    submit(&mem, &mut dev2, 3);
    wait_used(&mem, 4);
    assert_eq!(mem.read(BUF + 3 * 64, 16), vec![FILL; 16]);
    assert_eq!(mem.read(BUF, 16), vec![0; 16], "request 0 was not replayed");
}

#[test]
fn missing_backend_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = VirtioMmioDevice::new(
        MmioDeviceConfig {
            kind: DeviceKind::Net,
            socket: dir.path().join("nobody.sock"),
            mmio_base: 0xd000_1000,
            gsi: 6,
            local_config: DeviceKind::Net.local_config(0, [2, 0, 0, 0, 0, 1]),
        },
        VmResources {
            vm: None,
            irqchip: false,
            regions: vec![],
            dirty_log: None,
            lazy: None,
        },
    )
    .expect_err("nothing listens there");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[test]
fn odd_guest_accesses_are_ignored_without_panicking() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mem = Memory::new();
    let sock = socket(&dir, "odd.sock");
    let _t = serve(&sock);
    let mut dev = VirtioMmioDevice::new(
        MmioDeviceConfig {
            kind: DeviceKind::Block,
            socket: sock,
            mmio_base: 0xd000_0000,
            gsi: 5,
            local_config: vec![9; 36],
        },
        VmResources {
            vm: None,
            irqchip: false,
            regions: vec![mem.region()],
            dirty_log: None,
            lazy: None,
        },
    )
    .expect("backend is listening");
    // Narrow and wide register accesses read as zero / are dropped.
    let mut b2 = [0xffu8; 2];
    dev.mmio_read(regs::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    dev.mmio_write(regs::STATUS, &[1, 0]);
    assert_eq!(rd(&mut dev, regs::STATUS), 0);
    // Unknown registers.
    assert_eq!(rd(&mut dev, 0x0c0), 0);
    wr(&mut dev, 0x0c0, 7);
    // A queue that does not exist.
    wr(&mut dev, regs::QUEUE_SEL, 9);
    assert_eq!(rd(&mut dev, regs::QUEUE_NUM_MAX), 0);
    wr(&mut dev, regs::QUEUE_NUM, 8);
    wr(&mut dev, regs::QUEUE_READY, 1);
    assert_eq!(rd(&mut dev, regs::QUEUE_READY), 0);
    wr(&mut dev, regs::QUEUE_NOTIFY, 9);
    wr(&mut dev, regs::QUEUE_NOTIFY, 0);
    // Queue size is capped at QueueNumMax; addresses freeze once ready.
    wr(&mut dev, regs::QUEUE_SEL, 0);
    wr(&mut dev, regs::QUEUE_NUM, 100_000);
    wr(&mut dev, regs::QUEUE_DESC_LOW, 0x1000);
    wr(&mut dev, regs::QUEUE_READY, 1);
    wr(&mut dev, regs::QUEUE_DESC_LOW, 0x5000);
    assert_eq!(rd(&mut dev, regs::QUEUE_DESC_LOW), 0x1000);
    assert_eq!(dev.save().queues[0].size, 256);
    // Config space past its end reads as zero; within, the backend's bytes.
    let mut c = [0xffu8; 4];
    dev.mmio_read(regs::CONFIG + 200, &mut c);
    assert_eq!(c, [0; 4]);
    dev.mmio_read(regs::CONFIG, &mut c);
    assert_eq!(c, [1, 2, 3, 4]);
    // A reset clears the queues.
    wr(&mut dev, regs::STATUS, 0);
    assert_eq!(rd(&mut dev, regs::QUEUE_READY), 0, "reset clears queues");
    assert!(!dev.is_activated());
}
