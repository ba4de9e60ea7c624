//! [`NetBackend`]: `VhostUserBackend` for virtio-net with one queue pair
//! (queue 0 receive, queue 1 transmit), served by one thread that also
//! watches the TAP device and the replay source.
//!
//! Every frame carries the 12-byte `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1);
//! no offloads are offered, so the header is all zeros except
//! `num_buffers = 1` on receive.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

use super::replay::ReplaySource;
use super::tap::Tap;
use crate::blk::backend::protocol_features;
use crate::blk::request::{self, Segment};
use crate::capture::Tee;
use crate::fault::{FaultHook, FrameFault};
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

    fn record(&self, dir: pb::Direction, frame: &[u8]) {
        let inner = &*self.inner;
        if let Some(tee) = &inner.tee {
            if inner.config.filter.matches(dir, frame) {
                let q = if dir == pb::Direction::Rx { RX } else { TX };
                tee.record_frame(&inner.config.device, q, dir, frame);
            }
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
    ) -> io::Result<bool> {
        let inner = &*self.inner;
        let mut vs = rx.get_mut();
        let queue = vs.get_queue_mut();
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let room = chain_segments(chain, true, segs);
        let total = NET_HDR_LEN + frame.len();
        let mut used = 0u32;
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
                self.record(pb::Direction::Rx, frame);
            } else {
                Metrics::add(&inner.metrics.malformed, 1);
            }
        }
        queue.add_used(mem, head, used).map_err(io::Error::other)?;
        if queue.needs_notification(mem).map_err(io::Error::other)? {
            vs.signal_used_queue()?;
        }
        Ok(true)
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
        {
            let mut vs = rx.get_mut();
            let q = vs.get_queue_mut();
            let avail = q
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(io::Error::other)?;
            if avail.0 == q.next_avail() {
                return Ok(false);
            }
        }
        let fault = self
            .inner
            .faults
            .as_ref()
            .map_or(FrameFault::Pass, |f| f.frame(pb::Direction::Rx, frame));
        match fault {
            FrameFault::Pass => self.deliver(mem, rx, segs, frame),
            FrameFault::Drop => {
                Metrics::add(&self.inner.metrics.faults, 1);
                Ok(true)
            }
            FrameFault::Delay(d) => {
                Metrics::add(&self.inner.metrics.faults, 1);
                std::thread::sleep(d.min(Duration::from_secs(10)));
                self.deliver(mem, rx, segs, frame)
            }
            FrameFault::Duplicate => {
                Metrics::add(&self.inner.metrics.faults, 1);
                let first = self.deliver(mem, rx, segs, frame)?;
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
            while let Some(f) = source.pop() {
                Metrics::add(&inner.metrics.injected, 1);
                if !self.deliver_with_faults(mem, rx, segs, &f)? {
                    source.unpop(f);
                    inner
                        .metrics
                        .injected
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
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
            let fault = inner
                .faults
                .as_ref()
                .map_or(FrameFault::Pass, |f| f.frame(pb::Direction::Tx, payload));
            let copies = match fault {
                FrameFault::Pass => 1,
                FrameFault::Drop => 0,
                FrameFault::Delay(d) => {
                    std::thread::sleep(d.min(Duration::from_secs(10)));
                    1
                }
                FrameFault::Duplicate => 2,
            };
            if fault != FrameFault::Pass {
                Metrics::add(&inner.metrics.faults, 1);
            }
            for _ in 0..copies {
                Metrics::add(&inner.metrics.requests, 1);
                Metrics::add(&inner.metrics.bytes, payload.len() as u64);
                self.record(pb::Direction::Tx, payload);
                if let Some(tap) = &inner.tap {
                    if let Err(error) = tap.write_frame(payload) {
                        tracing::debug!(%error, "tap write failed");
                        Metrics::add(&inner.metrics.io_errors, 1);
                    }
                }
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
