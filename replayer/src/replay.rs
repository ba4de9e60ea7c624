//! The replay loop: a source's items through the timeline, the window, the
//! filter and the clock, to a delivery callback.
//!
//! For each event in `seq` order:
//! 1. the [`Timeline`] observes it (every event, delivered or not, so
//!    pauses always shape guest time) and gives its guest-time offset;
//! 2. the window's [`Bounds`] place it: after the window the loop ends;
//!    before it, the event is skipped or fast-forwarded
//!    ([`BeforeWindow`]);
//! 3. the [`Filter`] decides delivery;
//! 4. the [`ReplayClock`] waits until it is due, and the callback gets it
//!    with its [`Dispatch`]. Guest time on the clock starts at a time
//!    window's start (the cut without a window), or at the first event of a
//!    `seq` or wall-time window, so that one is due at once.
//!
//! Gaps and poison records are collected in the [`ReplayReport`].

use crate::filter::{Filter, FilterStats};
use crate::schedule::{Dispatch, ReplayClock, ScheduleError, Timeline, TimelineStats};
use crate::source::{GapReport, PoisonRecord, SourceError, SourceItem, SourcedEvent};
use crate::window::{Bounds, Position};

/// What to do with events after the cut but before the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeWindow {
    /// Do not deliver them.
    Skip,
    /// Deliver them (filtered) at once, without a dispatch, so the clone
    /// reaches the window's start with the inputs before it.
    FastForward,
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Events delivered in the window (with a dispatch).
    pub delivered: u64,
    /// Events delivered by fast-forward before the window.
    pub fast_forwarded: u64,
    /// Events before the window that were skipped.
    pub skipped_before_window: u64,
    /// `seq` of the last event seen.
    pub last_seq: Option<u64>,
    /// Whether the loop ended at the window's end (rather than the data's).
    pub reached_window_end: bool,
    pub gaps: Vec<GapReport>,
    pub poison: Vec<PoisonRecord>,
    /// What the filter removed (see [`FilterStats::is_filtered`]).
    pub filter: FilterStats,
    pub timeline: TimelineStats,
}

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E: std::error::Error + 'static> {
    #[error("reading the recorded events failed")]
    Source(#[from] SourceError),
    #[error("the replay was stopped")]
    Stopped,
    #[error("delivering seq {seq} failed")]
    Deliver {
        seq: u64,
        #[source]
        source: E,
    },
}

/// Runs the loop of the [module docs](self) until the source ends, the
/// window ends, the clock is stopped or delivery fails. `deliver` gets each
/// delivered event with its dispatch (`None` for a fast-forwarded one).
#[allow(clippy::too_many_arguments)]
pub fn run<I, E, F>(
    source: I,
    timeline: &mut Timeline,
    bounds: &Bounds,
    before: BeforeWindow,
    filter: &Filter,
    clock: &mut ReplayClock,
    mut deliver: F,
) -> Result<ReplayReport, ReplayError<E>>
where
    I: IntoIterator<Item = Result<SourceItem, SourceError>>,
    E: std::error::Error + 'static,
    F: FnMut(&SourcedEvent, Option<&Dispatch>) -> Result<(), E>,
{
    let mut report = ReplayReport::default();
    for item in source {
        let e = match item? {
            SourceItem::Event(e) => e,
            SourceItem::Gap(g) => {
                report.gaps.push(g);
                continue;
            }
            SourceItem::Poison(p) => {
                report.poison.push(p);
                continue;
            }
        };
        let offset = timeline.observe(&e.event);
        report.last_seq = Some(e.event.seq);
        match bounds.position(e.event.seq, offset, e.event.wall_time_ns) {
            Position::After => {
                report.reached_window_end = true;
                break;
            }
            Position::Before => {
                if before == BeforeWindow::FastForward && filter.admit(&e.event, &mut report.filter)
                {
                    deliver(&e, None).map_err(|source| ReplayError::Deliver {
                        seq: e.event.seq,
                        source,
                    })?;
                    report.fast_forwarded += 1;
                } else {
                    report.skipped_before_window += 1;
                }
                continue;
            }
            Position::Inside => {}
        }
        if !filter.admit(&e.event, &mut report.filter) {
            continue;
        }
        if report.delivered == 0 {
            // Guest time starts at the window's start: a time window's own
            // start, else the first event in the window.
            let origin = if bounds.seq_from > 0 || bounds.wall_from_ns > 0 {
                offset
            } else {
                bounds.guest_from
            };
            clock.set_origin(origin);
        }
        let d = clock.wait(e.event.seq, offset).map_err(|e| match e {
            ScheduleError::Stopped | ScheduleError::BadSpeed(_) => ReplayError::Stopped,
        })?;
        deliver(&e, Some(&d)).map_err(|source| ReplayError::Deliver {
            seq: e.event.seq,
            source,
        })?;
        report.delivered += 1;
    }
    report.timeline = timeline.stats;
    Ok(report)
}
