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
//!
//! Large writes are not copied at all: the record keeps the addresses of the
//! payload in guest memory ([`Tee::record_block_in_guest`]), the sink writes
//! it from there, and only then completes the guest's request through a
//! [`Completion`]. Until then the guest does not reuse those buffers, so the
//! record sees exactly what was written to the disk.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use vmr_proto::pb;

use crate::iov::IoVecs;
use crate::metrics::Metrics;
use crate::seq::SeqSource;
use crate::GuestMem;

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
    /// Accepts a batch of records, in queue order. A record's payload may
    /// still lie in guest memory ([`Record::guest_len`]); the sink must be
    /// done reading it when `submit` returns, because the guest may reuse the
    /// buffers right after.
    fn submit(&self, batch: &[Record]) -> Result<(), CaptureError>;
    /// Makes accepted records durable (called when the queue runs empty and
    /// at shutdown).
    fn flush(&self) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// Completes a guest request whose record the sink wrote straight from guest
/// memory.
pub trait Completion: Send + Sync {
    /// Called once per such record by the sink thread, after the record left
    /// the queue and the sink returned (whether or not it could write it).
    fn complete(&self, token: u64);
}

/// One entry of the capture queue: an event, and for large writes the
/// payload's place in guest memory.
pub struct Record {
    event: pb::Event,
    /// Host addresses of the payload when it stays in guest memory.
    guest: IoVecs,
    guest_len: usize,
    /// Keeps the guest memory mapped while `guest` points into it.
    mem: Option<Arc<GuestMem>>,
    done: Option<(Arc<dyn Completion>, u64)>,
}

impl Record {
    /// A record holding `event` (payload included).
    pub fn new(event: pb::Event) -> Self {
        Self {
            event,
            // Room for a typical request's buffers, so pooled records do not
            // allocate when a large write first uses them.
            guest: IoVecs(Vec::with_capacity(8)),
            guest_len: 0,
            mem: None,
            done: None,
        }
    }

    /// The event. For a record whose payload is in guest memory, the block
    /// message's `data` is empty and [`Record::guest_len`] bytes follow.
    pub fn event(&self) -> &pb::Event {
        &self.event
    }

    /// Bytes of payload still in guest memory (0 when the event holds all).
    pub fn guest_len(&self) -> usize {
        self.guest_len
    }

    /// Appends the payload held in guest memory to `out`.
    pub fn copy_guest_payload(&self, out: &mut Vec<u8>) {
        out.reserve(self.guest_len);
        for v in &self.guest.0 {
            let at = out.len();
            // SAFETY: `mem` keeps the region mapped while the record holds the
            // addresses, the guest does not touch a request's buffers before
            // the request completes (after the sink is done with the record),
            // and `out` has room for `iov_len` more bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    out.as_mut_ptr().add(at),
                    v.iov_len,
                );
                out.set_len(at + v.iov_len);
            }
        }
    }

    /// The whole event, with a payload from guest memory copied in.
    pub fn to_event(&self) -> pb::Event {
        let mut ev = self.event.clone();
        if self.guest_len > 0 {
            if let Some(pb::event::Payload::Block(b)) = &mut ev.payload {
                self.copy_guest_payload(&mut b.data);
            }
        }
        ev
    }

    /// Forgets the guest payload (the caller completes the request).
    fn release_guest(&mut self) -> Option<(Arc<dyn Completion>, u64)> {
        self.guest.0.clear();
        self.guest_len = 0;
        self.mem = None;
        self.done.take()
    }
}

/// Frames waiting in memory before one write (small records are batched).
const PENDING_WRITE_BYTES: usize = 256 << 10;

/// Writes records as length-prefixed frames ([`vmr_proto::framing`]) to one
/// file, or to a rolling set of segment files of which it keeps the newest
/// (a flight recorder). A payload in guest memory goes from there to the
/// file in the same `writev` as its frame head.
pub struct FileSink {
    inner: Mutex<FileState>,
}

struct FileState {
    file: Option<File>,
    /// Bytes of records in the current file (the write position).
    size: u64,
    /// End of older bytes in a reused segment (0 for a new file); records
    /// end with a zero length marker while they are shorter.
    stale_end: u64,
    /// Encoded frames not yet written.
    pending: Vec<u8>,
    head: Vec<u8>,
    iov: IoVecs,
    rolling: Option<Rolling>,
}

struct Rolling {
    dir: PathBuf,
    segment_bytes: u64,
    retain_bytes: u64,
    /// Finished segments, oldest first, with their sizes.
    closed: VecDeque<(PathBuf, u64)>,
    /// The segment being written.
    current: Option<PathBuf>,
    /// Zero-filled files made at start, used before new files are created.
    spares: Vec<PathBuf>,
}

/// Extension of preallocated segment files that hold no records yet.
const SPARE_EXTENSION: &str = "spare";

/// Makes sure the spool has room for the retention plus the segment being
/// written, as zero-filled spare files (a zero length reads as the end of a
/// segment). The space is reserved before capture starts, and writing over
/// files that already exist is cheaper than growing new ones.
fn prepare_spares(
    dir: &Path,
    segment_bytes: u64,
    retain_bytes: u64,
    closed: &[(PathBuf, u64)],
) -> std::io::Result<Vec<PathBuf>> {
    let mut spares = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SPARE_EXTENSION) {
            spares.push(path);
        }
    }
    spares.sort();
    let have = closed.len() + spares.len();
    let want = retain_bytes.div_ceil(segment_bytes) as usize + 2;
    if have >= want {
        return Ok(spares);
    }
    let zeros = vec![0u8; segment_bytes.min(1 << 20) as usize];
    let start = std::time::Instant::now();
    for i in have..want {
        let path = dir.join(format!("{i:08}.{SPARE_EXTENSION}"));
        let file = File::create(&path)?;
        let mut at = 0;
        while at < segment_bytes {
            let n = (segment_bytes - at).min(zeros.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&file, &zeros[..n], at)?;
            at += n as u64;
        }
        spares.push(path);
    }
    tracing::info!(
        files = want - have,
        mib = ((want - have) as u64 * segment_bytes) >> 20,
        ms = start.elapsed().as_millis() as u64,
        dir = %dir.display(),
        "preallocated capture segments"
    );
    Ok(spares)
}

/// Extension of segment files.
pub const SEGMENT_EXTENSION: &str = "events";

impl FileSink {
    /// Creates (truncating) the capture file at `path`.
    pub fn create(path: &Path) -> Result<Self, CaptureError> {
        let file = File::create(path).map_err(|source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::with_state(Some(file), None))
    }

    /// A rolling capture in directory `dir`: segment files named after the
    /// first `seq` they hold (`<seq, 20 digits>.events`), a new one once the
    /// current one reaches `segment_bytes`, and the oldest deleted while all
    /// of them exceed `retain_bytes`. Segments already in `dir` count
    /// towards the retention.
    pub fn rolling(
        dir: &Path,
        segment_bytes: u64,
        retain_bytes: u64,
    ) -> Result<Self, CaptureError> {
        let open_err = |source| CaptureError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let mut closed = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(open_err)? {
            let entry = entry.map_err(open_err)?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == SEGMENT_EXTENSION) {
                let size = entry.metadata().map_err(open_err)?.len();
                closed.push((path, size));
            }
        }
        closed.sort();
        let spares =
            prepare_spares(dir, segment_bytes.max(1), retain_bytes, &closed).map_err(open_err)?;
        Ok(Self::with_state(
            None,
            Some(Rolling {
                dir: dir.to_owned(),
                segment_bytes: segment_bytes.max(1),
                retain_bytes,
                closed: closed.into(),
                current: None,
                spares,
            }),
        ))
    }

    fn with_state(file: Option<File>, rolling: Option<Rolling>) -> Self {
        Self {
            inner: Mutex::new(FileState {
                file,
                size: 0,
                stale_end: 0,
                pending: Vec::new(),
                head: Vec::new(),
                iov: IoVecs::default(),
                rolling,
            }),
        }
    }
}

impl FileState {
    /// Writes the pending frames (and, if given, a frame head and a payload
    /// in guest memory after them) in one `pwritev` at the end of the data.
    /// In a recycled segment, an end marker follows when older bytes remain
    /// beyond the new end.
    fn write_out(&mut self, guest: Option<&Record>) -> Result<(), CaptureError> {
        const MARKER: [u8; 4] = [0; 4];
        let Some(file) = &self.file else {
            return Err(CaptureError::Refused("no capture file is open".into()));
        };
        self.iov.0.clear();
        let mut total = self.pending.len() as u64;
        self.iov.0.push(libc::iovec {
            iov_base: self.pending.as_mut_ptr().cast(),
            iov_len: self.pending.len(),
        });
        if let Some(r) = guest {
            self.iov.0.push(libc::iovec {
                iov_base: self.head.as_mut_ptr().cast(),
                iov_len: self.head.len(),
            });
            self.iov.0.extend_from_slice(&r.guest.0);
            total += (self.head.len() + r.guest_len) as u64;
        }
        if self.size + total < self.stale_end {
            self.iov.0.push(libc::iovec {
                iov_base: MARKER.as_ptr().cast_mut().cast(),
                iov_len: MARKER.len(),
            });
        }
        // SAFETY: the entries point into our own buffers, the constant
        // marker (only read), and the record's guest buffers, kept mapped by
        // the record (see `Record::copy_guest_payload`).
        let r =
            unsafe { crate::iov::write_all(file.as_raw_fd(), &mut self.iov.0, Some(self.size)) };
        self.pending.clear();
        match r {
            Ok(()) => {
                self.size += total;
                Ok(())
            }
            Err(e) => {
                // Mark the end of the good data again so a torn frame is
                // never read.
                if self.stale_end > self.size {
                    let _ = std::os::unix::fs::FileExt::write_all_at(file, &MARKER, self.size);
                } else {
                    let _ = file.set_len(self.size);
                }
                Err(e.into())
            }
        }
    }

    /// Starts a new segment before the record `seq` when the current one is
    /// full (or none is open yet). Once the finished segments exceed the
    /// retention, the oldest is reused (renamed and overwritten in place, so
    /// its pages stay in the page cache) and any further excess deleted.
    fn roll(&mut self, seq: u64) -> Result<(), CaptureError> {
        match &self.rolling {
            None => return Ok(()),
            Some(r)
                if self.file.is_some()
                    && self.size + (self.pending.len() as u64) < r.segment_bytes =>
            {
                return Ok(())
            }
            Some(_) => {}
        }
        if self.file.is_some() && !self.pending.is_empty() {
            self.write_out(None)?;
        }
        // Finish the current segment: cut older bytes a reused file holds.
        if let Some(f) = &self.file {
            if self.stale_end > self.size {
                f.set_len(self.size)?;
            }
        }
        let Some(rolling) = &mut self.rolling else {
            return Ok(());
        };
        let path = rolling.dir.join(format!("{seq:020}.{SEGMENT_EXTENSION}"));
        // A segment of an earlier run with the same first seq is replaced.
        rolling.closed.retain(|(p, _)| *p != path);
        let finished = std::mem::replace(&mut self.size, 0);
        if let Some(current) = rolling.current.take() {
            rolling.closed.push_back((current, finished));
        }
        let mut total: u64 = rolling.closed.iter().map(|(_, n)| n).sum();
        let mut reuse = None;
        if total <= rolling.retain_bytes {
            while let Some(spare) = rolling.spares.pop() {
                if std::fs::rename(&spare, &path).is_ok() {
                    reuse = Some(0);
                    break;
                }
            }
        }
        while total > rolling.retain_bytes {
            let Some((oldest, n)) = rolling.closed.pop_front() else {
                break;
            };
            total -= n;
            if reuse.is_none() && std::fs::rename(&oldest, &path).is_ok() {
                reuse = Some(n);
            } else if let Err(error) = std::fs::remove_file(&oldest) {
                tracing::warn!(%error, path = %oldest.display(), "cannot delete an old capture segment");
            }
        }
        let opened = match reuse {
            Some(_) => std::fs::OpenOptions::new().write(true).open(&path),
            None => File::create(&path),
        };
        let file = opened.map_err(|source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        })?;
        self.stale_end = match reuse {
            Some(_) => file.metadata()?.len(),
            None => 0,
        };
        if self.stale_end > 0 {
            // Until the first write, the reused file holds no new data.
            std::os::unix::fs::FileExt::write_all_at(&file, &[0; 4], 0)?;
        }
        self.file = Some(file);
        rolling.current = Some(path);
        Ok(())
    }
}

impl CaptureSink for FileSink {
    fn submit(&self, batch: &[Record]) -> Result<(), CaptureError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        for r in batch {
            st.roll(r.event.seq)?;
            if r.guest_len == 0 {
                vmr_proto::framing::write_event(&mut st.pending, &r.event, &mut st.head)?;
                if st.pending.len() >= PENDING_WRITE_BYTES {
                    st.write_out(None)?;
                }
            } else {
                vmr_proto::framing::encode_block_frame_head(&r.event, r.guest_len, &mut st.head)?;
                st.write_out(Some(r))?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), CaptureError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !guard.pending.is_empty() {
            guard.write_out(None)?;
        }
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
    fn submit(&self, batch: &[Record]) -> Result<(), CaptureError> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch.iter().map(Record::to_event));
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

/// Returns `rec` to the pool, freeing an oversized payload buffer.
fn recycle(pool: &ArrayQueue<Record>, mut rec: Record) {
    let _ = rec.release_guest();
    let ev = &mut rec.event;
    let big = match &ev.payload {
        Some(pb::event::Payload::Block(b)) => b.data.capacity() > POOL_KEEP_BYTES,
        Some(pb::event::Payload::Net(f)) => f.frame.capacity() > POOL_KEEP_BYTES,
        _ => false,
    };
    if big {
        ev.payload = None;
    }
    let _ = pool.push(rec);
}

struct TeeShared {
    config: TeeConfig,
    queued_bytes: std::sync::atomic::AtomicUsize,
    queue: ArrayQueue<Record>,
    pool: ArrayQueue<Record>,
    seq: Arc<dyn SeqSource>,
    metrics: Arc<Metrics>,
    gaps: Mutex<Vec<(u64, u64)>>,
    stop: AtomicBool,
    /// The sink thread, woken when a request waits for its record.
    sink_thread: OnceLock<Thread>,
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
            sink_thread: OnceLock::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("capture-sink".into())
            .spawn(move || sink_loop(&s, &*sink))
            .map_err(CaptureError::Spawn)?;
        let _ = shared.sink_thread.set(thread.thread().clone());
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
        let mut rec = self.take_record();
        let mut io = reuse_block(&mut rec.event, device, queue, op, sector, len, status);
        if let Some(d) = data {
            io.data.extend_from_slice(d);
        }
        if let Some(r) = read {
            self.hash_into(r, &mut io.content_hash);
            io.hash_algorithm = match self.shared.config.hash {
                ContentHashKind::Xxh3_128 => pb::HashAlgorithm::Xxh3128,
                ContentHashKind::Sha256 => pb::HashAlgorithm::Sha256,
            } as i32;
        }
        rec.event.payload = Some(pb::event::Payload::Block(io));
        self.push(rec);
    }

    /// Records a write whose payload stays in guest memory at `iov` (mapped
    /// by `mem`): the sink writes it from there, then calls
    /// `done.complete(token)`, which must complete the guest's request; the
    /// guest does not reuse the buffers before that.
    ///
    /// Returns `false` when the record was not queued (dropped under
    /// [`Policy::Drop`]); `done` is then not called and the caller completes
    /// the request itself.
    #[allow(clippy::too_many_arguments)]
    pub fn record_block_in_guest(
        &self,
        device: &str,
        queue: u16,
        sector: u64,
        status: pb::BlockStatus,
        mem: Arc<GuestMem>,
        iov: &[libc::iovec],
        done: &Arc<dyn Completion>,
        token: u64,
    ) -> bool {
        let mut rec = self.take_record();
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let io = reuse_block(
            &mut rec.event,
            device,
            queue,
            pb::BlockOp::Write,
            sector,
            len as u32,
            status,
        );
        rec.event.payload = Some(pb::event::Payload::Block(io));
        rec.guest.0.extend_from_slice(iov);
        rec.guest_len = len;
        rec.mem = Some(mem);
        rec.done = Some((done.clone(), token));
        if !self.push(rec) {
            return false;
        }
        Metrics::add(&self.shared.metrics.recorded_in_place, 1);
        if let Some(t) = self.shared.sink_thread.get() {
            t.unpark();
        }
        true
    }

    /// Records one frame (without the virtio-net header).
    pub fn record_frame(&self, device: &str, queue: u16, direction: pb::Direction, frame: &[u8]) {
        let mut rec = self.take_record();
        let mut f = match rec.event.payload.take() {
            Some(pb::event::Payload::Net(f)) => f,
            _ => pb::NetFrame::default(),
        };
        f.device.clear();
        f.device.push_str(device);
        f.queue = u32::from(queue);
        f.direction = direction as i32;
        f.frame.clear();
        f.frame.extend_from_slice(frame);
        rec.event.payload = Some(pb::event::Payload::Net(f));
        self.push(rec);
    }

    /// Records a lifecycle event (boot, shutdown, ...).
    pub fn record_lifecycle(&self, kind: pb::LifecycleKind, detail: &str) {
        let mut rec = self.take_record();
        rec.event.payload = Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
            kind: kind as i32,
            detail: detail.to_owned(),
            ..Default::default()
        }));
        self.push(rec);
    }

    /// Hashes `data` with the configured algorithm.
    pub fn hash_into(&self, data: &[u8], out: &mut Vec<u8>) {
        content_hash(self.shared.config.hash, data, out);
    }

    fn take_record(&self) -> Record {
        let mut rec = self
            .shared
            .pool
            .pop()
            .unwrap_or_else(|| Record::new(pb::Event::default()));
        let ev = &mut rec.event;
        if ev.instance_id != self.shared.config.instance_id {
            ev.instance_id.clear();
            ev.instance_id.push_str(&self.shared.config.instance_id);
        }
        rec
    }

    /// Queues `rec`; `false` when the policy dropped it.
    fn push(&self, mut rec: Record) -> bool {
        let s = &*self.shared;
        let ev = &mut rec.event;
        ev.seq = s.seq.next();
        let (wall, mono) = crate::now_ns();
        ev.wall_time_ns = wall;
        ev.mono_time_ns = mono;
        let size = payload_bytes(ev);
        // Whether `size` more bytes fit the budget (an empty queue takes any record).
        let fits = || {
            let queued = s.queued_bytes.load(Ordering::Acquire);
            queued == 0 || queued + size <= s.config.max_bytes
        };
        // Hands the record back when there is no room (like the queue).
        #[allow(clippy::result_large_err)]
        let try_push = |rec: Record| {
            if !fits() {
                return Err(rec);
            }
            s.queued_bytes.fetch_add(size, Ordering::AcqRel);
            s.queue.push(rec).inspect_err(|_| {
                s.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            })
        };
        match s.config.policy {
            Policy::Block => {
                let mut rec = rec;
                let mut spins = 0u32;
                while let Err(back) = try_push(rec) {
                    rec = back;
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Metrics::add(&s.metrics.recorded, 1);
                true
            }
            Policy::Drop => match try_push(rec) {
                Ok(()) => {
                    Metrics::add(&s.metrics.recorded, 1);
                    true
                }
                Err(back) => {
                    Metrics::add(&s.metrics.dropped, 1);
                    let seq = back.event.seq;
                    recycle(&s.pool, back);
                    let mut gaps = s.gaps.lock().unwrap_or_else(|p| p.into_inner());
                    match gaps.last_mut() {
                        Some((first, count)) if *first + *count == seq => *count += 1,
                        _ => gaps.push((seq, 1)),
                    }
                    false
                }
            },
        }
    }
}

/// Takes the block message out of a pooled event (keeping its buffers) and
/// fills in a request's fields; `data` and the hash start empty.
fn reuse_block(
    ev: &mut pb::Event,
    device: &str,
    queue: u16,
    op: pb::BlockOp,
    sector: u64,
    len: u32,
    status: pb::BlockStatus,
) -> pb::BlockIo {
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
    io.content_hash.clear();
    io.hash_algorithm = pb::HashAlgorithm::Unspecified as i32;
    io.status = status as i32;
    io
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
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    let mut dirty = false;
    loop {
        let stopping = s.stop.load(Ordering::Acquire);
        while batch.len() < BATCH {
            match s.queue.pop() {
                Some(rec) => {
                    s.queued_bytes
                        .fetch_sub(payload_bytes(&rec.event), Ordering::AcqRel);
                    batch.push(rec);
                }
                None => break,
            }
        }
        let gaps = std::mem::take(&mut *s.gaps.lock().unwrap_or_else(|p| p.into_inner()));
        for (first_seq, count) in gaps {
            let (wall, mono) = crate::now_ns();
            Metrics::add(&s.metrics.gaps, 1);
            batch.push(Record::new(pb::Event {
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
            }));
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
        for mut rec in batch.drain(..) {
            if let Some((done, token)) = rec.release_guest() {
                done.complete(token);
            }
            recycle(&s.pool, rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seq::AtomicSeq;

    /// A tee with its own sequence counter.
    fn start(cfg: TeeConfig, sink: Arc<dyn CaptureSink>, metrics: Arc<Metrics>) -> Tee {
        Tee::start(cfg, sink, Arc::new(AtomicSeq::default()), metrics).unwrap()
    }

    struct SlowSink(MemorySink);
    impl CaptureSink for SlowSink {
        fn submit(&self, batch: &[Record]) -> Result<(), CaptureError> {
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
        let tee = start(cfg, sink.clone(), metrics.clone());
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
        let tee = start(cfg, sink.clone(), metrics.clone());
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
        let tee = start(cfg, sink.clone(), metrics.clone());
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

    /// Polls `f` for up to five seconds.
    fn wait_until(f: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Records the tokens it is asked to complete.
    #[derive(Default)]
    struct Tokens(Mutex<Vec<u64>>);
    impl Completion for Tokens {
        fn complete(&self, token: u64) {
            self.0.lock().unwrap().push(token);
        }
    }

    fn guest_memory() -> Arc<GuestMem> {
        Arc::new(GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap())
    }

    /// Host iovecs of two guest buffers holding `a` and `b`.
    fn guest_buffers(mem: &GuestMem, a: &[u8], b: &[u8]) -> Vec<libc::iovec> {
        use vm_memory::{Bytes, GuestAddress, GuestMemory};
        let (ga, gb) = (GuestAddress(0x1000), GuestAddress(0x8_0000));
        mem.write_slice(a, ga).unwrap();
        mem.write_slice(b, gb).unwrap();
        [(ga, a.len()), (gb, b.len())]
            .iter()
            .map(|&(g, n)| {
                let slice = mem
                    .get_slices(g, n, vm_memory::Permissions::Read)
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap();
                libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: n,
                }
            })
            .collect()
    }

    #[test]
    fn payloads_in_guest_memory_are_written_then_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = Arc::new(FileSink::create(&path).unwrap());
        let metrics = Arc::new(Metrics::default());
        let tee = start(TeeConfig::new("vm-3"), sink, metrics.clone());
        let mem = guest_memory();
        let a: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![0x5au8; 3000];
        let iov = guest_buffers(&mem, &a, &b);
        let tokens = Arc::new(Tokens::default());
        let done: Arc<dyn Completion> = tokens.clone();
        tee.record_frame("net0", 0, pb::Direction::Rx, b"before");
        assert!(tee.record_block_in_guest(
            "vda",
            0,
            64,
            pb::BlockStatus::Ok,
            mem.clone(),
            &iov,
            &done,
            7 << 32 | 1,
        ));
        tee.record_frame("net0", 0, pb::Direction::Rx, b"after");
        tee.shutdown();
        assert_eq!(*tokens.0.lock().unwrap(), vec![7 << 32 | 1]);
        assert_eq!(metrics.snapshot().recorded_in_place, 1);
        let got: Vec<_> = vmr_proto::framing::open_capture(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let Some(pb::event::Payload::Block(io)) = &got[1].payload else {
            panic!("unexpected {:?}", got[1]);
        };
        assert_eq!((io.sector, io.len as usize), (64, a.len() + b.len()));
        assert_eq!(io.data, [a.as_slice(), b.as_slice()].concat());
        assert_eq!(io.op, pb::BlockOp::Write as i32);
    }

    #[test]
    fn a_dropped_guest_record_is_left_to_the_caller() {
        let sink = Arc::new(SlowSink(MemorySink::new()));
        let metrics = Arc::new(Metrics::default());
        let mut cfg = TeeConfig::new("vm-4");
        cfg.capacity = 1;
        cfg.policy = Policy::Drop;
        let tee = start(cfg, sink.clone(), metrics.clone());
        let mem = guest_memory();
        let iov = guest_buffers(&mem, &[1u8; 100], &[2u8; 100]);
        let tokens = Arc::new(Tokens::default());
        let done: Arc<dyn Completion> = tokens.clone();
        let queued: Vec<bool> = (0..20u64)
            .map(|i| {
                tee.record_block_in_guest(
                    "vda",
                    0,
                    i,
                    pb::BlockStatus::Ok,
                    mem.clone(),
                    &iov,
                    &done,
                    i,
                )
            })
            .collect();
        tee.shutdown();
        let completed = tokens.0.lock().unwrap().clone();
        // Exactly the queued ones are completed by the sink, in order.
        let want: Vec<u64> = (0..20u64).filter(|&i| queued[i as usize]).collect();
        assert_eq!(completed, want);
        assert!(queued.iter().any(|q| !q), "a one-record queue drops some");
        let m = metrics.snapshot();
        assert_eq!(m.recorded + m.dropped, 20);
        // The memory sink copied each queued payload out of guest memory.
        let blocks = sink
            .0
            .take()
            .into_iter()
            .filter_map(|e| match e.payload {
                Some(pb::event::Payload::Block(b)) => Some(b),
                _ => None,
            })
            .collect::<Vec<_>>();
        assert_eq!(blocks.len(), want.len());
        assert!(blocks
            .iter()
            .all(|b| b.data == [[1u8; 100], [2u8; 100]].concat()));
    }

    #[test]
    fn a_rolling_capture_keeps_the_newest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        // Segments of about 10 frames, at most about 30 frames kept.
        let frame = 4 + 200;
        let sink = Arc::new(FileSink::rolling(&spool, 10 * frame, 30 * frame).unwrap());
        let tee = start(TeeConfig::new("vm-5"), sink, Arc::default());
        for i in 0..200u32 {
            tee.record_frame("net0", 0, pb::Direction::Tx, &[i as u8; 170]);
        }
        // Shorter records: reused segments now hold older bytes past the
        // new ones, which a reader must never see, live or after shutdown.
        for i in 0..25u32 {
            tee.record_frame("net0", 0, pb::Direction::Tx, &[i as u8; 9]);
        }
        let read = || -> Vec<u64> {
            vmr_proto::framing::open_capture(&spool)
                .unwrap()
                .map(|e| e.unwrap().seq)
                .collect()
        };
        assert!(
            wait_until(|| read().last() == Some(&225)),
            "the live spool ends with the newest record"
        );
        let live = read();
        assert!(live.windows(2).all(|w| w[1] == w[0] + 1), "{live:?}");
        tee.shutdown();
        let mut names: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".events"))
            .collect();
        names.sort();
        assert!(names.len() <= 5, "old segments deleted: {names:?}");
        let got: Vec<_> = vmr_proto::framing::open_capture(&spool)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        // A contiguous run that ends with the last record.
        assert_eq!(*seqs.last().unwrap(), 225);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(
            (30..=50).contains(&seqs.len()),
            "kept {} records",
            seqs.len()
        );
        assert_eq!(names[0], format!("{:020}.events", seqs[0]));
    }

    #[test]
    fn file_sink_round_trips_through_framing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = Arc::new(FileSink::create(&path).unwrap());
        let tee = start(TeeConfig::new("vm-2"), sink, Arc::default());
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
