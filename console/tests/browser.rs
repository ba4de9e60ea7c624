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
//! recording (`produce-shop-2`). Its screenshots stay in the test's
//! temporary directory; the ones in `docs/images/` come from the demo-linux
//! session (`tests/demo_linux.rs`).
//!
//! Heavy: needs /dev/kvm, root (network namespaces), python3 with selenium,
//! chromium and chromedriver (Debian's `chromium`, `chromium-driver`),
//! iproute2, the Tansu broker, and the replayer, schema-registry and
//! vhost-tap binaries (`cargo build -p replayer -p schema-registry -p vhost-tap`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{get_clone, netns_list, now_ns, run_driver, start_console, Kafka, Replayer};
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, DiskSpec, Instance, InstanceSpec, NicSpec, SnapshotOptions};
use vmr_proto::topics::partition_for;
use vmr_proto::{Direction, Event, Lifecycle, LifecycleKind, Payload};
use vmr_testkit::broker::TEST_EVENT_PARTITIONS;
use vmr_testkit::capture::{ethernet, records};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};
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
    common::require_root("network namespaces");
    common::require_browser();
}

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, WAIT, f)
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

/// A few synthetic events of `instance`, `n` events from `seq` 1, 20 ms
/// apart, ending now.
fn synthetic(instance: &str, n: u64) -> Vec<Event> {
    common::synthetic(instance, n, |seq| {
        request(format!("synthetic {seq}").as_bytes())
    })
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
    let mut clones = std::collections::BTreeSet::new();
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
    let mut replayer = Replayer::new(
        replayer_config,
        format!("127.0.0.1:{}", free_port()),
        dir.join("replayer.log"),
    );
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
    let console_log = dir.join("console.log");
    let _console = start_console(&console_config, &console_addr, &console_log);

    // The browser session.
    let session = run_driver(
        "browser.py",
        &[
            ("CONSOLE_URL", format!("http://{console_addr}")),
            ("TOKEN_A", TOKEN_A.into()),
            ("TOKEN_B", TOKEN_B.into()),
            ("INSTANCE", INSTANCE.into()),
            ("CUTS", format!("{},{}", recorded.cuts[0], recorded.cuts[1])),
            ("POISON_SEQ", recorded.poison_seq.to_string()),
            ("CRASH_SEQ", recorded.crash_seq.to_string()),
            ("SCREENSHOTS", dir.display().to_string()),
            ("FAILURE_DIR", dir.display().to_string()),
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
            ["produce-shop-2"] => {
                kafka.send(&synthetic("shop-2", 40));
                "produced".into()
            }
            other => format!("unknown action {other:?}"),
        },
    );
    replayer.stop();
    let log = std::fs::read_to_string(&console_log).unwrap_or_default();
    let passed = session.passed;
    if let Err(f) = session.verdict {
        panic!("{f}\npassed: {passed:#?}\nconsole log:\n{log}");
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
