//! Debian's `gdb` against the freestanding test guest ELF (with symbols) in
//! the microVM: the stub stops at the entry point, a breakpoint on the
//! guest's `gdb_probe` function is hit at the symbol's address, `stepi`
//! advances rip, and `continue` lets the guest finish (its done report on
//! the test port and its exit code through the debug-exit port).

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::*;
use vmr_vmm::gdb::{self, VmDebugTarget};
use vmr_vmm::guest_abi::{TestPorts, CMD_EXIT};
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

/// `CMD_GDB_PROBE` of `guest/test-guest/workload.h`.
const CMD_GDB_PROBE: u32 = 0x11;

fn symbol(elf: &std::path::Path, name: &str) -> u64 {
    let out = Command::new("nm")
        .arg(elf)
        .output()
        .expect("`nm` (binutils) is required");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name)
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in {}:\n{text}", elf.display()))
}

fn rips(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.starts_with("rip "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// The test guest loaded into a new VM whose vCPU is started paused, with
/// `commands` queued on its ports; also returns the guest's ELF.
fn paused_guest(commands: &[u32]) -> (Arc<Vm>, TestPorts, PathBuf) {
    require_kvm();
    assert!(
        Command::new("gdb").arg("--version").output().is_ok(),
        "`gdb` is required (Debian package gdb)"
    );
    let elf = guest_elf();
    let mut vm = Vm::new(VmConfig {
        mem_size: 32 << 20,
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    vm.load(&BootSource::Elf(elf.clone())).expect("guest loads");
    vm.start_paused().expect("vCPU thread starts paused");
    ports.push_commands(commands);
    (Arc::new(vm), ports, elf)
}

#[test]
// Heavy: needs /dev/kvm and gdb.
fn gdb_breaks_steps_and_continues_the_test_guest() {
    let (vm, ports, elf) = paused_guest(&[CMD_GDB_PROBE | (3 << 8), CMD_EXIT | (42 << 8)]);
    let probe = symbol(&elf, "gdb_probe");
    let entry = symbol(&elf, "_start");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("bound").port();
    let target = VmDebugTarget::new(Arc::clone(&vm)).expect("VM started");
    let session = gdb::spawn(listener, target).expect("stub thread starts");

    let out = Command::new("gdb")
        .args(["-batch", "-nx"])
        .arg(&elf)
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "break gdb_probe"])
        .args(["-ex", "continue"])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "stepi"])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "delete"])
        .args(["-ex", "continue"])
        .output()
        .expect("gdb runs");
    let result = session.join();
    let text = format!(
        "{}\n{}\nstub: {result:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let r = rips(&text);
    assert_eq!(r.len(), 3, "three rip reports: {text}");
    assert_eq!(
        r[0], entry,
        "stopped at the entry point before running: {text}"
    );
    assert!(
        text.contains(&format!("Breakpoint 1 at {probe:#x}")),
        "breakpoint placed at gdb_probe ({probe:#x}): {text}"
    );
    assert_eq!(r[1], probe, "breakpoint hit at gdb_probe: {text}");
    assert!(text.contains("in gdb_probe ()"), "{text}");
    assert!(
        r[2] > r[1] && r[2] < r[1] + 16,
        "stepi advanced rip by one instruction: {text}"
    );
    assert!(
        text.contains("exited with code 052"),
        "the guest ran to its exit (code 42): {text}"
    );
    result.expect("session ends cleanly");
    ports.with(|s| {
        assert_eq!(s.values, vec![0, 1, 2], "gdb_probe ran three times");
        assert_eq!(s.done, vec![3], "done marker: the probe workload finished");
    });
    assert!(vm.is_stopped());
}

#[test]
// Heavy: needs /dev/kvm and gdb.
fn gdb_interrupts_a_running_guest() {
    // Count forever: the guest never stops on its own.
    let (vm, ports, elf) = paused_guest(&[vmr_vmm::guest_abi::CMD_COUNT]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("bound").port();
    let session = gdb::spawn(
        listener,
        VmDebugTarget::new(Arc::clone(&vm)).expect("VM started"),
    )
    .expect("stub thread starts");

    let gdb = Command::new("gdb")
        .args(["-batch", "-nx"])
        .arg(&elf)
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "continue"])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "detach"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gdb runs");
    // Let the guest count for a while, then press Ctrl-C.
    assert!(
        ports.wait(WAIT, |s| s.values.len() >= 100),
        "the guest did not run under `continue`"
    );
    // SAFETY: kill(2) on the gdb child we just spawned and still own.
    unsafe { libc::kill(gdb.id() as libc::pid_t, libc::SIGINT) };
    let out = gdb.wait_with_output().expect("gdb exits");
    let result = session.join();
    let text = format!(
        "{}\n{}\nstub: {result:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SIGINT"), "Ctrl-C stopped the guest: {text}");
    assert_eq!(
        rips(&text).len(),
        1,
        "registers readable after the interrupt: {text}"
    );
    result.expect("session ends cleanly");
    let before = ports.with(|s| s.values.len());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        ports.with(|s| s.values.len()) > before,
        "detach lets the guest run on"
    );
}
