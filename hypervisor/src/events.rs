//! Lifecycle events and console output, fanned out to every subscriber.
//!
//! Each subscriber has its own unbounded queue, so one slow or absent
//! consumer never takes events from another. Lifecycle events are also kept
//! in a history that a new subscriber receives first: a subscriber that
//! joins after boot still sees the boot event. Console output is not kept in
//! the history (it goes to the console file); a console subscriber sees what
//! the guest prints after it subscribed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use vmr_proto::domain::{Lifecycle, LifecycleKind};

/// Lifecycle events kept for late subscribers. A long-lived instance emits a
/// handful per snapshot; beyond this the oldest are forgotten (subscribers
/// already attached still get every event).
pub const HISTORY_LIMIT: usize = 4096;

/// Console chunks kept for new console subscribers.
pub const CONSOLE_TAIL_CHUNKS: usize = 256;

/// One lifecycle change of an instance, with when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverEvent {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub wall_time_ns: u64,
    /// Host `CLOCK_MONOTONIC`, nanoseconds.
    pub mono_time_ns: u64,
    /// What happened.
    pub lifecycle: Lifecycle,
}

impl DriverEvent {
    /// An event of `kind` stamped now.
    pub fn now(kind: LifecycleKind, detail: impl Into<String>) -> Self {
        let (wall_time_ns, mono_time_ns) = now_ns();
        DriverEvent {
            wall_time_ns,
            mono_time_ns,
            lifecycle: Lifecycle {
                kind,
                detail: detail.into(),
                regs: Vec::new(),
                gap: None,
                snapshot_id: None,
            },
        }
    }

    /// The kind of the lifecycle change.
    pub fn kind(&self) -> LifecycleKind {
        self.lifecycle.kind
    }

    /// Whether the instance no longer runs guest code after this event
    /// (a crash, a shutdown, a fault or an internal error).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.lifecycle.kind,
            LifecycleKind::Crash
                | LifecycleKind::Shutdown
                | LifecycleKind::TripleFault
                | LifecycleKind::InternalError
        )
    }
}

/// Wall-clock and monotonic time now, in nanoseconds.
pub fn now_ns() -> (u64, u64) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    (wall, mono)
}

/// A fan-out of values to every live subscriber.
pub struct Bus<T: Clone> {
    inner: Arc<Mutex<BusInner<T>>>,
}

struct BusInner<T> {
    subscribers: Vec<Sender<T>>,
    history: Option<std::collections::VecDeque<T>>,
    limit: usize,
}

impl<T: Clone> Clone for Bus<T> {
    fn clone(&self) -> Self {
        Bus {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Clone> std::fmt::Debug for Bus<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Bus")
            .field("subscribers", &inner.subscribers.len())
            .field("history", &inner.history.as_ref().map(|h| h.len()))
            .finish()
    }
}

impl<T: Clone> Bus<T> {
    /// A bus that replays its history (the last [`HISTORY_LIMIT`] values)
    /// to new subscribers.
    pub fn with_history() -> Self {
        Self::with_tail(HISTORY_LIMIT)
    }

    /// A bus that replays its last `limit` values to new subscribers.
    pub fn with_tail(limit: usize) -> Self {
        Bus {
            inner: Arc::new(Mutex::new(BusInner {
                subscribers: Vec::new(),
                history: Some(std::collections::VecDeque::new()),
                limit: limit.max(1),
            })),
        }
    }

    /// A bus without history.
    pub fn live() -> Self {
        Bus {
            inner: Arc::new(Mutex::new(BusInner {
                subscribers: Vec::new(),
                history: None,
                limit: 0,
            })),
        }
    }

    /// Sends `value` to every subscriber; subscribers that hung up are
    /// removed.
    pub fn publish(&self, value: T) {
        let mut inner = self.inner.lock();
        inner.subscribers.retain(|s| s.send(value.clone()).is_ok());
        let limit = inner.limit;
        if let Some(h) = inner.history.as_mut() {
            if h.len() == limit {
                h.pop_front();
            }
            h.push_back(value);
        }
    }

    /// A new subscription: the history first (if kept), then every value
    /// published from now on.
    pub fn subscribe(&self) -> Subscription<T> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut inner = self.inner.lock();
        if let Some(h) = inner.history.as_ref() {
            for v in h {
                // The receiver is alive (we hold it), so this cannot fail.
                let _ = tx.send(v.clone());
            }
        }
        inner.subscribers.push(tx);
        Subscription { rx }
    }

    /// Everything in the history (empty for a live bus).
    pub fn history(&self) -> Vec<T> {
        self.inner
            .lock()
            .history
            .as_ref()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// One subscriber's queue.
#[derive(Debug)]
pub struct Subscription<T> {
    rx: Receiver<T>,
}

impl<T> Subscription<T> {
    /// The next value, waiting at most `timeout`; `None` on timeout or when
    /// the source is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<T> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next value without waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Waits at most `timeout` for a value that `pred` accepts; values it
    /// rejects are consumed. `Err(true)` when the source is gone, `Err(false)`
    /// on timeout.
    pub fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&T) -> bool) -> Result<T, bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(false),
                Err(RecvTimeoutError::Disconnected) => return Err(true),
            }
        }
    }

    /// The underlying receiver, for `select!`.
    pub fn receiver(&self) -> &Receiver<T> {
        &self.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_sees_every_event_and_late_ones_get_history() {
        let bus = Bus::with_history();
        let a = bus.subscribe();
        bus.publish(DriverEvent::now(LifecycleKind::Boot, "boot"));
        let b = bus.subscribe();
        bus.publish(DriverEvent::now(LifecycleKind::Pause, "pause"));
        let kinds = |s: &Subscription<DriverEvent>| {
            std::iter::from_fn(|| s.try_recv())
                .map(|e| e.kind())
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&a), vec![LifecycleKind::Boot, LifecycleKind::Pause]);
        assert_eq!(kinds(&b), vec![LifecycleKind::Boot, LifecycleKind::Pause]);
    }

    #[test]
    fn dropped_subscribers_are_removed() {
        let bus: Bus<u32> = Bus::live();
        let a = bus.subscribe();
        drop(bus.subscribe());
        bus.publish(1);
        assert_eq!(format!("{bus:?}"), "Bus { subscribers: 1, history: None }");
        assert_eq!(a.try_recv(), Some(1));
        assert_eq!(a.wait_for(Duration::from_millis(10), |_| true), Err(false));
    }
}
