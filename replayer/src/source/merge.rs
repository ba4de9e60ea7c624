//! Merging the topics' events back into one order by `seq`, with gap
//! detection, in a bounded window.
//!
//! Within one topic partition events are only roughly ordered by `seq` (two
//! devices of one instance ship separately), so events are buffered in a
//! window ordered by `seq` and released when it is certain (or, once the
//! window is full, assumed) that nothing smaller can still come.

use std::collections::{BTreeMap, VecDeque};

use vmr_proto::{Event, LifecycleKind, Payload};

use super::{GapCause, GapReport, RecordPos, SourceItem, SourcedEvent};

/// How many events, and how many payload bytes, the merge may hold back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeWindow {
    /// Most events held back at once.
    pub max_events: usize,
    /// Most payload bytes held back at once (an event larger than this is
    /// still taken, alone).
    pub max_bytes: usize,
}

impl Default for MergeWindow {
    /// 4096 events or 64 MiB (eight full-size block records).
    fn default() -> Self {
        Self {
            max_events: 4096,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What the readers know, for deciding whether the smallest buffered event
/// can be released.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadState {
    /// Every reader reached the end of its data.
    pub exhausted: bool,
    /// The smallest "highest `seq` read so far" over the readers that are
    /// not exhausted; `None` when one of them has read nothing yet.
    pub passed: Option<u64>,
}

/// Rough in-memory size of an event, for the window's byte bound.
pub(crate) fn event_bytes(e: &Event) -> usize {
    96 + match &e.payload {
        Payload::Block(b) => b.data.len() + b.device.len(),
        Payload::Net(n) => n.frame.len() + n.device.len(),
        Payload::Env(s) => s.sensor.len() + s.unit.len(),
        Payload::Lifecycle(l) => l.detail.len() + l.regs.len() * 160,
    }
}

fn recorded_gap(e: &Event) -> Option<(u64, u64, String)> {
    match &e.payload {
        Payload::Lifecycle(l) if l.kind == LifecycleKind::Gap => l.gap.as_ref().map(|g| {
            (
                g.first_seq,
                g.first_seq.saturating_add(g.count),
                g.reason.clone(),
            )
        }),
        _ => None,
    }
}

/// Counters of the merge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Events released in order.
    pub released: u64,
    /// Events dropped because their `seq` was already buffered or released.
    pub duplicates: u64,
    /// Events dropped because a larger `seq` had already been released (a
    /// repeat of a released event, or one whose range was reported missing).
    pub late: u64,
    /// Gaps reported (found missing or recorded as `GAP` events).
    pub gaps: u64,
    /// Sequence numbers reported missing (not recorded as lost).
    pub missing_seqs: u64,
    /// Most events held in the window at once.
    pub peak_events: usize,
    /// Most payload bytes held in the window at once.
    pub peak_bytes: usize,
}

pub(crate) struct Merger {
    buf: BTreeMap<u64, (SourcedEvent, usize)>,
    bytes: usize,
    window: MergeWindow,
    /// Every topic is read, so `seq` must be contiguous: holes are gaps.
    complete: bool,
    /// Next `seq` expected (the smallest not yet released).
    expected: u64,
    /// Ranges `[first, end)` announced lost by `GAP` events, not yet passed.
    announced: Vec<(u64, u64)>,
    pub stats: MergeStats,
}

impl Merger {
    /// A merger releasing from `seq_at_cut + 1`.
    pub fn new(seq_at_cut: u64, complete: bool, window: MergeWindow) -> Self {
        Self {
            buf: BTreeMap::new(),
            bytes: 0,
            window,
            complete,
            expected: seq_at_cut.saturating_add(1),
            announced: Vec::new(),
            stats: MergeStats::default(),
        }
    }

    /// The smallest buffered `seq`.
    pub fn min_seq(&self) -> Option<u64> {
        self.buf.keys().next().copied()
    }

    /// The next `seq` the merge expects.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Takes an event in.
    pub fn push(&mut self, event: Event, pos: RecordPos) {
        let seq = event.seq;
        if seq < self.expected {
            self.stats.late += 1;
            return;
        }
        if self.buf.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        if let Some((first, end, _)) = recorded_gap(&event) {
            if end > first {
                self.announced.push((first, end));
                self.announced.sort_unstable();
            }
        }
        let size = event_bytes(&event);
        self.bytes += size;
        self.buf.insert(seq, (SourcedEvent { event, pos }, size));
        self.stats.peak_events = self.stats.peak_events.max(self.buf.len());
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.bytes);
    }

    fn full(&self) -> bool {
        self.buf.len() >= self.window.max_events || self.bytes >= self.window.max_bytes
    }

    /// Parts of `[from, to)` not covered by announced ranges.
    fn uncovered(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = from;
        for &(a, b) in &self.announced {
            if b <= at {
                continue;
            }
            if a >= to {
                break;
            }
            if a > at {
                out.push((at, a.min(to)));
            }
            at = at.max(b);
            if at >= to {
                break;
            }
        }
        if at < to {
            out.push((at, to));
        }
        out
    }

    /// Releases the smallest buffered event if it is ready, appending it (and
    /// the gaps before it) to `out`. Returns whether something was released.
    pub fn release(&mut self, state: ReadState, out: &mut VecDeque<SourceItem>) -> bool {
        let Some(m) = self.min_seq() else {
            return false;
        };
        let ready = if self.complete {
            m == self.expected
                || self.full()
                || state.exhausted
                || self.uncovered(self.expected, m).is_empty()
        } else {
            self.full() || state.exhausted || state.passed.is_some_and(|p| p > m)
        };
        if !ready {
            return false;
        }
        let (item, size) = self.buf.remove(&m).expect("the smallest key was just read");
        self.bytes -= size;
        if self.complete && m > self.expected {
            for (a, b) in self.uncovered(self.expected, m) {
                self.stats.gaps += 1;
                self.stats.missing_seqs += b - a;
                out.push_back(SourceItem::Gap(GapReport {
                    first_seq: a,
                    count: b - a,
                    cause: GapCause::Missing,
                }));
            }
        }
        if let Some((first, end, reason)) = recorded_gap(&item.event) {
            self.stats.gaps += 1;
            out.push_back(SourceItem::Gap(GapReport {
                first_seq: first,
                count: end.saturating_sub(first),
                cause: GapCause::Recorded {
                    reason,
                    event_seq: m,
                },
            }));
        }
        self.expected = m + 1;
        let expected = self.expected;
        self.announced.retain(|&(_, b)| b > expected);
        self.stats.released += 1;
        out.push_back(SourceItem::Event(item));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;
    use vmr_proto::{EnvSample, Gap, InstanceId, Lifecycle};

    fn env(seq: u64) -> Event {
        Event {
            instance: InstanceId::new("vm").unwrap(),
            seq,
            wall_time_ns: 0,
            mono_time_ns: seq,
            epoch: 1,
            payload: Payload::Env(EnvSample {
                sensor: "t".into(),
                value: 0.0,
                unit: "c".into(),
            }),
        }
    }

    fn gap_event(seq: u64, first: u64, count: u64) -> Event {
        let mut e = env(seq);
        e.payload = Payload::Lifecycle(Lifecycle {
            kind: LifecycleKind::Gap,
            detail: String::new(),
            regs: vec![],
            gap: Some(Gap {
                first_seq: first,
                count,
                reason: "restart".into(),
            }),
            snapshot_id: None,
        });
        e
    }

    fn pos() -> RecordPos {
        RecordPos {
            kind: Kind::Env,
            partition: 0,
            offset: 0,
        }
    }

    fn drain(m: &mut Merger, state: ReadState) -> Vec<String> {
        let mut out = VecDeque::new();
        while m.release(state, &mut out) {}
        out.into_iter()
            .map(|i| match i {
                SourceItem::Event(e) => format!("{}", e.event.seq),
                SourceItem::Gap(g) => match g.cause {
                    GapCause::Missing => format!("missing {}+{}", g.first_seq, g.count),
                    GapCause::Recorded { .. } => format!("recorded {}+{}", g.first_seq, g.count),
                },
                SourceItem::Poison(_) => "poison".into(),
            })
            .collect()
    }

    const OPEN: ReadState = ReadState {
        exhausted: false,
        passed: None,
    };
    const DONE: ReadState = ReadState {
        exhausted: true,
        passed: None,
    };

    #[test]
    fn reorders_within_the_window_and_releases_contiguously() {
        let mut m = Merger::new(10, true, MergeWindow::default());
        for s in [13, 11, 12] {
            m.push(env(s), pos());
        }
        assert_eq!(drain(&mut m, OPEN), ["11", "12", "13"]);
        m.push(env(15), pos());
        // 14 may still come: nothing is released while the window has room.
        assert!(drain(&mut m, OPEN).is_empty());
        assert_eq!(drain(&mut m, DONE), ["missing 14+1", "15"]);
    }

    #[test]
    fn a_full_window_declares_the_hole_missing() {
        let w = MergeWindow {
            max_events: 3,
            max_bytes: usize::MAX,
        };
        let mut m = Merger::new(0, true, w);
        for s in [4, 5] {
            m.push(env(s), pos());
        }
        assert!(drain(&mut m, OPEN).is_empty());
        m.push(env(6), pos());
        assert_eq!(drain(&mut m, OPEN), ["missing 1+3", "4", "5", "6"]);
        // Seq 2 arriving now is late: its range was already reported.
        m.push(env(2), pos());
        assert_eq!(m.stats.late, 1);
        assert_eq!(m.stats.missing_seqs, 3);
    }

    #[test]
    fn recorded_gaps_are_reported_once_and_release_at_once() {
        let mut m = Merger::new(0, true, MergeWindow::default());
        m.push(env(1), pos());
        m.push(gap_event(5, 2, 3), pos());
        // 2..5 are announced lost: no need to wait for them.
        assert_eq!(drain(&mut m, OPEN), ["1", "recorded 2+3", "5"]);
        assert_eq!(m.stats.missing_seqs, 0);
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut m = Merger::new(0, true, MergeWindow::default());
        m.push(env(2), pos());
        m.push(env(2), pos());
        m.push(env(1), pos());
        assert_eq!(drain(&mut m, OPEN), ["1", "2"]);
        m.push(env(1), pos());
        assert_eq!(m.stats.duplicates, 1);
        assert_eq!(m.stats.late, 1);
    }

    #[test]
    fn partial_merge_releases_once_every_topic_passed() {
        let mut m = Merger::new(0, false, MergeWindow::default());
        m.push(env(7), pos());
        m.push(env(3), pos());
        assert!(drain(&mut m, OPEN).is_empty());
        let passed = |p| ReadState {
            exhausted: false,
            passed: Some(p),
        };
        assert_eq!(drain(&mut m, passed(5)), ["3"]);
        assert_eq!(drain(&mut m, passed(8)), ["7"]);
        assert_eq!(m.stats.gaps, 0, "holes are other topics' events");
    }

    #[test]
    fn byte_bound_forces_release() {
        let w = MergeWindow {
            max_events: usize::MAX,
            max_bytes: 1000,
        };
        let mut m = Merger::new(0, true, w);
        let mut big = env(3);
        big.payload = Payload::Env(EnvSample {
            sensor: "x".repeat(2000),
            value: 1.0,
            unit: String::new(),
        });
        m.push(big, pos());
        assert_eq!(drain(&mut m, OPEN), ["missing 1+2", "3"]);
        assert!(m.stats.peak_bytes >= 2000);
    }
}
