//! The demo-linux crash reproduced through the replayer service, on QEMU
//! (TCG) with real vhost-tap backends, a real broker and real network
//! namespaces.
//!
//! Recording: demo-linux (service vmr-kv-1 on 192.168.77.2:7000) runs
//! under the capture agent as a `RecordedInstance` (QEMU, TCG; capture-mode
//! `vhost-tap-blk` / `vhost-tap-net` supervised by the agent, the disk on a
//! chain of copy-on-write layers, the captures spooled and shipped to the
//! broker by the agent's shippers). A peer in the original's namespace
//! sends ordinary `PUT`s; snapshots A and B are the agent's consistent
//! cuts, taken on demand through its snapshot engine
//! (`SnapshotEngine::take_and_wait`, [`take_snapshot`]: pause, checkpoint
//! of both backends, the driver's snapshot, resume, the frozen disk layers
//! packed and uploaded with the manifest to a `file://` store), not by the
//! periodic schedule. Then the packet of death (a key over 200 bytes) goes
//! over a TCP connection opened after B, and the original panics. The
//! recorded stream is read back from the broker. The operator reboots the
//! original (on a flat copy of its disk chain), which keeps serving through
//! the rest of the test.
//!
//! Then, through the `replayer` binary's gRPC API:
//! 1. a clone of the latest snapshot at 1x panics the same way; Watch
//!    reports the crash after the same recorded `seq` as the original's
//!    last, the clone's disk equals the original's, and meanwhile packet
//!    sockets on the host and in the original's namespace see none of the
//!    clone's frames while the original answers requests;
//! 2. two clones at once from the staggered snapshots, at 10x (from A) and
//!    as fast as possible (from B), both crash after the same `seq`;
//! 3. controls: step, resume, pause, run to a `seq`, a second start,
//!    switching the clone to snapshot B mid-replay, and its crash after;
//! 4. a filter that excludes the packet of death's connection (by its
//!    port): no crash, and the report says the stream was filtered; with a
//!    gdb stub, Debian's gdb attaches mid-replay (the replay pauses while
//!    it holds the guest), reads registers, sets a breakpoint, continues to
//!    it and detaches; then the clone goes live and the test reaches its
//!    service from inside the clone's namespace;
//! 5. two runs with seeded frame drops, a block I/O error at the first
//!    recorded write and a synthetic frame inject the same faults.
//!
//! Heavy: needs qemu-system-x86_64, gdb, python3, root (network
//! namespaces, TAP devices), the demo-linux image (`guest/linux/build.sh`),
//! the Tansu broker, the workspace binaries (`cargo build --workspace
//! --bins`). Run with
//! `cargo test -p replayer --test demo_linux`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::{Recording, PARTITIONS};
use replayer::source::{EventSource, SourceConfig, SourceItem};
use tonic::Request;
use vmr_hypervisor::image::MachineImage;
use vmr_hypervisor::{Accel, Driver, Instance, InstanceSpec};
use vmr_proto::config::Endpoints;
use vmr_proto::pb::replayer_client::ReplayerClient;
use vmr_proto::InstanceId;
use vmr_proto::{pb, topics::partition_for, Direction, Event, LifecycleKind, Payload};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};

const INSTANCE: &str = "kv-demo-1";
const TOKEN: &str = "token-of-tenant-demo-0001";
/// Bound on waits for the guest (TCG on a shared 2-core machine).
const GUEST_WAIT: Duration = Duration::from_secs(240);
/// Bound on one replay from a snapshot to its end.
const REPLAY_WAIT: Duration = Duration::from_secs(300);
const TAP: &str = "vmrkv0";
const PEER_MAC: &str = "02:00:00:77:00:01";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];
const SERVICE: &str = "192.168.77.2:7000";

type Client = ReplayerClient<tonic::transport::Channel>;

fn require_prerequisites() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, TAP devices)"
    );
    for (p, hint) in [
        ("/usr/bin/gdb", "apt-get install gdb"),
        ("/usr/bin/python3", "apt-get install python3"),
    ] {
        assert!(Path::new(p).is_file(), "{p} is missing: {hint}");
    }
    vmr_testkit::qemu::qemu_binary().unwrap_or_else(|e| panic!("{e}"));
}

fn demo_image() -> MachineImage {
    let dir = vmr_testkit::guest::demo_linux_dir().unwrap_or_else(|e| panic!("{e}"));
    MachineImage::load(&dir).unwrap_or_else(|e| panic!("{e}"))
}

fn bin(name: &str) -> PathBuf {
    workspace_bin(name).unwrap_or_else(|e| {
        panic!("{e} (build it with `cargo build -p vhost-tap -p schema-registry --bins`)")
    })
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", p.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn enter_netns(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: setns(2) on a valid namespace fd held open by `f`; it changes
    // only this (test-owned) thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One request line to the service from inside the namespace at `ns`
/// (`/run/netns/<name>`); the reply line and the local port used.
fn kv(ns: &Path, line: &str) -> Result<(String, u16), String> {
    let ns = ns.to_path_buf();
    let line = line.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        let addr: SocketAddr = SERVICE.parse().expect("a valid address");
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        let port = s.local_addr().map_err(|e| e.to_string())?.port();
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        (&s).write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        let _ = BufReader::new(&s).read_line(&mut reply);
        Ok((reply.trim_end().to_string(), port))
    })
    .join()
    .map_err(|_| "request thread panicked".to_string())?
}

fn put(ns: &Path, key: &str, value: &str) -> u16 {
    let (r, port) = kv(ns, &format!("PUT {key} {value}")).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.starts_with("OK "), "PUT {key}: {r:?}");
    port
}

/// A capture-mode backend of the original.
fn backend(dir: &Path, name: &str, args: &[&str], capture: Option<&Path>) -> ChildGuard {
    let sock = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let mut cmd = Command::new(bin(name));
    cmd.arg("--socket").arg(&sock).args(args);
    cmd.args(["--instance-id", INSTANCE, "--seq-lease", "1"]);
    if let Some(c) = capture {
        cmd.arg("--capture")
            .arg(c)
            .arg("--seq-file")
            .arg(dir.join("orig.seq"));
    }
    cmd.stdout(Stdio::null()).stderr(log);
    let g = ChildGuard::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        &format!("{}", sock.display()),
        Duration::from_secs(30),
        || sock.exists().then_some(()),
    );
    g
}

/// The original's devices: a disk and a TAP in its namespace.
struct Devices {
    _blk: ChildGuard,
    _net: ChildGuard,
}

fn start_devices(dir: &Path, disk: &Path, ns: &NetNs, capture: bool) -> Devices {
    std::fs::create_dir_all(dir).expect("dir");
    let blk_cap = dir.join("blk.events");
    let net_cap = dir.join("net.events");
    let blk = backend(
        dir,
        "vhost-tap-blk",
        &[
            "--image",
            &disk.display().to_string(),
            "--device",
            "vda",
            "--mode",
            "capture",
        ],
        capture.then_some(blk_cap.as_path()),
    );
    let net = backend(
        dir,
        "vhost-tap-net",
        &[
            "--tap",
            TAP,
            "--netns",
            ns.name(),
            "--device",
            "net0",
            "--mode",
            "capture",
        ],
        capture.then_some(net_cap.as_path()),
    );
    Devices {
        _blk: blk,
        _net: net,
    }
}

fn launch(image: &MachineImage, dir: &Path, ns: &NetNs) -> Box<dyn Instance> {
    let work = dir.join("vm");
    std::fs::create_dir_all(&work).expect("work dir");
    let spec: InstanceSpec = image
        .instance_spec("qemu", INSTANCE, &work, |d| match d {
            "vda" => dir.join("vhost-tap-blk.sock"),
            _ => dir.join("vhost-tap-net.sock"),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let inst = vmr_hypervisor::qemu::QemuDriver
        .launch(&spec)
        .unwrap_or_else(|e| panic!("launching demo-linux: {e}"));
    let console = inst.query().expect("query").console_file;
    wait_for("VMR-SERVICE-READY on the console", GUEST_WAIT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("VMR-SERVICE-READY")
            .then_some(())
    });
    ns.wait_for_link(TAP, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = ns.ip(&["link", "set", "dev", TAP, "address", PEER_MAC]);
    let _ = ns.configure(TAP, "192.168.77.1/24");
    inst
}

/// A cut of the original.
struct Cut {
    id: String,
    seq_at_cut: u64,
    /// The names of the snapshot's disk layers of `vda`, bottom first.
    layers: Vec<String>,
}

/// The original, launched the way the capture agent runs an instance:
/// capture-mode backends spooling to its shippers, the disk on a chain of
/// copy-on-write layers, the NIC's TAP in the peer's namespace.
fn launch_recorded(rec: &Recording, root: &Path, ns: &NetNs) -> (Arc<RecordedInstance>, Endpoints) {
    let image_dir = vmr_testkit::guest::demo_linux_dir().unwrap_or_else(|e| panic!("{e}"));
    let cfg_path = root.join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[endpoints]\nbootstrap-servers = \"{}\"\nregistry-url = \"{}\"\nevent-partitions = {PARTITIONS}\n\n\
             [shipper]\nretry-initial-ms = 200\nretry-max-ms = 2000\nrequest-timeout-secs = 10\ncommit-interval-ms = 100\n",
            rec.bootstrap(),
            rec.registry.url()
        ),
    )
    .expect("agent config");
    let cfg = AgentConfig::load(&cfg_path).unwrap_or_else(|e| panic!("agent config: {e}"));
    let mut opts = LaunchOptions::new(
        &image_dir,
        InstanceId::new(INSTANCE).expect("a valid instance id"),
        "qemu",
        root.join("data"),
    );
    opts.netns = Some(ns.name().to_string());
    opts.tap_prefix = TAP.trim_end_matches('0').to_string();
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.accel = Accel::Tcg;
    opts.qemu_binary = Some(vmr_testkit::qemu::qemu_binary().unwrap_or_else(|e| panic!("{e}")));
    opts.supervisor.bin_dir = bin("vhost-tap-blk").parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(30);
    let inst = Arc::new(RecordedInstance::launch(opts).unwrap_or_else(|e| {
        panic!(
            "launching demo-linux: {}",
            capture_agent::shipper::display_chain(&e)
        )
    }));
    let guest = inst.guest().expect("the original's guest");
    let console = guest.query().expect("query").console_file;
    wait_for("VMR-SERVICE-READY on the console", GUEST_WAIT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("VMR-SERVICE-READY")
            .then_some(())
    });
    ns.wait_for_link(TAP, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = ns.ip(&["link", "set", "dev", TAP, "address", PEER_MAC]);
    let _ = ns.configure(TAP, "192.168.77.1/24");
    (inst, cfg.endpoints)
}

/// The capture agent's consistent cut, on demand through its snapshot
/// engine: pause, checkpoint of both backends (the disk's top layer
/// frozen), the driver's snapshot, resume, then the frozen layers packed
/// and uploaded with the manifest (the `seq` at the cut and the offsets of
/// the shipped stream).
fn take_snapshot(engine: &SnapshotEngine, inst: &Arc<RecordedInstance>, name: &str) -> Cut {
    let op = engine
        .take_and_wait(
            inst.clone(),
            SnapshotRequest {
                incremental: false,
                pin: false,
            },
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("snapshot {name}: {e}"));
    assert_eq!(
        op.state,
        OperationState::Succeeded,
        "snapshot {name}: {:?}",
        op.error
    );
    let m = engine
        .manifests(INSTANCE)
        .unwrap_or_else(|e| panic!("manifests: {e}"))
        .pop()
        .expect("a manifest in the store");
    let mut layers: Vec<(u32, String)> = m
        .disk_layers()
        .iter()
        .filter_map(|o| {
            o.disk
                .as_ref()
                .filter(|d| d.device == "vda")
                .map(|d| (d.position, o.name.clone()))
        })
        .collect();
    layers.sort();
    eprintln!(
        "snapshot {name}: {} at seq {}, pause {} us",
        m.snapshot_id, m.seq_at_cut, m.pause_us
    );
    Cut {
        id: m.snapshot_id.clone(),
        seq_at_cut: m.seq_at_cut,
        layers: layers.into_iter().map(|l| l.1).collect(),
    }
}

/// What the recording left.
struct Recorded {
    store_url: String,
    snap_a: String,
    snap_b: String,
    /// The names of snapshot B's disk layers, bottom first.
    layers_b: Vec<String>,
    cut_a: u64,
    cut_b: u64,
    /// The original's last recorded device `seq` (it panicked after it).
    last_seq: u64,
    /// The recorded frame that carried the packet of death.
    poison_seq: u64,
    /// The client port of the packet of death's connection.
    death_port: u16,
    /// Client ports of the connections after snapshot B.
    ports_after_b: Vec<u16>,
    /// sha256 of the original's disk after its panic.
    disk_sha: String,
    /// The first recorded block write after B.
    first_write_after_b: u64,
}

/// Every event of the instance in the broker, by `seq`.
fn shipped_events(rec: &Recording) -> Vec<Event> {
    let part = partition_for(INSTANCE, PARTITIONS);
    let cfg = SourceConfig {
        bootstrap_servers: rec.bootstrap(),
        instance: InstanceId::new(INSTANCE).expect("a valid instance id"),
        seq_at_cut: 0,
        start: vmr_proto::topics::EVENT_TOPICS
            .iter()
            .map(|t| vmr_proto::TopicOffset {
                topic: t.to_string(),
                partition: part,
                next_offset: 0,
            })
            .collect(),
        kinds: replayer::KindSet::all(),
        until_seq: None,
        topics: Default::default(),
        window: Default::default(),
        fetch_timeout: Duration::from_secs(10),
        security: Default::default(),
    };
    EventSource::open(cfg)
        .unwrap_or_else(|e| panic!("read the recorded stream: {e}"))
        .filter_map(
            |i| match i.unwrap_or_else(|e| panic!("read the recorded stream: {e}")) {
                SourceItem::Event(e) => Some(e.event),
                _ => None,
            },
        )
        .collect()
}

/// The disk of the original (its image under its layer chain), written out
/// flat to `out`; its sha256.
fn flatten_disk(image: &Path, top: &Path, out: &Path) -> String {
    let d = vhost_tap::blk::Disk::open_chain(image, &[], Some(top), true)
        .unwrap_or_else(|e| panic!("the original's disk chain: {e}"));
    flatten(&d, out)
}

fn flatten(d: &vhost_tap::blk::Disk, out: &Path) -> String {
    let f = std::fs::File::create(out).expect("flat disk");
    f.set_len(d.size()).expect("flat disk size");
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < d.size() {
        let n = (d.size() - at).min(buf.len() as u64) as usize;
        d.read(at, &mut buf[..n]).expect("read the disk chain");
        f.write_all_at(&buf[..n], at).expect("write the flat disk");
        at += n as u64;
    }
    drop(f);
    sha256_file(out)
}

fn record(rec: &Recording, root: &Path, ns: &NetNs) -> (Recorded, PathBuf) {
    let (orig, endpoints) = launch_recorded(rec, root, ns);
    let store_dir = root.join("store");
    let engine = SnapshotEngine::new(EngineConfig::local(
        &store_dir,
        &root.join("engine"),
        endpoints,
    ))
    .unwrap_or_else(|e| panic!("the snapshot engine: {e}"));
    let events = orig.guest().expect("the original's guest").subscribe();
    let nsp = ns.path();
    put(&nsp, "a0", "v0");
    put(&nsp, "a1", "v1");
    let a = take_snapshot(&engine, &orig, "A");
    std::thread::sleep(Duration::from_millis(1500));
    put(&nsp, "b0", "v2");
    std::thread::sleep(Duration::from_millis(1500));
    put(&nsp, "b1", "v3");
    let b = take_snapshot(&engine, &orig, "B");
    std::thread::sleep(Duration::from_millis(1500));
    let c0 = put(&nsp, "c0", "v4");
    std::thread::sleep(Duration::from_millis(1000));
    // The packet of death, over a new connection.
    let death = {
        let nsp = nsp.clone();
        std::thread::spawn(move || kv(&nsp, &format!("PUT {} boom", "k".repeat(300))))
    };
    events
        .wait_for(GUEST_WAIT, |e| e.kind() == LifecycleKind::Crash)
        .unwrap_or_else(|gone| panic!("the original did not panic (events gone: {gone})"));
    let (reply, death_port) = death
        .join()
        .expect("death thread")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !reply.starts_with("OK"),
        "the original answered the packet of death: {reply:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    // Stops the guest and its backends, and ships what is left.
    let report = orig.shutdown();
    eprintln!("the original stopped: {:?}", report.exit);
    let data = root.join("data").join(INSTANCE);
    let disk = root.join("orig.raw");
    let disk_sha = flatten_disk(
        &data.join("vda.img"),
        &data.join("vda.layers").join("base"),
        &disk,
    );

    let all = shipped_events(rec);
    let device_events: Vec<&Event> = all
        .iter()
        .filter(|e| matches!(e.payload, Payload::Block(_) | Payload::Net(_)))
        .collect();
    let last_seq = device_events.last().expect("recorded events").seq;
    let poison_seq = all
        .iter()
        .find_map(|e| match &e.payload {
            Payload::Net(n)
                if n.direction == Direction::Rx && n.frame.windows(20).any(|w| w == [b'k'; 20]) =>
            {
                Some(e.seq)
            }
            _ => None,
        })
        .expect("the packet of death in the capture");
    let first_write_after_b = all
        .iter()
        .find_map(|e| match &e.payload {
            Payload::Block(x) if e.seq > b.seq_at_cut && x.op == vmr_proto::BlockOp::Write => {
                Some(e.seq)
            }
            _ => None,
        })
        .expect("a block write after B");
    assert!(a.seq_at_cut < b.seq_at_cut && b.seq_at_cut < poison_seq && poison_seq <= last_seq);
    eprintln!(
        "recorded: cut A at seq {}, cut B at seq {}, packet of death seq {poison_seq} (port {death_port}), last seq {last_seq}",
        a.seq_at_cut, b.seq_at_cut
    );
    (
        Recorded {
            store_url: format!("file://{}", store_dir.display()),
            snap_a: a.id,
            snap_b: b.id,
            layers_b: b.layers,
            cut_a: a.seq_at_cut,
            cut_b: b.seq_at_cut,
            last_seq,
            poison_seq,
            death_port,
            ports_after_b: vec![c0, death_port],
            disk_sha,
            first_write_after_b,
        },
        disk,
    )
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    r
}

fn create(snapshot: &str) -> pb::CreateCloneRequest {
    pb::CreateCloneRequest {
        instance_id: INSTANCE.into(),
        snapshot: Some(pb::SnapshotSelector {
            pick: Some(if snapshot == "latest" {
                pb::snapshot_selector::Pick::Latest(true)
            } else {
                pb::snapshot_selector::Pick::SnapshotId(snapshot.into())
            }),
        }),
        ..Default::default()
    }
}

fn speed(factor: Option<f64>) -> Option<pb::Speed> {
    Some(pb::Speed {
        speed: Some(match factor {
            Some(f) => pb::speed::Speed::Factor(f),
            None => pb::speed::Speed::AsFastAsPossible(true),
        }),
    })
}

async fn get(c: &mut Client, id: &str) -> pb::Clone {
    c.get_clone(authed(pb::GetCloneRequest {
        clone_id: id.into(),
    }))
    .await
    .expect("get clone")
    .into_inner()
}

async fn control(
    c: &mut Client,
    id: &str,
    action: pb::ControlAction,
    f: impl FnOnce(&mut pb::ControlRequest),
) -> Result<pb::Clone, tonic::Status> {
    let mut r = pb::ControlRequest {
        clone_id: id.into(),
        action: action as i32,
        ..Default::default()
    };
    f(&mut r);
    c.control(authed(r)).await.map(|r| r.into_inner())
}

async fn wait_state(
    c: &mut Client,
    id: &str,
    what: &str,
    limit: Duration,
    ok: impl Fn(&pb::Clone) -> bool,
) -> pb::Clone {
    let start = Instant::now();
    loop {
        let s = get(c, id).await;
        if ok(&s) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "clone {id}: timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Watches a clone until its stream ends; the crash lifecycle message (if
/// any) and the last state.
async fn watch_to_end(c: &mut Client, id: &str) -> (Option<pb::CloneLifecycle>, pb::Clone) {
    let mut w = c
        .watch(authed(pb::WatchRequest {
            clone_id: id.into(),
        }))
        .await
        .expect("watch")
        .into_inner();
    let deadline = Instant::now() + REPLAY_WAIT;
    let (mut crash, mut last) = (None, None);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, w.message())
            .await
            .unwrap_or_else(|_| {
                panic!("clone {id}: the watch did not end within {REPLAY_WAIT:?}: {last:?}")
            })
            .expect("watch stream");
        let Some(m) = m else { break };
        if let Some(l) = &m.lifecycle {
            if l.lifecycle.as_ref().map(|x| x.kind) == Some(pb::LifecycleKind::Crash as i32) {
                crash = Some(l.clone());
            }
        }
        if let Some(cl) = m.clone {
            last = Some(cl);
        }
    }
    (crash, last.expect("progress messages"))
}

async fn divergences(c: &mut Client, id: &str) -> pb::GetDivergencesResponse {
    c.get_divergences(authed(pb::GetDivergencesRequest {
        clone_id: id.into(),
    }))
    .await
    .expect("divergences")
    .into_inner()
}

async fn delete(c: &mut Client, id: &str) {
    c.delete_clone(authed(pb::DeleteCloneRequest {
        clone_id: id.into(),
    }))
    .await
    .expect("delete");
}

fn assert_same_crash(
    name: &str,
    crash: Option<pb::CloneLifecycle>,
    last: &pb::Clone,
    r: &Recorded,
) {
    let crash = crash.unwrap_or_else(|| panic!("{name}: Watch reported no crash: {last:?}"));
    assert!(
        crash.last_seq_applied >= r.poison_seq,
        "{name}: crashed before the packet of death was applied: {crash:?}"
    );
    assert_eq!(
        crash.last_seq_applied, r.last_seq,
        "{name}: the clone panicked after the same recorded seq as the original"
    );
    assert_eq!(
        last.state,
        pb::CloneState::Crashed as i32,
        "{name}: {last:?}"
    );
    assert!(last.detail.contains("Crash"), "{name}: {last:?}");
}

fn no_block_divergence(name: &str, d: &pb::GetDivergencesResponse) {
    let block: Vec<_> = d
        .divergences
        .iter()
        .filter(|x| {
            x.kind == pb::DivergenceKind::BlockWriteData as i32
                || x.kind == pb::DivergenceKind::BlockWriteMissing as i32
        })
        .collect();
    assert!(
        block.is_empty(),
        "{name}: the clone's writes differ: {block:?}"
    );
}

/// The clone's disk as its block backend serves it: the snapshot's blank
/// base, its packed layers (bottom first) and the clone's private overlay
/// on top.
fn clone_disk_sha(work: &Path, clone: &str, layers: &[String], out: &Path) -> String {
    let base = work.join(clone);
    let overlay = base.join("run-0").join("vda.overlay");
    let snap = base.join("snapshot-0");
    let image = walk(&snap)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "vda.base.img"))
        .expect("the clone's base disk");
    let chain: Vec<PathBuf> = layers
        .iter()
        .map(|n| {
            walk(&snap)
                .into_iter()
                .find(|p| p.file_name().is_some_and(|f| f.to_string_lossy() == *n))
                .unwrap_or_else(|| panic!("the clone's disk layer {n}"))
        })
        .collect();
    let d = vhost_tap::blk::Disk::open_chain(&image, &chain, Some(&overlay), true)
        .unwrap_or_else(|e| panic!("the clone's disk chain: {e}"));
    let sha = flatten(&d, out);
    let _ = std::fs::remove_file(out);
    sha
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A packet socket (all interfaces of a namespace) that writes every frame
/// from or to the guest's MAC, as hex, to a file, until stopped.
struct Sniffer {
    child: ChildGuard,
    out: PathBuf,
}

const SNIFFER: &str = r#"
import socket, sys, signal
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.settimeout(0.2)
mac = bytes.fromhex(sys.argv[2])
out = open(sys.argv[1], "w", buffering=1)
out.write("ready\n")
while True:
    try:
        f, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if f[6:12] == mac or f[0:6] == mac:
        out.write(addr[0] + " " + f.hex() + "\n")
"#;

impl Sniffer {
    fn start(name: &str, ns: Option<&NetNs>, out: PathBuf) -> Sniffer {
        let mut cmd = match ns {
            Some(ns) => ns.command("python3"),
            None => Command::new("python3"),
        };
        let mac: String = GUEST_MAC.iter().map(|b| format!("{b:02x}")).collect();
        cmd.args(["-c", SNIFFER]).arg(&out).arg(mac);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = ChildGuard::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("{e}"));
        wait_for("the packet socket", Duration::from_secs(30), || {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .starts_with("ready")
                .then_some(())
        });
        Sniffer { child, out }
    }

    /// Stops it; the TCP (source port, destination port, payload bytes) of
    /// each frame seen.
    fn stop(mut self) -> Vec<(u16, u16, usize)> {
        self.child.stop(Duration::from_secs(5));
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let hex = l.split_whitespace().nth(1)?;
                let f: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
                    .collect();
                // IPv4 over Ethernet, TCP.
                if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
                    return None;
                }
                let ihl = ((f[14] & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([f[16], f[17]]) as usize;
                let t = 14 + ihl;
                if f.len() < t + 20 {
                    return None;
                }
                let doff = ((f[t + 12] >> 4) as usize) * 4;
                Some((
                    u16::from_be_bytes([f[t], f[t + 1]]),
                    u16::from_be_bytes([f[t + 2], f[t + 3]]),
                    total.saturating_sub(ihl + doff),
                ))
            })
            .collect()
    }
}

/// The `faults` counter of a block backend's metrics (control socket).
fn blk_faults(ctl: &Path) -> u64 {
    let Ok(s) = std::os::unix::net::UnixStream::connect(ctl) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if (&s).write_all(b"{\"cmd\":\"metrics\"}\n").is_err() {
        return 0;
    }
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line.split("\"faults\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned()
}

#[test]
fn demo_linux_crash_is_reproduced_controlled_filtered_debugged_and_faulted() {
    require_prerequisites();
    let image = demo_image();
    let tmp = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let root = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rec = Recording::start();
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        let _ = ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")])
            .status();
    }
    let (r, disk) = record(&rec, root, &ns);

    // The operator reboots the original; it serves again.
    let rebooted_dir = root.join("rebooted");
    let _rebooted_devices = start_devices(&rebooted_dir, &disk, &ns, false);
    let rebooted = launch(&image, &rebooted_dir, &ns);
    // Its record counter lives in guest RAM: it starts again at 0.
    let (got, _) = kv(&ns.path(), "PUT after-reboot x").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, "OK 0", "the rebooted original serves");

    // The replayer.
    let work = root.join("replayer-work");
    let nic = &image.nics[0];
    let config = format!(
        r#"
work_dir = "{work}"
max_clones = 4
[kafka]
bootstrap_servers = "{bootstrap}"
[store]
url = "{store}"
[backends]
blk = "{blk}"
net = "{net}"
[[images]]
name = "{name}"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"
memory_mib = {mem}
vcpus = {vcpus}
qemu_devices = {devices:?}
service_port = 7000
nics = [{{ name = "net0", mac = "{mac}", ip = "192.168.77.2/24", peer = "192.168.77.1" }}]
[[tokens]]
token = "{TOKEN}"
tenant = "demo"
[[tenants]]
name = "demo"
instance_prefix = "kv-"
"#,
        work = work.display(),
        bootstrap = rec.bootstrap(),
        store = r.store_url,
        blk = bin("vhost-tap-blk").display(),
        net = bin("vhost-tap-net").display(),
        name = image.name,
        kernel = image.kernel.display(),
        initrd = image
            .initrd
            .as_ref()
            .expect("demo-linux has an initrd")
            .display(),
        cmdline = image.cmdline,
        mem = image.memory_mib,
        vcpus = image.vcpus,
        devices = image.qemu_devices,
        mac = nic.mac,
    );
    let config_path = root.join("replayer.toml");
    std::fs::write(&config_path, config).expect("write config");
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(root.join("replayer.log")).expect("log");
    let mut server = ChildGuard::spawn(
        "replayer",
        Command::new(env!("CARGO_BIN_EXE_replayer"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr])
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{addr}");
    let mut c: Client = rt.block_on(async {
        let start = Instant::now();
        loop {
            match tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
            {
                Ok(ch) => break ReplayerClient::new(ch),
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "the replayer never listened: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    rt.block_on(async {
        // 1. The latest snapshot at 1x: the same panic, the same disk; the
        //    host sees none of the clone's frames; the original serves.
        let host_sniffer = Sniffer::start("sniffer host", None, root.join("host.frames"));
        let orig_sniffer = Sniffer::start("sniffer original", Some(&ns), root.join("orig-ns.frames"));
        let mut req = create("latest");
        req.speed = speed(Some(1.0));
        let t0 = Instant::now();
        let one = c.create_clone(authed(req)).await.expect("clone at 1x").into_inner();
        eprintln!("1x clone {}: request to replaying in {:?}", one.clone_id, t0.elapsed());
        assert_eq!((one.snapshot_id.as_str(), one.seq_at_cut), (r.snap_b.as_str(), r.cut_b), "{one:?}");
        let access = one.access.clone().expect("access");
        assert_eq!(access.netns, format!("vmr-{}", one.clone_id));
        assert_eq!(access.guest_ip, "192.168.77.2");
        let (served, orig_port) = kv(&ns.path(), "GET 0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(served, "VAL 0 after-reboot x", "the original keeps serving while the clone replays");
        let (crash, last) = watch_to_end(&mut c, &one.clone_id).await;
        assert_same_crash("1x", crash, &last, &r);
        let d = divergences(&mut c, &one.clone_id).await;
        no_block_divergence("1x", &d);
        let clone_sha = clone_disk_sha(&work, &one.clone_id, &r.layers_b, &root.join("clone-disk.raw"));
        assert_eq!(clone_sha, r.disk_sha, "the clone's disk before the panic matches the original's");
        let host = host_sniffer.stop();
        let in_orig = orig_sniffer.stop();
        // The clone's answers on the recorded connections: data from port
        // 7000 to their client ports. (The original's namespace may still
        // carry resets or retransmissions of those connections between its
        // client sockets and the rebooted original, which have no data.)
        let clone_flows =
            |f: &&(u16, u16, usize)| f.0 == 7000 && r.ports_after_b.contains(&f.1) && f.2 > 0;
        assert!(host.iter().filter(clone_flows).count() == 0, "host saw the clone's frames: {host:?}");
        assert!(in_orig.iter().filter(clone_flows).count() == 0, "the original's network saw the clone's frames: {in_orig:?}");
        assert!(
            in_orig.iter().any(|f| f.0 == 7000 && f.1 == orig_port && f.2 > 0),
            "the packet socket saw the original's answer (so it captures): {in_orig:?}"
        );
        // The clone did send on those connections, inside its namespace.
        let clone_tx = replayer::clone::read_capture(&work.join(&one.clone_id).join("run-0").join("net0.net.events"));
        assert!(
            clone_tx.iter().any(|e| matches!(&e.payload, Payload::Net(n) if n.direction == Direction::Tx && n.frame.len() > 38 && r.ports_after_b.contains(&u16::from_be_bytes([n.frame[36], n.frame[37]])) && n.frame.windows(3).any(|w| w == b"OK "))),
            "the clone answered the recorded connections"
        );
        eprintln!("1x clone: panicked after seq {} like the original; disk sha256 {clone_sha}; {} host frames, none of the clone's", r.last_seq, host.len());
        delete(&mut c, &one.clone_id).await;

        // 2. Two clones at once from the staggered snapshots: 10x from A,
        //    as fast as possible from B.
        let mut ra = create(&r.snap_a);
        ra.speed = speed(Some(10.0));
        let mut rb = create(&r.snap_b);
        rb.speed = speed(None);
        let ten = c.create_clone(authed(ra)).await.expect("clone at 10x").into_inner();
        let fast = c.create_clone(authed(rb)).await.expect("clone as fast as possible").into_inner();
        let listed = c.list_clones(authed(pb::ListClonesRequest {})).await.expect("list").into_inner();
        assert_eq!(listed.clones.len(), 2, "{listed:?}");
        assert_eq!(ten.seq_at_cut, r.cut_a);
        assert_eq!(fast.seq_at_cut, r.cut_b);
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (tid, fid) = (ten.clone_id.clone(), fast.clone_id.clone());
        let (a, b) = tokio::join!(watch_to_end(&mut c1, &tid), watch_to_end(&mut c2, &fid));
        assert_same_crash("10x from A", a.0, &a.1, &r);
        assert_same_crash("as fast as possible from B", b.0, &b.1, &r);
        no_block_divergence("10x", &divergences(&mut c, &tid).await);
        no_block_divergence("as fast as possible", &divergences(&mut c, &fid).await);
        eprintln!("10x from A and as-fast-as-possible from B at once: both panicked after seq {}", r.last_seq);
        delete(&mut c, &tid).await;
        delete(&mut c, &fid).await;

        // 3. Controls: step, resume, pause, run to, a second start, switch
        //    to snapshot B mid-replay.
        let mut rc = create(&r.snap_a);
        rc.start_paused = true;
        let ctl = c.create_clone(authed(rc)).await.expect("paused clone").into_inner();
        let id = ctl.clone_id.clone();
        assert_eq!(ctl.state, pb::CloneState::Ready as i32);
        control(&mut c, &id, pb::ControlAction::Step, |r| r.steps = 1).await.expect("step");
        let s = wait_state(&mut c, &id, "one step", REPLAY_WAIT, |s| s.delivered == 1 && s.state == pb::CloneState::Paused as i32).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(get(&mut c, &id).await.delivered, 1, "a stepped replay stays paused: {s:?}");
        let err = control(&mut c, &id, pb::ControlAction::Start, |_| {}).await.expect_err("second start");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("already been started"), "{err:?}");
        let resumed = control(&mut c, &id, pb::ControlAction::Resume, |_| {}).await.expect("resume");
        assert_ne!(resumed.state, pb::CloneState::Paused as i32, "{resumed:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        control(&mut c, &id, pb::ControlAction::Pause, |_| {}).await.expect("pause");
        let p1 = wait_state(&mut c, &id, "paused", Duration::from_secs(30), |s| s.state == pb::CloneState::Paused as i32).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let p2 = get(&mut c, &id).await;
        assert_eq!((p1.delivered, p2.state), (p2.delivered, pb::CloneState::Paused as i32), "a paused replay delivers nothing");
        let target = r.cut_b;
        control(&mut c, &id, pb::ControlAction::RunTo, |r| r.run_to_seq = target).await.expect("run to");
        let ran = wait_state(&mut c, &id, &format!("the run to seq {target}"), REPLAY_WAIT, |s| s.state == pb::CloneState::Paused as i32 && s.replayed_seq > p2.replayed_seq).await;
        assert!(ran.replayed_seq <= target, "{ran:?}");
        let snap_b = r.snap_b.clone();
        let switched = control(&mut c, &id, pb::ControlAction::Switch, |r| {
            r.snapshot = Some(pb::SnapshotSelector { pick: Some(pb::snapshot_selector::Pick::SnapshotId(snap_b)) });
        })
        .await
        .expect("switch to B");
        assert_eq!(
            (switched.clone_id.as_str(), switched.snapshot_id.as_str(), switched.seq_at_cut, switched.state, switched.switches, switched.delivered),
            (id.as_str(), r.snap_b.as_str(), r.cut_b, pb::CloneState::Ready as i32, 1, 0),
            "{switched:?}"
        );
        assert!(netns_list().contains(&format!("vmr-{id}")), "the same namespace");
        control(&mut c, &id, pb::ControlAction::Start, |_| {}).await.expect("start after the switch");
        let (crash, last) = watch_to_end(&mut c, &id).await;
        assert_same_crash("after the switch to B", crash, &last, &r);
        eprintln!("controls: step, pause, resume, run to seq {target}, switch to B, crash after seq {}", r.last_seq);
        delete(&mut c, &id).await;

        // 4. Without the packet of death's connection: no crash, the report
        //    says the stream was filtered; gdb holds the guest mid-replay;
        //    then the clone goes live.
        let mut rf = create(&r.snap_a);
        rf.gdb = true;
        rf.speed = speed(Some(1.0));
        rf.filter = Some(pb::EventFilter {
            include_block: true,
            include_net: true,
            include_env: true,
            exclude_net: Some(pb::NetMatch { ports: vec![u32::from(r.death_port)], ..Default::default() }),
            ..Default::default()
        });
        let fl = c.create_clone(authed(rf)).await.expect("filtered clone").into_inner();
        let fid = fl.clone_id.clone();
        let dbg = c.get_debugger(authed(pb::GetDebuggerRequest { clone_id: fid.clone() })).await.expect("debugger").into_inner();
        let script = root.join("gdb.cmds");
        std::fs::write(
            &script,
            format!(
                "set pagination off\nset architecture i386:x86-64\ntarget remote {}\ninfo registers rip\nshell sleep 4\nbreak *$pc\ncontinue\ninfo registers rip\ndelete\ndetach\n",
                dbg.address
            ),
        )
        .expect("gdb script");
        let gdb_out = root.join("gdb.out");
        let mut gdb = ChildGuard::spawn(
            "gdb",
            Command::new("timeout")
                .arg("180")
                .args(["/usr/bin/gdb", "-nx", "-batch", "-x"])
                .arg(&script)
                .stdout(std::fs::File::create(&gdb_out).expect("gdb out"))
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let held = wait_state(&mut c, &fid, "the replay paused by the debugger", Duration::from_secs(120), |s| s.detail.contains("debugger holds")).await;
        assert_eq!(held.state, pb::CloneState::Paused as i32, "{held:?}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let still = get(&mut c, &fid).await;
        assert_eq!((still.delivered, still.state), (held.delivered, pb::CloneState::Paused as i32), "nothing is replayed while gdb holds the guest");
        let status = wait_for("gdb to finish", Duration::from_secs(200), || gdb.try_wait());
        let out = std::fs::read_to_string(&gdb_out).unwrap_or_default();
        assert!(status.success(), "gdb failed: {out}");
        let rips: Vec<&str> = out.lines().filter(|l| l.starts_with("rip")).collect();
        assert_eq!(rips.len(), 2, "gdb read rip twice: {out}");
        assert!(out.contains("Breakpoint 1 at") && out.contains("Breakpoint 1, "), "the breakpoint was set and hit: {out}");
        assert_eq!(rips[0].split_whitespace().nth(1), rips[1].split_whitespace().nth(1), "stopped at the breakpoint: {out}");
        eprintln!("gdb: {}", rips.join(" | "));
        let fin = wait_state(&mut c, &fid, "the filtered replay to finish", REPLAY_WAIT, |s| s.state != pb::CloneState::Replaying as i32 && s.state != pb::CloneState::Paused as i32).await;
        assert_eq!(fin.state, pb::CloneState::Finished as i32, "without the packet of death there is no crash: {fin:?}");
        assert!(fin.filtered && fin.filtered_out > 0, "{fin:?}");
        assert!(fin.detail.contains("the stream was filtered"), "{fin:?}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(get(&mut c, &fid).await.state, pb::CloneState::Finished as i32, "still no crash");
        let live = control(&mut c, &fid, pb::ControlAction::GoLive, |_| {}).await.expect("go live");
        assert_eq!(live.state, pb::CloneState::Live as i32, "{live:?}");
        let acc = live.access.clone().expect("access");
        assert!(!acc.interface.is_empty() && acc.hint.contains(&acc.netns) && acc.hint.contains("192.168.77.2 7000"), "{acc:?}");
        let clone_ns = PathBuf::from("/run/netns").join(&acc.netns);
        let (v, _) = kv(&clone_ns, "GET 3").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v, "VAL 3 b1 v3", "the live clone serves from its namespace");
        let (p, _) = kv(&clone_ns, "PUT live yes").unwrap_or_else(|e| panic!("{e}"));
        assert!(p.starts_with("OK "), "{p:?}");
        eprintln!("filtered clone finished without a crash ({}); live: {}", fin.detail, acc.hint);
        delete(&mut c, &fid).await;

        // 5. Seeded faults, twice: the same faults both times.
        let faulty = || {
            let mut rq = create(&r.snap_b);
            rq.speed = speed(None);
            rq.seed = 77;
            rq.faults = vec![
                // Drops after the first connection's write, so that the
                // armed I/O error meets the clone's write.
                pb::FaultSpec {
                    kind: pb::FaultKind::DropFrame as i32,
                    target: Some(pb::FaultTarget { from_seq: r.first_write_after_b + 1, ..Default::default() }),
                    schedule: Some(pb::FaultSchedule { probability: 0.5, max_count: 2, ..Default::default() }),
                    ..Default::default()
                },
                pb::FaultSpec {
                    kind: pb::FaultKind::BlockIoerr as i32,
                    target: Some(pb::FaultTarget { device: "vda".into(), op: pb::BlockOp::Write as i32, ..Default::default() }),
                    schedule: Some(pb::FaultSchedule { at_seq: vec![r.first_write_after_b], ..Default::default() }),
                    count: 1,
                    ..Default::default()
                },
                pb::FaultSpec {
                    kind: pb::FaultKind::SyntheticFrame as i32,
                    target: Some(pb::FaultTarget { device: "net0".into(), ..Default::default() }),
                    schedule: Some(pb::FaultSchedule { at_time_ns: vec![1], ..Default::default() }),
                    frame: {
                        let mut f = vec![0xff; 6];
                        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
                        f.extend_from_slice(b"synthetic traffic");
                        f.resize(60, 0);
                        f
                    },
                    ..Default::default()
                },
            ];
            rq
        };
        let mut runs = Vec::new();
        for n in 0..2 {
            let cl = c.create_clone(authed(faulty())).await.expect("faulty clone").into_inner();
            let (_, last) = watch_to_end(&mut c, &cl.clone_id).await;
            let d = divergences(&mut c, &cl.clone_id).await;
            // The disk backend counts the requests its fault rules failed.
            let ctl = work.join(&cl.clone_id).join("run-0").join("vda.blk.ctl");
            let failed = wait_for("the armed I/O error to fail a request", Duration::from_secs(30), || {
                let n = blk_faults(&ctl);
                (n >= 1).then_some(n)
            });
            eprintln!("fault run {n}: {:?}, {} faults, {failed} failed block requests", pb::CloneState::try_from(last.state), d.faults.len());
            assert_eq!(d.seed, 77);
            assert_eq!(last.faults_injected as usize, d.faults.len());
            assert!(failed >= 1, "the armed I/O error failed a request of the clone");
            runs.push(d.faults.iter().map(|f| (f.seq, f.kind, f.description.clone())).collect::<Vec<_>>());
            delete(&mut c, &cl.clone_id).await;
        }
        assert_eq!(runs[0], runs[1], "one seed, the same faults");
        let kinds: Vec<i32> = runs[0].iter().map(|f| f.1).collect();
        for k in [pb::FaultKind::DropFrame, pb::FaultKind::BlockIoerr, pb::FaultKind::SyntheticFrame] {
            assert!(kinds.contains(&(k as i32)), "{k:?} injected: {:?}", runs[0]);
        }
        for f in &runs[0] {
            eprintln!("  fault: {}", f.2);
        }
    });

    // Shut down: nothing of the clones is left.
    drop(c);
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
    let st = wait_for("the replayer to exit", Duration::from_secs(60), || {
        server.try_wait()
    });
    assert!(st.success(), "replayer exit: {st}");
    assert!(
        !netns_list().contains("vmr-c"),
        "namespaces left: {}",
        netns_list()
    );
    rebooted
        .stop(Duration::from_secs(5))
        .expect("stop the rebooted original");
}
