//! The driver-neutral lifecycle scenario both drivers' tests run: launch with
//! recorded devices, boot event, pause and resume (events and state), a
//! bounded wait that times out while the guest runs, a crash reported as a
//! lifecycle event stamped with its time, `wait` returning the crash, and a
//! stop that leaves nothing running.
#![allow(dead_code)]

use std::time::Duration;

use vmr_hypervisor::events::now_ns;
use vmr_hypervisor::{
    Driver, DriverError, DriverEvent, EndReason, Instance, InstanceSpec, RunState, Subscription,
};
use vmr_proto::LifecycleKind;

/// Bound for every wait of the scenario (TCG guests are slow).
pub const WAIT: Duration = Duration::from_secs(120);

/// Waits for the next event of `kind`.
pub fn wait_event(sub: &Subscription<DriverEvent>, kind: LifecycleKind) -> DriverEvent {
    sub.wait_for(WAIT, |e| e.kind() == kind)
        .unwrap_or_else(|gone| panic!("no {kind:?} event (source gone: {gone})"))
}

/// What the scenario needs from the guest under test.
pub struct Guest<'a> {
    /// Waits until the guest's workload is ready.
    pub ready: &'a dyn Fn(&dyn Instance),
    /// Makes the guest crash.
    pub crash: &'a dyn Fn(&dyn Instance),
    /// The lifecycle kind the crash is reported as.
    pub crash_kind: LifecycleKind,
}

/// Runs the scenario; returns the crash event.
pub fn lifecycle(driver: &dyn Driver, spec: &InstanceSpec, guest: Guest<'_>) -> DriverEvent {
    let inst = driver.launch(spec).expect("launch with recorded devices");
    let events = inst.subscribe();
    wait_event(&events, LifecycleKind::Boot);
    (guest.ready)(inst.as_ref());
    assert_eq!(inst.query().expect("query").state, RunState::Running);

    inst.pause().expect("pause");
    wait_event(&events, LifecycleKind::Pause);
    assert_eq!(inst.query().expect("query").state, RunState::Paused);
    inst.resume().expect("resume");
    wait_event(&events, LifecycleKind::Resume);
    assert_eq!(inst.query().expect("query").state, RunState::Running);

    match inst.wait(Duration::from_millis(200)) {
        Err(DriverError::Timeout { .. }) => {}
        other => panic!("a running guest does not end by itself: {other:?}"),
    }

    let (before, _) = now_ns();
    (guest.crash)(inst.as_ref());
    let crash = wait_event(&events, guest.crash_kind);
    let (after, _) = now_ns();
    assert!(
        (before..=after).contains(&crash.wall_time_ns),
        "the crash is stamped with its time: {} not in {before}..={after}",
        crash.wall_time_ns
    );
    let end = inst
        .wait(WAIT)
        .expect("wait returns once the guest crashed");
    assert_eq!(end.reason, EndReason::Crash, "{end:?}");
    assert_eq!(inst.query().expect("query").state, RunState::Crashed);

    inst.stop(Duration::from_secs(5)).expect("stop");
    let info = inst.query().expect("query after stop");
    assert_eq!(info.state, RunState::Exited);
    assert!(info.exit.is_some(), "the end is reported");
    crash
}
