//! The agent's gRPC service end to end: `capture-agent serve` as a real
//! process with a real Tansu broker and registry, a microVM instance of the
//! freestanding test guest and a QEMU/TCG instance of demo-linux, both
//! launched from their machine images over gRPC, listed, inspected,
//! paused, resumed, watched, re-filtered and stopped; health and reflection;
//! the two instances' records in their own partitions; and bad input, each
//! answered with a clear status or log line and counted on /metrics.
//!
//! Heavy: needs root (network namespaces, TAP, tmpfs mounts), /dev/kvm,
//! qemu-system-x86_64, the demo-linux image (guest/linux/build.sh), the
//! Tansu broker (scripts/setup.sh) and the workspace binaries
//! (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test service -- --test-threads=1`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_topic, request, Got, Stack};
use schema_registry::client::RegistryClient;
use tonic::Code;
use vmr_proto::pb;
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;
use vmr_testkit::qemu::NetNs;
use vmr_testkit::ChildGuard;

const PEER_CIDR: &str = "192.168.77.1/24";
const PEER_MAC: &str = "02:00:00:77:00:01";

fn demo_linux() -> PathBuf {
    let dir = std::env::var_os("VMR_GUEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmr_testkit::cache_dir().join("demo-linux"));
    assert!(
        dir.join("image.toml").is_file(),
        "the demo-linux machine image ({}/image.toml) is missing: build it with guest/linux/build.sh",
        dir.display()
    );
    dir
}

fn qemu_binary() -> PathBuf {
    let p = std::env::var_os("VMR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    assert!(
        p.is_file(),
        "QEMU not found at {}: install qemu-system-x86 (scripts/setup.sh) or set $VMR_QEMU",
        p.display()
    );
    p
}

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
    vmr_testkit::workspace_bin("vhost-tap-net")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    b.parent().unwrap().to_path_buf()
}

/// An image directory with the test guest (microVM), demo-linux (a link),
/// and two broken images.
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
    std::os::unix::fs::symlink(demo_linux(), dir.join("demo-linux")).unwrap();
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("image.toml"),
        "format_version = 1\nname = \"broken\"\ndrivers = [\"qemu\"]\ncolour = \"blue\"\n",
    )
    .unwrap();
    let nok = dir.join("no-kernel");
    std::fs::create_dir_all(&nok).unwrap();
    std::fs::write(
        nok.join("image.toml"),
        "format_version = 1\nname = \"no-kernel\"\ndrivers = [\"qemu\"]\n\
         [boot]\nkernel = \"vmlinuz\"\n[machine]\nmemory_mib = 64\nvcpus = 1\n",
    )
    .unwrap();
    dir
}

/// `capture-agent serve` as a child process.
struct Agent {
    child: ChildGuard,
    grpc: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Agent {
    fn start(work: &Path, tag: &str, bootstrap: &str, registry: &str, extra: &str) -> Agent {
        let grpc: SocketAddr = format!("127.0.0.1:{}", vmr_testkit::free_port())
            .parse()
            .unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", vmr_testkit::free_port())
            .parse()
            .unwrap();
        let dir = work.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let images = work.join("images");
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[endpoints]\nbootstrap-servers = \"{bootstrap}\"\nregistry-url = \"{registry}\"\n\
                 event-partitions = 4\n\n[agent]\nlisten = \"{grpc}\"\nmetrics-listen = \"{metrics}\"\n\
                 data-dir = \"{}\"\nimage-dirs = [\"{}\"]\nbackend-dir = \"{}\"\nqemu-binary = \"{}\"\n\
                 stop-grace-secs = 5\ndrain-timeout-secs = 20\n\n[sensors]\ninterval-secs = 2\n\n\
                 [shipper]\nretry-initial-ms = 200\nretry-max-ms = 2000\nrequest-timeout-secs = 5\n\
                 commit-interval-ms = 100\n{extra}\n",
                dir.join("data").display(),
                images.display(),
                backend_dir().display(),
                qemu_binary().display(),
            ),
        )
        .unwrap();
        let log = dir.join("agent.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(common::agent_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let child = ChildGuard::spawn(format!("capture-agent serve {tag}"), &mut cmd).unwrap();
        let mut a = Agent {
            child,
            grpc,
            metrics,
            log,
        };
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

    async fn client(&self) -> CaptureAgentClient<tonic::transport::Channel> {
        CaptureAgentClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the agent")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics.
    fn scrape(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// SIGTERM to the agent alone (not its process group): it stops its
    /// instances (guests, backends, shippers) in order and exits; returns
    /// its exit status.
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

    /// Stops the agent; it must exit cleanly.
    fn stop(mut self) {
        let st = self.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "the agent did not exit cleanly ({st:?}):\n{}",
            self.log_text()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Also on a failed assertion: the instances are stopped by the
        // agent, then the process group goes (ChildGuard).
        let _ = self.terminate();
    }
}

/// The value of the sample `name{labels}` (labels given as `k="v"` pieces
/// that must all appear).
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && labels.iter().all(|p| l.contains(p))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spec(image: &str, driver: &str) -> pb::InstanceSpec {
    pb::InstanceSpec {
        image: image.into(),
        driver: driver.into(),
        accel: if driver == "qemu" {
            "tcg".into()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

fn all_records(bootstrap: &str) -> Vec<Got> {
    let mut v = Vec::new();
    for t in vmr_proto::topics::EVENT_TOPICS {
        v.extend(read_topic(bootstrap, t, 4));
    }
    v
}

fn block_ops(got: &[Got], inst: &str, after_seq: u64) -> Vec<i32> {
    got.iter()
        .filter(|g| g.key == inst && g.event.seq > after_seq)
        .filter_map(|g| match &g.event.payload {
            Some(pb::event::Payload::Block(b)) => Some(b.op),
            _ => None,
        })
        .collect()
}

/// An instance id of the form `<prefix>-<n>` whose partition (of 4) is
/// not in `taken`.
fn id_on_own_partition(prefix: &str, taken: &[i32]) -> (String, i32) {
    (0..100)
        .map(|n| format!("{prefix}-{n}"))
        .map(|id| {
            let p = vmr_proto::topics::partition_for(&id, 4);
            (id, p)
        })
        .find(|(_, p)| !taken.contains(p))
        .expect("some id hashes elsewhere")
}

#[test]
fn service_launches_inspects_pauses_watches_and_stops_two_instances() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    images(w);
    let ns = NetNs::create().expect("create a network namespace (needs root and iproute2)");
    let agent = Agent::start(
        w,
        "agent",
        &stack.broker.bootstrap(),
        &stack.registry.url(),
        "",
    );
    let (qid, qp) = id_on_own_partition("vm-qemu", &[]);
    let (mid, mp) = id_on_own_partition("vm-micro", &[qp]);
    let rt = rt();
    let mark = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", agent.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Health and reflection.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "vmr.v1.CaptureAgent".into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        assert_eq!(
            h.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let services = reflection_services(ch.clone()).await;
        for s in ["vmr.v1.CaptureAgent", "grpc.health.v1.Health"] {
            assert!(
                services.iter().any(|x| x == s),
                "reflection lists {s}: {services:?}"
            );
        }

        let mut c = CaptureAgentClient::new(ch.clone());
        // Watch everything from the start.
        let mut all = c
            .watch(pb::WatchInstanceRequest::default())
            .await
            .unwrap()
            .into_inner();
        let watched = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Ok(Some(Ok(ev))) =
                tokio::time::timeout(Duration::from_secs(600), all.message())
                    .await
                    .map(|r| r.transpose())
            {
                let stop = ev.detail == "stopped";
                v.push(ev);
                if stop && v.iter().filter(|e| e.detail == "stopped").count() == 2 {
                    break;
                }
            }
            v
        });

        // The microVM instance of the test guest.
        let m = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: mid.clone(),
                spec: Some(spec("test-guest", "microvm")),
            })
            .await
            .unwrap_or_else(|s| panic!("launch the microVM: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(m.driver, "microvm");
        assert_eq!(m.state, pb::InstanceState::Running as i32, "{m:?}");
        // The QEMU/TCG instance of demo-linux behind a TAP in `ns`.
        let mut qs = spec("demo-linux", "qemu");
        qs.network = Some(pb::NetworkSpec {
            netns: ns.name().to_string(),
            tap_prefix: "vmrsvc".into(),
        });
        qs.capture = Some(pb::CapturePolicy {
            spool_full: pb::SpoolFullPolicy::Block as i32,
            block_bound_ms: 3000,
            ..Default::default()
        });
        let q = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: qid.clone(),
                spec: Some(qs),
            })
            .await
            .unwrap_or_else(|s| panic!("launch demo-linux: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(q.driver, "qemu");
        let dup = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: qid.clone(),
                spec: Some(spec("demo-linux", "qemu")),
            })
            .await
            .unwrap_err();
        assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

        ns.wait_for_link("vmrsvc0", Duration::from_secs(60))
            .expect("the TAP appears in the namespace");
        ns.ip(&["link", "set", "dev", "vmrsvc0", "address", PEER_MAC])
            .unwrap();
        ns.configure("vmrsvc0", PEER_CIDR).unwrap();
        for i in 0..3 {
            let r = request(&ns, &format!("PUT key{i} value{i}")).unwrap();
            assert!(r.starts_with("OK "), "PUT key{i}: {r:?}");
        }
        let r = request(&ns, "GET 1").unwrap();
        assert!(r.contains("value1"), "GET key1: {r:?}");

        // List and inspect.
        let list = c
            .list_instances(pb::ListInstancesRequest {})
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = list
            .instances
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect();
        assert!(
            ids.contains(&qid.as_str()) && ids.contains(&mid.as_str()),
            "{ids:?}"
        );
        let end = Instant::now() + Duration::from_secs(90);
        let q = loop {
            let q = c
                .get_instance(pb::GetInstanceRequest {
                    instance_id: qid.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if q.last_seq_shipped > 0
                && q.devices
                    .iter()
                    .all(|d| d.shipping.as_ref().is_some_and(|s| s.connected))
                || Instant::now() > end
            {
                break q;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        eprintln!("inspect {qid}: {q:#?}");
        assert_eq!(q.state, pb::InstanceState::Running as i32);
        let names: Vec<&str> = q.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vda", "net0", "agent"]);
        let vda = &q.devices[0];
        assert_eq!(vda.kind, "block");
        assert!(vda.backend.as_ref().is_some_and(|b| b.pid > 0));
        assert!(vda
            .shipping
            .as_ref()
            .is_some_and(|s| s.connected && s.events_shipped > 0 && s.spool_bytes > 0));
        assert_eq!(q.devices[1].tap, "vmrsvc0");
        assert!(
            q.last_seq_shipped > 0 && q.last_seq >= q.last_seq_shipped,
            "{q:?}"
        );
        let sensors = q.sensors.as_ref().expect("sensors reported");
        assert_eq!(
            sensors.available.len() + sensors.missing.len(),
            4,
            "every configured kind is available or missing: {sensors:?}"
        );

        // Pause and resume, with the wrong-state answers.
        for (id, kind) in [(&mid, "microvm"), (&qid, "qemu")] {
            let p = c
                .pause_instance(pb::PauseInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("pause {kind}: {s:?}"))
                .into_inner();
            assert_eq!(p.state, pb::InstanceState::Paused as i32, "{kind}");
            let again = c
                .pause_instance(pb::PauseInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
            assert!(again.message().contains("paused"), "{again:?}");
            let r = c
                .resume_instance(pb::ResumeInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.state, pb::InstanceState::Running as i32, "{kind}");
            let again = c
                .resume_instance(pb::ResumeInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
        }

        // A runtime filter change: the disk records writes only from now on.
        let before = all_records(&stack.broker.bootstrap());
        let ops = block_ops(&before, &qid, 0);
        assert!(
            ops.contains(&(pb::BlockOp::Read as i32)),
            "GET read the disk: {ops:?}"
        );
        let d = c
            .update_capture_filter(pb::UpdateCaptureFilterRequest {
                instance_id: qid.clone(),
                device: "vda".into(),
                filter: Some(pb::CaptureFilter {
                    filter: Some(pb::capture_filter::Filter::Block(pb::BlockCaptureFilter {
                        ops: vec![pb::BlockOp::Write as i32],
                    })),
                }),
            })
            .await
            .unwrap_or_else(|s| panic!("update the filter: {s:?}"))
            .into_inner();
        assert!(matches!(
            d.filter.and_then(|f| f.filter),
            Some(pb::capture_filter::Filter::Block(b)) if b.ops == [pb::BlockOp::Write as i32]
        ));
        let wrong = c
            .update_capture_filter(pb::UpdateCaptureFilterRequest {
                instance_id: qid.clone(),
                device: "vda".into(),
                filter: Some(pb::CaptureFilter {
                    filter: Some(pb::capture_filter::Filter::Net(
                        pb::NetCaptureFilter::default(),
                    )),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
        // Everything recorded before the change has been shipped by now.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mark = all_records(&stack.broker.bootstrap())
            .iter()
            .filter(|g| g.key == qid)
            .map(|g| g.event.seq)
            .max()
            .unwrap();
        let r = request(&ns, "PUT key9 value9").unwrap();
        assert!(r.starts_with("OK "), "{r:?}");
        let r = request(&ns, "GET 0").unwrap();
        assert!(r.contains("value0"), "{r:?}");

        // Watch one instance: its history first, then live events.
        let mut one = c
            .watch(pb::WatchInstanceRequest {
                instance_id: mid.clone(),
                skip_history: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut hist = Vec::new();
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_secs(2), one.message()).await
        {
            hist.push(ev);
        }
        assert!(hist.iter().all(|e| e.replayed), "{hist:?}");
        let kinds: Vec<i32> = hist.iter().map(|e| e.kind).collect();
        for k in [pb::LifecycleKind::Pause, pb::LifecycleKind::Resume] {
            assert!(
                kinds.contains(&(k as i32)),
                "{k:?} in the history: {hist:?}"
            );
        }
        assert_eq!(hist[0].detail, "launched", "{hist:?}");

        // Stop both; a stopped instance stops again without error.
        for id in [&mid, &qid] {
            let s = c
                .stop_instance(pb::StopInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("stop {id}: {s:?}"))
                .into_inner();
            assert_eq!(s.state, pb::InstanceState::Stopped as i32, "{s:?}");
        }
        let s = c
            .stop_instance(pb::StopInstanceRequest {
                instance_id: mid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.state, pb::InstanceState::Stopped as i32);
        // The single-instance watch ends with the stop.
        let mut tail = Vec::new();
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_secs(30), one.message()).await
        {
            tail.push(ev);
        }
        assert_eq!(
            tail.last().map(|e| e.detail.as_str()),
            Some("stopped"),
            "{tail:?}"
        );
        let seen = watched.await.unwrap();
        for id in [&mid, &qid] {
            let mine: Vec<&pb::InstanceEvent> =
                seen.iter().filter(|e| &e.instance_id == id).collect();
            assert_eq!(
                mine.first().map(|e| e.detail.as_str()),
                Some("launched"),
                "{mine:?}"
            );
            assert_eq!(
                mine.last().map(|e| e.detail.as_str()),
                Some("stopped"),
                "{mine:?}"
            );
            assert!(mine
                .iter()
                .any(|e| e.kind == pb::LifecycleKind::Pause as i32));
        }
        mark
    });

    // What landed: each instance in its own partition, keyed by itself,
    // gap-free; the filter took effect.
    let got = all_records(&stack.broker.bootstrap());
    for (id, part) in [(&qid, qp), (&mid, mp)] {
        let mine: Vec<&Got> = got.iter().filter(|g| &g.key == id).collect();
        assert!(!mine.is_empty(), "{id} has records");
        assert!(
            mine.iter()
                .all(|g| g.partition == part && g.event.instance_id == **id),
            "{id}: every record on partition {part}, with its own id"
        );
        let mut seqs: Vec<u64> = mine.iter().map(|g| g.event.seq).collect();
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{id}: gap-free seq, each once"
        );
        let kinds: Vec<i32> = mine
            .iter()
            .filter_map(|g| match &g.event.payload {
                Some(pb::event::Payload::Lifecycle(l)) => Some(l.kind),
                _ => None,
            })
            .collect();
        for k in [pb::LifecycleKind::Pause, pb::LifecycleKind::Resume] {
            assert!(kinds.contains(&(k as i32)), "{id}: {k:?} recorded");
        }
    }
    for p in 0..4 {
        let keys: std::collections::BTreeSet<&str> = got
            .iter()
            .filter(|g| g.partition == p && (g.key == qid || g.key == mid))
            .map(|g| g.key.as_str())
            .collect();
        assert!(keys.len() <= 1, "partition {p} mixes {keys:?}");
    }
    let after = block_ops(&got, &qid, mark);
    assert!(
        after.contains(&(pb::BlockOp::Write as i32))
            && after.iter().all(|&o| o == pb::BlockOp::Write as i32),
        "after the filter change only writes are recorded: {after:?}"
    );

    // The metrics the agent claims.
    let text = agent.scrape();
    let q = format!("instance=\"{qid}\"");
    for (name, labels) in [
        (
            "vmr_agent_events_shipped_total",
            vec![q.as_str(), "topic=\"vmr.block.v1\""],
        ),
        (
            "vmr_agent_events_shipped_total",
            vec![q.as_str(), "topic=\"vmr.net.v1\""],
        ),
        (
            "vmr_agent_bytes_shipped_total",
            vec![q.as_str(), "topic=\"vmr.block.v1\""],
        ),
        ("vmr_agent_last_seq_shipped", vec![q.as_str()]),
        ("vmr_agent_launches_total", vec![]),
        (
            "vmr_agent_rpc_errors_total",
            vec!["method=\"PauseInstance\"", "code=\"failed_precondition\""],
        ),
        (
            "vmr_agent_rpc_errors_total",
            vec!["method=\"LaunchInstance\"", "code=\"already_exists\""],
        ),
    ] {
        let v = metric(&text, name, &labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} on /metrics:\n{text}"));
        assert!(v > 0.0, "{name}{labels:?} = {v}");
    }
    for name in [
        "vmr_agent_spool_bytes",
        "vmr_agent_spool_oldest_unshipped_seconds",
        "vmr_agent_producer_errors_total",
        "vmr_agent_registry_errors_total",
        "vmr_agent_instance_lag_events",
        "vmr_agent_instance_lag_seconds",
        "vmr_agent_gaps_total",
        "vmr_agent_backend_restarts_total",
        "vmr_agent_sensor_samples_total",
        "vmr_agent_instances",
        "vmr_agent_broker_reachable",
    ] {
        assert!(
            metric(&text, name, &[]).is_some(),
            "{name} on /metrics:\n{text}"
        );
    }
    assert!(text.contains("# TYPE vmr_agent_events_shipped_total counter"));
    agent.stop();
    drop(ns);
}

async fn reflection_services(ch: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection answers")
        .into_inner();
    let msg = resp.message().await.unwrap().expect("one reply");
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

#[test]
fn bad_input_gets_clear_statuses_log_lines_and_metrics() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    images(w);
    let rt = rt();

    // (1) An unreachable broker at start: the agent serves, says so in
    // its log, refuses launches with UNAVAILABLE and counts it.
    let dead = vmr_testkit::free_port();
    let a = Agent::start(
        w,
        "dead",
        &format!("127.0.0.1:{dead}"),
        &stack.registry.url(),
        "",
    );
    rt.block_on(async {
        let mut c = a.client().await;
        let e = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: "vm-nobroker".into(),
                spec: Some(spec("test-guest", "microvm")),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains(&format!("127.0.0.1:{dead}")), "{e:?}");
    });
    assert!(
        a.log_text().contains("broker unreachable at start"),
        "{}",
        a.log_text()
    );
    let text = a.scrape();
    assert_eq!(
        metric(&text, "vmr_agent_broker_reachable", &[]),
        Some(0.0),
        "{text}"
    );
    assert!(metric(&text, "vmr_agent_broker_probe_failures_total", &[]).unwrap() >= 2.0);
    assert!(
        metric(
            &text,
            "vmr_agent_rpc_errors_total",
            &["code=\"unavailable\""]
        )
        .unwrap()
            >= 1.0
    );
    a.stop();

    // The agent on the real stack, the registry refusing the agent's
    // lifecycle schema: subject read-only, registration on.
    let client = RegistryClient::new(&stack.registry.url()).unwrap();
    let rrt = common::runtime();
    rrt.block_on(client.set_mode(Some("vmr.lifecycle.v1-value"), "READONLY", false))
        .unwrap();
    let a = Agent::start(
        w,
        "agent",
        &stack.broker.bootstrap(),
        &stack.registry.url(),
        "register-schemas = true\n\n[snapshots]\nenabled = false",
    );
    let inst = "vm-bad-1";
    rt.block_on(async {
        let mut c = a.client().await;
        // (2) Unknown instances.
        let e = c
            .get_instance(pb::GetInstanceRequest {
                instance_id: "vm-nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("vm-nope"));
        let e = c
            .pause_instance(pb::PauseInstanceRequest {
                instance_id: "vm-nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = c
            .stop_instance(pb::StopInstanceRequest {
                instance_id: "vm-nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = c
            .watch(pb::WatchInstanceRequest {
                instance_id: "vm-nope".into(),
                skip_history: false,
            })
            .await;
        let Err(e) = e else {
            panic!("Watch of an unknown instance is NOT_FOUND")
        };
        assert_eq!(e.code(), Code::NotFound);
        // (3) A malformed image, a missing kernel, bad names and fields.
        for (image, driver, code, needle) in [
            ("broken", "", Code::InvalidArgument, "colour"),
            ("no-kernel", "", Code::InvalidArgument, "boot.kernel"),
            ("../images", "", Code::InvalidArgument, "spec.image"),
            ("no-such-image", "", Code::NotFound, "no machine image"),
            ("test-guest", "qemu", Code::InvalidArgument, "spec.driver"),
            ("test-guest", "xen", Code::InvalidArgument, "unknown driver"),
        ] {
            let e = c
                .launch_instance(pb::LaunchInstanceRequest {
                    instance_id: "vm-img".into(),
                    spec: Some(spec(image, driver)),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{image}/{driver}: {e:?}");
            assert!(e.message().contains(needle), "{image}/{driver}: {e:?}");
        }
        let mut s = spec("test-guest", "microvm");
        s.devices.push(pb::DeviceSpec {
            name: "vda".into(),
            filter: Some(pb::CaptureFilter {
                filter: Some(pb::capture_filter::Filter::Net(
                    pb::NetCaptureFilter::default(),
                )),
            }),
            tap: String::new(),
        });
        let e = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: "vm-f".into(),
                spec: Some(s),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("spec.devices[0].filter"), "{e:?}");
        let e = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: "bad id!".into(),
                spec: Some(spec("test-guest", "")),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("instance_id"), "{e:?}");
        // Snapshots: this agent runs without an engine ([snapshots] enabled = false).
        let e = c
            .take_snapshot(pb::TakeSnapshotRequest {
                instance_id: "vm-nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

        // (4) The registry refuses: the instance runs, its agent events
        // stay in the spool, the refusal is logged and counted.
        let m = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: inst.into(),
                spec: Some(spec("test-guest", "microvm")),
            })
            .await
            .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", a.log_text()))
            .into_inner();
        assert_eq!(m.state, pb::InstanceState::Running as i32);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let t = a.scrape();
            if metric(
                &t,
                "vmr_agent_registry_errors_total",
                &[&format!("instance=\"{inst}\""), "source=\"agent\""],
            )
            .unwrap_or(0.0)
                >= 2.0
            {
                break;
            }
            assert!(Instant::now() < end, "registry errors not counted:\n{t}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        c.pause_instance(pb::PauseInstanceRequest {
            instance_id: inst.into(),
        })
        .await
        .unwrap();
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: inst.into(),
        })
        .await
        .unwrap();
    });
    let log = a.log_text();
    assert!(
        log.contains("vmr.lifecycle.v1-value") && log.contains("read-only"),
        "{log}"
    );
    a.stop();
    rrt.block_on(client.set_mode(Some("vmr.lifecycle.v1-value"), "READWRITE", false))
        .unwrap();

    // (5) A corrupt spool frame: damage the second frame of the unshipped
    // agent spool; relaunched, the instance ships the rest and counts it.
    let spool = w.join("agent").join("data").join(inst).join("agent");
    let mut r = vhost_tap::capture::SpoolReader::from_position(&spool, None);
    let mut ends = Vec::new();
    while let Some(item) = r.next_item().unwrap() {
        if let vhost_tap::capture::SpoolItem::Event { event, position } = item {
            ends.push((event.seq, position));
        }
    }
    assert!(
        ends.len() >= 3,
        "the agent spool holds Boot, Pause, Shutdown...: {ends:?}"
    );
    let damaged = ends[1].0;
    let start = &ends[0].1;
    let path = spool.join(&start.segment);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start.offset as usize + 20] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let a = Agent::start(
        w,
        "agent",
        &stack.broker.bootstrap(),
        &stack.registry.url(),
        "register-schemas = true",
    );
    rt.block_on(async {
        let mut c = a.client().await;
        c.launch_instance(pb::LaunchInstanceRequest {
            instance_id: inst.into(),
            spec: Some(spec("test-guest", "microvm")),
        })
        .await
        .unwrap_or_else(|s| panic!("relaunch: {s:?}\n{}", a.log_text()));
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let t = a.scrape();
            if metric(
                &t,
                "vmr_agent_corrupt_frames_total",
                &[&format!("instance=\"{inst}\""), "source=\"agent\""],
            ) == Some(1.0)
            {
                break;
            }
            assert!(Instant::now() < end, "corrupt frame not counted:\n{t}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: inst.into(),
        })
        .await
        .unwrap();
    });
    assert!(
        a.log_text().contains("damaged spool frame skipped"),
        "{}",
        a.log_text()
    );
    let got = all_records(&stack.broker.bootstrap());
    let seqs: Vec<u64> = got
        .iter()
        .filter(|g| g.key == inst)
        .map(|g| g.event.seq)
        .collect();
    assert!(!seqs.contains(&damaged), "the damaged event is not shipped");
    for (s, _) in &ends {
        if *s != damaged {
            assert!(
                seqs.contains(s),
                "seq {s} of the first run shipped once the registry accepts"
            );
        }
    }
    a.stop();

    // (6) A full disk under a spool: a 2 MiB tmpfs under the disk's spool.
    // The spool reserves its capacity (256 MiB) when the backend starts, so
    // the launch fails at once, with the backend's reason; nothing is left
    // running.
    let a = Agent::start(
        w,
        "full",
        &stack.broker.bootstrap(),
        &stack.registry.url(),
        "",
    );
    let inst = "vm-full-1";
    let mnt = w.join("full").join("data").join(inst).join("vda");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount (needs root)");
    assert!(st.success(), "mount a 2 MiB tmpfs at {}", mnt.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let unmount = Unmount(mnt.clone());
    rt.block_on(async {
        let mut c = a.client().await;
        let e = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: inst.into(),
                spec: Some(spec("test-guest", "microvm")),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("No space left on device") && e.message().contains("vda"),
            "{e:?}"
        );
        let g = c
            .get_instance(pb::GetInstanceRequest {
                instance_id: inst.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(g.state, pb::InstanceState::Failed as i32, "{g:?}");
        assert!(g.detail.contains("No space left on device"), "{g:?}");
    });
    let text = a.scrape();
    assert_eq!(
        metric(
            &text,
            "vmr_agent_rpc_errors_total",
            &["method=\"LaunchInstance\"", "code=\"resource_exhausted\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "vmr_agent_instances",
            &["state=\"INSTANCE_STATE_FAILED\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(a.log_text().contains("launch failed"), "{}", a.log_text());
    a.stop();
    drop(unmount);
    let left = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !left.contains(&mnt.display().to_string()),
        "the tmpfs is unmounted"
    );
}
