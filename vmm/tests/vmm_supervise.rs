//! The supervisor shared by the `vmm` binary and the driver layer: events
//! to a callback, numbered snapshots on request, the guest's end.

mod common;

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::LifecycleKind;
use vmr_vmm::guest_abi::{ARENA_GPA, CMD_DIRTY, CMD_EXIT, END_OF_LIST};
use vmr_vmm::memory::PAGE_SIZE;
use vmr_vmm::snapshot::{restore_memory, MemoryKind, RestoreMemory, SnapshotData};
use vmr_vmm::supervise::{supervise, Outcome, Report, SnapshotOnRequest, SnapshotSeries};
use vmr_vmm::vcpu::VmEvent;
use vmr_vmm::vm::{RunState, SnapshotInfo};

const POLL: Duration = Duration::from_millis(20);

#[test]
// Heavy: needs /dev/kvm.
fn supervise_snapshots_on_request_and_returns_when_the_guest_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = boot(32 << 20);

    // A callback that breaks detaches and leaves the VM running.
    let t = Instant::now();
    let outcome = supervise(&g.vm, POLL, None, |r| match r {
        Report::Idle => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    assert_eq!(outcome, Outcome::Detached);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(g.vm.state(), RunState::Running);

    let request = AtomicBool::new(true); // the first snapshot right away
    let mut series = SnapshotSeries::new(dir.path().join("series"));
    let mut snapshots: Vec<SnapshotInfo> = Vec::new();
    let mut events: Vec<VmEvent> = Vec::new();
    let mut exit_sent = false;
    let deadline = Instant::now() + WAIT;
    let outcome = supervise(
        &g.vm,
        POLL,
        Some(SnapshotOnRequest {
            series: &mut series,
            request: &request,
        }),
        |r| {
            assert!(Instant::now() < deadline, "the scenario did not finish");
            match r {
                Report::Event(e) => events.push(e.clone()),
                Report::Snapshot(info) => {
                    snapshots.push(info.clone());
                    if snapshots.len() == 1 {
                        // Dirty three pages, then ask for the increment.
                        g.ports.push_commands(&[CMD_DIRTY, 10, 11, 12, END_OF_LIST]);
                    }
                }
                Report::SnapshotFailed(e) => panic!("snapshot failed: {e}"),
                Report::Idle => {
                    if snapshots.len() == 1
                        && g.ports.with(|s| s.done.len()) == 1
                        && !request.load(SeqCst)
                    {
                        request.store(true, SeqCst);
                    }
                    if snapshots.len() == 2 && !exit_sent {
                        g.ports.push_commands(&[CMD_EXIT | (9 << 8)]);
                        exit_sent = true;
                    }
                }
            }
            ControlFlow::Continue(())
        },
    );
    match &outcome {
        Outcome::Shutdown(l) => assert_eq!(l.detail, "guest exit code 9"),
        other => panic!("expected a shutdown, got {other:?}"),
    }
    assert!(!request.load(SeqCst), "the request was taken");
    assert_eq!(series.taken(), 2);
    assert_eq!(
        snapshots
            .iter()
            .map(|s| (s.id.as_str(), s.kind))
            .collect::<Vec<_>>(),
        vec![
            ("0000", MemoryKind::Full),
            ("0001", MemoryKind::Incremental)
        ]
    );
    let want: BTreeSet<u64> = [10u64, 11, 12]
        .iter()
        .map(|p| ARENA_GPA / PAGE_SIZE + p)
        .collect();
    assert_eq!(
        snapshots[1]
            .dirty_pages
            .iter()
            .copied()
            .collect::<BTreeSet<_>>(),
        want
    );
    let kinds: Vec<LifecycleKind> = events
        .iter()
        .filter_map(|e| match e {
            VmEvent::Lifecycle(l) => Some(l.kind),
            VmEvent::Debug(_) => None,
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            LifecycleKind::Pause,
            LifecycleKind::Snapshot,
            LifecycleKind::Resume,
            LifecycleKind::Pause,
            LifecycleKind::Snapshot,
            LifecycleKind::Resume,
            LifecycleKind::Shutdown,
        ]
    );
    let meta = SnapshotData::load(&dir.path().join("series/0001"))
        .expect("state")
        .meta;
    assert_eq!(
        meta.memory.parent.as_deref(),
        Some(std::path::Path::new("../0000"))
    );
    restore_memory(&dir.path().join("series/0001"), RestoreMemory::SharedCopy)
        .expect("the series restores");

    // Supervising a VM that has stopped returns its stop at once.
    let t = Instant::now();
    let again = supervise(&g.vm, POLL, None, |_| ControlFlow::Continue(()));
    assert_eq!(again, outcome);
    assert!(t.elapsed() < Duration::from_secs(1));
}
