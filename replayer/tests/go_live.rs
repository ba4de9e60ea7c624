//! Going live with a two-NIC clone: a microVM with a disk and two NICs is
//! recorded by capture-mode backends (the test guest drives the first NIC;
//! the second is present in the machine and its snapshot), a request is
//! sent to the first NIC after the snapshot, and a clone of it is replayed
//! through the `replayer` binary and then made live: both of the
//! namespace's interfaces come up with the image's peer addresses, the
//! first with the recorded peer's MAC, and `Clone.access` lists both.
//! Before that, a go-live whose second NIC's interface is missing is
//! refused naming that NIC, with the first NIC put back and the clone still
//! `FINISHED`.
//!
//! Heavy: needs /dev/kvm, root (network namespaces), python3, iproute2, the
//! Tansu broker, the schema-registry and vhost-tap binaries
//! (`cargo build -p schema-registry -p vhost-tap`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Recording, PARTITIONS};
use tonic::Request;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, DiskSpec, InstanceSpec, NicSpec, SnapshotOptions};
use vmr_proto::pb::replayer_client::ReplayerClient;
use vmr_proto::{pb, topics::partition_for, Event};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};
use vmr_vmm::guest_abi::build_test_guest;

const CMD_NET_DISK: u32 = 0x10;
const GUEST_MACS: [[u8; 6]; 2] = [
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x57],
];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const TAPS: [&str; 2] = ["vmrg0", "vmrg1"];
const WAIT: Duration = Duration::from_secs(60);
const INSTANCE: &str = "shop-2nic";
const TOKEN: &str = "token-of-tenant-shop-0001";

use common::require_prerequisites;

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, WAIT, f)
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (iproute2, python3 and root are required): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn send(ns: &NetNs, tap: &str, frame: &[u8]) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    output(ns.command("python3").args([
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind((sys.argv[1],0))\ns.send(bytes.fromhex(sys.argv[2]))",
        tap,
        &hex,
    ]));
}

fn request(payload: &[u8]) -> Vec<u8> {
    let mut f = GUEST_MACS[0].to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
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

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    r
}

fn netns_list() -> String {
    output(Command::new("ip").args(["netns", "list"]))
}

/// Records the two-NIC machine, ships its events and stores snapshot 0001;
/// returns the store's URL.
fn record(rec: &Recording, dir: &Path, elf: &Path, rt: &tokio::runtime::Runtime) -> String {
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        output(
            ns.command("sysctl")
                .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]),
        );
    }
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("temp dir is writable");
    let seq_file = dir.join("orig.seq");
    let bin = |n: &str| workspace_bin(n).unwrap_or_else(|e| panic!("{e}"));
    let blk_sock = dir.join("blk.sock");
    let blk_cap = dir.join("blk.events");
    let mut blk = Command::new(bin("vhost-tap-blk"));
    blk.arg("--socket").arg(&blk_sock).arg("--image").arg(&disk);
    blk.args([
        "--mode",
        "capture",
        "--instance-id",
        INSTANCE,
        "--device",
        "vda",
    ]);
    blk.args(["--seq-lease", "1"]);
    blk.arg("--capture")
        .arg(&blk_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    let mut guards =
        vec![ChildGuard::spawn("vhost-tap-blk", &mut blk).unwrap_or_else(|e| panic!("{e}"))];
    let mut caps = vec![blk_cap.clone()];
    let mut socks = vec![blk_sock.clone()];
    for (i, tap) in TAPS.iter().enumerate() {
        let sock = dir.join(format!("net{i}.sock"));
        let cap = dir.join(format!("net{i}.events"));
        let mut net = Command::new(bin("vhost-tap-net"));
        net.arg("--socket").arg(&sock);
        net.args(["--mode", "capture", "--instance-id", INSTANCE]);
        net.args(["--device", &format!("net{i}"), "--seq-lease", "1"]);
        net.arg("--capture")
            .arg(&cap)
            .arg("--seq-file")
            .arg(&seq_file);
        net.args(["--tap", tap, "--netns", ns.name()]);
        guards.push(
            ChildGuard::spawn(format!("vhost-tap-net net{i}"), &mut net)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        caps.push(cap);
        socks.push(sock);
    }
    for s in &socks {
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
        socket: blk_sock,
    });
    for (i, mac) in GUEST_MACS.iter().enumerate() {
        spec.nics.push(NicSpec {
            name: format!("net{i}"),
            socket: socks[i + 1].clone(),
            mac: vmr_hypervisor::MacAddr(*mac),
        });
    }
    let drv = vmr_hypervisor::driver("microvm").expect("the microvm driver exists");
    let orig = drv.launch(&spec).expect("launch the two-NIC original");
    orig.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
        .ports()
        .push_commands(&[CMD_NET_DISK]);
    wait_console(orig.as_ref(), "vmr-guest: net ready");
    for tap in TAPS {
        ns.wait_for_link(tap, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        ns.ip(&["link", "set", tap, "up"])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    orig.snapshot(&snap, SnapshotOptions::default())
        .expect("snapshot of the two-NIC machine");
    std::thread::sleep(Duration::from_millis(500));
    let layer = dir.join("vda-at-cut.raw");
    std::fs::copy(&disk, &layer).expect("disk copy at the cut");
    let events_of = |caps: &[std::path::PathBuf]| -> Vec<Event> {
        caps.iter()
            .flat_map(|p| replayer::clone::read_capture(p))
            .collect()
    };
    let seq_at_cut = events_of(&caps).iter().map(|e| e.seq).max().unwrap_or(0);
    // A request on the first NIC after the cut: the window's received
    // frame, whose source MAC the first live interface takes.
    send(&ns, TAPS[0], &request(b"request 0: after the snapshot"));
    wait_console(orig.as_ref(), "vmr-guest: request 0000000000000000 done");
    orig.stop(Duration::from_secs(5))
        .expect("stop the original");
    for mut g in guards {
        g.stop(Duration::from_secs(5));
    }
    let mut all = events_of(&caps);
    all.sort_by_key(|e| e.seq);
    assert!(
        all.iter().any(|e| e.seq > seq_at_cut),
        "events after the cut"
    );
    let offsets = rec.send(&all);
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (e, off) in all.iter().zip(&offsets) {
        let n = next.entry(e.topic()).or_insert(-1);
        if e.seq <= seq_at_cut {
            *n = off + 1;
        } else if *n < 0 {
            *n = *off;
        }
    }
    let part = partition_for(INSTANCE, PARTITIONS);
    let store_dir = dir.join("store");
    let store_url = format!("file://{}", store_dir.display());
    let store =
        vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(store_url.clone()))
            .expect("open the store");
    let req = vmr_snapshot::UploadRequest {
        dir: snap,
        snapshot_id: "0001".into(),
        image: "two-nic-guest".into(),
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
    rt.block_on(vmr_snapshot::upload(
        &store,
        &req,
        &vmr_snapshot::no_progress,
    ))
    .expect("upload the snapshot");
    store_url
}

#[test]
fn go_live_sets_up_every_nic_of_a_two_nic_clone() {
    require_prerequisites();
    let elf = build_test_guest(
        &std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest-2nic"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rec = Recording::start();
    let store_url = record(&rec, dir, &elf, &rt);

    let work = dir.join("replayer-work");
    let config = format!(
        r#"
work_dir = "{work}"
max_clones = 2
[kafka]
bootstrap_servers = "{bootstrap}"
[store]
url = "{store_url}"
[backends]
blk = "{blk}"
net = "{net}"
[[images]]
name = "two-nic-guest"
kernel = "{kernel}"
memory_mib = 32
nics = [
  {{ name = "net0", mac = "52:54:00:12:34:56", ip = "192.168.77.2/24", peer = "192.168.77.1" }},
  {{ name = "net1", mac = "52:54:00:12:34:57", ip = "192.168.78.2/24", peer = "192.168.78.1" }},
]
[[tokens]]
token = "{TOKEN}"
tenant = "shop"
[[tenants]]
name = "shop"
instance_prefix = "shop-"
"#,
        work = work.display(),
        bootstrap = rec.bootstrap(),
        blk = workspace_bin("vhost-tap-blk")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        net = workspace_bin("vhost-tap-net")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        kernel = elf.display(),
    );
    let config_path = dir.join("replayer.toml");
    std::fs::write(&config_path, config).expect("write config");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = ChildGuard::spawn(
        "replayer",
        Command::new(env!("CARGO_BIN_EXE_replayer"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{addr}");
    rt.block_on(async {
        let start = Instant::now();
        let channel = loop {
            match tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < WAIT, "the replayer never listened: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut c = ReplayerClient::new(channel);
        let clone = c
            .create_clone(authed(pb::CreateCloneRequest {
                instance_id: INSTANCE.into(),
                speed: Some(pb::Speed {
                    speed: Some(pb::speed::Speed::AsFastAsPossible(true)),
                }),
                ..Default::default()
            }))
            .await
            .expect("a clone of the two-NIC machine")
            .into_inner();
        let id = clone.clone_id.clone();
        let access = clone.access.clone().expect("access");
        assert_eq!(access.nics.len(), 2, "{access:?}");
        assert_eq!(
            access.nics[0].peer_mac, "02:00:00:00:00:01",
            "the first NIC's recorded peer: {access:?}"
        );
        let start = Instant::now();
        let done = loop {
            let s = c
                .get_clone(authed(pb::GetCloneRequest {
                    clone_id: id.clone(),
                }))
                .await
                .expect("get")
                .into_inner();
            if s.state == pb::CloneState::Finished as i32 {
                break s;
            }
            assert!(
                s.state == pb::CloneState::Replaying as i32,
                "the replay ended otherwise: {s:?}"
            );
            assert!(start.elapsed() < WAIT, "the replay never finished: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            done.frames_acknowledged >= 1,
            "the request frame was acknowledged: {done:?}"
        );
        // A go-live that fails at the second NIC (its namespace interface
        // is gone) puts the first back and leaves the clone as it was.
        let ns = access.netns.clone();
        let ip_ns = |args: &[&str]| output(Command::new("ip").args(["-n", &ns]).args(args));
        let mac_of = |link: &str| {
            link.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| panic!("no MAC in {link}"))
        };
        let own_mac0 = mac_of(&ip_ns(&["-o", "link", "show", "dev", "vmrlive0"]));
        ip_ns(&["link", "set", "dev", "vmrlive1", "down"]);
        ip_ns(&["link", "set", "dev", "vmrlive1", "name", "vmrhide1"]);
        let refused = c
            .control(authed(pb::ControlRequest {
                clone_id: id.clone(),
                action: pb::ControlAction::GoLive as i32,
                ..Default::default()
            }))
            .await
            .expect_err("going live without the second NIC's interface");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains("NIC net1 (namespace interface vmrlive1)"),
            "the error names the NIC: {refused:?}"
        );
        let kept = c
            .get_clone(authed(pb::GetCloneRequest {
                clone_id: id.clone(),
            }))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            kept.state,
            pb::CloneState::Finished as i32,
            "the clone is as before the failed go-live: {kept:?}"
        );
        let link0 = ip_ns(&["-o", "link", "show", "dev", "vmrlive0"]);
        assert_eq!(
            mac_of(&link0),
            own_mac0,
            "vmrlive0 has its own MAC back: {link0}"
        );
        let addrs0 = ip_ns(&["-o", "addr", "show", "dev", "vmrlive0"]);
        assert!(
            !addrs0.contains("192.168.77.1"),
            "vmrlive0 has no address after the failed go-live: {addrs0}"
        );
        // With the interface back, going live works.
        ip_ns(&["link", "set", "dev", "vmrhide1", "name", "vmrlive1"]);
        let live = c
            .control(authed(pb::ControlRequest {
                clone_id: id.clone(),
                action: pb::ControlAction::GoLive as i32,
                ..Default::default()
            }))
            .await
            .expect("go live")
            .into_inner();
        assert_eq!(live.state, pb::CloneState::Live as i32, "{live:?}");
        let acc = live.access.expect("access");
        let netns = acc.netns.clone();
        assert_eq!(
            acc.nics
                .iter()
                .map(|n| n.interface.as_str())
                .collect::<Vec<_>>(),
            ["vmrlive0", "vmrlive1"],
            "{acc:?}"
        );
        for (i, peer) in ["192.168.77.1/24", "192.168.78.1/24"].iter().enumerate() {
            let tap = format!("vmrlive{i}");
            let addrs =
                output(Command::new("ip").args(["-n", &netns, "-o", "addr", "show", "dev", &tap]));
            assert!(addrs.contains(peer), "{tap} has {peer}: {addrs}");
            let link = output(Command::new("ip").args(["-n", &netns, "link", "show", "dev", &tap]));
            assert!(
                link.contains(",UP") || link.contains("<UP"),
                "{tap} is up: {link}"
            );
            if i == 0 {
                assert!(
                    link.contains("02:00:00:00:00:01"),
                    "{tap} has the recorded peer's MAC: {link}"
                );
            }
            eprintln!("live {tap}: {}", addrs.trim());
        }
        c.delete_clone(authed(pb::DeleteCloneRequest {
            clone_id: id.clone(),
        }))
        .await
        .expect("delete");
        assert!(!netns_list().contains(&netns), "{}", netns_list());

        // A clone made live before its replay began has no replay left to
        // start: START is refused and the clone stays live.
        let ready = c
            .create_clone(authed(pb::CreateCloneRequest {
                instance_id: INSTANCE.into(),
                start_paused: true,
                ..Default::default()
            }))
            .await
            .expect("a clone that waits for START")
            .into_inner();
        assert_eq!(ready.state, pb::CloneState::Ready as i32, "{ready:?}");
        let rid = ready.clone_id.clone();
        let action = |action: pb::ControlAction| {
            authed(pb::ControlRequest {
                clone_id: rid.clone(),
                action: action as i32,
                ..Default::default()
            })
        };
        let live = c
            .control(action(pb::ControlAction::GoLive))
            .await
            .expect("go live before the replay began")
            .into_inner();
        assert_eq!(live.state, pb::CloneState::Live as i32, "{live:?}");
        let refused = c
            .control(action(pb::ControlAction::Start))
            .await
            .expect_err("START on a live clone");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("the replay has ended"),
            "{refused:?}"
        );
        let still = c
            .get_clone(authed(pb::GetCloneRequest {
                clone_id: rid.clone(),
            }))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(still.state, pb::CloneState::Live as i32, "{still:?}");
        c.delete_clone(authed(pb::DeleteCloneRequest {
            clone_id: rid.clone(),
        }))
        .await
        .expect("delete the live clone");
    });
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < WAIT,
            "the replayer did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "replayer exit: {status}");
    assert!(
        !netns_list().contains("vmr-c"),
        "namespaces left: {}",
        netns_list()
    );
}
