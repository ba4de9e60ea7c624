//! GDB remote-protocol stub over vCPU 0, on the `gdbstub` crate.
//!
//! [`serve`] accepts one debugger on a TCP listener and drives the vCPU for it:
//! registers (general purpose, segments, x87/SSE), guest memory by virtual
//! address (translated through the guest page tables with `KVM_TRANSLATE`,
//! falling back to physical when paging is off), software breakpoints (`int3`
//! with `KVM_GUESTDBG_USE_SW_BP`), hardware breakpoints (debug registers 0-3
//! with `KVM_GUESTDBG_USE_HW_BP`), single-step (`KVM_GUESTDBG_SINGLESTEP`),
//! continue, and Ctrl-C.
//!
//! Software breakpoints need KVM to intercept `#BP`. Some hosts (nested or
//! software-assisted KVM) accept `KVM_GUESTDBG_USE_SW_BP` but never report the
//! exit; [`sw_breakpoints_supported`] probes this once with a throwaway VM, and
//! when the probe fails the stub serves software-breakpoint requests from free
//! debug registers instead (at most four breakpoints in total).
//!
//! The VMM side is the [`DebugVcpu`] trait: the stub moves the vCPU into a
//! runner thread that performs every vCPU operation (so register access never
//! races `KVM_RUN`), while the session thread waits for either a stop from the
//! runner or bytes from the debugger.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{self, BlockingEventLoop, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_regs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use kvm_ioctls::VcpuFd;
use tracing::{debug, info, warn};

/// Why the vCPU stopped running for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStop {
    /// A `KVM_EXIT_DEBUG` (breakpoint or completed single-step).
    Debug(DebugExit),
    /// The run was cut short by [`DebugVcpu::kicker`].
    Interrupted,
    /// The guest finished with this exit code.
    Exited(u8),
    /// The guest shut down (triple fault).
    Shutdown,
}

/// The architecture part of a `KVM_EXIT_DEBUG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExit {
    /// Exception vector: 1 (#DB: step or hardware breakpoint), 3 (#BP).
    pub exception: u32,
    /// Guest rip.
    pub pc: u64,
    /// DR6 (which hardware breakpoint fired).
    pub dr6: u64,
}

impl From<kvm_debug_exit_arch> for DebugExit {
    fn from(e: kvm_debug_exit_arch) -> Self {
        Self {
            exception: e.exception,
            pc: e.pc,
            dr6: e.dr6,
        }
    }
}

/// What the stub needs from the VMM: a vCPU it may run, and guest memory.
pub trait DebugVcpu: Send + 'static {
    /// Runs `f` with the vCPU's KVM handle while the vCPU is stopped
    /// (registers, guest debug, address translation).
    fn with_fd<R, F>(&mut self, f: F) -> Result<R, GdbError>
    where
        R: Send + 'static,
        F: FnOnce(&VcpuFd) -> R + Send + 'static;
    /// Reads guest physical memory; `false` if any byte is outside RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes guest physical memory; `false` if any byte is outside RAM.
    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool;
    /// Runs the vCPU (serving its MMIO and port I/O) until it stops for one
    /// of the [`RunStop`] reasons.
    fn run_until_stop(&mut self) -> RunStop;
    /// A function another thread calls to make a current or next
    /// [`DebugVcpu::run_until_stop`] return [`RunStop::Interrupted`] soon.
    fn kicker(&self) -> Arc<dyn Fn() + Send + Sync>;
    /// The debugger detached: let the vCPU run on its own (guest debug is
    /// already off). The default does nothing.
    fn release(&mut self) {}
}

/// Whether KVM on this host reports guest `int3` as `KVM_EXIT_DEBUG` when
/// `KVM_GUESTDBG_USE_SW_BP` is set. Probed once, with a throwaway VM running
/// a 64-bit `int3`; `false` if the probe cannot run.
pub fn sw_breakpoints_supported() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let r = probe_sw_breakpoints();
        info!(supported = ?r, "probed KVM software breakpoint support");
        r.unwrap_or(false)
    })
}

fn probe_sw_breakpoints() -> Result<bool, kvm_ioctls::Error> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    const SIZE: usize = 0x10000;
    // SAFETY: anonymous private mapping; checked below and unmapped at the end.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(kvm_ioctls::Error::last());
    }
    // Declared before the VM so that it is dropped after it.
    let unmap = Unmap(mem, SIZE);
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let put = |at: usize, bytes: &[u8]| {
        assert!(at + bytes.len() <= SIZE, "probe layout fits its mapping");
        // SAFETY: bounds asserted above; the mapping is live until `unmap` drops.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.cast::<u8>().add(at), bytes.len())
        };
    };
    // Identity-map the first 2 MiB: PML4 at 0x8000, PDPT at 0x9000, PD at 0xa000.
    put(0x8000, &(0x9000u64 | 3).to_le_bytes());
    put(0x9000, &(0xa000u64 | 3).to_le_bytes());
    put(0xa000, &0x83u64.to_le_bytes());
    // nop; int3; hlt
    put(0x1000, &[0x90, 0xcc, 0xf4]);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the mapping outlives the VM: `unmap` is declared before `vm`,
    // so it is dropped after it.
    unsafe { vm.set_user_memory_region(region)? };
    let mut vcpu = vm.create_vcpu(0)?;
    let s = crate::boot::flat_long_mode_sregs(&vcpu.get_sregs()?, 0x8000);
    vcpu.set_sregs(&s)?;
    let mut r = vcpu.get_regs()?;
    r.rip = 0x1000;
    r.rflags = 2;
    vcpu.set_regs(&r)?;
    vcpu.set_guest_debug(&kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
        ..Default::default()
    })?;
    let ok = matches!(vcpu.run(), Ok(VcpuExit::Debug(d)) if d.exception == 3 && d.pc == 0x1001);
    drop(vcpu);
    drop(vm);
    drop(unmap);
    Ok(ok)
}

struct Unmap(*mut libc::c_void, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: unmaps a mapping created by the probe and no longer used.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// Errors of the stub.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// The listener failed.
    #[error("cannot accept a debugger connection")]
    Accept(#[source] std::io::Error),
    /// The session failed.
    #[error("gdb session failed: {0}")]
    Session(String),
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU runner thread is gone.
    #[error("the vCPU runner thread stopped")]
    RunnerGone,
    /// The runner thread could not start.
    #[error("cannot start the vCPU runner thread")]
    Thread(#[source] std::io::Error),
    /// The VMM could not reach the vCPU.
    #[error("vCPU unavailable: {0}")]
    Vcpu(String),
}

/// A request to the runner thread.
enum Cmd {
    Regs(Sender<Result<X86_64CoreRegs, GdbError>>),
    SetRegs(Box<X86_64CoreRegs>, Sender<Result<(), GdbError>>),
    Read(u64, usize, Sender<Option<Vec<u8>>>),
    Write(u64, Vec<u8>, Sender<bool>),
    SetDebug(kvm_guest_debug, Sender<Result<(), GdbError>>),
    Run,
    Release,
}

/// Runner-thread side: owns the vCPU.
fn runner<V: DebugVcpu>(mut v: V, cmds: Receiver<Cmd>, stops: Sender<RunStop>) {
    for cmd in cmds {
        match cmd {
            Cmd::Regs(tx) => {
                let _ = tx.send(v.with_fd(read_regs).and_then(|r| r));
            }
            Cmd::SetRegs(r, tx) => {
                let _ = tx.send(v.with_fd(move |fd| write_regs(fd, &r)).and_then(|r| r));
            }
            Cmd::Read(gva, len, tx) => {
                let mut buf = vec![0u8; len];
                let ok = match translate(&mut v, gva, len) {
                    Some(pieces) => pieces
                        .iter()
                        .all(|&(gpa, off, n)| v.read_phys(gpa, &mut buf[off..off + n])),
                    None => false,
                };
                let _ = tx.send(ok.then_some(buf));
            }
            Cmd::Write(gva, data, tx) => {
                let ok = match translate(&mut v, gva, data.len()) {
                    Some(pieces) => pieces
                        .iter()
                        .all(|&(gpa, off, n)| v.write_phys(gpa, &data[off..off + n])),
                    None => false,
                };
                let _ = tx.send(ok);
            }
            Cmd::SetDebug(dbg, tx) => {
                let r = v.with_fd(move |fd| {
                    fd.set_guest_debug(&dbg).map_err(|source| GdbError::Kvm {
                        what: "KVM_SET_GUEST_DEBUG",
                        source,
                    })
                });
                let _ = tx.send(r.and_then(|r| r));
            }
            Cmd::Release => v.release(),
            Cmd::Run => {
                let stop = v.run_until_stop();
                if stops.send(stop).is_err() {
                    return;
                }
            }
        }
    }
}

/// Splits `[gva, gva+len)` at page boundaries and translates each piece:
/// `(gpa, offset, len)` triples, or `None` if a page is not mapped.
fn translate<V: DebugVcpu>(v: &mut V, gva: u64, len: usize) -> Option<Vec<(u64, usize, usize)>> {
    v.with_fd(move |fd| {
        let paging = fd
            .get_sregs()
            .map(|s| s.cr0 & (1 << 31) != 0)
            .unwrap_or(false);
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < len {
            let addr = gva.wrapping_add(off as u64);
            let n = ((0x1000 - (addr & 0xfff)) as usize).min(len - off);
            let gpa = if paging {
                match fd.translate_gva(addr) {
                    Ok(t) if t.valid != 0 => t.physical_address,
                    _ => return None,
                }
            } else {
                addr
            };
            out.push((gpa, off, n));
            off += n;
        }
        Some(out)
    })
    .ok()
    .flatten()
}

fn read_regs(fd: &VcpuFd) -> Result<X86_64CoreRegs, GdbError> {
    let kvm = |what| move |source| GdbError::Kvm { what, source };
    let r = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let f = fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
    let mut out = X86_64CoreRegs {
        regs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        eflags: r.rflags as u32,
        rip: r.rip,
        ..Default::default()
    };
    out.segments.cs = u32::from(s.cs.selector);
    out.segments.ss = u32::from(s.ss.selector);
    out.segments.ds = u32::from(s.ds.selector);
    out.segments.es = u32::from(s.es.selector);
    out.segments.fs = u32::from(s.fs.selector);
    out.segments.gs = u32::from(s.gs.selector);
    for (st, fpr) in out.st.iter_mut().zip(f.fpr.iter()) {
        st.copy_from_slice(&fpr[..10]);
    }
    out.fpu.fctrl = u32::from(f.fcw);
    out.fpu.fstat = u32::from(f.fsw);
    out.fpu.ftag = u32::from(f.ftwx);
    out.fpu.fop = u32::from(f.last_opcode);
    out.fpu.fioff = f.last_ip as u32;
    out.fpu.fooff = f.last_dp as u32;
    for (x, k) in out.xmm.iter_mut().zip(f.xmm.iter()) {
        *x = u128::from_le_bytes(*k);
    }
    out.mxcsr = f.mxcsr;
    Ok(out)
}

fn write_regs(fd: &VcpuFd, g: &X86_64CoreRegs) -> Result<(), GdbError> {
    let kvm = |what| move |source| GdbError::Kvm { what, source };
    let old = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let r = kvm_regs {
        rax: g.regs[0],
        rbx: g.regs[1],
        rcx: g.regs[2],
        rdx: g.regs[3],
        rsi: g.regs[4],
        rdi: g.regs[5],
        rbp: g.regs[6],
        rsp: g.regs[7],
        r8: g.regs[8],
        r9: g.regs[9],
        r10: g.regs[10],
        r11: g.regs[11],
        r12: g.regs[12],
        r13: g.regs[13],
        r14: g.regs[14],
        r15: g.regs[15],
        rip: g.rip,
        // Keep the upper half of rflags (reserved) as it was.
        rflags: (old.rflags & !0xffff_ffff) | u64::from(g.eflags),
    };
    fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;
    let mut f = fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
    for (fpr, st) in f.fpr.iter_mut().zip(g.st.iter()) {
        fpr[..10].copy_from_slice(st);
    }
    for (k, x) in f.xmm.iter_mut().zip(g.xmm.iter()) {
        *k = x.to_le_bytes();
    }
    f.mxcsr = g.mxcsr;
    fd.set_fpu(&f).map_err(kvm("KVM_SET_FPU"))
}

/// Session-thread side: the gdbstub target.
struct VcpuTarget {
    cmds: Sender<Cmd>,
    stops: Receiver<RunStop>,
    kick: Arc<dyn Fn() + Send + Sync>,
    /// Software breakpoints: address -> original byte.
    sw: HashMap<u64, u8>,
    /// Debug registers DR0-DR3: address and whether the slot serves a
    /// software-breakpoint request (hosts without `#BP` interception).
    hw: [Option<(u64, bool)>; 4],
    /// Whether `int3` breakpoints work on this host.
    sw_supported: bool,
    stepping: bool,
    running: bool,
}

impl VcpuTarget {
    fn call<T>(&self, make: impl FnOnce(Sender<T>) -> Cmd) -> Result<T, GdbError> {
        let (tx, rx) = mpsc::channel();
        self.cmds.send(make(tx)).map_err(|_| GdbError::RunnerGone)?;
        rx.recv().map_err(|_| GdbError::RunnerGone)
    }

    fn guest_debug(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
            ..Default::default()
        };
        if self.stepping {
            dbg.control |= KVM_GUESTDBG_SINGLESTEP;
        }
        if self.hw.iter().any(Option::is_some) {
            dbg.control |= KVM_GUESTDBG_USE_HW_BP;
            let mut dr7 = 0u64;
            for (i, bp) in self.hw.iter().enumerate() {
                if let Some((addr, _)) = bp {
                    dbg.arch.debugreg[i] = *addr;
                    // Local enable; R/W = 00 (execute), LEN = 00.
                    dr7 |= 1 << (2 * i);
                }
            }
            dbg.arch.debugreg[7] = dr7;
        }
        dbg
    }

    fn start(&mut self, step: bool) -> Result<(), GdbError> {
        self.stepping = step;
        let dbg = self.guest_debug();
        self.call(|tx| Cmd::SetDebug(dbg, tx))??;
        self.cmds.send(Cmd::Run).map_err(|_| GdbError::RunnerGone)?;
        self.running = true;
        Ok(())
    }

    /// The stop reason for a debug-register hit (DR6 bits 0-3).
    fn dr_hit(&self, dr6: u64) -> SingleThreadStopReason<u64> {
        let emulated_sw = (0..4)
            .filter(|i| dr6 & (1 << i) != 0)
            .any(|i| matches!(self.hw[i], Some((_, true))));
        if emulated_sw {
            SingleThreadStopReason::SwBreak(())
        } else {
            SingleThreadStopReason::HwBreak(())
        }
    }

    fn stop_reason(&mut self, stop: RunStop) -> SingleThreadStopReason<u64> {
        self.running = false;
        match stop {
            RunStop::Debug(e) if e.exception == 3 => SingleThreadStopReason::SwBreak(()),
            RunStop::Debug(e) if e.exception == 1 && e.dr6 & 0xf != 0 => self.dr_hit(e.dr6),
            RunStop::Debug(e) if e.exception == 1 && self.stepping => {
                SingleThreadStopReason::DoneStep
            }
            RunStop::Debug(e) => {
                debug!(?e, "unexpected debug exit");
                SingleThreadStopReason::Signal(Signal::SIGTRAP)
            }
            RunStop::Interrupted => SingleThreadStopReason::Signal(Signal::SIGINT),
            RunStop::Exited(code) => SingleThreadStopReason::Exited(code),
            RunStop::Shutdown => SingleThreadStopReason::Signal(Signal::SIGSEGV),
        }
    }
}

impl Target for VcpuTarget {
    type Arch = X86_64_SSE;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    // Breakpoints are implemented here; gdb must not plant its own.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for VcpuTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        *regs = self.call(Cmd::Regs)?.map_err(TargetError::Fatal)?;
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
        let r = Box::new(regs.clone());
        self.call(|tx| Cmd::SetRegs(r, tx))?
            .map_err(TargetError::Fatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let len = data.len();
        match self.call(|tx| Cmd::Read(start, len, tx))? {
            Some(mut bytes) => {
                // Show original bytes where software breakpoints sit.
                for (addr, orig) in &self.sw {
                    if let Some(i) = addr.checked_sub(start).filter(|i| *i < len as u64) {
                        bytes[i as usize] = *orig;
                    }
                }
                data.copy_from_slice(&bytes);
                Ok(len)
            }
            None => Err(TargetError::NonFatal),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        let v = data.to_vec();
        if self.call(|tx| Cmd::Write(start, v, tx))? {
            Ok(())
        } else {
            Err(TargetError::NonFatal)
        }
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for VcpuTarget {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.start(false)
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for VcpuTarget {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.start(true)
    }
}

impl Breakpoints for VcpuTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for VcpuTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if !self.sw_supported {
            return Ok(self.add_dr(addr, true));
        }
        if self.sw.contains_key(&addr) {
            return Ok(true);
        }
        let Some(orig) = self.call(|tx| Cmd::Read(addr, 1, tx))? else {
            return Ok(false);
        };
        if !self.call(|tx| Cmd::Write(addr, vec![0xcc], tx))? {
            return Ok(false);
        }
        self.sw.insert(addr, orig[0]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if !self.sw_supported {
            return Ok(self.remove_dr(addr, true));
        }
        let Some(orig) = self.sw.remove(&addr) else {
            return Ok(false);
        };
        Ok(self.call(|tx| Cmd::Write(addr, vec![orig], tx))?)
    }
}

impl HwBreakpoint for VcpuTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_dr(addr, false))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_dr(addr, false))
    }
}

impl VcpuTarget {
    /// Takes a free debug register for an execution breakpoint at `addr`.
    fn add_dr(&mut self, addr: u64, sw: bool) -> bool {
        if self.hw.contains(&Some((addr, sw))) {
            return true;
        }
        match self.hw.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some((addr, sw));
                true
            }
            None => false,
        }
    }

    fn remove_dr(&mut self, addr: u64, sw: bool) -> bool {
        match self.hw.iter_mut().find(|s| **s == Some((addr, sw))) {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }
}

impl From<GdbError> for TargetError<GdbError> {
    fn from(e: GdbError) -> Self {
        TargetError::Fatal(e)
    }
}

enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = VcpuTarget;
    type Connection = TcpStream;
    type StopReason = SingleThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut VcpuTarget,
        conn: &mut TcpStream,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        WaitForStopReasonError<GdbError, std::io::Error>,
    > {
        loop {
            match target.stops.recv_timeout(Duration::from_millis(5)) {
                Ok(stop) => {
                    return Ok(run_blocking::Event::TargetStopped(target.stop_reason(stop)));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(WaitForStopReasonError::Target(GdbError::RunnerGone));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let byte = ConnectionExt::read(conn).map_err(WaitForStopReasonError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut VcpuTarget) -> Result<Option<Self::StopReason>, GdbError> {
        // Kick the vCPU; its stop (Interrupted, or whatever came first) is
        // reported by wait_for_stop_reason.
        (target.kick)();
        Ok(None)
    }
}

/// A running stub: the session thread, joinable.
#[derive(Debug)]
pub struct GdbSession {
    thread: JoinHandle<Result<DisconnectReason, GdbError>>,
}

impl GdbSession {
    /// Waits for the debugger to detach or the guest to end.
    pub fn join(self) -> Result<DisconnectReason, GdbError> {
        self.thread
            .join()
            .map_err(|_| GdbError::Session("session thread panicked".into()))?
    }
}

/// Waits for one debugger on `listener` and serves it until it detaches,
/// kills the target, or the guest ends. The vCPU must not be running; it
/// stays stopped until the debugger resumes it. Blocks the caller.
pub fn serve<V: DebugVcpu>(listener: &TcpListener, vcpu: V) -> Result<DisconnectReason, GdbError> {
    let (stream, peer) = listener.accept().map_err(GdbError::Accept)?;
    info!(%peer, "debugger attached");
    serve_stream(stream, vcpu)
}

/// Like [`serve`], on a separate thread.
pub fn spawn<V: DebugVcpu>(listener: TcpListener, vcpu: V) -> Result<GdbSession, GdbError> {
    let thread = std::thread::Builder::new()
        .name("gdb-stub".into())
        .spawn(move || serve(&listener, vcpu))
        .map_err(GdbError::Thread)?;
    Ok(GdbSession { thread })
}

/// Serves one debugger already connected on `stream` (see [`serve`]).
pub fn serve_stream<V: DebugVcpu>(
    stream: TcpStream,
    vcpu: V,
) -> Result<DisconnectReason, GdbError> {
    let _ = stream.set_nodelay(true);
    let kick = vcpu.kicker();
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let runner_thread = std::thread::Builder::new()
        .name("gdb-vcpu".into())
        .spawn(move || runner(vcpu, cmd_rx, stop_tx))
        .map_err(GdbError::Thread)?;
    let mut target = VcpuTarget {
        cmds: cmd_tx,
        stops: stop_rx,
        kick,
        sw: HashMap::new(),
        hw: [None; 4],
        sw_supported: sw_breakpoints_supported(),
        stepping: false,
        running: false,
    };
    // Make sure guest debug is on from the start so int3 traps to us.
    let dbg = target.guest_debug();
    target.call(|tx| Cmd::SetDebug(dbg, tx))??;
    let result = GdbStub::new(stream)
        .run_blocking::<EventLoop>(&mut target)
        .map_err(|e| GdbError::Session(e.to_string()));
    // Leave the guest clean: no breakpoints, no guest debug.
    if target.running {
        (target.kick)();
        let _ = target.stops.recv_timeout(Duration::from_secs(5));
    }
    let bps: Vec<u64> = target.sw.keys().copied().collect();
    for addr in bps {
        let _ = target.remove_sw_breakpoint(addr, 1);
    }
    let _ = target.call(|tx| Cmd::SetDebug(kvm_guest_debug::default(), tx));
    if matches!(result, Ok(DisconnectReason::Disconnect)) {
        let _ = target.cmds.send(Cmd::Release);
    }
    drop(target);
    if runner_thread.join().is_err() {
        warn!("vCPU runner thread panicked");
    }
    info!(?result, "debugger session ended");
    result
}

/// [`DebugVcpu`] over vCPU 0 of a [`crate::vm::Vm`]: registers through the
/// vCPU thread, memory through the VM's guest memory, runs by resuming the
/// vCPU and waiting for its debug stop or the VM's end on its own
/// subscription to the VM's events (other subscribers still see them all).
pub struct VmDebugTarget {
    vm: Arc<crate::vm::Vm>,
    events: crossbeam_channel::Receiver<crate::vcpu::VmEvent>,
    interrupt: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for VmDebugTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDebugTarget").finish_non_exhaustive()
    }
}

impl VmDebugTarget {
    /// Debugs `vm`, which must be started and paused (see
    /// [`crate::vm::Vm::start_paused`]).
    pub fn new(vm: Arc<crate::vm::Vm>) -> Result<Self, GdbError> {
        if vm.vcpus().is_empty() {
            return Err(GdbError::Vcpu(
                "the VM has no running vCPU threads; start it paused first".into(),
            ));
        }
        let events = vm.subscribe();
        Ok(Self {
            vm,
            events,
            interrupt: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    fn vcpu0(&self) -> &crate::vcpu::VcpuHandle {
        &self.vm.vcpus()[0]
    }
}

impl DebugVcpu for VmDebugTarget {
    fn with_fd<R, F>(&mut self, f: F) -> Result<R, GdbError>
    where
        R: Send + 'static,
        F: FnOnce(&VcpuFd) -> R + Send + 'static,
    {
        self.vcpu0()
            .with(move |v| f(&v.fd))
            .map_err(|e| GdbError::Vcpu(e.to_string()))
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        use vm_memory::Bytes;
        self.vm
            .memory()
            .guest_memory()
            .read_slice(buf, vm_memory::GuestAddress(gpa))
            .is_ok()
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool {
        use vm_memory::Bytes;
        self.vm
            .memory()
            .guest_memory()
            .write_slice(data, vm_memory::GuestAddress(gpa))
            .is_ok()
    }

    fn run_until_stop(&mut self) -> RunStop {
        use crate::vcpu::VmEvent;
        use std::sync::atomic::Ordering;
        use vmr_proto::LifecycleKind;

        if let Err(e) = self.vcpu0().resume() {
            warn!(error = %e, "cannot resume vCPU 0");
            return RunStop::Shutdown;
        }
        loop {
            if self.interrupt.swap(false, Ordering::AcqRel) {
                if let Err(e) = self.vcpu0().pause() {
                    warn!(error = %e, "cannot pause vCPU 0");
                }
                return RunStop::Interrupted;
            }
            match self.events.recv_timeout(Duration::from_millis(10)) {
                Ok(VmEvent::Debug(d)) if d.vcpu == 0 => {
                    return RunStop::Debug(DebugExit {
                        exception: d.exception,
                        pc: d.pc,
                        dr6: d.dr6,
                    })
                }
                Ok(VmEvent::Lifecycle(l)) => match l.kind {
                    LifecycleKind::Shutdown => {
                        // The debug-exit port reports "guest exit code N".
                        let code = l
                            .detail
                            .rsplit(' ')
                            .next()
                            .and_then(|c| c.parse::<u64>().ok())
                            .unwrap_or(0);
                        return RunStop::Exited(code as u8);
                    }
                    LifecycleKind::TripleFault
                    | LifecycleKind::InternalError
                    | LifecycleKind::Crash => return RunStop::Shutdown,
                    _ => {}
                },
                Ok(VmEvent::Debug(_)) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return RunStop::Shutdown,
            }
        }
    }

    fn kicker(&self) -> Arc<dyn Fn() + Send + Sync> {
        let flag = Arc::clone(&self.interrupt);
        Arc::new(move || flag.store(true, std::sync::atomic::Ordering::Release))
    }

    fn release(&mut self) {
        if let Err(e) = self.vcpu0().resume() {
            warn!(error = %e, "cannot resume vCPU 0 after detach");
        }
    }
}

// The connection type must satisfy gdbstub's bounds.
const _: fn() = || {
    fn is_conn<C: Connection + ConnectionExt>() {}
    is_conn::<TcpStream>();
};
