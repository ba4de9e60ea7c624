//! Lifecycle events reach every subscriber (late ones through the kept
//! history too); a device that fails to pause leaves the VM running.

mod common;

use std::sync::atomic::Ordering::SeqCst;

use common::*;
use vmr_proto::LifecycleKind;
use vmr_vmm::guest_abi::{CMD_COUNT, CMD_EXIT};
use vmr_vmm::snapshot::MemoryKind;
use vmr_vmm::vcpu::VmEvent;
use vmr_vmm::vm::{BootSource, RunState, VmError};

fn kinds(events: &[VmEvent]) -> Vec<LifecycleKind> {
    events
        .iter()
        .map(|e| match e {
            VmEvent::Lifecycle(l) => l.kind,
            VmEvent::Debug(d) => panic!("unexpected debug stop {d:?}"),
        })
        .collect()
}

#[test]
// Heavy: needs /dev/kvm.
fn two_subscribers_see_the_same_lifecycle_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Guest {
        mut vm,
        ports,
        serial: _,
    } = new_guest(32 << 20);
    vm.load(&BootSource::Elf(guest_elf())).expect("loads");
    let a = vm.subscribe();
    let b = vm.events();
    vm.start().expect("starts");
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest never polled its command port"
    );
    let late = vm.subscribe();
    // `events()` after the start still sees Boot (the kept history).
    let replay = vm.events();
    vm.pause().expect("pause");
    vm.snapshot(&dir.path().join("s"), MemoryKind::Full)
        .expect("snapshot");
    vm.resume().expect("resume");
    // A subscriber that is dropped does not hold the others up.
    drop(vm.subscribe());

    // wait_for_stop runs on its own subscription while the guest exits.
    let stop = std::thread::scope(|s| {
        let waiter = s.spawn(|| vm.wait_for_stop(WAIT));
        ports.push_commands(&[CMD_EXIT | (5 << 8)]);
        waiter.join().expect("waiter thread")
    })
    .expect("the guest stops the VM");
    assert_eq!(stop.detail, "guest exit code 5");

    let a: Vec<VmEvent> = a.try_iter().collect();
    let b: Vec<VmEvent> = b.try_iter().collect();
    let late: Vec<VmEvent> = late.try_iter().collect();
    let replay: Vec<VmEvent> = replay.try_iter().collect();
    assert_eq!(
        kinds(&a),
        vec![
            LifecycleKind::Boot,
            LifecycleKind::Pause,
            LifecycleKind::Snapshot,
            LifecycleKind::Resume,
            LifecycleKind::Shutdown
        ],
        "{a:?}"
    );
    assert_eq!(a, b, "both subscribers saw the same events");
    assert_eq!(late, a[1..].to_vec(), "a late subscriber sees what follows");
    assert_eq!(replay, a, "a late events() receiver replays Boot first");
    match &a[2] {
        VmEvent::Lifecycle(l) => assert_eq!(l.snapshot_id.as_deref(), Some("s")),
        other => panic!("{other:?}"),
    }
    assert_eq!(a[4], VmEvent::Lifecycle(stop.clone()));
    // Asked again after the stop, it answers at once with the same event.
    let t = std::time::Instant::now();
    assert_eq!(vm.wait_for_stop(WAIT), Some(stop.clone()));
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(vm.stop_event(), Some(stop));
}

#[test]
// Heavy: needs /dev/kvm.
fn a_failed_device_pause_resumes_what_was_paused_and_leaves_the_vm_running() {
    let g = boot(32 << 20);
    g.ports.push_commands(&[CMD_COUNT]); // forever
    wait_values(&g.ports, 20);
    let first = FaultDevice::new("first");
    let failing = FaultDevice::new("failing");
    let last = FaultDevice::new("last");
    failing.fail_pause.store(true, SeqCst);
    g.vm.add_snapshot_device(first.clone());
    g.vm.add_snapshot_device(failing.clone());
    g.vm.add_snapshot_device(last.clone());
    let events = g.vm.subscribe();

    let e = g.vm.pause().expect_err("the failing device refuses");
    match &e {
        VmError::Device { id, reason } => {
            assert_eq!(id, "failing");
            assert!(reason.contains("injected"), "{reason}");
        }
        other => panic!("expected a device error, got {other:?}"),
    }
    assert_eq!(g.vm.state(), RunState::Running);
    assert_eq!(first.pauses.load(SeqCst), 1);
    assert_eq!(
        first.resumes.load(SeqCst),
        1,
        "the paused device is resumed"
    );
    assert!(!first.is_paused());
    assert_eq!(
        failing.resumes.load(SeqCst),
        1,
        "a device whose pause failed part-way is resumed too"
    );
    assert_eq!(
        last.pauses.load(SeqCst),
        0,
        "devices after it are untouched"
    );
    // The vCPU runs again: the guest keeps counting.
    let n = g.ports.with(|s| s.values.len());
    wait_values(&g.ports, n + 50);
    assert!(
        events.try_iter().next().is_none(),
        "a failed pause emits no event"
    );
    // Snapshots need a paused VM, and it is not.
    assert!(matches!(
        g.vm.snapshot(std::path::Path::new("/nonexistent"), MemoryKind::Full),
        Err(VmError::State { .. })
    ));

    failing.fail_pause.store(false, SeqCst);
    g.vm.pause().expect("pause");
    assert_eq!(g.vm.state(), RunState::Paused);
    assert!(first.is_paused() && failing.is_paused() && last.is_paused());
    let n = g.ports.with(|s| s.values.len());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(g.ports.with(|s| s.values.len()), n, "paused means stopped");
    g.vm.resume().expect("resume");
    assert!(!first.is_paused() && !failing.is_paused() && !last.is_paused());
    assert_eq!(
        kinds(&events.try_iter().collect::<Vec<_>>()),
        vec![LifecycleKind::Pause, LifecycleKind::Resume]
    );
}
