//! [`NetBackend`]: `VhostUserBackend` for virtio-net with one queue pair
//! (queue 0 receive, queue 1 transmit), served by one thread that also
//! watches the TAP device and the replay source.
//!
//! Every frame carries the 12-byte `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1);
//! no offloads are offered, so the header is all zeros except
//! `num_buffers = 1` on receive.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmr_proto::pb;

use super::replay::{HeldTx, Injected, ReplaySource};
use super::tap::Tap;
use crate::blk::backend::protocol_features;
use crate::blk::request::{self, Segment};
use crate::capture::replay::{Output, Outputs};
use crate::capture::Tee;
use crate::fault::{FaultCtx, FaultHook, Fired, FrameFault};
use crate::filter::NetFilter;
use crate::metrics::Metrics;
use crate::{GuestMem, GuestMemAtomic, Mode};

/// Size of the virtio-net header with VERSION_1.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame handled (jumbo frames included).
pub const MAX_FRAME: usize = 65550;
const RX: u16 = 0;
const TX: u16 = 1;
const TAP_EVENT: u16 = 3;
const REPLAY_EVENT: u16 = 4;

/// Errors building a net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("queue size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("MTU must be between 68 and 65535, got {0}")]
    Mtu(u16),
    #[error("capture mode needs a TAP device")]
    NoTap,
    #[error("replay mode needs a replay source")]
    NoSource,
}

/// Settings of a net backend.
#[derive(Clone)]
pub struct NetConfig {
    /// Device name written into records.
    pub device: String,
    /// MAC in the config space.
    pub mac: [u8; 6],
    /// MTU in the config space.
    pub mtu: u16,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// Capture or replay.
    pub mode: Mode,
    /// Which frames are recorded.
    pub filter: NetFilter,
    /// Replay mode: the live output stream (deliveries, transmissions,
    /// faults).
    pub outputs: Option<Arc<Outputs>>,
}

impl NetConfig {
    /// MAC 52:54:00:12:34:56, MTU 1500, queues of 256, capture mode.
    pub fn new(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_size: 256,
            mode: Mode::Capture,
            filter: NetFilter::default(),
            outputs: None,
        }
    }
}

struct State {
    segs: Vec<Segment>,
    frame: Vec<u8>,
    /// A frame read from the TAP that found no receive buffer yet.
    pending: Option<Vec<u8>>,
}

struct Inner {
    config: NetConfig,
    tap: Option<Tap>,
    source: Option<Arc<dyn ReplaySource>>,
    mem: Mutex<Option<GuestMemAtomic>>,
    state: Mutex<State>,
    tee: Option<Tee>,
    faults: Option<Arc<dyn FaultHook>>,
    metrics: Arc<Metrics>,
    /// The last original `seq` delivered to the guest, plus one (0: none).
    last_seq: AtomicU64,
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    /// The guest has no receive buffer: the frame was not consumed.
    NoBuffer,
    /// Written into a buffer and put in the used ring; the clone's record
    /// number, if recorded.
    Delivered(Option<u64>),
    /// The buffer was malformed or too small: the frame is lost.
    Refused,
}

/// The virtio-net vhost-user backend. Cheap to clone (shared state).
#[derive(Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

impl NetBackend {
    /// Builds a backend. Capture mode needs `tap`; replay mode needs
    /// `source`, and sends the clone's frames to `tap` only if one is given.
    pub fn new(
        config: NetConfig,
        tap: Option<Tap>,
        source: Option<Arc<dyn ReplaySource>>,
        tee: Option<Tee>,
        faults: Option<Arc<dyn FaultHook>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, NetError> {
        if !config.queue_size.is_power_of_two() || config.queue_size < 2 {
            return Err(NetError::QueueSize(config.queue_size));
        }
        if config.mtu < 68 {
            return Err(NetError::Mtu(config.mtu));
        }
        match config.mode {
            Mode::Capture if tap.is_none() => return Err(NetError::NoTap),
            Mode::Replay if source.is_none() => return Err(NetError::NoSource),
            _ => {}
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                tap,
                source,
                mem: Mutex::new(None),
                state: Mutex::new(State {
                    segs: Vec::new(),
                    frame: vec![0; MAX_FRAME + NET_HDR_LEN],
                    pending: None,
                }),
                tee,
                faults,
                metrics,
                last_seq: AtomicU64::new(0),
            }),
        })
    }

    /// Runs `f` while the device thread is not moving frames (every frame
    /// delivered so far is numbered and none is started until `f` returns).
    pub fn quiesce<R>(&self, f: impl FnOnce(Option<&Tee>) -> R) -> R {
        let _held = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        f(self.inner.tee.as_ref())
    }

    /// The metrics of this backend.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The device name.
    pub fn device(&self) -> &str {
        &self.inner.config.device
    }

    /// The virtio-net configuration space (mac, status, max pairs, mtu).
    pub fn config_space(&self) -> [u8; 12] {
        let c = &self.inner.config;
        let mut cfg = [0u8; 12];
        cfg[0..6].copy_from_slice(&c.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&c.mtu.to_le_bytes());
        cfg
    }

    fn record(&self, dir: pb::Direction, frame: &[u8]) -> Option<u64> {
        let inner = &*self.inner;
        let tee = inner.tee.as_ref()?;
        if !inner.config.filter.matches(dir, frame) {
            return None;
        }
        let q = if dir == pb::Direction::Rx { RX } else { TX };
        tee.record_frame(&inner.config.device, q, dir, frame)
    }

    /// The last original `seq` delivered to the guest.
    pub fn last_delivered_seq(&self) -> Option<u64> {
        self.inner.last_seq.load(Ordering::Acquire).checked_sub(1)
    }

    fn clock_ns(&self) -> u64 {
        self.inner.source.as_ref().map_or(0, |s| s.clock_ns())
    }

    fn outputs(&self) -> Option<&Arc<Outputs>> {
        self.inner.config.outputs.as_ref().filter(|o| o.active())
    }

    fn fault_ctx(&self, seq: Option<u64>) -> FaultCtx<'_> {
        FaultCtx {
            device: &self.inner.config.device,
            seq,
            clock_ns: self.clock_ns(),
        }
    }

    fn frame_fault(&self, dir: pb::Direction, seq: Option<u64>, frame: &[u8]) -> FrameFault {
        let Some(f) = &self.inner.faults else {
            return FrameFault::Pass;
        };
        let ctx = self.fault_ctx(seq);
        let Fired { fault, rule } = f.frame(&ctx, dir, frame);
        if fault != FrameFault::Pass {
            Metrics::add(&self.inner.metrics.faults, 1);
            if let Some(o) = self.outputs() {
                o.emit(Output::Fault {
                    device: self.inner.config.device.clone(),
                    rule,
                    kind: fault.name(),
                    target: if dir == pb::Direction::Rx { "rx" } else { "tx" },
                    seq,
                    clock_ns: ctx.clock_ns,
                });
            }
        }
        fault
    }

    /// Records, forwards and reports one transmitted frame.
    fn transmitted(&self, payload: &[u8], after_seq: Option<u64>) {
        let inner = &*self.inner;
        Metrics::add(&inner.metrics.requests, 1);
        Metrics::add(&inner.metrics.bytes, payload.len() as u64);
        let clone_seq = self.record(pb::Direction::Tx, payload);
        if let Some(tap) = &inner.tap {
            if let Err(error) = tap.write_frame(payload) {
                tracing::debug!(%error, "tap write failed");
                Metrics::add(&inner.metrics.io_errors, 1);
            }
        }
        if let Some(o) = self.outputs() {
            o.emit(Output::Tx {
                device: inner.config.device.clone(),
                after_seq,
                clock_ns: self.clock_ns(),
                mono_ns: crate::now_ns().1,
                clone_seq,
                frame: payload.to_vec(),
            });
        }
    }

    /// Puts one frame into a receive buffer. Returns false if the guest has
    /// no receive buffer (the frame is not consumed).
    fn deliver(
        &self,
        mem: &GuestMem,
        rx: &VringRwLock<GuestMemAtomic>,
        segs: &mut Vec<Segment>,
        frame: &[u8],
    ) -> io::Result<Delivery> {
        let inner = &*self.inner;
        let mut vs = rx.get_mut();
        let queue = vs.get_queue_mut();
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(Delivery::NoBuffer);
        };
        let head = chain.head_index();
        let room = chain_segments(chain, true, segs);
        let total = NET_HDR_LEN + frame.len();
        let mut used = 0u32;
        let mut result = Delivery::Refused;
        if !room.is_some_and(|r| !segs.is_empty() && r >= total as u64) {
            // Malformed, or too small for this frame: drop the frame, return
            // the buffer.
            Metrics::add(&inner.metrics.malformed, 1);
        } else {
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            let ok = scatter_two(mem, segs, &hdr, frame);
            if ok {
                used = total as u32;
                Metrics::add(&inner.metrics.requests, 1);
                Metrics::add(&inner.metrics.bytes, frame.len() as u64);
                // Numbered before the guest can see it: a snapshot cut taken
                // after GET_VRING_BASE never holds a frame numbered later.
                result = Delivery::Delivered(self.record(pb::Direction::Rx, frame));
            } else {
                Metrics::add(&inner.metrics.malformed, 1);
            }
        }
        queue.add_used(mem, head, used).map_err(io::Error::other)?;
        if queue.needs_notification(mem).map_err(io::Error::other)? {
            vs.signal_used_queue()?;
        }
        Ok(result)
    }

    /// Delivers an injected frame (its faults were decided when it became
    /// ready) and reports the delivery. Returns false if the guest has no
    /// receive buffer (the frame is not consumed).
    fn deliver_injected(
        &self,
        mem: &GuestMem,
        rx: &VringRwLock<GuestMemAtomic>,
        segs: &mut Vec<Segment>,
        f: &Injected,
    ) -> io::Result<bool> {
        let inner = &*self.inner;
        let clone_seq = match self.deliver(mem, rx, segs, &f.frame)? {
            Delivery::NoBuffer => return Ok(false),
            Delivery::Refused => return Ok(true),
            Delivery::Delivered(s) => s,
        };
        if let Some(seq) = f.seq {
            inner.last_seq.fetch_max(seq + 1, Ordering::AcqRel);
        }
        if let Some(o) = self.outputs() {
            let clock_ns = self.clock_ns();
            o.emit(Output::Delivered {
                device: inner.config.device.clone(),
                seq: f.seq,
                at_ns: f.at_ns,
                clock_ns,
                mono_ns: crate::now_ns().1,
                late_ns: f.at_ns.map_or(0, |at| clock_ns as i64 - at as i64),
                clone_seq,
                len: f.frame.len(),
            });
        }
        Ok(true)
    }

    /// Whether the guest has posted a receive buffer.
    fn rx_buffer_ready(
        &self,
        mem: &GuestMem,
        rx: &VringRwLock<GuestMemAtomic>,
    ) -> io::Result<bool> {
        let mut vs = rx.get_mut();
        let q = vs.get_queue_mut();
        let avail = q
            .avail_idx(mem, Ordering::Acquire)
            .map_err(io::Error::other)?;
        Ok(avail.0 != q.next_avail())
    }

    /// Delivers a host frame to the guest, applying receive faults.
    fn deliver_with_faults(
        &self,
        mem: &GuestMem,
        rx: &VringRwLock<GuestMemAtomic>,
        segs: &mut Vec<Segment>,
        frame: &[u8],
    ) -> io::Result<bool> {
        // Decide faults only for frames that have somewhere to go.
        if !self.rx_buffer_ready(mem, rx)? {
            return Ok(false);
        }
        let consumed = |d: Delivery| !matches!(d, Delivery::NoBuffer);
        match self.frame_fault(pb::Direction::Rx, None, frame) {
            FrameFault::Pass => Ok(consumed(self.deliver(mem, rx, segs, frame)?)),
            FrameFault::Drop => Ok(true),
            FrameFault::Delay(d) => {
                // The scheduler holds it; this thread never sleeps.
                let held = self
                    .inner
                    .source
                    .as_ref()
                    .is_some_and(|s| s.delay_rx(Injected::now(frame.to_vec()), d));
                if held {
                    Ok(true)
                } else {
                    Ok(consumed(self.deliver(mem, rx, segs, frame)?))
                }
            }
            FrameFault::Duplicate => {
                let first = consumed(self.deliver(mem, rx, segs, frame)?);
                if first {
                    let _ = self.deliver(mem, rx, segs, frame)?;
                }
                Ok(first)
            }
        }
    }

    /// Moves host frames (pending, TAP, replay source) into receive buffers
    /// until one side runs dry.
    fn process_rx(&self, mem: &GuestMem, rx: &VringRwLock<GuestMemAtomic>) -> io::Result<()> {
        let inner = &*self.inner;
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let State {
            segs,
            frame,
            pending,
        } = &mut *st;
        if let Some(p) = pending.take() {
            if !self.deliver_with_faults(mem, rx, segs, &p)? {
                *pending = Some(p);
                return Ok(());
            }
        }
        if let Some(source) = &inner.source {
            let decided = source.decides_faults();
            while let Some(f) = source.pop() {
                if !decided && !self.rx_buffer_ready(mem, rx)? {
                    source.unpop(f);
                    return Ok(());
                }
                let copies = if decided {
                    1
                } else {
                    match self.frame_fault(pb::Direction::Rx, f.seq, &f.frame) {
                        FrameFault::Pass => 1,
                        FrameFault::Drop => 0,
                        FrameFault::Duplicate => 2,
                        FrameFault::Delay(d) => {
                            if source.delay_rx(f.clone(), d) {
                                0
                            } else {
                                1
                            }
                        }
                    }
                };
                for i in 0..copies {
                    if !self.deliver_injected(mem, rx, segs, &f)? {
                        if i == 0 {
                            source.unpop(f);
                        }
                        return Ok(());
                    }
                    Metrics::add(&inner.metrics.injected, 1);
                }
            }
        }
        if let Some(tap) = &inner.tap {
            while let Some(n) = tap.read_frame(frame)? {
                if !self.deliver_with_faults(mem, rx, segs, &frame[..n])? {
                    *pending = Some(frame[..n].to_vec());
                    break;
                }
            }
        }
        Ok(())
    }

    /// Sends every frame the guest queued for transmission.
    fn process_tx(&self, mem: &GuestMem, tx: &VringRwLock<GuestMemAtomic>) -> io::Result<()> {
        let inner = &*self.inner;
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { segs, frame, .. } = &mut *st;
        let mut vs = tx.get_mut();
        let queue = vs.get_queue_mut();
        let mut completed = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            completed += 1;
            let len = chain_segments(chain, false, segs);
            let Some(len) = len.filter(|&n| n >= NET_HDR_LEN as u64 && n <= frame.len() as u64)
            else {
                Metrics::add(&inner.metrics.malformed, 1);
                queue.add_used(mem, head, 0).map_err(io::Error::other)?;
                continue;
            };
            let len = len as usize;
            if request::gather(mem, segs, 0, &mut frame[..len]).is_err() {
                Metrics::add(&inner.metrics.malformed, 1);
                queue.add_used(mem, head, 0).map_err(io::Error::other)?;
                continue;
            }
            let payload = &frame[NET_HDR_LEN..len];
            let after_seq = self.last_delivered_seq();
            let copies = match self.frame_fault(pb::Direction::Tx, after_seq, payload) {
                FrameFault::Pass => 1,
                FrameFault::Drop => 0,
                FrameFault::Delay(d) => {
                    // Held by the scheduler, recorded and forwarded when
                    // the delay is over (see `process_held_tx`).
                    let held = HeldTx {
                        frame: payload.to_vec(),
                        after_seq,
                    };
                    match &inner.source {
                        Some(s) if s.delay_tx(held, d) => 0,
                        _ => 1,
                    }
                }
                FrameFault::Duplicate => 2,
            };
            for _ in 0..copies {
                self.transmitted(payload, after_seq);
            }
            queue.add_used(mem, head, 0).map_err(io::Error::other)?;
        }
        if completed > 0 && queue.needs_notification(mem).map_err(io::Error::other)? {
            vs.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Collects a chain's buffers into `segs`; they must all be device-writable
/// (`write`) or all device-readable. Returns their total length, or `None`
/// for a buffer of the wrong direction, a chain of more than 1024 buffers,
/// or a last descriptor that still names a next one.
fn chain_segments<M>(
    chain: virtio_queue::DescriptorChain<M>,
    write: bool,
    segs: &mut Vec<Segment>,
) -> Option<u64>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    segs.clear();
    let mut total = 0u64;
    let mut last_has_next = false;
    for d in chain {
        if d.is_write_only() != write || segs.len() >= 1024 {
            return None;
        }
        last_has_next = d.has_next();
        total += u64::from(d.len());
        segs.push(Segment {
            addr: d.addr(),
            len: d.len(),
            write,
        });
    }
    (!last_has_next).then_some(total)
}

/// Copies `a` then `b` into the writable segments.
fn scatter_two(mem: &GuestMem, segs: &[Segment], a: &[u8], b: &[u8]) -> bool {
    let mut parts = [a, b];
    let mut pi = 0;
    for s in segs {
        let mut addr = s.addr;
        let mut room = s.len as usize;
        while room > 0 && pi < 2 {
            let part = parts[pi];
            if part.is_empty() {
                pi += 1;
                continue;
            }
            let n = room.min(part.len());
            if mem.write_slice(&part[..n], addr).is_err() {
                return false;
            }
            parts[pi] = &part[n..];
            room -= n;
            addr = vm_memory::Address::unchecked_add(&addr, n as u64);
        }
    }
    parts.iter().all(|p| p.is_empty())
}

/// Feature bits offered by the net backend.
pub fn net_features() -> u64 {
    1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_MTU
        | 1 << VIRTIO_NET_F_STATUS
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

impl VhostUserBackend for NetBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = VringRwLock<GuestMemAtomic>;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        self.inner.config.queue_size as usize
    }

    fn features(&self) -> u64 {
        net_features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {}

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

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(atomic) = self
            .inner
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let ready = |v: &VringRwLock<GuestMemAtomic>| {
            let s = v.get_ref();
            s.get_queue().ready() && s.is_enabled()
        };
        match device_event {
            RX | TAP_EVENT | REPLAY_EVENT => {
                if device_event == REPLAY_EVENT {
                    if let Some(s) = &self.inner.source {
                        s.clear_event();
                        while let Some(t) = s.pop_tx() {
                            self.transmitted(&t.frame, t.after_seq);
                        }
                    }
                }
                if ready(rx) {
                    self.process_rx(&mem, rx)?;
                }
            }
            TX => {
                if ready(tx) {
                    self.process_tx(&mem, tx)?;
                }
            }
            other => tracing::debug!(event = other, "unexpected event"),
        }
        Ok(())
    }
}

impl crate::server::Serve for NetBackend {
    fn on_connect(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        let Some(h) = handlers.first() else {
            return Ok(());
        };
        let edge = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Some(tap) = &self.inner.tap {
            h.register_listener(tap.as_raw_fd(), edge, u64::from(TAP_EVENT))?;
        }
        if let Some(source) = &self.inner.source {
            h.register_listener(source.event_fd(), EventSet::IN, u64::from(REPLAY_EVENT))?;
        }
        Ok(())
    }

    fn on_disconnect(&self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.pending = None;
        *self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
