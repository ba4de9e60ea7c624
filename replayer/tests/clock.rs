//! The replay clock in real time: speed, pause, step, run to a `seq` or a
//! time, a lead; and a recording read back from a real broker replayed at
//! 10x.
//!
//! These tests check what the clock does, not how precisely: they assert
//! due times (computed, exact to a microsecond), the order of dispatches
//! against controls, and that nothing is early, never a bound on lateness,
//! which depends on the host's load (the `dispatch` benchmark measures it).
//!
//! Heavy (the 10x test only): needs the Tansu broker and the
//! `schema-registry` binary, like `source_kafka.rs`.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use replayer::filter::Filter;
use replayer::replay::{self, BeforeWindow};
use replayer::schedule::{
    mono_now_ns, ClockMode, Dispatch, DispatchKind, ReplayClock, RunTo, Speed, Timeline,
    TimingSummary,
};
use replayer::source::{EventSource, SourceConfig};
use replayer::window::Window;
use replayer::KindSet;
use vmr_proto::{Direction, LifecycleKind};

/// Runs `clock` over `n` events `spacing` apart on a thread; returns the
/// dispatches through a channel as they happen.
fn run_events(
    mut clock: ReplayClock,
    n: u64,
    spacing: Duration,
) -> (mpsc::Receiver<Dispatch>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        for seq in 1..=n {
            match clock.wait(seq, spacing * seq as u32) {
                Ok(d) => {
                    if tx.send(d).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    (rx, h)
}

/// Equal within a microsecond (due times are computed in floating point).
fn close(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) < Duration::from_micros(1)
}

fn recv(rx: &mpsc::Receiver<Dispatch>) -> Dispatch {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a dispatch within 10 s")
}

#[test]
fn ten_x_replays_two_seconds_of_recorded_guest_time_in_a_fifth_of_a_second() {
    let rec = Recording::start();
    let (a, _) = two_instances_sharing_a_partition();
    // 2 s of guest time in 3 s of host time: the guest is resumed at the
    // cut, runs 1 s, is paused 1 s (not counted), runs 1 s more. One event
    // every 20 ms while running.
    let mut evs = vec![event(&a, 1, T0, life(LifecycleKind::Resume))];
    let mut seq = 1;
    let mut push = |mono: u64, p| {
        seq += 1;
        evs.push(event(&a, seq, mono, p));
    };
    for i in 1..=50u64 {
        push(T0 + i * 20 * MS, net(Direction::Rx, i));
    }
    push(T0 + 1000 * MS, life(LifecycleKind::Pause));
    push(T0 + 1500 * MS, env(0));
    push(T0 + 2000 * MS, life(LifecycleKind::Resume));
    for i in 1..=50u64 {
        push(T0 + 2000 * MS + i * 20 * MS, net(Direction::Rx, i));
    }
    rec.send(&evs);

    let mut cfg = SourceConfig {
        bootstrap_servers: rec.bootstrap(),
        instance: vmr_proto::InstanceId::new(a.clone()).unwrap(),
        seq_at_cut: 0,
        start: start_offsets(&a, 0),
        kinds: KindSet::all(),
        until_seq: None,
        topics: Default::default(),
        window: Default::default(),
        fetch_timeout: Duration::from_secs(10),
        security: Default::default(),
    };
    cfg.kinds = Filter::default().kinds_to_read();
    // Read everything first, so the measured run is the clock's alone.
    let items: Vec<_> = EventSource::open(cfg).unwrap().collect();
    assert_eq!(items.len(), evs.len());

    let mut timeline = Timeline::new(T0, true);
    let mut clock = ReplayClock::new(Speed::factor(10.0).unwrap());
    let bounds = Window::All.resolve(None).unwrap();
    let filter = Filter::default();
    let mut dispatches = Vec::new();
    let start = Instant::now();
    let report = replay::run(
        items,
        &mut timeline,
        &bounds,
        BeforeWindow::Skip,
        &filter,
        &mut clock,
        |_e, d| {
            dispatches.push(*d.expect("inside the window"));
            Ok::<_, std::io::Error>(())
        },
    )
    .unwrap();
    let took = start.elapsed();
    assert_eq!(report.delivered, evs.len() as u64);
    assert_eq!(report.timeline.pauses, 1);
    assert_eq!(report.timeline.resumes, 2);
    let last = dispatches.last().unwrap();
    assert_eq!(last.guest_offset, Duration::from_secs(2));
    eprintln!("10x: 2 s of guest time replayed in {took:?}");
    // Never early: the last event is due 200 ms after the first.
    assert!(took >= Duration::from_millis(195), "took {took:?}");
    // Due times follow the guest's running time / 10: the 1 s pause is
    // not there.
    // Seq 51 is the last event before the pause (1000 ms), seq 55 the first
    // after the resume (1020 ms of guest time).
    let d51 = dispatches.iter().find(|d| d.seq == 51).unwrap();
    let d55 = dispatches.iter().find(|d| d.seq == 55).unwrap();
    assert_eq!(
        d55.guest_offset - d51.guest_offset,
        Duration::from_millis(20)
    );
    assert!(
        close(d55.due - d51.due, Duration::from_millis(2)),
        "{d51:?} {d55:?}"
    );
    let t = TimingSummary::of(&dispatches).unwrap();
    eprintln!(
        "10x lateness: p50 {:?} p99 {:?} max {:?}",
        t.p50, t.p99, t.max
    );
    assert_eq!(t.count, dispatches.len());
}

#[test]
fn one_x_keeps_recorded_spacing() {
    let clock = ReplayClock::new(Speed::REALTIME);
    let (rx, h) = run_events(clock, 100, Duration::from_millis(5));
    let ds: Vec<Dispatch> = (0..100).map(|_| recv(&rx)).collect();
    h.join().unwrap();
    for w in ds.windows(2) {
        assert!(
            close(w[1].due - w[0].due, Duration::from_millis(5)),
            "{w:?}"
        );
        assert!(w[1].dispatched >= w[1].due, "never early");
    }
    let t = TimingSummary::of(&ds).unwrap();
    eprintln!(
        "1x lateness over {} events: p50 {:?} p99 {:?} max {:?}",
        t.count, t.p50, t.p99, t.max
    );
    assert_eq!(t.count, 100);
}

#[test]
fn pause_holds_dispatch_and_resume_goes_on_from_where_it_stopped() {
    let clock = ReplayClock::new(Speed::REALTIME);
    let control = clock.control();
    let base = clock.mono_ns_at(Duration::ZERO);
    let (rx, h) = run_events(clock, 40, Duration::from_millis(10));
    for _ in 0..5 {
        recv(&rx);
    }
    control.pause();
    let paused_at = Instant::now();
    // Nothing is released once the pause returned: the status now names
    // the last event, and guest time stopped at or after its offset, before
    // the next one's.
    let status = control.status();
    let last = status.last_seq.expect("five dispatched");
    assert!(last >= 5);
    assert!(
        status.position >= Duration::from_millis(10 * last),
        "{status:?}"
    );
    assert!(
        status.position < Duration::from_millis(10 * (last + 1)),
        "{status:?}"
    );
    let mut seen = 5;
    while let Ok(d) = rx.recv_timeout(Duration::from_millis(30)) {
        seen = d.seq;
    }
    assert_eq!(seen, last, "the dispatches before the pause, and no more");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "no dispatch while paused"
    );
    assert_eq!(control.status().mode, ClockMode::Paused);
    let resume_mono = mono_now_ns();
    control.resume();
    let next = recv(&rx);
    let resumed = paused_at.elapsed();
    assert_eq!(next.seq, last + 1);
    // Guest time went on from where it stopped: the next event is due
    // after the resume, its offset less the stopped position later.
    let due_mono = base + next.due.as_nanos() as u64;
    assert!(due_mono >= resume_mono, "{next:?}");
    assert!(next.dispatched >= next.due, "never early");
    assert!(resumed >= Duration::from_millis(330));
    let rest: Vec<Dispatch> = (next.seq + 1..=40).map(|_| recv(&rx)).collect();
    h.join().unwrap();
    assert_eq!(rest.last().unwrap().seq, 40);
}

#[test]
fn step_and_run_to_seq_and_time() {
    let clock = ReplayClock::paused(Speed::factor(100.0).unwrap());
    let control = clock.control();
    // 10 ms of guest time apart: 0.1 ms each at 100x.
    let (rx, h) = run_events(clock, 100, Duration::from_millis(10));
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a paused clock dispatches nothing"
    );

    // Step 3: exactly three, at once, then paused again.
    control.step(3);
    let stepped: Vec<Dispatch> = (0..3).map(|_| recv(&rx)).collect();
    assert!(stepped.iter().all(|d| d.kind == DispatchKind::Stepped));
    assert_eq!(stepped.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(control.wait_paused(Duration::from_secs(5)));
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    assert_eq!(control.status().last_seq, Some(3));

    // Run to seq 20: timed dispatches up to 20, then paused.
    control.run_to(RunTo::Seq(20));
    let run: Vec<Dispatch> = (4..=20).map(|_| recv(&rx)).collect();
    assert!(run.iter().all(|d| d.kind == DispatchKind::Timed));
    assert_eq!(run.last().unwrap().seq, 20);
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    assert!(control.wait_paused(Duration::from_secs(5)));
    assert_eq!(control.status().run_to, None);

    // Run to guest time 405 ms: seqs 21..=40 (offsets 210..400 ms).
    control.run_to(RunTo::Time(Duration::from_millis(405)));
    let run: Vec<Dispatch> = (21..=40).map(|_| recv(&rx)).collect();
    assert_eq!(run.last().unwrap().seq, 40);
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    assert!(control.wait_paused(Duration::from_secs(5)));
    assert_eq!(control.status().position, Duration::from_millis(405));

    // Step 0 keeps it paused; a step while paused is deterministic.
    control.step(0);
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    control.step(1);
    assert_eq!(recv(&rx).seq, 41);

    // As fast as possible for the rest.
    control.set_speed(Speed::AsFastAsPossible);
    control.resume();
    let rest: Vec<Dispatch> = (42..=100).map(|_| recv(&rx)).collect();
    assert!(rest.iter().all(|d| d.kind == DispatchKind::Immediate));
    h.join().unwrap();
    assert_eq!(control.status().dispatched, 100);
}

#[test]
fn speed_changes_and_stop() {
    let clock = ReplayClock::new(Speed::factor(0.1).unwrap());
    let control = clock.control();
    // At 0.1x the second event (1 ms of guest time) is due after 10 ms.
    let (rx, h) = run_events(clock, 1000, Duration::from_millis(1));
    let a = recv(&rx);
    let b = recv(&rx);
    assert!(
        close(b.due - a.due, Duration::from_millis(10)),
        "{a:?} {b:?}"
    );
    control.set_speed(Speed::factor(100.0).unwrap());
    // At 100x, 1 ms of guest time is 10 µs: due times after the change
    // (from the second event after it on) are 10 µs apart.
    let after: Vec<Dispatch> = (0..100).map(|_| recv(&rx)).collect();
    for w in after[1..].windows(2) {
        assert!(
            close(w[1].due - w[0].due, Duration::from_micros(10)),
            "{w:?}"
        );
        assert!(w[1].dispatched >= w[1].due, "never early");
    }
    control.stop();
    // The loop ends with `Stopped`: the channel closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.recv_timeout(Duration::from_millis(50)).is_ok() {
        assert!(Instant::now() < deadline);
    }
    h.join().unwrap();
    assert!(control.status().stopped);
    assert!(control.status().dispatched < 1000);
}

#[test]
fn a_lead_releases_events_that_much_earlier_and_keeps_their_offsets() {
    let mut clock = ReplayClock::new(Speed::factor(100.0).unwrap());
    assert_eq!(clock.lead(), Duration::ZERO);
    // At 100x, 100 h of guest time is 3600 s of host time; with a lead of
    // 3600 s less 10 ms the first event is released 10 ms after the start.
    let lead = Duration::from_secs(3600) - Duration::from_millis(10);
    clock.set_lead(lead);
    assert_eq!(clock.lead(), lead);
    let before = mono_now_ns();
    let base = clock.mono_ns_at(Duration::ZERO);
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let a = clock.wait(1, hours(100)).unwrap();
    let b = clock.wait(2, hours(100) + Duration::from_secs(1)).unwrap();
    // Offsets are untouched: a consumer schedules the frames at them.
    assert_eq!(a.guest_offset, hours(100));
    assert_eq!(b.guest_offset, hours(100) + Duration::from_secs(1));
    assert_eq!((a.kind, b.kind), (DispatchKind::Timed, DispatchKind::Timed));
    // Release times keep the recorded spacing (1 s / 100).
    assert!(
        close(b.due - a.due, Duration::from_millis(10)),
        "{a:?} {b:?}"
    );
    assert!(
        a.dispatched >= a.due && b.dispatched >= b.due,
        "never early"
    );
    assert!(base + a.due.as_nanos() as u64 >= before);
    // An event due within the lead of the start is released at once: its
    // due time is not before the clock's start, and not after the one
    // before it.
    let mut clock = ReplayClock::new(Speed::REALTIME);
    clock.set_lead(Duration::from_secs(3600));
    let c = clock.wait(1, Duration::from_secs(60)).unwrap();
    let d = clock.wait(2, Duration::from_secs(120)).unwrap();
    assert_eq!(c.kind, DispatchKind::Timed);
    assert_eq!(c.due, d.due, "both released at once, at the start");
    // Steps are not affected by the lead.
    let mut clock = ReplayClock::paused(Speed::REALTIME);
    clock.set_lead(Duration::from_secs(5));
    clock.control().step(1);
    let s = clock.wait(1, Duration::from_secs(3600)).unwrap();
    assert_eq!(s.kind, DispatchKind::Stepped);
    assert_eq!(s.due, s.dispatched);
}

/// A pause that comes while the clock is in its last stretch before a due
/// time (the absolute sleep and the spin) holds the event: an event is
/// released only if its release happened before the pause took effect, and
/// after a resume it is due after the resume.
#[test]
fn a_pause_in_the_last_stretch_before_a_due_time_holds_the_event() {
    let mut held = 0;
    for i in 0..20u64 {
        // Due 0.2 to 1.9 ms after the start: inside the last 2 ms at once.
        let offset = Duration::from_micros(200 + i * 85);
        let clock = ReplayClock::new(Speed::REALTIME);
        let control = clock.control();
        let base = clock.mono_ns_at(Duration::ZERO);
        let (rx, h) = run_events(clock, 1, offset);
        std::thread::sleep(offset / 2);
        control.pause();
        let paused_mono = mono_now_ns();
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(d) => {
                // Released before the pause returned.
                assert!(
                    base + d.dispatched.as_nanos() as u64 <= paused_mono,
                    "{d:?}"
                );
                assert_eq!(control.status().dispatched, 1);
            }
            Err(_) => {
                held += 1;
                assert_eq!(control.status().mode, ClockMode::Paused);
                assert_eq!(control.status().dispatched, 0);
                let resume_mono = mono_now_ns();
                control.resume();
                let d = recv(&rx);
                assert!(base + d.due.as_nanos() as u64 >= resume_mono, "{d:?}");
                assert!(d.dispatched >= d.due);
            }
        }
        h.join().unwrap();
    }
    eprintln!("{held} of 20 events were held by a pause in their last stretch");
}
