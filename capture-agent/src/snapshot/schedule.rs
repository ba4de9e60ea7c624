//! Scheduled snapshots, one schedule per host, staggered across its
//! instances.
//!
//! The rule:
//!
//! - Instances scheduled with the same period `p` form a group, in the
//!   order they joined. The group's start `t0` is when its first member
//!   joined; it stays while the group has members.
//! - Member `k` of a group of `n` is snapshotted at `t0 + k·p/n + j·p`
//!   (j = 0, 1, ...): each instance every `p` (t, t+p, t+2p, ...), and the
//!   group's cuts spread evenly over the period instead of all landing at
//!   once. The first member is cut when it joins.
//! - An instance's next cut is always its first slot no earlier than half a
//!   period after its last scheduled cut (so a re-spread never cuts it
//!   twice in quick succession).
//! - When a member joins or leaves (launch, stop, or the instance found
//!   stopped), its group is re-spread: every member gets its new `k` and
//!   `n`, and its next cut is its first new slot that is no earlier than
//!   now, or than its pending cut if that is already due (and the
//!   half-period rule above).
//! - A scheduled cut starts only while no other cut of the engine (scheduled
//!   or on demand) is between its start and the guest's resume, so the
//!   host never pauses two guests for scheduled snapshots at once; a due cut
//!   waits for that. On-demand snapshots do not wait.
//! - A slot missed while the instance's previous snapshot still runs is
//!   skipped, not queued. A cut delayed by the wait above still runs late,
//!   and the half-period rule then moves the instance's next cut to a later
//!   slot. A guest that crashed or exited is not cut.
//!
//! `capture-agent serve` runs one [`HostSchedule`] in its engine: a launch
//! with a period joins it, a stop leaves it. [`Schedule`] runs a schedule of
//! its own over a fixed set of instances.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vmr_hypervisor::RunState;

use super::{Inner, SnapshotEngine};
use crate::instance::RecordedInstance;
use crate::service::{SnapshotControl, SnapshotRequest};

/// When member `index` of a group of `count` takes its `k`-th snapshot, as
/// an offset from the group's start.
pub fn slot(period: Duration, index: usize, count: usize, k: u32) -> Duration {
    let count = count.max(1) as u32;
    period * (index as u32) / count + period * k
}

/// The first slot of member `index` of `count` that is at or after
/// `not_before` (`t0` the group's start).
pub fn next_slot(
    t0: Instant,
    period: Duration,
    index: usize,
    count: usize,
    not_before: Instant,
) -> Instant {
    let first = t0 + slot(period, index, count, 0);
    if not_before <= first || period.is_zero() {
        return first;
    }
    let behind = (not_before - first).as_nanos();
    let p = period.as_nanos();
    let k = behind.div_ceil(p);
    first + Duration::from_nanos((k * p).min(u64::MAX as u128) as u64)
}

/// How a schedule reaches its engine: its own handle, or the engine that
/// owns the schedule (weakly, so the schedule does not keep it alive).
enum EngineRef {
    Strong(SnapshotEngine),
    Weak(Weak<Inner>),
}

impl EngineRef {
    fn get(&self) -> Option<SnapshotEngine> {
        match self {
            EngineRef::Strong(e) => Some(e.clone()),
            EngineRef::Weak(w) => w.upgrade().map(|inner| SnapshotEngine { inner }),
        }
    }
}

struct Member {
    inst: Arc<RecordedInstance>,
    name: String,
    period: Duration,
    request: SnapshotRequest,
    /// Index and size of its group, as last spread.
    index: usize,
    count: usize,
    next: Instant,
    last: Option<Instant>,
    /// A scheduled snapshot of it started (incremental requests fall back
    /// to full before that).
    taken: bool,
}

#[derive(Default)]
struct State {
    stop: bool,
    running: bool,
    /// Members in join order.
    members: Vec<Member>,
    /// Start of each period's group.
    starts: BTreeMap<Duration, Instant>,
}

impl State {
    /// Re-spreads the group of `period` at `now`.
    fn spread(&mut self, period: Duration, now: Instant) {
        let idx: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].period == period)
            .collect();
        if idx.is_empty() {
            self.starts.remove(&period);
            return;
        }
        let t0 = *self.starts.entry(period).or_insert(now);
        let n = idx.len();
        for (k, &i) in idx.iter().enumerate() {
            let m = &mut self.members[i];
            // A cut already due stays due (unless the half-period rule
            // moves it).
            let pending = now.min(m.next);
            let not_before = match m.last {
                Some(l) => pending.max(l + period / 2),
                None => pending,
            };
            m.index = k;
            m.count = n;
            m.next = next_slot(t0, period, k, n, not_before);
            tracing::info!(
                instance = %m.name,
                period_s = period.as_secs_f64(),
                slot = k,
                of = n,
                offset_s = slot(period, k, n, 0).as_secs_f64(),
                next_in_ms = m.next.saturating_duration_since(now).as_millis() as u64,
                "snapshot schedule spread"
            );
        }
    }

    fn remove(&mut self, name: &str, now: Instant) -> bool {
        let Some(i) = self.members.iter().position(|m| m.name == name) else {
            return false;
        };
        let m = self.members.remove(i);
        self.spread(m.period, now);
        true
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The scheduled snapshots of every instance of a host (see the module's
/// rule). Its thread runs while it has members.
pub struct HostSchedule {
    shared: Arc<Shared>,
    engine: Arc<EngineRef>,
}

impl HostSchedule {
    pub(super) fn for_engine(inner: Weak<Inner>) -> Self {
        Self::with(EngineRef::Weak(inner))
    }

    fn with(engine: EngineRef) -> Self {
        HostSchedule {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
            engine: Arc::new(engine),
        }
    }

    /// Adds `inst` with its period (non-zero) and request, replacing a
    /// member of the same name, and re-spreads its group.
    pub fn join(
        &self,
        inst: Arc<RecordedInstance>,
        period: Duration,
        request: SnapshotRequest,
    ) -> std::io::Result<()> {
        let now = Instant::now();
        let name = inst.id().to_string();
        let mut st = lock(&self.shared);
        st.remove(&name, now);
        st.members.push(Member {
            inst,
            name,
            period,
            request,
            index: 0,
            count: 1,
            next: now,
            last: None,
            taken: false,
        });
        st.spread(period, now);
        st.stop = false;
        if !st.running {
            let shared = self.shared.clone();
            let engine = self.engine.clone();
            std::thread::Builder::new()
                .name("snapshot-schedule".into())
                .spawn(move || run(&shared, &engine))?;
            st.running = true;
        }
        drop(st);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Removes the instance named `name` and re-spreads its group; whether
    /// it was a member. A snapshot already started finishes.
    pub fn leave(&self, name: &str) -> bool {
        let was = lock(&self.shared).remove(name, Instant::now());
        self.shared.wake.notify_all();
        was
    }

    /// Each member's name, period, and slot `(index, count)` in its group.
    pub fn members(&self) -> Vec<(String, Duration, usize, usize)> {
        lock(&self.shared)
            .members
            .iter()
            .map(|m| (m.name.clone(), m.period, m.index, m.count))
            .collect()
    }

    fn halt(&self) {
        let mut st = lock(&self.shared);
        st.stop = true;
        st.members.clear();
        st.starts.clear();
        drop(st);
        self.shared.wake.notify_all();
    }
}

impl Drop for HostSchedule {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The schedule's thread: starts each due cut, one at a time.
fn run(shared: &Shared, engine: &EngineRef) {
    loop {
        let mut st = lock(shared);
        if st.stop || st.members.is_empty() {
            st.running = false;
            return;
        }
        let now = Instant::now();
        // Instances stopped without a leave.
        let gone: Vec<String> = st
            .members
            .iter()
            .filter(|m| m.inst.is_stopped())
            .map(|m| m.name.clone())
            .collect();
        for g in &gone {
            st.remove(g, now);
            tracing::info!(instance = %g, "snapshot schedule stopped (instance stopped)");
        }
        let due = (0..st.members.len())
            .filter(|&i| st.members[i].next <= now)
            .min_by_key(|&i| st.members[i].next);
        let Some(i) = due else {
            let wait = st
                .members
                .iter()
                .map(|m| m.next.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let _ = shared
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let Some(eng) = engine.get() else {
            st.running = false;
            return;
        };
        if eng.cuts_running() > 0 {
            drop(st);
            drop(eng);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (inst, mut req, name) = {
            let m = &st.members[i];
            let t0 = st.starts.get(&m.period).copied().unwrap_or(now);
            let next = next_slot(t0, m.period, m.index, m.count, now + m.period / 2);
            let m = &mut st.members[i];
            m.next = next;
            m.last = Some(now);
            let mut req = m.request.clone();
            req.incremental &= m.taken;
            (m.inst.clone(), req, m.name.clone())
        };
        drop(st);
        if !matches!(inst.run_state(), Some(RunState::Running | RunState::Paused)) {
            continue;
        }
        req.pin = false;
        match eng.take(inst, req) {
            Ok(op) => {
                if let Some(m) = lock(shared).members.iter_mut().find(|m| m.name == name) {
                    m.taken = true;
                }
                tracing::info!(instance = %name, operation = %op.id, "scheduled snapshot started");
            }
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "scheduled snapshot not started")
            }
        }
    }
}

/// A schedule of its own over a fixed set of instances sharing one period
/// (staggered by the module's rule, in the order given). Dropping it stops
/// it.
pub struct Schedule {
    host: HostSchedule,
}

impl Schedule {
    /// Snapshots each of `instances` every `period` (non-zero), staggered;
    /// `request` says full or incremental (an incremental request falls
    /// back to full for an instance's first snapshot).
    pub fn start(
        engine: SnapshotEngine,
        instances: Vec<Arc<RecordedInstance>>,
        period: Duration,
        request: SnapshotRequest,
    ) -> std::io::Result<Self> {
        let host = HostSchedule::with(EngineRef::Strong(engine));
        for inst in instances {
            host.join(inst, period, request.clone())?;
        }
        Ok(Self { host })
    }

    /// Stops the schedule (a snapshot already started finishes).
    pub fn stop(self) {
        self.host.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_staggered_by_a_share_of_the_period() {
        let p = Duration::from_secs(60);
        assert_eq!(slot(p, 0, 2, 0), Duration::ZERO);
        assert_eq!(slot(p, 1, 2, 0), Duration::from_secs(30));
        assert_eq!(slot(p, 0, 2, 2), Duration::from_secs(120));
        assert_eq!(slot(p, 1, 2, 1), Duration::from_secs(90));
        assert_eq!(slot(p, 2, 3, 0), Duration::from_secs(40));
    }

    #[test]
    fn next_slot_is_the_first_at_or_after() {
        let t0 = Instant::now();
        let p = Duration::from_secs(60);
        let s = Duration::from_secs;
        assert_eq!(next_slot(t0, p, 1, 2, t0), t0 + s(30));
        assert_eq!(next_slot(t0, p, 1, 2, t0 + s(30)), t0 + s(30));
        assert_eq!(next_slot(t0, p, 1, 2, t0 + s(31)), t0 + s(90));
        assert_eq!(next_slot(t0, p, 0, 3, t0 + s(121)), t0 + s(180));
        assert_eq!(next_slot(t0, p, 2, 3, t0 + s(100)), t0 + s(100));
    }

    #[test]
    fn joins_and_leaves_re_spread_a_group() {
        // Without instances: the spreading rule on bare slots. Three
        // members of period 60 s joined at t0, t0+1 s, t0+2 s.
        let t0 = Instant::now();
        let p = Duration::from_secs(60);
        let s = Duration::from_secs;
        // After all three joined: 0 s (already cut at t0), 20 s, 40 s.
        assert_eq!(next_slot(t0, p, 1, 3, t0 + s(2)), t0 + s(20));
        assert_eq!(next_slot(t0, p, 2, 3, t0 + s(2)), t0 + s(40));
        // The first was cut at t0: its next is no earlier than 30 s later.
        assert_eq!(next_slot(t0, p, 0, 3, t0 + s(30)), t0 + s(60));
        // The second leaves at 25 s after its cut at 20 s: the third moves
        // to 30 s (n = 2), no earlier than half a period after its last
        // cut (none yet), so at 30 s.
        assert_eq!(next_slot(t0, p, 1, 2, t0 + s(25)), t0 + s(30));
    }
}
