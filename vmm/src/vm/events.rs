//! Fan-out of the VM's events to every subscriber.
//!
//! Every [`EventHub::subscribe`] gets its own receiver, which sees every
//! event emitted after it subscribed, in emission order.
//! [`EventHub::subscribe_with_history`] first replays the last
//! [`HISTORY_LEN`] events (preceded by a gap event when earlier ones have
//! left the history), so a subscriber that comes after `start` still sees
//! `Boot`. Subscribers never take events from each other. Emitting never
//! blocks (vCPU threads emit), so each subscriber has a bounded queue of
//! [`SUBSCRIBER_CAPACITY`] events. Policy when a live subscriber's queue is
//! full: the event is not queued for it, but it is counted, and before the
//! next event that finds room the subscriber receives a
//! [`LifecycleKind::Gap`] event whose `gap` says how many events it missed
//! and the number of the first one (events are numbered from 0 per VM).
//! Nothing is dropped silently. A subscriber whose receiver was dropped is
//! removed on the next emit.
//!
//! The VM's events are caused by control calls (start, pause, resume,
//! snapshot), by vCPU debug stops (the vCPU stays stopped until it is
//! resumed) and by the guest stopping, so a subscriber that reads now and
//! then never comes near the bound.

use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use vmr_proto::{Gap, Lifecycle, LifecycleKind};

use crate::vcpu::VmEvent;

/// Events queued for one subscriber before it counts as lagging.
pub const SUBSCRIBER_CAPACITY: usize = 1024;
/// Events kept for [`EventHub::subscribe_with_history`] (a quarter of the
/// queue, so a replayed history leaves room for new events).
pub const HISTORY_LEN: usize = SUBSCRIBER_CAPACITY / 4;

struct Subscriber {
    tx: Sender<VmEvent>,
    /// Number of the first event this subscriber missed (valid while
    /// `missed > 0`).
    first_missed: u64,
    /// Consecutive events not queued because the queue was full.
    missed: u64,
}

#[derive(Default)]
struct Inner {
    subscribers: Vec<Subscriber>,
    /// Number of the next event.
    next: u64,
    /// The last events, oldest first.
    history: std::collections::VecDeque<VmEvent>,
    /// The first event that stopped the VM.
    stop: Option<Lifecycle>,
}

/// The VM's event fan-out (see the module documentation for the policy).
pub struct EventHub {
    capacity: usize,
    history_len: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("EventHub")
            .field("capacity", &self.capacity)
            .field("subscribers", &g.subscribers.len())
            .field("emitted", &g.next)
            .finish()
    }
}

impl Default for EventHub {
    fn default() -> Self {
        Self::with_capacity(SUBSCRIBER_CAPACITY)
    }
}

/// Whether a lifecycle kind means the VM stopped.
pub fn is_stop(kind: LifecycleKind) -> bool {
    matches!(
        kind,
        LifecycleKind::Shutdown
            | LifecycleKind::TripleFault
            | LifecycleKind::InternalError
            | LifecycleKind::Crash
    )
}

fn lag_gap(first: u64, count: u64, capacity: usize) -> VmEvent {
    gap_event(
        first,
        count,
        format!(
            "this subscriber fell {capacity} events behind; {count} events were not delivered to it"
        ),
    )
}

fn gap_event(first: u64, count: u64, reason: String) -> VmEvent {
    VmEvent::Lifecycle(Lifecycle {
        kind: LifecycleKind::Gap,
        detail: reason.clone(),
        regs: Vec::new(),
        gap: Some(Gap {
            first_seq: first,
            count,
            reason,
        }),
        snapshot_id: None,
    })
}

impl EventHub {
    /// A hub whose subscribers each queue up to `capacity` events (at
    /// least 4) and which keeps the last `capacity / 4` for late
    /// subscribers.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(4);
        EventHub {
            capacity,
            history_len: capacity / 4,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new receiver of every event emitted from now on.
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        self.lock().subscribers.push(Subscriber {
            tx,
            first_missed: 0,
            missed: 0,
        });
        rx
    }

    /// A new receiver that first gets the kept history (the last
    /// `capacity / 4` events, [`HISTORY_LEN`] by default, after a gap event
    /// counting the earlier ones if any have left it), then every event
    /// emitted from now on.
    pub fn subscribe_with_history(&self) -> Receiver<VmEvent> {
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        let mut g = self.lock();
        let first = g.next - g.history.len() as u64;
        // The history is shorter than the queue, so these sends succeed.
        if first > 0 {
            let _ = tx.try_send(gap_event(
                0,
                first,
                format!(
                    "the history keeps the last {} events; the {first} before them are gone",
                    self.history_len
                ),
            ));
        }
        for e in &g.history {
            let _ = tx.try_send(e.clone());
        }
        g.subscribers.push(Subscriber {
            tx,
            first_missed: 0,
            missed: 0,
        });
        rx
    }

    /// Number of live subscribers (those whose receiver is dropped go at
    /// the next emit).
    pub fn subscribers(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// The first event that stopped the VM (shutdown, triple fault,
    /// internal error, crash), if one was emitted.
    pub fn stop_event(&self) -> Option<Lifecycle> {
        self.lock().stop.clone()
    }

    /// Sends `ev` to every subscriber; never blocks.
    pub fn emit(&self, ev: VmEvent) {
        let mut g = self.lock();
        let n = g.next;
        g.next += 1;
        if let VmEvent::Lifecycle(l) = &ev {
            if is_stop(l.kind) && g.stop.is_none() {
                g.stop = Some(l.clone());
            }
        }
        if g.history.len() == self.history_len {
            g.history.pop_front();
        }
        g.history.push_back(ev.clone());
        let cap = self.capacity;
        g.subscribers.retain_mut(|s| {
            // Only this function sends, under the lock, so the queue can
            // only shrink between the length check and the send.
            let room = cap.saturating_sub(s.tx.len());
            let need = if s.missed > 0 { 2 } else { 1 };
            if room < need {
                if s.missed == 0 {
                    s.first_missed = n;
                }
                s.missed += 1;
                return true;
            }
            if s.missed > 0 {
                match s.tx.try_send(lag_gap(s.first_missed, s.missed, cap)) {
                    Ok(()) => s.missed = 0,
                    Err(TrySendError::Disconnected(_)) => return false,
                    Err(TrySendError::Full(_)) => {
                        s.missed += 1;
                        return true;
                    }
                }
            }
            match s.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Disconnected(_)) => false,
                Err(TrySendError::Full(_)) => {
                    s.first_missed = n;
                    s.missed = 1;
                    true
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: LifecycleKind, detail: &str) -> VmEvent {
        VmEvent::Lifecycle(Lifecycle {
            kind,
            detail: detail.into(),
            regs: Vec::new(),
            gap: None,
            snapshot_id: None,
        })
    }

    #[test]
    fn every_subscriber_sees_every_later_event() {
        let hub = EventHub::default();
        let early = hub.subscribe();
        hub.emit(ev(LifecycleKind::Boot, ""));
        let late = hub.subscribe();
        hub.emit(ev(LifecycleKind::Pause, ""));
        hub.emit(ev(LifecycleKind::Resume, ""));
        let got: Vec<_> = early.try_iter().collect();
        assert_eq!(
            got,
            vec![
                ev(LifecycleKind::Boot, ""),
                ev(LifecycleKind::Pause, ""),
                ev(LifecycleKind::Resume, "")
            ]
        );
        let got: Vec<_> = late.try_iter().collect();
        assert_eq!(
            got,
            vec![ev(LifecycleKind::Pause, ""), ev(LifecycleKind::Resume, "")]
        );
    }

    #[test]
    fn a_history_subscriber_sees_the_kept_events_first() {
        let hub = EventHub::with_capacity(8); // keeps 2
        hub.emit(ev(LifecycleKind::Boot, ""));
        let h = hub.subscribe_with_history();
        hub.emit(ev(LifecycleKind::Pause, ""));
        assert_eq!(
            h.try_iter().collect::<Vec<_>>(),
            vec![ev(LifecycleKind::Boot, ""), ev(LifecycleKind::Pause, "")]
        );
        hub.emit(ev(LifecycleKind::Resume, ""));
        let late = hub.subscribe_with_history();
        let got: Vec<_> = late.try_iter().collect();
        assert_eq!(got.len(), 3, "{got:?}");
        match &got[0] {
            VmEvent::Lifecycle(l) => {
                assert_eq!(l.kind, LifecycleKind::Gap);
                let gap = l.gap.as_ref().expect("gap details");
                assert_eq!((gap.first_seq, gap.count), (0, 1), "Boot left the history");
            }
            other => panic!("expected a gap, got {other:?}"),
        }
        assert_eq!(
            got[1..].to_vec(),
            vec![ev(LifecycleKind::Pause, ""), ev(LifecycleKind::Resume, "")]
        );
    }

    #[test]
    fn dropped_subscribers_are_removed() {
        let hub = EventHub::default();
        let keep = hub.subscribe();
        drop(hub.subscribe());
        assert_eq!(hub.subscribers(), 2);
        hub.emit(ev(LifecycleKind::Boot, ""));
        assert_eq!(hub.subscribers(), 1);
        assert_eq!(keep.try_iter().count(), 1);
    }

    #[test]
    fn a_lagging_subscriber_gets_a_gap_event_and_the_others_lose_nothing() {
        let hub = EventHub::with_capacity(4);
        let slow = hub.subscribe();
        let fast = hub.subscribe();
        let mut fast_seen = Vec::new();
        for i in 0..10 {
            hub.emit(ev(LifecycleKind::Snapshot, &i.to_string()));
            fast_seen.extend(fast.try_iter());
        }
        assert_eq!(fast_seen.len(), 10);
        // The slow one kept 0..4 and missed 4..10.
        let got: Vec<_> = slow.try_iter().collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], ev(LifecycleKind::Snapshot, "3"));
        // One drained slot is not enough for the gap and the event.
        hub.emit(ev(LifecycleKind::Snapshot, "10"));
        let got: Vec<_> = slow.try_iter().collect();
        assert_eq!(got.len(), 2, "{got:?}");
        match &got[0] {
            VmEvent::Lifecycle(l) => {
                assert_eq!(l.kind, LifecycleKind::Gap);
                let gap = l.gap.as_ref().expect("gap details");
                assert_eq!((gap.first_seq, gap.count), (4, 6));
            }
            other => panic!("expected a gap, got {other:?}"),
        }
        assert_eq!(got[1], ev(LifecycleKind::Snapshot, "10"));
        fast_seen.extend(fast.try_iter());
        assert_eq!(fast_seen.len(), 11);
    }

    #[test]
    fn the_first_stop_is_kept_for_late_subscribers() {
        let hub = EventHub::default();
        assert!(hub.stop_event().is_none());
        hub.emit(ev(LifecycleKind::Boot, ""));
        hub.emit(ev(LifecycleKind::Shutdown, "guest exit code 3"));
        hub.emit(ev(LifecycleKind::Crash, "later"));
        let stop = hub.stop_event().expect("kept");
        assert_eq!(stop.detail, "guest exit code 3");
    }
}
