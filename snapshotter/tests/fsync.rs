//! On a file:// store, each object and its directory are fsync'd before the
//! manifest is written, and the manifest is fsync'd too; `--no-fsync`
//! issues none. Checked by tracing the `vmr-snapshot` upload's fsync calls
//! with strace (Debian package strace).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use vmr_hypervisor::MemoryKind;

/// Runs an upload of `dir` into `store` under strace; returns the fsync
/// lines (`fsync(5</path>) = 0`).
fn traced_upload(store: &Path, dir: &Path, log: &Path, extra: &[&str]) -> Vec<String> {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(log)
        .arg(env!("CARGO_BIN_EXE_vmr-snapshot"))
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .args(extra)
        .args(["upload", "--dir"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("this test needs strace (Debian package strace): {e}"));
    assert!(
        out.status.success(),
        "traced upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(log)
        .expect("strace log")
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .map(str::to_string)
        .collect()
}

#[test]
// Heavy: needs /dev/kvm and strace.
fn objects_and_directories_are_fsynced_before_the_manifest() {
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "this test needs strace (Debian package strace)"
    );
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, "vm-sync", &elf, 32);
    let (d1, arts) = snapshot(inst.as_ref(), &dir.join("snaps"), "0001", MemoryKind::Full);
    inst.stop(Duration::from_secs(5)).expect("stop");

    let store = dir.join("store");
    let lines = traced_upload(&store, &d1, &dir.join("strace.log"), &[]);
    let snap_dir = store.join("vm-sync").join("0001");
    let idx = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let manifest = idx(&|l| l.contains("manifest.json"))
        .unwrap_or_else(|| panic!("the manifest is fsync'd: {lines:#?}"));
    let mut files: Vec<String> = arts.artifacts.iter().map(|a| a.file.clone()).collect();
    files.push("artifacts.json".into());
    for f in &files {
        // The staged file (`<name>#<n>`) is fsync'd before its rename.
        let staged = format!("{}/{f}#", snap_dir.display());
        let at = idx(&|l| l.contains(&staged))
            .unwrap_or_else(|| panic!("object {f} is fsync'd: {lines:#?}"));
        assert!(at < manifest, "object {f} is fsync'd before the manifest");
    }
    // The snapshot's directory is fsync'd after the objects are renamed in.
    let dir_sync = format!("<{}>", snap_dir.display());
    let dir_syncs: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains(&dir_sync))
        .map(|(i, _)| i)
        .collect();
    assert!(
        dir_syncs.len() > files.len(),
        "the directory is fsync'd after each object and the manifest: {lines:#?}"
    );
    assert!(dir_syncs.iter().any(|&i| i < manifest), "{lines:#?}");
    assert!(dir_syncs.iter().any(|&i| i > manifest), "{lines:#?}");

    // Without fsync, none.
    let store2 = dir.join("store-nosync");
    let lines = traced_upload(&store2, &d1, &dir.join("strace2.log"), &["--no-fsync"]);
    assert!(lines.is_empty(), "--no-fsync issues no fsync: {lines:#?}");
}
