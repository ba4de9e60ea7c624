//! `kill -9` of `capture-agent serve` mid-stream, then a restart with the
//! same configuration, on the real stack: a Tansu broker and the registry,
//! a QEMU/TCG instance of demo-linux behind a TAP in a network namespace,
//! and a microVM instance of the freestanding test guest, both launched
//! over gRPC.
//!
//! While no agent runs, QEMU and the backends keep running (same pids and
//! start times) and the guest keeps answering a peer's requests, which it
//! writes to its disk. The restarted agent re-attaches to QEMU and adopts
//! the backends (listed RUNNING over gRPC), ships what the spools gathered
//! during the outage, and after more traffic and a stop every `seq` of the
//! instance is in Kafka exactly once, gap-free and in order per topic. The
//! microVM ran inside the killed agent, so it ended with it: the restarted
//! agent reports it CRASHED with a CRASH lifecycle event, ships its spools
//! and stops its orphaned backend. Nothing is left running.
//!
//! Heavy: needs root (network namespaces, TAP), /dev/kvm,
//! qemu-system-x86_64, the demo-linux image (guest/linux/build.sh), the
//! Tansu broker (scripts/setup.sh) and the workspace binaries
//! (`cargo build -p vhost-tap -p schema-registry -p capture-agent --bins`).
//! Run: `cargo test -p capture-agent --test service_restart`.

mod common;
#[path = "common/restart.rs"]
mod restart;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{check_exactly_once, read_topic, request, Got, Stack};
use restart::{proc_of, record, start_time, wait_gone, Serve};
use vmr_proto::pb;
use vmr_testkit::qemu::NetNs;

const PEER_CIDR: &str = "192.168.77.1/24";
const PEER_MAC: &str = "02:00:00:77:00:01";

fn backend_dir() -> PathBuf {
    let b = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    vmr_testkit::workspace_bin("vhost-tap-net")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    b.parent().unwrap().to_path_buf()
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

/// demo-linux (a link) and the microVM test guest.
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
    std::os::unix::fs::symlink(common::demo_linux_image_dir(), dir.join("demo-linux")).unwrap();
    dir
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The peer's requests, sent one after another from the namespace.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// (request number, when it was answered, the answer).
    answered: Arc<Mutex<Vec<(u64, Instant, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(ns_path: PathBuf, first: u64) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut i = first;
            while !s.load(Ordering::Acquire) {
                if let Ok(r) = request_at(&ns_path, &format!("PUT rk{i} rv{i}")) {
                    a.lock().unwrap().push((i, Instant::now(), r));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        Traffic {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    fn answered_between(&self, from: Instant, to: Instant) -> usize {
        self.answered
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t, r)| *t >= from && *t <= to && r.starts_with("OK "))
            .count()
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.answered.lock().unwrap().len()
    }
}

/// One request to the guest's service from inside the namespace at
/// `ns_path`, with a short bound (the traffic thread's requests).
fn request_at(ns_path: &Path, line: &str) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Write};
    common::enter_netns(ns_path)?;
    let addr: SocketAddr = common::SERVICE.parse().unwrap();
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    (&stream)
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    Ok(reply.trim_end().to_string())
}

fn all_records(bootstrap: &str) -> Vec<Got> {
    let mut v = Vec::new();
    for t in vmr_proto::topics::EVENT_TOPICS {
        v.extend(read_topic(bootstrap, t, 4));
    }
    v
}

async fn instance(s: &Serve, id: &str) -> pb::Instance {
    let mut c = s.client().await;
    c.get_instance(pb::GetInstanceRequest {
        instance_id: id.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("GetInstance {id}: {e:?}\n{}", s.log_text()))
    .into_inner()
}

async fn wait_state(
    s: &Serve,
    id: &str,
    want: pb::InstanceState,
    timeout: Duration,
) -> pb::Instance {
    let end = Instant::now() + timeout;
    loop {
        let i = instance(s, id).await;
        if i.state == want as i32 {
            return i;
        }
        assert!(
            Instant::now() < end,
            "{id} is {:?}, not {want:?}, after {timeout:?}: {i:#?}\n{}",
            pb::InstanceState::try_from(i.state),
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The processes the record of `id` names: the guest (if outside the
/// agent) and each backend, as (what, pid, start time).
fn recorded_processes(data: &Path, id: &str) -> Vec<(String, u32, u64)> {
    let r = record(data, id).unwrap_or_else(|| panic!("no record of {id}"));
    let mut out = Vec::new();
    if !r["guest"]["in_agent"].as_bool().unwrap() {
        let (pid, st) = proc_of(&r["guest"]["process"]).expect("a guest process");
        out.push(("guest".to_string(), pid, st));
    }
    for b in r["backends"].as_array().unwrap() {
        let (pid, st) = proc_of(&b["process"]).expect("a backend process");
        out.push((b["device"].as_str().unwrap().to_string(), pid, st));
    }
    out
}

#[test]
fn kill_9_of_serve_then_restart_reattaches_and_ships_every_seq_once() {
    require_kvm();
    let qemu = common::qemu_binary();
    let stack = Stack::start();
    let bootstrap = stack.broker.bootstrap();
    let ns = NetNs::create().expect("create a network namespace (needs root and iproute2)");
    restart::become_subreaper();
    let work = tempfile::tempdir().unwrap();
    let images = images(work.path());
    let data = work.path().join("data");
    let grpc: SocketAddr = format!("127.0.0.1:{}", vmr_testkit::free_port())
        .parse()
        .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", vmr_testkit::free_port())
        .parse()
        .unwrap();
    let cfg = work.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[endpoints]\nbootstrap-servers = \"{bootstrap}\"\nregistry-url = \"{}\"\n\
             event-partitions = 4\n\n[agent]\nlisten = \"{grpc}\"\nmetrics-listen = \"{metrics}\"\n\
             data-dir = \"{}\"\nimage-dirs = [\"{}\"]\nbackend-dir = \"{}\"\nqemu-binary = \"{}\"\n\
             stop-grace-secs = 5\ndrain-timeout-secs = 30\n\n[sensors]\nenabled = false\n\n\
             [shipper]\nretry-initial-ms = 200\nretry-max-ms = 2000\nrequest-timeout-secs = 5\n\
             commit-interval-ms = 100\n",
            stack.registry.url(),
            data.display(),
            images.display(),
            backend_dir().display(),
            qemu.display(),
        ),
    )
    .unwrap();
    let bin = common::agent_bin();
    let log = work.path().join("agent.log");
    let rt = rt();
    let qid = "vm-restart-q";
    let mid = "vm-restart-m";

    let mut first = Serve::start(&bin, &cfg, grpc, &log);
    rt.block_on(async {
        let mut c = first.client().await;
        let mut qs = pb::InstanceSpec {
            image: "demo-linux".into(),
            driver: "qemu".into(),
            accel: "tcg".into(),
            ..Default::default()
        };
        qs.network = Some(pb::NetworkSpec {
            netns: ns.name().to_string(),
            tap_prefix: "vmrrst".into(),
        });
        let q = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: qid.into(),
                spec: Some(qs),
            })
            .await
            .unwrap_or_else(|s| panic!("launch demo-linux: {s:?}\n{}", first.log_text()))
            .into_inner();
        assert_eq!(q.state, pb::InstanceState::Running as i32, "{q:?}");
        let m = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: mid.into(),
                spec: Some(pb::InstanceSpec {
                    image: "test-guest".into(),
                    driver: "microvm".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|s| panic!("launch the microVM: {s:?}\n{}", first.log_text()))
            .into_inner();
        assert_eq!(m.state, pb::InstanceState::Running as i32, "{m:?}");
    });
    ns.wait_for_link("vmrrst0", Duration::from_secs(60))
        .expect("the TAP appears in the namespace");
    ns.ip(&["link", "set", "dev", "vmrrst0", "address", PEER_MAC])
        .unwrap();
    ns.configure("vmrrst0", PEER_CIDR).unwrap();
    for i in 0..3 {
        let r = request(&ns, &format!("PUT key{i} value{i}")).unwrap();
        assert!(r.starts_with("OK "), "PUT key{i}: {r:?}");
    }

    // Mid-stream: the peer keeps sending, the guest keeps writing.
    let traffic = Traffic::start(ns.path(), 100);
    std::thread::sleep(Duration::from_secs(3));
    let q_procs = recorded_processes(&data, qid);
    let m_procs = recorded_processes(&data, mid);
    assert_eq!(q_procs.len(), 3, "guest, vda, net0: {q_procs:?}");
    assert_eq!(m_procs.len(), 1, "vda: {m_procs:?}");
    let first_pid = first.pid();
    let killed = Instant::now();
    first.kill9();
    eprintln!("killed the agent (pid {first_pid}) with SIGKILL");

    // The outage: no agent runs.
    std::thread::sleep(Duration::from_secs(10));
    let outage_end = Instant::now();
    for (what, pid, st) in &q_procs {
        assert_eq!(
            start_time(*pid),
            Some(*st),
            "{qid}'s {what} (pid {pid}) did not survive the agent's kill"
        );
    }
    let during = traffic.answered_between(killed, outage_end);
    assert!(
        during >= 5,
        "the guest answered only {during} requests during the 10 s outage"
    );
    let r = request(&ns, "PUT outage yes").unwrap();
    assert!(r.starts_with("OK "), "a request while no agent runs: {r:?}");
    eprintln!(
        "while no agent ran: QEMU and both backends kept running, {during} requests answered"
    );

    // The restart, with the same configuration.
    let second = Serve::start(&bin, &cfg, grpc, &log);
    let (q_after, m_after) = rt.block_on(async {
        let q = wait_state(
            &second,
            qid,
            pb::InstanceState::Running,
            Duration::from_secs(30),
        )
        .await;
        let m = wait_state(
            &second,
            mid,
            pb::InstanceState::Crashed,
            Duration::from_secs(90),
        )
        .await;
        let mut c = second.client().await;
        let list = c
            .list_instances(pb::ListInstancesRequest {})
            .await
            .unwrap()
            .into_inner();
        let states: Vec<(String, i32)> = list
            .instances
            .iter()
            .map(|i| (i.instance_id.clone(), i.state))
            .collect();
        assert!(
            states.contains(&(qid.to_string(), pb::InstanceState::Running as i32)),
            "{states:?}"
        );
        (q, m)
    });
    eprintln!(
        "after the restart: {qid}: {}; {mid}: {}",
        q_after.detail, m_after.detail
    );
    assert!(q_after.detail.contains("re-attached"), "{}", q_after.detail);
    assert!(
        m_after.detail.contains("ended with it"),
        "{}",
        m_after.detail
    );
    let text = second.log_text();
    assert!(
        text.contains("re-attached"),
        "no re-attach in the log:\n{text}"
    );
    // The same processes, now recorded under the new agent.
    let rec = record(&data, qid).expect("the record of the re-attached instance");
    assert_eq!(
        rec["agent"]["pid"].as_u64(),
        Some(u64::from(second.pid())),
        "{rec}"
    );
    for (what, pid, st) in &q_procs {
        assert_eq!(
            start_time(*pid),
            Some(*st),
            "{what} changed across the restart"
        );
    }
    assert!(
        q_after
            .devices
            .iter()
            .any(|d| d.name == "net0" && d.backend.as_ref().is_some_and(|b| b.pid == q_procs[2].1)),
        "net0's backend is the adopted one: {q_after:#?}"
    );
    // The microVM's orphaned backend was stopped and its record removed.
    for (what, pid, st) in &m_procs {
        assert!(
            wait_gone(*pid, *st, Duration::from_secs(30)),
            "{mid}'s {what} (pid {pid}) still runs"
        );
    }
    assert!(
        record(&data, mid).is_none(),
        "the crashed instance's record stays"
    );

    // More traffic, then the stop.
    std::thread::sleep(Duration::from_secs(3));
    let sent = traffic.stop();
    for i in 0..3 {
        let r = request(&ns, &format!("PUT after{i} v{i}")).unwrap();
        assert!(r.starts_with("OK "), "PUT after{i}: {r:?}");
    }
    rt.block_on(async {
        let mut c = second.client().await;
        let s = c
            .stop_instance(pb::StopInstanceRequest {
                instance_id: qid.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("stop {qid}: {e:?}\n{}", second.log_text()))
            .into_inner();
        assert_eq!(s.state, pb::InstanceState::Stopped as i32, "{s:#?}");
    });
    for (what, pid, st) in &q_procs {
        assert!(
            wait_gone(*pid, *st, Duration::from_secs(30)),
            "{qid}'s {what} (pid {pid}) still runs after the stop"
        );
    }
    assert!(
        record(&data, qid).is_none(),
        "the stopped instance's record stays"
    );
    let mut second = second;
    let st = second.terminate();
    assert!(
        st.is_some_and(|s| s.success()),
        "the restarted agent did not exit cleanly ({st:?}):\n{}",
        second.log_text()
    );

    // Every seq exactly once, gap-free, in order per topic.
    let got = all_records(&bootstrap);
    for id in [qid, mid] {
        let max = got
            .iter()
            .filter(|g| g.key == id)
            .map(|g| g.event.seq)
            .max()
            .unwrap_or(0);
        assert!(max > 0, "no records of {id}");
        let per_topic = check_exactly_once(&got, id, max);
        eprintln!("{id}: seqs 1..={max} exactly once: {per_topic:?}");
    }
    let q_frames = got
        .iter()
        .filter(|g| g.key == qid && g.topic == vmr_proto::topics::NET)
        .count();
    let q_writes = got
        .iter()
        .filter(|g| g.key == qid)
        .filter(|g| {
            matches!(&g.event.payload, Some(pb::event::Payload::Block(b)) if b.op == pb::BlockOp::Write as i32)
        })
        .count();
    assert!(
        q_frames > 0 && q_writes > 0,
        "frames {q_frames}, writes {q_writes}"
    );
    // The outage's traffic was shipped by the restarted agent: the frame
    // carrying "PUT outage yes" is in Kafka.
    let outage_frame = got.iter().any(|g| {
        g.key == qid
            && matches!(&g.event.payload, Some(pb::event::Payload::Net(n))
                if n.frame.windows(14).any(|w| w == b"PUT outage yes"))
    });
    assert!(
        outage_frame,
        "the request sent while no agent ran is not in vmr.net.v1"
    );
    let m_crash = got.iter().any(|g| {
        g.key == mid
            && matches!(&g.event.payload, Some(pb::event::Payload::Lifecycle(l))
                if l.kind == pb::LifecycleKind::Crash as i32 && l.detail.contains("ended with it"))
    });
    assert!(
        m_crash,
        "no CRASH lifecycle event of {mid} in vmr.lifecycle.v1"
    );
    eprintln!(
        "{sent} requests during the run; {q_frames} frames and {q_writes} disk writes of {qid} in Kafka"
    );
    drop(ns);
}
