//! vmreplay's driver layer: one way to run, snapshot and restore an instance,
//! under QEMU or the built-in microVM.
//!
//! The capture agent runs originals through it and the replayer runs clones;
//! both pick the driver per instance by name ([`driver`]). An instance and its
//! clones always use the same driver, since a snapshot is in that driver's
//! format.
//!
//! - [`InstanceSpec`] describes one instance in driver-neutral terms (vCPUs,
//!   memory, boot source, vhost-user disks and NICs, console, debugger).
//! - [`Driver::launch`] starts it; [`Driver::restore`] starts a new instance
//!   from a snapshot directory, with the devices (new vhost-user sockets) of
//!   the spec it is given, and leaves it paused.
//! - [`Instance`] pauses, resumes, stops, waits, reports its state, fans out
//!   lifecycle events and console output to any number of subscribers, takes
//!   snapshots as a set of named [`artifacts`], and exposes a debugger.
//! - [`image::MachineImage`] loads a machine image directory (`image.toml`).

pub mod artifacts;
mod error;
pub mod events;
pub mod image;
pub mod microvm;
pub mod process;
pub mod qemu;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use artifacts::{MemoryKind, SnapshotArtifacts};
pub use error::{chain as error_chain, DriverError, ErrorKind};
pub use events::{Bus, DriverEvent, Subscription};
pub use spec::{
    Accel, BootSpec, ConsoleSpec, DebugListen, DiskSpec, InstanceSpec, MacAddr, NicSpec, QemuSpec,
};

/// Run state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Started, guest code not yet running (or restored and not resumed).
    Created,
    /// Running guest code.
    Running,
    /// Paused by the driver or an operator.
    Paused,
    /// The guest crashed (kernel panic, triple fault) and is held for
    /// inspection.
    Crashed,
    /// The hypervisor has exited.
    Exited,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Crashed => "crashed",
            RunState::Exited => "exited",
        })
    }
}

/// Why an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The guest powered off.
    GuestShutdown,
    /// The guest crashed: a kernel panic (pvpanic), a triple fault, or under
    /// QEMU a guest reset (which ends QEMU, run with `-no-reboot`). QEMU holds
    /// a panicked guest for inspection; its state is [`RunState::Crashed`].
    Crash,
    /// Stopped through [`Instance::stop`] or by dropping the instance.
    Stopped,
    /// The hypervisor failed or was killed from outside.
    Failed,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndReason::GuestShutdown => "guest shutdown",
            EndReason::Crash => "crash",
            EndReason::Stopped => "stopped",
            EndReason::Failed => "failed",
        })
    }
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Why.
    pub reason: EndReason,
    /// Process exit code, where there is a process and it exited normally.
    pub code: Option<i32>,
    /// The signal that ended the process.
    pub signal: Option<i32>,
    /// What the driver knows about why (guest shutdown, crash, killed).
    pub detail: String,
}

/// What an instance reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// Driver name.
    pub driver: &'static str,
    /// Run state.
    pub state: RunState,
    /// Acceleration in use (`kvm`, `tcg`) and why it was chosen.
    pub accel: Option<(String, String)>,
    /// The hypervisor's process id, where it runs in its own process.
    pub pid: Option<u32>,
    /// The console file.
    pub console_file: PathBuf,
    /// The debugger endpoint, if enabled.
    pub debugger: Option<DebugListen>,
    /// How it ended, once it has.
    pub exit: Option<ExitInfo>,
}

/// What a snapshot should contain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Full memory or the pages dirtied since the last snapshot (microVM).
    pub memory: MemoryKind,
}

/// A bounded wait for a running instance to exit, used by [`Instance::stop`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A hypervisor: creates instances.
pub trait Driver: Send + Sync {
    /// The driver's name (`qemu`, `microvm`).
    fn name(&self) -> &'static str;

    /// Starts `spec` and returns once guest code runs.
    fn launch(&self, spec: &InstanceSpec) -> Result<Box<dyn Instance>, DriverError>;

    /// Starts a new instance from the snapshot in `snapshot_dir` (written by
    /// [`Instance::snapshot`] of this driver), attached to the devices of
    /// `spec` (which must match the snapshot's devices by name, on new
    /// sockets). The instance is left paused with its state checked; call
    /// [`Instance::resume`] to run it.
    fn restore(
        &self,
        spec: &InstanceSpec,
        snapshot_dir: &Path,
    ) -> Result<Box<dyn Instance>, DriverError>;
}

/// One running (or paused, crashed or exited) instance.
///
/// Dropping an instance stops it (killing the hypervisor if it does not
/// exit within its grace period); nothing is left running.
pub trait Instance: Send + Sync {
    /// Instance id.
    fn id(&self) -> &str;

    /// Pauses guest execution. Under both drivers this also stops the
    /// vhost-user queues (GET_VRING_BASE), so the backends have completed
    /// every request the guest made before the pause when this returns.
    fn pause(&self) -> Result<(), DriverError>;

    /// Resumes guest execution.
    fn resume(&self) -> Result<(), DriverError>;

    /// Stops the instance and returns how it ended. QEMU asks the guest to
    /// power off (ACPI power button), waits up to `grace`, then quits or
    /// kills the process; the microVM has no power button and stops its
    /// vCPUs and devices at once. Either way nothing of the instance keeps
    /// running afterwards.
    fn stop(&self, grace: Duration) -> Result<ExitInfo, DriverError>;

    /// Waits up to `timeout` for the instance to end on its own: the guest
    /// shut down or crashed (a crashed guest may still be held for
    /// inspection), or the hypervisor died. [`DriverError::Timeout`] if it
    /// is still running.
    fn wait(&self, timeout: Duration) -> Result<ExitInfo, DriverError>;

    /// The instance's state.
    fn query(&self) -> Result<InstanceInfo, DriverError>;

    /// Lifecycle events: every event so far, then each new one.
    fn subscribe(&self) -> Subscription<DriverEvent>;

    /// Console output in chunks as the guest printed them: the most recent
    /// output first (up to [`events::CONSOLE_TAIL_CHUNKS`] chunks, so output
    /// printed before the call is not lost to a prompt subscriber), then
    /// everything printed from now on. The whole output is in the console
    /// file.
    fn console(&self) -> Subscription<Vec<u8>>;

    /// Writes a snapshot into `dir` (which must exist and be empty). A
    /// running instance is paused for the cut and resumed after it, and the
    /// pause time is reported; a paused instance stays paused.
    fn snapshot(&self, dir: &Path, opts: SnapshotOptions)
        -> Result<SnapshotArtifacts, DriverError>;

    /// As [`Instance::snapshot`], in two steps: this call saves the
    /// execution state (pausing a running instance for it, as `snapshot`
    /// does), and [`StagedSnapshot::complete`] makes it durable and
    /// complete, which may happen after the guest resumed. Until then `dir`
    /// holds no snapshot (a crash leaves files that neither the driver nor
    /// a restore takes for one). Drivers that cannot split the work do all
    /// of it here (the default).
    fn snapshot_staged<'a>(
        &'a self,
        dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<Box<dyn StagedSnapshot + 'a>, DriverError> {
        Ok(Box::new(CompleteSnapshot {
            arts: self.snapshot(dir, opts)?,
            dir: dir.to_path_buf(),
        }))
    }

    /// Where a gdb remote-protocol debugger can attach, if the spec asked
    /// for one.
    fn debugger(&self) -> Option<DebugListen>;

    /// The concrete instance, for driver-specific extras (for example the
    /// microVM's test-guest ports).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A snapshot [`Instance::snapshot_staged`] saved but that is not complete
/// yet. Dropping it without [`StagedSnapshot::complete`] abandons it.
pub trait StagedSnapshot {
    /// Makes the snapshot durable and writes its artifact list; only then
    /// is it a snapshot (and the parent of the next incremental one).
    /// `pause`, when the caller paused the instance around the staging
    /// itself, is the guest-visible pause to record instead of the
    /// driver's own (which is none for an instance that was paused).
    fn complete(self: Box<Self>, pause: Option<Duration>)
        -> Result<SnapshotArtifacts, DriverError>;
}

/// A snapshot that was complete when staged.
struct CompleteSnapshot {
    arts: SnapshotArtifacts,
    dir: PathBuf,
}

impl StagedSnapshot for CompleteSnapshot {
    fn complete(
        self: Box<Self>,
        pause: Option<Duration>,
    ) -> Result<SnapshotArtifacts, DriverError> {
        let mut arts = self.arts;
        if let Some(p) = pause {
            arts.pause = Some(Duration::from_micros(p.as_micros() as u64));
            arts.store(&self.dir)?;
        }
        Ok(arts)
    }
}

/// The driver called `name`.
pub fn driver(name: &str) -> Result<Box<dyn Driver>, DriverError> {
    match name {
        qemu::NAME => Ok(Box::new(qemu::QemuDriver)),
        microvm::NAME => Ok(Box::new(microvm::MicrovmDriver)),
        _ => Err(DriverError::UnknownDriver(name.to_string())),
    }
}
