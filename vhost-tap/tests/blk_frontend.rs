//! In-process vhost-user front-end tests against the real block backend on a
//! unix socket: negotiation, I/O, drain on GET_VRING_BASE, reconnect, capture
//! records, malformed chains and dirty logging.

use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::capture::{content_hash, ContentHashKind, MemorySink, Tee, TeeConfig};
use vhost_tap::metrics::Metrics;
use vhost_tap::seq::AtomicSeq;
use vhost_tap::server::Server;
use vhost_tap::testing::{BlkRequestBuilder as Rb, DriverQueue, GuestRam, TestFrontend};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmr_proto::pb;

const DISK: usize = 4 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    image: PathBuf,
    server: Option<Server>,
    sink: Arc<MemorySink>,
    tee: Tee,
    metrics: Arc<Metrics>,
    backend: BlockBackend,
}

fn rig(num_queues: usize, overlay: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i / 512 % 251) as u8).collect();
    std::fs::write(&image, pattern).unwrap();
    let ov = dir.path().join("disk.overlay");
    let disk = Disk::open(&image, overlay.then_some(ov.as_path()), false).unwrap();
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(MemorySink::new());
    let tee = Tee::start(
        TeeConfig::new("vm-test"),
        sink.clone(),
        Arc::new(AtomicSeq::default()),
        metrics.clone(),
    )
    .unwrap();
    let mut cfg = BlockConfig::new("vda");
    cfg.num_queues = num_queues;
    let backend = BlockBackend::new(cfg, disk, Some(tee.clone()), None, metrics.clone()).unwrap();
    let sock = dir.path().join("blk.sock");
    let server = Server::spawn("blk", backend.clone(), &sock, false).unwrap();
    Rig {
        _dir: dir,
        sock,
        image,
        server: Some(server),
        sink,
        tee,
        metrics,
        backend,
    }
}

impl Rig {
    fn records(&self) -> Vec<pb::Event> {
        // The sink thread drains within milliseconds; wait for quiescence.
        let want = self.metrics.snapshot().recorded as usize;
        assert!(TestFrontend::wait_for(5, || self.sink.len() >= want));
        self.sink.take()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
        self.tee.shutdown();
    }
}

/// Connects a front-end with one or more queues of 256 at 0x1_0000 + i*64K.
fn connect(
    rig: &Rig,
    ram: &GuestRam,
    nq: usize,
    mask_out: u64,
) -> (TestFrontend, Vec<DriverQueue>) {
    let mut fe = TestFrontend::connect(&rig.sock, nq as u64).unwrap();
    let qs: Vec<DriverQueue> = (0..nq)
        .map(|i| DriverQueue::new(ram, 0x1_0000 + i as u64 * 0x1_0000, 256))
        .collect();
    let refs: Vec<&DriverQueue> = qs.iter().collect();
    fe.setup(ram, &refs, mask_out).unwrap();
    (fe, qs)
}

/// Posts a read or write of `len` bytes at `sector` on `q`; returns (head,
/// data addr, status addr).
fn post(
    ram: &mut GuestRam,
    q: &mut DriverQueue,
    t: u32,
    sector: u64,
    data: &[u8],
) -> (u16, u64, u64) {
    let (hdr, status) = Rb::header(ram, t, sector).unwrap();
    let buf = ram.alloc(data.len() as u64).unwrap();
    let write = t == VIRTIO_BLK_T_IN;
    if !write {
        ram.write(buf, data);
    }
    let head = q.add_chain(
        ram,
        &[
            (hdr, 16, false),
            (buf, data.len() as u32, write),
            (status, 1, true),
        ],
    );
    q.publish(ram, head);
    (head, buf, status)
}

fn wait_used(ram: &GuestRam, q: &DriverQueue, n: u16) {
    assert!(
        TestFrontend::wait_for(10, || q.used_idx(ram) == n),
        "device completed {} of {n}",
        q.used_idx(ram)
    );
}

#[test]
fn negotiation_offers_logging_and_config() {
    let rig = rig(2, false);
    let mut fe = TestFrontend::connect(&rig.sock, 2).unwrap();
    fe.fe.set_owner().unwrap();
    let features = fe.fe.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::LOG_ALL.bits(),
        0,
        "LOG_ALL offered"
    );
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    assert_ne!(features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    fe.fe.set_features(features).unwrap();
    let proto = fe.fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
    ] {
        assert!(proto.contains(f), "{f:?} offered");
    }
    fe.fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.fe.get_queue_num().unwrap(), 2);
    let (_, cfg) = fe
        .fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap());
    assert_eq!(capacity, (DISK / 512) as u64);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
}

#[test]
fn write_then_read_back_with_matching_records() {
    let rig = rig(1, true);
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let (fe, mut qs) = connect(&rig, &ram, 1, 0);
    let q = &mut qs[0];
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    let (_, _, st_w) = post(&mut ram, q, VIRTIO_BLK_T_OUT, 100, &data);
    fe.kick(0).unwrap();
    wait_used(&ram, q, 1);
    assert_eq!(Rb::status(&ram, st_w), VIRTIO_BLK_S_OK as u8);
    let (_, buf, st_r) = post(&mut ram, q, VIRTIO_BLK_T_IN, 100, &vec![0u8; 8192]);
    // A read of untouched sectors comes from the base image.
    let (_, buf2, _) = post(&mut ram, q, VIRTIO_BLK_T_IN, 2000, &vec![0u8; 512]);
    let (_, _, st_f) = post(&mut ram, q, VIRTIO_BLK_T_FLUSH, 0, &[]);
    fe.kick(0).unwrap();
    wait_used(&ram, q, 4);
    assert_eq!(Rb::status(&ram, st_r), VIRTIO_BLK_S_OK as u8);
    assert_eq!(Rb::status(&ram, st_f), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 8192];
    ram.read(buf, &mut got);
    assert_eq!(got, data);
    let mut base = vec![0u8; 512];
    ram.read(buf2, &mut base);
    assert_eq!(base, vec![(2000 % 251) as u8; 512]);
    // Used lengths: a read reports data + status.
    let used: Vec<_> = std::iter::from_fn(|| q.pop_used(&ram)).collect();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![1, 8193, 513, 1]
    );
    // The base image is untouched (writes went to the overlay).
    let img = std::fs::read(&rig.image).unwrap();
    assert_eq!(img[100 * 512], 100, "sector 100 still holds its pattern");

    let recs = rig.records();
    assert_eq!(
        recs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let blocks: Vec<&pb::BlockIo> = recs
        .iter()
        .map(|e| match e.payload.as_ref().unwrap() {
            pb::event::Payload::Block(b) => b,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert!(recs
        .iter()
        .all(|e| e.instance_id == "vm-test" && e.wall_time_ns > 0 && e.mono_time_ns > 0));
    assert_eq!(blocks[0].op, pb::BlockOp::Write as i32);
    assert_eq!((blocks[0].sector, blocks[0].len), (100, 8192));
    assert_eq!(blocks[0].data, data);
    assert_eq!(blocks[1].op, pb::BlockOp::Read as i32);
    let mut h = Vec::new();
    content_hash(ContentHashKind::Xxh3_128, &data, &mut h);
    assert_eq!(blocks[1].content_hash, h);
    assert_eq!(blocks[1].hash_algorithm, pb::HashAlgorithm::Xxh3128 as i32);
    assert!(blocks[1].data.is_empty());
    content_hash(ContentHashKind::Xxh3_128, &base, &mut h);
    assert_eq!(blocks[2].content_hash, h);
    assert_eq!(blocks[3].op, pb::BlockOp::Flush as i32);
    assert!(blocks
        .iter()
        .all(|b| b.status == pb::BlockStatus::Ok as i32 && b.device == "vda"));
}

#[test]
fn get_vring_base_drains_in_flight_requests() {
    drain_rounds(32 << 10);
}

/// Large writes, whose records the sink writes as split frames.
#[test]
fn get_vring_base_drains_large_writes() {
    drain_rounds(128 << 10);
}

/// Twelve rounds of 80 writes of `len` bytes, each stopped by
/// GET_VRING_BASE while the driver is still publishing.
fn drain_rounds(len: usize) {
    let rig = rig(1, false);
    let mut ram = GuestRam::new(64 << 20).unwrap();
    let n = 80u16;
    let mut mid_batch = 0;
    for round in 0..12u64 {
        let (mut fe, mut qs) = connect(&rig, &ram, 1, 0);
        let q = &mut qs[0];
        ram.reset_alloc();
        // Lay out every request, then publish and kick them one by one from
        // a driver thread while this thread stops the ring.
        let mut statuses = Vec::new();
        let mut heads = Vec::new();
        for i in 0..u64::from(n) {
            let at = i * len as u64 % DISK as u64;
            let (hdr, st) = Rb::header(&mut ram, VIRTIO_BLK_T_OUT, at / 512).unwrap();
            let buf = ram.alloc(len as u64).unwrap();
            ram.write(buf, &vec![round as u8 ^ i as u8; len]);
            heads.push(q.add_chain(
                &ram,
                &[(hdr, 16, false), (buf, len as u32, false), (st, 1, true)],
            ));
            statuses.push(st);
        }
        let base = std::thread::scope(|s| {
            let (ram_ref, kick) = (&ram, &fe.kicks[0]);
            let q_ref = &mut *q;
            let driver = s.spawn(move || {
                for h in heads {
                    q_ref.publish(ram_ref, h);
                    kick.write(1).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            });
            std::thread::sleep(std::time::Duration::from_micros(200 + round * 100));
            let base = fe.fe.get_vring_base(0).unwrap() as u16;
            driver.join().unwrap();
            base
        });
        let used = q.used_idx(&ram);
        // Everything consumed before the stop is completed; nothing after.
        assert_eq!(
            used, base,
            "round {round}: ring base {base} but {used} completed"
        );
        for (i, st) in statuses.iter().enumerate() {
            let s = Rb::status(&ram, *st);
            let want = if (i as u16) < base {
                VIRTIO_BLK_S_OK as u8
            } else {
                0xff
            };
            assert_eq!(s, want, "round {round}: request {i}, ring base {base}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(q.used_idx(&ram), base, "no completion after the stop");
        eprintln!("round {round}: stopped after {base} of {n}");
        if base > 0 && base < n {
            mid_batch += 1;
        }
        // Restart the ring at the base: the rest completes, each exactly once.
        fe.restart_queue(&ram, 0, q, base).unwrap();
        fe.kick(0).unwrap();
        wait_used(&ram, q, n);
        let mut heads: Vec<u16> = std::iter::from_fn(|| q.pop_used(&ram))
            .map(|u| u.0)
            .collect();
        assert_eq!(heads.len(), n as usize);
        heads.sort_unstable();
        heads.dedup();
        assert_eq!(heads.len(), n as usize, "no duplicate completions");
        assert!(statuses
            .iter()
            .all(|st| Rb::status(&ram, *st) == VIRTIO_BLK_S_OK as u8));
        drop(fe);
    }
    eprintln!("{mid_batch} of 12 stops landed inside a batch");
    // Every request was recorded exactly once, with the data it wrote.
    let recs = rig.records();
    assert_eq!(recs.len(), 12 * n as usize);
    let m = rig.metrics.snapshot();
    assert_eq!(m.requests, 12 * u64::from(n));
    assert_eq!(m.recorded, 12 * u64::from(n));
    let mut fills: Vec<u8> = recs
        .iter()
        .map(|ev| {
            let Some(pb::event::Payload::Block(b)) = &ev.payload else {
                panic!("unexpected record {ev:?}");
            };
            assert_eq!(b.len as usize, len);
            assert!(
                b.data.len() == len && b.data.iter().all(|&x| x == b.data[0]),
                "the record of the write at sector {} holds the bytes it wrote",
                b.sector
            );
            b.data[0]
        })
        .collect();
    let mut want: Vec<u8> = (0..12u8)
        .flat_map(|round| (0..n).map(move |i| round ^ i as u8))
        .collect();
    fills.sort_unstable();
    want.sort_unstable();
    assert_eq!(fills, want);
}

#[test]
fn reconnect_serves_a_new_frontend() {
    let rig = rig(1, false);
    let mut ram = GuestRam::new(16 << 20).unwrap();
    for round in 0..3u8 {
        let (fe, mut qs) = connect(&rig, &ram, 1, 0);
        let q = &mut qs[0];
        ram.reset_alloc();
        let (_, _, st) = post(&mut ram, q, VIRTIO_BLK_T_OUT, 8, &[round + 1; 512]);
        let (_, buf, _) = post(&mut ram, q, VIRTIO_BLK_T_IN, 8, &[0u8; 512]);
        fe.kick(0).unwrap();
        wait_used(&ram, q, 2);
        assert_eq!(Rb::status(&ram, st), VIRTIO_BLK_S_OK as u8);
        let mut got = [0u8; 512];
        ram.read(buf, &mut got);
        assert_eq!(got, [round + 1; 512]);
        drop(fe);
    }
    // Records stay contiguous across connections.
    let recs = rig.records();
    assert_eq!(
        recs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
}

#[test]
fn multiqueue_and_event_idx() {
    let rig = rig(2, false);
    let mut ram = GuestRam::new(32 << 20).unwrap();
    let (fe, mut qs) = connect(&rig, &ram, 2, 0);
    assert_ne!(fe.features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    for (i, q) in qs.iter_mut().enumerate() {
        // Ask for an interrupt only after the 4th completion.
        q.set_used_event(&ram, 3);
        for k in 0..4u64 {
            post(
                &mut ram,
                q,
                VIRTIO_BLK_T_OUT,
                (i as u64) * 4096 + k * 8,
                &[k as u8; 4096],
            );
        }
    }
    fe.kick(0).unwrap();
    fe.kick(1).unwrap();
    for q in &qs {
        wait_used(&ram, q, 4);
    }
    assert!(TestFrontend::wait_for(5, || fe
        .calls
        .iter()
        .all(|c| c.read().is_ok())));
    assert_eq!(rig.metrics.snapshot().requests, 8);
    let recs = rig.records();
    let mut queues: Vec<u32> = recs
        .iter()
        .map(|e| match e.payload.as_ref().unwrap() {
            pb::event::Payload::Block(b) => b.queue,
            _ => 99,
        })
        .collect();
    queues.sort_unstable();
    assert_eq!(queues, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    let mut seqs: Vec<u64> = recs.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

#[test]
fn malformed_chains_are_counted_and_the_device_keeps_working() {
    let rig = rig(1, false);
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let (fe, mut qs) = connect(&rig, &ram, 1, 0);
    let q = &mut qs[0];
    let (hdr, status) = Rb::header(&mut ram, VIRTIO_BLK_T_IN, 0).unwrap();
    let size = ram.size() as u64;
    // Out of range data buffer.
    let h = q.add_chain(
        &ram,
        &[
            (hdr, 16, false),
            (size - 512, 4096, true),
            (status, 1, true),
        ],
    );
    q.publish(&ram, h);
    // Wrong direction: read with device-readable data.
    let (hdr2, st2) = Rb::header(&mut ram, VIRTIO_BLK_T_IN, 0).unwrap();
    let buf = ram.alloc(512).unwrap();
    let h = q.add_chain(
        &ram,
        &[(hdr2, 16, false), (buf, 512, false), (st2, 1, true)],
    );
    q.publish(&ram, h);
    // Too short: header only, no status.
    let h = q.add_chain(&ram, &[(hdr2, 16, false)]);
    q.publish(&ram, h);
    // A loop: a descriptor pointing at itself.
    q.set_next_desc(40);
    q.write_desc(
        &ram,
        40,
        hdr2,
        16,
        virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
        40,
    );
    q.publish(&ram, 40);
    // Oversized: 8 MiB read.
    let (hdr3, st3) = Rb::header(&mut ram, VIRTIO_BLK_T_IN, 0).unwrap();
    let big = ram.alloc(8 << 20).unwrap();
    q.set_next_desc(50);
    let h = q.add_chain(
        &ram,
        &[(hdr3, 16, false), (big, 8 << 20, true), (st3, 1, true)],
    );
    q.publish(&ram, h);
    // Then a good request.
    let (_, good, st_ok) = post(&mut ram, q, VIRTIO_BLK_T_IN, 1, &[0u8; 512]);
    fe.kick(0).unwrap();
    wait_used(&ram, q, 6);
    assert_eq!(rig.metrics.snapshot().malformed, 5);
    assert_eq!(Rb::status(&ram, st2), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(Rb::status(&ram, st3), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(Rb::status(&ram, st_ok), VIRTIO_BLK_S_OK as u8);
    let mut got = [0u8; 512];
    ram.read(good, &mut got);
    assert_eq!(got, [1u8; 512]);
    // Out of range sector: a normal I/O error, not malformed.
    let (_, _, st) = post(
        &mut ram,
        q,
        VIRTIO_BLK_T_IN,
        (DISK / 512) as u64,
        &[0u8; 512],
    );
    fe.kick(0).unwrap();
    wait_used(&ram, q, 7);
    assert_eq!(Rb::status(&ram, st), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(rig.metrics.snapshot().io_errors, 1);
}

#[test]
fn dirty_log_marks_pages_the_device_writes() {
    let rig = rig(1, false);
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let (fe, mut qs) = connect(&rig, &ram, 1, 0);
    assert!(fe.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    // One bit per 4 KiB page of the 16 MiB RAM.
    let log_len = (16 << 20) / 4096 / 8;
    let log = GuestRam::new(log_len).unwrap();
    let region = log.region_info();
    fe.fe
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_len as u64,
                mmap_offset: 0,
                mmap_handle: region.mmap_handle,
            }),
        )
        .unwrap();
    fe.fe
        .set_features(fe.features | VhostUserVirtioFeatures::LOG_ALL.bits())
        .unwrap();
    let q = &mut qs[0];
    let (_, buf, status) = post(&mut ram, q, VIRTIO_BLK_T_IN, 3, &[0u8; 8192]);
    fe.kick(0).unwrap();
    wait_used(&ram, q, 1);
    let mut bits = vec![0u8; log_len];
    log.read(0, &mut bits);
    let dirty = |gpa: u64| bits[(gpa / 4096 / 8) as usize] & (1 << (gpa / 4096 % 8)) != 0;
    assert!(dirty(buf) && dirty(buf + 4096), "data pages logged");
    assert!(dirty(status), "status page logged");
    assert!(dirty(q.used), "used ring logged");
    assert!(!dirty(0x80_0000), "untouched page clean");
    drop(rig.backend.clone());
}
