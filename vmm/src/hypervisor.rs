//! The hypervisor seam the capture agent's driver layer wraps: boot,
//! pause, resume, snapshot (full or incremental) to a directory, restore
//! from one, and the event stream.

use std::path::Path;

use crossbeam_channel::Receiver;

use crate::snapshot::{DeviceState, MemoryKind};
use crate::vcpu::VmEvent;
use crate::vm::{BootSource, Capabilities, RestoreOptions, SnapshotInfo, Vm, VmConfig, VmError};

/// A running (or paused) guest.
pub trait Instance: Send {
    /// Pauses all vCPUs and devices.
    fn pause(&self) -> Result<(), VmError>;
    /// Resumes.
    fn resume(&self) -> Result<(), VmError>;
    /// Writes a snapshot of the paused guest into `dir`.
    fn snapshot(&self, dir: &Path, kind: MemoryKind) -> Result<SnapshotInfo, VmError>;
    /// Lifecycle and debug events.
    fn events(&self) -> Receiver<VmEvent>;
}

impl Instance for Vm {
    fn pause(&self) -> Result<(), VmError> {
        Vm::pause(self)
    }
    fn resume(&self) -> Result<(), VmError> {
        Vm::resume(self)
    }
    fn snapshot(&self, dir: &Path, kind: MemoryKind) -> Result<SnapshotInfo, VmError> {
        Vm::snapshot(self, dir, kind)
    }
    fn events(&self) -> Receiver<VmEvent> {
        Vm::events(self)
    }
}

/// Something that creates instances.
pub trait Hypervisor {
    /// The instance type.
    type Instance: Instance;
    /// Host capabilities.
    fn capabilities(&self) -> Result<Capabilities, VmError>;
    /// Creates, loads and starts a guest.
    fn boot(&self, cfg: VmConfig, src: &BootSource) -> Result<Self::Instance, VmError>;
    /// Restores a paused guest from a snapshot; returns the device states
    /// the caller reattaches before resuming.
    fn restore(
        &self,
        dir: &Path,
        opts: RestoreOptions,
    ) -> Result<(Self::Instance, Vec<DeviceState>), VmError>;
}

/// The built-in KVM microVM.
#[derive(Debug, Default, Clone, Copy)]
pub struct Microvm;

impl Hypervisor for Microvm {
    type Instance = Vm;

    fn capabilities(&self) -> Result<Capabilities, VmError> {
        Ok(Capabilities::probe(&crate::vm::open_kvm()?))
    }

    fn boot(&self, cfg: VmConfig, src: &BootSource) -> Result<Vm, VmError> {
        let mut vm = Vm::new(cfg)?;
        vm.load(src)?;
        vm.start()?;
        Ok(vm)
    }

    fn restore(&self, dir: &Path, opts: RestoreOptions) -> Result<(Vm, Vec<DeviceState>), VmError> {
        Vm::restore(dir, opts)
    }
}
