//! The large-write path under failure: the real backend over a unix
//! socket with the test front-end, a raw image and an in-memory capture.
//! The fault points of `hooks.rs` fail a copy from guest memory, hold the
//! image writer or kill its thread; everything that handles those failures
//! is the product's code.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vmr_proto::pb;

use super::{BlockBackend, BlockConfig, Disk};
use crate::capture::{MemorySink, Tee, TeeConfig};
use crate::metrics::Metrics;
use crate::seq::AtomicSeq;
use crate::server::Server;
use crate::testing::{BlkRequestBuilder as Rb, DriverQueue, GuestRam, TestFrontend};

/// Large enough for the image writer.
const LEN: u32 = 128 << 10;
const DISK: usize = 8 << 20;
/// Seconds any wait of these tests lasts at most.
const WAIT: u64 = 20;

fn sector_of(i: u64) -> u64 {
    i * u64::from(LEN) / 512
}

struct Rig {
    _dir: tempfile::TempDir,
    image: PathBuf,
    ram: GuestRam,
    q: DriverQueue,
    fe: Option<TestFrontend>,
    server: Option<Server>,
    tee: Tee,
    sink: Arc<MemorySink>,
    backend: BlockBackend,
    metrics: Arc<Metrics>,
    /// Status address and payload byte of each write posted.
    posted: Vec<(u64, u8)>,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; DISK]).unwrap();
        let disk = Disk::open(&image, None, false).unwrap();
        let metrics = Arc::new(Metrics::default());
        let sink = Arc::new(MemorySink::new());
        let tee = Tee::start(
            TeeConfig::new("vm-writer"),
            sink.clone(),
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
        let sock = dir.path().join("blk.sock");
        let server = Server::spawn("blk", backend.clone(), &sock, false).unwrap();
        let ram = GuestRam::new(32 << 20).unwrap();
        let q = DriverQueue::new(&ram, 0x1_0000, 256);
        let mut fe = TestFrontend::connect(&sock, 1).unwrap();
        fe.setup(&ram, &[&q], 0).unwrap();
        Self {
            _dir: dir,
            image,
            ram,
            q,
            fe: Some(fe),
            server: Some(server),
            tee,
            sink,
            backend,
            metrics,
            posted: Vec::new(),
        }
    }

    /// Posts (without a kick) a write of `LEN` bytes of `byte` at `sector`.
    fn post_write(&mut self, sector: u64, byte: u8) {
        let (hdr, st) = Rb::header(&mut self.ram, VIRTIO_BLK_T_OUT, sector).unwrap();
        let buf = self.ram.alloc(u64::from(LEN)).unwrap();
        self.ram.write(buf, &vec![byte; LEN as usize]);
        let h = self.q.add_chain(
            &self.ram,
            &[(hdr, 16, false), (buf, LEN, false), (st, 1, true)],
        );
        self.q.publish(&self.ram, h);
        self.posted.push((st, byte));
    }

    fn kick(&self) {
        self.fe.as_ref().unwrap().kick(0).unwrap();
    }

    fn deferred(&self) -> u64 {
        self.backend.hooks().deferred.load(Ordering::Acquire)
    }

    /// Waits until the guest got `n` requests back; false on timeout.
    fn wait_used(&self, n: u16) -> bool {
        TestFrontend::wait_for(WAIT, || self.q.used_idx(&self.ram) == n)
    }

    /// The guest's status byte of each write posted.
    fn statuses(&self) -> Vec<u8> {
        self.posted
            .iter()
            .map(|(st, _)| Rb::status(&self.ram, *st))
            .collect()
    }

    /// Stops the backend and the tee; returns every record, in `seq` order.
    fn finish(&mut self) -> Vec<pb::Event> {
        drop(self.fe.take());
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
        self.tee.shutdown();
        let mut events = self.sink.take();
        events.sort_by_key(|e| e.seq);
        events
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Never leave a writer held (a failed assertion unwinds through here).
        self.backend.hooks().hold.store(false, Ordering::Release);
        drop(self.fe.take());
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        self.tee.shutdown();
    }
}

/// The block records as (sector, status, payload length), in `seq` order,
/// after checking that the numbers have no hole.
fn block_records(events: &[pb::Event]) -> Vec<(u64, pb::BlockStatus, usize)> {
    for w in events.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "a hole in the numbers: {events:?}");
    }
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::event::Payload::Block(b)) => Some((
                b.sector,
                pb::BlockStatus::try_from(b.status).unwrap(),
                b.data.len(),
            )),
            _ => None,
        })
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn a_write_whose_copy_fails_is_recorded_in_request_order() {
    let mut rig = Rig::new();
    let hooks = rig.backend.hooks();
    // The writer holds every write until all are handed over, so the
    // earlier writes are still queued when the copy of the fourth fails.
    hooks.hold.store(true, Ordering::Release);
    *hooks.fail_copy_at.lock().unwrap() = Some(sector_of(3));
    // The fifth is past any disk (its byte offset overflows).
    let sectors = [
        sector_of(0),
        sector_of(1),
        sector_of(2),
        sector_of(3),
        u64::MAX,
        sector_of(5),
    ];
    for (i, s) in sectors.iter().enumerate() {
        rig.post_write(*s, i as u8 + 1);
    }
    rig.kick();
    assert!(
        TestFrontend::wait_for(WAIT, || rig.deferred() == sectors.len() as u64),
        "only {} of {} writes reached the writer path",
        rig.deferred(),
        sectors.len()
    );
    rig.backend.hooks().hold.store(false, Ordering::Release);
    assert!(rig.wait_used(sectors.len() as u16), "the guest still waits");
    assert_eq!(rig.statuses(), [OK, OK, OK, IOERR, IOERR, OK]);
    let events = rig.finish();
    let recs: Vec<(u64, pb::BlockStatus)> = block_records(&events)
        .into_iter()
        .map(|(s, st, _)| (s, st))
        .collect();
    use pb::BlockStatus::{Ioerr, Ok as Good};
    assert_eq!(
        recs,
        [
            (sector_of(0), Good),
            (sector_of(1), Good),
            (sector_of(2), Good),
            (sector_of(3), Ioerr),
            (u64::MAX, Ioerr),
            (sector_of(5), Good),
        ],
        "the records are not in request order"
    );
    // The failed copy left the disk alone.
    let disk = std::fs::read(&rig.image).unwrap();
    let at = |i: u64| sector_of(i) as usize * 512;
    assert!(disk[at(3)..at(4)].iter().all(|&b| b == 0));
    assert!(disk[at(5)..at(6)].iter().all(|&b| b == 6));
    assert_eq!(rig.metrics.snapshot().io_errors, 2);
    assert_eq!(rig.metrics.snapshot().writer_failures, 0);
}

#[test]
fn writes_held_by_a_dead_writer_fail_and_are_recorded_and_later_writes_go_on() {
    let mut rig = Rig::new();
    let hooks = rig.backend.hooks();
    hooks.hold.store(true, Ordering::Release);
    // The writer dies on the second write, holding the third and fourth.
    *hooks.panic_at.lock().unwrap() = Some(sector_of(1));
    for i in 0..4 {
        rig.post_write(sector_of(i), i as u8 + 1);
    }
    rig.kick();
    assert!(
        TestFrontend::wait_for(WAIT, || rig.deferred() == 4),
        "only {} of 4 writes reached the writer",
        rig.deferred()
    );
    rig.backend.hooks().hold.store(false, Ordering::Release);
    assert!(rig.wait_used(4), "the guest waits for a dead writer");
    assert_eq!(rig.statuses(), [OK, IOERR, IOERR, IOERR]);
    let m = rig.metrics.snapshot();
    assert_eq!((m.writer_failures, m.io_errors), (1, 3));

    // A later large write is written by the device thread (not handed to
    // a writer) and succeeds.
    rig.post_write(sector_of(4), 5);
    rig.kick();
    assert!(
        rig.wait_used(5),
        "the write after the failure never completed"
    );
    assert_eq!(rig.statuses()[4], OK);
    assert_eq!(rig.deferred(), 4);
    assert_eq!(rig.metrics.snapshot().writer_failures, 1);

    let events = rig.finish();
    use pb::BlockStatus::{Ioerr, Ok as Good};
    assert_eq!(
        block_records(&events),
        [
            (sector_of(0), Good, LEN as usize),
            (sector_of(1), Ioerr, 0),
            (sector_of(2), Ioerr, 0),
            (sector_of(3), Ioerr, 0),
            (sector_of(4), Good, LEN as usize),
        ],
        "every request is recorded, in request order"
    );
    let disk = std::fs::read(&rig.image).unwrap();
    let at = |i: u64| sector_of(i) as usize * 512;
    assert!(disk[at(0)..at(1)].iter().all(|&b| b == 1));
    assert!(disk[at(1)..at(4)].iter().all(|&b| b == 0));
    assert!(disk[at(4)..at(5)].iter().all(|&b| b == 5));
}

#[test]
fn a_writer_found_dead_at_hand_over_completes_what_it_held() {
    let mut rig = Rig::new();
    let hooks = rig.backend.hooks();
    // The writer holds the first two writes until the device thread is
    // about to hand over the third; then it writes the first, dies on the
    // second and has ended before the third is handed over. The status of
    // the first is still unread then.
    hooks.hold.store(true, Ordering::Release);
    *hooks.panic_at.lock().unwrap() = Some(sector_of(1));
    *hooks.submit_after_exit_at.lock().unwrap() = Some(sector_of(2));
    for i in 0..4 {
        rig.post_write(sector_of(i), i as u8 + 1);
    }
    rig.kick();
    assert!(
        rig.wait_used(4),
        "the guest waits for a write the dead writer held (statuses {:?})",
        rig.statuses()
    );
    assert_eq!(rig.statuses(), [OK, IOERR, OK, OK]);
    let m = rig.metrics.snapshot();
    assert_eq!((m.writer_failures, m.io_errors), (1, 1));
    // The third went to the writer path and found it dead; the fourth was
    // written by the device thread without it.
    assert_eq!(rig.deferred(), 3);
    let events = rig.finish();
    use pb::BlockStatus::{Ioerr, Ok as Good};
    assert_eq!(
        block_records(&events),
        [
            (sector_of(0), Good, LEN as usize),
            (sector_of(1), Ioerr, 0),
            (sector_of(2), Good, LEN as usize),
            (sector_of(3), Good, LEN as usize),
        ],
        "every request is recorded once, in request order"
    );
    let disk = std::fs::read(&rig.image).unwrap();
    let at = |i: u64| sector_of(i) as usize * 512;
    assert!(disk[at(0)..at(1)].iter().all(|&b| b == 1));
    assert!(disk[at(1)..at(2)].iter().all(|&b| b == 0));
    assert!(disk[at(2)..at(3)].iter().all(|&b| b == 3));
    assert!(disk[at(3)..at(4)].iter().all(|&b| b == 4));
}
