//! Counters of a backend, readable as a [`MetricsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics from the device threads.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests (block) or frames (net) completed.
    pub requests: AtomicU64,
    /// Payload bytes moved (read + written, or frame bytes).
    pub bytes: AtomicU64,
    /// Records handed to the capture queue.
    pub recorded: AtomicU64,
    /// Records dropped because the capture queue was full (policy `drop`).
    pub dropped: AtomicU64,
    /// GAP events written (for drops, sink errors and restarts).
    pub gaps: AtomicU64,
    /// Sink writes or syncs that failed.
    pub sink_errors: AtomicU64,
    /// Times the spool was found full (shipping stalled).
    pub spool_full: AtomicU64,
    /// Records dropped because the spool was full (policy `drop`).
    pub spool_dropped: AtomicU64,
    /// Milliseconds the sink waited for a full spool (policy `block`).
    pub spool_blocked_ms: AtomicU64,
    /// Times the sink waited for a full spool up to the block bound and
    /// then dropped records with a GAP.
    pub spool_bound_hits: AtomicU64,
    /// Times writing the spool failed because its filesystem had no space
    /// left (ENOSPC, EDQUOT); the records then wait or are dropped with a
    /// GAP like those of a full spool.
    pub spool_no_space: AtomicU64,
    /// Times the capture was made durable (FLUSH barriers and shutdown).
    pub syncs: AtomicU64,
    /// Descriptor chains refused as malformed.
    pub malformed: AtomicU64,
    /// Requests completed with an I/O error (including injected ones).
    pub io_errors: AtomicU64,
    /// Faults injected by a fault hook.
    pub faults: AtomicU64,
    /// Frames taken from a replay source.
    pub injected: AtomicU64,
    /// Block image writer threads that died (their writes failed with
    /// `IOERR`; the queue then writes on its device thread).
    pub writer_failures: AtomicU64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub recorded: u64,
    pub dropped: u64,
    pub gaps: u64,
    pub sink_errors: u64,
    pub spool_full: u64,
    pub spool_dropped: u64,
    pub spool_blocked_ms: u64,
    pub spool_bound_hits: u64,
    pub spool_no_space: u64,
    pub syncs: u64,
    pub malformed: u64,
    pub io_errors: u64,
    pub faults: u64,
    pub injected: u64,
    pub writer_failures: u64,
}

impl Metrics {
    /// Adds `n` to a counter.
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: l(&self.requests),
            bytes: l(&self.bytes),
            recorded: l(&self.recorded),
            dropped: l(&self.dropped),
            gaps: l(&self.gaps),
            sink_errors: l(&self.sink_errors),
            spool_full: l(&self.spool_full),
            spool_dropped: l(&self.spool_dropped),
            spool_blocked_ms: l(&self.spool_blocked_ms),
            spool_bound_hits: l(&self.spool_bound_hits),
            spool_no_space: l(&self.spool_no_space),
            syncs: l(&self.syncs),
            malformed: l(&self.malformed),
            io_errors: l(&self.io_errors),
            faults: l(&self.faults),
            injected: l(&self.injected),
            writer_failures: l(&self.writer_failures),
        }
    }
}

impl MetricsSnapshot {
    /// Logs the snapshot at info level.
    pub fn log(&self, device: &str) {
        tracing::info!(
            device,
            requests = self.requests,
            bytes = self.bytes,
            recorded = self.recorded,
            dropped = self.dropped,
            gaps = self.gaps,
            sink_errors = self.sink_errors,
            spool_full = self.spool_full,
            spool_dropped = self.spool_dropped,
            spool_blocked_ms = self.spool_blocked_ms,
            spool_bound_hits = self.spool_bound_hits,
            spool_no_space = self.spool_no_space,
            syncs = self.syncs,
            malformed = self.malformed,
            io_errors = self.io_errors,
            faults = self.faults,
            injected = self.injected,
            writer_failures = self.writer_failures,
            "metrics"
        );
    }
}
