//! `kill -9` in the middle of a snapshot upload: no manifest appears, the
//! interrupted snapshot is not listed, and the next snapshot of the
//! instance (relaunched on the same data directory, so its disk continues
//! on the layer chain the killed cut left) succeeds and restores.
//!
//! - `capture-agent serve` itself, over gRPC: its `[snapshots]`
//!   `max-upload-bytes-per-sec` holds the upload of the test guest's 32 MiB
//!   memory to 2 MiB/s, so the kill lands while the operation reports
//!   `uploading`. Neither the store nor `vmr.snapshots.v1` gets a manifest
//!   for the interrupted id; the restarted agent's next snapshot of the
//!   relaunched instance succeeds, is published, and sweeps the interrupted
//!   id's objects and staging files from the store.
//! - The engine as a library in a child process (the test runs itself as
//!   the child, `VMR_SNAPSHOT_KILL_CHILD` set), with the same throttle.
//!
//! Needs /dev/kvm, the Tansu broker and the workspace binaries. Run:
//! `cargo test -p capture-agent --test snapshot_kill -- --test-threads=1`.

#[path = "common/agent_rig.rs"]
mod agent_rig;
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_rig::{pids_mentioning, walk};
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

const SERVE_INSTANCE: &str = "vm-kill-serve";

async fn wait_operation(
    c: &mut agent_rig::Client,
    id: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> vmr_proto::pb::Operation {
    let end = Instant::now() + timeout;
    loop {
        let o = c
            .get_operation(vmr_proto::pb::GetOperationRequest {
                operation_id: id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetOperation {id}: {s:?}"))
            .into_inner();
        if o.done {
            return o;
        }
        assert!(
            Instant::now() < end,
            "operation {id} not done in {timeout:?} (stage {})\n{}",
            o.stage,
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn serve_killed_during_upload_publishes_no_manifest_and_the_next_snapshot_succeeds() {
    use vmr_proto::pb;
    agent_rig::require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    agent_rig::test_guest_images(w, 32);
    let store = w.join("store");
    let throttle = format!("max-upload-bytes-per-sec = {}\n", 2 << 20);
    let mut agent = agent_rig::Agent::start(agent_rig::AgentSetup::snapshots(
        w,
        &stack,
        &format!("store-url = \"file://{}\"\n{throttle}", store.display()),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spec = || pb::InstanceSpec {
        image: "test-guest".into(),
        driver: "microvm".into(),
        ..Default::default()
    };
    let inst_dir = store.join(SERVE_INSTANCE);
    let interrupted = rt.block_on(async {
        let mut c = agent.client().await;
        c.launch_instance(pb::LaunchInstanceRequest {
            instance_id: SERVE_INSTANCE.into(),
            spec: Some(spec()),
        })
        .await
        .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", agent.log_text()));
        let op = c
            .take_snapshot(pb::TakeSnapshotRequest {
                instance_id: SERVE_INSTANCE.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("TakeSnapshot: {s:?}\n{}", agent.log_text()))
            .into_inner();
        // Kill once the operation reports a quarter of its bytes stored.
        let end = Instant::now() + Duration::from_secs(120);
        let at = loop {
            let o = c
                .get_operation(pb::GetOperationRequest {
                    operation_id: op.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!o.done, "the upload finished before the kill: {o:?}");
            if o.stage == "uploading" && o.bytes_total > 0 && o.bytes_done * 4 >= o.bytes_total {
                break o;
            }
            assert!(
                Instant::now() < end,
                "no upload under way in 120 s (stage {})\n{}",
                o.stage,
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        agent.kill9();
        eprintln!(
            "killed serve at {} of {} bytes uploaded",
            at.bytes_done, at.bytes_total
        );
        let ids: Vec<String> = std::fs::read_dir(&inst_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "one interrupted snapshot in the store: {ids:?}"
        );
        ids[0].clone()
    });
    // Its backends outlive it by design; they are ours to stop.
    agent.kill_leftovers();
    let left = walk(&inst_dir.join(&interrupted));
    eprintln!("the interrupted {interrupted} left {left:?}");
    assert!(!left.is_empty(), "the upload had started writing");
    assert!(
        !left.iter().any(|p| p.ends_with("manifest.json")),
        "a manifest appeared: {left:?}"
    );
    let published = agent_rig::published_manifests(&stack.broker.bootstrap());
    assert!(
        !published.iter().any(|(_, m)| m.instance == SERVE_INSTANCE),
        "a manifest was published: {:?}",
        published.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let staging = w
        .join("data")
        .join(".snapshots/staging")
        .join(SERVE_INSTANCE)
        .join(&interrupted);

    // Restarted without the throttle, on the same data directory and store.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, cfg.replace(&throttle, "")).unwrap();
    agent.restart();
    let next = rt.block_on(async {
        let mut c = agent.client().await;
        assert!(
            c.list_snapshots(pb::ListSnapshotsRequest {
                instance_id: SERVE_INSTANCE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots
            .is_empty(),
            "the interrupted snapshot is not listed"
        );
        let launch = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: SERVE_INSTANCE.into(),
                spec: Some(spec()),
            })
            .await;
        if let Err(s) = launch {
            // A restarted agent that re-attached the instance's record
            // holds it (its guest died with the killed agent): once it is
            // stopped, launch it again.
            assert_eq!(s.code(), tonic::Code::AlreadyExists, "launch: {s:?}");
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let st = c
                    .get_instance(pb::GetInstanceRequest {
                        instance_id: SERVE_INSTANCE.into(),
                    })
                    .await
                    .unwrap_or_else(|s| panic!("GetInstance: {s:?}"))
                    .into_inner()
                    .state;
                if [
                    pb::InstanceState::Stopped,
                    pb::InstanceState::Crashed,
                    pb::InstanceState::Failed,
                ]
                .iter()
                .any(|x| *x as i32 == st)
                {
                    break;
                }
                if st == pb::InstanceState::Running as i32 || st == pb::InstanceState::Paused as i32
                {
                    let _ = c
                        .stop_instance(pb::StopInstanceRequest {
                            instance_id: SERVE_INSTANCE.into(),
                        })
                        .await;
                }
                assert!(
                    Instant::now() < end,
                    "the re-attached instance is still in state {st}\n{}",
                    agent.log_text()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // The entry may still hold the instance for a moment after its
            // state reads stopped: the relaunch is retried until it is let go.
            loop {
                match c
                    .launch_instance(pb::LaunchInstanceRequest {
                        instance_id: SERVE_INSTANCE.into(),
                        spec: Some(spec()),
                    })
                    .await
                {
                    Ok(_) => break,
                    Err(s) if s.code() == tonic::Code::AlreadyExists && Instant::now() < end => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => panic!("relaunch: {s:?}\n{}", agent.log_text()),
                }
            }
        }
        let op = c
            .take_snapshot(pb::TakeSnapshotRequest {
                instance_id: SERVE_INSTANCE.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("TakeSnapshot: {s:?}\n{}", agent.log_text()))
            .into_inner();
        let done = wait_operation(&mut c, &op.id, Duration::from_secs(120), || {
            agent.log_text()
        })
        .await;
        assert_eq!(
            done.state,
            pb::OperationState::Succeeded as i32,
            "{done:?}\n{}",
            agent.log_text()
        );
        let m = done
            .manifest
            .expect("a succeeded operation has its manifest");
        let listed: Vec<String> = c
            .list_snapshots(pb::ListSnapshotsRequest {
                instance_id: SERVE_INSTANCE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| s.manifest.unwrap().snapshot_id)
            .collect();
        assert_eq!(listed, vec![m.snapshot_id.clone()]);
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: SERVE_INSTANCE.into(),
        })
        .await
        .unwrap();
        m
    });
    assert_ne!(next.snapshot_id, interrupted);
    // What the interrupted upload left is gone from the store and staging.
    assert!(
        !inst_dir.join(&interrupted).exists(),
        "left over: {:?}",
        walk(&inst_dir.join(&interrupted))
    );
    assert!(
        !staging.exists(),
        "staging left over: {}",
        staging.display()
    );
    let log = agent.log_text();
    assert!(
        log.contains("unfinished snapshot removed from the store"),
        "{log}"
    );
    let published = agent_rig::published_manifests(&stack.broker.bootstrap());
    let keys: Vec<&str> = published
        .iter()
        .filter(|(_, m)| m.instance == SERVE_INSTANCE)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        keys,
        vec![format!("{SERVE_INSTANCE}/{}", next.snapshot_id).as_str()],
        "only the next snapshot is published"
    );
    agent.stop_cleanly();
    // The next snapshot is whole: every object checks out.
    let s = vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::local(&store)).unwrap();
    let m = common::runtime()
        .block_on(vmr_snapshot::materialize(
            &s,
            SERVE_INSTANCE,
            &vmr_snapshot::Selector::Latest,
            &w.join("restore-serve"),
            &vmr_snapshot::RestoreOptions::default(),
        ))
        .expect("the next snapshot is whole");
    eprintln!(
        "next snapshot {} restored with {} disk layers",
        next.snapshot_id,
        m.manifest.disk_layers().len()
    );
}
