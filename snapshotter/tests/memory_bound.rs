//! An upload's memory stays bounded by the part size and concurrency, not
//! the snapshot's size: the `vmr-snapshot` binary uploads a 256 MiB guest's
//! full snapshot with a peak resident set far below the memory file.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vmr_hypervisor::MemoryKind;

#[test]
// Heavy: needs /dev/kvm.
fn uploading_a_256_mib_snapshot_stays_within_bounded_memory() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, "vm-big", &elf, 256);
    let (d1, arts) = snapshot(inst.as_ref(), &dir.join("snaps"), "0001", MemoryKind::Full);
    inst.stop(Duration::from_secs(5)).expect("stop");
    let total = arts.total_bytes();
    assert!(total >= 256 << 20, "{total}");

    // Measured by /usr/bin/time around the upload: a child spawned directly
    // from this process would report this process's peak (the VM's memory)
    // as its own, since its pre-exec address space is ours.
    let report = dir.join("rss");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&report)
        .arg(env!("CARGO_BIN_EXE_vmr-snapshot"))
        .arg("--store")
        .arg(format!("file://{}", dir.join("store").display()))
        .args(["--no-fsync", "upload", "--dir"])
        .arg(&d1)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("this test needs /usr/bin/time (Debian package time): {e}"));
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = std::fs::read_to_string(&report)
        .expect("time's report")
        .trim()
        .parse()
        .expect("time -f %M prints KiB");
    let peak = kib * 1024;
    // 8 MiB parts, 2 in flight, one in the making, a 1 MiB read buffer,
    // and the process itself.
    assert!(
        peak < 96 << 20,
        "peak RSS {} MiB uploading {} MiB",
        peak >> 20,
        total >> 20
    );
    eprintln!("peak RSS {} MiB uploading {} MiB", peak >> 20, total >> 20);
}
