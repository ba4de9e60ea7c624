//! The VM: KVM VM, guest memory, in-kernel irqchip and PIT, buses, legacy
//! devices (serial, debug-exit port, i8042 reset), vCPU threads, pause and
//! resume, snapshot and restore, lifecycle events.
//!
//! Typical use:
//!
//! ```no_run
//! use vmr_vmm::vm::{BootSource, Vm, VmConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut vm = Vm::new(VmConfig { mem_size: 128 << 20, ..Default::default() })?;
//! vm.load(&BootSource::Elf("guest.elf".into()))?;
//! let events = vm.events();
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use tracing::{debug, info};
use vmm_sys_util::eventfd::EventFd;
use vmr_proto::{Lifecycle, LifecycleKind};

use crate::boot::linux::{AcpiSetup, LinuxBoot};
use crate::boot::loader::{self, ImageKind, LoaderError};
use crate::boot::{layout, BootError};
use crate::bus::{Bus, BusError, DeviceInfo, MmioDevice};
use crate::memory::{MemoryError, PageBitmap, VmMemory, PAGE_SIZE};
use crate::serial::{SerialDevice, SerialError, SerialOut, COM1_BASE, COM1_LEN};
use crate::snapshot::{
    self, memfile, DeviceState, MemoryKind, MemoryRef, RestoreMemory, SnapshotData, SnapshotError,
    SnapshotMeta, VmKvmState,
};
use crate::vcpu::{
    ExitRequest, Vcpu, VcpuContext, VcpuError, VcpuFeatures, VcpuHandle, VcpuState, VmEvent,
};

/// Port of the debug-exit device: a write stops the VM with a `Shutdown`
/// event whose detail carries the value ("guest exit code N").
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 ports 0x60-0x64; writing 0xfe to 0x64 resets (stops) the VM.
pub const I8042_BASE: u16 = 0x60;

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

/// VM configuration.
pub struct VmConfig {
    /// Guest memory in bytes (multiple of 4 KiB, below 3.25 GiB).
    pub mem_size: u64,
    /// Number of vCPUs (more than one needs the in-kernel irqchip).
    pub vcpus: u8,
    /// Console output (default: discarded).
    pub serial_out: Option<SerialOut>,
    /// Track dirty pages for incremental snapshots (default on).
    pub dirty_log: bool,
    /// Use the in-kernel irqchip and PIT when KVM has them (default on).
    pub irqchip: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 128 << 20,
            vcpus: 1,
            serial_out: None,
            dirty_log: true,
            irqchip: true,
        }
    }
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_size", &self.mem_size)
            .field("vcpus", &self.vcpus)
            .field("dirty_log", &self.dirty_log)
            .field("irqchip", &self.irqchip)
            .finish()
    }
}

/// What to boot.
pub enum BootSource {
    /// Decide by the file's first bytes: ELF, bzImage (booted with the
    /// default ACPI tables) or flat.
    Auto {
        /// The image.
        kernel: PathBuf,
        /// Initrd (bzImage only).
        initrd: Option<PathBuf>,
        /// Command line (bzImage only).
        cmdline: String,
    },
    /// An ELF executable entered in 64-bit mode at its entry point.
    Elf(PathBuf),
    /// Flat code copied to 1 MiB and entered there in 64-bit mode.
    FlatBytes(Vec<u8>),
    /// Linux bzImage.
    Linux {
        /// bzImage.
        kernel: PathBuf,
        /// Initrd.
        initrd: Option<PathBuf>,
        /// Command line.
        cmdline: String,
        /// ACPI tables hook.
        acpi: Option<Box<dyn AcpiSetup>>,
    },
}

impl std::fmt::Debug for BootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootSource::Auto { kernel, .. } => write!(f, "Auto({})", kernel.display()),
            BootSource::Elf(p) => write!(f, "Elf({})", p.display()),
            BootSource::FlatBytes(b) => write!(f, "FlatBytes({} bytes)", b.len()),
            BootSource::Linux { kernel, .. } => write!(f, "Linux({})", kernel.display()),
        }
    }
}

/// What KVM on this host can do (from `check_extension`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// KVM API version (12).
    pub api_version: i32,
    /// In-kernel irqchip.
    pub irqchip: bool,
    /// In-kernel PIT (v2).
    pub pit2: bool,
    /// irqfd.
    pub irqfd: bool,
    /// ioeventfd.
    pub ioeventfd: bool,
    /// XSAVE get/set.
    pub xsave: bool,
    /// XCRS get/set.
    pub xcrs: bool,
    /// Debug registers get/set.
    pub debugregs: bool,
    /// vCPU events get/set.
    pub vcpu_events: bool,
    /// Guest debugging (single step, breakpoints).
    pub set_guest_debug: bool,
    /// `kvm_run.immediate_exit`.
    pub immediate_exit: bool,
    /// kvmclock adjust (get/set clock).
    pub adjust_clock: bool,
    /// TSC deadline timer.
    pub tsc_deadline_timer: bool,
    /// Recommended vCPU count.
    pub nr_vcpus: usize,
    /// Maximum vCPUs.
    pub max_vcpus: usize,
    /// Memory slots.
    pub nr_memslots: usize,
    /// Entries in the MSR index list.
    pub msr_index_list: usize,
}

impl Capabilities {
    /// Probes `kvm`.
    pub fn probe(kvm: &Kvm) -> Self {
        Capabilities {
            api_version: kvm.get_api_version(),
            irqchip: kvm.check_extension(Cap::Irqchip),
            pit2: kvm.check_extension(Cap::Pit2),
            irqfd: kvm.check_extension(Cap::Irqfd),
            ioeventfd: kvm.check_extension(Cap::Ioeventfd),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            set_guest_debug: kvm.check_extension(Cap::SetGuestDebug),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            adjust_clock: kvm.check_extension(Cap::AdjustClock),
            tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
            nr_vcpus: kvm.get_nr_vcpus(),
            max_vcpus: kvm.get_max_vcpus(),
            nr_memslots: kvm.get_nr_memslots(),
            msr_index_list: kvm
                .get_msr_index_list()
                .map(|l| l.as_slice().len())
                .unwrap_or(0),
        }
    }
}

/// A device that takes part in pause, resume and snapshots.
///
/// The devices layer registers one per device with
/// [`Vm::add_snapshot_device`]; the VM pauses them after the vCPUs, asks for
/// their state and their backends' dirty pages when snapshotting, and
/// resumes them before the vCPUs.
pub trait SnapshotDevice: Send + Sync {
    /// Unique id; the saved state is returned under it on restore.
    fn id(&self) -> String;
    /// Quiesces the device (stop backends from touching guest memory).
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    /// Undoes [`SnapshotDevice::pause`].
    fn resume(&self) -> Result<(), String> {
        Ok(())
    }
    /// Serialized state (the device's `Persist::save`).
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// Pages the backend wrote since the last call, in KVM bitmap layout
    /// (bit `p % 64` of word `p / 64`), or `None` if it cannot tell (then an
    /// incremental snapshot is refused while the device is attached).
    fn take_dirty(&self) -> Option<Vec<u64>>;
}

/// Debug-exit port device.
struct DebugExit(Arc<ExitRequest>);

impl MmioDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        self.0.request(
            LifecycleKind::Shutdown,
            format!("guest exit code {}", u64::from_le_bytes(v)),
        );
    }
}

/// Minimal i8042: status reads 0 (no data), command 0xfe resets.
struct I8042(Arc<ExitRequest>);

impl MmioDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.0
                .request(LifecycleKind::Shutdown, "i8042 reset".into());
        }
    }
}

/// Result of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Snapshot id (directory name).
    pub id: String,
    /// Full or incremental.
    pub kind: MemoryKind,
    /// Pages written to the memory file.
    pub pages: u64,
    /// Pages in the dirty set (incremental: equals `pages`).
    pub dirty_pages: Vec<u64>,
}

/// Options for [`Vm::restore`].
pub struct RestoreOptions {
    /// How guest memory is backed.
    pub memory: RestoreMemory,
    /// Console output.
    pub serial_out: Option<SerialOut>,
    /// Track dirty pages after the restore.
    pub dirty_log: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            memory: RestoreMemory::PrivateLazy,
            serial_out: None,
            dirty_log: true,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("memory", &self.memory)
            .field("dirty_log", &self.dirty_log)
            .finish()
    }
}

/// A microVM.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: Arc<VmMemory>,
    caps: Capabilities,
    irqchip: bool,
    pit: bool,
    dirty_log: bool,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    ctx: Arc<VcpuContext>,
    pending: Vec<Vcpu>,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    extra_dirty: Mutex<PageBitmap>,
    last_snapshot: Mutex<Option<PathBuf>>,
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

fn readable_msrs(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Vec<u32> {
    let list = match kvm.get_msr_index_list() {
        Ok(l) => l.as_slice().to_vec(),
        Err(_) => return Vec::new(),
    };
    list.into_iter()
        .filter(|&index| {
            let e = [kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            }];
            kvm_bindings::Msrs::from_entries(&e)
                .ok()
                .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

impl Vm {
    fn build(
        mem_size: u64,
        vcpus: u8,
        want_irqchip: bool,
        dirty_log: bool,
        memory: VmMemory,
        serial: SerialDevice,
    ) -> Result<Self, VmError> {
        if vcpus == 0 {
            return Err(VmError::Config("at least one vCPU is needed".into()));
        }
        let kvm = open_kvm()?;
        let caps = Capabilities::probe(&kvm);
        if caps.api_version != 12 {
            return Err(VmError::Config(format!(
                "KVM API version {} (need 12)",
                caps.api_version
            )));
        }
        if !caps.immediate_exit {
            return Err(VmError::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let irqchip = want_irqchip && caps.irqchip;
        let pit = irqchip && caps.pit2;
        if vcpus > 1 && !irqchip {
            return Err(VmError::Config(
                "more than one vCPU needs the in-kernel irqchip".into(),
            ));
        }
        if usize::from(vcpus) > caps.max_vcpus {
            return Err(VmError::Config(format!(
                "{vcpus} vCPUs exceed KVM's {}",
                caps.max_vcpus
            )));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        }
        if pit {
            let cfg = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(cfg).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: memory.host_base() as u64,
        };
        // SAFETY: the region maps `mem_size` bytes that `memory` owns; the Vm
        // keeps `memory` alive for as long as the VM fd exists.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let features = VcpuFeatures {
            xsave: caps.xsave,
            xcrs: caps.xcrs,
            debugregs: caps.debugregs,
            vcpu_events: caps.vcpu_events,
            irqchip,
        };
        let mut pending = Vec::with_capacity(vcpus as usize);
        let mut msr_indices = None;
        for id in 0..u32::from(vcpus) {
            let vfd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let msrs = msr_indices
                .get_or_insert_with(|| Arc::new(readable_msrs(&kvm, &vfd)))
                .clone();
            let v = Vcpu {
                id,
                fd: vfd,
                features,
                msr_indices: msrs,
            };
            v.set_cpuid(&supported)?;
            pending.push(v);
        }

        let fd = Arc::new(fd);
        let mmio = Arc::new(Bus::new("mmio"));
        let pio = Arc::new(Bus::new("pio"));
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let exit = Arc::new(ExitRequest::default());
        let ctx = Arc::new(VcpuContext::new(
            Arc::clone(&mmio),
            Arc::clone(&pio),
            events_tx.clone(),
            Arc::clone(&exit),
        ));
        if irqchip {
            fd.register_irqfd(serial.irq_evt(), layout::SERIAL_GSI)
                .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        }
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        pio.insert(
            u64::from(DEBUG_EXIT_PORT),
            1,
            Arc::new(Mutex::new(DebugExit(exit.clone()))),
        )?;
        pio.insert(u64::from(I8042_BASE), 5, Arc::new(Mutex::new(I8042(exit))))?;
        info!(mem_size, vcpus, irqchip, pit, dirty_log, "VM created");
        Ok(Vm {
            fd,
            memory: Arc::new(memory),
            caps,
            irqchip,
            pit,
            dirty_log,
            mmio,
            pio,
            ctx,
            pending,
            vcpus: Vec::new(),
            serial,
            events_tx,
            events_rx,
            extra_dirty: Mutex::new(PageBitmap::new(mem_size / PAGE_SIZE)),
            last_snapshot: Mutex::new(None),
            devices: Mutex::new(Vec::new()),
            device_infos: Mutex::new(Vec::new()),
            state: Mutex::new(RunState::Created),
            vcpu_count: vcpus,
        })
    }

    /// Creates a VM with zeroed memory on a shared memfd.
    pub fn new(cfg: VmConfig) -> Result<Self, VmError> {
        let memory = VmMemory::new_shared(cfg.mem_size)?;
        let serial =
            SerialDevice::new(cfg.serial_out.unwrap_or_else(|| Box::new(std::io::sink())))?;
        Self::build(
            cfg.mem_size,
            cfg.vcpus,
            cfg.irqchip,
            cfg.dirty_log,
            memory,
            serial,
        )
    }

    /// Loads a guest and sets up vCPU 0 to enter it in 64-bit mode. With
    /// more vCPUs, the others wait for INIT/SIPI.
    pub fn load(&self, src: &BootSource) -> Result<(), VmError> {
        let v0 = self
            .pending
            .first()
            .ok_or_else(|| VmError::Config("the VM is already started".into()))?;
        let mem = self.memory.guest_memory();
        crate::boot::write_boot_tables(mem)?;
        let (entry, rsi, rsp) = match src {
            BootSource::Elf(p) => (loader::load_elf(mem, p)?.0, 0, 0),
            BootSource::FlatBytes(code) => (
                loader::load_flat_bytes(mem, code)
                    .map_err(|_| VmError::Config("flat image does not fit in memory".into()))?
                    .0,
                0,
                0,
            ),
            BootSource::Auto {
                kernel,
                initrd,
                cmdline,
            } => match loader::detect(kernel)? {
                ImageKind::Elf => (loader::load_elf(mem, kernel)?.0, 0, 0),
                ImageKind::Flat => (loader::load_flat(mem, kernel)?.0, 0, 0),
                ImageKind::BzImage => {
                    self.load_linux(kernel, initrd.as_deref(), cmdline, Some(&crate::acpi::Acpi))?
                }
            },
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
                acpi,
            } => self.load_linux(kernel, initrd.as_deref(), cmdline, acpi.as_deref())?,
        };
        let regs = crate::boot::long_mode_regs(entry, rsp, rsi);
        v0.setup_long_mode(&regs)?;
        for ap in &self.pending[1..] {
            let mp = kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            };
            ap.fd
                .set_mp_state(mp)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            ap.setup_long_mode(&crate::boot::long_mode_regs(entry, rsp, rsi))?;
        }
        debug!(entry, "guest loaded");
        Ok(())
    }

    fn load_linux(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        acpi: Option<&dyn AcpiSetup>,
    ) -> Result<(u64, u64, u64), VmError> {
        let devices = self
            .device_infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let e = crate::boot::linux::load_linux(
            self.memory.guest_memory(),
            self.memory.size(),
            &LinuxBoot {
                kernel,
                initrd,
                cmdline,
                devices: &devices,
                vcpus: self.vcpu_count,
                acpi,
            },
        )?;
        Ok((e.entry.0, e.zero_page.0, layout::BOOT_STACK))
    }

    fn spawn_vcpus(&mut self, paused: bool) -> Result<(), VmError> {
        for v in self.pending.drain(..) {
            self.vcpus
                .push(VcpuHandle::spawn(v, Arc::clone(&self.ctx), paused)?);
        }
        Ok(())
    }

    fn emit(&self, kind: LifecycleKind, detail: String, snapshot_id: Option<String>) {
        let _ = self.events_tx.send(VmEvent::Lifecycle(Lifecycle {
            kind,
            detail,
            regs: Vec::new(),
            gap: None,
            snapshot_id,
        }));
    }

    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        self.start_vcpus(false)
    }

    /// Starts the vCPU threads paused, so a debugger can set breakpoints or
    /// single-stepping before the first guest instruction; [`Vm::resume`]
    /// (or the gdb stub) runs them.
    pub fn start_paused(&mut self) -> Result<(), VmError> {
        self.start_vcpus(true)
    }

    fn start_vcpus(&mut self, paused: bool) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Created || self.pending.is_empty() {
            return Err(VmError::State {
                state: st,
                op: "start",
                need: "created and loaded",
            });
        }
        // Boot goes out first so it precedes anything the vCPUs report.
        self.emit(LifecycleKind::Boot, String::new(), None);
        self.spawn_vcpus(paused)?;
        self.set_state(if paused {
            RunState::Paused
        } else {
            RunState::Running
        });
        Ok(())
    }

    /// Pauses every vCPU (each completes its pending I/O first), then the
    /// snapshot devices.
    pub fn pause(&self) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Running {
            return Err(VmError::State {
                state: st,
                op: "pause",
                need: "running",
            });
        }
        for v in &self.vcpus {
            v.pause()?;
        }
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            d.pause()
                .map_err(|reason| VmError::Device { id: d.id(), reason })?;
        }
        self.set_state(RunState::Paused);
        self.emit(LifecycleKind::Pause, String::new(), None);
        Ok(())
    }

    /// Resumes devices, then vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Paused {
            return Err(VmError::State {
                state: st,
                op: "resume",
                need: "paused",
            });
        }
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            d.resume()
                .map_err(|reason| VmError::Device { id: d.id(), reason })?;
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        self.set_state(RunState::Running);
        self.emit(LifecycleKind::Resume, String::new(), None);
        Ok(())
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.run_state()
    }

    /// A receiver of the VM's events. Every receiver sees each event once
    /// in total (it is a shared queue), so use one consumer.
    pub fn events(&self) -> Receiver<VmEvent> {
        self.events_rx.clone()
    }

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

    /// Whether a vCPU reported a shutdown, triple fault or error.
    pub fn is_stopped(&self) -> bool {
        self.ctx.exit_request.peek().is_some()
    }

    fn kvm_dirty(&self) -> Result<PageBitmap, VmError> {
        let mut b = PageBitmap::new(self.memory.pages());
        if self.dirty_log {
            let words = self
                .fd
                .get_dirty_log(0, self.memory.size() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            b.merge_words(&words);
        }
        Ok(b)
    }

    fn vm_kvm_state(&self) -> Result<VmKvmState, VmError> {
        let mut s = VmKvmState::default();
        if self.irqchip {
            let get = |id| -> Result<kvm_irqchip, VmError> {
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut c)
                    .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
                Ok(c)
            };
            s.pic_master = Some(get(KVM_IRQCHIP_PIC_MASTER)?);
            s.pic_slave = Some(get(KVM_IRQCHIP_PIC_SLAVE)?);
            s.ioapic = Some(get(KVM_IRQCHIP_IOAPIC)?);
        }
        if self.pit {
            s.pit2 = Some(self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?);
        }
        if self.caps.adjust_clock {
            s.clock = Some(self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?);
        }
        Ok(s)
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed).
    ///
    /// `Full` writes all memory and starts a new chain; `Incremental` writes
    /// the pages dirtied since this VM's previous snapshot (or the snapshot
    /// it was restored from): KVM's dirty log merged with
    /// [`Vm::merge_dirty`] pages and the devices' [`SnapshotDevice::take_dirty`].
    /// Either way the dirty log restarts from here.
    pub fn snapshot(&self, dir: &Path, kind: MemoryKind) -> Result<SnapshotInfo, VmError> {
        let st = self.run_state();
        if st != RunState::Paused {
            return Err(VmError::State {
                state: st,
                op: "snapshot",
                need: "paused",
            });
        }
        let parent = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if kind == MemoryKind::Incremental {
            if !self.dirty_log {
                return Err(VmError::Config(
                    "incremental snapshots need the dirty log".into(),
                ));
            }
            if parent.is_none() {
                return Err(VmError::Config(
                    "an incremental snapshot needs an earlier snapshot".into(),
                ));
            }
        }
        let io = |source| {
            VmError::Snapshot(SnapshotError::Io {
                path: dir.display().to_string(),
                source,
            })
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let dir = dir.canonicalize().map_err(io)?;
        // Overwriting a snapshot this VM's memory chain depends on would
        // corrupt later increments and, for a private restore, the mapping
        // the guest runs on.
        if let Some(p) = &parent {
            for (file, _, _) in snapshot::memory_chain(p)? {
                if file.parent() == Some(dir.as_path()) {
                    return Err(VmError::Config(format!(
                        "{} holds a snapshot this VM depends on; write to another directory",
                        dir.display()
                    )));
                }
            }
        }
        // No state file until the memory file is complete: a crash midway
        // leaves an invalid snapshot, never a mismatched one.
        match std::fs::remove_file(dir.join(snapshot::STATE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }

        let mut dirty = self.kvm_dirty()?;
        dirty.merge(&std::mem::replace(
            &mut *self.extra_dirty.lock().unwrap_or_else(|p| p.into_inner()),
            PageBitmap::new(self.memory.pages()),
        ));
        let mut devices = Vec::new();
        let mut device_dirty_unknown = None;
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            match d.take_dirty() {
                Some(words) => dirty.merge_words(&words),
                None => device_dirty_unknown = Some(d.id()),
            }
            let state = d
                .save_state()
                .map_err(|reason| VmError::Device { id: d.id(), reason })?;
            devices.push(DeviceState { id: d.id(), state });
        }
        if let (MemoryKind::Incremental, Some(id)) = (kind, &device_dirty_unknown) {
            return Err(VmError::Device {
                id: id.clone(),
                reason: "cannot report the pages its backend wrote; take a full snapshot".into(),
            });
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save_state()?);
        }
        let vm = self.vm_kvm_state()?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();

        // SAFETY: vCPUs are paused and devices quiesced, so nothing writes
        // guest memory while it is copied out.
        let mem = unsafe { self.memory.as_slice() };
        let (file, pages) = match kind {
            MemoryKind::Full => {
                let n = memfile::write_full(&dir.join(snapshot::FULL_MEMORY_FILE), mem)
                    .map_err(SnapshotError::from)?;
                (snapshot::FULL_MEMORY_FILE, n)
            }
            MemoryKind::Incremental => {
                let n = memfile::write_diff(&dir.join(snapshot::DIFF_MEMORY_FILE), mem, &dirty)
                    .map_err(SnapshotError::from)?;
                (snapshot::DIFF_MEMORY_FILE, n)
            }
        };
        // A directory reused for another kind must not keep a stale file.
        let other = match kind {
            MemoryKind::Full => snapshot::DIFF_MEMORY_FILE,
            MemoryKind::Incremental => snapshot::FULL_MEMORY_FILE,
        };
        let _ = std::fs::remove_file(dir.join(other));
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let data = SnapshotData {
            meta: SnapshotMeta {
                id: id.clone(),
                created_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                mem_size: self.memory.size(),
                vcpus: self.vcpus.len() as u32,
                irqchip: self.irqchip,
                pit: self.pit,
                memory: MemoryRef {
                    kind,
                    file: file.into(),
                    parent: if kind == MemoryKind::Incremental {
                        parent
                    } else {
                        None
                    },
                    pages,
                },
            },
            vm,
            vcpus,
            serial,
            devices,
        };
        data.store(&dir)?;
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.clone());
        info!(dir = %dir.display(), ?kind, pages, "snapshot written");
        self.emit(
            LifecycleKind::Snapshot,
            format!("{kind:?}"),
            Some(id.clone()),
        );
        Ok(SnapshotInfo {
            dir,
            id,
            kind,
            pages,
            dirty_pages: dirty.iter().collect(),
        })
    }

    /// Builds a new, paused VM from a snapshot directory (following its
    /// parent chain for memory). Returns the VM and the device states the
    /// caller must restore (its devices' `Persist::restore`), map on the
    /// bus and register with [`Vm::add_snapshot_device`] before
    /// [`Vm::resume`].
    pub fn restore(dir: &Path, opts: RestoreOptions) -> Result<(Vm, Vec<DeviceState>), VmError> {
        let data = SnapshotData::load(dir)?;
        let memory = snapshot::restore_memory(dir, opts.memory)?;
        let serial = SerialDevice::from_snapshot(
            &data.serial,
            opts.serial_out.unwrap_or_else(|| Box::new(std::io::sink())),
        )?;
        let vcpus = u8::try_from(data.meta.vcpus)
            .map_err(|_| VmError::Config(format!("{} vCPUs in snapshot", data.meta.vcpus)))?;
        let mut vm = Self::build(
            data.meta.mem_size,
            vcpus,
            data.meta.irqchip,
            opts.dirty_log,
            memory,
            serial,
        )?;
        if data.meta.irqchip && !vm.irqchip {
            return Err(VmError::MissingCap(
                "an in-kernel irqchip (the snapshot has one)",
            ));
        }
        if data.meta.pit && !vm.pit {
            return Err(VmError::MissingCap(
                "an in-kernel PIT (the snapshot has one)",
            ));
        }
        let s = &data.vm;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic]
            .into_iter()
            .flatten()
        {
            vm.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(p) = &s.pit2 {
            vm.fd.set_pit2(p).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        if let (Some(c), true) = (&s.clock, vm.caps.adjust_clock) {
            let mut c = *c;
            c.flags = 0;
            vm.fd.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        for (v, st) in vm.pending.iter().zip(&data.vcpus) {
            v.restore_state(st)?;
        }
        vm.spawn_vcpus(true)?;
        vm.set_state(RunState::Paused);
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        *vm.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(canon);
        info!(dir = %dir.display(), "VM restored (paused)");
        Ok((vm, data.devices))
    }

    /// Saved vCPU states of the paused VM (for inspection).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        self.vcpus.iter().map(|v| Ok(v.save_state()?)).collect()
    }

    /// Waits for the next lifecycle event that stops the VM (shutdown,
    /// triple fault, internal error, crash), up to `timeout`. Other events
    /// are returned to nobody (consumed).
    pub fn wait_for_stop(&self, timeout: std::time::Duration) -> Option<Lifecycle> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            match self.events_rx.recv_timeout(left) {
                Ok(VmEvent::Lifecycle(l))
                    if matches!(
                        l.kind,
                        LifecycleKind::Shutdown
                            | LifecycleKind::TripleFault
                            | LifecycleKind::InternalError
                            | LifecycleKind::Crash
                    ) =>
                {
                    return Some(l);
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Handles join their threads on drop; paused or running, each
        // thread gets the exit request and a kick.
        self.vcpus.clear();
    }
}
