//! [`BlockBackend`]: `VhostUserBackend` for virtio-blk.
//!
//! One worker thread per queue. Each kick is processed synchronously: the
//! worker pops every available chain, does the I/O and completes it before it
//! releases the queue, and `stop_vring` (sent by the front-end's
//! `GET_VRING_BASE`) takes the same per-queue lock, so when the front-end
//! receives the ring base every request up to it has completed and none after
//! it has been touched.
//!
//! With the tee on, a write's payload is copied once from guest memory into
//! its capture record's buffer, and the disk is written from that buffer:
//! the recorded payload is exactly what the disk got, even if the guest
//! changes its buffers while the request is in flight. Writes that are not
//! recorded go from guest memory to the disk without a copy.
//!
//! A recorded write of at least 64 KiB is copied (and checksummed) on the
//! device thread and written to the disk by the queue's image writer
//! thread (`writer.rs`) while the device thread copies the next one. The
//! device thread puts such a request in the used ring once the writer has
//! written it and queued its record. It waits for every such write before
//! it handles any other request of the queue and before it releases the
//! queue, so the completion and draining guarantees above still hold. A
//! write whose copy fails goes through the writer too, so its `IOERR`
//! record is numbered in request order. If the writer thread dies, the
//! writes it held complete with `IOERR` and are recorded as such (in
//! request order), the failure is logged and counted
//! (`writer_failures`), and the queue writes its later large writes on
//! the device thread.
//!
//! A FLUSH completes only after the tee made every record queued before it
//! durable ([`crate::capture::Tee::sync`]) and the disk flushed: the disk is
//! never ahead of the recording after a power loss.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmr_proto::pb;

use super::disk::{Disk, DiskError};
use super::hooks::Hooks;
use super::request::{self, Limits, Request, RequestType, Segment};
use super::writer::{self, Done, InFlight, Writer};
use crate::capture::replay::{self, Expectations, Output, Outputs, ReplayClock};
use crate::capture::Tee;
use crate::fault::{BlockFault, FaultCtx, FaultHook};
use crate::filter::BlockFilter;
use crate::metrics::Metrics;
use crate::{GuestMem, GuestMemAtomic, Mode};

/// Errors building a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk")]
    Disk(#[from] DiskError),
    #[error("number of queues must be between 1 and 64, got {0}")]
    Queues(usize),
    #[error("queue size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("serial is longer than 20 bytes")]
    Serial,
    #[error("replay mode needs an overlay so the image stays untouched")]
    ReplayNeedsOverlay,
}

/// Settings of a block backend.
#[derive(Clone)]
pub struct BlockConfig {
    /// Device name written into records.
    pub device: String,
    /// Answer to GET_ID (at most 20 bytes).
    pub serial: String,
    /// Request queues.
    pub num_queues: usize,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// Capture or replay.
    pub mode: Mode,
    /// Which operations are recorded.
    pub filter: BlockFilter,
    /// Request limits.
    pub limits: Limits,
    /// Replay mode: the live output stream of the clone's requests.
    pub outputs: Option<Arc<Outputs>>,
    /// Replay mode: the original's records each request is compared with.
    pub expect: Option<Arc<Expectations>>,
    /// Replay mode: the clock that time-based fault rules wait for.
    pub clock: Option<Arc<ReplayClock>>,
}

impl BlockConfig {
    /// One queue of 256, device `vda`, capture mode, everything recorded.
    pub fn new(device: impl Into<String>) -> Self {
        let device = device.into();
        Self {
            serial: device.clone(),
            device,
            num_queues: 1,
            queue_size: 256,
            mode: Mode::Capture,
            filter: BlockFilter::all(),
            limits: Limits::default(),
            outputs: None,
            expect: None,
            clock: None,
        }
    }
}

/// Per-queue scratch state, reused by every request.
struct Worker {
    segs: Vec<Segment>,
    /// Host addresses of a write's guest buffers (writes in place).
    iov: request::IoVecs,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// Replay mode, for the request being handled: the hash of the data
    /// written or read, and the clone's record number.
    note_hash: Option<[u8; 16]>,
    note_seq: Option<u64>,
    /// The image writer of recorded large writes (started on first use).
    writer: Option<Writer>,
    /// The queue's writer died: its large writes are written by the
    /// device thread.
    writer_failed: bool,
    /// Writes completed while a request waited for the writer, for the
    /// used ring.
    drained: Vec<u16>,
}

struct Inner {
    config: BlockConfig,
    disk: Arc<Disk>,
    mem: Mutex<Option<GuestMemAtomic>>,
    event_idx: AtomicBool,
    workers: Vec<Mutex<Worker>>,
    tee: Option<Tee>,
    faults: Option<Arc<dyn FaultHook>>,
    metrics: Arc<Metrics>,
    hooks: Arc<Hooks>,
}

/// The virtio-blk vhost-user backend. Cheap to clone (shared state).
#[derive(Clone)]
pub struct BlockBackend {
    inner: Arc<Inner>,
}

impl BlockBackend {
    /// Builds a backend over `disk`. `tee` records requests (None: tee off);
    /// `faults` may fail requests (replay).
    pub fn new(
        config: BlockConfig,
        disk: Disk,
        tee: Option<Tee>,
        faults: Option<Arc<dyn FaultHook>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BlockError> {
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(BlockError::Queues(config.num_queues));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 2 {
            return Err(BlockError::QueueSize(config.queue_size));
        }
        if config.serial.len() > request::ID_LEN as usize {
            return Err(BlockError::Serial);
        }
        // A clone's writes must never reach the image it was cloned from.
        if config.mode == Mode::Replay && disk.writes_in_place() {
            return Err(BlockError::ReplayNeedsOverlay);
        }
        let workers = (0..config.num_queues)
            .map(|_| {
                Mutex::new(Worker {
                    segs: Vec::with_capacity(config.queue_size as usize),
                    iov: request::IoVecs::default(),
                    buf: Vec::new(),
                    scratch: Vec::new(),
                    note_hash: None,
                    note_seq: None,
                    writer: None,
                    writer_failed: false,
                    drained: Vec::with_capacity(writer::MAX_IN_FLIGHT),
                })
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                disk: Arc::new(disk),
                mem: Mutex::new(None),
                event_idx: AtomicBool::new(false),
                workers,
                tee,
                faults,
                metrics,
                hooks: Arc::default(),
            }),
        })
    }

    /// The fault points of the large-write path.
    #[cfg(test)]
    pub(crate) fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    /// The metrics of this backend.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The device name.
    pub fn device(&self) -> &str {
        &self.inner.config.device
    }

    /// The disk served.
    pub fn disk(&self) -> &Disk {
        &self.inner.disk
    }

    /// The tee, if recording.
    pub fn tee(&self) -> Option<&Tee> {
        self.inner.tee.as_ref()
    }

    /// Runs `f` while no queue worker is processing a batch (every request
    /// popped so far has completed and none is started until `f` returns).
    pub fn quiesce<R>(&self, f: impl FnOnce(&Disk, Option<&Tee>) -> R) -> R {
        let _held: Vec<_> = self
            .inner
            .workers
            .iter()
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        f(&self.inner.disk, self.inner.tee.as_ref())
    }

    /// The virtio-blk configuration space.
    pub fn config_space(&self) -> [u8; 60] {
        let c = &self.inner.config;
        let mut cfg = [0u8; 60];
        cfg[0..8].copy_from_slice(&(self.inner.disk.size() / 512).to_le_bytes());
        cfg[8..12].copy_from_slice(&c.limits.max_data.to_le_bytes()); // size_max
        let seg_max = (c.queue_size as u32).saturating_sub(2).max(1);
        cfg[12..16].copy_from_slice(&seg_max.to_le_bytes());
        cfg[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        cfg[34..36].copy_from_slice(&(c.num_queues as u16).to_le_bytes());
        let max_sectors = c.limits.max_data / 512;
        cfg[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        cfg[40..44].copy_from_slice(&c.limits.max_ranges.to_le_bytes());
        cfg[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard alignment
        cfg[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        cfg[52..56].copy_from_slice(&c.limits.max_ranges.to_le_bytes());
        cfg[56] = 1; // write_zeroes_may_unmap
        cfg
    }

    fn process_queue(&self, vring: &VringRwLock<GuestMemAtomic>, q: u16) -> io::Result<()> {
        let inner = &*self.inner;
        let Some(atomic) = inner.mem.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let mem: Arc<GuestMem> = atomic.memory().into_inner();
        let mut worker = inner.workers[q as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let event_idx = inner.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut completed = 0usize;
        let mut signalled = 0usize;
        loop {
            let queue = state.get_queue_mut();
            // A driver that publishes an avail index more than a ring ahead
            // has a corrupt ring: refuse it instead of spinning on it.
            if queue.ready() {
                let avail = queue
                    .avail_idx(&*mem, Ordering::Acquire)
                    .map_err(io::Error::other)?;
                if avail.0.wrapping_sub(queue.next_avail()) > queue.size() {
                    Metrics::add(&inner.metrics.malformed, 1);
                    tracing::warn!(device = %inner.config.device, queue = q, "avail index out of range; ignoring the kick");
                    break;
                }
            }
            if event_idx {
                queue
                    .disable_notification(&*mem)
                    .map_err(io::Error::other)?;
            }
            let mut popped = 0usize;
            loop {
                let queue = state.get_queue_mut();
                while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                    let head = chain.head_index();
                    popped += 1;
                    let used = self.handle_chain(&mem, chain, q, &mut worker);
                    for h in worker.drained.drain(..) {
                        queue.add_used(&*mem, h, 1).map_err(io::Error::other)?;
                        completed += 1;
                    }
                    if let Some(used) = used {
                        queue
                            .add_used(&*mem, head, used)
                            .map_err(io::Error::other)?;
                        completed += 1;
                    }
                    // Writes the writer has finished meanwhile.
                    while let Some(h) = self.complete_write(&mem, &mut worker, q, false) {
                        queue.add_used(&*mem, h, 1).map_err(io::Error::other)?;
                        completed += 1;
                    }
                }
                if worker.writer.as_ref().is_none_or(|w| w.in_flight() == 0) {
                    break;
                }
                // Nothing more to start: let the driver see what is done
                // (it may send more meanwhile), then wait for the oldest
                // write in flight.
                if completed > signalled {
                    signal_if_needed(&mut state, &mem)?;
                    signalled = completed;
                }
                if let Some(h) = self.complete_write(&mem, &mut worker, q, true) {
                    state
                        .get_queue_mut()
                        .add_used(&*mem, h, 1)
                        .map_err(io::Error::other)?;
                    completed += 1;
                }
            }
            if !event_idx {
                break;
            }
            let queue = state.get_queue_mut();
            let more = queue.enable_notification(&*mem).map_err(io::Error::other)?;
            // A stopped ring (GET_VRING_BASE) still has requests available
            // but must not be touched until it is restarted.
            if !more || popped == 0 || !queue.ready() {
                break;
            }
        }
        if completed > signalled {
            signal_if_needed(&mut state, &mem)?;
        }
        Ok(())
    }

    /// Completes the oldest write in flight on the queue's writer (waiting
    /// for it with `wait`): writes its status for the guest and returns
    /// its head for the used ring.
    fn complete_write(&self, mem: &GuestMem, w: &mut Worker, q: u16, wait: bool) -> Option<u16> {
        self.finish_one(mem, w.writer.as_mut()?, q, wait)
    }

    /// Hands a recorded large write to the queue's image writer: copies
    /// its payload into the record and lets the writer write the disk.
    /// Returns false (nothing done) when no writer can take it.
    fn defer_write(
        &self,
        mem: &GuestMem,
        req: &Request,
        head: u16,
        q: u16,
        w: &mut Worker,
    ) -> bool {
        let inner = &*self.inner;
        let Some(tee) = inner.tee.as_ref() else {
            return false;
        };
        // A writer that died is not restarted: the queue's large writes
        // are written by the device thread from then on.
        if let Some(writer) = w.writer.as_mut().filter(|x| x.dead()) {
            while let Some(h) = self.finish_one(mem, writer, q, true) {
                w.drained.push(h);
            }
            w.writer = None;
            w.writer_failed = true;
        }
        if w.writer_failed {
            return false;
        }
        if w.writer.is_none() {
            w.writer = Writer::start(
                inner.disk.clone(),
                tee.clone(),
                inner.metrics.clone(),
                inner.hooks.clone(),
                q,
            );
        }
        let Some(writer) = w.writer.as_mut() else {
            return false;
        };
        while !writer.has_room() {
            if let Some(h) = self.finish_one(mem, writer, q, true) {
                w.drained.push(h);
            }
        }
        let segs = &w.segs;
        let hooks = &inner.hooks;
        // A copy that fails still goes to the writer (which leaves the disk
        // alone), so its IOERR record is numbered after the writes before it.
        let pending = tee.copy_write(
            &inner.config.device,
            q,
            req.rtype.op(),
            req.sector,
            req.data_len,
            |at, chunk| {
                let from = u64::from(request::HEADER_LEN) + at;
                !hooks.copy_fails(req.sector) && request::gather(mem, segs, from, chunk).is_ok()
            },
        );
        let off = req.sector.checked_mul(512);
        let fl = InFlight {
            head,
            status: req.status,
            sector: req.sector,
            len: req.data_len,
        };
        hooks.before_submit(req.sector, || writer.thread_ended());
        if let Err(pending) = writer.submit(pending, off, fl) {
            // The writer died: the writes it held complete (and are
            // recorded) first, then this one is written here.
            while let Some(h) = self.finish_one(mem, writer, q, true) {
                w.drained.push(h);
            }
            let status = if pending.copied() {
                writer::write_at(
                    &inner.disk,
                    &inner.metrics,
                    off,
                    req.sector,
                    pending.data(),
                    &mut w.scratch,
                )
            } else {
                VIRTIO_BLK_S_IOERR
            };
            tee.finish_write(pending, block_status(status));
            let _ = mem.write_obj(status as u8, req.status);
            Metrics::add(&inner.metrics.requests, 1);
            if status == VIRTIO_BLK_S_IOERR {
                Metrics::add(&inner.metrics.io_errors, 1);
            }
            w.drained.push(head);
            w.writer = None;
            w.writer_failed = true;
        }
        hooks.deferred();
        true
    }

    /// Completes the writer's oldest write (waiting for it with `wait`):
    /// writes its status for the guest and returns its head. A write the
    /// writer lost by dying completes with `IOERR` and gets an `IOERR`
    /// record here, so the capture never silently lacks a request.
    fn finish_one(&self, mem: &GuestMem, writer: &mut Writer, q: u16, wait: bool) -> Option<u16> {
        let metrics = &self.inner.metrics;
        let (req, done) = writer.complete(wait)?;
        let status = match done {
            Done::Status(s) => s,
            Done::Lost => {
                self.record(
                    q,
                    pb::BlockOp::Write,
                    req.sector,
                    req.len,
                    None,
                    None,
                    VIRTIO_BLK_S_IOERR,
                );
                VIRTIO_BLK_S_IOERR
            }
        };
        Metrics::add(&metrics.requests, 1);
        if status == VIRTIO_BLK_S_IOERR {
            Metrics::add(&metrics.io_errors, 1);
        }
        // A status that cannot be written still completes the chain (the
        // driver then sees no status, as for any chain whose status byte
        // is out of reach).
        let _ = mem.write_obj(status as u8, req.status);
        Some(req.head)
    }

    /// Handles one chain; returns the used length, or None when the
    /// queue's image writer completes it later. Writes the writer finished
    /// while this chain waited for it go to `w.drained`.
    fn handle_chain<M>(
        &self,
        mem: &Arc<GuestMem>,
        chain: virtio_queue::DescriptorChain<M>,
        q: u16,
        w: &mut Worker,
    ) -> Option<u32>
    where
        M: std::ops::Deref<Target = GuestMem>,
    {
        let inner = &*self.inner;
        let head = chain.head_index();
        let req = match request::parse_chain(&**mem, chain, &mut w.segs, &inner.config.limits) {
            Ok(r) => r,
            Err(error) => {
                Metrics::add(&inner.metrics.malformed, 1);
                tracing::warn!(device = %inner.config.device, queue = q, %error, "malformed request");
                if error.has_status() {
                    if let Some(status) = w.segs.last().filter(|s| s.write && s.len > 0) {
                        let at = vm_memory::Address::unchecked_add(
                            &status.addr,
                            u64::from(status.len) - 1,
                        );
                        if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, at).is_ok() {
                            return Some(1);
                        }
                    }
                }
                return Some(0);
            }
        };
        if self.writes_through_writer(&req) && self.defer_write(mem, &req, head, q, w) {
            return None;
        }
        // Any other request waits for the writes in flight, so their
        // records come first and a FLUSH covers them.
        if let Some(writer) = w.writer.as_mut() {
            while let Some(h) = self.finish_one(mem, writer, q, true) {
                w.drained.push(h);
            }
        }
        w.note_hash = None;
        w.note_seq = None;
        let (status, written) = self.execute(mem, &req, q, w);
        if mem.write_obj(status as u8, req.status).is_err() {
            return Some(0);
        }
        if inner.config.mode == Mode::Replay {
            self.replay_done(&req, status, w);
        }
        Metrics::add(&inner.metrics.requests, 1);
        if status == VIRTIO_BLK_S_IOERR {
            Metrics::add(&inner.metrics.io_errors, 1);
        }
        Some(written + 1)
    }

    /// Whether a request is a recorded write large enough for the image
    /// writer.
    fn writes_through_writer(&self, req: &Request) -> bool {
        let inner = &*self.inner;
        matches!(req.rtype, RequestType::Out)
            && inner.config.mode == Mode::Capture
            && inner.tee.is_some()
            && inner.config.filter.matches(req.rtype.op())
            && req.data_len >= writer::ASYNC_WRITE_MIN
    }

    /// Whether a write is not recorded, so it can go from guest memory to
    /// the disk without a copy.
    fn writes_from_guest(&self, op: pb::BlockOp) -> bool {
        let inner = &*self.inner;
        inner.config.mode == Mode::Capture
            && inner.disk.writes_in_place()
            && (inner.tee.is_none() || !inner.config.filter.matches(op))
    }

    fn clock_ns(&self) -> u64 {
        self.inner.config.clock.as_ref().map_or(0, |c| c.now_ns())
    }

    /// Replay mode, after a request completed: compares it with the
    /// original's record and reports it on the output stream.
    fn replay_done(&self, req: &Request, status: u32, w: &Worker) {
        let inner = &*self.inner;
        if matches!(req.rtype, RequestType::Unsupported(_)) {
            return;
        }
        let op = req.rtype.op();
        let st = block_status(status);
        let outcome = inner
            .config
            .expect
            .as_ref()
            .map(|e| e.complete(op, req.sector, req.data_len, w.note_hash, st));
        let Some(o) = inner.config.outputs.as_ref().filter(|o| o.active()) else {
            return;
        };
        let data = (op == pb::BlockOp::Write && o.wants_data() && w.note_hash.is_some())
            .then(|| w.buf[..req.data_len as usize].to_vec());
        o.emit(Output::Block {
            device: inner.config.device.clone(),
            op: replay::op_name(op),
            sector: req.sector,
            len: req.data_len,
            status: replay::status_name(st),
            hash: w.note_hash.map(|h| h.to_vec()),
            answers: outcome.and_then(|o| o.answers),
            matched: outcome.and_then(|o| o.matched),
            clock_ns: self.clock_ns(),
            mono_ns: crate::now_ns().1,
            clone_seq: w.note_seq,
            data,
        });
    }

    /// Runs a request; returns the status and bytes written to the guest
    /// (before the status byte).
    fn execute(&self, mem: &GuestMem, req: &Request, q: u16, w: &mut Worker) -> (u32, u32) {
        let inner = &*self.inner;
        let op = req.rtype.op();
        let len = req.data_len;
        let replay = inner.config.mode == Mode::Replay;
        if let Some(f) = inner.faults.as_ref().filter(|_| replay) {
            if !matches!(req.rtype, RequestType::Unsupported(_)) {
                let ctx = FaultCtx {
                    device: &inner.config.device,
                    seq: inner
                        .config
                        .expect
                        .as_ref()
                        .and_then(|e| e.peek(op, req.sector, len)),
                    clock_ns: self.clock_ns(),
                };
                let fired = f.block(&ctx, op, req.sector, len);
                if fired.fault == BlockFault::IoError {
                    Metrics::add(&inner.metrics.faults, 1);
                    if let Some(o) = inner.config.outputs.as_ref().filter(|o| o.active()) {
                        o.emit(Output::Fault {
                            device: inner.config.device.clone(),
                            rule: fired.rule,
                            kind: "io-error",
                            target: "block",
                            seq: ctx.seq,
                            clock_ns: ctx.clock_ns,
                        });
                    }
                    w.note_seq =
                        self.record(q, op, req.sector, len, None, None, VIRTIO_BLK_S_IOERR);
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
            }
        }
        let off = req.sector.checked_mul(512);
        let (status, written) = match req.rtype {
            RequestType::In => {
                w.buf.resize(len as usize, 0);
                let r = off
                    .ok_or(DiskError::OutOfRange)
                    .and_then(|off| inner.disk.read(off, &mut w.buf[..len as usize]));
                match r {
                    Ok(()) => {
                        if request::scatter(mem, &w.segs, &w.buf[..len as usize]).is_err() {
                            (VIRTIO_BLK_S_IOERR, 0)
                        } else {
                            Metrics::add(&inner.metrics.bytes, u64::from(len));
                            if replay {
                                w.note_hash = Some(replay::hash128(&w.buf[..len as usize]));
                            }
                            w.note_seq = self.record(
                                q,
                                op,
                                req.sector,
                                len,
                                None,
                                Some(&w.buf[..len as usize]),
                                VIRTIO_BLK_S_OK,
                            );
                            return (VIRTIO_BLK_S_OK, len);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, sector = req.sector, "read failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            RequestType::Out if self.writes_from_guest(op) => {
                // Not recorded: the guest's buffers go straight to pwritev.
                let r = match (
                    request::host_iov(mem, &w.segs, request::HEADER_LEN, len, &mut w.iov),
                    off,
                ) {
                    // SAFETY: `host_iov` resolved every entry inside a mapped
                    // guest memory region; `mem` keeps the mapping alive
                    // until this call returns.
                    (Ok(()), Some(off)) => unsafe { inner.disk.write_iov(off, &mut w.iov.0) },
                    _ => Err(DiskError::OutOfRange),
                };
                return (self.write_status(r, req.sector, len), 0);
            }
            RequestType::Out
                if !replay && inner.tee.is_some() && inner.config.filter.matches(op) =>
            {
                // Copied once into the record's buffer; the disk is written
                // from that copy.
                let tee = inner.tee.as_ref().expect("checked above");
                let segs = &w.segs;
                let scratch = &mut w.scratch;
                let (status, _) = tee.record_write(
                    &inner.config.device,
                    q,
                    op,
                    req.sector,
                    len,
                    |at, chunk| {
                        let from = u64::from(request::HEADER_LEN) + at;
                        request::gather(mem, segs, from, chunk).is_ok()
                    },
                    |data| {
                        let r = match off {
                            Some(off) => inner.disk.write(off, data, scratch),
                            None => Err(DiskError::OutOfRange),
                        };
                        block_status(self.write_status(r, req.sector, len))
                    },
                );
                return (virtio_status(status), 0);
            }
            RequestType::Out => {
                w.buf.resize(len as usize, 0);
                let gathered = request::gather(
                    mem,
                    &w.segs,
                    u64::from(request::HEADER_LEN),
                    &mut w.buf[..len as usize],
                );
                let r = match (gathered, off) {
                    (Ok(()), Some(off)) => {
                        inner
                            .disk
                            .write(off, &w.buf[..len as usize], &mut w.scratch)
                    }
                    _ => Err(DiskError::OutOfRange),
                };
                let status = self.write_status(r, req.sector, len);
                if replay {
                    // A clone's write is recorded from the bytes its disk got.
                    w.note_hash = Some(replay::hash128(&w.buf[..len as usize]));
                    self.record_buffer(q, op, req.sector, len, status, w);
                }
                return (status, 0);
            }
            RequestType::Flush => {
                // Write ahead: the records before this FLUSH are durable
                // before the disk's data is, and before the guest hears back.
                let captured = match &inner.tee {
                    Some(tee) => tee.sync().map_err(|error| {
                        tracing::warn!(device = %inner.config.device, %error, "capture not durable; failing the flush");
                    }),
                    None => Ok(()),
                };
                match (captured, inner.disk.flush()) {
                    (Ok(()), Ok(())) => (VIRTIO_BLK_S_OK, 0),
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestType::GetId => {
                let mut id = [0u8; request::ID_LEN as usize];
                let s = inner.config.serial.as_bytes();
                id[..s.len()].copy_from_slice(s);
                match request::scatter(mem, &w.segs, &id[..len as usize]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                w.buf.resize(len as usize, 0);
                let mut status = VIRTIO_BLK_S_OK;
                if request::gather(
                    mem,
                    &w.segs,
                    u64::from(request::HEADER_LEN),
                    &mut w.buf[..len as usize],
                )
                .is_err()
                {
                    status = VIRTIO_BLK_S_IOERR;
                }
                let n = len / request::RANGE_LEN;
                for i in 0..n as usize {
                    if status != VIRTIO_BLK_S_OK {
                        break;
                    }
                    let Some((sector, count, _flags)) = request::range_at(&w.buf, i) else {
                        status = VIRTIO_BLK_S_IOERR;
                        break;
                    };
                    let r = sector
                        .checked_mul(512)
                        .ok_or(DiskError::OutOfRange)
                        .and_then(|o| inner.disk.zero(o, u64::from(count) * 512, &mut w.scratch));
                    if r.is_err() {
                        status = VIRTIO_BLK_S_IOERR;
                    }
                }
                self.record_buffer(q, op, req.sector, len, status, w);
                return (status, 0);
            }
            RequestType::Unsupported(_) => return (VIRTIO_BLK_S_UNSUPP, 0),
        };
        w.note_seq = self.record(q, op, req.sector, len, None, None, status);
        (status, written)
    }

    /// The status of a write, counting the bytes of a successful one.
    fn write_status(&self, r: Result<(), DiskError>, sector: u64, len: u32) -> u32 {
        match r {
            Ok(()) => {
                Metrics::add(&self.inner.metrics.bytes, u64::from(len));
                VIRTIO_BLK_S_OK
            }
            Err(error) => {
                tracing::debug!(%error, sector, "write failed");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// Records a request whose payload is the first `len` bytes of the
    /// worker's buffer.
    fn record_buffer(
        &self,
        q: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        status: u32,
        w: &mut Worker,
    ) {
        let data = std::mem::take(&mut w.buf);
        w.note_seq = self.record(
            q,
            op,
            sector,
            len,
            Some(&data[..len as usize]),
            None,
            status,
        );
        w.buf = data;
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn record(
        &self,
        q: u16,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        data: Option<&[u8]>,
        read: Option<&[u8]>,
        status: u32,
    ) -> Option<u64> {
        let inner = &*self.inner;
        let tee = inner.tee.as_ref()?;
        if !inner.config.filter.matches(op) {
            return None;
        }
        tee.record_block(
            &inner.config.device,
            q,
            op,
            sector,
            len,
            data,
            read,
            block_status(status),
        )
    }
}

/// Interrupts the driver if the used ring's notification rules ask for it.
fn signal_if_needed(
    state: &mut vhost_user_backend::VringState<GuestMemAtomic>,
    mem: &GuestMem,
) -> io::Result<()> {
    if state
        .get_queue_mut()
        .needs_notification(mem)
        .map_err(io::Error::other)?
    {
        state.signal_used_queue()?;
    }
    Ok(())
}

/// The virtio-blk status for a record's status.
fn virtio_status(status: pb::BlockStatus) -> u32 {
    match status {
        pb::BlockStatus::Ok => VIRTIO_BLK_S_OK,
        pb::BlockStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
        pb::BlockStatus::Ioerr => VIRTIO_BLK_S_IOERR,
    }
}

/// The record's status for a virtio-blk status.
fn block_status(status: u32) -> pb::BlockStatus {
    match status {
        VIRTIO_BLK_S_OK => pb::BlockStatus::Ok,
        VIRTIO_BLK_S_UNSUPP => pb::BlockStatus::Unsupported,
        _ => pb::BlockStatus::Ioerr,
    }
}

/// Feature bits offered by the block backend.
pub fn block_features(read_only: bool, num_queues: usize) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// Protocol features offered by both backends (with the `postcopy` feature,
/// also `PAGEFAULT`, so a front-end can restore guest memory lazily).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    let f = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    #[cfg(feature = "postcopy")]
    let f = f | VhostUserProtocolFeatures::PAGEFAULT;
    f
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = VringRwLock<GuestMemAtomic>;

    fn num_queues(&self) -> usize {
        self.inner.config.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.inner.config.queue_size as usize
    }

    fn features(&self) -> u64 {
        block_features(self.inner.disk.read_only(), self.inner.config.num_queues)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        let mut out = cfg[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        *self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.config.num_queues)
            .map(|i| 1u64 << i)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        Some((c, n))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Wait for the worker to finish the batch it may be processing: all
        // requests it popped are completed when this lock is granted.
        if let Some(w) = self.inner.workers.get(queue_index as usize) {
            drop(w.lock().unwrap_or_else(|p| p.into_inner()));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // Each thread owns exactly one queue: thread i serves queue i, and
        // `device_event` is the index within the thread's vrings.
        let q = thread_id as u16;
        if q as usize >= self.inner.config.num_queues {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        self.process_queue(vring, q)
    }
}

impl crate::server::Serve for BlockBackend {}

/// Which mode a block backend runs in (re-exported for binaries).
pub fn check_mode(mode: Mode, has_overlay: bool) -> Result<(), BlockError> {
    if mode == Mode::Replay && !has_overlay {
        return Err(BlockError::ReplayNeedsOverlay);
    }
    Ok(())
}
