//! Frames the replayer injects into a clone's NIC, delivered on the replay
//! clock.
//!
//! A frame is either immediate (no `at_ns`: it is ready at once) or
//! scheduled: a scheduler thread moves it to the ready queue when the
//! [`ReplayClock`] reaches its `at_ns`, and wakes the device thread through
//! an eventfd. Receive faults are decided when a frame becomes ready, on
//! the thread that makes it ready (the pushing thread or the scheduler),
//! never on the device thread: a delayed frame goes back to the schedule,
//! and a transmitted frame that a fault delays waits there too until the
//! device thread takes it back.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmr_proto::pb;

use crate::capture::replay::{Output, Outputs, ReplayClock};
use crate::fault::{FaultCtx, FaultHook, FrameFault};
use crate::metrics::Metrics;

/// One frame for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The original's `seq` of this frame.
    pub seq: Option<u64>,
    /// Replay-clock time it is due (None: at once).
    pub at_ns: Option<u64>,
    /// An Ethernet frame without virtio-net header.
    pub frame: Vec<u8>,
}

impl Injected {
    /// An immediate frame without a `seq`.
    pub fn now(frame: Vec<u8>) -> Self {
        Self {
            seq: None,
            at_ns: None,
            frame,
        }
    }
}

/// A transmitted frame held back by a delay fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTx {
    pub frame: Vec<u8>,
    /// The last original `seq` delivered before the guest sent it.
    pub after_seq: Option<u64>,
}

/// A source of frames to deliver to the guest (host to guest). The backend
/// watches [`ReplaySource::event_fd`] and calls [`ReplaySource::pop`] while
/// the guest has receive buffers.
pub trait ReplaySource: Send + Sync {
    /// The next ready frame.
    fn pop(&self) -> Option<Injected>;
    /// Puts a frame back at the front (no receive buffer was free).
    fn unpop(&self, frame: Injected);
    /// An eventfd that becomes readable when frames are ready.
    fn event_fd(&self) -> RawFd;
    /// Consumes the eventfd's counter.
    fn clear_event(&self);
    /// Replay clock now (0 without a clock).
    fn clock_ns(&self) -> u64 {
        0
    }
    /// Whether the source decides receive faults itself; if not, the
    /// backend decides them as it takes each frame.
    fn decides_faults(&self) -> bool {
        false
    }
    /// Schedules a frame `by` later on the replay clock (a delay fault);
    /// false if this source cannot.
    fn delay_rx(&self, _frame: Injected, _by: Duration) -> bool {
        false
    }
    /// Holds a transmitted frame `by` on the replay clock, after which
    /// [`ReplaySource::pop_tx`] returns it; false if this source cannot.
    fn delay_tx(&self, _frame: HeldTx, _by: Duration) -> bool {
        false
    }
    /// A held transmitted frame whose delay is over.
    fn pop_tx(&self) -> Option<HeldTx> {
        None
    }
}

/// Bounds of the frames waiting in a [`ChannelReplaySource`].
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Frames (scheduled and ready).
    pub frames: usize,
    /// Bytes of those frames.
    pub bytes: usize,
}

impl Default for QueueLimits {
    /// 65536 frames, 256 MiB.
    fn default() -> Self {
        Self {
            frames: 65536,
            bytes: 256 << 20,
        }
    }
}

/// A push refused because the queue is at its limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("replay queue full: {frames} frames / {bytes} bytes waiting (limits {max_frames} / {max_bytes})")]
pub struct QueueFull {
    pub frames: usize,
    pub bytes: usize,
    pub max_frames: usize,
    pub max_bytes: usize,
}

/// What the scheduler holds.
enum Item {
    Rx(Injected),
    Tx(HeldTx),
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Rx(f) => f.frame.len(),
            Item::Tx(f) => f.frame.len(),
        }
    }
}

#[derive(Default)]
struct Queues {
    /// Keyed by (due time, order of arrival); `faulted` frames are not
    /// faulted again.
    future: BTreeMap<(u64, u64), (Item, bool)>,
    ready: VecDeque<Injected>,
    ready_tx: VecDeque<HeldTx>,
    order: u64,
    bytes: usize,
}

impl Queues {
    fn frames(&self) -> usize {
        self.future.len() + self.ready.len() + self.ready_tx.len()
    }
}

/// Where faults and outputs of the source go.
#[derive(Clone)]
pub struct SourceConfig {
    /// Device name (for fault rules and output lines).
    pub device: String,
    pub clock: Arc<ReplayClock>,
    /// Receive faults (None: none).
    pub faults: Option<Arc<dyn FaultHook>>,
    /// Fault reports go here.
    pub outputs: Option<Arc<Outputs>>,
    /// `faults` is counted here.
    pub metrics: Arc<Metrics>,
    pub limits: QueueLimits,
}

impl SourceConfig {
    /// A source for `device` with its own paused clock, no faults.
    pub fn new(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            clock: Arc::new(ReplayClock::new()),
            faults: None,
            outputs: None,
            metrics: Arc::default(),
            limits: QueueLimits::default(),
        }
    }
}

struct Shared {
    cfg: SourceConfig,
    q: Mutex<Queues>,
    event: EventFd,
    stop: AtomicBool,
}

/// The replay source fed by [`ChannelReplaySource::push`] and
/// [`ChannelReplaySource::push_at`] (library API, or the control socket's
/// `inject` commands), with a scheduler thread for timed frames.
pub struct ChannelReplaySource {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ChannelReplaySource {
    /// An empty source with its own paused clock and no faults.
    pub fn new() -> std::io::Result<Self> {
        Self::with_config(SourceConfig::new("net0"))
    }

    /// An empty source; starts its scheduler thread.
    pub fn with_config(cfg: SourceConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            cfg,
            q: Mutex::new(Queues::default()),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replay-sched".into())
            .spawn(move || s.run())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The clock frames are scheduled on.
    pub fn clock(&self) -> &Arc<ReplayClock> {
        &self.shared.cfg.clock
    }

    /// Queues a frame for the guest at once, without a `seq`. Refused only
    /// when the queue is at its limits (logged and dropped).
    pub fn push(&self, frame: Vec<u8>) {
        if let Err(error) = self.push_at(Injected::now(frame)) {
            tracing::warn!(%error, "replay frame refused");
        }
    }

    /// Queues a frame: ready at once without `at_ns`, else when the clock
    /// reaches it.
    pub fn push_at(&self, f: Injected) -> Result<(), QueueFull> {
        self.push_many(vec![f])
    }

    /// Queues frames (all or none).
    pub fn push_many(&self, frames: Vec<Injected>) -> Result<(), QueueFull> {
        let s = &*self.shared;
        let mut q = s.lock();
        let add: usize = frames.iter().map(|f| f.frame.len()).sum();
        let l = s.cfg.limits;
        if q.frames() + frames.len() > l.frames || q.bytes + add > l.bytes {
            return Err(QueueFull {
                frames: q.frames(),
                bytes: q.bytes,
                max_frames: l.frames,
                max_bytes: l.bytes,
            });
        }
        let mut ready = false;
        let mut scheduled = false;
        for f in frames {
            match f.at_ns {
                Some(at) => {
                    q.bytes += f.frame.len();
                    q.order += 1;
                    let o = q.order;
                    q.future.insert((at, o), (Item::Rx(f), false));
                    scheduled = true;
                }
                None => ready |= s.admit(&mut q, f),
            }
        }
        drop(q);
        if ready {
            s.signal();
        }
        if scheduled {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        Ok(())
    }

    /// Frames waiting (scheduled or ready).
    pub fn pending(&self) -> usize {
        self.shared.lock().frames()
    }

    /// Drops every waiting frame; returns how many.
    pub fn clear(&self) -> usize {
        let mut q = self.shared.lock();
        let n = q.frames();
        q.future.clear();
        q.ready.clear();
        q.ready_tx.clear();
        q.bytes = 0;
        n
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for ChannelReplaySource {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) {
        if let Err(error) = self.event.write(1) {
            tracing::warn!(%error, "cannot signal the replay source");
        }
    }

    /// Makes a due frame ready, applying receive faults; returns whether a
    /// frame became ready.
    fn admit(&self, q: &mut Queues, f: Injected) -> bool {
        let clock_ns = self.cfg.clock.now_ns();
        let fired = match &self.cfg.faults {
            Some(h) => h.frame(
                &FaultCtx {
                    device: &self.cfg.device,
                    seq: f.seq,
                    clock_ns,
                },
                pb::Direction::Rx,
                &f.frame,
            ),
            None => crate::fault::Fired {
                fault: FrameFault::Pass,
                rule: 0,
            },
        };
        if fired.fault != FrameFault::Pass {
            Metrics::add(&self.cfg.metrics.faults, 1);
            if let Some(o) = self.cfg.outputs.as_ref().filter(|o| o.active()) {
                o.emit(Output::Fault {
                    device: self.cfg.device.clone(),
                    rule: fired.rule,
                    kind: fired.fault.name(),
                    target: "rx",
                    seq: f.seq,
                    clock_ns,
                });
            }
        }
        match fired.fault {
            FrameFault::Pass => {
                q.bytes += f.frame.len();
                q.ready.push_back(f);
                true
            }
            FrameFault::Drop => false,
            FrameFault::Duplicate => {
                q.bytes += 2 * f.frame.len();
                q.ready.push_back(f.clone());
                q.ready.push_back(f);
                true
            }
            FrameFault::Delay(d) => {
                let at = clock_ns.saturating_add(d.as_nanos() as u64);
                q.bytes += f.frame.len();
                q.order += 1;
                let o = q.order;
                q.future.insert((at, o), (Item::Rx(f), true));
                false
            }
        }
    }

    fn hold(&self, item: Item, by: Duration) {
        let at = self.cfg.clock.now_ns().saturating_add(by.as_nanos() as u64);
        let mut q = self.lock();
        q.bytes += item.len();
        q.order += 1;
        let o = q.order;
        q.future.insert((at, o), (item, true));
    }

    /// The scheduler: moves due frames to the ready queues, then sleeps
    /// until the next one is due or the clock or queue changes.
    fn run(&self) {
        self.cfg.clock.register_waiter();
        while !self.stop.load(Ordering::Acquire) {
            let mut woke = false;
            let mut wait = Duration::from_millis(100);
            {
                let mut q = self.lock();
                while let Some((&(at, o), _)) = q.future.iter().next() {
                    match self.cfg.clock.until(at) {
                        Some(d) if d.is_zero() => {
                            let (item, faulted) = q.future.remove(&(at, o)).expect("just seen");
                            q.bytes -= item.len();
                            match item {
                                Item::Rx(f) if faulted => {
                                    q.bytes += f.frame.len();
                                    q.ready.push_back(f);
                                    woke = true;
                                }
                                Item::Rx(f) => woke |= self.admit(&mut q, f),
                                Item::Tx(t) => {
                                    q.bytes += t.frame.len();
                                    q.ready_tx.push_back(t);
                                    woke = true;
                                }
                            }
                        }
                        Some(d) => {
                            wait = wait.min(d);
                            break;
                        }
                        None => break,
                    }
                }
            }
            if woke {
                self.signal();
            }
            std::thread::park_timeout(wait);
        }
        self.cfg
            .clock
            .unregister_waiter(std::thread::current().id());
    }
}

impl ReplaySource for ChannelReplaySource {
    fn pop(&self) -> Option<Injected> {
        let mut q = self.shared.lock();
        let f = q.ready.pop_front()?;
        q.bytes -= f.frame.len();
        Some(f)
    }

    fn unpop(&self, frame: Injected) {
        let mut q = self.shared.lock();
        q.bytes += frame.frame.len();
        q.ready.push_front(frame);
    }

    fn event_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    fn clear_event(&self) {
        let _ = self.shared.event.read();
    }

    fn clock_ns(&self) -> u64 {
        self.shared.cfg.clock.now_ns()
    }

    fn decides_faults(&self) -> bool {
        self.shared.cfg.faults.is_some()
    }

    fn delay_rx(&self, frame: Injected, by: Duration) -> bool {
        self.shared.hold(Item::Rx(frame), by);
        self.wake();
        true
    }

    fn delay_tx(&self, frame: HeldTx, by: Duration) -> bool {
        self.shared.hold(Item::Tx(frame), by);
        self.wake();
        true
    }

    fn pop_tx(&self) -> Option<HeldTx> {
        let mut q = self.shared.lock();
        let f = q.ready_tx.pop_front()?;
        q.bytes -= f.frame.len();
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultKind, FaultRule, RuleFaults};

    fn wait_ready(s: &ChannelReplaySource, ms: u64) -> Option<Injected> {
        let end = std::time::Instant::now() + Duration::from_millis(ms);
        loop {
            if let Some(f) = s.pop() {
                return Some(f);
            }
            if std::time::Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn scheduled_frames_wait_for_the_clock() {
        let s = ChannelReplaySource::new().unwrap();
        let f = |seq, at| Injected {
            seq: Some(seq),
            at_ns: Some(at),
            frame: vec![seq as u8; 60],
        };
        s.push_many(vec![f(2, 20_000_000), f(1, 10_000_000)])
            .unwrap();
        s.push(vec![9; 60]);
        assert_eq!(s.pop().unwrap().frame, vec![9; 60], "immediate");
        // Paused: nothing becomes due.
        assert!(wait_ready(&s, 30).is_none());
        s.clock().step(10_000_000).unwrap();
        assert_eq!(wait_ready(&s, 1000).unwrap().seq, Some(1));
        assert!(wait_ready(&s, 30).is_none());
        s.clock().resume();
        assert_eq!(wait_ready(&s, 1000).unwrap().seq, Some(2));
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut cfg = SourceConfig::new("net0");
        cfg.limits = QueueLimits {
            frames: 3,
            bytes: 1000,
        };
        let s = ChannelReplaySource::with_config(cfg).unwrap();
        let at = |n| Injected {
            seq: None,
            at_ns: Some(1 << 40),
            frame: vec![0; n],
        };
        s.push_many(vec![at(100), at(100)]).unwrap();
        let e = s.push_many(vec![at(100), at(100)]).unwrap_err();
        assert_eq!((e.frames, e.max_frames), (2, 3));
        assert!(s.push_at(at(900)).is_err(), "bytes");
        s.push_at(at(100)).unwrap();
        assert_eq!(s.pending(), 3);
        assert_eq!(s.clear(), 3);
    }

    #[test]
    fn a_delay_fault_reschedules_instead_of_sleeping() {
        let faults = Arc::new(RuleFaults::new());
        faults
            .add(FaultRule {
                delay_ms: Some(50),
                ..FaultRule::frame(FaultKind::Delay, "rx", 1)
            })
            .unwrap();
        let mut cfg = SourceConfig::new("net0");
        cfg.faults = Some(faults);
        let s = ChannelReplaySource::with_config(cfg).unwrap();
        s.clock().resume();
        let t = std::time::Instant::now();
        s.push(vec![1; 60]);
        s.push(vec![2; 60]);
        assert_eq!(
            s.pop().unwrap().frame[0],
            2,
            "the undelayed frame is ready at once"
        );
        assert_eq!(wait_ready(&s, 2000).unwrap().frame[0], 1);
        assert!(
            t.elapsed() >= Duration::from_millis(45),
            "{:?}",
            t.elapsed()
        );
    }
}
