//! Configuration of a VM: what to create ([`VmConfig`]), what to boot
//! ([`BootSource`]), how to restore ([`RestoreOptions`]), and what the
//! host's KVM can do ([`Capabilities`]).

use std::path::PathBuf;

use kvm_ioctls::{Cap, Kvm};

use crate::boot::linux::AcpiSetup;
use crate::serial::SerialOut;
use crate::snapshot::RestoreMemory;

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

/// Options for [`Vm::restore`](super::Vm::restore).
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
