//! Restore milestones for profiling: off unless [`enable`] was called (the
//! `vmm` binary does with `VMR_VMM_TIMINGS=1`), then each [`stamp`] records
//! a stage name and `CLOCK_MONOTONIC` in nanoseconds (the clock `Instant`
//! reads, so another process can compare with its own readings) until
//! [`take`] hands them over. A stamp while disabled costs one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ENABLED: AtomicBool = AtomicBool::new(false);
static STAMPS: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Starts recording stamps (for the whole process).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether stamps are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records that `stage` was reached now, if enabled.
pub fn stamp(stage: &'static str) {
    if enabled() {
        let now = monotonic_ns();
        STAMPS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stage, now));
    }
}

/// The stamps recorded so far, in the order they were taken (clears them).
pub fn take() -> Vec<(&'static str, u64)> {
    std::mem::take(&mut *STAMPS.lock().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_only_when_enabled() {
        stamp("before");
        assert!(take().iter().all(|(s, _)| *s != "before"));
        enable();
        stamp("a");
        stamp("b");
        let t = take();
        let a = t.iter().find(|(s, _)| *s == "a").expect("a").1;
        let b = t.iter().find(|(s, _)| *s == "b").expect("b").1;
        assert!(a <= b);
        assert!(take().iter().all(|(s, _)| *s != "a"));
    }
}
