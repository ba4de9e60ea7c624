//! Recording integrity under failure: the real backends (in-process over a
//! unix socket, and the `vhost-tap-blk` binary) with real capture files.
//!
//! - a write's record holds the bytes the disk got, even while the guest
//!   scribbles over its buffer;
//! - a FLUSH completes only after the records before it are durable;
//! - a received frame is numbered before the guest can see it;
//! - a full spool blocks or drops (with a GAP event) by policy;
//! - a backend killed with SIGKILL restarts past every number it handed
//!   out, reports the lost ones in a GAP event, and appends to the spool.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::capture::{
    spool, CaptureError, CaptureSink, MemorySink, Policy, Record, Recycle, SinkError, SpoolConfig,
    SpoolItem, SpoolReader, SpoolSink, Tee, TeeConfig,
};
use vhost_tap::metrics::Metrics;
use vhost_tap::net::{ChannelReplaySource, NetBackend, NetConfig, ReplaySource};
use vhost_tap::seq::{AtomicSeq, FileSeq, SeqSource};
use vhost_tap::server::Server;
use vhost_tap::testing::{BlkRequestBuilder as Rb, DriverQueue, GuestRam, TestFrontend};
use vhost_tap::Mode;
use virtio_bindings::virtio_blk::*;
use vmr_proto::pb;

const DISK: usize = 8 << 20;

fn image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; DISK]).unwrap();
    image
}

/// A block backend over a raw image, recording into `sink`.
fn blk_server(
    dir: &Path,
    sink: Arc<dyn CaptureSink>,
    metrics: &Arc<Metrics>,
) -> (Server, Tee, std::path::PathBuf) {
    let image = image(dir);
    let disk = Disk::open(&image, None, false).unwrap();
    let tee = Tee::start(
        TeeConfig::new("vm-int"),
        sink,
        Arc::new(AtomicSeq::default()),
        metrics.clone(),
    )
    .unwrap();
    let backend = BlockBackend::new(
        BlockConfig::new("vda"),
        disk,
        Some(tee.clone()),
        None,
        metrics.clone(),
    )
    .unwrap();
    let sock = dir.join("blk.sock");
    let server = Server::spawn("blk", backend, &sock, false).unwrap();
    (server, tee, image)
}

/// Posts a request of type `t` with `len` data bytes at `sector`; returns
/// the data and status addresses.
fn post(ram: &mut GuestRam, q: &mut DriverQueue, t: u32, sector: u64, len: u32) -> (u64, u64) {
    let (hdr, st) = Rb::header(ram, t, sector).unwrap();
    ram.write(st, &[0xff]);
    let mut chain = vec![(hdr, 16, false)];
    let mut buf = 0;
    if len > 0 {
        buf = ram.alloc(u64::from(len)).unwrap();
        chain.push((buf, len, t == VIRTIO_BLK_T_IN));
    }
    chain.push((st, 1, true));
    let h = q.add_chain(ram, &chain);
    q.publish(ram, h);
    (buf, st)
}

/// Scribbles over a write's guest buffer when the sink gets its record, as
/// a guest that reuses its buffers would.
struct ScribblingSink {
    inner: MemorySink,
    ram: Arc<GuestRam>,
    /// Guest buffer of the write at each sector.
    bufs: std::collections::HashMap<u64, (u64, usize)>,
}

impl CaptureSink for ScribblingSink {
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
        for r in batch {
            if let Some(pb::event::Payload::Block(b)) = &r.event().payload {
                if let Some((addr, len)) = self.bufs.get(&b.sector) {
                    self.ram.write(*addr, &vec![0xee; *len]);
                }
            }
        }
        self.inner.submit(batch)
    }
}

#[test]
fn a_write_records_what_the_disk_got_while_the_guest_changes_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mut ram = GuestRam::new(64 << 20).unwrap();
    const N: u64 = 24;
    const LEN: u32 = 128 << 10;
    // Lay the buffers out first: the sink and a mutator thread scribble
    // over them while the requests are in flight.
    let mut q = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut reqs = Vec::new();
    for i in 0..N {
        let (hdr, st) = Rb::header(&mut ram, VIRTIO_BLK_T_OUT, i * u64::from(LEN) / 512).unwrap();
        let buf = ram.alloc(u64::from(LEN)).unwrap();
        ram.write(buf, &vec![i as u8 + 1; LEN as usize]);
        reqs.push((hdr, buf, st));
    }
    let ram = Arc::new(ram);
    let sink = Arc::new(ScribblingSink {
        inner: MemorySink::new(),
        ram: ram.clone(),
        bufs: reqs
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u64 * u64::from(LEN) / 512, (r.1, LEN as usize)))
            .collect(),
    });
    let metrics = Arc::new(Metrics::default());
    let (server, tee, image) = blk_server(dir.path(), sink.clone(), &metrics);
    let mut fe = TestFrontend::connect(&dir.path().join("blk.sock"), 1).unwrap();
    fe.setup(&ram, &[&q], 0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mutator = {
        let (ram, stop) = (ram.clone(), stop.clone());
        let bufs: Vec<u64> = reqs.iter().map(|r| r.1).collect();
        std::thread::spawn(move || {
            let mut v = 0u8;
            while !stop.load(Ordering::Acquire) {
                v = v.wrapping_add(1);
                for b in &bufs {
                    // One byte per page: cheap, and inside every request.
                    for off in (0..u64::from(LEN)).step_by(4096) {
                        ram.write(b + off, &[v]);
                    }
                }
            }
        })
    };
    for (hdr, buf, st) in &reqs {
        let h = q.add_chain(
            &ram,
            &[(*hdr, 16, false), (*buf, LEN, false), (*st, 1, true)],
        );
        q.publish(&ram, h);
        fe.kick(0).unwrap();
    }
    assert!(TestFrontend::wait_for(20, || q.used_idx(&ram) == N as u16));
    stop.store(true, Ordering::Release);
    mutator.join().unwrap();
    drop(fe);
    server.stop().unwrap();
    tee.shutdown();
    let disk = std::fs::read(&image).unwrap();
    let recs = sink.inner.take();
    assert_eq!(recs.len() as u64, N);
    let mut scribbled = 0;
    for ev in &recs {
        let Some(pb::event::Payload::Block(b)) = &ev.payload else {
            panic!("unexpected {ev:?}");
        };
        let at = b.sector as usize * 512;
        assert_eq!(b.data.len(), LEN as usize);
        assert!(
            b.data == disk[at..at + LEN as usize],
            "the record of the write at sector {} differs from the disk",
            b.sector
        );
        // The sink got the record after the guest scribbled over the
        // buffer; the record kept the bytes the disk got (at most the
        // mutator's one byte per page can be 0xee).
        let ee = b.data.iter().filter(|&&x| x == 0xee).count();
        assert!(
            ee <= LEN as usize / 4096,
            "{ee} scribbled bytes in the record"
        );
        if b.data.iter().any(|&x| x != b.data[1]) {
            scribbled += 1;
        }
    }
    eprintln!("{scribbled} of {N} writes raced with the mutator");
}

/// A spool whose sync is slow and counted, and may be told to fail.
struct SlowSyncSink {
    inner: SpoolSink,
    submitted: AtomicU64,
    /// Records submitted when each sync finished, and when.
    syncs: Mutex<Vec<(u64, Instant)>>,
    fail: AtomicBool,
}

impl CaptureSink for SlowSyncSink {
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
        self.inner.submit(batch)?;
        self.submitted
            .fetch_add(batch.len() as u64, Ordering::AcqRel);
        Ok(())
    }
    fn sync(&self) -> Result<(), CaptureError> {
        std::thread::sleep(Duration::from_millis(300));
        if self.fail.load(Ordering::Acquire) {
            return Err(CaptureError::Io(std::io::Error::other("fsync failed")));
        }
        self.inner.sync()?;
        self.syncs
            .lock()
            .unwrap()
            .push((self.submitted.load(Ordering::Acquire), Instant::now()));
        Ok(())
    }
}

#[test]
fn a_flush_completes_only_after_the_records_before_it_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let sink = Arc::new(SlowSyncSink {
        inner: SpoolSink::open(SpoolConfig {
            dir: spool_dir.clone(),
            segment_bytes: 1 << 20,
            capacity_bytes: 64 << 20,
            recycle: Recycle::Committed,
            instance_id: "vm-int".into(),
            epoch: 1,
        })
        .unwrap(),
        submitted: AtomicU64::new(0),
        syncs: Mutex::new(Vec::new()),
        fail: AtomicBool::new(false),
    });
    let metrics = Arc::new(Metrics::default());
    let (server, tee, _image) = blk_server(dir.path(), sink.clone(), &metrics);
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let mut q = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut fe = TestFrontend::connect(&dir.path().join("blk.sock"), 1).unwrap();
    fe.setup(&ram, &[&q], 0).unwrap();
    for i in 0..5 {
        post(&mut ram, &mut q, VIRTIO_BLK_T_OUT, i * 8, 4096);
    }
    let (_, flush_st) = post(&mut ram, &mut q, VIRTIO_BLK_T_FLUSH, 0, 0);
    let kicked = Instant::now();
    fe.kick(0).unwrap();
    assert!(TestFrontend::wait_for(10, || Rb::status(&ram, flush_st) != 0xff));
    let completed = Instant::now();
    assert_eq!(Rb::status(&ram, flush_st), VIRTIO_BLK_S_OK as u8);
    let syncs = sink.syncs.lock().unwrap().clone();
    let (records, at) = *syncs.first().expect("the FLUSH made the capture durable");
    assert!(records >= 5, "the five writes were written before the sync");
    assert!(at <= completed, "the FLUSH completed after the sync");
    assert!(completed - kicked >= Duration::from_millis(300));
    assert!(metrics.snapshot().syncs >= 1);
    // The five writes are in the spool's file on disk.
    let mut r = SpoolReader::open(&spool_dir).unwrap();
    let mut writes = 0;
    while let Some(item) = r.next_item().unwrap() {
        if let SpoolItem::Event { event, .. } = item {
            if matches!(&event.payload, Some(pb::event::Payload::Block(b)) if b.op == pb::BlockOp::Write as i32)
            {
                writes += 1;
            }
        }
    }
    assert_eq!(writes, 5);

    // A capture that cannot be made durable fails the FLUSH.
    sink.fail.store(true, Ordering::Release);
    post(&mut ram, &mut q, VIRTIO_BLK_T_OUT, 80, 4096);
    let (_, st) = post(&mut ram, &mut q, VIRTIO_BLK_T_FLUSH, 0, 0);
    fe.kick(0).unwrap();
    assert!(TestFrontend::wait_for(10, || Rb::status(&ram, st) != 0xff));
    assert_eq!(Rb::status(&ram, st), VIRTIO_BLK_S_IOERR as u8);
    sink.fail.store(false, Ordering::Release);
    drop(fe);
    server.stop().unwrap();
    tee.shutdown();
}

/// Hands out numbers and notes, for each, the receive ring's used index at
/// that moment (what the guest could see).
struct WatchingSeq {
    inner: AtomicSeq,
    used_idx: *const u16,
    seen: Mutex<Vec<(u64, u16)>>,
}

// SAFETY: `used_idx` points into the test's guest RAM, which outlives the
// backend, and is only read (volatile).
unsafe impl Send for WatchingSeq {}
// SAFETY: as above.
unsafe impl Sync for WatchingSeq {}

impl SeqSource for WatchingSeq {
    fn next_n(&self, n: u64) -> u64 {
        // SAFETY: see the Send impl.
        let used = unsafe { std::ptr::read_volatile(self.used_idx) };
        let s = self.inner.next_n(n);
        self.seen.lock().unwrap().push((s, used));
        s
    }
    fn peek(&self) -> u64 {
        self.inner.peek()
    }
}

#[test]
fn a_received_frame_is_numbered_before_the_guest_can_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let mut rx = DriverQueue::new(&ram, 0x1_0000, 256);
    let tx = DriverQueue::new(&ram, 0x2_0000, 256);
    let seq = Arc::new(WatchingSeq {
        inner: AtomicSeq::default(),
        used_idx: ram.host_addr(rx.used + 2) as *const u16,
        seen: Mutex::new(Vec::new()),
    });
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(MemorySink::new());
    let tee = Tee::start(
        TeeConfig::new("vm-int"),
        sink.clone(),
        seq.clone(),
        metrics.clone(),
    )
    .unwrap();
    let source = Arc::new(ChannelReplaySource::new().unwrap());
    let mut cfg = NetConfig::new("net0");
    cfg.mode = Mode::Replay;
    let backend = NetBackend::new(
        cfg,
        None,
        Some(source.clone() as Arc<dyn ReplaySource>),
        Some(tee.clone()),
        None,
        metrics.clone(),
    )
    .unwrap();
    let server = Server::spawn("net", backend, &sock, false).unwrap();
    let mut fe = TestFrontend::connect(&sock, 2).unwrap();
    fe.setup(&ram, &[&rx, &tx], 0).unwrap();
    const N: u16 = 20;
    for _ in 0..N {
        let b = ram.alloc(2048).unwrap();
        let h = rx.add_chain(&ram, &[(b, 2048, true)]);
        rx.publish(&ram, h);
    }
    fe.kick(0).unwrap();
    for i in 0..N {
        let mut f = vec![i as u8; 64];
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        source.push(f);
    }
    assert!(TestFrontend::wait_for(10, || rx.used_idx(&ram) == N));
    drop(fe);
    server.stop().unwrap();
    tee.shutdown();
    let seen = seq.seen.lock().unwrap().clone();
    let events = sink.take();
    assert_eq!(events.len(), N as usize);
    for (k, ev) in events.iter().enumerate() {
        let &(_, used) = seen.iter().find(|(s, _)| *s == ev.seq).unwrap();
        // The k-th frame got its number while only k frames were visible.
        assert_eq!(
            used as usize, k,
            "frame {k} (seq {}) numbered after add_used",
            ev.seq
        );
    }
    let _ = &mut rx;
}

fn spool_config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_owned(),
        segment_bytes: 4 << 10,
        capacity_bytes: 16 << 10,
        recycle: Recycle::Committed,
        instance_id: "vm-int".into(),
        epoch: 1,
    }
}

/// Every seq in 1..=max is either an event or inside a GAP event's range.
fn assert_no_silent_gap(events: &[pb::Event]) -> u64 {
    let mut covered = std::collections::BTreeSet::new();
    let mut gaps = 0;
    for ev in events {
        assert!(covered.insert(ev.seq), "seq {} twice", ev.seq);
        if let Some(pb::event::Payload::Lifecycle(l)) = &ev.payload {
            if let Some(g) = &l.gap {
                gaps += 1;
                covered.extend(g.first_seq..g.first_seq + g.count);
            }
        }
    }
    let max = *covered.iter().last().unwrap();
    assert_eq!(
        covered.len() as u64,
        max,
        "a number in 1..={max} has no event and no GAP"
    );
    gaps
}

/// Reads everything the spool holds now and commits it.
fn ship(dir: &Path, out: &mut Vec<pb::Event>) {
    let mut r = SpoolReader::open(dir).unwrap();
    let mut last = None;
    while let Some(item) = r.next_item().unwrap() {
        match item {
            SpoolItem::Event { event, position } => {
                out.push(event);
                last = Some(position);
            }
            s @ SpoolItem::Skipped { .. } => panic!("a clean spool: {s:?}"),
        }
    }
    if let Some(p) = last {
        spool::commit(dir, &p).unwrap();
    }
}

#[test]
fn a_full_spool_with_policy_drop_writes_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(SpoolSink::open(spool_config(dir.path())).unwrap());
    let metrics = Arc::new(Metrics::default());
    let mut cfg = TeeConfig::new("vm-int");
    cfg.policy = Policy::Drop;
    let tee = Tee::start(cfg, sink, Arc::new(AtomicSeq::default()), metrics.clone()).unwrap();
    for i in 0..100u32 {
        tee.record_frame("net0", 0, pb::Direction::Rx, &[i as u8; 500]);
        if i % 10 == 0 {
            tee.sync().unwrap();
        }
    }
    tee.sync().unwrap();
    let m = metrics.snapshot();
    assert!(m.spool_full > 0 && m.spool_dropped > 0, "{m:?}");
    // The shipper catches up; recording goes on, then a clean stop.
    let mut events = Vec::new();
    ship(dir.path(), &mut events);
    for i in 0..5u32 {
        tee.record_frame("net0", 0, pb::Direction::Rx, &[i as u8; 500]);
    }
    tee.shutdown();
    ship(dir.path(), &mut events);
    let gaps = assert_no_silent_gap(&events);
    assert!(gaps >= 1);
    assert!(events.iter().any(|e| matches!(&e.payload,
        Some(pb::event::Payload::Lifecycle(l)) if l.gap.as_ref().is_some_and(|g| g.reason == "spool full"))));
    let frames = events
        .iter()
        .filter(|e| matches!(e.payload, Some(pb::event::Payload::Net(_))))
        .count() as u64;
    assert_eq!(frames + metrics.snapshot().spool_dropped, 105);
}

#[test]
fn a_full_spool_with_policy_block_makes_the_device_wait_for_the_shipper() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(SpoolSink::open(spool_config(dir.path())).unwrap());
    let metrics = Arc::new(Metrics::default());
    let mut cfg = TeeConfig::new("vm-int");
    cfg.capacity = 4;
    let tee = Tee::start(cfg, sink, Arc::new(AtomicSeq::default()), metrics.clone()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let device = {
        let (tee, done) = (tee.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..100u32 {
                tee.record_frame("net0", 0, pb::Direction::Rx, &[i as u8; 500]);
            }
            done.store(true, Ordering::Release);
        })
    };
    // Nobody ships yet: the spool fills up (100 records are more than the
    // spool, the queue and a batch hold) and the device has to wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metrics.snapshot().spool_full == 0 {
        assert!(Instant::now() < deadline, "the spool never filled up");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !done.load(Ordering::Acquire),
        "the device waits while the spool is full"
    );
    // The device is done once its last record is queued, not written: the
    // shipper goes on until it has shipped every record, so the sink never
    // waits on a full spool at shutdown.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done.load(Ordering::Acquire) || events.len() < 100 {
        assert!(
            Instant::now() < deadline,
            "the device never got going again (done: {}, shipped: {})",
            done.load(Ordering::Acquire),
            events.len()
        );
        ship(dir.path(), &mut events);
        std::thread::sleep(Duration::from_millis(5));
    }
    device.join().unwrap();
    tee.shutdown();
    ship(dir.path(), &mut events);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    let m = metrics.snapshot();
    assert!(
        m.spool_blocked_ms > 0 && m.spool_dropped == 0 && m.gaps == 0,
        "{m:?}"
    );
}

/// A shutdown that comes while the sink is already waiting for room in a
/// full spool (policy block, no block bound, no shipper) still ends within
/// its bound, and the record that did not fit is covered by a GAP event.
#[test]
fn a_shutdown_while_the_sink_waits_on_a_full_spool_ends_with_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(SpoolSink::open(spool_config(dir.path())).unwrap());
    // Fill the spool up to the last record it takes.
    let mut next = 1u64;
    loop {
        let rec = Record::new(pb::Event {
            instance_id: "vm-int".into(),
            seq: next,
            epoch: 1,
            payload: Some(pb::event::Payload::Net(pb::NetFrame {
                device: "net0".into(),
                frame: vec![next as u8; 500],
                ..Default::default()
            })),
            ..Default::default()
        });
        match sink.submit(&[rec]) {
            Ok(()) => next += 1,
            Err(SinkError {
                error: CaptureError::Full,
                written: 0,
            }) => break,
            Err(e) => panic!("{:?}", e.error),
        }
        assert!(next < 1000, "a 16 KiB spool fills up");
    }
    let metrics = Arc::new(Metrics::default());
    let tee = Tee::start(
        TeeConfig::new("vm-int"),
        sink,
        Arc::new(AtomicSeq::with_epoch(next, 1)),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(
        tee.record_frame("net0", 0, pb::Direction::Rx, &[0; 500]),
        Some(next)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while metrics.snapshot().spool_full == 0 {
        assert!(
            Instant::now() < deadline,
            "the sink never found the spool full"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The sink now waits for room inside its batch; nobody ships.
    let (tx, rx) = std::sync::mpsc::channel();
    let stopper = {
        let tee = tee.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            tee.shutdown();
            let _ = tx.send(t.elapsed());
        })
    };
    let took = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("shutdown waits for a full spool without a bound");
    stopper.join().unwrap();
    assert!(
        took >= Duration::from_secs(5),
        "it waited for room: {took:?}"
    );
    let mut events = Vec::new();
    ship(dir.path(), &mut events);
    assert_eq!(assert_no_silent_gap(&events), 1, "one GAP event");
    let gap = events
        .iter()
        .find_map(|e| match &e.payload {
            Some(pb::event::Payload::Lifecycle(l)) => l.gap.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!((gap.first_seq, gap.count), (next, 1), "{gap:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..next).chain([next + 1]).collect::<Vec<_>>());
    let m = metrics.snapshot();
    assert!(m.spool_dropped == 1 && m.gaps == 1, "{m:?}");
}

fn spawn_blk(
    dir: &Path,
    image: &Path,
    spool: &Path,
    seq: &Path,
) -> vmr_testkit::process::ChildGuard {
    let sock = dir.join("blk.sock");
    let ctl = dir.join("blk.ctl");
    let _ = std::fs::remove_file(&ctl);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-tap-blk"));
    cmd.args(["--socket", sock.to_str().unwrap()])
        .args(["--image", image.to_str().unwrap()])
        .args(["--instance-id", "vm-kill"])
        .args(["--capture", spool.to_str().unwrap()])
        .args(["--capture-retain-mib", "2", "--capture-segment-mib", "1"])
        .args([
            "--capture-recycle",
            "committed",
            "--capture-policy",
            "block",
        ])
        .args(["--seq-file", seq.to_str().unwrap()])
        .args(["--control", ctl.to_str().unwrap()]);
    let child = vmr_testkit::process::ChildGuard::spawn("vhost-tap-blk", &mut cmd).unwrap();
    assert!(
        TestFrontend::wait_for(10, || sock.exists() && ctl.exists()),
        "vhost-tap-blk did not start"
    );
    child
}

fn metrics_of(dir: &Path) -> serde_json::Value {
    let mut c = vhost_tap::control::ControlClient::connect(&dir.join("blk.ctl")).unwrap();
    c.request(&serde_json::json!({"cmd":"metrics"})).unwrap()["metrics"].clone()
}

#[test]
fn a_killed_backend_restarts_past_its_numbers_with_a_gap_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let spool_dir = dir.path().join("spool");
    let seq = dir.path().join("vm.seq");
    let mut child = spawn_blk(dir.path(), &image, &spool_dir, &seq);
    // 48 writes of 64 KiB: the 2 MiB spool takes about 30, the rest wait
    // numbered in the capture queue (policy block, nothing shipped yet).
    let mut ram = GuestRam::new(32 << 20).unwrap();
    let mut q = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut fe = TestFrontend::connect(&dir.path().join("blk.sock"), 1).unwrap();
    fe.setup(&ram, &[&q], 0).unwrap();
    for i in 0..48u64 {
        post(&mut ram, &mut q, VIRTIO_BLK_T_OUT, i * 128, 64 << 10);
    }
    fe.kick(0).unwrap();
    assert!(TestFrontend::wait_for(10, || q.used_idx(&ram) == 48));
    assert!(
        TestFrontend::wait_for(10, || metrics_of(dir.path())["spool_full"].as_u64()
            > Some(0)),
        "the spool fills up"
    );
    let m = metrics_of(dir.path());
    assert_eq!(m["recorded"], 48);
    // SIGKILL: no shutdown, queued records are lost.
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) };
    assert!(TestFrontend::wait_for(5, || child.try_wait().is_some()));
    drop(fe);
    let taken = FileSeq::open(&seq).unwrap().peek();
    assert!(taken > 48, "48 writes numbered, next {taken}");
    let segments = spool::list_segments(&spool_dir).unwrap();
    let old: Vec<(String, Vec<u8>)> = segments
        .iter()
        .map(|n| (n.clone(), std::fs::read(spool_dir.join(n)).unwrap()))
        .collect();

    // Restart: a new epoch, a new segment, the old ones untouched.
    let mut child = spawn_blk(dir.path(), &image, &spool_dir, &seq);
    let mut ram = GuestRam::new(32 << 20).unwrap();
    let mut q = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut fe = TestFrontend::connect(&dir.path().join("blk.sock"), 1).unwrap();
    fe.setup(&ram, &[&q], 0).unwrap();
    post(&mut ram, &mut q, VIRTIO_BLK_T_OUT, 4096, 4096);
    fe.kick(0).unwrap();
    assert!(TestFrontend::wait_for(10, || q.used_idx(&ram) == 1));
    assert!(TestFrontend::wait_for(10, || spool::list_segments(
        &spool_dir
    )
    .unwrap()
    .len()
        > old.len()));
    for (name, bytes) in &old {
        assert_eq!(
            &std::fs::read(spool_dir.join(name)).unwrap(),
            bytes,
            "{name} was rewritten"
        );
    }
    // Ship: the full spool lets the new write through once committed.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.iter().any(|e: &pb::Event| {
        matches!(&e.payload, Some(pb::event::Payload::Block(b)) if b.sector == 4096)
    }) {
        assert!(Instant::now() < deadline, "the restarted backend's write never arrived");
        ship(&spool_dir, &mut events);
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(fe);
    child.stop(Duration::from_secs(5));
    ship(&spool_dir, &mut events);

    let epochs: std::collections::BTreeSet<u64> = events.iter().map(|e| e.epoch).collect();
    assert_eq!(epochs.len(), 2, "two incarnations: {epochs:?}");
    let first_epoch = *epochs.iter().next().unwrap();
    let before: Vec<u64> = events
        .iter()
        .filter(|e| e.epoch == first_epoch)
        .map(|e| e.seq)
        .collect();
    assert!(before.len() < 48, "some records were lost with the process");
    // The restart's GAP covers every number the killed process took and
    // did not record.
    let gap = events
        .iter()
        .find_map(|e| match &e.payload {
            Some(pb::event::Payload::Lifecycle(l)) if e.epoch != first_epoch => l.gap.clone(),
            _ => None,
        })
        .expect("a GAP event after the restart");
    assert!(gap.reason.contains("unclean"), "{gap:?}");
    for n in 1..taken {
        assert!(
            before.contains(&n) || (gap.first_seq..gap.first_seq + gap.count).contains(&n),
            "number {n} is neither recorded nor in the GAP {gap:?}"
        );
    }
    // No number reused: every number after the restart lies past what the
    // killed process had taken.
    for e in events.iter().filter(|e| e.epoch != first_epoch) {
        assert!(e.seq >= taken, "seq {} reused (next was {taken})", e.seq);
    }
    let mut all: Vec<u64> = events.iter().map(|e| e.seq).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), events.len(), "no seq twice");
}
