//! `vmr replay`, `vmr snapshot list|show` and `vmr timeline` against a real
//! `replayer` process, a real Tansu broker and a real recording.
//!
//! - `replay_errors_against_a_real_replayer`: a replayer with an empty
//!   store; every replay subcommand's main errors and their exit codes
//!   (unreachable service 4, unknown clone or snapshot 3, no or bad token 5,
//!   bad flag or argument 2), `--json` errors, an empty `list`.
//! - `replay_a_recorded_microvm_through_the_cli`: a microVM session of the
//!   freestanding test guest recorded by capture-mode vhost-tap backends,
//!   its events produced to the broker (with the original's TripleFault as
//!   the agent records it), a snapshot uploaded with vmr-snapshot; then
//!   through `vmr` only: `snapshot list|show`, `replay start --paused
//!   --gdb`, `debug`, `step`, `show`, `list`, `resume`, `watch --log` until
//!   the clone crashes after the poison frame's seq, `report`, `timeline`
//!   (SVG parsed as XML, PNG decoded, crash markers at the recorded times),
//!   `stop` of an ended replay, `delete`.
//!
//! Heavy: needs /dev/kvm, root (network namespaces), python3, iproute2, the
//! Tansu broker, and the `replayer`, `schema-registry`, `vhost-tap-blk` and
//! `vhost-tap-net` binaries (`cargo build --workspace --bins`); without them
//! the tests fail and name what is missing.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{vmr_env, Run};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, DiskSpec, InstanceSpec, NicSpec, SnapshotOptions};
use vmr_proto::topics::partition_for;
use vmr_proto::{pb, Direction, Event, InstanceId, Lifecycle, LifecycleKind, Payload};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::registry::Registry;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};

const TOKEN: &str = "cli-test-token-000000001";
const OTHER_TOKEN: &str = "cli-test-token-other-002";
const INSTANCE: &str = "cli-rec-1";
const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "vmrc0";
const WAIT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(120);

fn bin(n: &str) -> PathBuf {
    workspace_bin(n).unwrap_or_else(|e| panic!("{e}"))
}

fn replayer_config(dir: &Path, bootstrap: &str, store: &str, kernel: &Path) -> PathBuf {
    let work = dir.join("replayer-work");
    let text = format!(
        r#"
work_dir = "{work}"
max_clones = 2
[kafka]
bootstrap_servers = "{bootstrap}"
[store]
url = "{store}"
[backends]
blk = "{blk}"
net = "{net}"
[[images]]
name = "test-guest"
kernel = "{kernel}"
memory_mib = 32
nics = [{{ name = "net0", mac = "52:54:00:12:34:56" }}]
[[tokens]]
token = "{TOKEN}"
tenant = "cli"
[[tokens]]
token = "{OTHER_TOKEN}"
tenant = "other"
[[tenants]]
name = "cli"
instance_prefix = "cli-"
[[tenants]]
name = "other"
instances = ["other-1"]
"#,
        work = work.display(),
        blk = bin("vhost-tap-blk").display(),
        net = bin("vhost-tap-net").display(),
        kernel = kernel.display(),
    );
    let p = dir.join("replayer.toml");
    std::fs::write(&p, text).expect("write the replayer config");
    p
}

/// A running `replayer` and its URL.
struct Replayer {
    guard: ChildGuard,
    url: String,
}

fn start_replayer(config: &Path) -> Replayer {
    let addr = format!("127.0.0.1:{}", free_port());
    let guard = ChildGuard::spawn(
        "replayer",
        Command::new(bin("replayer"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &addr]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < WAIT,
            "the replayer never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Replayer {
        guard,
        url: format!("http://{addr}"),
    }
}

fn env<'a>(
    bootstrap: &'a str,
    store: &'a str,
    replayer: &'a str,
    token: &'a str,
    data: &'a str,
) -> Vec<(&'static str, &'a str)> {
    let mut v = vec![
        ("VMR_BOOTSTRAP_SERVERS", bootstrap),
        ("VMR_OBJECT_STORE_URL", store),
        ("VMR_REPLAYER_URL", replayer),
        ("VMR_DATA_DIR", data),
        ("VMR_EVENT_PARTITIONS", "4"),
    ];
    if !token.is_empty() {
        v.push(("VMR_TOKEN", token));
    }
    v
}

fn err_json(r: &Run) -> serde_json::Value {
    let line = r.stderr.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr is not a JSON error ({e}): {r:?}"))
}

#[test]
fn replay_errors_against_a_real_replayer() {
    assert_eq!(TEST_EVENT_PARTITIONS, 4);
    let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let store = format!("file://{}", store_dir.display());
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    let cfg = replayer_config(dir, &broker.bootstrap(), &store, &kernel);
    let mut rp = start_replayer(&cfg);
    let data = dir.join("data");
    let d = data.to_str().unwrap();
    let bs = broker.bootstrap();
    let e = env(&bs, &store, &rp.url, TOKEN, d);

    // An empty list, as a table and as JSON.
    let r = vmr_env(&["replay", "list"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("CLONE"), "{r:?}");
    let r = vmr_env(&["--json", "replay", "list"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({ "clones": [] }));

    // No such clone: exit 3 for every per-clone command.
    for args in [
        vec!["replay", "show", "no-such-clone"],
        vec!["replay", "report", "no-such-clone"],
        vec!["replay", "pause", "no-such-clone"],
        vec!["replay", "resume", "no-such-clone"],
        vec!["replay", "step", "no-such-clone", "2"],
        vec!["replay", "run-to", "no-such-clone", "9"],
        vec!["replay", "speed", "no-such-clone", "2"],
        vec!["replay", "stop", "no-such-clone"],
        vec!["replay", "delete", "no-such-clone"],
        vec!["replay", "debug", "no-such-clone"],
        vec!["replay", "watch", "no-such-clone", "--timeout", "10"],
    ] {
        let r = vmr_env(&args, &e, T);
        assert_eq!(r.code, 3, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("error: the replayer refused"),
            "{args:?}: {r:?}"
        );
    }
    let r = vmr_env(&["--json", "replay", "show", "no-such-clone"], &e, T);
    assert_eq!(r.code, 3);
    let j = err_json(&r);
    assert_eq!(j["error"]["kind"], "not_found", "{j}");
    assert_eq!(j["error"]["exit_code"], 3, "{j}");

    // No snapshot of the instance: exit 3.
    let r = vmr_env(&["replay", "start", "cli-none"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");

    // No token, a wrong token, another tenant's instance: exit 5 with a hint.
    let no_tok = env(&bs, &store, &rp.url, "", d);
    let r = vmr_env(&["replay", "list"], &no_tok, T);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("hint: set a valid bearer token"), "{r:?}");
    let r = vmr_env(
        &["--token", "wrong-token-0000000000", "replay", "list"],
        &e,
        T,
    );
    assert_eq!(r.code, 5, "{r:?}");
    let r = vmr_env(&["replay", "start", "other-1"], &e, T);
    assert_eq!(r.code, 5, "{r:?}");

    // Bad flags and arguments: exit 2, before any call.
    for args in [
        vec!["replay", "list", "--no-such-flag"],
        vec!["replay", "start", "cli-x", "--speed", "1000"],
        vec![
            "replay",
            "start",
            "cli-x",
            "--from-seq",
            "9",
            "--to-seq",
            "3",
        ],
        vec!["replay", "start", "cli-x", "--fault", "burn:3"],
        vec!["replay", "start", "cli-x", "--at", "yesterday"],
        vec!["replay", "start", "bad id!"],
        vec!["replay", "step", "c", "0"],
        vec!["replay", "speed", "c", "fast"],
        vec!["replay", "show", "a/b"],
    ] {
        let r = vmr_env(&args, &e, T);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }
    let r = vmr_env(&["--replayer-url", "ftp://x", "replay", "list"], &e, T);
    assert_eq!(r.code, 2, "{r:?}");

    // The service unreachable: exit 4, with the address and a hint.
    rp.guard.stop(Duration::from_secs(10));
    let r = vmr_env(&["replay", "list"], &e, T);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot reach the replayer at {}", rp.url)),
        "{r:?}"
    );
    assert!(r.stderr.contains("hint: start the replayer"), "{r:?}");
    let r = vmr_env(&["--json", "replay", "show", "c1"], &e, T);
    assert_eq!(err_json(&r)["error"]["kind"], "unavailable");
    for args in [
        vec!["replay", "start", "cli-x"],
        vec!["replay", "watch", "c1", "--timeout", "10"],
        vec!["replay", "pause", "c1"],
        vec!["replay", "resume", "c1"],
        vec!["replay", "step", "c1"],
        vec!["replay", "run-to", "c1", "9"],
        vec!["replay", "speed", "c1", "max"],
        vec!["replay", "stop", "c1"],
        vec!["replay", "delete", "c1"],
        vec!["replay", "report", "c1"],
        vec!["replay", "debug", "c1"],
    ] {
        let r = vmr_env(&args, &e, T);
        assert_eq!(r.code, 4, "{args:?}: {r:?}");
        assert!(r.stderr.contains("cannot reach the replayer"), "{r:?}");
    }
    // The agent is not running either.
    let agent = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["instance", "list"],
        vec!["instance", "show", "cli-x"],
        vec!["snapshot", "take", "cli-x"],
        vec!["snapshot", "list", "cli-x", "--agent"],
        vec!["snapshot", "pin", "cli-x", "0001"],
        vec!["snapshot", "delete", "cli-x", "0001"],
        vec!["instance", "launch", "demo-linux", "--accel", "tcg"],
        vec!["instance", "pause", "cli-x"],
        vec!["instance", "resume", "cli-x"],
        vec!["instance", "stop", "cli-x"],
        vec!["instance", "watch", "cli-x", "--timeout", "10"],
    ] {
        let r = vmr_env(
            &[&["--agent-url", agent.as_str()], &args[..]].concat(),
            &e,
            T,
        );
        assert_eq!(r.code, 4, "{args:?}: {r:?}");
        assert!(r.stderr.contains("cannot reach the capture agent"), "{r:?}");
    }
    // Snapshots of the store: none yet, and an unknown one is exit 3.
    let r = vmr_env(&["--json", "snapshot", "list", "cli-x"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["snapshots"], serde_json::json!([]));
    let r = vmr_env(&["snapshot", "show", "cli-x", "0001"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
}

// ---------------------------------------------------------------------------
// The recorded microVM.

fn require_prerequisites() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (network namespaces)");
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (iproute2, python3 and root are required): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn send(ns: &NetNs, frame: &[u8]) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    run(ns.command("python3").args([
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind((sys.argv[1],0))\ns.send(bytes.fromhex(sys.argv[2]))",
        TAP,
        &hex,
    ]));
}

fn request(payload: &[u8]) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

fn wait_console(inst: &dyn vmr_hypervisor::Instance, needle: &str) {
    let file = inst.query().expect("query").console_file;
    wait_for(&format!("console line {needle:?}"), || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(needle)
            .then_some(())
    });
}

fn captured(paths: &[&Path]) -> Vec<Event> {
    paths
        .iter()
        .flat_map(|p| vmr_testkit::capture::records(p))
        .collect()
}

/// Produces `events` Confluent-framed on the instance's partition; returns
/// each one's offset.
fn produce(bootstrap: &str, registry: &str, events: &[Event]) -> Vec<i64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = RegistryClient::new(registry).unwrap();
        let registered = client
            .register_vmr_schemas()
            .await
            .expect("registering the schemas");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .unwrap();
        let mut offs = Vec::new();
        for e in events {
            let topic = e.topic();
            let schema = registered.iter().find(|t| t.topic == topic).unwrap();
            let mut buf = Vec::new();
            let msg = pb::Event::from(e.clone());
            codec::encode_message(schema.id as u32, &schema.message_indexes, &msg, &mut buf);
            let delivery = producer
                .send(
                    FutureRecord::to(topic)
                        .key(e.instance.as_str())
                        .partition(e.instance.partition(TEST_EVENT_PARTITIONS))
                        .payload(&buf),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("producing an event");
            offs.push(delivery.offset);
        }
        offs
    })
}

struct Recorded {
    store_url: String,
    seq_at_cut: u64,
    cut_ns: u64,
    poison_seq: u64,
    crash_seq: u64,
    crash_ns: u64,
    events: usize,
    /// Block records and received frames numbered after the poison frame.
    inputs_after_poison: usize,
    /// The last block record or received frame after the cut and before the
    /// poison frame (`seq_at_cut` when there is none).
    last_input_before_poison: u64,
}

/// Whether the replayer applies `e` to a clone: a block record or a frame
/// the original received.
fn is_input(e: &Event) -> bool {
    match &e.payload {
        Payload::Lifecycle(_) => false,
        Payload::Net(n) => n.direction == Direction::Rx,
        _ => true,
    }
}

fn record(bootstrap: &str, registry: &str, dir: &Path, elf: &Path) -> Recorded {
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        run(ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]));
    }
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("temp dir is writable");
    let seq_file = dir.join("orig.seq");
    let blk_cap = dir.join("orig-blk.events");
    let net_cap = dir.join("orig-net.events");
    let blk_sock = dir.join("orig-blk.sock");
    let net_sock = dir.join("orig-net.sock");
    let mut blk = Command::new(bin("vhost-tap-blk"));
    blk.arg("--socket").arg(&blk_sock).arg("--image").arg(&disk);
    blk.args([
        "--mode",
        "capture",
        "--instance-id",
        INSTANCE,
        "--device",
        "vda",
        "--seq-lease",
        "1",
    ]);
    blk.arg("--capture")
        .arg(&blk_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    let mut net = Command::new(bin("vhost-tap-net"));
    net.arg("--socket").arg(&net_sock);
    net.args([
        "--mode",
        "capture",
        "--instance-id",
        INSTANCE,
        "--device",
        "net0",
        "--seq-lease",
        "1",
    ]);
    net.arg("--capture")
        .arg(&net_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    net.args(["--tap", TAP, "--netns", ns.name()]);
    let mut blk = ChildGuard::spawn("vhost-tap-blk", &mut blk).unwrap_or_else(|e| panic!("{e}"));
    let mut net = ChildGuard::spawn("vhost-tap-net", &mut net).unwrap_or_else(|e| panic!("{e}"));
    for s in [&blk_sock, &net_sock] {
        wait_for(&format!("socket {}", s.display()), || {
            s.exists().then_some(())
        });
    }
    let work = dir.join("orig");
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let mut spec = InstanceSpec::new(
        INSTANCE,
        &work,
        BootSpec::Kernel {
            kernel: elf.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = 32;
    spec.disks.push(DiskSpec {
        name: "vda".into(),
        socket: blk_sock.clone(),
    });
    spec.nics.push(NicSpec {
        name: "net0".into(),
        socket: net_sock.clone(),
        mac: vmr_hypervisor::MacAddr(GUEST_MAC),
    });
    let drv = vmr_hypervisor::driver("microvm").expect("the microvm driver exists");
    let orig = drv.launch(&spec).expect("launch the original");
    let events = orig.subscribe();
    orig.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
        .ports()
        .push_commands(&[CMD_NET_DISK]);
    wait_console(orig.as_ref(), "vmr-guest: net ready");
    ns.wait_for_link(TAP, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    ns.ip(&["link", "set", TAP, "up"])
        .unwrap_or_else(|e| panic!("{e}"));
    for seq in 0..2u32 {
        send(&ns, &request(format!("request {seq}: hello").as_bytes()));
        wait_console(
            orig.as_ref(),
            &format!("vmr-guest: request {seq:016x} done"),
        );
    }
    let snap = dir.join("snap-0001");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    orig.snapshot(&snap, SnapshotOptions::default())
        .expect("snapshot");
    std::thread::sleep(Duration::from_millis(500));
    let layer = dir.join("vda-at-cut.raw");
    std::fs::copy(&disk, &layer).expect("disk copy at the cut");
    let before = captured(&[&blk_cap, &net_cap]);
    let seq_at_cut = before
        .iter()
        .map(|e| e.seq)
        .max()
        .expect("events before the cut");
    let cut_ns = before.iter().map(|e| e.wall_time_ns).max().unwrap_or(0) + 1;

    std::thread::sleep(Duration::from_millis(700));
    send(&ns, &request(b"request 2: after the snapshot"));
    wait_console(
        orig.as_ref(),
        &format!("vmr-guest: request {:016x} done", 2),
    );
    std::thread::sleep(Duration::from_millis(700));
    send(&ns, &request(b"POISON: crash now"));
    events
        .wait_for(WAIT, |e| e.kind() == LifecycleKind::TripleFault)
        .unwrap_or_else(|gone| panic!("the original did not crash (source gone: {gone})"));
    let crash_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    orig.stop(Duration::from_secs(5))
        .expect("stop the original");
    let poison_seq = wait_for("the poison frame in the capture", || {
        captured(&[&net_cap])
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::Net(n)
                    if n.direction == Direction::Rx
                        && n.frame.windows(6).any(|w| w == b"POISON") =>
                {
                    Some(e.seq)
                }
                _ => None,
            })
    });
    blk.stop(Duration::from_secs(5));
    net.stop(Duration::from_secs(5));

    let mut all = captured(&[&blk_cap, &net_cap]);
    all.sort_by_key(|e| e.seq);
    // The driver's crash event, numbered after the devices' records, as the
    // agent's event log records it.
    let last = all.last().expect("events");
    let crash_seq = last.seq + 1;
    let crash_ns = crash_wall.max(last.wall_time_ns + 1);
    all.push(Event {
        instance: InstanceId::new(INSTANCE).unwrap(),
        seq: crash_seq,
        epoch: last.epoch,
        wall_time_ns: crash_ns,
        mono_time_ns: last.mono_time_ns + (crash_ns - last.wall_time_ns),
        payload: Payload::Lifecycle(Lifecycle {
            kind: LifecycleKind::TripleFault,
            detail: "triple fault".into(),
            regs: vec![],
            gap: None,
            snapshot_id: None,
        }),
    });
    let offsets = produce(bootstrap, registry, &all);
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (e, off) in all.iter().zip(&offsets) {
        let n = next.entry(e.topic()).or_insert(-1);
        if e.seq <= seq_at_cut {
            *n = off + 1;
        } else if *n < 0 {
            *n = *off;
        }
    }
    let part = partition_for(INSTANCE, TEST_EVENT_PARTITIONS);
    let store_dir = dir.join("store");
    let store_url = format!("file://{}", store_dir.display());
    let store =
        vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(store_url.clone()))
            .expect("open the store");
    let req = vmr_snapshot::UploadRequest {
        dir: snap,
        snapshot_id: "0001".into(),
        image: "test-guest".into(),
        seq_at_cut,
        mono_time_ns: 0,
        offsets: vmr_proto::topics::EVENT_TOPICS
            .iter()
            .map(|t| vmr_snapshot::PartitionOffset {
                topic: t.to_string(),
                partition: part,
                next_offset: next.get(t).copied().unwrap_or(0).max(0),
            })
            .collect(),
        disk_layers: vec![vmr_snapshot::DiskLayerFile {
            device: "vda".into(),
            position: 0,
            path: layer,
        }],
        base_snapshot_id: None,
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(vmr_snapshot::upload(
            &store,
            &req,
            &vmr_snapshot::no_progress,
        ))
        .expect("upload the snapshot");
    Recorded {
        store_url,
        seq_at_cut,
        cut_ns,
        poison_seq,
        crash_seq,
        crash_ns,
        events: all.len(),
        inputs_after_poison: all
            .iter()
            .filter(|e| e.seq > poison_seq && is_input(e))
            .count(),
        last_input_before_poison: all
            .iter()
            .filter(|e| e.seq > seq_at_cut && e.seq < poison_seq && is_input(e))
            .map(|e| e.seq)
            .max()
            .unwrap_or(seq_at_cut),
    }
}

fn attr<'a>(n: &roxmltree::Node<'a, 'a>, name: &str) -> &'a str {
    n.attribute(name)
        .unwrap_or_else(|| panic!("no {name} on {n:?}"))
}

#[test]
fn replay_a_recorded_microvm_through_the_cli() {
    require_prerequisites();
    let elf = vmr_vmm::guest_abi::build_test_guest(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
    let registry = Registry::start(&broker.bootstrap())
        .unwrap_or_else(|e| panic!("starting the registry: {e}"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let bs = broker.bootstrap();
    let rec = record(&bs, &registry.url(), dir, &elf);
    assert!(
        rec.poison_seq > rec.seq_at_cut,
        "the poison frame comes after the cut"
    );

    let cfg = replayer_config(dir, &bs, &rec.store_url, &elf);
    let mut rp = start_replayer(&cfg);
    let data = dir.join("data");
    let e = env(&bs, &rec.store_url, &rp.url, TOKEN, data.to_str().unwrap());

    // The store's snapshot.
    let r = vmr_env(&["--json", "snapshot", "list", INSTANCE], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let snaps = r.json()["snapshots"].as_array().cloned().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["snapshot_id"], "0001");
    assert_eq!(snaps[0]["seq_at_cut"], rec.seq_at_cut);
    let r = vmr_env(&["snapshot", "list", INSTANCE], &e, T);
    assert!(r.stdout.contains("0001"), "{r:?}");
    let r = vmr_env(&["--json", "snapshot", "show", INSTANCE, "latest"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["manifest"]["image"], "test-guest");
    assert_eq!(r.json()["driver"], "microvm");

    // A paused clone with a gdb stub.
    let r = vmr_env(
        &[
            "--json",
            "replay",
            "start",
            INSTANCE,
            "--snapshot",
            "0001",
            "--paused",
            "--gdb",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let c = r.json();
    let id = c["clone_id"].as_str().unwrap().to_string();
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(c["seq_at_cut"], rec.seq_at_cut);
    assert_eq!(c["speed"], serde_json::json!({ "factor": 1.0 }));

    let r = vmr_env(&["replay", "debug", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("gdb -q -ex 'target remote 127.0.0.1:"),
        "{r:?}"
    );
    let r = vmr_env(&["--json", "replay", "debug", &id], &e, T);
    let addr = r.json()["address"].as_str().unwrap().to_string();
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
        .expect("the clone's gdb stub accepts a connection");
    // Real gdb, run by `debug --exec` in batch mode: it attaches, reads the
    // paused vCPU's registers and detaches, and the clone stays as it was.
    let gdb = dir.join("gdb-batch");
    std::fs::write(
        &gdb,
        "#!/bin/sh\nexec gdb -nx \"$@\" -batch -ex 'info registers rip' -ex detach\n",
    )
    .unwrap();
    run(Command::new("chmod").arg("+x").arg(&gdb));
    let r = vmr_env(
        &[
            "replay",
            "debug",
            &id,
            "--exec",
            "--gdb",
            gdb.to_str().unwrap(),
        ],
        &e,
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "gdb (apt-get install gdb) in batch mode: {r:?}");
    let rip = r
        .stdout
        .lines()
        .find(|l| l.starts_with("rip"))
        .unwrap_or_else(|| panic!("gdb printed no rip: {r:?}"));
    assert!(rip.contains("0x"), "{rip}");
    assert!(r.stdout.contains("detached"), "gdb did not detach: {r:?}");
    let r = vmr_env(&["--json", "replay", "show", &id], &e, T);
    assert_eq!(r.json()["state"], "ready", "after gdb detached: {r:?}");
    assert_eq!(r.json()["delivered"], 0, "{r:?}");
    let r = vmr_env(
        &[
            "replay",
            "debug",
            &id,
            "--exec",
            "--gdb",
            "/nonexistent/gdb",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 5, "a missing gdb: {r:?}");
    assert!(r.stderr.contains("hint: install gdb"), "{r:?}");

    // One step, then the state.
    let r = vmr_env(&["--json", "replay", "step", &id, "1"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let r = wait_for("the step to be delivered", || {
        let r = vmr_env(&["--json", "replay", "show", &id], &e, T);
        (r.json()["delivered"] == 1 && r.json()["state"] == "paused").then_some(r)
    });
    assert_eq!(r.code, 0);
    let stepped = r.json()["replayed_seq"].as_u64().unwrap();
    assert!(stepped > rec.seq_at_cut, "{r:?}");
    let r = vmr_env(&["--json", "replay", "list"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    let row = j["clones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["clone_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed: {j}"));
    assert_eq!(row["state"], "paused", "{j}");
    assert_eq!(row["instance_id"], INSTANCE, "{j}");
    let r = vmr_env(&["replay", "list"], &e, T);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("paused")),
        "{r:?}"
    );
    // Run to the event before the poison frame: the clone pauses after the
    // last input before it, alive; pausing a paused clone keeps it paused.
    let before_poison = rec.poison_seq - 1;
    let target = rec.last_input_before_poison;
    let r = vmr_env(
        &[
            "--json",
            "replay",
            "run-to",
            &id,
            &before_poison.to_string(),
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["clone_id"], id.as_str(), "{r:?}");
    let r = wait_for("the run-to to pause the clone", || {
        let r = vmr_env(&["--json", "replay", "show", &id], &e, T);
        let j = r.json();
        assert_ne!(j["state"], "crashed", "run-to {before_poison} crashed: {j}");
        (j["state"] == "paused" && j["replayed_seq"].as_u64() >= Some(target.max(stepped)))
            .then_some(j)
    });
    let at = r["replayed_seq"].as_u64().unwrap();
    assert!(
        at <= before_poison,
        "run-to {before_poison} replayed to {at}: {r}"
    );
    let r = vmr_env(&["--json", "replay", "pause", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "paused", "{r:?}");
    assert_eq!(r.json()["replayed_seq"], at, "{r:?}");
    let r = vmr_env(
        &["replay", "run-to", &id, &rec.seq_at_cut.to_string()],
        &e,
        T,
    );
    assert_eq!(r.code, 2, "run-to the cut itself: {r:?}");
    // Another tenant does not see it.
    let r = vmr_env(&["--token", OTHER_TOKEN, "--json", "replay", "list"], &e, T);
    assert_eq!(r.json()["clones"], serde_json::json!([]));
    let r = vmr_env(
        &["replay", "show", &id],
        &[&e[..], &[("VMR_TOKEN", OTHER_TOKEN)]].concat(),
        T,
    );
    assert_eq!(r.code, 5, "{r:?}");

    // Resume and watch to the crash, logging the progress.
    let log = dir.join("watch.jsonl");
    let r = vmr_env(&["--json", "replay", "speed", &id, "1"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["speed"], serde_json::json!({ "factor": 1.0 }));
    let r = vmr_env(&["replay", "resume", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let r = vmr_env(
        &[
            "replay",
            "watch",
            &id,
            "--log",
            log.to_str().unwrap(),
            "--timeout",
            "90",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    // The crash comes after the poison frame, the last input applied; the
    // final line's seq is the highest event applied, which may be the
    // original's own crash record (docs/replayer.md).
    assert!(
        r.stdout
            .contains(&format!("triple_fault after seq {}", rec.poison_seq)),
        "the clone crashes after the poison frame (seq {}): {r:?}",
        rec.poison_seq
    );
    assert!(
        r.stdout.contains(&format!("{id}: crashed at seq ")),
        "{r:?}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let crash = lines
        .iter()
        .find_map(|l| {
            l["lifecycle"]
                .as_object()
                .filter(|o| o["kind"] == "triple_fault")
        })
        .unwrap_or_else(|| panic!("no triple fault in the watch log: {lines:?}"));
    // The last input the clone got before it crashed is the poison frame
    // (the replay may have passed the original's own crash record, which
    // is no input, by then).
    let applied = crash["last_seq_applied"].as_u64().unwrap();
    assert!(
        applied == rec.poison_seq
            || (applied > rec.poison_seq
                && applied <= rec.crash_seq
                && rec.inputs_after_poison == 0),
        "the clone crashed after seq {applied}; the poison frame is {}",
        rec.poison_seq
    );

    // The report.
    let r = vmr_env(&["--json", "replay", "report", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let rep = r.json();
    assert_eq!(rep["clone"]["state"], "crashed");
    let replayed = rep["clone"]["replayed_seq"].as_u64().unwrap();
    assert!(
        replayed >= applied && replayed <= rec.crash_seq,
        "replayed_seq {replayed}, last input {applied}: {rep}"
    );
    assert!(
        rep["clone"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("after seq {applied}")),
        "{rep}"
    );
    assert!(rep["divergences"].is_array());
    let r = vmr_env(&["replay", "report", &id], &e, T);
    assert!(r.stdout.contains("crashed at seq"), "{r:?}");

    // The timeline.
    let svg = dir.join("timeline.svg");
    let r = vmr_env(
        &[
            "--json",
            "timeline",
            "--instance",
            INSTANCE,
            "--replay",
            &id,
            "--replay-log",
            log.to_str().unwrap(),
            "-o",
            svg.to_str().unwrap(),
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["events"], rec.events);
    assert_eq!(j["crash_original"]["seq"], rec.crash_seq);
    assert_eq!(j["crash_original"]["time_ns"], rec.crash_ns);
    assert_eq!(j["crash_clone"]["seq"], rec.poison_seq);
    let text = std::fs::read_to_string(&svg).expect("the SVG exists");
    let doc = roxmltree::Document::parse(&text).expect("the SVG is XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    let num = |n: &roxmltree::Node, a: &str| -> f64 { attr(n, a).parse().unwrap() };
    let (t0, t1) = (num(&root, "data-t0-ns"), num(&root, "data-t1-ns"));
    let (left, width) = (num(&root, "data-plot-left"), num(&root, "data-plot-width"));
    let x_of = |t: u64| left + (t as f64 - t0) / (t1 - t0) * width;
    let find = |id: &str| {
        doc.descendants()
            .find(|n| n.attribute("id") == Some(id))
            .unwrap_or_else(|| panic!("no #{id} in the SVG"))
    };
    let orig = find("crash-original");
    assert_eq!(attr(&orig, "data-time-ns"), rec.crash_ns.to_string());
    assert!((num(&orig, "data-x") - x_of(rec.crash_ns)).abs() < 0.01);
    let line = orig.children().find(|n| n.has_tag_name("line")).unwrap();
    assert!((num(&line, "x1") - x_of(rec.crash_ns)).abs() < 0.1);
    let cl = find("crash-clone");
    assert_eq!(attr(&cl, "data-seq"), rec.poison_seq.to_string());
    let poison_ns: u64 = attr(&cl, "data-time-ns").parse().unwrap();
    assert!(
        poison_ns > rec.cut_ns && poison_ns <= rec.crash_ns,
        "{poison_ns}"
    );
    assert!((num(&cl, "data-x") - x_of(poison_ns)).abs() < 0.01);
    let snap = doc
        .descendants()
        .find(|n| n.attribute("data-snapshot") == Some("0001"))
        .expect("the snapshot marker");
    assert_eq!(attr(&snap, "data-seq-at-cut"), rec.seq_at_cut.to_string());
    assert!(doc
        .descendants()
        .any(|n| n.attribute("data-lane") == Some("net0 rx (to guest)")));
    assert!(doc
        .descendants()
        .any(|n| n.attribute("class") == Some("progress")));
    let png = std::fs::read(svg.with_extension("png")).expect("the PNG exists");
    // VMR_TEST_TIMELINE_OUT=DIR keeps a copy of the picture for a look.
    if let Some(keep) = std::env::var_os("VMR_TEST_TIMELINE_OUT") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).expect("the keep directory");
        std::fs::copy(&svg, keep.join("timeline.svg")).expect("copy the SVG");
        std::fs::write(keep.join("timeline.png"), &png).expect("copy the PNG");
    }
    let pm = resvg::tiny_skia::Pixmap::decode_png(&png).expect("the PNG decodes");
    assert_eq!(
        (pm.width(), f64::from(pm.height())),
        (1200, num(&root, "height"))
    );
    // The crash line's column holds the crash colour (#d00000).
    let x = x_of(rec.crash_ns).round() as u32;
    let red = (0..pm.height()).any(|y| {
        let p = pm.pixel(x, y).unwrap();
        p.red() > 180 && p.green() < 60 && p.blue() < 60
    });
    assert!(red, "no red crash line at x={x} in the PNG");

    // Stopping an ended replay leaves it as it ended; delete removes it.
    let r = vmr_env(&["--json", "replay", "stop", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "crashed", "{r:?}");
    let r = vmr_env(&["--json", "replay", "delete", &id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["deleted"], id.as_str());
    let r = vmr_env(&["replay", "show", &id], &e, T);
    assert_eq!(r.code, 3, "{r:?}");

    // A second clone, stopped while it replays: `stop` ends it as stopped,
    // and `watch` of it ends at once with that state.
    let r = vmr_env(&["--json", "replay", "start", INSTANCE, "--paused"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let id2 = r.json()["clone_id"].as_str().unwrap().to_string();
    assert_ne!(id2, id);
    let r = vmr_env(&["--json", "replay", "resume", &id2], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "replaying", "{r:?}");
    let r = vmr_env(&["--json", "replay", "stop", &id2], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "stopped", "{r:?}");
    let r = vmr_env(
        &["--json", "replay", "watch", &id2, "--timeout", "30"],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines = r.json_lines();
    assert!(
        lines.iter().any(|l| l["clone"]["state"] == "stopped"),
        "{r:?}"
    );
    let r = vmr_env(&["replay", "resume", &id2], &e, T);
    assert_eq!(r.code, 5, "resuming a stopped clone: {r:?}");
    let r = vmr_env(&["replay", "delete", &id2], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    rp.guard.stop(Duration::from_secs(30));
}
