//! `kill -9` of the process running the snapshot engine in the middle of an
//! upload: no manifest appears, the interrupted snapshot is not listed, and
//! the next snapshot of the instance (relaunched on the same data
//! directory, so its disk continues on the layer chain the killed cut left)
//! succeeds and restores.
//!
//! The test runs itself as the child (`VMR_SNAPSHOT_KILL_CHILD` set): the
//! child launches a microVM test-guest instance and snapshots it into a
//! `file://` store throttled to 2 MiB/s, so the upload of its 32 MiB memory
//! takes long enough to be killed.
//!
//! Needs /dev/kvm, the Tansu broker and the workspace binaries. Run:
//! `cargo test -p capture-agent --test snapshot_kill -- --test-threads=1`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::Stack;
use vmr_proto::InstanceId;

const CHILD: &str = "VMR_SNAPSHOT_KILL_CHILD";
const INSTANCE: &str = "vm-kill-1";

fn test_guest_image(root: &Path) -> PathBuf {
    let tg = root.join("test-guest");
    std::fs::create_dir_all(&tg).unwrap();
    let elf = vmr_vmm::guest_abi::build_test_guest(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"),
    )
    .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"));
    std::fs::copy(&elf, tg.join("test-guest.elf")).unwrap();
    std::fs::write(
        tg.join("image.toml"),
        "format_version = 1\nname = \"test-guest\"\ndrivers = [\"microvm\"]\n\
         [boot]\nkernel = \"test-guest.elf\"\n[machine]\nmemory_mib = 32\nvcpus = 1\n\
         [[disks]]\nname = \"vda\"\nsize_mib = 1\n",
    )
    .unwrap();
    tg
}

fn launch(cfg: &AgentConfig, image: &Path, data: &Path) -> Arc<RecordedInstance> {
    let blk = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let mut opts = LaunchOptions::new(image, InstanceId::new(INSTANCE).unwrap(), "microvm", data);
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.supervisor.bin_dir = blk.parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(10);
    Arc::new(
        RecordedInstance::launch(opts)
            .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e))),
    )
}

fn engine(cfg: &AgentConfig, w: &Path, throttle: Option<u64>) -> SnapshotEngine {
    let mut e = EngineConfig::local(&w.join("store"), &w.join("engine"), cfg.endpoints.clone());
    e.store.max_bytes_per_sec = throttle;
    SnapshotEngine::new(e).expect("the engine starts")
}

fn child(w: &Path) {
    let cfg = AgentConfig::load(&w.join("agent.toml")).unwrap();
    let rec = launch(&cfg, &w.join("test-guest"), &w.join("data"));
    let eng = engine(&cfg, w, Some(2 << 20));
    let r = eng.take_and_wait(
        rec,
        SnapshotRequest {
            incremental: false,
            pin: false,
        },
        Duration::from_secs(600),
    );
    panic!("the child was meant to be killed during its upload: {r:?}");
}

/// Processes whose command line mentions `needle` (the killed child's
/// backends, which outlive it by design).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn killed_during_upload_leaves_no_manifest_and_the_next_snapshot_succeeds() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // `<w>/agent.toml`, which the child reads too.
    let cfg_path = stack.config_file(w, "");
    test_guest_image(w);
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "killed_during_upload_leaves_no_manifest_and_the_next_snapshot_succeeds",
        "--nocapture",
    ])
    .env(CHILD, w)
    .stdout(std::fs::File::create(w.join("child.log")).unwrap())
    .stderr(std::fs::File::create(w.join("child.err")).unwrap());
    let mut child = vmr_testkit::ChildGuard::spawn("engine-child", &mut cmd).unwrap();
    // Wait until the memory object is being written (a staging file of the
    // file:// store under the instance's prefix), then SIGKILL.
    let inst_dir = w.join("store").join(INSTANCE);
    let t = Instant::now();
    let staged = loop {
        let found = walk(&inst_dir)
            .into_iter()
            .find(|p| p.to_string_lossy().contains("memory") && p.to_string_lossy().contains('#'));
        if let Some(p) = found {
            break p;
        }
        if child.try_wait().is_some() {
            let log = std::fs::read_to_string(w.join("child.err")).unwrap_or_default();
            let out = std::fs::read_to_string(w.join("child.log")).unwrap_or_default();
            let tail = |s: &str| s[s.len().saturating_sub(3000)..].to_string();
            panic!(
                "the child ended before its upload:\n{}\n{}",
                tail(&out),
                tail(&log)
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no upload started within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while child.try_wait().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("killed while {} was being written", staged.display());
    // Its backends survive the agent by design; they are ours to stop.
    let data = w.join("data").display().to_string();
    for pid in pids_mentioning(&data) {
        // SAFETY: kill(2) on a backend process this test's child started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let t = Instant::now();
    while !pids_mentioning(&data).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the child's backends did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let manifests: Vec<_> = walk(&inst_dir)
        .into_iter()
        .filter(|p| p.ends_with("manifest.json"))
        .collect();
    assert!(manifests.is_empty(), "a manifest appeared: {manifests:?}");

    // The instance again, on the same data directory: the next snapshot
    // succeeds, and the interrupted one is neither listed nor in the way.
    let cfg = AgentConfig::load(&cfg_path).unwrap();
    let rec = launch(&cfg, &w.join("test-guest"), &w.join("data"));
    let eng = engine(&cfg, w, None);
    assert!(eng.manifests(INSTANCE).unwrap().is_empty());
    let op = eng
        .take_and_wait(
            rec.clone(),
            SnapshotRequest {
                incremental: false,
                pin: false,
            },
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!(op.state, OperationState::Succeeded, "{:?}", op.error);
    let listed = eng.manifests(INSTANCE).unwrap();
    assert_eq!(listed.len(), 1);
    // The killed cut froze a layer; the new snapshot holds the whole chain.
    let layers = listed[0].disk_layers().len();
    eprintln!(
        "next snapshot {} with {layers} disk layers",
        listed[0].snapshot_id
    );
    assert!(
        layers >= 2,
        "the chain below the interrupted cut is in the snapshot"
    );
    rec.shutdown();
    let rt = common::runtime();
    rt.block_on(vmr_snapshot::materialize(
        eng.store(),
        INSTANCE,
        &vmr_snapshot::Selector::Latest,
        &w.join("restore"),
        &vmr_snapshot::RestoreOptions::default(),
    ))
    .expect("the next snapshot is whole");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
