//! A filesystem that fills up under a running spool: a loop-mounted ext4
//! image in a test-owned temporary directory (unmounted and deleted at the
//! end), filled to the last block by a filler file while the tee records
//! and a shipper reads, commits and so lets the spool recycle segments.
//!
//! - Records inside the space the spool reserved at start (segments,
//!   their slack, the seq lease, the restart record, the position file)
//!   are all written: no record lost, no GAP, no error.
//! - A record too large for the reserved space hits ENOSPC: with policy
//!   `drop` it becomes a GAP event naming the lack of space, with policy
//!   `block` the device waits until space is freed; both are counted in
//!   `spool_no_space`.
//!
//! Needs root (mount), `mkfs.ext4` and a free loop device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_tap::capture::{
    spool, Policy, Recycle, SpoolConfig, SpoolItem, SpoolReader, SpoolSink, Tee, TeeConfig,
};
use vhost_tap::metrics::Metrics;
use vhost_tap::seq::{FileSeq, SeqSource};
use vmr_proto::pb;

/// A small ext4 filesystem mounted on a directory of a temporary
/// directory; unmounted (and its image deleted) when dropped.
struct Ext4 {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Ext4 {
    fn mount(mib: u64) -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").expect("a temporary directory");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .expect("create the filesystem image");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img)
            .output()
            .expect("prerequisite missing: mkfs.ext4 (e2fsprogs)");
        assert!(
            out.status.success(),
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("prerequisite missing: mount");
        assert!(
            out.status.success(),
            "prerequisite missing: mounting a loop device needs root and a free loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { _dir: dir, mnt }
    }

    fn avail(&self) -> u64 {
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of this plain C
        // struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs writes into the struct we pass; the path is a
        // valid C string.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Writes a file until the filesystem has no space left; returns its size.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut total = 0u64;
    for chunk in [1 << 20, 4096, 512, 1] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the filesystem: {e}"),
            }
        }
    }
    // Delayed allocation: the space is claimed by the time the data is.
    let _ = f.sync_all();
    total
}

struct Rig {
    tee: Tee,
    metrics: Arc<Metrics>,
    spool: PathBuf,
}

fn rig(mnt: &Path, segment: u64, capacity: u64, policy: Policy, bound: Option<Duration>) -> Rig {
    let spool = mnt.join("spool");
    let sink = Arc::new(
        SpoolSink::open(SpoolConfig {
            dir: spool.clone(),
            segment_bytes: segment,
            capacity_bytes: capacity,
            recycle: Recycle::Committed,
            instance_id: "vm-full".into(),
            epoch: 1,
        })
        .expect("open the spool"),
    );
    let seq: Arc<dyn SeqSource> =
        Arc::new(FileSeq::open_with_lease(&mnt.join("seq"), 64).expect("open the seq lease"));
    let metrics = Arc::new(Metrics::default());
    let mut cfg = TeeConfig::new("vm-full");
    cfg.policy = policy;
    cfg.block_bound = bound;
    cfg.state = Some(mnt.join("vda.state"));
    cfg.sync_timeout = Duration::from_secs(30);
    let tee = Tee::start(cfg, sink, seq, metrics.clone()).expect("start the tee");
    Rig {
        tee,
        metrics,
        spool,
    }
}

/// A shipper: reads the spool as it is written and commits every 64
/// events (and whenever it caught up), so the spool recycles segments.
struct Shipper {
    events: Arc<Mutex<Vec<pb::Event>>>,
    commit_errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shipper {
    fn start(dir: &Path) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let commit_errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (dir, events, errs, stop) = (
                dir.to_owned(),
                events.clone(),
                commit_errors.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut r = SpoolReader::open(&dir).unwrap();
                let mut last = None;
                let mut since = 0;
                loop {
                    let item = r.next_item().expect("read the spool");
                    match item {
                        Some(SpoolItem::Event { event, position }) => {
                            events.lock().unwrap().push(event);
                            last = Some(position);
                            since += 1;
                            if since < 64 {
                                continue;
                            }
                        }
                        Some(SpoolItem::Skipped { reason, .. }) => {
                            panic!("the spool has damaged bytes: {reason}")
                        }
                        None => {
                            if stop.load(Ordering::Acquire) && since == 0 {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                    if let Some(p) = last.take() {
                        if let Err(e) = spool::commit(&dir, &p) {
                            errs.lock()
                                .unwrap()
                                .push(format!("{e}: {:?}", std::error::Error::source(&e)));
                        }
                        since = 0;
                    }
                }
            })
        };
        Self {
            events,
            commit_errors,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<pb::Event> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("the shipper");
        let errs = self.commit_errors.lock().unwrap().clone();
        assert!(errs.is_empty(), "commits failed: {errs:?}");
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// Waits (bounded) until the shipper has read `n` events.
    fn wait_for(&self, n: usize, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        while self.events.lock().unwrap().len() < n {
            if Instant::now() >= end {
                let ev = self.events.lock().unwrap();
                let seqs: Vec<(u64, bool)> = ev
                    .iter()
                    .map(|e| {
                        (
                            e.seq,
                            matches!(e.payload, Some(pb::event::Payload::Block(_))),
                        )
                    })
                    .collect();
                panic!(
                    "the shipper read {} of {n} events in {secs} s: {seqs:?}",
                    ev.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn write(t: &Tee, i: u64, len: usize) -> Option<u64> {
    let data = vec![(i % 251) as u8; len];
    t.record_block(
        "vda",
        0,
        pb::BlockOp::Write,
        i * 8,
        len as u32,
        Some(&data),
        None,
        pb::BlockStatus::Ok,
    )
}

fn gaps(events: &[pb::Event]) -> Vec<&pb::Lifecycle> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::event::Payload::Lifecycle(l)) if l.kind == pb::LifecycleKind::Gap as i32 => {
                Some(l)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_filesystem_filling_up_under_a_running_spool_loses_no_record() {
    let fs = Ext4::mount(64);
    // 2 MiB segments, 8 MiB retained: the spool reserves about 5 segment
    // files of 4 MiB (segment plus slack) at start.
    let r = rig(&fs.mnt, 2 << 20, 8 << 20, Policy::Block, None);
    let shipper = Shipper::start(&r.spool);
    let mut n = 0u64;
    for _ in 0..200 {
        n += 1;
        write(&r.tee, n, 4096).expect("recorded");
    }
    let filled = fill(&fs.mnt.join("filler"));
    assert!(fs.avail() < (1 << 20), "the filesystem is full");
    eprintln!(
        "filler took {} MiB; {} bytes left",
        filled >> 20,
        fs.avail()
    );
    // About 75 MiB of records through an 8 MiB spool: every segment is
    // recycled several times, with 4 KiB, 64 KiB and 1 MiB writes, FLUSH
    // barriers (fsync) and seq lease renewals on the full filesystem.
    for round in 0..20u64 {
        for k in 0..200u64 {
            n += 1;
            let len = match k % 100 {
                0 => 1 << 20,
                1..=8 => 64 << 10,
                _ => 4096,
            };
            write(&r.tee, n, len).expect("recorded");
        }
        if round % 8 == 7 {
            r.tee.sync().expect("a FLUSH on the full filesystem");
        }
    }
    r.tee.sync().expect("durable");
    shipper.wait_for(n as usize, 60);
    assert!(fs.avail() < (1 << 20), "the filesystem stayed full");
    r.tee.shutdown();
    let events = shipper.stop();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + n).collect::<Vec<_>>(),
        "every record arrived once, in order"
    );
    assert!(
        gaps(&events).is_empty(),
        "no GAP event: {:?}",
        gaps(&events)
    );
    let m = r.metrics.snapshot();
    assert_eq!(m.spool_no_space, 0, "{m:?}");
    assert_eq!(m.sink_errors, 0, "{m:?}");
    assert_eq!(m.recorded, n);
    // The payloads are the records' bytes.
    for e in &events {
        let Some(pb::event::Payload::Block(b)) = &e.payload else {
            panic!("unexpected {e:?}")
        };
        let i = b.sector / 8;
        assert!(b.data.iter().all(|&x| x == (i % 251) as u8));
    }
}

#[test]
fn a_record_past_the_reserved_space_on_a_full_filesystem_gets_the_policy() {
    let fs = Ext4::mount(48);
    // 1 MiB segments reserve 2 MiB each: a 3 MiB record does not fit.
    let r = rig(&fs.mnt, 1 << 20, 4 << 20, Policy::Drop, None);
    let shipper = Shipper::start(&r.spool);
    for i in 1..=20 {
        write(&r.tee, i, 4096).expect("recorded");
    }
    r.tee.sync().unwrap();
    fill(&fs.mnt.join("filler"));
    // Policy drop: the large record becomes a GAP naming the lack of space.
    let big = write(&r.tee, 21, 3 << 20).expect("queued");
    for i in 22..=60 {
        write(&r.tee, i, 4096).expect("recorded");
    }
    r.tee.sync().unwrap();
    shipper.wait_for(60, 30);
    r.tee.shutdown();
    let events = shipper.stop();
    let m = r.metrics.snapshot();
    assert!(m.spool_no_space >= 1, "{m:?}");
    assert_eq!(m.spool_dropped, 1, "{m:?}");
    let g = gaps(&events);
    assert_eq!(g.len(), 1, "{g:?}");
    let gap = g[0].gap.as_ref().unwrap();
    assert_eq!((gap.first_seq, gap.count), (big, 1));
    assert!(gap.reason.contains("no space left"), "{}", gap.reason);
    let recorded: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e.payload, Some(pb::event::Payload::Block(_))))
        .map(|e| e.seq)
        .collect();
    assert_eq!(recorded.len(), 59);
    assert!(!recorded.contains(&big));
    std::fs::remove_file(fs.mnt.join("filler")).unwrap();
    std::fs::remove_dir_all(fs.mnt.join("spool")).unwrap();
    for f in ["seq", "vda.state"] {
        std::fs::remove_file(fs.mnt.join(f)).unwrap();
    }

    // Policy block: the device waits while there is no space, and the
    // record is written once space is freed.
    let r = rig(&fs.mnt, 1 << 20, 4 << 20, Policy::Block, None);
    let shipper = Shipper::start(&r.spool);
    write(&r.tee, 1, 4096).unwrap();
    r.tee.sync().unwrap();
    fill(&fs.mnt.join("filler"));
    let big = write(&r.tee, 2, 3 << 20).unwrap();
    let synced = {
        let t = r.tee.clone();
        std::thread::spawn(move || t.sync())
    };
    let end = Instant::now() + Duration::from_secs(10);
    while r.metrics.snapshot().spool_no_space == 0 {
        assert!(Instant::now() < end, "no ENOSPC seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !synced.is_finished(),
        "the FLUSH waits while there is no space"
    );
    std::fs::remove_file(fs.mnt.join("filler")).unwrap();
    synced
        .join()
        .unwrap()
        .expect("durable once space was freed");
    shipper.wait_for(2, 30);
    r.tee.shutdown();
    let events = shipper.stop();
    assert!(gaps(&events).is_empty(), "{:?}", gaps(&events));
    assert!(events.iter().any(|e| e.seq == big
        && matches!(&e.payload, Some(pb::event::Payload::Block(b)) if b.data.len() == 3 << 20)));
    let m = r.metrics.snapshot();
    assert!(m.spool_no_space >= 1 && m.spool_dropped == 0, "{m:?}");
}
