//! The VM: KVM VM, guest memory, in-kernel irqchip and PIT, buses, legacy
//! devices, vCPU threads, pause and resume, snapshot and restore, lifecycle
//! events.
//!
//! Split by concern:
//!
//! - `config`: [`VmConfig`], [`BootSource`], [`RestoreOptions`],
//!   [`Capabilities`];
//! - `lifecycle`: create, load, start, pause, resume, the stop and the
//!   events ([`Vm::subscribe`], [`Vm::wait_for_stop`]);
//! - `events`: the fan-out that gives every subscriber every event
//!   ([`EventHub`]);
//! - `persist`: [`Vm::snapshot`] and [`Vm::restore`], the
//!   [`SnapshotDevice`] hooks;
//! - `legacy`: COM1, the debug-exit port, the i8042 reset.
//!
//! Typical use:
//!
//! ```no_run
//! use vmr_vmm::vm::{BootSource, Vm, VmConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut vm = Vm::new(VmConfig { mem_size: 128 << 20, ..Default::default() })?;
//! vm.load(&BootSource::Elf("guest.elf".into()))?;
//! let events = vm.subscribe();
//! vm.start()?;
//! vm.pause()?;
//! vm.snapshot(std::path::Path::new("/tmp/snap"), vmr_vmm::snapshot::MemoryKind::Full)?;
//! vm.resume()?;
//! # drop(events); Ok(()) }
//! ```
//!
//! What devices get from here: [`Vm::vm_fd`] (for ioeventfds and irqfds,
//! also [`Vm::register_irqfd`] and [`Vm::register_ioeventfd`]),
//! [`Vm::memory`] (the `GuestMemoryMmap` and the memfd regions for
//! `SET_MEM_TABLE`), [`Vm::mmio_bus`] to map their registers,
//! [`Vm::allocate_device`] for an MMIO window and a GSI,
//! [`Vm::add_snapshot_device`] to take part in pause/snapshot, and
//! [`Vm::merge_dirty`] to add pages their backends wrote to the next
//! incremental snapshot.

mod config;
pub mod events;
mod legacy;
mod lifecycle;
mod persist;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::boot::loader::LoaderError;
use crate::boot::BootError;
use crate::bus::{Bus, BusError, DeviceInfo};
use crate::memory::{MemoryError, PageBitmap, VmMemory};
use crate::serial::{SerialDevice, SerialError};
use crate::snapshot::SnapshotError;
use crate::vcpu::{ExitRequest, Vcpu, VcpuContext, VcpuError, VcpuHandle};

pub use config::{BootSource, Capabilities, RestoreOptions, VmConfig};
pub use events::{EventHub, SUBSCRIBER_CAPACITY};
pub use legacy::{DEBUG_EXIT_PORT, I8042_BASE};
pub use persist::{PendingSnapshot, SnapshotDevice, SnapshotInfo};

/// Errors of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (KVM is required)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A required capability is missing.
    #[error("KVM lacks {0}")]
    MissingCap(&'static str),
    /// Bad configuration.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The bus refused a device.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Serial setup failed.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Snapshot I/O or format.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A device failed to save or pause.
    #[error("device {id}: {reason}")]
    Device {
        /// Device id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// The operation needs another run state.
    #[error("VM is {state:?}; {op} needs it {need}")]
    State {
        /// Current state.
        state: RunState,
        /// Operation.
        op: &'static str,
        /// Needed state.
        need: &'static str,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Run state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created, not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// A microVM.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: Arc<VmMemory>,
    caps: Capabilities,
    irqchip: bool,
    pit: bool,
    dirty_log: bool,
    /// See [`Vm::set_sync_snapshots`].
    sync_snapshots: AtomicBool,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    ctx: Arc<VcpuContext>,
    pending: Vec<Vcpu>,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    events: Arc<EventHub>,
    /// Pages written since the last snapshot that KVM's log no longer
    /// holds: reported by [`Vm::merge_dirty`], or drained for a snapshot
    /// that then failed.
    /// Shared with a [`PendingSnapshot`], which puts its pages back here if
    /// it is dropped before it completes.
    extra_dirty: Arc<Mutex<PageBitmap>>,
    /// Set while a staged snapshot has not completed (or been dropped): the
    /// next snapshot's parent is not known until then.
    snapshot_staged: Arc<AtomicBool>,
    /// Canonical directory of the last snapshot written or restored (the
    /// parent of the next incremental one).
    last_snapshot: Mutex<Option<PathBuf>>,
    /// The memory files of `last_snapshot`'s chain, newest first, when this
    /// VM wrote that snapshot (empty: not known, read from the files).
    last_chain: Mutex<Vec<PathBuf>>,
    devices: Mutex<Vec<Arc<dyn SnapshotDevice>>>,
    device_infos: Mutex<Vec<DeviceInfo>>,
    state: Mutex<RunState>,
    vcpu_count: u8,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpu_count)
            .field("irqchip", &self.irqchip)
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// Opens /dev/kvm with a clear error when it is missing.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::NoKvm)
}

/// The VM's resources for devices.
impl Vm {
    /// The KVM VM (for ioeventfds, irqfds, MSI).
    pub fn vm_fd(&self) -> Arc<VmFd> {
        Arc::clone(&self.fd)
    }

    /// Guest memory.
    pub fn memory(&self) -> Arc<VmMemory> {
        Arc::clone(&self.memory)
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> Arc<Bus> {
        Arc::clone(&self.mmio)
    }

    /// The port-I/O bus.
    pub fn pio_bus(&self) -> Arc<Bus> {
        Arc::clone(&self.pio)
    }

    /// Whether the VM has an in-kernel irqchip (irqfds work).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Host KVM capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The vCPU handles (empty before [`Vm::start`] or restore).
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The latch that exit devices set to stop the VM.
    pub fn exit_request(&self) -> Arc<ExitRequest> {
        Arc::clone(&self.ctx.exit_request)
    }

    /// Wires `evt` to `gsi` (needs the in-kernel irqchip).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        if !self.irqchip {
            return Err(VmError::MissingCap("an in-kernel irqchip (irqfd)"));
        }
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Makes guest writes to `addr` (optionally only of value `datamatch`,
    /// 4 bytes wide) signal `evt` without an exit.
    pub fn register_ioeventfd(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), VmError> {
        if !self.caps.ioeventfd {
            return Err(VmError::MissingCap("KVM_CAP_IOEVENTFD"));
        }
        match datamatch {
            Some(v) => self.fd.register_ioevent(evt, &addr, v),
            None => self
                .fd
                .register_ioevent(evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// Reserves the next virtio-mmio window and GSI for a device; the device
    /// is announced to Linux guests (command line, ACPI hook).
    pub fn allocate_device(&self, name: &str) -> DeviceInfo {
        let mut infos = self.device_infos.lock().unwrap_or_else(|p| p.into_inner());
        let i = infos.len() as u64;
        let info = DeviceInfo {
            name: name.to_string(),
            mmio_base: layout::MMIO_DEVICES_START + i * layout::MMIO_DEVICE_SIZE,
            mmio_len: layout::MMIO_DEVICE_SIZE,
            gsi: layout::FIRST_DEVICE_GSI + i as u32,
        };
        infos.push(info.clone());
        info
    }

    /// Devices allocated so far.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.device_infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Registers a device for pause, resume and snapshots.
    pub fn add_snapshot_device(&self, dev: Arc<dyn SnapshotDevice>) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dev);
    }

    /// Adds pages (KVM bitmap layout) written behind KVM's back, e.g. by a
    /// vhost-user backend's log, to the next incremental snapshot.
    pub fn merge_dirty(&self, bitmap: &[u64]) {
        self.extra_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .merge_words(bitmap);
    }

    /// Queues bytes on the serial port's input.
    pub fn serial_input(&self, bytes: &[u8]) -> Result<usize, VmError> {
        Ok(self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue(bytes)?)
    }
}
