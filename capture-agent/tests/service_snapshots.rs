//! The snapshot RPCs of `capture-agent serve` end to end: the agent as a
//! real process built from its `[snapshots]` table, a real Tansu broker and
//! registry, and microVM instances of the freestanding test guest. Over
//! gRPC, `TakeSnapshot` on a running instance returns an operation that
//! succeeds and `ListSnapshots` lists its snapshot; an instance launched
//! with `snapshot_interval_secs` is snapshotted on its schedule, which ends
//! when the instance is stopped.
//!
//! Needs /dev/kvm, the Tansu broker (scripts/setup.sh) and the workspace
//! binaries (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test service_snapshots`.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Stack;
use vmr_proto::pb;
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;
use vmr_testkit::ChildGuard;

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

fn backend_dir() -> PathBuf {
    let b = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    b.parent().unwrap().to_path_buf()
}

/// An image directory with the test guest (microVM, one 1 MiB disk).
fn images(root: &Path) -> PathBuf {
    let dir = root.join("images");
    let tg = dir.join("test-guest");
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
    dir
}

/// `capture-agent serve` as a child process; SIGTERM on drop.
struct Agent {
    child: ChildGuard,
    grpc: SocketAddr,
    log: PathBuf,
}

impl Agent {
    fn start(work: &Path, stack: &Stack, snapshots: &str) -> Agent {
        let grpc: SocketAddr = format!("127.0.0.1:{}", vmr_testkit::free_port())
            .parse()
            .unwrap();
        let metrics = vmr_testkit::free_port();
        let cfg = work.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[endpoints]\nbootstrap-servers = \"{}\"\nregistry-url = \"{}\"\n\
                 event-partitions = 4\n\n[agent]\nlisten = \"{grpc}\"\n\
                 metrics-listen = \"127.0.0.1:{metrics}\"\ndata-dir = \"{}\"\n\
                 image-dirs = [\"{}\"]\nbackend-dir = \"{}\"\nstop-grace-secs = 5\n\
                 drain-timeout-secs = 20\n\n[sensors]\nenabled = false\n\n\
                 [shipper]\nregister-schemas = true\n\n[snapshots]\n{snapshots}\n",
                stack.broker.bootstrap(),
                stack.registry.url(),
                work.join("data").display(),
                work.join("images").display(),
                backend_dir().display(),
            ),
        )
        .unwrap();
        let log = work.join("agent.log");
        let mut cmd = Command::new(common::agent_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = ChildGuard::spawn("capture-agent serve".to_string(), &mut cmd).unwrap();
        let mut a = Agent { child, grpc, log };
        let end = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(grpc).is_err() {
            if let Some(s) = a.child.try_wait() {
                panic!("capture-agent serve exited ({s}):\n{}", a.log_text());
            }
            assert!(
                Instant::now() < end,
                "the agent does not listen:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(s) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on the pid of the child we own, not yet reaped.
        unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(90);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

fn spec(interval_secs: u32) -> pb::InstanceSpec {
    pb::InstanceSpec {
        image: "test-guest".into(),
        driver: "microvm".into(),
        snapshot_interval_secs: interval_secs,
        ..Default::default()
    }
}

async fn snapshot_ids(
    c: &mut CaptureAgentClient<tonic::transport::Channel>,
    instance: &str,
) -> Vec<String> {
    c.list_snapshots(pb::ListSnapshotsRequest {
        instance_id: instance.into(),
    })
    .await
    .unwrap_or_else(|s| panic!("ListSnapshots {instance}: {s:?}"))
    .into_inner()
    .snapshots
    .into_iter()
    .map(|s| {
        s.manifest
            .expect("a listed snapshot has its manifest")
            .snapshot_id
    })
    .collect()
}

#[test]
fn take_snapshot_over_grpc_succeeds_is_listed_and_schedules_follow_the_launch() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    images(w);
    let store = w.join("store");
    let mut agent = Agent::start(
        w,
        &stack,
        &format!(
            "store-url = \"file://{}\"\nkeep-last = 20\n",
            store.display()
        ),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = CaptureAgentClient::connect(format!("http://{}", agent.grpc))
            .await
            .expect("connect to the agent");

        // On demand: an instance without a schedule.
        let m = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: "vm-snap-1".into(),
                spec: Some(spec(0)),
            })
            .await
            .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(m.state, pb::InstanceState::Running as i32, "{m:?}");
        assert!(snapshot_ids(&mut c, "vm-snap-1").await.is_empty());
        let op = c
            .take_snapshot(pb::TakeSnapshotRequest {
                instance_id: "vm-snap-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("TakeSnapshot: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(op.instance_id, "vm-snap-1");
        assert!(!op.id.is_empty());
        let end = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let o = c
                .get_operation(pb::GetOperationRequest {
                    operation_id: op.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if o.done {
                break o;
            }
            assert!(
                Instant::now() < end,
                "operation {} not done in 120 s (stage {})\n{}",
                op.id,
                o.stage,
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            done.state,
            pb::OperationState::Succeeded as i32,
            "{done:?}\n{}",
            agent.log_text()
        );
        let manifest = done
            .manifest
            .expect("a succeeded operation has its manifest");
        assert_eq!(manifest.instance_id, "vm-snap-1");
        assert!(!manifest.snapshot_id.is_empty());
        let listed = snapshot_ids(&mut c, "vm-snap-1").await;
        assert_eq!(listed, vec![manifest.snapshot_id.clone()]);
        // The store is the one `store-url` names.
        assert!(
            std::fs::read_dir(&store).is_ok_and(|mut d| d.next().is_some()),
            "the file store {} holds the snapshot",
            store.display()
        );
        // No schedule for it: the count stays at one.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(snapshot_ids(&mut c, "vm-snap-1").await.len(), 1);
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: "vm-snap-1".into(),
        })
        .await
        .unwrap();

        // Scheduled: every 2 s from the launch until the stop.
        c.launch_instance(pb::LaunchInstanceRequest {
            instance_id: "vm-snap-2".into(),
            spec: Some(spec(2)),
        })
        .await
        .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", agent.log_text()));
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let n = snapshot_ids(&mut c, "vm-snap-2").await.len();
            if n >= 3 {
                break;
            }
            assert!(
                Instant::now() < end,
                "{n} scheduled snapshots of vm-snap-2 in 90 s\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: "vm-snap-2".into(),
        })
        .await
        .unwrap();
        // A snapshot already started when the stop came may still land.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after_stop = snapshot_ids(&mut c, "vm-snap-2").await.len();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            snapshot_ids(&mut c, "vm-snap-2").await.len(),
            after_stop,
            "no scheduled snapshot after the stop"
        );
    });
    let log = agent.log_text();
    assert!(log.contains("snapshot schedule started"), "{log}");
    assert!(log.contains("snapshot schedule stopped"), "{log}");
    let st = agent.terminate();
    assert!(
        st.is_some_and(|s| s.success()),
        "the agent did not exit cleanly ({st:?}):\n{}",
        agent.log_text()
    );
}
