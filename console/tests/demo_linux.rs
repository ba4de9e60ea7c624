//! The web console end to end in headless Chromium, driven by selenium
//! (`tests/demo_linux.py`), against a recorded `demo-linux` instance and
//! real services: a Tansu broker and the schema registry, the `replayer`
//! binary and the `vmr-console` binary.
//!
//! Recording: demo-linux (service vmr-kv-1 on 192.168.77.2:7000) runs under
//! the capture agent as a `RecordedInstance` (QEMU, TCG; capture-mode
//! `vhost-tap-blk` / `vhost-tap-net` supervised by the agent, the captures
//! shipped to the broker by the agent's shippers). A peer in the
//! original's namespace sends `PUT`s; snapshots A and B are the agent's
//! consistent cuts (`SnapshotEngine::take_and_wait`, uploaded to a
//! `file://` store); then the packet of death (a key over 200 bytes) panics
//! the guest, and the agent records the crash. The recording is shared by
//! every check. A second tenant's instance (`other-1`) gets a few synthetic
//! events.
//!
//! The browser session checks: the timeline shows both snapshots at their
//! manifests' times and the crash marker at the recorded crash's time; a
//! range lists decoded events; a replay started from the page from A,
//! stepped, resumed and paused from the page (each reflected by the
//! replayer's `GetClone`), switched to B from the page, runs to the same
//! crash (the replayer reports the original's last recorded `seq`) and the
//! page marks the clone's crash; a clone goes live from the page and its
//! service answers inside its namespace; the replayer going away
//! mid-replay, an unknown instance in the URL and an expired token each
//! show a clear message and the page recovers; the other tenant's instance
//! is not listed. The replayer itself refuses the expired token with
//! `UNAUTHENTICATED` "token expired". Screenshots go to `docs/images/`.
//!
//! Heavy: needs root (network namespaces, TAP devices), qemu-system-x86_64,
//! python3 with selenium, chromium and chromedriver (Debian's `chromium`,
//! `chromium-driver`), iproute2, the demo-linux image
//! (`guest/linux/build.sh`), the Tansu broker, and the replayer,
//! schema-registry and vhost-tap binaries
//! (`cargo build -p replayer -p schema-registry -p vhost-tap --bins`). Run
//! with `cargo test -p vmr-console --test demo_linux`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::{authed, get_clone, netns_list, run_driver, start_console, Kafka, Replayer};
use replayer::source::{EventSource, SourceConfig, SourceItem};
use vmr_hypervisor::image::MachineImage;
use vmr_hypervisor::Accel;
use vmr_proto::config::Endpoints;
use vmr_proto::topics::partition_for;
use vmr_proto::{pb, Direction, Event, InstanceId, LifecycleKind, Payload};
use vmr_testkit::broker::TEST_EVENT_PARTITIONS;
use vmr_testkit::kv;
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{free_port, workspace_bin, workspace_root};

const INSTANCE: &str = "kv-demo-1";
const TOKEN_A: &str = "console-token-demo-000001";
const TOKEN_B: &str = "console-token-other-00002";
/// A token of tenant demo that expired in 2020, in both configurations.
const TOKEN_EXPIRED: &str = "console-token-expired-003";
const EXPIRED_AT: &str = "2020-01-01T00:00:00Z";
/// Bound on waits for the guest (TCG on a shared 2-core machine).
const GUEST_WAIT: Duration = Duration::from_secs(240);
/// The whole browser session may take this long.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(1500);
const TAP: &str = "vmrcd0";
const PEER_MAC: &str = "02:00:00:77:00:01";

fn require_prerequisites() {
    common::require_root("network namespaces, TAP devices");
    common::require_browser();
    vmr_testkit::qemu::qemu_binary().unwrap_or_else(|e| panic!("{e}"));
    for b in [
        "replayer",
        "vhost-tap-blk",
        "vhost-tap-net",
        "schema-registry",
    ] {
        bin(b);
    }
}

fn bin(name: &str) -> PathBuf {
    workspace_bin(name).unwrap_or_else(|e| {
        panic!(
            "{e} (build it with `cargo build -p replayer -p schema-registry -p vhost-tap --bins`)"
        )
    })
}

fn put(ns: &Path, key: &str, value: &str) -> u16 {
    let (r, port) = kv::put(ns, key, value).unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    assert!(r.starts_with("OK "), "PUT {key}: {r:?}");
    port
}

/// What the recording left.
struct Recorded {
    store_url: String,
    /// Snapshots A and B: id, `seq` at the cut, the manifest's wall time.
    snaps: Vec<(String, u64, u64)>,
    /// The frame that carried the packet of death.
    poison_seq: u64,
    /// The original's last recorded device `seq` (it panicked after it).
    last_seq: u64,
    /// The recorded crash (lifecycle event): its `seq` and wall time.
    crash_seq: u64,
    crash_ns: u64,
}

/// The original under the capture agent: capture-mode backends spooling to
/// its shippers, the disk on a chain of copy-on-write layers, the NIC's TAP
/// in the peer's namespace.
fn launch_recorded(kafka: &Kafka, root: &Path, ns: &NetNs) -> (Arc<RecordedInstance>, Endpoints) {
    let image_dir = vmr_testkit::guest::demo_linux_dir().unwrap_or_else(|e| panic!("{e}"));
    let cfg_path = root.join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[endpoints]\nbootstrap-servers = \"{}\"\nregistry-url = \"{}\"\nevent-partitions = {TEST_EVENT_PARTITIONS}\n\n\
             [shipper]\nretry-initial-ms = 200\nretry-max-ms = 2000\nrequest-timeout-secs = 10\ncommit-interval-ms = 100\n",
            kafka.bootstrap(),
            kafka.registry.url()
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
    common::wait_for("VMR-SERVICE-READY on the console", GUEST_WAIT, || {
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

/// The agent's consistent cut; the manifest's id, `seq` at the cut and
/// wall time.
fn take_snapshot(
    engine: &SnapshotEngine,
    inst: &Arc<RecordedInstance>,
    name: &str,
) -> (String, u64, u64) {
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
    eprintln!(
        "snapshot {name}: {} at seq {}, pause {} us",
        m.snapshot_id, m.seq_at_cut, m.pause_us
    );
    (m.snapshot_id.clone(), m.seq_at_cut, m.wall_time_ns)
}

/// Every event of the instance in the broker, by `seq`.
fn shipped_events(kafka: &Kafka) -> Vec<Event> {
    let part = partition_for(INSTANCE, TEST_EVENT_PARTITIONS);
    let cfg = SourceConfig {
        bootstrap_servers: kafka.bootstrap(),
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

fn record(kafka: &Kafka, root: &Path, ns: &NetNs) -> Recorded {
    let t0 = Instant::now();
    let (orig, endpoints) = launch_recorded(kafka, root, ns);
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
    put(&nsp, "c0", "v4");
    std::thread::sleep(Duration::from_millis(1000));
    // The packet of death, over a new connection.
    let death = {
        let nsp = nsp.clone();
        std::thread::spawn(move || {
            kv::request(
                &nsp,
                &format!("PUT {} boom", "k".repeat(300)),
                Duration::from_secs(60),
            )
        })
    };
    events
        .wait_for(GUEST_WAIT, |e| e.kind() == LifecycleKind::Crash)
        .unwrap_or_else(|gone| panic!("the original did not panic (events gone: {gone})"));
    let (reply, _) = death
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

    let all = shipped_events(kafka);
    let last_seq = all
        .iter()
        .filter(|e| matches!(e.payload, Payload::Block(_) | Payload::Net(_)))
        .map(|e| e.seq)
        .max()
        .expect("recorded device events");
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
    let crash = all
        .iter()
        .find(|e| matches!(&e.payload, Payload::Lifecycle(l) if l.kind == LifecycleKind::Crash))
        .expect("the crash recorded as a lifecycle event");
    assert!(a.1 < b.1 && b.1 < poison_seq && poison_seq <= last_seq);
    eprintln!(
        "recorded in {:?}: {} events, cut A at seq {}, cut B at seq {}, packet of death seq {poison_seq}, last device seq {last_seq}, crash seq {} at {} ns",
        t0.elapsed(),
        all.len(),
        a.1,
        b.1,
        crash.seq,
        crash.wall_time_ns
    );
    Recorded {
        store_url: format!("file://{}", store_dir.display()),
        snaps: vec![a, b],
        poison_seq,
        last_seq,
        crash_seq: crash.seq,
        crash_ns: crash.wall_time_ns,
    }
}

/// The `[[tokens]]` and `[[tenants]]` both services share.
fn tenancy() -> String {
    format!(
        r#"
[[tokens]]
token = "{TOKEN_A}"
tenant = "demo"
[[tokens]]
token = "{TOKEN_B}"
tenant = "other"
[[tokens]]
token = "{TOKEN_EXPIRED}"
tenant = "demo"
expires_at = "{EXPIRED_AT}"
[[tenants]]
name = "demo"
instance_prefix = "kv-"
[[tenants]]
name = "other"
instances = ["other-1"]
"#
    )
}

#[test]
fn console_in_chromium_against_a_recorded_demo_linux() {
    require_prerequisites();
    let image_dir = vmr_testkit::guest::demo_linux_dir().unwrap_or_else(|e| panic!("{e}"));
    let image = MachineImage::load(&image_dir).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let root = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kafka = Kafka::start();
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        let _ = ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")])
            .status();
    }
    let r = record(&kafka, root, &ns);
    kafka.send(&common::synthetic("other-1", 30, |seq| {
        format!("synthetic frame {seq}").into_bytes()
    }));

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
{tenancy}"#,
        work = work.display(),
        bootstrap = kafka.bootstrap(),
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
        tenancy = tenancy(),
    );
    let replayer_config = root.join("replayer.toml");
    std::fs::write(&replayer_config, config).expect("write config");
    let mut replayer = Replayer::new(
        replayer_config,
        format!("127.0.0.1:{}", free_port()),
        root.join("replayer.log"),
    );
    replayer.start();

    // The replayer refuses the expired token by its expiry.
    let refused = rt.block_on(async {
        let mut c = common::connect(&replayer.addr)
            .await
            .unwrap_or_else(|e| panic!("connect to the replayer: {e}"));
        c.list_clones(authed(TOKEN_EXPIRED, pb::ListClonesRequest {}))
            .await
            .expect_err("an expired token is refused")
    });
    assert_eq!(
        (refused.code(), refused.message()),
        (tonic::Code::Unauthenticated, "token expired"),
        "{refused:?}"
    );

    // The console, with the same tenancy.
    let console_addr = format!("127.0.0.1:{}", free_port());
    let console_config = root.join("console.toml");
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
{tenancy}"#,
            replayer = replayer.addr,
            bootstrap = kafka.bootstrap(),
            store = r.store_url,
            tenancy = tenancy(),
        ),
    )
    .expect("write the console config");
    let console_log = root.join("console.log");
    let _console = start_console(&console_config, &console_addr, &console_log);

    // The browser session.
    let images = workspace_root().join("docs").join("images");
    std::fs::create_dir_all(&images).expect("docs/images");
    let mut clones = std::collections::BTreeSet::new();
    let snaps = |f: &dyn Fn(&(String, u64, u64)) -> String| {
        r.snaps.iter().map(f).collect::<Vec<_>>().join(",")
    };
    let session = run_driver(
        "demo_linux.py",
        &[
            ("CONSOLE_URL", format!("http://{console_addr}")),
            ("TOKEN_A", TOKEN_A.into()),
            ("TOKEN_B", TOKEN_B.into()),
            ("TOKEN_EXPIRED", TOKEN_EXPIRED.into()),
            ("EXPIRED_AT", EXPIRED_AT.into()),
            ("INSTANCE", INSTANCE.into()),
            ("SNAP_IDS", snaps(&|s| s.0.clone())),
            ("SNAP_CUTS", snaps(&|s| s.1.to_string())),
            ("SNAP_TIMES", snaps(&|s| s.2.to_string())),
            ("POISON_SEQ", r.poison_seq.to_string()),
            ("LAST_SEQ", r.last_seq.to_string()),
            ("CRASH_SEQ", r.crash_seq.to_string()),
            ("CRASH_NS", r.crash_ns.to_string()),
            ("SCREENSHOTS", images.display().to_string()),
            ("FAILURE_DIR", root.display().to_string()),
        ],
        DRIVER_TIMEOUT,
        |words| match words {
            ["get-clone", id] => {
                clones.insert(id.to_string());
                get_clone(&rt, &replayer.addr, TOKEN_A, id)
            }
            ["stop-replayer"] => {
                replayer.stop();
                "stopped".into()
            }
            ["start-replayer"] => {
                replayer.start();
                "started".into()
            }
            ["produce", id] => {
                kafka.send(&common::synthetic(id, 40, |seq| {
                    format!("synthetic frame {seq}").into_bytes()
                }));
                "produced".into()
            }
            // A request to the live clone's service from inside its
            // namespace (never the original's network).
            ["kv", netns, rest @ ..] => {
                let path = PathBuf::from("/run/netns").join(netns);
                match kv::request(&path, &rest.join(" "), Duration::from_secs(60)) {
                    Ok((reply, _)) => reply,
                    Err(e) => format!("error: {e}"),
                }
            }
            other => format!("unknown action {other:?}"),
        },
    );
    replayer.stop();
    let log = std::fs::read_to_string(&console_log).unwrap_or_default();
    let passed = session.passed;
    if let Err(f) = session.verdict {
        let rlog = std::fs::read_to_string(root.join("replayer.log")).unwrap_or_default();
        let tail: String = rlog
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{f}\npassed: {passed:#?}\nconsole log:\n{log}\nreplayer log (tail):\n{tail}");
    }
    assert!(passed.len() >= 10, "too few checks passed: {passed:#?}");
    let left = netns_list();
    for id in &clones {
        assert!(
            !left.contains(&format!("vmr-{id}")),
            "clone {id}'s namespace is left: {left}"
        );
    }
}
