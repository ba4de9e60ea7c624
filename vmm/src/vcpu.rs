//! One vCPU: configuration (CPUID, MSRs, LAPIC, 64-bit boot state), state
//! save/restore, guest debug, and the thread that runs it.
//!
//! Each vCPU runs on its own thread, which owns the `VcpuFd`. Other threads
//! talk to it through a [`VcpuHandle`]: [`VcpuHandle::pause`] sends a request
//! and kicks the thread out of `KVM_RUN` with a signal (whose handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not
//! lost); [`VcpuHandle::with`] runs a closure on the vCPU thread with the
//! `VcpuFd` (register access for snapshots and the gdb stub).
//!
//! Exits: port I/O and MMIO go to the [`Bus`]es; `KVM_EXIT_SHUTDOWN` (triple
//! fault), internal errors, failed entries, system events and requests from
//! the exit devices (debug-exit port, i8042 reset) stop the vCPU and are
//! reported as [`Lifecycle`] events with the registers at that moment.
//! `KVM_EXIT_DEBUG` pauses the vCPU and reports a [`DebugEvent`].

use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, trace, warn};
use vmr_proto::{Lifecycle, LifecycleKind, VcpuRegs};

use crate::bus::Bus;
use crate::vm::EventHub;

/// Errors of one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs.
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} MSRs (first refused: {first_refused:#x})")]
    Msrs {
        /// vCPU index.
        vcpu: u32,
        /// Accepted.
        set: usize,
        /// Requested.
        total: usize,
        /// First refused index.
        first_refused: u32,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread has exited")]
    Gone(u32),
    /// The vCPU did not acknowledge a request in time.
    #[error("vCPU {0} did not respond within {1:?}")]
    Timeout(u32, Duration),
    /// Spawning the thread failed.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u32, #[source] std::io::Error),
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A FAM wrapper could not be built.
    #[error("vCPU {0}: too many {1} entries")]
    Fam(u32, &'static str),
}

fn kvm(vcpu: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { vcpu, what, source }
}

/// The legacy FPU/SSE state (`kvm_fpu`), in a serializable form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers (80 bits each, padded to 16 bytes).
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM keeps about a vCPU, as saved in a snapshot.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (used when XSAVE is unavailable).
    pub fpu: FpuState,
    /// Extended state, when KVM supports XSAVE.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, when supported.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers, when supported.
    pub debugregs: Option<kvm_debugregs>,
    /// Local APIC, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// MSRs (index and value).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: Option<kvm_vcpu_events>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// Which optional state KVM supports (from `check_extension`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuFeatures {
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// KVM_CAP_DEBUGREGS.
    pub debugregs: bool,
    /// KVM_CAP_VCPU_EVENTS.
    pub vcpu_events: bool,
    /// In-kernel irqchip (LAPIC state exists).
    pub irqchip: bool,
}

/// A vCPU and the facts needed to save it.
pub struct Vcpu {
    /// Index (also the APIC ID).
    pub id: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Optional features.
    pub features: VcpuFeatures,
    /// MSRs to save (readable entries of KVM's index list).
    pub msr_indices: Arc<Vec<u32>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// MSR indices.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// MTRRdefType.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

impl Vcpu {
    /// Sets CPUID from the host's supported list, with this vCPU's APIC ID.
    pub fn set_cpuid(&self, supported: &CpuId) -> Result<(), VcpuError> {
        let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
        for e in &mut entries {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x00ff_ffff) | (self.id << 24);
                    e.ecx |= 1 << 31; // hypervisor present
                }
                0xb | 0x1f => e.edx = self.id,
                _ => {}
            }
        }
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::Fam(self.id, "CPUID"))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(kvm(self.id, "KVM_SET_CPUID2"))
    }

    /// Writes MSRs; all must be accepted.
    pub fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let msrs = Msrs::from_entries(entries).map_err(|_| VcpuError::Fam(self.id, "MSR"))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(kvm(self.id, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                vcpu: self.id,
                set,
                total: entries.len(),
                first_refused: entries[set].index,
            });
        }
        Ok(())
    }

    /// Puts the vCPU in 64-bit mode at `regs.rip` with the boot GDT and
    /// page tables; sets boot MSRs, FPU defaults and, with an irqchip, the
    /// LAPIC's LINT0/LINT1 (ExtINT/NMI) as Linux expects.
    pub fn setup_long_mode(&self, regs: &kvm_regs) -> Result<(), VcpuError> {
        let base = self.fd.get_sregs().map_err(kvm(self.id, "KVM_GET_SREGS"))?;
        let sregs = crate::boot::long_mode_sregs(&base);
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm(self.id, "KVM_SET_SREGS"))?;
        self.fd
            .set_regs(regs)
            .map_err(kvm(self.id, "KVM_SET_REGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm(self.id, "KVM_SET_FPU"))?;
        let e = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let boot_msrs = [
            e(msr::SYSENTER_CS, 0),
            e(msr::SYSENTER_ESP, 0),
            e(msr::SYSENTER_EIP, 0),
            e(msr::STAR, 0),
            e(msr::CSTAR, 0),
            e(msr::KERNEL_GS_BASE, 0),
            e(msr::SYSCALL_MASK, 0),
            e(msr::LSTAR, 0),
            e(msr::TSC, 0),
            e(msr::MISC_ENABLE, 1), // fast strings
            e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
        ];
        // Not every host accepts every one; set those it takes.
        for m in boot_msrs {
            if let Err(err) = self.set_msrs(&[m]) {
                debug!(vcpu = self.id, msr = m.index, %err, "boot MSR not accepted");
            }
        }
        if self.features.irqchip {
            let mut lapic = self.fd.get_lapic().map_err(kvm(self.id, "KVM_GET_LAPIC"))?;
            const LINT0: usize = 0x350;
            const LINT1: usize = 0x360;
            const EXTINT: u32 = 0x700;
            const NMI: u32 = 0x400;
            let rw = |l: &mut kvm_lapic_state, off: usize, mode: u32| {
                let mut b = [0u8; 4];
                for (i, x) in b.iter_mut().enumerate() {
                    *x = l.regs[off + i] as u8;
                }
                let v = (u32::from_le_bytes(b) & !0x700) | mode;
                for (i, x) in v.to_le_bytes().iter().enumerate() {
                    l.regs[off + i] = *x as _;
                }
            };
            rw(&mut lapic, LINT0, EXTINT);
            rw(&mut lapic, LINT1, NMI);
            self.fd
                .set_lapic(&lapic)
                .map_err(kvm(self.id, "KVM_SET_LAPIC"))?;
        }
        Ok(())
    }

    /// Reads every piece of state. Call on a paused vCPU whose pending I/O
    /// has been completed (the vCPU thread does that when it pauses).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let f = &self.fd;
        let cpuid = f
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(id, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let mut entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Vec::with_capacity(entries.len());
        // KVM refuses KVM_MAX_MSR_ENTRIES (256) or more entries a call.
        for chunk in entries.chunks_mut(kvm_bindings::KVM_MAX_MSR_ENTRIES - 1) {
            let mut m = Msrs::from_entries(chunk).map_err(|_| VcpuError::Fam(id, "MSR"))?;
            let n = f.get_msrs(&mut m).map_err(kvm(id, "KVM_GET_MSRS"))?;
            if n != chunk.len() {
                return Err(VcpuError::Msrs {
                    vcpu: id,
                    set: n,
                    total: chunk.len(),
                    first_refused: chunk[n].index,
                });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        Ok(VcpuState {
            id,
            cpuid,
            mp_state: f.get_mp_state().map_err(kvm(id, "KVM_GET_MP_STATE"))?,
            regs: f.get_regs().map_err(kvm(id, "KVM_GET_REGS"))?,
            sregs: f.get_sregs().map_err(kvm(id, "KVM_GET_SREGS"))?,
            fpu: FpuState::from(&f.get_fpu().map_err(kvm(id, "KVM_GET_FPU"))?),
            xsave: if self.features.xsave {
                Some(f.get_xsave().map_err(kvm(id, "KVM_GET_XSAVE"))?)
            } else {
                None
            },
            xcrs: if self.features.xcrs {
                Some(f.get_xcrs().map_err(kvm(id, "KVM_GET_XCRS"))?)
            } else {
                None
            },
            debugregs: if self.features.debugregs {
                Some(f.get_debug_regs().map_err(kvm(id, "KVM_GET_DEBUGREGS"))?)
            } else {
                None
            },
            lapic: if self.features.irqchip {
                Some(f.get_lapic().map_err(kvm(id, "KVM_GET_LAPIC"))?)
            } else {
                None
            },
            msrs,
            events: if self.features.vcpu_events {
                Some(
                    f.get_vcpu_events()
                        .map_err(kvm(id, "KVM_GET_VCPU_EVENTS"))?,
                )
            } else {
                None
            },
        })
    }

    /// Writes saved state back, in the order KVM needs (CPUID first, the
    /// LAPIC after the special registers that hold its base, MSRs and events
    /// last).
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let id = self.id;
        let f = &self.fd;
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::Fam(id, "CPUID"))?;
        f.set_cpuid2(&cpuid).map_err(kvm(id, "KVM_SET_CPUID2"))?;
        f.set_mp_state(s.mp_state)
            .map_err(kvm(id, "KVM_SET_MP_STATE"))?;
        f.set_regs(&s.regs).map_err(kvm(id, "KVM_SET_REGS"))?;
        f.set_sregs(&s.sregs).map_err(kvm(id, "KVM_SET_SREGS"))?;
        match &s.xsave {
            Some(x) if self.features.xsave => {
                // SAFETY: `x` is a complete legacy-size XSAVE area read by
                // KVM_GET_XSAVE on a vCPU of the same host kind.
                unsafe { f.set_xsave(x) }.map_err(kvm(id, "KVM_SET_XSAVE"))?
            }
            _ => f
                .set_fpu(&kvm_fpu::from(&s.fpu))
                .map_err(kvm(id, "KVM_SET_FPU"))?,
        }
        if let (Some(x), true) = (&s.xcrs, self.features.xcrs) {
            f.set_xcrs(x).map_err(kvm(id, "KVM_SET_XCRS"))?;
        }
        if let (Some(d), true) = (&s.debugregs, self.features.debugregs) {
            f.set_debug_regs(d).map_err(kvm(id, "KVM_SET_DEBUGREGS"))?;
        }
        if let (Some(l), true) = (&s.lapic, self.features.irqchip) {
            f.set_lapic(l).map_err(kvm(id, "KVM_SET_LAPIC"))?;
        }
        for chunk in s.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES - 1) {
            self.set_msrs(chunk)?;
        }
        if let (Some(e), true) = (&s.events, self.features.vcpu_events) {
            f.set_vcpu_events(e)
                .map_err(kvm(id, "KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// The registers in the form lifecycle events carry.
    pub fn lifecycle_regs(&self) -> VcpuRegs {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => to_lifecycle_regs(self.id, &r, &s),
            _ => VcpuRegs {
                vcpu: self.id,
                ..Default::default()
            },
        }
    }
}

/// Converts KVM registers to the event form.
pub fn to_lifecycle_regs(id: u32, r: &kvm_regs, s: &kvm_sregs) -> VcpuRegs {
    VcpuRegs {
        vcpu: id,
        rip: r.rip,
        rsp: r.rsp,
        rflags: r.rflags,
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        r8_r15: vec![r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15],
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
    }
}

/// Builds the `KVM_SET_GUEST_DEBUG` argument: single-stepping and/or up to
/// four hardware execution breakpoints; `sw_breakpoints` makes `int3` exit
/// to the VMM instead of reaching the guest. An empty configuration turns
/// debugging off.
pub fn guest_debug(
    single_step: bool,
    hw_breakpoints: &[u64],
    sw_breakpoints: bool,
) -> kvm_guest_debug {
    let mut d = kvm_guest_debug::default();
    if !single_step && hw_breakpoints.is_empty() && !sw_breakpoints {
        return d;
    }
    d.control = KVM_GUESTDBG_ENABLE;
    if single_step {
        d.control |= KVM_GUESTDBG_SINGLESTEP;
    }
    if sw_breakpoints {
        d.control |= KVM_GUESTDBG_USE_SW_BP;
    }
    if !hw_breakpoints.is_empty() {
        d.control |= KVM_GUESTDBG_USE_HW_BP;
        let mut dr7 = 0u64;
        for (i, a) in hw_breakpoints.iter().take(4).enumerate() {
            d.arch.debugreg[i] = *a;
            dr7 |= 1 << (i * 2); // local enable, R/W=00 (execute), LEN=00
        }
        d.arch.debugreg[7] = dr7;
    }
    d
}

/// A stop of the vCPU for the gdb stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugEvent {
    /// vCPU index.
    pub vcpu: u32,
    /// Exception vector (1: #DB, 3: #BP).
    pub exception: u32,
    /// Guest RIP.
    pub pc: u64,
    /// DR6 at the exit.
    pub dr6: u64,
    /// DR7 at the exit.
    pub dr7: u64,
}

/// Something the VM reports.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// A lifecycle change (boot, pause, resume, snapshot, shutdown, triple
    /// fault, internal error, crash).
    Lifecycle(Lifecycle),
    /// A vCPU stopped on a breakpoint or single step and is paused.
    Debug(DebugEvent),
}

/// State shared by all vCPU threads of one VM.
pub struct VcpuContext {
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// Where events go (every subscriber of the VM gets each one).
    pub events: Arc<EventHub>,
    /// Set by exit devices; the vCPU that sees it stops the VM.
    pub exit_request: Arc<ExitRequest>,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext").finish_non_exhaustive()
    }
}

impl VcpuContext {
    /// A context over the buses, emitting events through `events`.
    pub fn new(
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        events: Arc<EventHub>,
        exit_request: Arc<ExitRequest>,
    ) -> Self {
        VcpuContext {
            mmio,
            pio,
            events,
            exit_request,
            threads: Mutex::new(Vec::new()),
        }
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            kick_thread(*t);
        }
    }
}

/// A latch exit devices set to stop the VM (guest-requested shutdown,
/// reset, crash).
#[derive(Debug, Default)]
pub struct ExitRequest(Mutex<Option<(LifecycleKind, String)>>);

impl ExitRequest {
    /// Requests a stop; the first request wins.
    pub fn request(&self, kind: LifecycleKind, detail: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some((kind, detail));
        }
    }

    /// The pending request, if any.
    pub fn peek(&self) -> Option<(LifecycleKind, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Requests to a vCPU thread.
pub enum VcpuRequest {
    /// Stop running (completing pending I/O first) and acknowledge.
    Pause(Sender<()>),
    /// Run again.
    Resume,
    /// Run a closure on the vCPU thread.
    With(Box<dyn FnOnce(&mut Vcpu) + Send>),
    /// End the thread.
    Exit,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by
            // the vCPU thread before it first runs and valid while it lives;
            // the byte write cannot tear and KVM reads it on the next entry.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

static KICK_HANDLER: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    (*KICK_HANDLER
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)))
    .map_err(VcpuError::Signal)
}

fn kick_thread(t: libc::pthread_t) {
    // SAFETY: `t` is a vCPU thread that is joined only after its handle stops
    // kicking it; pthread_kill with a handled signal has no other effect.
    unsafe { libc::pthread_kill(t, kick_signal()) };
}

/// The controlling side of a vCPU thread.
pub struct VcpuHandle {
    id: u32,
    tx: Sender<VcpuRequest>,
    thread: Option<JoinHandle<()>>,
    pthread: libc::pthread_t,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("id", &self.id).finish()
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// Starts the thread of `vcpu`, running unless `paused`.
    pub fn spawn(vcpu: Vcpu, ctx: Arc<VcpuContext>, paused: bool) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let id = vcpu.id;
        let (tx, rx) = crossbeam_channel::unbounded();
        let c = Arc::clone(&ctx);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_thread(vcpu, c, rx, paused))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        use std::os::unix::thread::JoinHandleExt;
        let pthread = thread.as_pthread_t();
        ctx.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pthread);
        Ok(VcpuHandle {
            id,
            tx,
            thread: Some(thread),
            pthread,
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn send(&self, r: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(r).map_err(|_| VcpuError::Gone(self.id))?;
        kick_thread(self.pthread);
        Ok(())
    }

    /// Pauses the vCPU: returns once it is out of `KVM_RUN` with its pending
    /// I/O completed, so its state is consistent.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let (ack_tx, ack_rx) = bounded(1);
        self.send(VcpuRequest::Pause(ack_tx))?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match ack_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(()) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    return Err(VcpuError::Timeout(self.id, REQUEST_TIMEOUT))
                }
                Err(RecvTimeoutError::Timeout) => kick_thread(self.pthread),
            }
        }
    }

    /// Lets the vCPU run again (a vCPU stopped by a shutdown stays stopped).
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Resume)
    }

    /// Runs `f` on the vCPU thread and returns its result. Meant for paused
    /// vCPUs (register access, guest debug); on a running vCPU it runs at the
    /// next exit, which the call forces.
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Result<R, VcpuError> {
        let (rtx, rrx) = bounded(1);
        self.send(VcpuRequest::With(Box::new(move |v| {
            let _ = rtx.send(f(v));
        })))?;
        rrx.recv_timeout(REQUEST_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, REQUEST_TIMEOUT),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// General registers.
    pub fn get_regs(&self) -> Result<kvm_regs, VcpuError> {
        let id = self.id;
        self.with(move |v| v.fd.get_regs().map_err(kvm(id, "KVM_GET_REGS")))?
    }

    /// Sets general registers.
    pub fn set_regs(&self, regs: kvm_regs) -> Result<(), VcpuError> {
        let id = self.id;
        self.with(move |v| v.fd.set_regs(&regs).map_err(kvm(id, "KVM_SET_REGS")))?
    }

    /// Special registers.
    pub fn get_sregs(&self) -> Result<kvm_sregs, VcpuError> {
        let id = self.id;
        self.with(move |v| v.fd.get_sregs().map_err(kvm(id, "KVM_GET_SREGS")))?
    }

    /// Sets special registers.
    pub fn set_sregs(&self, sregs: kvm_sregs) -> Result<(), VcpuError> {
        let id = self.id;
        self.with(move |v| v.fd.set_sregs(&sregs).map_err(kvm(id, "KVM_SET_SREGS")))?
    }

    /// Configures single-step / breakpoints (see [`guest_debug`]).
    pub fn set_guest_debug(&self, dbg: kvm_guest_debug) -> Result<(), VcpuError> {
        let id = self.id;
        self.with(move |v| {
            v.fd.set_guest_debug(&dbg)
                .map_err(kvm(id, "KVM_SET_GUEST_DEBUG"))
        })?
    }

    /// Translates a guest virtual address with the vCPU's page tables.
    pub fn translate_gva(&self, gva: u64) -> Result<Option<u64>, VcpuError> {
        let id = self.id;
        self.with(move |v| {
            v.fd.translate_gva(gva)
                .map(|t| (t.valid != 0).then_some(t.physical_address))
                .map_err(kvm(id, "KVM_TRANSLATE"))
        })?
    }

    /// Saves the vCPU's state (pause it first).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        self.with(|v| v.save_state())?
    }

    /// Restores saved state (pause it first).
    pub fn restore_state(&self, s: VcpuState) -> Result<(), VcpuError> {
        self.with(move |v| v.restore_state(&s))?
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.send(VcpuRequest::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What an exit asks of the loop.
enum Next {
    Continue,
    Stop(LifecycleKind, String),
    Debug(DebugEvent),
}

fn run_thread(
    mut vcpu: Vcpu,
    ctx: Arc<VcpuContext>,
    rx: Receiver<VcpuRequest>,
    start_paused: bool,
) {
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|p| p.set(run_ptr));
    run_loop(&mut vcpu, &ctx, &rx, start_paused);
    // A late kick must not touch kvm_run once the vCPU (and its mapping)
    // is dropped.
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    drop(vcpu);
}

fn run_loop(vcpu: &mut Vcpu, ctx: &VcpuContext, rx: &Receiver<VcpuRequest>, start_paused: bool) {
    let mut paused = start_paused;
    let mut stopped = false;
    loop {
        // Clear before looking at requests: a kick after this point either
        // lands in KVM_RUN (EINTR) or sets immediate_exit again.
        vcpu.fd.set_kvm_immediate_exit(0);
        loop {
            let req = if paused || stopped {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            match req {
                VcpuRequest::Pause(ack) => {
                    if !paused && !stopped {
                        complete_pending_io(vcpu);
                    }
                    paused = true;
                    let _ = ack.send(());
                }
                VcpuRequest::Resume => {
                    paused = false;
                    vcpu.fd.set_kvm_immediate_exit(0);
                }
                VcpuRequest::With(f) => f(vcpu),
                VcpuRequest::Exit => return,
            }
        }
        if stopped || paused {
            continue;
        }
        if ctx.exit_request.peek().is_some() {
            // Another vCPU is stopping the VM.
            stopped = true;
            continue;
        }
        match run_once(vcpu, ctx) {
            Next::Continue => {}
            Next::Stop(kind, detail) => {
                complete_pending_io(vcpu);
                let regs = vcpu.lifecycle_regs();
                if kind == LifecycleKind::Shutdown {
                    info!(vcpu = vcpu.id, %detail, rip = regs.rip, "vCPU stopped");
                } else {
                    warn!(vcpu = vcpu.id, ?kind, %detail, rip = regs.rip, "vCPU stopped");
                }
                stopped = true;
                ctx.exit_request.request(kind, detail.clone());
                ctx.events.emit(VmEvent::Lifecycle(Lifecycle {
                    kind,
                    detail,
                    regs: vec![regs],
                    gap: None,
                    snapshot_id: None,
                }));
                ctx.kick_all();
            }
            Next::Debug(ev) => {
                paused = true;
                ctx.events.emit(VmEvent::Debug(ev));
            }
        }
    }
}

/// Re-enters KVM with `immediate_exit` set so it finishes an I/O or MMIO
/// instruction whose data userspace has just supplied; afterwards the
/// registers are consistent.
fn complete_pending_io(vcpu: &mut Vcpu) {
    vcpu.fd.set_kvm_immediate_exit(1);
    match vcpu.fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => debug!(vcpu = vcpu.id, error = %e, "completing pending I/O"),
        Ok(exit) => debug!(
            vcpu = vcpu.id,
            ?exit,
            "unexpected exit while completing I/O"
        ),
    }
    vcpu.fd.set_kvm_immediate_exit(0);
}

fn run_once(vcpu: &mut Vcpu, ctx: &VcpuContext) -> Next {
    let id = vcpu.id;
    let exit = match vcpu.fd.run() {
        Ok(e) => e,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Next::Continue,
        Err(e) => return Next::Stop(LifecycleKind::Crash, format!("KVM_RUN failed: {e}")),
    };
    let next = match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                trace!(vcpu = id, port, "read of unhandled port");
                data.fill(0xff);
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                trace!(vcpu = id, port, "write to unhandled port");
            }
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                trace!(vcpu = id, addr, "read of unhandled MMIO");
                data.fill(0);
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                trace!(vcpu = id, addr, "write to unhandled MMIO");
            }
            Next::Continue
        }
        VcpuExit::Hlt => Next::Stop(
            LifecycleKind::Shutdown,
            "guest halted with interrupts unavailable (no in-kernel irqchip)".into(),
        ),
        VcpuExit::Shutdown => Next::Stop(
            LifecycleKind::TripleFault,
            "KVM_EXIT_SHUTDOWN (triple fault)".into(),
        ),
        VcpuExit::FailEntry(reason, cpu) => Next::Stop(
            LifecycleKind::InternalError,
            format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ),
        ),
        VcpuExit::InternalError => Next::Stop(LifecycleKind::InternalError, String::new()),
        VcpuExit::SystemEvent(ty, _) => match ty {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                Next::Stop(LifecycleKind::Shutdown, "system event: shutdown".into())
            }
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Next::Stop(LifecycleKind::Shutdown, "system event: reset".into())
            }
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                Next::Stop(LifecycleKind::Crash, "system event: crash".into())
            }
            other => Next::Stop(LifecycleKind::Crash, format!("system event {other}")),
        },
        VcpuExit::Debug(arch) => Next::Debug(DebugEvent {
            vcpu: id,
            exception: arch.exception,
            pc: arch.pc,
            dr6: arch.dr6,
            dr7: arch.dr7,
        }),
        VcpuExit::Intr => Next::Continue,
        other => Next::Stop(LifecycleKind::Crash, format!("unhandled exit {other:?}")),
    };
    let next = match next {
        Next::Stop(LifecycleKind::InternalError, d) if d.is_empty() => {
            // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the
            // `internal` member of the exit union.
            let sub = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            Next::Stop(
                LifecycleKind::InternalError,
                format!("KVM_EXIT_INTERNAL_ERROR suberror {sub}"),
            )
        }
        n => n,
    };
    if let Next::Continue = next {
        if let Some((kind, detail)) = ctx.exit_request.peek() {
            return Next::Stop(kind, detail);
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_debug_encodes_breakpoints() {
        let off = guest_debug(false, &[], false);
        assert_eq!(off.control, 0);
        let d = guest_debug(true, &[0x1000, 0x2000], true);
        assert_eq!(
            d.control,
            KVM_GUESTDBG_ENABLE
                | KVM_GUESTDBG_SINGLESTEP
                | KVM_GUESTDBG_USE_HW_BP
                | KVM_GUESTDBG_USE_SW_BP
        );
        assert_eq!(d.arch.debugreg[0], 0x1000);
        assert_eq!(d.arch.debugreg[1], 0x2000);
        assert_eq!(d.arch.debugreg[7], 0b101);
    }

    #[test]
    fn exit_request_keeps_the_first() {
        let e = ExitRequest::default();
        e.request(LifecycleKind::Shutdown, "a".into());
        e.request(LifecycleKind::Crash, "b".into());
        assert_eq!(e.peek(), Some((LifecycleKind::Shutdown, "a".into())));
    }
}
