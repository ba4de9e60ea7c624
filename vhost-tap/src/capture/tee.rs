//! The tee: device threads number records and push them into a bounded
//! lock-free queue; one sink thread drains it in batches into a
//! [`CaptureSink`].
//!
//! Records and their payload buffers are recycled through a pool, so a busy
//! backend reaches a steady state without allocating per request.
//!
//! Numbering and queueing happen under one lock, so a device's records sit
//! in the queue (and reach the sink) in `seq` order.
//!
//! When the queue is full, [`Policy::Block`] makes the device thread wait (the
//! guest sees latency, nothing is lost) and [`Policy::Drop`] drops the record,
//! counts it, and the sink thread later writes a `GAP` lifecycle event naming
//! the missing sequence numbers. The same policy applies when the sink
//! reports that the spool is full. Every other sink error turns the records
//! it could not write into a `GAP` event too: no gap is silent.
//!
//! [`Tee::sync`] is the FLUSH barrier: it returns once every record queued
//! before the call is written and the sink made it durable.
//!
//! # Restart record
//!
//! With [`TeeConfig::state`] set, the tee keeps a small file for its device
//! ([`DeviceState`]): the highest `seq` up to which every number the device
//! took is written or covered by a GAP event, and whether the last run
//! stopped cleanly. A backend that starts after an unclean stop (a crash, a
//! `kill -9`, a power loss) writes a GAP event from that point up to its
//! first new number; the range can include numbers that other devices of
//! the instance recorded (see `Gap` in event.proto).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use vmr_proto::pb;

use super::{content_hash, CaptureError, CaptureSink, ContentHashKind, Policy, Record, SinkError};
use crate::metrics::Metrics;
use crate::seq::SeqSource;

/// Default payload budget of the capture queue.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

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
    /// into an empty queue.
    pub max_bytes: usize,
    /// Behaviour when the queue or the spool is full.
    pub policy: Policy,
    /// Hash of read contents.
    pub hash: ContentHashKind,
    /// The device's restart record (None: restarts are not detected).
    pub state: Option<PathBuf>,
    /// Longest wait of [`Tee::sync`].
    pub sync_timeout: Duration,
    /// Under [`Policy::Block`], the longest time the sink waits for room in
    /// a full spool (None: as long as it takes). Past it the records that
    /// do not fit are dropped and covered by a GAP event, and so is every
    /// record after them until the spool takes records again; the guest
    /// then waits no longer than this bound (plus the time to drain the
    /// queue).
    pub block_bound: Option<Duration>,
}

impl TeeConfig {
    /// Defaults: 4096 records, 64 MiB of payload, policy block, xxh3-128, no
    /// restart record, syncs wait up to 60 s.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            capacity: 4096,
            max_bytes: DEFAULT_MAX_BYTES,
            policy: Policy::Block,
            hash: ContentHashKind::Xxh3_128,
            state: None,
            sync_timeout: Duration::from_secs(60),
            block_bound: None,
        }
    }
}

/// The restart record of one device (24 bytes, little endian): magic
/// `VMRDEV01`, the floor (every number of the device up to it is written or
/// covered by a GAP event), and 1 after a clean stop, 0 while running.
pub struct DeviceState {
    file: File,
    floor: u64,
}

const STATE_MAGIC: &[u8; 8] = b"VMRDEV01";

impl DeviceState {
    /// Opens (creating) the record at `path`; returns it and, if the last
    /// run did not stop cleanly, its floor.
    pub fn open(path: &Path, floor: u64) -> Result<(Self, Option<u64>), CaptureError> {
        let open_err = |source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let mut buf = [0u8; 24];
        let n = file.read_at(&mut buf, 0).map_err(open_err)?;
        let unclean = (n == 24 && &buf[..8] == STATE_MAGIC && buf[16] == 0)
            .then(|| u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")));
        let mut s = Self { file, floor };
        s.write(false).map_err(open_err)?;
        s.file.sync_all().map_err(open_err)?;
        if !existed {
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(open_err)?;
            }
        }
        Ok((s, unclean))
    }

    fn write(&mut self, clean: bool) -> std::io::Result<()> {
        let mut buf = [0u8; 24];
        buf[..8].copy_from_slice(STATE_MAGIC);
        buf[8..16].copy_from_slice(&self.floor.to_le_bytes());
        buf[16] = u8::from(clean);
        self.file.write_all_at(&buf, 0)
    }
}

/// Pooled records keep payload buffers smaller than this; larger ones go to
/// a separate pool of large buffers, so a record taken for a small request
/// does not hold a large buffer, and a large write finds one ready.
const LARGE_BUFFER: usize = 64 << 10;
/// Largest buffer the large-buffer pool keeps (the largest request).
const LARGE_KEEP_BYTES: usize = 4 << 20;
/// Sink batch size.
const BATCH: usize = 256;
/// Chunk size of [`Tee::record_write`]'s copy and checksum: small enough
/// to stay in the core's cache between the copy and the CRC.
pub const CRC_CHUNK: usize = 64 << 10;
/// How long shutdown waits for a full spool before it drops what is left
/// (also when the sink was already waiting for room when the stop came).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Payload bytes a record holds.
fn payload_bytes(ev: &pb::Event) -> usize {
    match &ev.payload {
        Some(pb::event::Payload::Block(b)) => b.data.len(),
        Some(pb::event::Payload::Net(f)) => f.frame.len(),
        _ => 0,
    }
}

/// The pools of records and of large payload buffers.
struct Pools {
    records: ArrayQueue<Record>,
    /// Used last in, first out, so the buffers in use stay few and warm in
    /// the caches instead of cycling through the whole pool.
    large: Mutex<Vec<Vec<u8>>>,
    large_cap: usize,
}

impl Pools {
    /// The most recently returned large buffer.
    fn take_large(&self) -> Option<Vec<u8>> {
        self.large.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Pools for a queue of `capacity` records and `max_bytes` of payload:
    /// the large buffers held are bounded by the payload budget.
    fn new(capacity: usize, max_bytes: usize) -> Self {
        let large = (max_bytes / LARGE_BUFFER).clamp(1, capacity + BATCH);
        Self {
            records: ArrayQueue::new(capacity + BATCH),
            large: Mutex::new(Vec::with_capacity(large)),
            large_cap: large,
        }
    }

    /// Returns `rec` to the pool; a large payload buffer goes to its own
    /// pool (or is freed when that is full or the buffer is oversized).
    fn recycle(&self, mut rec: Record) {
        rec.force = false;
        rec.data_crc = None;
        let ev = &mut rec.event;
        match &mut ev.payload {
            Some(pb::event::Payload::Block(b)) if b.data.capacity() >= LARGE_BUFFER => {
                let buf = std::mem::take(&mut b.data);
                if buf.capacity() <= LARGE_KEEP_BYTES {
                    let mut large = self.large.lock().unwrap_or_else(|p| p.into_inner());
                    if large.len() < self.large_cap {
                        large.push(buf);
                    }
                }
            }
            Some(pb::event::Payload::Net(f)) if f.frame.capacity() > LARGE_KEEP_BYTES => {
                ev.payload = None;
            }
            Some(pb::event::Payload::Lifecycle(_)) => ev.payload = None,
            _ => {}
        }
        let _ = self.records.push(rec);
    }
}

/// Numbers without a record, waiting for their GAP event.
#[derive(Debug, Clone)]
struct Gap {
    first: u64,
    count: u64,
    reason: String,
}

/// Adds `[first, first + count)` to `gaps`, merging with the last range.
fn add_gap(gaps: &mut Vec<Gap>, first: u64, count: u64, reason: &str) {
    if count == 0 {
        return;
    }
    if let Some(g) = gaps.last_mut() {
        if g.first + g.count == first && g.reason == reason {
            g.count += count;
            return;
        }
    }
    gaps.push(Gap {
        first,
        count,
        reason: reason.to_owned(),
    });
}

struct SyncState {
    /// Highest barrier handled.
    done: u64,
    /// Whether the capture became durable for it.
    ok: bool,
}

struct TeeShared {
    config: TeeConfig,
    queued_bytes: AtomicUsize,
    queue: ArrayQueue<Record>,
    pool: Pools,
    seq: Arc<dyn SeqSource>,
    metrics: Arc<Metrics>,
    /// Numbering and queueing of one record.
    order: Mutex<()>,
    gaps: Mutex<Vec<Gap>>,
    stop: AtomicBool,
    /// Barriers requested by [`Tee::sync`].
    sync_wanted: AtomicU64,
    sync_state: Mutex<SyncState>,
    synced: Condvar,
    /// The sink thread, woken for a barrier.
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

impl Tee {
    /// Starts the sink thread. With a restart record that shows an unclean
    /// stop, or a counter that skipped numbers after a host restart, the
    /// first records are GAP events for those numbers.
    pub fn start(
        config: TeeConfig,
        sink: Arc<dyn CaptureSink>,
        seq: Arc<dyn SeqSource>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CaptureError> {
        if config.capacity == 0 {
            return Err(CaptureError::ZeroCapacity);
        }
        let floor = seq.peek().saturating_sub(1);
        let (state, unclean) = match &config.state {
            Some(p) => {
                let (s, u) = DeviceState::open(p, floor)?;
                (Some(s), u)
            }
            None => (None, None),
        };
        let shared = Arc::new(TeeShared {
            queue: ArrayQueue::new(config.capacity),
            pool: Pools::new(config.capacity, config.max_bytes),
            queued_bytes: AtomicUsize::new(0),
            config,
            seq,
            metrics,
            order: Mutex::new(()),
            gaps: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            sync_wanted: AtomicU64::new(0),
            sync_state: Mutex::new(SyncState { done: 0, ok: true }),
            synced: Condvar::new(),
            sink_thread: OnceLock::new(),
        });
        {
            let mut gaps = shared.gaps.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((first, count)) = shared.seq.skipped() {
                add_gap(
                    &mut gaps,
                    first,
                    count,
                    "host restarted: numbers the counter skipped",
                );
            }
            if let Some(old) = unclean {
                // Up to the first number of this run.
                let next = shared.seq.peek();
                add_gap(
                    &mut gaps,
                    old + 1,
                    next.saturating_sub(old + 1),
                    "backend restarted after an unclean stop",
                );
                tracing::warn!(
                    from = old + 1,
                    to = next,
                    "capture restarted after an unclean stop"
                );
            }
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("capture-sink".into())
            .spawn(move || {
                SinkLoop {
                    s: &s,
                    sink: &*sink,
                    batch: Vec::with_capacity(BATCH),
                    dirty: false,
                    popped: floor,
                    state,
                    last_error: None,
                    overflowing: false,
                    stop_seen: None,
                }
                .run()
            })
            .map_err(CaptureError::Spawn)?;
        let _ = shared.sink_thread.set(thread.thread().clone());
        Ok(Self {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Drains the queue into the sink, makes it durable, marks the restart
    /// record clean and joins the sink thread.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.shared.sink_thread.get() {
            t.unpark();
        }
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

    /// The epoch this tee stamps on records.
    pub fn epoch(&self) -> u64 {
        self.shared.seq.epoch()
    }

    /// The FLUSH barrier: returns once every record queued before the call
    /// is written and durable. Fails when the sink could not make it durable
    /// or the barrier took longer than [`TeeConfig::sync_timeout`].
    pub fn sync(&self) -> Result<(), CaptureError> {
        let s = &*self.shared;
        let want = s.sync_wanted.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(t) = s.sink_thread.get() {
            t.unpark();
        }
        let deadline = Instant::now() + s.config.sync_timeout;
        let mut st = s.sync_state.lock().unwrap_or_else(|p| p.into_inner());
        while st.done < want {
            let now = Instant::now();
            if now >= deadline || self.thread.lock().map(|t| t.is_none()).unwrap_or(true) {
                return Err(CaptureError::SyncTimeout(s.config.sync_timeout));
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            st = s
                .synced
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.ok {
            Ok(())
        } else {
            Err(CaptureError::SyncFailed)
        }
    }

    /// Records one block request. `data` is the payload of writes; `read` is
    /// the data a read returned (hashed, not stored). Returns the record's
    /// `seq` (None: dropped by the policy).
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
    ) -> Option<u64> {
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
        self.push(rec)
    }

    /// Records a write whose payload `fill` produces: it gets the record's
    /// own buffer, `len` bytes long, copies the guest's data into it once,
    /// writes the disk from it and returns the status. The record then holds
    /// exactly the bytes the disk got, whatever the guest does to its
    /// buffers afterwards. Returns the status and the record's `seq` (None:
    /// dropped by the policy).
    pub fn record_block_with(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        fill: impl FnOnce(&mut [u8]) -> pb::BlockStatus,
    ) -> (pb::BlockStatus, Option<u64>) {
        self.record_block_inner(device, queue, op, sector, len, |d| (fill(d), None))
    }

    /// Records a write the way [`Tee::record_block_with`] does, copying the
    /// payload in chunks of [`CRC_CHUNK`] bytes with `copy(offset, chunk)`
    /// and checksumming each chunk right after it was copied, while it is
    /// still in the cache (for payloads the sink writes as split frames);
    /// `write` then writes the disk from the record's buffer. The sink
    /// combines that CRC with the frame head's, so the payload is read once
    /// on this thread and never again for its CRC. A `copy` that fails
    /// stops the copy and the request gets `IOERR`.
    #[allow(clippy::too_many_arguments)]
    pub fn record_write(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        copy: impl FnMut(u64, &mut [u8]) -> bool,
        write: impl FnOnce(&[u8]) -> pb::BlockStatus,
    ) -> (pb::BlockStatus, Option<u64>) {
        self.record_block_inner(device, queue, op, sector, len, |data| {
            let (status, crc) = copy_checksummed(data, copy);
            if status != pb::BlockStatus::Ok {
                return (status, None);
            }
            (write(data), crc)
        })
    }

    /// The first half of [`Tee::record_write`] for a write whose disk
    /// write happens elsewhere (another thread): copies the payload with
    /// `copy` and checksums it chunk by chunk the same way, and returns the
    /// record, not yet numbered or queued. Write the disk from
    /// [`PendingWrite::data`], then hand the record and the write's status
    /// to [`Tee::finish_write`]. A `copy` that fails still returns the
    /// record, not numbered either ([`PendingWrite::copied`] is false): the
    /// disk must not be written from it, and [`Tee::finish_write`] with
    /// `IOERR` numbers it in its turn among the queue's other writes.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_write(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        copy: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> PendingWrite {
        let (rec, status) = self.fill_block(device, queue, op, sector, len, |data| {
            copy_checksummed(data, copy)
        });
        PendingWrite {
            rec,
            copied: status == pb::BlockStatus::Ok,
        }
    }

    /// Numbers and queues a record from [`Tee::copy_write`] with the status
    /// of its disk write; returns its `seq` (None: dropped by the policy).
    pub fn finish_write(&self, pending: PendingWrite, status: pb::BlockStatus) -> Option<u64> {
        let mut rec = pending.rec;
        if let Some(pb::event::Payload::Block(b)) = &mut rec.event.payload {
            b.status = status as i32;
        }
        self.push(rec)
    }

    /// Takes a record with a `len`-byte payload buffer, lets `fill` produce
    /// the payload (and optionally its CRC), and queues it.
    fn record_block_inner(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        fill: impl FnOnce(&mut [u8]) -> (pb::BlockStatus, Option<u32>),
    ) -> (pb::BlockStatus, Option<u64>) {
        let (rec, status) = self.fill_block(device, queue, op, sector, len, fill);
        (status, self.push(rec))
    }

    /// Takes a record with a `len`-byte payload buffer and lets `fill`
    /// produce the payload (and optionally its CRC).
    fn fill_block(
        &self,
        device: &str,
        queue: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        fill: impl FnOnce(&mut [u8]) -> (pb::BlockStatus, Option<u32>),
    ) -> (Record, pb::BlockStatus) {
        let mut rec = self.take_record();
        // Keep the bytes a pooled buffer already holds: no zero fill unless
        // it grows.
        let n = len as usize;
        let mut data = match &mut rec.event.payload {
            Some(pb::event::Payload::Block(b)) => std::mem::take(&mut b.data),
            _ => Vec::new(),
        };
        if n >= LARGE_BUFFER && data.capacity() < n {
            if let Some(big) = self.shared.pool.take_large() {
                data = big;
            }
        }
        let mut io = reuse_block(
            &mut rec.event,
            device,
            queue,
            op,
            sector,
            len,
            pb::BlockStatus::Ok,
        );
        if data.len() < n {
            data.resize(n, 0);
        } else {
            data.truncate(n);
        }
        let (status, crc) = fill(&mut data);
        rec.data_crc = crc;
        io.data = data;
        io.status = status as i32;
        rec.event.payload = Some(pb::event::Payload::Block(io));
        (rec, status)
    }

    /// Records one frame (without the virtio-net header); returns its `seq`
    /// (None: dropped by the policy).
    pub fn record_frame(
        &self,
        device: &str,
        queue: u16,
        direction: pb::Direction,
        frame: &[u8],
    ) -> Option<u64> {
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
        self.push(rec)
    }

    /// Records a lifecycle event (boot, shutdown, ...).
    pub fn record_lifecycle(&self, kind: pb::LifecycleKind, detail: &str) {
        let mut rec = self.take_record();
        rec.event.payload = Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
            kind: kind as i32,
            detail: detail.to_owned(),
            ..Default::default()
        }));
        let _ = self.push(rec);
    }

    /// Hashes `data` with the configured algorithm.
    pub fn hash_into(&self, data: &[u8], out: &mut Vec<u8>) {
        content_hash(self.shared.config.hash, data, out);
    }

    fn take_record(&self) -> Record {
        let mut rec = self
            .shared
            .pool
            .records
            .pop()
            .unwrap_or_else(|| Record::new(pb::Event::default()));
        let ev = &mut rec.event;
        if ev.instance_id != self.shared.config.instance_id {
            ev.instance_id.clear();
            ev.instance_id.push_str(&self.shared.config.instance_id);
        }
        ev.epoch = self.shared.seq.epoch();
        rec
    }

    /// Numbers and queues `rec`; returns its `seq`, or None when the
    /// policy dropped it.
    fn push(&self, mut rec: Record) -> Option<u64> {
        let s = &*self.shared;
        let size = payload_bytes(&rec.event);
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
        let _order = s.order.lock().unwrap_or_else(|p| p.into_inner());
        let ev = &mut rec.event;
        ev.seq = s.seq.next();
        let seq = ev.seq;
        let (wall, mono) = crate::now_ns();
        ev.wall_time_ns = wall;
        ev.mono_time_ns = mono;
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
                Some(seq)
            }
            Policy::Drop => match try_push(rec) {
                Ok(()) => {
                    Metrics::add(&s.metrics.recorded, 1);
                    Some(seq)
                }
                Err(back) => {
                    Metrics::add(&s.metrics.dropped, 1);
                    let seq = back.event.seq;
                    s.pool.recycle(back);
                    let mut gaps = s.gaps.lock().unwrap_or_else(|p| p.into_inner());
                    add_gap(&mut gaps, seq, 1, "capture queue full");
                    None
                }
            },
        }
    }
}

/// Fills `data` with `copy(offset, chunk)` in chunks of [`CRC_CHUNK`]
/// bytes, computing the CRC of each chunk right after it was copied (only
/// for payloads the sink writes as split frames, whose frame CRC the sink
/// combines with it). A failed `copy` gives `IOERR` and no CRC.
fn copy_checksummed(
    data: &mut [u8],
    mut copy: impl FnMut(u64, &mut [u8]) -> bool,
) -> (pb::BlockStatus, Option<u32>) {
    let n = data.len();
    let checksum = n >= super::SPLIT_FRAME_MIN;
    let mut h = crc32fast::Hasher::new();
    let mut pos = 0;
    while pos < n {
        let end = (pos + CRC_CHUNK).min(n);
        if !copy(pos as u64, &mut data[pos..end]) {
            return (pb::BlockStatus::Ioerr, None);
        }
        if checksum {
            h.update(&data[pos..end]);
        }
        pos = end;
    }
    (pb::BlockStatus::Ok, checksum.then(|| h.finalize()))
}

/// A write's record between [`Tee::copy_write`] and [`Tee::finish_write`]:
/// its payload is copied and checksummed (or the copy failed), it has no
/// `seq` yet and is not queued.
pub struct PendingWrite {
    rec: Record,
    copied: bool,
}

impl PendingWrite {
    /// Whether the whole payload was copied from the guest (false: the
    /// copy failed, the request fails with `IOERR` and the disk must not be
    /// written from [`PendingWrite::data`]).
    pub fn copied(&self) -> bool {
        self.copied
    }

    /// The copied payload: the bytes to write to the disk.
    pub fn data(&self) -> &[u8] {
        match &self.rec.event.payload {
            Some(pb::event::Payload::Block(b)) => &b.data,
            _ => &[],
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

struct SinkLoop<'a> {
    s: &'a TeeShared,
    sink: &'a dyn CaptureSink,
    batch: Vec<Record>,
    /// Records written since the last flush.
    dirty: bool,
    /// Highest seq taken out of the queue (records are queued in order).
    popped: u64,
    state: Option<DeviceState>,
    /// When the last sink error happened (retries back off).
    last_error: Option<Instant>,
    /// The spool stayed full past the block bound: records that do not
    /// fit are dropped at once until it takes records again.
    overflowing: bool,
    /// When a full spool first kept a shutdown waiting (the wait of the
    /// whole shutdown is bounded by [`STOP_WAIT`]).
    stop_seen: Option<Instant>,
}

impl SinkLoop<'_> {
    fn run(mut self) {
        loop {
            let stopping = self.s.stop.load(Ordering::Acquire);
            let want = self.s.sync_wanted.load(Ordering::Acquire);
            let done = self
                .s
                .sync_state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .done;
            if want > done || stopping {
                // Everything queued before the barrier was asked for is in
                // the queue now: write that much, then sync.
                let mut n = self.s.queue.len();
                loop {
                    let took = self.fill(n.min(BATCH));
                    n -= took;
                    self.add_gap_events();
                    if self.batch.is_empty() {
                        break;
                    }
                    self.write_batch(stopping);
                }
                let ok = self.sync();
                if stopping && self.s.queue.is_empty() {
                    self.finish(ok);
                    self.signal(want, ok);
                    return;
                }
                self.signal(want, ok);
                continue;
            }
            self.fill(BATCH);
            self.add_gap_events();
            if self.batch.is_empty() {
                if self.dirty {
                    if let Err(error) = self.sink.flush() {
                        Metrics::add(&self.s.metrics.sink_errors, 1);
                        tracing::warn!(%error, "capture sink flush failed");
                    }
                    self.dirty = false;
                }
                std::thread::park_timeout(Duration::from_millis(2));
                continue;
            }
            self.write_batch(false);
        }
    }

    /// Moves up to `max` records from the queue into the batch.
    fn fill(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(rec) = self.s.queue.pop() else { break };
            self.s
                .queued_bytes
                .fetch_sub(payload_bytes(&rec.event), Ordering::AcqRel);
            self.popped = self.popped.max(rec.event.seq);
            self.batch.push(rec);
            n += 1;
        }
        n
    }

    /// Appends a GAP event for every range waiting for one (after a sink
    /// error, not before a short pause).
    fn add_gap_events(&mut self) {
        if self
            .last_error
            .is_some_and(|t| t.elapsed() < Duration::from_millis(50))
        {
            return;
        }
        let gaps = std::mem::take(&mut *self.s.gaps.lock().unwrap_or_else(|p| p.into_inner()));
        for g in gaps {
            let (wall, mono) = crate::now_ns();
            let mut rec = Record::new(pb::Event {
                instance_id: self.s.config.instance_id.clone(),
                seq: self.s.seq.next(),
                wall_time_ns: wall,
                mono_time_ns: mono,
                epoch: self.s.seq.epoch(),
                payload: Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
                    kind: pb::LifecycleKind::Gap as i32,
                    detail: g.reason.clone(),
                    gap: Some(pb::Gap {
                        first_seq: g.first,
                        count: g.count,
                        reason: g.reason,
                    }),
                    ..Default::default()
                })),
            });
            rec.force = true;
            self.batch.push(rec);
        }
    }

    /// Turns records `from..to` of the batch, which the sink did not
    /// write, into gap ranges.
    fn lose(&mut self, from: usize, to: usize, reason: &str) -> u64 {
        let mut gaps = self.s.gaps.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for r in &self.batch[from..to] {
            if let Some(pb::event::Payload::Lifecycle(l)) = &r.event.payload {
                if let Some(g) = &l.gap {
                    // An unwritten GAP event: its range waits again, and so
                    // does its own number.
                    add_gap(&mut gaps, g.first_seq, g.count, &g.reason);
                    add_gap(&mut gaps, r.event.seq, 1, reason);
                    continue;
                }
            }
            add_gap(&mut gaps, r.event.seq, 1, reason);
            n += 1;
        }
        n
    }

    /// Writes the batch, applying the policy when the spool is full. A
    /// shutdown requested while the batch waits for room (`stopping`, or
    /// the stop flag seen during the wait) drops what still does not fit
    /// once [`STOP_WAIT`] has passed since the stop was first seen, with a
    /// GAP event.
    fn write_batch(&mut self, stopping: bool) {
        let m = &self.s.metrics;
        let mut start = 0;
        let mut blocked: Option<Instant> = None;
        loop {
            match self.sink.submit(&self.batch[start..]) {
                Ok(()) => {
                    self.last_error = None;
                    // A GAP event alone fits a full spool; only a record
                    // ends the overflow.
                    if self.overflowing && self.batch[start..].iter().any(|r| !r.force) {
                        self.overflowing = false;
                        tracing::info!("capture spool takes records again");
                    }
                    break;
                }
                Err(SinkError { written, error })
                    if matches!(error, CaptureError::Full) || error.is_no_space() =>
                {
                    if self.batch[start..start + written].iter().any(|r| !r.force) {
                        self.overflowing = false;
                    }
                    start += written;
                    let no_space = error.is_no_space();
                    let since = *blocked.get_or_insert_with(|| {
                        if no_space {
                            Metrics::add(&m.spool_no_space, 1);
                            tracing::error!(%error, policy = ?self.s.config.policy, "capture spool: no space left on its filesystem; records wait or are dropped with a GAP per the policy");
                        } else {
                            Metrics::add(&m.spool_full, 1);
                            tracing::warn!("capture spool full: waiting for the shipper to commit");
                        }
                        Instant::now()
                    });
                    if self.stop_seen.is_none() && (stopping || self.s.stop.load(Ordering::Acquire))
                    {
                        self.stop_seen = Some(Instant::now());
                    }
                    let give_up = self.stop_seen.is_some_and(|t| t.elapsed() > STOP_WAIT);
                    let past_bound = self.overflowing
                        || self
                            .s
                            .config
                            .block_bound
                            .is_some_and(|b| since.elapsed() >= b);
                    if past_bound && !self.overflowing {
                        self.overflowing = true;
                        Metrics::add(&m.spool_bound_hits, 1);
                        tracing::warn!(
                            bound_ms = self.s.config.block_bound.map_or(0, |b| b.as_millis() as u64),
                            "capture spool full past the block bound: dropping records with a GAP until it takes records again"
                        );
                    }
                    if no_space
                        && self.s.config.policy == Policy::Drop
                        && !give_up
                        && !past_bound
                        && start + 1 < self.batch.len()
                    {
                        // Only the record that did not fit is dropped: the
                        // ones after it may still fit the reserved space.
                        let n =
                            self.lose(start, start + 1, "no space left on the spool's filesystem");
                        Metrics::add(&m.spool_dropped, n);
                        self.last_error = Some(Instant::now());
                        start += 1;
                        continue;
                    }
                    if self.s.config.policy == Policy::Drop || give_up || past_bound {
                        let reason = match (no_space, past_bound) {
                            (true, true) => {
                                "no space left on the spool's filesystem past the block bound"
                            }
                            (true, false) => "no space left on the spool's filesystem",
                            (false, true) => "spool full past the block bound",
                            (false, false) => "spool full",
                        };
                        let n = self.lose(start, self.batch.len(), reason);
                        Metrics::add(&m.spool_dropped, n);
                        if no_space {
                            // The GAP event waits a little: it needs room too.
                            self.last_error = Some(Instant::now());
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(SinkError { written, error }) => {
                    start += written;
                    Metrics::add(&m.sink_errors, 1);
                    let mut reason = format!("capture sink error: {error}");
                    let mut src = std::error::Error::source(&error);
                    while let Some(e) = src {
                        reason.push_str(&format!(": {e}"));
                        src = e.source();
                    }
                    tracing::warn!(%error, records = self.batch.len() - start, "capture sink failed; recording a gap");
                    self.lose(start, self.batch.len(), &reason);
                    self.last_error = Some(Instant::now());
                    break;
                }
            }
        }
        if let Some(t) = blocked {
            Metrics::add(&m.spool_blocked_ms, t.elapsed().as_millis() as u64);
        }
        self.dirty = true;
        for rec in self.batch.drain(..) {
            if matches!(rec.event.payload, Some(pb::event::Payload::Lifecycle(_))) {
                if rec.force {
                    Metrics::add(&m.gaps, 1);
                }
                continue;
            }
            self.s.pool.recycle(rec);
        }
        self.save_floor();
    }

    /// Every number of this device up to the floor is written or covered
    /// by a written GAP event.
    fn floor(&self) -> u64 {
        let gaps = self.s.gaps.lock().unwrap_or_else(|p| p.into_inner());
        match gaps.iter().map(|g| g.first).min() {
            Some(first) => self.popped.min(first.saturating_sub(1)),
            None => self.popped,
        }
    }

    fn save_floor(&mut self) {
        let floor = self.floor();
        if let Some(st) = &mut self.state {
            if floor > st.floor {
                st.floor = floor;
                if let Err(error) = st.write(false) {
                    tracing::warn!(%error, "cannot update the capture restart record");
                }
            }
        }
    }

    fn sync(&mut self) -> bool {
        Metrics::add(&self.s.metrics.syncs, 1);
        self.dirty = false;
        match self.sink.sync() {
            Ok(()) => {
                if let Some(st) = &self.state {
                    let _ = st.file.sync_data();
                }
                true
            }
            Err(error) => {
                Metrics::add(&self.s.metrics.sink_errors, 1);
                tracing::warn!(%error, "capture sync failed");
                false
            }
        }
    }

    fn signal(&self, want: u64, ok: bool) {
        let mut st = self.s.sync_state.lock().unwrap_or_else(|p| p.into_inner());
        if want > st.done {
            st.done = want;
            st.ok = ok;
        }
        self.s.synced.notify_all();
    }

    /// At shutdown: a clean stop is one where every record and gap is durable.
    fn finish(&mut self, synced: bool) {
        let pending = !self
            .s
            .gaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        self.save_floor();
        if let Some(st) = &mut self.state {
            let clean = synced && !pending;
            if let Err(error) = st.write(clean).and_then(|()| st.file.sync_data()) {
                tracing::warn!(%error, "cannot mark the capture restart record");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{FileSink, MemorySink};
    use crate::seq::AtomicSeq;

    /// A tee with its own sequence counter.
    fn start(cfg: TeeConfig, sink: Arc<dyn CaptureSink>, metrics: Arc<Metrics>) -> Tee {
        Tee::start(cfg, sink, Arc::new(AtomicSeq::default()), metrics).unwrap()
    }

    struct SlowSink(MemorySink);
    impl CaptureSink for SlowSink {
        fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.submit(batch)
        }
    }

    /// Checks that every seq in 1..=max is exactly one of: a recorded
    /// event, or a number a GAP event reports missing.
    fn assert_no_silent_gap(events: &[pb::Event]) -> usize {
        let mut seen = std::collections::BTreeMap::new();
        let mut gaps = 0;
        for ev in events {
            assert!(seen.insert(ev.seq, ()).is_none(), "seq {} twice", ev.seq);
            if let Some(pb::event::Payload::Lifecycle(l)) = &ev.payload {
                if l.kind == pb::LifecycleKind::Gap as i32 {
                    gaps += 1;
                    let g = l.gap.as_ref().unwrap();
                    for s in g.first_seq..g.first_seq + g.count {
                        assert!(seen.insert(s, ()).is_none(), "seq {s} twice");
                    }
                }
            }
        }
        let max = *seen.keys().last().unwrap();
        assert_eq!(seen.len() as u64, max, "no hole in 1..={max}");
        gaps
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
        let gaps = assert_no_silent_gap(&events);
        let frames = events
            .iter()
            .filter(|e| matches!(e.payload, Some(pb::event::Payload::Net(_))))
            .count() as u64;
        assert_eq!(frames, m.recorded);
        assert_eq!(m.gaps as usize, gaps);
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

    /// Fails every write after the first `ok` batches.
    struct FailingSink {
        inner: MemorySink,
        ok: AtomicUsize,
        fail: AtomicBool,
    }
    impl CaptureSink for FailingSink {
        fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
            if self.fail.load(Ordering::Acquire) {
                // Half of the batch made it.
                let half = batch.len() / 2;
                self.inner.submit(&batch[..half])?;
                return Err(SinkError {
                    written: half,
                    error: CaptureError::Io(std::io::Error::other("disk on fire")),
                });
            }
            self.ok.fetch_add(1, Ordering::AcqRel);
            self.inner.submit(batch)
        }
    }

    #[test]
    fn every_sink_error_becomes_a_gap_event() {
        let sink = Arc::new(FailingSink {
            inner: MemorySink::new(),
            ok: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        });
        let metrics = Arc::new(Metrics::default());
        let tee = start(TeeConfig::new("vm-1"), sink.clone(), metrics.clone());
        for i in 0..20u32 {
            tee.record_frame("net0", 0, pb::Direction::Rx, &i.to_le_bytes());
        }
        tee.sync().unwrap();
        sink.fail.store(true, Ordering::Release);
        for i in 0..20u32 {
            tee.record_frame("net0", 0, pb::Direction::Rx, &i.to_le_bytes());
        }
        std::thread::sleep(Duration::from_millis(100));
        sink.fail.store(false, Ordering::Release);
        tee.record_frame("net0", 0, pb::Direction::Rx, b"after");
        tee.shutdown();
        let events = sink.inner.take();
        assert!(metrics.snapshot().sink_errors > 0);
        let gaps = assert_no_silent_gap(&events);
        assert!(gaps > 0);
        let reasons: Vec<String> = events
            .iter()
            .filter_map(|e| match &e.payload {
                Some(pb::event::Payload::Lifecycle(l)) => l.gap.as_ref().map(|g| g.reason.clone()),
                _ => None,
            })
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains("disk on fire")),
            "{reasons:?}"
        );
    }

    #[test]
    fn sync_waits_until_earlier_records_are_durable() {
        // Counts syncs and checks, at each one, that the records before it
        // were handed to the sink.
        struct CountingSink {
            inner: MemorySink,
            synced_len: Mutex<Vec<usize>>,
        }
        impl CaptureSink for CountingSink {
            fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
                std::thread::sleep(Duration::from_millis(5));
                self.inner.submit(batch)
            }
            fn sync(&self) -> Result<(), CaptureError> {
                self.synced_len.lock().unwrap().push(self.inner.len());
                Ok(())
            }
        }
        let sink = Arc::new(CountingSink {
            inner: MemorySink::new(),
            synced_len: Mutex::new(Vec::new()),
        });
        let metrics = Arc::new(Metrics::default());
        let tee = start(TeeConfig::new("vm-1"), sink.clone(), metrics.clone());
        for i in 0..300u32 {
            tee.record_frame("net0", 0, pb::Direction::Rx, &i.to_le_bytes());
        }
        tee.sync().unwrap();
        let synced = sink.synced_len.lock().unwrap().clone();
        assert!(!synced.is_empty());
        assert!(*synced.last().unwrap() >= 300, "{synced:?}");
        assert!(metrics.snapshot().syncs >= 1);
        tee.shutdown();
    }

    #[test]
    fn file_sink_round_trips_through_framing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = Arc::new(FileSink::open(&path, "vm-2", 0).unwrap());
        let tee = start(TeeConfig::new("vm-2"), sink, Arc::default());
        tee.record_lifecycle(pb::LifecycleKind::Boot, "start");
        tee.record_frame("net0", 1, pb::Direction::Tx, b"hello");
        let big = vec![0x42u8; 100 << 10];
        tee.record_block_with("vda", 0, pb::BlockOp::Write, 8, big.len() as u32, |d| {
            d.copy_from_slice(&big);
            pb::BlockStatus::Ok
        });
        tee.shutdown();
        let got: Vec<_> = vmr_proto::framing::EventReader::new(File::open(&path).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].seq, 2);
        assert_eq!(got[1].instance_id, "vm-2");
        match &got[2].payload {
            Some(pb::event::Payload::Block(b)) => assert_eq!(b.data, big),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_write_checksummed_while_copied_reads_back_through_the_frame_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = Arc::new(FileSink::open(&path, "vm-3", 0).unwrap());
        let tee = start(TeeConfig::new("vm-3"), sink, Arc::default());
        let src: Vec<u8> = (0..(1u32 << 20) + 777)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let mut offsets = Vec::new();
        let mut on_disk = Vec::new();
        let (status, seq) = tee.record_write(
            "vda",
            0,
            pb::BlockOp::Write,
            0,
            src.len() as u32,
            |at, chunk| {
                offsets.push(at);
                chunk.copy_from_slice(&src[at as usize..at as usize + chunk.len()]);
                true
            },
            |data| {
                on_disk = data.to_vec();
                pb::BlockStatus::Ok
            },
        );
        assert_eq!((status, seq), (pb::BlockStatus::Ok, Some(1)));
        assert_eq!(offsets.len(), src.len().div_ceil(CRC_CHUNK));
        assert!(offsets.windows(2).all(|w| w[1] - w[0] == CRC_CHUNK as u64));
        // A copy that fails: IOERR, the disk is not written.
        let mut wrote = false;
        let (status, _) = tee.record_write(
            "vda",
            0,
            pb::BlockOp::Write,
            8,
            4 * CRC_CHUNK as u32,
            |at, _| at < CRC_CHUNK as u64,
            |_| {
                wrote = true;
                pb::BlockStatus::Ok
            },
        );
        assert_eq!(status, pb::BlockStatus::Ioerr);
        assert!(!wrote);
        tee.shutdown();
        // The reader checks each frame's CRC: the one combined from the
        // chunks' CRCs passes, and the payload is what the disk got.
        let got: Vec<_> = vmr_proto::framing::EventReader::new(File::open(&path).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 2);
        match &got[0].payload {
            Some(pb::event::Payload::Block(b)) => {
                assert_eq!(b.data, src);
                assert_eq!(b.data, on_disk);
            }
            other => panic!("unexpected {other:?}"),
        }
        match &got[1].payload {
            Some(pb::event::Payload::Block(b)) => {
                assert_eq!(b.status, pb::BlockStatus::Ioerr as i32)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_unclean_stop_is_reported_as_a_gap_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("dev.state");
        let seq = Arc::new(AtomicSeq::default());
        let mut cfg = TeeConfig::new("vm-1");
        cfg.state = Some(state.clone());
        // A clean run: no gap on the next start.
        let sink = Arc::new(MemorySink::new());
        let tee = Tee::start(cfg.clone(), sink.clone(), seq.clone(), Arc::default()).unwrap();
        for _ in 0..5 {
            tee.record_frame("net0", 0, pb::Direction::Rx, b"x");
        }
        tee.shutdown();
        let tee = Tee::start(cfg.clone(), sink.clone(), seq.clone(), Arc::default()).unwrap();
        tee.record_frame("net0", 0, pb::Direction::Rx, b"y");
        tee.sync().unwrap();
        // The run "dies": numbers were taken (7, 8) but never recorded, and
        // it never shuts down.
        seq.next_n(2);
        let before = sink.take();
        assert_eq!(before.len(), 6);
        let stale = tee.clone();
        let tee = Tee::start(cfg, sink.clone(), seq.clone(), Arc::default()).unwrap();
        tee.shutdown();
        let after = sink.take();
        stale.shutdown();
        let g = match &after[0].payload {
            Some(pb::event::Payload::Lifecycle(l)) => l.gap.clone().unwrap(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!((g.first_seq, g.count), (7, 2), "{g:?}");
        assert!(g.reason.contains("unclean"));
    }
}
