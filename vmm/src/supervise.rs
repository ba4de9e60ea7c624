//! Supervising a running VM: report its events, take numbered snapshots on
//! request, and return when the guest stops.
//!
//! The `vmm` binary and the driver layer share this loop. It keeps no
//! global state: the caller owns the request flag (the binary sets one
//! from its `SIGUSR1` handler) and the [`SnapshotSeries`], and decides
//! through its callback whether to go on.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use std::sync::atomic::AtomicBool;
//! use std::time::Duration;
//! use vmr_vmm::supervise::{supervise, Outcome, Report, SnapshotOnRequest, SnapshotSeries};
//! # fn demo(vm: &vmr_vmm::vm::Vm) {
//! let request = AtomicBool::new(false);
//! let mut series = SnapshotSeries::new("/var/lib/snapshots/vm1");
//! let outcome = supervise(
//!     vm,
//!     Duration::from_millis(50),
//!     Some(SnapshotOnRequest { series: &mut series, request: &request }),
//!     |report| {
//!         if let Report::Snapshot(info) = report {
//!             println!("snapshot {}", info.dir.display());
//!         }
//!         ControlFlow::Continue(())
//!     },
//! );
//! match outcome {
//!     Outcome::Shutdown(l) => println!("guest shut down: {}", l.detail),
//!     Outcome::Fault(l) => eprintln!("guest failed: {:?}", l.kind),
//!     Outcome::Detached => {}
//! }
//! # }
//! ```

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use vmr_proto::{Lifecycle, LifecycleKind};

use crate::snapshot::MemoryKind;
use crate::vcpu::VmEvent;
use crate::vm::{RunState, SnapshotInfo, Vm, VmError};

/// Numbered snapshots in one directory: `0000` (full), then `0001`,
/// `0002`, ... (incremental, each the child of the one before).
#[derive(Debug, Clone)]
pub struct SnapshotSeries {
    dir: PathBuf,
    taken: u32,
}

impl SnapshotSeries {
    /// A series under `dir`, starting with `0000`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SnapshotSeries {
            dir: dir.into(),
            taken: 0,
        }
    }

    /// The directory holding the series.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshots written so far.
    pub fn taken(&self) -> u32 {
        self.taken
    }

    /// Writes the next snapshot of `vm`: pauses it if it runs, writes
    /// `dir/NNNN` (full for the first, incremental after), and resumes it
    /// if it was running, also when the snapshot failed. A failed snapshot
    /// does not advance the series: the next call writes the same number
    /// (and the VM keeps the dirty pages for it).
    pub fn take(&mut self, vm: &Vm) -> Result<SnapshotInfo, VmError> {
        let was_running = vm.state() == RunState::Running;
        if was_running {
            vm.pause()?;
        }
        let kind = if self.taken == 0 {
            MemoryKind::Full
        } else {
            MemoryKind::Incremental
        };
        let r = vm.snapshot(&self.dir.join(format!("{:04}", self.taken)), kind);
        if was_running {
            vm.resume()?;
        }
        let info = r?;
        self.taken += 1;
        Ok(info)
    }
}

/// Take a snapshot of the series whenever `request` is set (the
/// supervisor clears it).
#[derive(Debug)]
pub struct SnapshotOnRequest<'a> {
    /// Where the snapshots go.
    pub series: &'a mut SnapshotSeries,
    /// Set by the caller (for example from a signal handler).
    pub request: &'a AtomicBool,
}

/// What the supervisor tells its callback.
#[derive(Debug)]
pub enum Report<'a> {
    /// An event of the VM (every one emitted while supervising, the stop
    /// included).
    Event(&'a VmEvent),
    /// A requested snapshot was written.
    Snapshot(&'a SnapshotInfo),
    /// A requested snapshot failed (the VM was resumed if it ran).
    SnapshotFailed(VmError),
    /// No event for one poll interval.
    Idle,
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The guest shut down (debug-exit port, i8042 reset, system event,
    /// `hlt` without an irqchip).
    Shutdown(Lifecycle),
    /// The guest stopped abnormally (triple fault, internal error, crash).
    Fault(Lifecycle),
    /// The callback returned `Break`; the VM is left as it is.
    Detached,
}

fn stop_outcome(l: &Lifecycle) -> Option<Outcome> {
    match l.kind {
        LifecycleKind::Shutdown => Some(Outcome::Shutdown(l.clone())),
        LifecycleKind::TripleFault | LifecycleKind::InternalError | LifecycleKind::Crash => {
            Some(Outcome::Fault(l.clone()))
        }
        _ => None,
    }
}

/// Supervises `vm` until it stops or `report` returns `Break`: every event
/// goes to `report`; every `poll` (at the latest) the snapshot request is
/// checked. A VM that had already stopped is reported (its stop event) and
/// returned at once.
pub fn supervise(
    vm: &Vm,
    poll: Duration,
    mut snapshots: Option<SnapshotOnRequest<'_>>,
    mut report: impl FnMut(Report<'_>) -> ControlFlow<()>,
) -> Outcome {
    let events = vm.subscribe();
    if let Some(l) = vm.stop_event() {
        let _ = report(Report::Event(&VmEvent::Lifecycle(l.clone())));
        return stop_outcome(&l).unwrap_or(Outcome::Detached);
    }
    loop {
        let flow = match events.recv_timeout(poll) {
            Ok(ev) => {
                let flow = report(Report::Event(&ev));
                if let VmEvent::Lifecycle(l) = &ev {
                    if let Some(o) = stop_outcome(l) {
                        return o;
                    }
                }
                flow
            }
            Err(RecvTimeoutError::Timeout) => report(Report::Idle),
            // The hub lives as long as `vm`, which outlives this call.
            Err(RecvTimeoutError::Disconnected) => return Outcome::Detached,
        };
        if flow.is_break() {
            return Outcome::Detached;
        }
        if let Some(s) = snapshots.as_mut() {
            if s.request.swap(false, Ordering::SeqCst) {
                let flow = match s.series.take(vm) {
                    Ok(info) => report(Report::Snapshot(&info)),
                    Err(e) => report(Report::SnapshotFailed(e)),
                };
                if flow.is_break() {
                    return Outcome::Detached;
                }
            }
        }
    }
}
