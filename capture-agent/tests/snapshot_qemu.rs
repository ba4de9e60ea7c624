//! The snapshot cut of a recorded demo-linux guest under QEMU (TCG), end to
//! end: the agent's engine pauses the guest, checkpoints both backends,
//! saves QEMU's migration stream, resumes, packs the frozen disk layer and
//! uploads it to a `file://` store with the manifest, and publishes the
//! manifest on `vmr.snapshots.v1`, while a peer keeps the guest's service
//! busy.
//!
//! Checked against the recorded stream in Kafka (the rdkafka consumer of
//! `common`): every block write with `seq <= seq_at_cut` is in the
//! snapshot's disk (the restored layer chain, sector by sector, newest
//! write first), every event after the cut sits at or after the manifest's
//! offset of its topic, and the snapshot's disk chain (image + packed
//! layer, downloaded and verified) hashes the same as the original's
//! frozen chain. Then the snapshot is restored into a new QEMU with its own
//! backends (the disk on the downloaded layer chain with a private top
//! layer, the NIC in a namespace of its own) and the clone answers a `GET`
//! of a key written before the cut. The guest's `DIRTY` request is checked
//! too: its answers to good and bad counts, its pages in the snapshot's
//! memory stream, and its answer in the clone.
//!
//! Heavy: root, qemu-system-x86_64, demo-linux, Tansu and the workspace
//! binaries (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test snapshot_qemu -- --test-threads=1`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::{
    demo_linux_image_dir, enter_netns, qemu_binary, request, wait_for_records, Stack, SERVICE,
};
use sha2::{Digest, Sha256};
use vmr_hypervisor::Accel;
use vmr_proto::{pb, InstanceId};
use vmr_testkit::qemu::NetNs;

const PEER_CIDR: &str = "192.168.77.1/24";
const PEER_MAC: &str = "02:00:00:77:00:01";

fn disk_hash(image: &Path, layers: &[PathBuf]) -> (String, vhost_tap::blk::Disk) {
    let d = vhost_tap::blk::Disk::open_chain(image, layers, None, true).expect("the chain opens");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < d.size() {
        let n = (d.size() - at).min(buf.len() as u64) as usize;
        d.read(at, &mut buf[..n]).expect("read the chain");
        h.update(&buf[..n]);
        at += n as u64;
    }
    (format!("{:x}", h.finalize()), d)
}

#[test]
fn snapshot_of_a_busy_demo_linux_guest_matches_the_recorded_stream() {
    let qemu = qemu_binary();
    let image = demo_linux_image_dir();
    let blk_bin = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    vmr_testkit::workspace_bin("vhost-tap-net")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let stack = Stack::start();
    let work = tempfile::tempdir().expect("a temp dir");
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).expect("the test config parses");
    let ns = NetNs::create().expect("create a network namespace (needs root and iproute2)");
    let inst = "vm-snap-1";

    let mut opts = LaunchOptions::new(
        &image,
        InstanceId::new(inst).unwrap(),
        "qemu",
        w.join("data"),
    );
    opts.netns = Some(ns.name().to_string());
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.accel = Accel::Tcg;
    opts.qemu_binary = Some(qemu);
    opts.supervisor.bin_dir = blk_bin.parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(30);
    let rec = Arc::new(
        RecordedInstance::launch(opts)
            .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e))),
    );
    ns.wait_for_link("vmrtap0", Duration::from_secs(60))
        .expect("the TAP appears in the namespace");
    ns.ip(&["link", "set", "dev", "vmrtap0", "address", PEER_MAC])
        .expect("set the peer MAC");
    ns.configure("vmrtap0", PEER_CIDR)
        .expect("configure the peer");
    let reply = request(&ns, "PUT warm up").unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.starts_with("OK "), "first PUT: {reply:?}");
    let slot: u32 = reply
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no slot in {reply:?}"));
    // The service dirties guest memory on request (checked in the
    // snapshot's memory stream below) and refuses bad counts.
    for (line, want) in [
        ("DIRTY 64", "OK dirty 64"),
        ("DIRTY 0", "ERR badcount"),
        ("DIRTY 064", "ERR badcount"),
        ("DIRTY x", "ERR badcount"),
        ("DIRTY 99999999", "ERR toomany max="),
        ("DIRTY", "ERR usage"),
    ] {
        let got = request(&ns, line).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            got.starts_with(want),
            "{line}: {got:?}, want {want:?} (an image without DIRTY needs guest/linux/build.sh)"
        );
    }

    // Keep the service busy while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let busy = {
        let (stop, puts, nsp) = (stop.clone(), puts.clone(), ns.path());
        std::thread::spawn(move || {
            enter_netns(&nsp).expect("enter the namespace");
            let addr: SocketAddr = SERVICE.parse().unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = (&s).write_all(format!("PUT busy{i} v{i}\n").as_bytes());
                    let mut r = String::new();
                    let _ = BufReader::new(&s).read_line(&mut r);
                    if r.starts_with("OK ") {
                        puts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let t = Instant::now();
    while puts.load(Ordering::Relaxed) < 3 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        puts.load(Ordering::Relaxed) >= 3,
        "the busy client got no answers"
    );

    let store_dir = w.join("store");
    let engine = SnapshotEngine::new(EngineConfig::local(
        &store_dir,
        &w.join("engine"),
        cfg.endpoints.clone(),
    ))
    .expect("the engine starts");
    let t = Instant::now();
    let op = engine
        .take_and_wait(
            rec.clone(),
            SnapshotRequest {
                incremental: false,
                pin: false,
            },
            Duration::from_secs(300),
        )
        .expect("the snapshot finishes");
    eprintln!("snapshot operation in {:?}: {op:?}", t.elapsed());
    assert_eq!(op.state, OperationState::Succeeded, "{:?}", op.error);
    let m = engine
        .manifests(inst)
        .unwrap()
        .pop()
        .expect("a manifest in the store");
    eprintln!(
        "snapshot {} seq_at_cut {} pause {} us, offsets {:?}",
        m.snapshot_id, m.seq_at_cut, m.pause_us, m.offsets
    );
    assert!(m.seq_at_cut > 0);
    assert_eq!(m.driver, "qemu");
    assert_eq!(m.offsets.len(), 4, "one offset per event topic");
    let layers = m.disk_layers();
    assert_eq!(layers.len(), 1, "one frozen layer of vda");
    let after_puts = puts.load(Ordering::Relaxed);
    // The guest runs on after the cut.
    let t = Instant::now();
    while puts.load(Ordering::Relaxed) < after_puts + 3 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        puts.load(Ordering::Relaxed) >= after_puts + 3,
        "the guest stopped answering after the snapshot"
    );
    stop.store(true, Ordering::Release);
    busy.join().unwrap();

    // The snapshot's disk, downloaded and verified, equals the original's
    // disk at the cut (the image under the frozen layer).
    let dest = w.join("restore");
    let rt = common::runtime();
    let mat = rt
        .block_on(vmr_snapshot::materialize(
            engine.store(),
            inst,
            &vmr_snapshot::Selector::Latest,
            &dest,
            &vmr_snapshot::RestoreOptions::default(),
        ))
        .expect("the snapshot materialises");
    // demo-linux's disk is blank: the instance's image file is the zeroed
    // disk the layers lie on.
    let image_file = w.join("data").join(inst).join("vda.img");
    let restored: Vec<PathBuf> = mat.disk_layers.iter().map(|l| l.path.clone()).collect();
    let (h_snap, snap_disk) = disk_hash(&image_file, &restored);
    let frozen = w.join("data").join(inst).join("vda.layers").join("base");
    let (h_orig, _) = disk_hash(&image_file, &[frozen]);
    eprintln!("disk at the cut: {h_snap}");
    assert_eq!(
        h_snap, h_orig,
        "the snapshot's disk differs from the original's at the cut"
    );

    // The pages the first DIRTY wrote ("vmr-dirty 1\n" repeated) are in
    // the snapshot's memory: QEMU's stream carries each page's 4096 bytes
    // contiguously, and any page of them holds 60 whole lines.
    let vmstate = std::fs::read(mat.snapshot_dir.join("vmstate")).expect("the memory stream");
    let needle = "vmr-dirty 1\n".repeat(60).into_bytes();
    assert!(
        vmstate
            .windows(needle.len())
            .any(|w| w == needle.as_slice()),
        "the dirtied pages are not in the snapshot's memory stream"
    );
    drop(vmstate);

    let report = rec.shutdown();
    eprintln!("stop: {:?}", report.exit);

    // The recorded stream.
    let bootstrap = stack.broker.bootstrap();
    let got = wait_for_records(&bootstrap, inst, 1, Duration::from_secs(60));
    let mine: Vec<_> = got.iter().filter(|g| g.key == inst).collect();
    let offsets: BTreeMap<&str, i64> = m
        .offsets
        .iter()
        .map(|o| (o.topic.as_str(), o.next_offset))
        .collect();
    let mut before = 0;
    let mut after = 0;
    let mut sectors: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
    for g in &mine {
        if g.event.seq > m.seq_at_cut {
            after += 1;
            assert!(
                g.offset >= offsets[g.topic.as_str()],
                "seq {} after the cut is at {}:{} before the manifest's offset {}",
                g.event.seq,
                g.topic,
                g.offset,
                offsets[g.topic.as_str()]
            );
            continue;
        }
        before += 1;
        if let Some(pb::event::Payload::Block(b)) = &g.event.payload {
            if b.op == pb::BlockOp::Write as i32 && b.status == pb::BlockStatus::Ok as i32 {
                for (i, chunk) in b.data.chunks(512).enumerate() {
                    let s = b.sector + i as u64;
                    let e = sectors.entry(s).or_insert((0, Vec::new()));
                    if g.event.seq > e.0 {
                        *e = (g.event.seq, chunk.to_vec());
                    }
                }
            }
        }
    }
    let snapshot_event = mine.iter().find(|g| {
        matches!(&g.event.payload,
        Some(pb::event::Payload::Lifecycle(l)) if l.kind == pb::LifecycleKind::Snapshot as i32)
    });
    let snapshot_event = snapshot_event.expect("a Snapshot lifecycle event was recorded");
    assert!(snapshot_event.event.seq > m.seq_at_cut);
    eprintln!(
        "{before} events up to the cut, {after} after; {} sectors written before the cut",
        sectors.len()
    );
    assert!(!sectors.is_empty(), "no block writes before the cut");
    assert!(after > 0, "no events after the cut");
    let mut buf = vec![0u8; 512];
    for (s, (seq, data)) in &sectors {
        snap_disk.read(s * 512, &mut buf[..data.len()]).unwrap();
        assert!(
            buf[..data.len()] == data[..],
            "sector {s} in the snapshot differs from the write with seq {seq} <= seq_at_cut"
        );
    }
    drop(ns);

    // Restore into a new QEMU with its own backends: the disk on the
    // snapshot's chain with a private top layer, the NIC in a namespace of
    // its own (the clone keeps the original's address).
    let cns = NetNs::create().expect("a namespace for the clone");
    let cdir = w.join("clone");
    std::fs::create_dir_all(&cdir).unwrap();
    let spawn = |name: &str, args: Vec<std::ffi::OsString>| {
        let bin = vmr_testkit::workspace_bin(name).unwrap();
        let sock = cdir.join(format!("{name}.sock"));
        let log = std::fs::File::create(cdir.join(format!("{name}.log"))).unwrap();
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--socket")
            .arg(&sock)
            .arg("--instance-id")
            .arg("vm-snap-clone")
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut g = vmr_testkit::ChildGuard::spawn(name, &mut cmd).expect("start a backend");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                g.try_wait().is_none(),
                "{name} exited; see {}",
                cdir.display()
            );
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{name} did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    };
    let mut blk_args: Vec<std::ffi::OsString> = vec!["--image".into(), image_file.clone().into()];
    for l in &restored {
        blk_args.push("--layer".into());
        blk_args.push(l.clone().into());
    }
    blk_args.extend([
        "--overlay".into(),
        cdir.join("vda.top").into(),
        "--device".into(),
        "vda".into(),
    ]);
    let _blk = spawn("vhost-tap-blk", blk_args);
    let _net = spawn(
        "vhost-tap-net",
        [
            "--tap",
            "vmrtap0",
            "--netns",
            cns.name(),
            "--device",
            "net0",
        ]
        .iter()
        .map(Into::into)
        .collect(),
    );
    let machine = vmr_hypervisor::image::MachineImage::load(&image).unwrap();
    let mut spec = machine
        .instance_spec("qemu", "vm-snap-clone", &cdir.join("work"), |d| {
            if d == "vda" {
                cdir.join("vhost-tap-blk.sock")
            } else {
                cdir.join("vhost-tap-net.sock")
            }
        })
        .unwrap();
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    spec.qemu.accel = Accel::Tcg;
    spec.qemu.binary = Some(qemu_binary());
    let t = Instant::now();
    let clone = vmr_hypervisor::driver("qemu")
        .unwrap()
        .restore(&spec, &mat.snapshot_dir)
        .unwrap_or_else(|e| panic!("restore: {}", vmr_hypervisor::error_chain(&e)));
    clone.resume().expect("the clone resumes");
    eprintln!("clone running {:?} after the restore started", t.elapsed());
    cns.wait_for_link("vmrtap0", Duration::from_secs(60))
        .unwrap();
    cns.ip(&["link", "set", "dev", "vmrtap0", "address", PEER_MAC])
        .unwrap();
    cns.configure("vmrtap0", PEER_CIDR).unwrap();
    let got = request(&cns, &format!("GET {slot}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        got,
        format!("VAL {slot} warm up"),
        "the restored guest's answer"
    );
    let put = request(&cns, "PUT in clone").unwrap_or_else(|e| panic!("{e}"));
    assert!(put.starts_with("OK "), "clone PUT: {put:?}");
    let dirty = request(&cns, "DIRTY 64").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dirty, "OK dirty 64", "clone DIRTY");
    let _ = clone.stop(Duration::from_secs(5));
    drop(cns);
}
