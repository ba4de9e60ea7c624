//! The gdb stub under Debian's `gdb`, against a real KVM vCPU running a few
//! 64-bit instructions (no VMM needed): registers, stepping, software and
//! hardware breakpoints, memory reads, continue to the end.
//!
//! The end-to-end check against the freestanding test guest ELF with symbols
//! lives in `gdb_test_guest.rs`.

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmr_vmm::gdb::{self, DebugVcpu, RunStop};

const MEM: usize = 0x10000;
const CODE: u64 = 0x1000;
const PROGRAM: &[u8] = &[
    0xb8, 0x34, 0x12, 0x00, 0x00, // 0x1000 mov eax, 0x1234
    0xff, 0xc0, // 0x1005 inc eax
    0xff, 0xc0, // 0x1007 inc eax
    0x89, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, // 0x1009 mov [0x2000], eax
    0xe6, 0xf4, // 0x1010 out 0xf4, al
    0xf4, // 0x1012 hlt
];

struct LongModeVcpu {
    _vm: VmFd,
    fd: VcpuFd,
    mem: *mut u8,
    stop: Arc<AtomicBool>,
}

// SAFETY: the raw pointer is a private mapping owned by this struct for its
// whole life; only the runner thread uses it.
unsafe impl Send for LongModeVcpu {}

impl LongModeVcpu {
    fn new() -> Self {
        let kvm = Kvm::new().expect("/dev/kvm is required (heavy test)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        // SAFETY: anonymous private mapping, result checked.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        let mem = mem.cast::<u8>();
        // SAFETY: PROGRAM fits at CODE inside the MEM-byte mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(PROGRAM.as_ptr(), mem.add(CODE as usize), PROGRAM.len())
        };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem as u64,
        };
        // SAFETY: the mapping outlives the VM (both live in this struct).
        unsafe { vm.set_user_memory_region(region) }.expect("memory region");
        // Identity-map the first 2 MiB (PML4 0x8000, PDPT 0x9000, PD 0xa000)
        // and enter 64-bit mode directly.
        for (at, entry) in [(0x8000usize, 0x9003u64), (0x9000, 0xa003), (0xa000, 0x83)] {
            // SAFETY: page-table entries inside the MEM-byte mapping.
            unsafe { std::ptr::write_unaligned(mem.add(at).cast::<u64>(), entry) };
        }
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let s = vmr_vmm::boot::flat_long_mode_sregs(&fd.get_sregs().expect("sregs"), 0x8000);
        fd.set_sregs(&s).expect("sregs");
        let mut regs = fd.get_regs().expect("regs");
        regs.rip = CODE;
        regs.rflags = 2;
        fd.set_regs(&regs).expect("regs");
        Self {
            _vm: vm,
            fd,
            mem,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl DebugVcpu for LongModeVcpu {
    fn with_fd<R, F>(&mut self, f: F) -> Result<R, gdb::GdbError>
    where
        R: Send + 'static,
        F: FnOnce(&VcpuFd) -> R + Send + 'static,
    {
        Ok(f(&self.fd))
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        if gpa as usize + buf.len() > MEM {
            return false;
        }
        // SAFETY: bounds checked against the mapping size.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mem.add(gpa as usize), buf.as_mut_ptr(), buf.len())
        };
        true
    }
    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool {
        if gpa as usize + data.len() > MEM {
            return false;
        }
        // SAFETY: bounds checked against the mapping size.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.add(gpa as usize), data.len())
        };
        true
    }
    fn run_until_stop(&mut self) -> RunStop {
        if self.stop.swap(false, Ordering::AcqRel) {
            return RunStop::Interrupted;
        }
        match self.fd.run() {
            Ok(VcpuExit::IoOut(0xf4, data)) => RunStop::Exited(data[0]),
            Ok(VcpuExit::Debug(d)) => RunStop::Debug(d.into()),
            Ok(VcpuExit::Hlt) => RunStop::Exited(0),
            Ok(VcpuExit::Shutdown) => RunStop::Shutdown,
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => RunStop::Interrupted,
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
    fn kicker(&self) -> Arc<dyn Fn() + Send + Sync> {
        let stop = Arc::clone(&self.stop);
        Arc::new(move || stop.store(true, Ordering::Release))
    }
}

#[test]
// Heavy: needs /dev/kvm and gdb.
fn gdb_steps_breaks_and_continues_a_kvm_vcpu() {
    assert!(
        Command::new("gdb").arg("--version").output().is_ok(),
        "`gdb` is required (Debian package gdb)"
    );
    eprintln!(
        "software breakpoints via int3 on this host: {}",
        gdb::sw_breakpoints_supported()
    );
    let vcpu = LongModeVcpu::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("bound").port();
    let session = gdb::spawn(listener, vcpu).expect("stub thread starts");
    let out = Command::new("gdb")
        .args(["-batch", "-nx"])
        .args(["-ex", "set architecture i386:x86-64"])
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "stepi"])
        .args(["-ex", "info registers rip rax"])
        .args(["-ex", "break *0x1007"])
        .args(["-ex", "hbreak *0x1010"])
        .args(["-ex", "continue"])
        .args(["-ex", "info registers rip rax"])
        .args(["-ex", "continue"])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "x/2xb 0x2000"])
        .args(["-ex", "set $rbx = 0x4242"])
        .args(["-ex", "info registers rbx"])
        .args(["-ex", "set {unsigned char}0x3000 = 0x5a"])
        .args(["-ex", "x/1xb 0x3000"])
        .args(["-ex", "continue"])
        .output()
        .expect("gdb runs");
    let session_result = session.join();
    let text = format!(
        "{}\n{}\nstub: {session_result:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rips: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("rip"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(rips, ["0x1000", "0x1005", "0x1007", "0x1010"], "{text}");
    assert!(
        text.contains("rax            0x1234"),
        "stepi ran mov: {text}"
    );
    assert!(
        text.contains("rax            0x1235"),
        "stopped at the int3 after one inc: {text}"
    );
    assert!(text.contains("Breakpoint 1, 0x0000000000001007"), "{text}");
    assert!(text.contains("Breakpoint 2, 0x0000000000001010"), "{text}");
    assert!(
        text.contains("0x2000:\t0x36\t0x12"),
        "memory written by the guest: {text}"
    );
    assert!(
        text.contains("rbx            0x4242"),
        "register write: {text}"
    );
    assert!(text.contains("0x3000:\t0x5a"), "memory write: {text}");
    assert!(
        text.contains("exited with code 066"),
        "guest ran to the end: {text}"
    );
    session_result.expect("session ends cleanly");
}
