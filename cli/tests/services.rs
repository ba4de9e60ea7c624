//! `vmr doctor` and `vmr events tail` against a real Tansu broker and the
//! Schema Registry, started by vmr-testkit. Heavy: needs Tansu
//! (`~/.cache/vmreplay/tansu-0.6.0/bin/tansu`, scripts/setup.sh builds it),
//! the `schema-registry` binary (`cargo build --workspace --bins`), QEMU and
//! /dev/kvm; without them the tests fail and name what is missing.

mod common;

use std::time::Duration;

use common::vmr_env;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_proto::{
    pb, BlockIo, BlockOp, BlockStatus, Direction, Event, InstanceId, Lifecycle, LifecycleKind,
    NetFrame, Payload,
};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::registry::Registry;

const PARTS: &str = "4";
const T0: u64 = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z

fn stack() -> (Broker, Registry) {
    assert_eq!(PARTS, TEST_EVENT_PARTITIONS.to_string());
    let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
    let registry = Registry::start(&broker.bootstrap())
        .unwrap_or_else(|e| panic!("starting the registry: {e}"));
    (broker, registry)
}

fn env<'a>(b: &'a str, r: &'a str, store: &'a str, data: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("VMR_BOOTSTRAP_SERVERS", b),
        ("VMR_REGISTRY_URL", r),
        ("VMR_OBJECT_STORE_URL", store),
        ("VMR_EVENT_PARTITIONS", PARTS),
        ("VMR_DATA_DIR", data),
    ]
}

#[test]
fn doctor_reports_kvm_without_speed_and_tcg_and_healthy_services() {
    let (broker, registry) = stack();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("objects").display());
    let data = dir.path().join("data");
    let (b, r, d) = (
        broker.bootstrap(),
        registry.url(),
        data.to_str().unwrap().to_string(),
    );
    let e = env(&b, &r, &store, &d);
    let run = vmr_env(&["--json", "doctor"], &e, Duration::from_secs(90));
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    // This host: nested, software-assisted KVM.
    assert_eq!(v["kvm"]["present"], true, "{v}");
    assert_eq!(v["kvm"]["linux_at_speed"], false, "{v}");
    assert_eq!(v["accelerator"], "tcg", "{v}");
    assert_eq!(
        v["verdict"],
        "KVM is present but cannot run Linux at speed: QEMU/TCG will be used"
    );
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"))
            .clone()
    };
    assert_eq!(check("kvm")["status"], "warn");
    assert!(check("kvm")["detail"]
        .as_str()
        .unwrap()
        .contains("QEMU/TCG will be used"));
    assert_eq!(check("qemu")["status"], "ok");
    assert!(v["qemu_version"]
        .as_str()
        .unwrap()
        .contains("QEMU emulator version"));
    assert_eq!(check("broker")["status"], "ok", "{v}");
    // The registry answers; the schemas are registered by producers.
    assert_ne!(check("registry")["status"], "fail", "{v}");
    assert_eq!(check("object-store")["status"], "ok", "{v}");
    assert_ne!(check("disk")["status"], "fail", "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["failed"], serde_json::json!([]));

    // The human form says the same.
    let run = vmr_env(&["doctor"], &e, Duration::from_secs(90));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(
            "verdict: KVM is present but cannot run Linux at speed: QEMU/TCG will be used"
        ),
        "{}",
        run.stdout
    );

    // Without a broker: the broker check fails with its fix, exit 5.
    let closed = format!("127.0.0.1:{}", vmr_testkit::free_port());
    let e2 = env(&closed, &r, &store, &d);
    let run = vmr_env(
        &["--json", "doctor", "--timeout", "3"],
        &e2,
        Duration::from_secs(90),
    );
    assert_eq!(run.code, 5, "{run:?}");
    let v = run.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["failed"], serde_json::json!(["broker"]));
    let broker_check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "broker")
        .unwrap()
        .clone();
    assert!(
        broker_check["fix"]
            .as_str()
            .unwrap()
            .contains("vmr stack up"),
        "{v}"
    );
}

fn block(inst: &str, seq: u64, op: BlockOp, sector: u64) -> Event {
    Event {
        instance: InstanceId::new(inst).unwrap(),
        seq,
        wall_time_ns: T0 + seq * 1_000_000,
        mono_time_ns: seq * 1_000_000,
        epoch: 1,
        payload: Payload::Block(BlockIo {
            device: "vda".into(),
            queue: 0,
            op,
            sector,
            len: 4096,
            data: if op == BlockOp::Write {
                vec![7; 4096]
            } else {
                Vec::new()
            },
            content_hash: None,
            status: BlockStatus::Ok,
        }),
    }
}

fn udp_frame() -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(
        [0x52, 0x54, 0, 0x77, 0, 1],
        [0x52, 0x54, 0, 0x77, 0, 2],
    )
    .ipv4([192, 168, 77, 1], [192, 168, 77, 2], 64)
    .udp(40000, 7000);
    let payload = b"hello";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

fn net(inst: &str, seq: u64) -> Event {
    Event {
        instance: InstanceId::new(inst).unwrap(),
        seq,
        wall_time_ns: T0 + seq * 1_000_000,
        mono_time_ns: seq * 1_000_000,
        epoch: 1,
        payload: Payload::Net(NetFrame {
            device: "net0".into(),
            queue: 0,
            direction: Direction::Rx,
            frame: udp_frame(),
        }),
    }
}

fn lifecycle(inst: &str, seq: u64, kind: LifecycleKind, detail: &str) -> Event {
    Event {
        instance: InstanceId::new(inst).unwrap(),
        seq,
        wall_time_ns: T0 + seq * 1_000_000,
        mono_time_ns: seq * 1_000_000,
        epoch: 1,
        payload: Payload::Lifecycle(Lifecycle {
            kind,
            detail: detail.into(),
            regs: Vec::new(),
            gap: None,
            snapshot_id: None,
        }),
    }
}

/// Registers the schemas and publishes `events` Confluent-framed, keyed by
/// instance, on the instance's partition; then one poison record on
/// `poison_instance`'s partition of the net topic.
fn publish(bootstrap: &str, registry: &str, events: &[Event], poison_instance: &str) {
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
        let parts: i32 = PARTS.parse().unwrap();
        for e in events {
            let topic = e.topic();
            let schema = registered.iter().find(|t| t.topic == topic).unwrap();
            let mut buf = Vec::new();
            let msg = pb::Event::from(e.clone());
            codec::encode_message(schema.id as u32, &schema.message_indexes, &msg, &mut buf);
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(e.instance.as_str())
                        .partition(e.instance.partition(parts))
                        .payload(&buf),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("producing an event");
        }
        let p = vmr_proto::topics::partition_for(poison_instance, parts);
        producer
            .send(
                FutureRecord::to(vmr_proto::topics::NET)
                    .key(poison_instance)
                    .partition(p)
                    .payload(&b"\x07not framed"[..]),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("producing the poison record");
    });
}

#[test]
fn events_tail_decodes_filters_and_skips_poison() {
    let (broker, registry) = stack();
    let b = broker.bootstrap();
    let r = registry.url();
    // Two instances on different partitions.
    let parts: i32 = PARTS.parse().unwrap();
    let a = "vm-a";
    let other = (0..100)
        .map(|i| format!("vm-b{i}"))
        .find(|n| {
            vmr_proto::topics::partition_for(n, parts) != vmr_proto::topics::partition_for(a, parts)
        })
        .unwrap();
    let mut events = vec![
        lifecycle(a, 1, LifecycleKind::Boot, "qemu tcg"),
        block(a, 2, BlockOp::Write, 8),
        net(a, 3),
        block(a, 4, BlockOp::Read, 16),
        block(a, 5, BlockOp::Flush, 0),
        lifecycle(a, 6, LifecycleKind::Crash, "kernel panic"),
    ];
    events.push(block(&other, 1, BlockOp::Write, 99));
    events.push(net(&other, 2));
    publish(&b, &r, &events, a);

    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("objects").display());
    let d = dir.path().to_str().unwrap().to_string();
    let e = env(&b, &r, &store, &d);
    let t = Duration::from_secs(60);

    // Everything of instance a, as JSON lines; the poison record is reported.
    let run = vmr_env(&["--json", "events", "tail", "--instance", a], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let lines = run.json_lines();
    let mut seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "{}", run.stdout);
    assert!(lines.iter().all(|l| l["instance"] == a));
    assert!(
        run.stderr.contains("skipped record vmr.net.v1"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("magic byte"), "{}", run.stderr);
    let w = lines.iter().find(|l| l["seq"] == 2).unwrap();
    assert_eq!(w["kind"], "block");
    assert_eq!(w["device"], "vda");
    assert_eq!(w["topic"], "vmr.block.v1");
    assert_eq!(w["partition"], vmr_proto::topics::partition_for(a, parts));
    assert_eq!(w["block"]["op"], "write");
    assert_eq!(w["block"]["sector"], 8);
    assert_eq!(w["block"]["len"], 4096);
    assert_eq!(w["time"], "2026-01-01T00:00:00.002Z");
    let n = lines.iter().find(|l| l["seq"] == 3).unwrap();
    assert_eq!(n["net"]["src_mac"], "52:54:00:77:00:01");
    assert_eq!(n["net"]["dst_ip"], "192.168.77.2");
    assert_eq!(n["net"]["protocol"], "udp");
    assert_eq!(n["net"]["dst_port"], 7000);
    assert_eq!(n["net"]["direction"], "rx");
    let c = lines.iter().find(|l| l["seq"] == 6).unwrap();
    assert_eq!(c["lifecycle"]["kind"], "crash");
    assert_eq!(c["lifecycle"]["detail"], "kernel panic");

    // Kind and seq filters.
    let run = vmr_env(
        &[
            "--json", "events", "tail", "-i", a, "--kind", "block", "--seq", "3..5",
        ],
        &e,
        t,
    );
    assert_eq!(run.code, 0, "{run:?}");
    let seqs: Vec<u64> = run
        .json_lines()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5], "{}", run.stdout);

    // The other instance only: its partition, none of a's events.
    let run = vmr_env(&["--json", "events", "tail", "-i", &other], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines.iter().all(|l| l["instance"] == other.as_str()));
    assert!(
        !run.stderr.contains("skipped record"),
        "a's poison is on another partition: {}",
        run.stderr
    );

    // Device filter across instances.
    let run = vmr_env(&["--json", "events", "tail", "--device", "net0"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json_lines().len(), 2, "{}", run.stdout);

    // Human lines: seq, time, kind, device, summary.
    let run = vmr_env(
        &["events", "tail", "-i", a, "--kind", "net,lifecycle"],
        &e,
        t,
    );
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.contains("rx 52:54:00:77:00:01 > 52:54:00:77:00:02 udp 192.168.77.1:40000 > 192.168.77.2:7000 len=47"),
        "{out}"
    );
    assert!(out.contains("crash kernel panic"), "{out}");
    assert!(out.contains("2026-01-01T00:00:00.006Z"), "{out}");

    // --follow starts at the end and ends after --duration with nothing new;
    // --from-beginning reads what is there, then stops at --limit.
    let run = vmr_env(
        &[
            "--json",
            "events",
            "tail",
            "-i",
            a,
            "--follow",
            "--duration",
            "2",
        ],
        &e,
        t,
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "");
    let run = vmr_env(
        &[
            "--json",
            "events",
            "tail",
            "-i",
            a,
            "--follow",
            "--from-beginning",
            "--limit",
            "6",
            "--duration",
            "30",
        ],
        &e,
        t,
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json_lines().len(), 6, "{}", run.stdout);
}

#[test]
fn events_tail_without_a_broker_is_unavailable() {
    let port = vmr_testkit::free_port();
    let bs = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = [("VMR_BOOTSTRAP_SERVERS", bs.as_str()), ("VMR_DATA_DIR", d)];
    let started = std::time::Instant::now();
    let run = vmr_env(
        &["events", "tail", "--timeout", "3"],
        &e,
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 4, "{run:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        run.stderr
            .contains(&format!("the Kafka broker at {bs} did not answer")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("hint: start the local stack with `vmr stack up`"),
        "{}",
        run.stderr
    );
}

#[test]
fn stack_up_status_env_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let bs = format!("127.0.0.1:{}", vmr_testkit::free_port());
    let reg = format!("http://127.0.0.1:{}", vmr_testkit::free_port());
    let e = [
        ("VMR_DATA_DIR", d.as_str()),
        ("VMR_BOOTSTRAP_SERVERS", bs.as_str()),
        ("VMR_REGISTRY_URL", reg.as_str()),
        ("VMR_EVENT_PARTITIONS", PARTS),
    ];
    let t = Duration::from_secs(240);
    let tansu = vmr_testkit::broker::tansu_path();
    assert!(
        tansu.is_file(),
        "Tansu is missing at {} (scripts/setup.sh builds it)",
        tansu.display()
    );
    // Stops the stack even when an assertion below fails.
    struct Down<'a>(&'a [(&'a str, &'a str)]);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = vmr_env(&["stack", "down"], self.0, Duration::from_secs(60));
        }
    }
    let _down = Down(&e);
    let run = vmr_env(&["--json", "stack", "up"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    assert_eq!(v["VMR_BOOTSTRAP_SERVERS"], bs.as_str());
    let objects = format!("file://{d}/stack/objects");
    assert_eq!(v["VMR_OBJECT_STORE_URL"], objects.as_str());
    assert!(dir.path().join("stack/objects").is_dir());

    let run = vmr_env(&["--json", "stack", "status"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    for s in v["services"].as_array().unwrap() {
        assert_eq!(s["running"], true, "{v}");
    }

    // The stack passes the doctor's service checks (schemas registered).
    let mut e2 = e.to_vec();
    e2.push(("VMR_OBJECT_STORE_URL", objects.as_str()));
    let run = vmr_env(&["--json", "doctor"], &e2, Duration::from_secs(90));
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    for c in v["checks"].as_array().unwrap() {
        if ["broker", "registry", "object-store"].contains(&c["name"].as_str().unwrap()) {
            assert_eq!(c["status"], "ok", "{c}");
        }
    }

    let run = vmr_env(&["stack", "env"], &e, t);
    assert!(
        run.stdout
            .contains(&format!("export VMR_BOOTSTRAP_SERVERS={bs}")),
        "{}",
        run.stdout
    );

    let run = vmr_env(&["stack", "down"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let run = vmr_env(&["--json", "stack", "status"], &e, t);
    let v = run.json();
    for s in v["services"].as_array().unwrap() {
        assert_eq!(s["running"], false, "{v}");
    }

    // A remote broker configured: the local stack refuses.
    let remote = [
        ("VMR_DATA_DIR", d.as_str()),
        ("VMR_BOOTSTRAP_SERVERS", "kafka.example:9092"),
    ];
    let run = vmr_env(&["stack", "up"], &remote, t);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr
            .contains("the local stack runs only on 127.0.0.1"),
        "{}",
        run.stderr
    );
}

/// Whether something accepts TCP connections at `addr`.
fn listening(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(
        &addr.parse().expect("a socket address"),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Whether process `pid` still runs (a zombie waiting for its parent to
/// reap it has exited and counts as gone).
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

#[test]
fn embedded_default_starts_the_local_stack_and_stack_down_stops_it() {
    // Nothing configured: the default addresses of the local stack.
    const BROKER: &str = "127.0.0.1:19092";
    const REGISTRY: &str = "127.0.0.1:18081";
    let tansu = vmr_testkit::broker::tansu_path();
    assert!(
        tansu.is_file(),
        "Tansu is missing at {} (scripts/setup.sh builds it)",
        tansu.display()
    );
    for a in [BROKER, REGISTRY] {
        assert!(
            !listening(a),
            "something already listens on {a}, the local stack's default address \
             (a running local stack? stop it with `vmr stack down`)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    // Only the data directory: no broker, registry or store configured.
    let e = [("VMR_DATA_DIR", d.as_str())];
    struct Down<'a>(&'a [(&'a str, &'a str)]);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = vmr_env(&["stack", "down"], self.0, Duration::from_secs(60));
        }
    }
    let _down = Down(&e);
    let t = Duration::from_secs(240);

    // A command that needs the broker starts the stack itself and says so.
    let run = vmr_env(&["--json", "events", "tail", "--timeout", "30"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "", "no events recorded yet");
    let stack_dir = dir.path().join("stack");
    assert!(
        run.stderr.contains(&format!(
            "no broker configured and none at {BROKER}: starting the local stack in {}",
            stack_dir.display()
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("{\"events\":0,\"skipped\":0}"),
        "{}",
        run.stderr
    );
    let pids: Vec<u32> = ["broker", "registry"]
        .iter()
        .map(|s| {
            let f = stack_dir.join(format!("{s}.pid"));
            std::fs::read_to_string(&f)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect();
    for p in &pids {
        assert!(process_running(*p), "stack process {p} is not running");
    }
    assert!(listening(BROKER) && listening(REGISTRY));

    // The broker (every topic), the registry (schemas registered) and the
    // filesystem store answer, as the doctor checks them.
    let objects = format!("file://{}", stack_dir.join("objects").display());
    let with_store = [
        ("VMR_DATA_DIR", d.as_str()),
        ("VMR_OBJECT_STORE_URL", &objects),
    ];
    let run = vmr_env(&["--json", "doctor"], &with_store, Duration::from_secs(90));
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    for name in ["broker", "registry", "object-store"] {
        let c = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"));
        assert_eq!(c["status"], "ok", "{c}");
    }
    // A store-reading command uses the stack's store without configuration.
    let run = vmr_env(&["--json", "snapshot", "list", "vm-none"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["source"], objects.as_str());
    // The running stack is reused, not started again.
    let run = vmr_env(&["events", "tail", "--timeout", "30"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !run.stderr.contains("starting the local stack"),
        "{}",
        run.stderr
    );
    let run = vmr_env(&["--json", "stack", "status"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    let running: Vec<u64> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_u64().unwrap_or_else(|| panic!("{v}")))
        .collect();
    assert_eq!(
        running,
        pids.iter().map(|p| u64::from(*p)).collect::<Vec<_>>()
    );

    // Stopped when asked: the processes are gone, the ports closed, the
    // data kept.
    let run = vmr_env(&["--json", "stack", "down"], &e, t);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["stopped"], true, "{run:?}");
    let start = std::time::Instant::now();
    while pids.iter().any(|p| process_running(*p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stack processes {pids:?} still run after `stack down`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for a in [BROKER, REGISTRY] {
        assert!(!listening(a), "{a} still answers after `stack down`");
    }
    for s in ["broker", "registry"] {
        assert!(!stack_dir.join(format!("{s}.pid")).exists());
    }
    assert!(stack_dir.join("broker").is_dir(), "the broker's data stays");
    let run = vmr_env(&["--json", "stack", "status"], &e, t);
    for s in run.json()["services"].as_array().unwrap() {
        assert_eq!(s["running"], false, "{run:?}");
    }
}
