//! The capture tee: device threads turn requests into [`pb::Event`] records
//! and push them into a bounded lock-free queue; one sink thread drains the
//! queue in batches into a [`CaptureSink`].
//!
//! Records and their payload buffers are recycled through a pool, so a busy
//! backend reaches a steady state without allocating per request.
//!
//! When the queue is full, [`Policy::Block`] makes the device thread wait (the
//! guest sees latency, nothing is lost) and [`Policy::Drop`] drops the record,
//! counts it, and the sink thread later writes a `GAP` lifecycle event naming
//! the missing sequence numbers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use vmr_proto::pb;

use crate::metrics::Metrics;
use crate::seq::SeqSource;

/// Errors of sinks and of the tee.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open capture file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sink write failed")]
    Io(#[from] std::io::Error),
    #[error("sink refused the batch: {0}")]
    Refused(String),
    #[error("cannot start the sink thread")]
    Spawn(#[source] std::io::Error),
    #[error("capture queue capacity must be positive")]
    ZeroCapacity,
}

/// Where records go. One sink thread calls it; implementations that are
/// shared between several tees must synchronise internally.
pub trait CaptureSink: Send + Sync {
    /// Accepts a batch of records, in queue order.
    fn submit(&self, batch: &[pb::Event]) -> Result<(), CaptureError>;
    /// Makes accepted records durable (called when the queue runs empty and
    /// at shutdown).
    fn flush(&self) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// Writes records as length-prefixed frames ([`vmr_proto::framing`]).
pub struct FileSink {
    inner: Mutex<(BufWriter<File>, Vec<u8>)>,
}

impl FileSink {
    /// Creates (truncating) the capture file at `path`.
    pub fn create(path: &Path) -> Result<Self, CaptureError> {
        let file = File::create(path).map_err(|source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            inner: Mutex::new((BufWriter::with_capacity(1 << 20, file), Vec::new())),
        })
    }
}

impl CaptureSink for FileSink {
    fn submit(&self, batch: &[pb::Event]) -> Result<(), CaptureError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (w, buf) = &mut *guard;
        for ev in batch {
            vmr_proto::framing::write_event(w, ev, buf)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), CaptureError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.flush()?;
        Ok(())
    }
}

/// Keeps records in memory (for in-process replay comparison and tests).
#[derive(Default)]
pub struct MemorySink {
    events: Mutex<Vec<pb::Event>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }
    /// Takes the records accepted so far.
    pub fn take(&self) -> Vec<pb::Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// Number of records held.
    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CaptureSink for MemorySink {
    fn submit(&self, batch: &[pb::Event]) -> Result<(), CaptureError> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(batch);
        Ok(())
    }
}

/// What to do when the sink falls behind and the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The device thread waits for room (the guest waits).
    Block,
    /// The record is dropped and a GAP event is written later.
    Drop,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(Self::Block),
            "drop" => Ok(Self::Drop),
            other => Err(format!("unknown capture policy {other:?} (block|drop)")),
        }
    }
}

/// Hash used for the content of reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentHashKind {
    /// xxh3-128 (fast, default).
    #[default]
    Xxh3_128,
    /// SHA-256.
    Sha256,
}

/// Settings of a [`Tee`].
#[derive(Debug, Clone)]
pub struct TeeConfig {
    /// Instance id written into every record.
    pub instance_id: String,
    /// Queue capacity in records.
    pub capacity: usize,
    /// Queue capacity in payload bytes (write data and frames held by queued
    /// records). The queue counts as full when a record would take it past
    /// this budget; a single record larger than the budget is still accepted
    /// into an empty queue. The bound is approximate by at most one record
    /// per device thread.
    pub max_bytes: usize,
    /// Behaviour when the queue is full.
    pub policy: Policy,
    /// Hash of read contents.
    pub hash: ContentHashKind,
}

impl TeeConfig {
    /// Defaults: 4096 records, 64 MiB of payload, policy block, xxh3-128.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            capacity: 4096,
            max_bytes: DEFAULT_MAX_BYTES,
            policy: Policy::Block,
            hash: ContentHashKind::Xxh3_128,
        }
    }
}

/// Default payload budget of the capture queue.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// Pooled records keep payload buffers up to this capacity; larger ones are
/// freed when the record returns to the pool, so the pool's memory stays
/// bounded after a burst of large writes.
const POOL_KEEP_BYTES: usize = 1 << 20;

/// Payload bytes a record holds.
fn payload_bytes(ev: &pb::Event) -> usize {
    match &ev.payload {
        Some(pb::event::Payload::Block(b)) => b.data.len(),
        Some(pb::event::Payload::Net(f)) => f.frame.len(),
        _ => 0,
    }
}

/// Returns `ev` to the pool, freeing an oversized payload buffer.
fn recycle(pool: &ArrayQueue<pb::Event>, mut ev: pb::Event) {
    let big = match &ev.payload {
        Some(pb::event::Payload::Block(b)) => b.data.capacity() > POOL_KEEP_BYTES,
        Some(pb::event::Payload::Net(f)) => f.frame.capacity() > POOL_KEEP_BYTES,
        _ => false,
    };
    if big {
        ev.payload = None;
    }
    let _ = pool.push(ev);
}

struct TeeShared {
    config: TeeConfig,
    queued_bytes: std::sync::atomic::AtomicUsize,
    queue: ArrayQueue<pb::Event>,
    pool: ArrayQueue<pb::Event>,
    seq: Arc<dyn SeqSource>,
    metrics: Arc<Metrics>,
    gaps: Mutex<Vec<(u64, u64)>>,
    stop: AtomicBool,
}

/// The producer side of the capture pipeline, shared by a backend's device
/// threads. Dropping the last [`Tee`] handle does not stop the sink thread;
/// call [`Tee::shutdown`] to drain and join it.
#[derive(Clone)]
pub struct Tee {
    shared: Arc<TeeShared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Sink batch size.
const BATCH: usize = 256;

impl Tee {
    /// Starts the sink thread.
    pub fn start(
        config: TeeConfig,
        sink: Arc<dyn CaptureSink>,
        seq: Arc<dyn SeqSource>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CaptureError> {
        if config.capacity == 0 {
            return Err(CaptureError::ZeroCapacity);
        }
        let shared = Arc::new(TeeShared {
            queue: ArrayQueue::new(config.capacity),
            pool: ArrayQueue::new(config.capacity + BATCH),
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            config,
            seq,
            metrics,
            gaps: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("capture-sink".into())
            .spawn(move || sink_loop(&s, &*sink))
            .map_err(CaptureError::Spawn)?;
        Ok(Self {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Drains the queue into the sink, flushes it and joins the sink thread.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("capture sink thread panicked");
            }
        }
    }

    /// The instance id this tee stamps on records.
    pub fn instance_id(&self) -> &str {
        &self.shared.config.instance_id
    }

    /// Records one block request. `data` is the payload of writes; `read` is
    /// the data a read returned (hashed, not stored).
    #[allow(clippy::too_many_arguments)]
    pub fn record_block(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        data: Option<&[u8]>,
        read: Option<&[u8]>,
        status: pb::BlockStatus,
    ) {
        let mut ev = self.take_event();
        let mut io = match ev.payload.take() {
            Some(pb::event::Payload::Block(b)) => b,
            _ => pb::BlockIo::default(),
        };
        io.device.clear();
        io.device.push_str(device);
        io.queue = u32::from(queue);
        io.op = op as i32;
        io.sector = sector;
        io.len = len;
        io.data.clear();
        if let Some(d) = data {
            io.data.extend_from_slice(d);
        }
        io.content_hash.clear();
        io.hash_algorithm = pb::HashAlgorithm::Unspecified as i32;
        if let Some(r) = read {
            self.hash_into(r, &mut io.content_hash);
            io.hash_algorithm = match self.shared.config.hash {
                ContentHashKind::Xxh3_128 => pb::HashAlgorithm::Xxh3128,
                ContentHashKind::Sha256 => pb::HashAlgorithm::Sha256,
            } as i32;
        }
        io.status = status as i32;
        ev.payload = Some(pb::event::Payload::Block(io));
        self.push(ev);
    }

    /// Records one frame (without the virtio-net header).
    pub fn record_frame(&self, device: &str, queue: u16, direction: pb::Direction, frame: &[u8]) {
        let mut ev = self.take_event();
        let mut f = match ev.payload.take() {
            Some(pb::event::Payload::Net(f)) => f,
            _ => pb::NetFrame::default(),
        };
        f.device.clear();
        f.device.push_str(device);
        f.queue = u32::from(queue);
        f.direction = direction as i32;
        f.frame.clear();
        f.frame.extend_from_slice(frame);
        ev.payload = Some(pb::event::Payload::Net(f));
        self.push(ev);
    }

    /// Records a lifecycle event (boot, shutdown, ...).
    pub fn record_lifecycle(&self, kind: pb::LifecycleKind, detail: &str) {
        let mut ev = self.take_event();
        ev.payload = Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
            kind: kind as i32,
            detail: detail.to_owned(),
            ..Default::default()
        }));
        self.push(ev);
    }

    /// Hashes `data` with the configured algorithm.
    pub fn hash_into(&self, data: &[u8], out: &mut Vec<u8>) {
        content_hash(self.shared.config.hash, data, out);
    }

    fn take_event(&self) -> pb::Event {
        let mut ev = self.shared.pool.pop().unwrap_or_default();
        if ev.instance_id != self.shared.config.instance_id {
            ev.instance_id.clear();
            ev.instance_id.push_str(&self.shared.config.instance_id);
        }
        ev
    }

    fn push(&self, mut ev: pb::Event) {
        let s = &*self.shared;
        ev.seq = s.seq.next();
        let (wall, mono) = crate::now_ns();
        ev.wall_time_ns = wall;
        ev.mono_time_ns = mono;
        let size = payload_bytes(&ev);
        // Whether `size` more bytes fit the budget (an empty queue takes any record).
        let fits = || {
            let queued = s.queued_bytes.load(Ordering::Acquire);
            queued == 0 || queued + size <= s.config.max_bytes
        };
        match s.config.policy {
            Policy::Block => {
                let mut ev = ev;
                let mut spins = 0u32;
                loop {
                    let pushed = if fits() {
                        s.queued_bytes.fetch_add(size, Ordering::AcqRel);
                        s.queue.push(ev).inspect_err(|_| {
                            s.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                        })
                    } else {
                        Err(ev)
                    };
                    match pushed {
                        Ok(()) => break,
                        Err(back) => {
                            ev = back;
                            spins += 1;
                            if spins < 64 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                        }
                    }
                }
                Metrics::add(&s.metrics.recorded, 1);
            }
            Policy::Drop => match if fits() {
                s.queued_bytes.fetch_add(size, Ordering::AcqRel);
                s.queue.push(ev).inspect_err(|_| {
                    s.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                })
            } else {
                Err(ev)
            } {
                Ok(()) => Metrics::add(&s.metrics.recorded, 1),
                Err(back) => {
                    Metrics::add(&s.metrics.dropped, 1);
                    let seq = back.seq;
                    recycle(&s.pool, back);
                    let mut gaps = s.gaps.lock().unwrap_or_else(|p| p.into_inner());
                    match gaps.last_mut() {
                        Some((first, count)) if *first + *count == seq => *count += 1,
                        _ => gaps.push((seq, 1)),
                    }
                }
            },
        }
    }
}

/// Hashes `data` with `kind` into `out` (replacing its contents).
pub fn content_hash(kind: ContentHashKind, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match kind {
        ContentHashKind::Xxh3_128 => {
            out.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_be_bytes())
        }
        ContentHashKind::Sha256 => {
            use sha2::Digest;
            out.extend_from_slice(&sha2::Sha256::digest(data));
        }
    }
}

fn sink_loop(s: &TeeShared, sink: &dyn CaptureSink) {
    let mut batch: Vec<pb::Event> = Vec::with_capacity(BATCH);
    let mut dirty = false;
    loop {
        let stopping = s.stop.load(Ordering::Acquire);
        while batch.len() < BATCH {
            match s.queue.pop() {
                Some(ev) => {
                    s.queued_bytes
                        .fetch_sub(payload_bytes(&ev), Ordering::AcqRel);
                    batch.push(ev);
                }
                None => break,
            }
        }
        let gaps = std::mem::take(&mut *s.gaps.lock().unwrap_or_else(|p| p.into_inner()));
        for (first_seq, count) in gaps {
            let (wall, mono) = crate::now_ns();
            Metrics::add(&s.metrics.gaps, 1);
            batch.push(pb::Event {
                instance_id: s.config.instance_id.clone(),
                seq: s.seq.next(),
                wall_time_ns: wall,
                mono_time_ns: mono,
                payload: Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
                    kind: pb::LifecycleKind::Gap as i32,
                    detail: "capture queue full".into(),
                    gap: Some(pb::Gap {
                        first_seq,
                        count,
                        reason: "capture queue full".into(),
                    }),
                    ..Default::default()
                })),
            });
        }
        if batch.is_empty() {
            if dirty {
                if let Err(error) = sink.flush() {
                    Metrics::add(&s.metrics.sink_errors, 1);
                    tracing::warn!(%error, "capture sink flush failed");
                }
                dirty = false;
            }
            if stopping {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(2));
            continue;
        }
        if let Err(error) = sink.submit(&batch) {
            Metrics::add(&s.metrics.sink_errors, 1);
            tracing::warn!(%error, records = batch.len(), "capture sink refused a batch");
        }
        dirty = true;
        for ev in batch.drain(..) {
            recycle(&s.pool, ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seq::AtomicSeq;

    struct SlowSink(MemorySink);
    impl CaptureSink for SlowSink {
        fn submit(&self, batch: &[pb::Event]) -> Result<(), CaptureError> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.submit(batch)
        }
    }

    #[test]
    fn drop_policy_writes_gap_events_covering_every_missing_seq() {
        let sink = Arc::new(SlowSink(MemorySink::new()));
        let metrics = Arc::new(Metrics::default());
        let mut cfg = TeeConfig::new("vm-1");
        cfg.capacity = 4;
        cfg.policy = Policy::Drop;
        let tee = Tee::start(
            cfg,
            sink.clone(),
            Arc::new(AtomicSeq::default()),
            metrics.clone(),
        )
        .unwrap();
        for i in 0..200u64 {
            tee.record_frame("net0", 0, pb::Direction::Rx, &i.to_le_bytes());
        }
        tee.shutdown();
        let events = sink.0.take();
        let m = metrics.snapshot();
        assert!(
            m.dropped > 0,
            "a 4-record queue behind a slow sink must drop"
        );
        assert_eq!(m.recorded + m.dropped, 200);
        // Every seq is exactly one of: a recorded frame, a GAP event (which
        // takes its own seq), or a number a GAP event reports missing.
        let mut seen = std::collections::BTreeMap::new();
        let mut frames = 0;
        for ev in &events {
            assert!(seen.insert(ev.seq, ()).is_none(), "seq {} twice", ev.seq);
            match ev.payload.as_ref().unwrap() {
                pb::event::Payload::Net(_) => frames += 1,
                pb::event::Payload::Lifecycle(l) => {
                    assert_eq!(l.kind, pb::LifecycleKind::Gap as i32);
                    let g = l.gap.as_ref().unwrap();
                    for s in g.first_seq..g.first_seq + g.count {
                        assert!(seen.insert(s, ()).is_none(), "seq {s} twice");
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(frames, m.recorded);
        let max = *seen.keys().last().unwrap();
        assert_eq!(seen.len() as u64, max, "no hole in 1..={max}");
        assert_eq!(m.gaps as usize, events.len() - m.recorded as usize);
    }

    #[test]
    fn the_byte_budget_bounds_the_queue() {
        let sink = Arc::new(SlowSink(MemorySink::new()));
        let metrics = Arc::new(Metrics::default());
        let mut cfg = TeeConfig::new("vm-1");
        cfg.capacity = 4096;
        cfg.max_bytes = 16 << 10;
        cfg.policy = Policy::Drop;
        let tee = Tee::start(
            cfg,
            sink.clone(),
            Arc::new(AtomicSeq::default()),
            metrics.clone(),
        )
        .unwrap();
        let data = vec![7u8; 4096];
        for i in 0..100u64 {
            tee.record_block(
                "vda",
                0,
                pb::BlockOp::Write,
                i * 8,
                4096,
                Some(&data),
                None,
                pb::BlockStatus::Ok,
            );
        }
        assert!(
            tee.shared.queued_bytes.load(Ordering::Acquire) <= 16 << 10,
            "queued payload stays within the budget"
        );
        tee.shutdown();
        let m = metrics.snapshot();
        assert!(
            m.dropped > 0,
            "a 16 KiB budget behind a slow sink must drop"
        );
        assert_eq!(m.recorded + m.dropped, 100);
        assert_eq!(tee.shared.queued_bytes.load(Ordering::Acquire), 0);
        let writes = sink
            .0
            .take()
            .into_iter()
            .filter(|e| matches!(e.payload, Some(pb::event::Payload::Block(_))))
            .count() as u64;
        assert_eq!(writes, m.recorded);
    }

    #[test]
    fn block_policy_loses_nothing() {
        let sink = Arc::new(SlowSink(MemorySink::new()));
        let metrics = Arc::new(Metrics::default());
        let mut cfg = TeeConfig::new("vm-1");
        cfg.capacity = 2;
        let tee = Tee::start(
            cfg,
            sink.clone(),
            Arc::new(AtomicSeq::default()),
            metrics.clone(),
        )
        .unwrap();
        for i in 0..50u32 {
            tee.record_block(
                "vda",
                0,
                pb::BlockOp::Read,
                u64::from(i),
                512,
                None,
                Some(&[i as u8; 512]),
                pb::BlockStatus::Ok,
            );
        }
        tee.shutdown();
        let events = sink.0.take();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        let mut h = Vec::new();
        content_hash(ContentHashKind::Xxh3_128, &[7u8; 512], &mut h);
        match events[7].payload.as_ref().unwrap() {
            pb::event::Payload::Block(b) => assert_eq!(b.content_hash, h),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(metrics.snapshot().dropped, 0);
    }

    #[test]
    fn file_sink_round_trips_through_framing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = Arc::new(FileSink::create(&path).unwrap());
        let tee = Tee::start(
            TeeConfig::new("vm-2"),
            sink,
            Arc::new(AtomicSeq::default()),
            Arc::default(),
        )
        .unwrap();
        tee.record_lifecycle(pb::LifecycleKind::Boot, "start");
        tee.record_frame("net0", 1, pb::Direction::Tx, b"hello");
        tee.shutdown();
        let got: Vec<_> = vmr_proto::framing::EventReader::new(File::open(&path).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].seq, 2);
        assert_eq!(got[1].instance_id, "vm-2");
    }
}
