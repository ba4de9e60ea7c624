//! The NIC/disk workload through snapshot and clone, with in-process
//! backends: `vhost-tap`'s block backend and a small in-test vhost-user NIC
//! (frames pushed by the test, transmitted frames collected). The original
//! serves two requests, is snapshotted, serves request 2 and crashes on a
//! poison request. A clone restored from the snapshot (new VM, new backends,
//! a copy of the disk at the cut) is given the same request 2 and poison
//! frames: its disk sector and reply must equal the original's byte for
//! byte, and its triple fault must come with the same registers.
//!
//! The clone is made three times: once with its memory copied in before it runs
//! (`SharedCopy`) and once restored lazily (`SharedLazy`: pages come in on
//! first access by a vCPU or a backend, both backends taking part in
//! postcopy, while a background thread copies the rest), and once on demand
//! (`SharedOnDemand`: no background copy, every page comes in through a
//! fault). Each must behave like the original.
//!
//! `devices_e2e` runs the same scenario against the `vhost-tap` binaries.

mod common;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{guest_elf, require_kvm};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_tap::blk::disk::map_path;
use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::metrics::Metrics;
use vhost_tap::server::Server;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmr_proto::LifecycleKind;
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::serial::SharedBuffer;
use vmr_vmm::snapshot::{MemoryKind, RestoreMemory};
use vmr_vmm::vm::{BootSource, SnapshotDevice};

/// `CMD_NET_DISK` of `guest/test-guest/workload.h`.
const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const MEM: u64 = 32 << 20;
const WAIT: Duration = Duration::from_secs(60);
const NET_HDR: usize = 12;

#[derive(Default)]
struct NicState {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    rx: Option<VringRwLock>,
    pending: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

/// A vhost-user NIC for the test: frames queued with [`Nic::push`] go to
/// the guest as soon as it has posted receive buffers; frames the guest
/// transmits are collected in order.
#[derive(Clone, Default)]
struct Nic(Arc<Mutex<NicState>>);

impl Nic {
    fn push(&self, frame: &[u8]) {
        let mut s = self.0.lock().expect("not poisoned");
        s.pending.push_back(frame.to_vec());
        deliver(&mut s);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        self.0.lock().expect("not poisoned").sent.clone()
    }
}

/// Copies pending frames into posted receive buffers.
fn deliver(s: &mut NicState) {
    let (Some(mem), Some(rx)) = (s.mem.clone(), s.rx.clone()) else {
        return;
    };
    let mem = mem.memory();
    while let Some(frame) = s.pending.front() {
        let chain = rx
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone());
        let Some(chain) = chain else { return };
        let mut data = vec![0u8; NET_HDR];
        data.extend_from_slice(frame);
        let head = chain.head_index();
        let mut off = 0;
        for d in chain.clone().filter(|d| d.is_write_only()) {
            let n = (d.len() as usize).min(data.len() - off);
            mem.write_slice(&data[off..off + n], d.addr())
                .expect("guest buffer in RAM");
            off += n;
        }
        rx.add_used(head, off as u32).expect("used ring in RAM");
        let _ = rx.signal_used_queue();
        s.pending.pop_front();
    }
}

struct NicBackend(Nic);

impl VhostUserBackendMut for NicBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 5) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::PAGEFAULT
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = GUEST_MAC.to_vec();
        c.extend_from_slice(&[1, 0, 1, 0, 0xdc, 0x05]);
        let (o, n) = (offset as usize, size as usize);
        c.get(o..o + n).map(<[u8]>::to_vec).unwrap_or_default()
    }
    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.0 .0.lock().expect("not poisoned").mem = Some(mem);
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let mut s = self.0 .0.lock().expect("not poisoned");
        match device_event {
            0 => {
                s.rx = Some(vrings[0].clone());
                deliver(&mut s);
            }
            1 => {
                let mem = s.mem.clone().expect("memory before kicks").memory();
                let tx = &vrings[1];
                loop {
                    let chain = tx
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = chain else { break };
                    let head = chain.head_index();
                    let mut bytes = Vec::new();
                    for d in chain.clone() {
                        let mut b = vec![0u8; d.len() as usize];
                        mem.read_slice(&mut b, d.addr())
                            .map_err(std::io::Error::other)?;
                        bytes.extend_from_slice(&b);
                    }
                    s.sent.push(bytes.split_off(NET_HDR.min(bytes.len())));
                    tx.add_used(head, 0).map_err(std::io::Error::other)?;
                }
                tx.signal_used_queue()?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Serves the NIC on `socket` for one front-end (threads idle afterwards).
fn serve_nic(socket: &Path) -> Nic {
    let nic = Nic::default();
    let mut listener = vhost::vhost_user::Listener::new(socket, true).expect("socket path free");
    let backend = Arc::new(RwLock::new(NicBackend(nic.clone())));
    let mut daemon = VhostUserDaemon::new(
        "nic".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .expect("daemon setup");
    std::thread::spawn(move || {
        if daemon.start(&mut listener).is_ok() {
            let _ = daemon.wait();
        }
        // Dropping the daemon would wait for its worker forever.
        std::mem::forget(daemon);
    });
    nic
}

fn serve_blk(image: &Path, overlay: &Path, socket: &Path) -> Server {
    let backend = BlockBackend::new(
        BlockConfig::new("vda"),
        Disk::open(image, Some(overlay), false).expect("image opens"),
        None,
        None,
        Arc::new(Metrics::default()),
    )
    .expect("valid config");
    Server::spawn("blk", backend, socket, true).expect("socket free")
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
}

fn sector(overlay: &Path, image: &Path, n: u64) -> Vec<u8> {
    let disk = Disk::open(image, Some(overlay), true).expect("disk reopens read-only");
    let mut buf = vec![0u8; 512];
    disk.read(n * 512, &mut buf).expect("sector in range");
    buf
}

#[test]
// Heavy: needs /dev/kvm.
fn clone_continues_like_the_original_and_crashes_the_same() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("temp dir is writable");

    // The original.
    let blk_a = serve_blk(&image, &dir.join("a.overlay"), &dir.join("a-blk.sock"));
    let nic_a = serve_nic(&dir.join("a-net.sock"));
    let common::Guest {
        mut vm,
        ports,
        serial: serial_a,
    } = common::new_guest(MEM);
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
    vm.load(&BootSource::Elf(elf)).expect("guest loads");
    vm.start().expect("vCPUs start");
    ports.push_commands(&[CMD_NET_DISK]);
    wait_serial(&serial_a, "vmr-guest: net ready");

    for seq in 0..2u32 {
        nic_a.push(&request(format!("request {seq}: hello").as_bytes()));
        wait_serial(&serial_a, &done_line(seq));
    }
    assert_eq!(nic_a.sent().len(), 2);

    vm.pause().expect("pause");
    let snap = dir.join("snap");
    vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    for clone in ["b", "c", "d"] {
        let overlay = dir.join(format!("{clone}.overlay"));
        std::fs::copy(dir.join("a.overlay"), &overlay).expect("overlay copy");
        std::fs::copy(map_path(&dir.join("a.overlay")), map_path(&overlay)).expect("map copy");
    }
    vm.resume().expect("resume");

    let req2 = request(b"request 2: after the snapshot");
    let poison = request(b"POISON: crash now");
    nic_a.push(&req2);
    wait_serial(&serial_a, &done_line(2));
    nic_a.push(&poison);
    let crash_a = vm
        .wait_for_stop(WAIT)
        .expect("the poison request stops the original");
    assert_eq!(crash_a.kind, LifecycleKind::TripleFault, "{crash_a:?}");
    let reply_a = nic_a.sent()[2].clone();
    assert_eq!(&reply_a[14..21], &[b'R', b'P', b'L', 2, 0, 0, 0]);
    drop(vm);
    let _ = blk_a.stop();
    let write_a = sector(&dir.join("a.overlay"), &image, 3);
    assert_eq!(&write_a[..7], &[b'R', b'E', b'Q', 2, 0, 0, 0]);

    for (name, memory) in [
        ("b", RestoreMemory::SharedCopy),
        ("c", RestoreMemory::SharedLazy),
        ("d", RestoreMemory::SharedOnDemand),
    ] {
        run_clone(
            dir,
            &image,
            &snap,
            name,
            memory,
            &req2,
            &poison,
            &reply_a,
            &write_a,
            &crash_a.regs,
        );
    }
}

/// Restores clone `name` with `memory`, gives it request 2 and the poison
/// frame, and checks it does what the original did.
#[allow(clippy::too_many_arguments)]
fn run_clone(
    dir: &Path,
    image: &Path,
    snap: &Path,
    name: &str,
    memory: RestoreMemory,
    req2: &[u8],
    poison: &[u8],
    reply_a: &[u8],
    write_a: &[u8],
    regs_a: &[vmr_proto::VcpuRegs],
) {
    let overlay = dir.join(format!("{name}.overlay"));
    let blk_sock = dir.join(format!("{name}-blk.sock"));
    let net_sock = dir.join(format!("{name}-net.sock"));
    let blk_b = serve_blk(image, &overlay, &blk_sock);
    let nic_b = serve_nic(&net_sock);
    let t0 = Instant::now();
    let common::Restored {
        vm: clone,
        serial: serial_b,
        devices: restored,
    } = common::restore_clone(snap, &blk_sock, &net_sock, None, memory);
    assert_eq!(restored.len(), 2);
    for d in &restored {
        let joined = d.device().lock().expect("not poisoned").joined_postcopy();
        // A lazy clone's prefetch of this small guest may be done before
        // the devices start; on demand, population never ends by itself.
        match memory {
            RestoreMemory::SharedCopy => assert!(!joined),
            RestoreMemory::SharedOnDemand => assert!(joined, "{} joined postcopy", d.id()),
            _ => {}
        }
    }
    assert_eq!(
        sector(&overlay, image, 3),
        vec![0u8; 512],
        "sector 3 is not written at the cut"
    );
    clone.resume().expect("clone runs");
    eprintln!(
        "{memory:?}: restore with 2 devices to running in {:?}",
        t0.elapsed()
    );
    nic_b.push(req2);
    wait_serial(&serial_b, &done_line(2));
    let start = Instant::now();
    while nic_b.sent().is_empty() {
        assert!(start.elapsed() < WAIT, "the clone sent no reply");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        nic_b.sent(),
        vec![reply_a.to_vec()],
        "{memory:?}: the clone's reply equals the original's"
    );
    nic_b.push(poison);
    let crash_b = clone
        .wait_for_stop(WAIT)
        .expect("the poison request stops the clone");
    assert_eq!(crash_b.kind, LifecycleKind::TripleFault);
    assert_eq!(crash_b.regs, regs_a, "{memory:?}: same faulting registers");
    if let Some(lazy) = clone.memory().lazy() {
        if memory == RestoreMemory::SharedLazy {
            lazy.wait_populated(WAIT)
                .expect("every page of the lazy clone is populated");
        }
        let stats = lazy.stats();
        eprintln!("{memory:?}: {stats:?}");
        assert!(stats.error.is_none(), "{stats:?}");
        if memory == RestoreMemory::SharedOnDemand {
            // Only accesses brought pages in: the vCPU's and both backends'
            // (rings, descriptors, frames and the disk buffer).
            assert!(
                stats.vmm_faults > 0 && stats.backend_faults > 0 && stats.prefetched == 0,
                "{stats:?}"
            );
        } else {
            assert!(stats.complete, "{stats:?}");
        }
    }
    drop(clone);
    let _ = blk_b.stop();
    assert_eq!(
        sector(&overlay, image, 3),
        write_a,
        "{memory:?}: the clone's disk write equals the original's"
    );
}
