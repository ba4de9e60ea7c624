//! The web console end to end in headless Chromium, driven by selenium
//! (`tests/browser.py`), against real services: a Tansu broker and the
//! schema registry, the `replayer` binary, the `vmr-console` binary and a
//! recorded instance.
//!
//! The recording is a microVM session of the freestanding test guest (the
//! rig of the replayer's service test): capture-mode `vhost-tap-blk` /
//! `vhost-tap-net` record it, two snapshots are cut (after two requests and
//! after four more), two more requests follow, then a poison frame crashes
//! the guest with a triple fault. The events are produced to the broker the way the agent ships
//! them, with the crash as a `TRIPLE_FAULT` lifecycle event, and the
//! snapshots are stored with vmr-snapshot. A second tenant's instance
//! (`other-1`) gets a few synthetic events.
//!
//! The driver talks to this test over its stdin/stdout: it asks for the
//! replayer's view of a clone (`get-clone <id>`, answered from the gRPC
//! API), for the replayer to go away and come back (`stop-replayer`,
//! `start-replayer`), and for the unknown instance `shop-2` to start
//! recording (`produce-shop-2`). Screenshots go to `docs/images/`.
//!
//! Heavy: needs /dev/kvm, root (network namespaces), python3 with selenium,
//! chromium and chromedriver (Debian's `chromium`, `chromium-driver`),
//! iproute2, the Tansu broker, and the replayer, schema-registry and
//! vhost-tap binaries (`cargo build -p replayer -p schema-registry -p vhost-tap`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, DiskSpec, Instance, InstanceSpec, NicSpec, SnapshotOptions};
use vmr_proto::pb::replayer_client::ReplayerClient;
use vmr_proto::topics::partition_for;
use vmr_proto::{
    pb, Direction, EnvSample, Event, InstanceId, Lifecycle, LifecycleKind, NetFrame, Payload,
};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::capture::{ethernet, records};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::registry::Registry;
use vmr_testkit::{free_port, workspace_bin, workspace_root, ChildGuard};
use vmr_vmm::guest_abi::build_test_guest;

const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "vmrc0";
const WAIT: Duration = Duration::from_secs(60);
const INSTANCE: &str = "shop-1";
const TOKEN_A: &str = "console-token-shop-00001";
const TOKEN_B: &str = "console-token-other-0002";
/// The whole browser session may take this long.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(600);

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
    for (bin, pkg) in [
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "this test needs {bin} (Debian package {pkg}: apt-get install {pkg})"
        );
    }
    let sel = Command::new("python3")
        .args(["-c", "import selenium"])
        .status();
    assert!(
        sel.is_ok_and(|s| s.success()),
        "this test needs python3 with selenium (pip install selenium)"
    );
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
    ethernet(GUEST_MAC, PEER_MAC, ETHERTYPE, payload)
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
}

fn wait_console(inst: &dyn Instance, needle: &str) {
    let file = inst.query().expect("query").console_file;
    wait_for(&format!("console line {needle:?}"), || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(needle)
            .then_some(())
    });
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// A broker, a registry and a producer that writes events as the agent's
/// shipper does (key = instance id, explicit murmur2 partition,
/// Confluent-framed `vmr.v1.Event`, `vmr.seq` / `vmr.epoch` headers).
struct Kafka {
    broker: Broker,
    _registry: Registry,
    rt: tokio::runtime::Runtime,
    producer: FutureProducer,
    schema_ids: HashMap<String, (u32, Vec<i32>)>,
}

impl Kafka {
    fn start() -> Self {
        let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
        let registry = Registry::start(&broker.bootstrap())
            .unwrap_or_else(|e| panic!("starting the schema registry: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = RegistryClient::new(&registry.url()).expect("registry client");
        let schema_ids = rt
            .block_on(client.register_vmr_schemas())
            .expect("register the vmr schemas")
            .into_iter()
            .map(|r| (r.topic.to_string(), (r.id as u32, r.message_indexes)))
            .collect();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", "10000000")
            .set("linger.ms", "5")
            .create()
            .expect("create producer");
        Self {
            broker,
            _registry: registry,
            rt,
            producer,
            schema_ids,
        }
    }

    fn send(&self, events: &[Event]) -> Vec<i64> {
        let mut pending = Vec::new();
        for e in events {
            let (id, idx) = &self.schema_ids[e.topic()];
            let mut value = Vec::new();
            codec::encode_message(*id, idx, &pb::Event::from(e.clone()), &mut value);
            let key = e.instance.as_str().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "vmr.seq",
                    value: Some(e.seq.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "vmr.epoch",
                    value: Some(e.epoch.to_string().as_bytes()),
                });
            let record = FutureRecord::to(e.topic())
                .key(key.as_bytes())
                .partition(partition_for(&key, TEST_EVENT_PARTITIONS))
                .payload(&value)
                .headers(headers);
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("enqueue a record"),
            );
        }
        self.rt.block_on(async {
            let mut offsets = Vec::new();
            for f in pending {
                let d = tokio::time::timeout(Duration::from_secs(30), f)
                    .await
                    .expect("delivery within 30 s")
                    .expect("delivery future")
                    .map_err(|(e, _)| e)
                    .expect("delivered");
                offsets.push(d.offset);
            }
            offsets
        })
    }
}

/// A few synthetic events of `instance` (net frames and a sensor), `n`
/// events from `seq` 1, 20 ms apart, ending now.
fn synthetic(instance: &str, n: u64) -> Vec<Event> {
    let end = now_ns();
    (1..=n)
        .map(|seq| {
            let t = end - (n - seq) * 20_000_000;
            let payload = if seq % 3 == 0 {
                Payload::Env(EnvSample {
                    sensor: "host.load1".into(),
                    value: (seq % 7) as f64 / 2.0,
                    unit: String::new(),
                })
            } else {
                Payload::Net(NetFrame {
                    device: "net0".into(),
                    queue: 0,
                    direction: if seq % 2 == 0 {
                        Direction::Tx
                    } else {
                        Direction::Rx
                    },
                    frame: request(format!("synthetic {seq}").as_bytes()),
                })
            };
            Event {
                instance: InstanceId::new(instance).expect("valid id"),
                seq,
                wall_time_ns: t,
                mono_time_ns: t,
                epoch: 1,
                payload,
            }
        })
        .collect()
}

/// What the recording left.
struct Recorded {
    store_url: String,
    cuts: Vec<u64>,
    poison_seq: u64,
    crash_seq: u64,
}

fn record(kafka: &Kafka, dir: &Path, elf: &Path, rt: &tokio::runtime::Runtime) -> Recorded {
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
    let bin = |n: &str| workspace_bin(n).unwrap_or_else(|e| panic!("{e}"));
    let mut blk = Command::new(bin("vhost-tap-blk"));
    blk.arg("--socket").arg(&blk_sock).arg("--image").arg(&disk);
    blk.args(["--mode", "capture", "--instance-id", INSTANCE]);
    blk.args(["--device", "vda", "--seq-lease", "1"]);
    blk.arg("--capture")
        .arg(&blk_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    let mut net = Command::new(bin("vhost-tap-net"));
    net.arg("--socket").arg(&net_sock);
    net.args(["--mode", "capture", "--instance-id", INSTANCE]);
    net.args(["--device", "net0", "--seq-lease", "1"]);
    net.arg("--capture")
        .arg(&net_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    net.args(["--tap", TAP, "--netns", ns.name()]);
    let mut blk =
        ChildGuard::spawn("vhost-tap-blk orig", &mut blk).unwrap_or_else(|e| panic!("{e}"));
    let mut net =
        ChildGuard::spawn("vhost-tap-net orig", &mut net).unwrap_or_else(|e| panic!("{e}"));
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

    let all_seqs = || {
        let mut v: Vec<Event> = records(&blk_cap);
        v.extend(records(&net_cap));
        v
    };
    // Two requests, a cut, four more, a second cut, two more, then the poison.
    let mut cuts = Vec::new();
    let mut layers = Vec::new();
    for (id, reqs) in [("0001", 0..2u32), ("0002", 2..6u32)] {
        for seq in reqs {
            send(&ns, &request(format!("request {seq}: hello").as_bytes()));
            wait_console(orig.as_ref(), &done_line(seq));
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_millis(700));
        let snap = dir.join("snaps").join(id);
        std::fs::create_dir_all(&snap).expect("snapshot dir");
        orig.snapshot(&snap, SnapshotOptions::default())
            .expect("snapshot");
        std::thread::sleep(Duration::from_millis(500));
        let layer = dir.join(format!("vda-at-{id}.raw"));
        std::fs::copy(&disk, &layer).expect("disk copy at the cut");
        cuts.push(
            all_seqs()
                .iter()
                .map(|e| e.seq)
                .max()
                .expect("events before the cut"),
        );
        layers.push((id, snap, layer));
    }
    std::thread::sleep(Duration::from_millis(700));
    for seq in 6..8u32 {
        send(&ns, &request(format!("request {seq}: hello").as_bytes()));
        wait_console(orig.as_ref(), &done_line(seq));
        std::thread::sleep(Duration::from_millis(300));
    }
    send(&ns, &request(b"POISON: crash now"));
    let crash = events
        .wait_for(WAIT, |e| e.kind() == LifecycleKind::TripleFault)
        .unwrap_or_else(|gone| panic!("the original did not crash (source gone: {gone})"));
    let crash_ns = now_ns();
    let _ = crash;
    orig.stop(Duration::from_secs(5))
        .expect("stop the original");
    let poison_seq = wait_for("the poison frame in the capture", || {
        records(&net_cap)
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

    // Ship the captures in seq order, as the agent does, and the crash the
    // agent observes as a lifecycle event after the last recorded one.
    let mut all = all_seqs();
    all.sort_by_key(|e| e.seq);
    let last = all.last().expect("events").clone();
    let crash_seq = last.seq + 1;
    all.push(Event {
        instance: last.instance.clone(),
        seq: crash_seq,
        wall_time_ns: crash_ns.max(last.wall_time_ns + 1),
        mono_time_ns: last.mono_time_ns + 1,
        epoch: last.epoch,
        payload: Payload::Lifecycle(Lifecycle {
            kind: LifecycleKind::TripleFault,
            detail: "triple fault".into(),
            regs: vec![],
            gap: None,
            snapshot_id: None,
        }),
    });
    let offsets = kafka.send(&all);
    let store_dir = dir.join("store");
    let store_url = format!("file://{}", store_dir.display());
    let store =
        vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(store_url.clone()))
            .expect("open the store");
    let part = partition_for(INSTANCE, TEST_EVENT_PARTITIONS);
    for ((id, src, layer), &seq_at_cut) in layers.into_iter().zip(&cuts) {
        let mut next: HashMap<&str, i64> = HashMap::new();
        for (e, off) in all.iter().zip(&offsets) {
            let n = next.entry(e.topic()).or_insert(-1);
            if e.seq <= seq_at_cut {
                *n = off + 1;
            } else if *n < 0 {
                *n = *off;
            }
        }
        let manifest_offsets = vmr_proto::topics::EVENT_TOPICS
            .iter()
            .map(|t| vmr_snapshot::PartitionOffset {
                topic: t.to_string(),
                partition: part,
                next_offset: next.get(t).copied().unwrap_or(0).max(0),
            })
            .collect::<Vec<_>>();
        let req = vmr_snapshot::UploadRequest {
            dir: src,
            snapshot_id: id.into(),
            image: "test-guest".into(),
            seq_at_cut,
            mono_time_ns: 0,
            offsets: manifest_offsets,
            disk_layers: vec![vmr_snapshot::DiskLayerFile {
                device: "vda".into(),
                position: 0,
                path: layer,
            }],
            base_snapshot_id: None,
        };
        rt.block_on(vmr_snapshot::upload(
            &store,
            &req,
            &vmr_snapshot::no_progress,
        ))
        .expect("upload the snapshot");
    }
    Recorded {
        store_url,
        cuts,
        poison_seq,
        crash_seq,
    }
}

/// The replayer process and how to start it again.
struct Replayer {
    config: PathBuf,
    addr: String,
    guard: Option<ChildGuard>,
}

impl Replayer {
    fn start(&mut self) {
        let mut cmd = Command::new(workspace_bin("replayer").unwrap_or_else(|e| panic!("{e}")));
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--listen", &self.addr]);
        self.guard =
            Some(ChildGuard::spawn("replayer", &mut cmd).unwrap_or_else(|e| panic!("{e}")));
        wait_for("the replayer to listen", || {
            std::net::TcpStream::connect(&self.addr).ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            // SIGTERM: the replayer tears every clone down before it exits.
            g.stop(Duration::from_secs(30));
        }
    }
}

fn get_clone(rt: &tokio::runtime::Runtime, addr: &str, id: &str) -> String {
    rt.block_on(async {
        let url = format!("http://{addr}");
        let ch = match tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
        {
            Ok(c) => c,
            Err(e) => return format!("{{\"error\": \"{e}\"}}"),
        };
        let mut c = ReplayerClient::new(ch);
        let mut r = tonic::Request::new(pb::GetCloneRequest {
            clone_id: id.to_string(),
        });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN_A}").parse().expect("ascii"),
        );
        match c.get_clone(r).await {
            Ok(c) => {
                let c = c.into_inner();
                let state = pb::CloneState::try_from(c.state)
                    .map(|s| s.as_str_name().to_string())
                    .unwrap_or_default();
                serde_json::json!({
                    "state": state,
                    "replayed_seq": c.replayed_seq,
                    "delivered": c.delivered,
                    "seq_at_cut": c.seq_at_cut,
                })
                .to_string()
            }
            Err(s) => serde_json::json!({"error": s.message()}).to_string(),
        }
    })
}

/// The driver process (in its own process group, with chromedriver and
/// chromium under it); the group is killed when it drops.
struct Driver(std::process::Child);

impl Driver {
    fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Self(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start python3 (needed for the browser driver): {e}")
        }))
    }

    /// Waits up to 30 s for the driver to end, then kills its group.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match self.0.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break None,
            }
        };
        // SAFETY: kill(2) with a negative pid signals the process group
        // created in `spawn`; it has no memory-safety requirements.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
        status
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
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
fn console_in_chromium_against_a_recorded_microvm() {
    require_prerequisites();
    let elf = build_test_guest(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"))
        .unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kafka = Kafka::start();
    let recorded = record(&kafka, dir, &elf, &rt);
    assert!(recorded.poison_seq > recorded.cuts[1] && recorded.cuts[1] > recorded.cuts[0]);
    kafka.send(&synthetic("other-1", 30));

    // The replayer.
    let work = dir.join("replayer-work");
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
name = "test-guest"
kernel = "{kernel}"
memory_mib = 32
nics = [{{ name = "net0", mac = "52:54:00:12:34:56" }}]
[[tokens]]
token = "{TOKEN_A}"
tenant = "shop"
[[tokens]]
token = "{TOKEN_B}"
tenant = "other"
[[tenants]]
name = "shop"
instance_prefix = "shop-"
[[tenants]]
name = "other"
instances = ["other-1"]
"#,
        work = work.display(),
        bootstrap = kafka.broker.bootstrap(),
        store = recorded.store_url,
        blk = workspace_bin("vhost-tap-blk")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        net = workspace_bin("vhost-tap-net")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        kernel = elf.display(),
    );
    let replayer_config = dir.join("replayer.toml");
    std::fs::write(&replayer_config, config).expect("write config");
    let mut replayer = Replayer {
        config: replayer_config,
        addr: format!("127.0.0.1:{}", free_port()),
        guard: None,
    };
    replayer.start();

    // The console, with the same tenancy.
    let console_addr = format!("127.0.0.1:{}", free_port());
    let console_config = dir.join("console.toml");
    std::fs::write(
        &console_config,
        format!(
            r#"
listen = "{console_addr}"
replayer_url = "http://{replayer}"
replayer_timeout_secs = 5
[kafka]
bootstrap_servers = "{bootstrap}"
[store]
url = "{store}"
[[tokens]]
token = "{TOKEN_A}"
tenant = "shop"
[[tokens]]
token = "{TOKEN_B}"
tenant = "other"
[[tenants]]
name = "shop"
instance_prefix = "shop-"
[[tenants]]
name = "other"
instances = ["other-1"]
"#,
            replayer = replayer.addr,
            bootstrap = kafka.broker.bootstrap(),
            store = recorded.store_url,
        ),
    )
    .expect("write the console config");
    let check = Command::new(env!("CARGO_BIN_EXE_vmr-console"))
        .arg("--config")
        .arg(&console_config)
        .arg("--check-config")
        .output()
        .expect("run vmr-console --check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let console_log = dir.join("console.log");
    let _console = ChildGuard::spawn(
        "vmr-console",
        Command::new(env!("CARGO_BIN_EXE_vmr-console"))
            .arg("--config")
            .arg(&console_config)
            .stderr(std::fs::File::create(&console_log).expect("log file")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for("the console to listen", || {
        std::net::TcpStream::connect(&console_addr).ok()
    });

    // The browser session.
    let images = workspace_root().join("docs").join("images");
    std::fs::create_dir_all(&images).expect("docs/images");
    let driver = workspace_root().join("console/tests/browser.py");
    let mut py = Command::new("python3");
    py.arg(&driver)
        .env("CONSOLE_URL", format!("http://{console_addr}"))
        .env("TOKEN_A", TOKEN_A)
        .env("TOKEN_B", TOKEN_B)
        .env("INSTANCE", INSTANCE)
        .env("CUTS", format!("{},{}", recorded.cuts[0], recorded.cuts[1]))
        .env("POISON_SEQ", recorded.poison_seq.to_string())
        .env("CRASH_SEQ", recorded.crash_seq.to_string())
        .env("SCREENSHOTS", &images)
        .env("FAILURE_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = Driver::spawn(&mut py);
    let mut stdin = child.0.stdin.take().expect("piped stdin");
    let lines = BufReader::new(child.0.stdout.take().expect("piped stdout")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut passed = Vec::new();
    let mut clones = std::collections::BTreeSet::new();
    let mut verdict = None;
    while verdict.is_none() {
        let left = DRIVER_TIMEOUT.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "the browser session took longer than {DRIVER_TIMEOUT:?}; passed so far: {passed:?}"
        );
        let line = match rx.recv_timeout(left) {
            Ok(Ok(l)) => l,
            _ => break,
        };
        eprintln!("browser.py: {line}");
        let mut words = line.split_whitespace();
        let answer = match words.next() {
            Some("ACTION") => match (words.next(), words.next()) {
                (Some("get-clone"), Some(id)) => {
                    clones.insert(id.to_string());
                    get_clone(&rt, &replayer.addr, id)
                }
                (Some("stop-replayer"), _) => {
                    replayer.stop();
                    "stopped".into()
                }
                (Some("start-replayer"), _) => {
                    replayer.start();
                    "started".into()
                }
                (Some("produce-shop-2"), _) => {
                    kafka.send(&synthetic("shop-2", 40));
                    "produced".into()
                }
                (a, _) => format!("unknown action {a:?}"),
            },
            Some("PASS") => {
                passed.push(line.clone());
                continue;
            }
            Some("DONE") => {
                verdict = Some(Ok(()));
                continue;
            }
            Some("FAIL") => {
                verdict = Some(Err(line.clone()));
                continue;
            }
            _ => continue,
        };
        writeln!(stdin, "{answer}").expect("answer the driver");
        stdin.flush().expect("answer the driver");
    }
    let status = child.stop();
    replayer.stop();
    let log = std::fs::read_to_string(&console_log).unwrap_or_default();
    match verdict {
        Some(Ok(())) => {}
        Some(Err(f)) => panic!("{f}\npassed: {passed:#?}\nconsole log:\n{log}"),
        None => panic!(
            "the driver ended without a verdict ({status:?})\npassed: {passed:#?}\nconsole log:\n{log}"
        ),
    }
    assert!(passed.len() >= 8, "too few checks passed: {passed:#?}");
    let left = netns_list();
    for id in &clones {
        assert!(
            !left.contains(&format!("vmr-{id}")),
            "clone {id}'s namespace is left: {left}"
        );
    }
}
