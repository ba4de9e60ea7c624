//! An upload killed with SIGKILL in the middle leaves no manifest, so the
//! snapshot is neither listed nor restorable; the next upload (of the same
//! snapshot id, and of the next snapshot) succeeds. The upload runs in the
//! `vmr-snapshot` binary.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use vmr_hypervisor::MemoryKind;
use vmr_snapshot::{
    list, materialize, RestoreError, RestoreOptions, Selector, SnapshotStore, StoreConfig,
};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn upload_cmd(store: &Path, dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmr-snapshot"));
    c.arg("--store")
        .arg(format!("file://{}", store.display()))
        .args([
            "upload",
            "--image",
            "test-guest",
            "--seq-at-cut",
            "5",
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

fn files_named(root: &Path, name: &str, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_named(&p, name, out);
        } else if e.file_name().to_string_lossy() == name {
            out.push(p);
        }
    }
}

fn files_named_like(root: &Path, c: char, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_named_like(&p, c, out);
        } else if e.file_name().to_string_lossy().contains(c) {
            out.push(p);
        }
    }
}

fn run_to_end(mut cmd: Command) -> String {
    let out = cmd.output().expect("vmr-snapshot runs");
    assert!(
        out.status.success(),
        "vmr-snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
// Heavy: needs /dev/kvm.
fn upload_killed_midway_leaves_no_manifest_and_the_next_upload_succeeds() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, "vm-kill", &elf, 32);
    let m = microvm(inst.as_ref());
    dirty(m, &[1, 2, 3]);
    let (d1, _) = snapshot(inst.as_ref(), &dir.join("snaps"), "0001", MemoryKind::Full);
    dirty(m, &[3, 8]);
    let (d2, _) = snapshot(
        inst.as_ref(),
        &dir.join("snaps"),
        "0002",
        MemoryKind::Incremental,
    );
    let expect: Vec<(u32, u64)> = [1u32, 2, 3, 8]
        .iter()
        .map(|&p| (p, read_u64(m, arena(p))))
        .collect();
    inst.stop(Duration::from_secs(5)).expect("stop");

    // Held to 8 MiB/s, the 32 MiB memory object takes about 4 s; kill it
    // once more than one 8 MiB part has been handed over.
    let root = dir.join("store");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmr-snapshot"));
    cmd.arg("--store")
        .arg(format!("file://{}", root.display()))
        .args(["--max-bytes-per-sec", &(8u64 << 20).to_string()])
        .args([
            "upload",
            "--image",
            "test-guest",
            "--seq-at-cut",
            "5",
            "--dir",
        ])
        .arg(&d1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Killed(cmd.spawn().expect("spawn vmr-snapshot upload"));
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let (done, total) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the upload reports progress within 30 s");
        assert!(
            !line.starts_with("uploaded"),
            "the upload finished before it was killed: {line}"
        );
        let mut w = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse::<u64>().unwrap());
        let (d, t) = (w.next().unwrap(), w.next().unwrap());
        if d > 9 << 20 {
            break (d, t);
        }
    };
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    let rc = unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL delivered");
    let status = child.0.wait().expect("reap");
    assert!(!status.success(), "killed: {status}");
    assert!(done < total, "killed in the middle: {done} of {total}");

    // Objects were being written, yet no manifest exists.
    assert!(
        root.join("vm-kill").is_dir(),
        "the upload had started writing"
    );
    let mut manifests = Vec::new();
    files_named(&root, "manifest.json", &mut manifests);
    assert!(manifests.is_empty(), "a manifest appeared: {manifests:?}");
    let rt = runtime();
    let store = SnapshotStore::open(&StoreConfig::local(&root)).unwrap();
    assert!(rt.block_on(list(&store, "vm-kill")).unwrap().is_empty());
    let e = rt
        .block_on(materialize(
            &store,
            "vm-kill",
            &Selector::Latest,
            &dir.join("none"),
            &RestoreOptions::default(),
        ))
        .unwrap_err();
    assert!(matches!(e, RestoreError::NotFound { .. }), "{e}");

    let mut staged = Vec::new();
    files_named_like(&root, '#', &mut staged);
    assert!(
        !staged.is_empty(),
        "the killed upload left a staged part file"
    );

    // The same snapshot again, then the next one: both succeed, and the
    // killed upload's leftovers are gone.
    let out = run_to_end(upload_cmd(&root, &d1));
    assert!(
        out.lines().any(|l| l.starts_with("uploaded vm-kill/0001 ")),
        "{out}"
    );
    let out = run_to_end(upload_cmd(&root, &d2));
    assert!(
        out.lines().any(|l| l.starts_with("uploaded vm-kill/0002 ")),
        "{out}"
    );
    let ids: Vec<String> = rt
        .block_on(list(&store, "vm-kill"))
        .unwrap()
        .into_iter()
        .map(|m| m.snapshot_id)
        .collect();
    assert_eq!(ids, ["0001", "0002"]);
    let mut staged = Vec::new();
    files_named_like(&root, '#', &mut staged);
    assert!(staged.is_empty(), "leftovers remain: {staged:?}");
    let mat = rt
        .block_on(materialize(
            &store,
            "vm-kill",
            &Selector::Latest,
            &dir.join("restore"),
            &RestoreOptions::default(),
        ))
        .expect("materialise after the interrupted upload");
    restore_and_check(&elf, &dir.join("work"), &mat.snapshot_dir, &expect);
}
