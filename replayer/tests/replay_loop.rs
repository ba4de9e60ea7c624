//! The replay loop over in-memory items: filters never hide pauses from the
//! clock, windows start and end where they should, gaps and poison records
//! are reported, and delivery errors and stops end the loop.

mod common;

use std::time::{Duration, Instant};

use common::*;
use replayer::filter::Filter;
use replayer::replay::{self, BeforeWindow, ReplayError};
use replayer::schedule::{Dispatch, ReplayClock, Speed, Timeline};
use replayer::source::{
    GapCause, GapReport, PoisonRecord, RecordPos, SourceError, SourceItem, SourcedEvent,
};
use replayer::window::Window;
use replayer::{Kind, KindSet};
use vmr_proto::{Direction, Event, LifecycleKind};

fn item(e: Event) -> Result<SourceItem, SourceError> {
    let kind = Kind::of(&e.payload);
    Ok(SourceItem::Event(SourcedEvent {
        event: e,
        pos: RecordPos {
            kind,
            partition: 0,
            offset: 0,
        },
    }))
}

/// Events 100 ms apart from the cut, all net frames.
fn frames(n: u64) -> Vec<Result<SourceItem, SourceError>> {
    (1..=n)
        .map(|s| item(event("vm", s, T0 + s * 100 * MS, net(Direction::Rx, s))))
        .collect()
}

type Delivered = Vec<(u64, Option<Dispatch>)>;

fn run(
    items: Vec<Result<SourceItem, SourceError>>,
    window: &str,
    before: BeforeWindow,
    filter: &Filter,
    speed: Speed,
) -> (replay::ReplayReport, Delivered) {
    let mut timeline = Timeline::new(T0, false);
    let mut clock = ReplayClock::new(speed);
    let bounds = window.parse::<Window>().unwrap().resolve(None).unwrap();
    let mut got = Vec::new();
    let report = replay::run(
        items,
        &mut timeline,
        &bounds,
        before,
        filter,
        &mut clock,
        |e, d| {
            got.push((e.event.seq, d.copied()));
            Ok::<_, std::io::Error>(())
        },
    )
    .unwrap();
    (report, got)
}

#[test]
fn excluded_lifecycle_events_still_pause_the_clock() {
    let items = vec![
        item(event("vm", 1, T0 + 100 * MS, net(Direction::Rx, 1))),
        item(event("vm", 2, T0 + 200 * MS, life(LifecycleKind::Pause))),
        item(event("vm", 3, T0 + 500 * MS, net(Direction::Rx, 3))),
        item(event("vm", 4, T0 + 1000 * MS, life(LifecycleKind::Resume))),
        item(event("vm", 5, T0 + 1100 * MS, net(Direction::Rx, 5))),
    ];
    let net_only = Filter {
        kinds: KindSet::empty().with(Kind::Net),
        ..Filter::default()
    };
    let (report, got) = run(
        items,
        "all",
        BeforeWindow::Skip,
        &net_only,
        Speed::AsFastAsPossible,
    );
    let offsets: Vec<(u64, u128)> = got
        .iter()
        .map(|(s, d)| (*s, d.unwrap().guest_offset.as_millis()))
        .collect();
    // The 800 ms pause does not count, though no pause was delivered.
    assert_eq!(offsets, [(1, 100), (3, 200), (5, 300)]);
    assert_eq!(report.filter.removed_of(Kind::Lifecycle), 2);
    assert!(report.filter.is_filtered());
    assert_eq!(report.timeline.pauses, 1);
    assert_eq!(report.delivered, 3);
}

#[test]
fn seq_window_fast_forwards_before_and_stops_after() {
    let (report, got) = run(
        frames(10),
        "seq:4..6",
        BeforeWindow::FastForward,
        &Filter::default(),
        Speed::AsFastAsPossible,
    );
    let seqs: Vec<(u64, bool)> = got.iter().map(|(s, d)| (*s, d.is_some())).collect();
    assert_eq!(
        seqs,
        [
            (1, false),
            (2, false),
            (3, false),
            (4, true),
            (5, true),
            (6, true)
        ]
    );
    assert_eq!(report.fast_forwarded, 3);
    assert!(report.reached_window_end);
    assert_eq!(
        report.last_seq,
        Some(7),
        "the loop stops at the first event after"
    );
}

#[test]
fn windows_set_the_clock_origin() {
    // A seq window: its first event is due at once, then recorded spacing.
    let start = Instant::now();
    let (report, got) = run(
        frames(10),
        "seq:5..6",
        BeforeWindow::Skip,
        &Filter::default(),
        Speed::REALTIME,
    );
    let took = start.elapsed();
    assert_eq!(report.skipped_before_window, 4);
    assert_eq!(got.len(), 2);
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(250),
        "{took:?}"
    );

    // A time window: guest time starts at its start (200 ms), so the
    // event at 300 ms is due 100 ms in.
    let start = Instant::now();
    let (report, got) = run(
        frames(10),
        "time:200ms..400ms",
        BeforeWindow::Skip,
        &Filter::default(),
        Speed::REALTIME,
    );
    let took = start.elapsed();
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(report.skipped_before_window, 1);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(350),
        "{took:?}"
    );

    // The first 250 ms after the cut, at 10x: 25 ms.
    let start = Instant::now();
    let (_, got) = run(
        frames(10),
        "250ms",
        BeforeWindow::Skip,
        &Filter::default(),
        Speed::factor(10.0).unwrap(),
    );
    assert_eq!(got.len(), 2);
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[test]
fn gaps_and_poison_are_reported() {
    let mut items = frames(3);
    items.insert(
        1,
        Ok(SourceItem::Gap(GapReport {
            first_seq: 9,
            count: 2,
            cause: GapCause::Missing,
        })),
    );
    items.push(Ok(SourceItem::Poison(PoisonRecord {
        pos: RecordPos {
            kind: Kind::Net,
            partition: 0,
            offset: 7,
        },
        error: "bad".into(),
    })));
    let (report, got) = run(
        items,
        "all",
        BeforeWindow::Skip,
        &Filter::default(),
        Speed::AsFastAsPossible,
    );
    assert_eq!(got.len(), 3);
    assert_eq!(report.gaps.len(), 1);
    assert_eq!(report.poison.len(), 1);
}

#[test]
fn delivery_errors_source_errors_and_stops_end_the_loop() {
    let bounds = Window::All.resolve(None).unwrap();
    let mut timeline = Timeline::new(T0, false);
    let mut clock = ReplayClock::new(Speed::AsFastAsPossible);
    let err = replay::run(
        frames(5),
        &mut timeline,
        &bounds,
        BeforeWindow::Skip,
        &Filter::default(),
        &mut clock,
        |e, _| {
            if e.event.seq == 3 {
                Err(std::io::Error::other("the clone's NIC is gone"))
            } else {
                Ok(())
            }
        },
    )
    .unwrap_err();
    assert!(matches!(err, ReplayError::Deliver { seq: 3, .. }), "{err}");

    let mut items = frames(2);
    items.push(Err(SourceError::RangeBeyondEnd { wanted: 9, last: 2 }));
    let err = replay::run(
        items,
        &mut Timeline::new(T0, false),
        &bounds,
        BeforeWindow::Skip,
        &Filter::default(),
        &mut ReplayClock::new(Speed::AsFastAsPossible),
        |_, _| Ok::<_, std::io::Error>(()),
    )
    .unwrap_err();
    assert!(matches!(err, ReplayError::Source(_)), "{err}");

    let mut clock = ReplayClock::new(Speed::REALTIME);
    clock.control().stop();
    let err = replay::run(
        frames(2),
        &mut Timeline::new(T0, false),
        &bounds,
        BeforeWindow::Skip,
        &Filter::default(),
        &mut clock,
        |_, _| Ok::<_, std::io::Error>(()),
    )
    .unwrap_err();
    assert!(matches!(err, ReplayError::Stopped), "{err}");
}

#[test]
fn the_loop_parts_can_move_to_a_replay_thread() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<replayer::source::EventSource>();
    send::<ReplayClock>();
    send::<Timeline>();
    send_sync::<replayer::schedule::ClockControl>();
    send_sync::<Filter>();
}
