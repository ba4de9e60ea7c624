//! Periodic snapshots, staggered across the instances of one schedule: with
//! `n` instances and period `p`, instance `i` is snapshotted at
//! `t0 + i·p/n + k·p` (k = 0, 1, ...), so the schedule's cuts spread evenly
//! over the period instead of all landing at once. `capture-agent serve`
//! starts one schedule per instance at its launch, so instances launched
//! together are not spread against each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmr_hypervisor::RunState;

use super::SnapshotEngine;
use crate::instance::RecordedInstance;
use crate::service::{SnapshotControl, SnapshotRequest};

/// When instance `index` of `count` takes its `k`-th scheduled snapshot,
/// as an offset from the schedule's start.
pub fn slot(period: Duration, index: usize, count: usize, k: u32) -> Duration {
    let count = count.max(1) as u32;
    period * (index as u32) / count + period * k
}

/// A running schedule. Dropping it stops it.
pub struct Schedule {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Schedule {
    /// Snapshots each of `instances` every `period`, staggered; `request`
    /// says full or incremental (an incremental request falls back to
    /// full for an instance's first snapshot).
    pub fn start(
        engine: SnapshotEngine,
        instances: Vec<Arc<RecordedInstance>>,
        period: Duration,
        request: SnapshotRequest,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-schedule".into())
            .spawn(move || {
                let t0 = Instant::now();
                let n = instances.len();
                let mut next_k = vec![0u32; n];
                let mut taken = vec![false; n];
                while !s.load(Ordering::Acquire) {
                    let now = t0.elapsed();
                    for (i, inst) in instances.iter().enumerate() {
                        if now < slot(period, i, n, next_k[i]) {
                            continue;
                        }
                        // A slot missed while the previous snapshot ran is
                        // skipped, not queued.
                        while slot(period, i, n, next_k[i]) <= now {
                            next_k[i] += 1;
                        }
                        // A guest that crashed or exited is not cut.
                        if !matches!(
                            inst.run_state(),
                            Some(RunState::Running | RunState::Paused)
                        ) {
                            continue;
                        }
                        let mut req = request.clone();
                        req.incremental &= taken[i];
                        match engine.take(inst.clone(), req) {
                            Ok(op) => {
                                taken[i] = true;
                                tracing::info!(instance = %inst.id(), operation = %op.id, "scheduled snapshot started");
                            }
                            Err(e) => {
                                tracing::warn!(instance = %inst.id(), error = %e, "scheduled snapshot not started")
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the schedule (a snapshot already started finishes).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.halt();
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
}
