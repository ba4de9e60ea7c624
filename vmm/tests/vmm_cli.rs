//! The `vmm` binary: run, restore and probe.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vmr_testkit::process::ChildGuard;
use vmr_vmm::guest_abi::CMD_COUNT;
use vmr_vmm::snapshot::MemoryKind;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn wait_exit(mut child: ChildGuard, secs: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vmm did not exit within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
// Heavy: needs /dev/kvm.
fn run_boots_the_test_guest_which_exits_without_a_host() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("serial.txt");
    let child = ChildGuard::spawn(
        "vmm-run",
        Command::new(VMM)
            .args(["run", "--mem-mib", "32", "--kernel"])
            .arg(guest_elf())
            .arg("--serial-out")
            .arg(&out),
    )
    .expect("spawn vmm");
    let status = wait_exit(child, 60);
    assert!(status.success(), "{status:?}");
    let console = std::fs::read_to_string(&out).expect("console file");
    assert_eq!(
        console,
        "vmr test guest: 64-bit\nno command port: exiting\n"
    );
}

#[test]
// Heavy: needs /dev/kvm.
fn restore_continues_a_snapshot_taken_by_the_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("snap");
    let g = boot(32 << 20);
    g.ports.push_commands(&[CMD_COUNT | (200 << 8)]);
    wait_values(&g.ports, 50);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    let done = g.ports.with(|s| s.values.len());
    assert!(done < 200, "the snapshot must be taken mid-count");
    drop(g);

    let out = dir.path().join("serial.txt");
    let child = ChildGuard::spawn(
        "vmm-restore",
        Command::new(VMM)
            .args(["restore", "--snapshot"])
            .arg(&snap)
            .arg("--serial-out")
            .arg(&out),
    )
    .expect("spawn vmm");
    let status = wait_exit(child, 60);
    assert!(status.success(), "{status:?}");
    let console = std::fs::read_to_string(&out).expect("console file");
    assert!(
        !console.contains("vmr test guest"),
        "the clone rebooted: {console}"
    );
    assert!(
        console.contains("tick 192 "),
        "the count did not finish: {console}"
    );
    assert!(console.ends_with("no command port: exiting\n"), "{console}");
}

#[test]
// Heavy: needs /dev/kvm.
fn probe_prints_json() {
    require_kvm();
    let out = Command::new(VMM)
        .args(["probe", "--json"])
        .output()
        .expect("vmm probe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["capabilities"]["api_version"], 12);
    assert!(v["linux_bootable"].is_boolean());
    assert!(v["verdict"].as_str().is_some_and(|s| !s.is_empty()));
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let out = Command::new(VMM)
        .args(["restore", "--snapshot", "/nonexistent/snapshot"])
        .output()
        .expect("vmm runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmstate.bin"), "{err}");
}

#[test]
// Heavy: needs /dev/kvm.
fn snapshot_on_signal_writes_a_full_then_incremental_snapshots() {
    use vmr_vmm::snapshot::{memory_chain, SnapshotData};
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    // inc qword [0x400000]; jmp back: runs until killed, dirtying one page.
    let flat = dir.path().join("spin.bin");
    std::fs::write(&flat, [0x48, 0xff, 0x04, 0x25, 0, 0, 0x40, 0, 0xeb, 0xf6]).expect("write");
    let snaps = dir.path().join("snaps");
    let mut child = ChildGuard::spawn(
        "vmm-spin",
        Command::new(VMM)
            .args(["run", "--mem-mib", "16", "--kernel"])
            .arg(&flat)
            .arg("--snapshot-on-signal")
            .arg(&snaps),
    )
    .expect("spawn vmm");
    let pid = child.pid() as libc::pid_t;
    // Give the process time to install its SIGUSR1 handler.
    std::thread::sleep(Duration::from_millis(500));
    for n in 0..2 {
        // One signal per snapshot: a signal that arrives while a snapshot
        // is being written asks for another one right after it, before the
        // guest has run again.
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let state = snaps.join(format!("{n:04}")).join("vmstate.bin");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !state.exists() {
            std::thread::sleep(Duration::from_millis(50));
            assert!(std::time::Instant::now() < deadline, "no snapshot {n}");
            assert!(child.try_wait().is_none(), "vmm exited");
        }
        // Let the guest run (and dirty its counter page) in between.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!snaps.join("0002").exists(), "one snapshot per signal");
    child.stop(Duration::from_secs(5));
    let full = SnapshotData::load(&snaps.join("0000")).expect("full");
    assert_eq!(full.meta.memory.kind, MemoryKind::Full);
    let inc = SnapshotData::load(&snaps.join("0001")).expect("incremental");
    assert_eq!(inc.meta.memory.kind, MemoryKind::Incremental);
    assert_eq!(inc.meta.memory.pages, 1, "only the counter's page changed");
    assert_eq!(memory_chain(&snaps.join("0001")).expect("chain").len(), 2);
}
