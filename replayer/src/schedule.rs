//! When to dispatch each event.
//!
//! - [`Timeline`] rebuilds the guest's running time from the events'
//!   `mono_time_ns` and the recorded pauses, giving each event its
//!   guest-time offset since the snapshot's cut. Time the guest was paused
//!   does not count.
//! - [`ReplayClock`] paces dispatch against real time: at a speed factor
//!   from 0.1x to 100x, or as fast as possible; it can be paused, stepped by
//!   N events, run to a `seq` or to a guest time, and resumed through a
//!   [`ClockControl`] from another thread. Each dispatch reports its due time
//!   and its actual time, so timing error can be measured.
//! - [`prepare_dispatch_thread`] gives a dispatch thread what a real-time
//!   scheduler gives its timer threads (`SCHED_FIFO`, locked memory, a
//!   1 ns timer slack, else a short fair-scheduler slice), each part only
//!   where permitted, logging what was refused; [`set_realtime_priority`]
//!   is its `SCHED_FIFO` part alone.
//!
//! How the clock waits for a due time: while more than 2 ms are left it
//! sleeps on a condition variable, so that a control (pause, step, speed)
//! re-plans at once; then it sleeps with `clock_nanosleep(CLOCK_MONOTONIC,
//! TIMER_ABSTIME)` until 200 µs before the due time (an absolute deadline
//! does not drift by the time spent between reading the clock and going to
//! sleep), and spins the rest on `CLOCK_MONOTONIC`, yielding the CPU until
//! the last 50 µs. A control that arrives during the last 2 ms takes effect
//! when that stretch ends: the event is not released if the plan changed.
//!
//! A clock with a lead ([`ReplayClock::set_lead`]) releases each timed event
//! that long before it is due, for a consumer that schedules it on its own
//! clock (vhost-tap's replay clock delivers a frame sent with `at_ns` at
//! that time, so the releasing thread's jitter, when shorter than the lead,
//! no longer reaches the guest).
//!
//! ```
//! use std::time::Duration;
//! use replayer::schedule::{ReplayClock, Speed};
//!
//! let mut clock = ReplayClock::new(Speed::factor(100.0).unwrap());
//! let d = clock.wait(1, Duration::from_millis(100)).unwrap(); // due after 1 ms
//! assert!(d.dispatched >= d.due);
//! ```

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmr_proto::{Direction, Event, LifecycleKind, Payload, SnapshotManifest};

/// Slowest speed factor.
pub const MIN_SPEED: f64 = 0.1;
/// Fastest speed factor (short of "as fast as possible").
pub const MAX_SPEED: f64 = 100.0;

/// Waits shorter than this are spun out rather than slept, for precision
/// (a timed sleep wakes some 50-100 µs late at the default timer slack).
const SPIN: Duration = Duration::from_micros(200);
/// The last stretch of a spin does not yield the CPU.
const SPIN_HARD: Duration = Duration::from_micros(50);
/// Within this of the due time the clock sleeps on the monotonic clock to an
/// absolute deadline instead of on its condition variable.
const FINAL: Duration = Duration::from_millis(2);
/// Longest sleep before re-checking the clock's state.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// Errors of scheduling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("speed {0} is out of range: use {MIN_SPEED} to {MAX_SPEED}, or as fast as possible")]
    BadSpeed(f64),
    #[error("the replay clock was stopped")]
    Stopped,
}

/// Gives the calling thread the real-time `SCHED_FIFO` policy at
/// `priority` (1 to 99), so that a dispatch thread is woken on time on a
/// busy host (needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least
/// `priority`).
///
/// The clock sleeps until 200 µs before each due time, so a timed replay
/// keeps little CPU; an as-fast-as-possible replay never sleeps, so do not
/// raise its thread (a `SCHED_FIFO` thread that never sleeps keeps a CPU
/// from every ordinary thread until the kernel's real-time throttling, 95 %
/// by default, cuts in).
pub fn set_realtime_priority(priority: i32) -> std::io::Result<()> {
    set_thread_realtime_priority(0, priority)
}

/// [`set_realtime_priority`] for the thread `tid` of this process (0: the
/// calling thread).
pub fn set_thread_realtime_priority(tid: i32, priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `sched_setscheduler` reads `param`, which lives across the
    // call; a tid of 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The host's `CLOCK_MONOTONIC`, in nanoseconds: the clock `Instant` reads
/// on Linux and the one vhost-tap stamps a delivered frame's `mono_ns` with.
pub fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `CLOCK_MONOTONIC` reads `deadline_ns` (at once if it is
/// past), with `clock_nanosleep(TIMER_ABSTIME)`; a signal does not shorten
/// the sleep.
pub fn sleep_until_mono_ns(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: clock_nanosleep reads `ts`, which lives across the call;
        // the remainder pointer may be null with TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// What [`prepare_dispatch_thread`] should try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealtimeOptions {
    /// `SCHED_FIFO` at this priority (1 to 99); None: the default policy.
    pub fifo_priority: Option<i32>,
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)`, so that the dispatch path never
    /// waits for a page fault. This locks the whole process's memory.
    pub lock_memory: bool,
    /// The thread's timer slack (`PR_SET_TIMERSLACK`), in nanoseconds; the
    /// kernel's default is 50 µs, by which it may delay a timed wake-up to
    /// merge it with others. `SCHED_FIFO` threads have none anyway.
    pub timer_slack_ns: Option<u64>,
    /// Where the thread stays at the default policy (not asked for
    /// `SCHED_FIFO`, or refused it): ask the fair scheduler for this slice
    /// (`sched_setattr` with `sched_runtime`, 100 µs to 100 ms; honoured
    /// by EEVDF kernels, 6.12 and later). A shorter slice than the default
    /// (about 3 ms) gives the thread an earlier deadline, so that on
    /// waking it preempts sooner; it does not give it more CPU.
    pub fair_slice_ns: Option<u64>,
}

impl RealtimeOptions {
    /// Nothing changed: the thread as it was made.
    pub const NONE: RealtimeOptions = RealtimeOptions {
        fifo_priority: None,
        lock_memory: false,
        timer_slack_ns: None,
        fair_slice_ns: None,
    };

    /// What needs no privilege: the default policy with a 1 ns timer slack
    /// and a 100 µs fair-scheduler slice.
    pub const UNPRIVILEGED: RealtimeOptions = RealtimeOptions {
        fifo_priority: None,
        lock_memory: false,
        timer_slack_ns: Some(1),
        fair_slice_ns: Some(100_000),
    };

    /// `SCHED_FIFO` at `priority`, memory locked, 1 ns timer slack; where
    /// `SCHED_FIFO` is refused, a 100 µs fair-scheduler slice.
    pub fn realtime(priority: i32) -> Self {
        Self {
            fifo_priority: Some(priority),
            lock_memory: true,
            timer_slack_ns: Some(1),
            fair_slice_ns: Some(100_000),
        }
    }
}

/// `struct sched_attr` of `sched_setattr(2)` (its first version, 56 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Puts thread `tid` (0: the calling thread) at the default policy and
/// asks the fair scheduler for a slice of `slice_ns` (see
/// [`RealtimeOptions::fair_slice_ns`]); the thread's nice value is kept.
/// Needs no privilege for a thread of the caller's own user.
pub fn set_thread_fair_slice(tid: i32, slice_ns: u64) -> std::io::Result<()> {
    // SAFETY: getpriority takes plain integers; -1 with errno set is an
    // error, which leaves nice at 0.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice.clamp(-20, 19),
        sched_priority: 0,
        sched_runtime: slice_ns,
        sched_deadline: 0,
        sched_period: 0,
        sched_util_min: 0,
        sched_util_max: 0,
    };
    // SAFETY: sched_setattr reads `attr`, whose size field says how many
    // bytes it has; it lives across the call.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What [`prepare_dispatch_thread`] applied and what the host refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadSetup {
    /// The `SCHED_FIFO` priority now in effect (None: the default policy).
    pub fifo_priority: Option<i32>,
    pub memory_locked: bool,
    pub timer_slack_ns: Option<u64>,
    /// The fair-scheduler slice asked for (None: the default slice).
    pub fair_slice_ns: Option<u64>,
    /// One sentence per part that was asked for and refused.
    pub refused: Vec<String>,
}

impl std::fmt::Display for ThreadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fifo_priority {
            Some(p) => write!(f, "SCHED_FIFO {p}")?,
            None => write!(f, "default policy")?,
        }
        if self.memory_locked {
            write!(f, ", memory locked")?;
        }
        if let Some(ns) = self.timer_slack_ns {
            write!(f, ", timer slack {ns} ns")?;
        }
        if let Some(ns) = self.fair_slice_ns {
            write!(f, ", fair slice {} us", ns / 1000)?;
        }
        for r in &self.refused {
            write!(f, "; {r}")?;
        }
        Ok(())
    }
}

/// Prepares the calling thread for timed dispatch, part by part as in
/// `opts`. Never fails: a part the host refuses (no `CAP_SYS_NICE`, an
/// `RLIMIT_MEMLOCK` too small, real-time scheduling not granted to this
/// cgroup) is logged as a warning naming the reason, listed in
/// [`ThreadSetup::refused`], and the thread goes on without it.
pub fn prepare_dispatch_thread(opts: &RealtimeOptions) -> ThreadSetup {
    let mut out = ThreadSetup::default();
    if let Some(ns) = opts.timer_slack_ns {
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no
        // memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
        if rc == 0 {
            out.timer_slack_ns = Some(ns);
        } else {
            let e = std::io::Error::last_os_error();
            out.refused
                .push(format!("timer slack {ns} ns refused: {e}"));
        }
    }
    if opts.lock_memory {
        // SAFETY: mlockall takes flags only.
        let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
        if rc == 0 {
            out.memory_locked = true;
        } else {
            let e = std::io::Error::last_os_error();
            out.refused.push(format!(
                "mlockall refused ({e}): needs CAP_IPC_LOCK or an RLIMIT_MEMLOCK above the process's size; page faults may delay dispatch"
            ));
        }
    }
    if let Some(p) = opts.fifo_priority {
        match set_realtime_priority(p) {
            Ok(()) => out.fifo_priority = Some(p),
            Err(e) => out.refused.push(format!(
                "SCHED_FIFO {p} refused ({e}): needs CAP_SYS_NICE or RLIMIT_RTPRIO >= {p}, and real-time time for this cgroup; dispatch runs at the default policy, so a busy host delays it"
            )),
        }
    }
    if let (None, Some(ns)) = (out.fifo_priority, opts.fair_slice_ns) {
        match set_thread_fair_slice(0, ns) {
            Ok(()) => out.fair_slice_ns = Some(ns),
            Err(e) => out.refused.push(format!(
                "fair-scheduler slice of {ns} ns refused ({e}): the kernel may predate custom slices"
            )),
        }
    }
    if out.refused.is_empty() {
        tracing::info!(setup = %out, "dispatch thread prepared");
    } else {
        for r in &out.refused {
            tracing::warn!(refused = %r, "dispatch thread: a timing aid is not available");
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Timeline

/// Counters of a [`Timeline`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimelineStats {
    /// Pauses seen (`PAUSE`, or `SNAPSHOT` while running).
    pub pauses: u64,
    /// Resumes seen (`RESUME`, `BOOT`).
    pub resumes: u64,
    /// Resumes implied by a guest-originated event (a block request or a
    /// sent frame) while the recording said the guest was paused.
    pub implied_resumes: u64,
    /// Events whose `mono_time_ns` was before an earlier event's (clamped).
    pub clock_regressions: u64,
}

/// The guest's running time since the cut, rebuilt from the events.
///
/// Feed every event after the cut in `seq` order to [`Timeline::observe`],
/// including events that are not delivered (a filter never hides pauses from
/// the timeline). An event's offset is the running time between the cut and
/// its `mono_time_ns`:
///
/// - `PAUSE`, and `SNAPSHOT` while running, stop the guest's time; `RESUME`
///   and `BOOT` start it again.
/// - A block request or a sent frame while paused means the guest ran: its
///   time counts from that event on ([`TimelineStats::implied_resumes`]).
/// - A `mono_time_ns` before the previous one is clamped to it, so offsets
///   never go backwards.
///
/// ```
/// use std::time::Duration;
/// use replayer::schedule::Timeline;
///
/// let t = Timeline::new(1_000, false);
/// assert_eq!(t.offset_at(1_500), Duration::from_nanos(500));
/// ```
#[derive(Debug, Clone)]
pub struct Timeline {
    running: bool,
    /// `mono_time_ns` at which the current running stretch began.
    run_since: u64,
    /// Guest time accumulated before `run_since` (or until the pause).
    accumulated: u64,
    last_mono: u64,
    pub stats: TimelineStats,
}

impl Timeline {
    /// A timeline starting at the cut (`cut_mono_ns`); `paused_at_cut` says
    /// whether the guest was paused there (the snapshot cut is taken
    /// paused, so its time starts at the next `RESUME`).
    pub fn new(cut_mono_ns: u64, paused_at_cut: bool) -> Self {
        Self {
            running: !paused_at_cut,
            run_since: cut_mono_ns,
            accumulated: 0,
            last_mono: cut_mono_ns,
            stats: TimelineStats::default(),
        }
    }

    /// A timeline from a manifest's cut, paused there.
    pub fn from_manifest(manifest: &SnapshotManifest) -> Self {
        Self::new(manifest.mono_time_ns, true)
    }

    /// Whether the recorded guest was running at the last observed event.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The guest-time offset at host monotonic time `mono_ns` (not before
    /// the last observed event), given the state now.
    pub fn offset_at(&self, mono_ns: u64) -> Duration {
        let t = mono_ns.max(self.last_mono);
        let ns = if self.running {
            self.accumulated + (t - self.run_since)
        } else {
            self.accumulated
        };
        Duration::from_nanos(ns)
    }

    /// Takes `event` into account and returns its guest-time offset.
    pub fn observe(&mut self, event: &Event) -> Duration {
        let mut t = event.mono_time_ns;
        if t < self.last_mono {
            self.stats.clock_regressions += 1;
            t = self.last_mono;
        }
        self.last_mono = t;
        let offset = self.offset_at(t);
        let pause = |s: &mut Self| {
            s.accumulated += t - s.run_since;
            s.running = false;
            s.stats.pauses += 1;
        };
        match &event.payload {
            Payload::Lifecycle(l) => match l.kind {
                LifecycleKind::Pause | LifecycleKind::Snapshot if self.running => pause(self),
                LifecycleKind::Resume | LifecycleKind::Boot if !self.running => {
                    self.running = true;
                    self.run_since = t;
                    self.stats.resumes += 1;
                }
                _ => {}
            },
            Payload::Block(_) if !self.running => self.implied_resume(t),
            Payload::Net(n) if !self.running && n.direction == Direction::Tx => {
                self.implied_resume(t)
            }
            _ => {}
        }
        offset
    }

    fn implied_resume(&mut self, t: u64) {
        self.running = true;
        self.run_since = t;
        self.stats.implied_resumes += 1;
    }
}

// ---------------------------------------------------------------------------
// Replay clock

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// Recorded guest time divided by this factor (0.1 to 100).
    Factor(f64),
    /// No waiting at all.
    AsFastAsPossible,
}

impl Speed {
    /// Recorded speed.
    pub const REALTIME: Speed = Speed::Factor(1.0);

    /// A checked factor in `[MIN_SPEED, MAX_SPEED]`.
    pub fn factor(f: f64) -> Result<Speed, ScheduleError> {
        if (MIN_SPEED..=MAX_SPEED).contains(&f) {
            Ok(Speed::Factor(f))
        } else {
            Err(ScheduleError::BadSpeed(f))
        }
    }

    /// The request form: `0` is as fast as possible, else a checked factor.
    pub fn from_request(f: f64) -> Result<Speed, ScheduleError> {
        if f == 0.0 {
            Ok(Speed::AsFastAsPossible)
        } else {
            Speed::factor(f)
        }
    }

    fn scale(self, d: Duration) -> Duration {
        match self {
            Speed::Factor(f) => Duration::from_secs_f64(d.as_secs_f64() / f),
            Speed::AsFastAsPossible => Duration::ZERO,
        }
    }
}

/// Where a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTo {
    /// Dispatch events up to and including this `seq`, then pause.
    Seq(u64),
    /// Dispatch events up to this guest-time offset, then pause.
    Time(Duration),
}

/// What the clock is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMode {
    Running,
    Paused,
    /// Dispatching this many more events without waiting, then pausing.
    Stepping(u64),
}

/// How an event was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchKind {
    /// At its due time, by the speed factor.
    Timed,
    /// As fast as possible.
    Immediate,
    /// By a step, without waiting.
    Stepped,
}

/// One event's dispatch: when it was due and when it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub seq: u64,
    /// Guest-time offset since the cut.
    pub guest_offset: Duration,
    /// When it was due (less the clock's lead, see
    /// [`ReplayClock::set_lead`]), since the clock was made; see
    /// [`ReplayClock::mono_ns_at`] for the host's monotonic clock.
    pub due: Duration,
    /// When it was released, since the clock was made.
    pub dispatched: Duration,
    pub kind: DispatchKind,
}

impl Dispatch {
    /// How late it went (zero if early, which the clock never is for timed
    /// dispatches).
    pub fn lateness(&self) -> Duration {
        self.dispatched.saturating_sub(self.due)
    }
}

/// Percentiles of dispatch lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimingSummary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl TimingSummary {
    /// Lateness percentiles of the timed dispatches in `dispatches`; `None`
    /// when there are none.
    pub fn of(dispatches: &[Dispatch]) -> Option<Self> {
        let mut l: Vec<Duration> = dispatches
            .iter()
            .filter(|d| d.kind == DispatchKind::Timed)
            .map(Dispatch::lateness)
            .collect();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            count: l.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: *l.last().expect("not empty"),
        })
    }
}

/// A snapshot of the clock's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockStatus {
    pub mode: ClockMode,
    pub speed: Speed,
    pub run_to: Option<RunTo>,
    /// Events dispatched so far.
    pub dispatched: u64,
    /// `seq` of the last dispatched event.
    pub last_seq: Option<u64>,
    /// Guest time reached (the last dispatched event's offset, or where a
    /// run to a time stopped).
    pub position: Duration,
    pub stopped: bool,
}

#[derive(Debug)]
struct State {
    mode: ClockMode,
    speed: Speed,
    run_to: Option<RunTo>,
    /// Real instant that corresponds to a guest offset, while running.
    anchor: Option<(Instant, Duration)>,
    position: Duration,
    dispatched: u64,
    last_seq: Option<u64>,
    stopped: bool,
    /// Timed events are released this long before they are due.
    lead: Duration,
    /// Bumped by every control change, so a waiter re-plans.
    generation: u64,
}

impl State {
    /// Where guest time is now: the anchor's guest offset plus scaled real
    /// time since, or the position when not running.
    fn guest_now(&self, now: Instant) -> Duration {
        match (self.anchor, self.speed) {
            (Some((at, g)), Speed::Factor(f)) => {
                (g + Duration::from_secs_f64(now.saturating_duration_since(at).as_secs_f64() * f))
                    .max(self.position)
            }
            _ => self.position,
        }
    }

    fn status(&self) -> ClockStatus {
        ClockStatus {
            mode: self.mode,
            speed: self.speed,
            run_to: self.run_to,
            dispatched: self.dispatched,
            last_seq: self.last_seq,
            position: self.position,
            stopped: self.stopped,
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State, Instant)) {
        let mut s = self.lock();
        let now = Instant::now();
        f(&mut s, now);
        s.generation += 1;
        drop(s);
        self.changed.notify_all();
    }
}

/// Paces the dispatch of events; see the [module docs](self).
///
/// The replay loop calls [`ReplayClock::wait`] for each event to deliver,
/// in order; it returns when the event is due. Controls go through a
/// [`ClockControl`], which may be used from any thread.
#[derive(Debug)]
pub struct ReplayClock {
    shared: Arc<Shared>,
    epoch: Instant,
    /// `CLOCK_MONOTONIC` at `epoch`, in nanoseconds.
    epoch_mono_ns: u64,
}

/// A handle that controls a [`ReplayClock`] from another thread.
#[derive(Debug, Clone)]
pub struct ClockControl {
    shared: Arc<Shared>,
}

impl ReplayClock {
    /// A running clock at `speed`, with guest time at the cut (offset 0).
    pub fn new(speed: Speed) -> Self {
        Self::with_mode(speed, ClockMode::Running)
    }

    /// A paused clock at `speed`.
    pub fn paused(speed: Speed) -> Self {
        Self::with_mode(speed, ClockMode::Paused)
    }

    fn with_mode(speed: Speed, mode: ClockMode) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    mode,
                    speed,
                    run_to: None,
                    anchor: None,
                    position: Duration::ZERO,
                    dispatched: 0,
                    last_seq: None,
                    stopped: false,
                    lead: Duration::ZERO,
                    generation: 0,
                }),
                changed: Condvar::new(),
            }),
            epoch: Instant::now(),
            epoch_mono_ns: mono_now_ns(),
        }
    }

    /// Releases every later timed event `lead` before it is due (an event
    /// due within `lead` of where guest time starts is released at once).
    /// The [`Dispatch::due`] of such an event is its release time, due time
    /// minus the lead; its [`Dispatch::guest_offset`] is unchanged, so a
    /// consumer schedules it at that offset on its own clock. Stepped and
    /// as-fast-as-possible events are not affected.
    pub fn set_lead(&mut self, lead: Duration) {
        self.shared.update(|s, _| s.lead = lead);
    }

    /// The lead set by [`ReplayClock::set_lead`].
    pub fn lead(&self) -> Duration {
        self.shared.lock().lead
    }

    /// `CLOCK_MONOTONIC` (see [`mono_now_ns`]) at `since_epoch` after the
    /// clock was made, such as a [`Dispatch::due`]; exact to the time
    /// between two clock reads when the clock was made.
    pub fn mono_ns_at(&self, since_epoch: Duration) -> u64 {
        self.epoch_mono_ns + since_epoch.as_nanos() as u64
    }

    /// Starts guest time at `offset` instead of the cut (for a window that
    /// starts later): the first event is due `(its offset - offset) / speed`
    /// after the clock runs.
    pub fn start_at(self, offset: Duration) -> Self {
        self.shared.update(|s, _| {
            s.position = offset;
            s.anchor = None;
        });
        self
    }

    /// Sets where guest time starts, like [`ReplayClock::start_at`], if
    /// nothing was dispatched yet; returns whether it did.
    pub fn set_origin(&mut self, offset: Duration) -> bool {
        let mut set = false;
        self.shared.update(|s, _| {
            if s.dispatched == 0 {
                s.position = offset;
                s.anchor = None;
                set = true;
            }
        });
        set
    }

    /// A handle for controlling this clock.
    pub fn control(&self) -> ClockControl {
        ClockControl {
            shared: self.shared.clone(),
        }
    }

    /// The clock's state.
    pub fn status(&self) -> ClockStatus {
        self.shared.lock().status()
    }

    /// Blocks until the event `seq` at `guest_offset` is due, and records
    /// its dispatch. Waits while the clock is paused (re-checking its state
    /// at least every 100 ms); returns [`ScheduleError::Stopped`] once the
    /// clock is stopped.
    pub fn wait(&mut self, seq: u64, guest_offset: Duration) -> Result<Dispatch, ScheduleError> {
        let mut s = self.shared.lock();
        loop {
            if s.stopped {
                return Err(ScheduleError::Stopped);
            }
            if s.mode != ClockMode::Paused {
                let reached = match s.run_to {
                    Some(RunTo::Seq(target)) => seq > target,
                    Some(RunTo::Time(target)) => guest_offset > target,
                    None => false,
                };
                if reached {
                    if let Some(RunTo::Time(target)) = s.run_to {
                        s.position = s.position.max(target);
                    }
                    s.run_to = None;
                    s.mode = ClockMode::Paused;
                    s.anchor = None;
                    s.generation += 1;
                    self.shared.changed.notify_all();
                }
            }
            let now = Instant::now();
            match s.mode {
                ClockMode::Paused => {
                    s = self.wait_changed(s, MAX_SLEEP);
                }
                ClockMode::Stepping(n) => {
                    s.mode = if n <= 1 {
                        ClockMode::Paused
                    } else {
                        ClockMode::Stepping(n - 1)
                    };
                    let at = now - self.epoch;
                    return Ok(self.dispatched(
                        s,
                        seq,
                        guest_offset,
                        at,
                        at,
                        DispatchKind::Stepped,
                    ));
                }
                ClockMode::Running => {
                    let speed = s.speed;
                    if speed == Speed::AsFastAsPossible {
                        let at = now - self.epoch;
                        return Ok(self.dispatched(
                            s,
                            seq,
                            guest_offset,
                            at,
                            at,
                            DispatchKind::Immediate,
                        ));
                    }
                    let position = s.position;
                    let (anchor_at, anchor_g) = *s.anchor.get_or_insert((now, position));
                    let due = anchor_at
                        + speed
                            .scale(guest_offset.saturating_sub(anchor_g))
                            .saturating_sub(s.lead);
                    if now >= due {
                        let due = due - self.epoch;
                        let at = now - self.epoch;
                        return Ok(self.dispatched(
                            s,
                            seq,
                            guest_offset,
                            due,
                            at,
                            DispatchKind::Timed,
                        ));
                    }
                    let left = due - now;
                    if left > FINAL {
                        s = self.wait_changed(s, (left - FINAL).min(MAX_SLEEP));
                        continue;
                    }
                    // The last stretch: without the lock, an absolute sleep
                    // to shortly before the due time, then a spin; then
                    // check that no control changed the plan meanwhile.
                    let generation = s.generation;
                    drop(s);
                    let due_mono = self.mono_ns_at(due - self.epoch);
                    if left > SPIN {
                        sleep_until_mono_ns(due_mono - SPIN.as_nanos() as u64);
                    }
                    loop {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        if due - now > SPIN_HARD {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    s = self.shared.lock();
                    if s.generation == generation && !s.stopped {
                        let at = Instant::now() - self.epoch;
                        let due = due - self.epoch;
                        return Ok(self.dispatched(
                            s,
                            seq,
                            guest_offset,
                            due,
                            at,
                            DispatchKind::Timed,
                        ));
                    }
                }
            }
        }
    }

    fn wait_changed<'a>(
        &self,
        s: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        let generation = s.generation;
        let (s, _) = self
            .shared
            .changed
            .wait_timeout_while(s, timeout, |s| s.generation == generation)
            .unwrap_or_else(|p| p.into_inner());
        s
    }

    fn dispatched(
        &self,
        mut s: MutexGuard<'_, State>,
        seq: u64,
        guest_offset: Duration,
        due: Duration,
        at: Duration,
        kind: DispatchKind,
    ) -> Dispatch {
        s.position = s.position.max(guest_offset);
        s.dispatched += 1;
        s.last_seq = Some(seq);
        if kind == DispatchKind::Stepped {
            s.anchor = None;
        }
        let paused = s.mode == ClockMode::Paused;
        drop(s);
        if paused {
            self.shared.changed.notify_all();
        }
        Dispatch {
            seq,
            guest_offset,
            due,
            dispatched: at,
            kind,
        }
    }
}

impl ClockControl {
    /// Pauses before the next event. Guest time stops where it is.
    pub fn pause(&self) {
        self.shared.update(|s, now| {
            if s.mode == ClockMode::Running {
                s.position = s.guest_now(now);
            }
            s.mode = ClockMode::Paused;
            s.anchor = None;
        });
    }

    /// Runs on from where guest time stopped (clearing a run-to target).
    pub fn resume(&self) {
        self.shared.update(|s, _| {
            s.mode = ClockMode::Running;
            s.run_to = None;
            s.anchor = None;
        });
    }

    /// Dispatches the next `n` events at once, without waiting for their
    /// due times, then pauses. `n = 0` just pauses.
    pub fn step(&self, n: u64) {
        self.shared.update(|s, now| {
            if s.mode == ClockMode::Running {
                s.position = s.guest_now(now);
            }
            s.mode = if n == 0 {
                ClockMode::Paused
            } else {
                ClockMode::Stepping(n)
            };
            s.run_to = None;
            s.anchor = None;
        });
    }

    /// Runs at the current speed until `target`, then pauses.
    pub fn run_to(&self, target: RunTo) {
        self.shared.update(|s, _| {
            if s.mode != ClockMode::Running {
                s.anchor = None;
            }
            s.mode = ClockMode::Running;
            s.run_to = Some(target);
        });
    }

    /// Changes the speed; guest time goes on from where it is.
    pub fn set_speed(&self, speed: Speed) {
        self.shared.update(|s, now| {
            if s.mode == ClockMode::Running {
                s.position = s.guest_now(now);
                s.anchor = Some((now, s.position));
            }
            s.speed = speed;
        });
    }

    /// Stops the clock: the current and every later [`ReplayClock::wait`]
    /// returns [`ScheduleError::Stopped`].
    pub fn stop(&self) {
        self.shared.update(|s, _| s.stopped = true);
    }

    /// The clock's state.
    pub fn status(&self) -> ClockStatus {
        self.shared.lock().status()
    }

    /// Waits up to `timeout` until the clock is paused (after a step or a
    /// run to a target); returns whether it is.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let s = self.shared.lock();
        let (s, _) = self
            .shared
            .changed
            .wait_timeout_while(s, timeout, |s| s.mode != ClockMode::Paused && !s.stopped)
            .unwrap_or_else(|p| p.into_inner());
        s.mode == ClockMode::Paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::{EnvSample, InstanceId, Lifecycle, NetFrame};

    fn ev(seq: u64, mono: u64, payload: Payload) -> Event {
        Event {
            instance: InstanceId::new("vm").unwrap(),
            seq,
            wall_time_ns: mono,
            mono_time_ns: mono,
            epoch: 1,
            payload,
        }
    }

    fn life(kind: LifecycleKind) -> Payload {
        Payload::Lifecycle(Lifecycle {
            kind,
            detail: String::new(),
            regs: vec![],
            gap: None,
            snapshot_id: None,
        })
    }

    fn env() -> Payload {
        Payload::Env(EnvSample {
            sensor: "t".into(),
            value: 1.0,
            unit: "c".into(),
        })
    }

    fn net(direction: Direction) -> Payload {
        Payload::Net(NetFrame {
            device: "eth0".into(),
            queue: 0,
            direction,
            frame: vec![0; 60],
        })
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn pauses_do_not_count() {
        let mut t = Timeline::new(1000 * MS, true);
        let ms = |d: Duration| d.as_millis() as u64;
        // Paused at the cut until the resume at +50 ms.
        assert_eq!(ms(t.observe(&ev(1, 1010 * MS, env()))), 0);
        assert_eq!(
            ms(t.observe(&ev(2, 1050 * MS, life(LifecycleKind::Resume)))),
            0
        );
        assert_eq!(ms(t.observe(&ev(3, 1150 * MS, env()))), 100);
        assert_eq!(
            ms(t.observe(&ev(4, 1200 * MS, life(LifecycleKind::Pause)))),
            150
        );
        assert_eq!(ms(t.observe(&ev(5, 1500 * MS, net(Direction::Rx)))), 150);
        assert_eq!(
            ms(t.observe(&ev(6, 1900 * MS, life(LifecycleKind::Resume)))),
            150
        );
        assert_eq!(ms(t.observe(&ev(7, 1950 * MS, env()))), 200);
        // A snapshot pauses; the guest's own frame shows it ran again.
        assert_eq!(
            ms(t.observe(&ev(8, 2000 * MS, life(LifecycleKind::Snapshot)))),
            250
        );
        assert_eq!(ms(t.observe(&ev(9, 2500 * MS, net(Direction::Tx)))), 250);
        assert_eq!(ms(t.observe(&ev(10, 2600 * MS, env()))), 350);
        assert_eq!(t.stats.pauses, 2);
        assert_eq!(t.stats.resumes, 2);
        assert_eq!(t.stats.implied_resumes, 1);
    }

    #[test]
    fn clock_regressions_are_clamped() {
        let mut t = Timeline::new(0, false);
        assert_eq!(t.observe(&ev(1, 100, env())), Duration::from_nanos(100));
        assert_eq!(t.observe(&ev(2, 50, env())), Duration::from_nanos(100));
        assert_eq!(t.stats.clock_regressions, 1);
    }

    #[test]
    fn speed_is_checked() {
        assert!(Speed::factor(0.1).is_ok());
        assert!(Speed::factor(100.0).is_ok());
        assert_eq!(Speed::factor(0.05), Err(ScheduleError::BadSpeed(0.05)));
        assert!(Speed::factor(101.0).is_err());
        assert!(Speed::factor(f64::NAN).is_err());
        assert_eq!(Speed::from_request(0.0), Ok(Speed::AsFastAsPossible));
    }

    #[test]
    fn stepping_is_deterministic() {
        let mut clock = ReplayClock::paused(Speed::REALTIME);
        let control = clock.control();
        control.step(3);
        for seq in 1..=3 {
            // Due an hour apart, released at once.
            let d = clock.wait(seq, Duration::from_secs(3600 * seq)).unwrap();
            assert_eq!(d.kind, DispatchKind::Stepped);
        }
        let status = control.status();
        assert_eq!(status.mode, ClockMode::Paused);
        assert_eq!(status.dispatched, 3);
        assert_eq!(status.last_seq, Some(3));
        control.stop();
        assert_eq!(
            clock.wait(4, Duration::from_secs(4 * 3600)),
            Err(ScheduleError::Stopped)
        );
    }

    fn timer_slack() -> i32 {
        // SAFETY: PR_GET_TIMERSLACK takes no pointer.
        unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) }
    }

    #[test]
    fn an_ordinary_dispatch_thread_gets_a_fine_timer_slack() {
        std::thread::spawn(|| {
            let setup = prepare_dispatch_thread(&RealtimeOptions::UNPRIVILEGED);
            assert_eq!(setup.timer_slack_ns, Some(1));
            assert_eq!(setup.fifo_priority, None);
            assert!(!setup.memory_locked);
            assert_eq!(timer_slack(), 1);
            // SAFETY: sched_getscheduler takes a pid only; 0 is this thread.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            match setup.fair_slice_ns {
                Some(ns) => {
                    assert_eq!(ns, 100_000);
                    assert!(setup.refused.is_empty(), "{setup}");
                    assert_eq!(
                        setup.to_string(),
                        "default policy, timer slack 1 ns, fair slice 100 us"
                    );
                }
                None => assert!(setup.refused[0].contains("slice"), "{setup}"),
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn real_time_priority_is_applied_or_its_refusal_named() {
        std::thread::spawn(|| {
            let opts = RealtimeOptions {
                fifo_priority: Some(5),
                ..RealtimeOptions::NONE
            };
            let setup = prepare_dispatch_thread(&opts);
            // SAFETY: sched_getscheduler takes a pid only; 0 is this thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            match setup.fifo_priority {
                Some(p) => {
                    assert_eq!(p, 5);
                    assert_eq!(policy, libc::SCHED_FIFO);
                    assert!(setup.refused.is_empty());
                }
                None => {
                    assert_ne!(policy, libc::SCHED_FIFO);
                    assert_eq!(setup.refused.len(), 1);
                    assert!(setup.refused[0].contains("SCHED_FIFO 5 refused"));
                }
            }
            // A priority out of range is refused by every host, with the
            // reason in the setup's text.
            let bad = prepare_dispatch_thread(&RealtimeOptions {
                fifo_priority: Some(0),
                ..RealtimeOptions::NONE
            });
            assert_eq!(bad.fifo_priority, None);
            assert!(bad.to_string().contains("SCHED_FIFO 0 refused"), "{bad}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn summary_percentiles() {
        let d = |late_us: u64| Dispatch {
            seq: 1,
            guest_offset: Duration::ZERO,
            due: Duration::from_millis(1),
            dispatched: Duration::from_millis(1) + Duration::from_micros(late_us),
            kind: DispatchKind::Timed,
        };
        let all: Vec<_> = (1..=100).map(d).collect();
        let s = TimingSummary::of(&all).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_micros(51));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        assert!(TimingSummary::of(&[]).is_none());
    }
}
