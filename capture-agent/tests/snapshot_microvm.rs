//! The snapshot engine on the built-in microVM with the freestanding test
//! guest (a 1 MiB `vda` on a vhost-tap backend): an incremental chain of
//! three snapshots restored from the last link with the disk on the
//! downloaded layer chain, and staggered schedules on two instances with
//! retention (keep the newest two) and a pinned snapshot.
//!
//! Needs /dev/kvm, the Tansu broker (scripts/setup.sh) and the workspace
//! binaries (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test snapshot_microvm -- --test-threads=1`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotControl, SnapshotRequest};
use capture_agent::snapshot::schedule::Schedule;
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::Stack;
use vm_memory::{Bytes, GuestAddress};
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::Instance;
use vmr_proto::InstanceId;
use vmr_vmm::guest_abi::{ARENA_GPA, CMD_DIRTY, END_OF_LIST};

const WAIT: Duration = Duration::from_secs(60);

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

fn test_guest_image(root: &Path) -> PathBuf {
    let tg = root.join("test-guest");
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
    tg
}

fn launch(
    stack: &Stack,
    cfg: &AgentConfig,
    image: &Path,
    data: &Path,
    id: &str,
) -> Arc<RecordedInstance> {
    let blk = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let _ = stack;
    let mut opts = LaunchOptions::new(image, InstanceId::new(id).unwrap(), "microvm", data);
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.supervisor.bin_dir = blk.parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(10);
    Arc::new(
        RecordedInstance::launch(opts)
            .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e))),
    )
}

fn microvm(inst: &dyn Instance) -> &MicrovmInstance {
    inst.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
}

fn arena(page: u32) -> u64 {
    ARENA_GPA + u64::from(page) * 4096
}

fn read_u64(inst: &MicrovmInstance, gpa: u64) -> u64 {
    let vm = inst.vmm().expect("running");
    vm.memory()
        .guest_memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("address inside guest memory")
}

fn dirty(inst: &MicrovmInstance, pages: &[u32]) {
    let mut words = vec![CMD_DIRTY];
    words.extend_from_slice(pages);
    words.push(END_OF_LIST);
    let before = inst.ports().with(|s| s.done.len());
    inst.ports().push_commands(&words);
    assert!(
        inst.ports().wait(WAIT, |s| s.done.len() > before),
        "dirty command did not finish"
    );
}

fn wait_ready(inst: &MicrovmInstance) {
    assert!(
        inst.ports().wait(WAIT, |s| s.first_read_at.is_some()),
        "guest never polled its command port"
    );
}

fn take(
    engine: &SnapshotEngine,
    rec: &Arc<RecordedInstance>,
    incremental: bool,
) -> vmr_proto::pb::SnapshotManifest {
    let op = engine
        .take_and_wait(
            rec.clone(),
            SnapshotRequest {
                incremental,
                pin: false,
            },
            Duration::from_secs(120),
        )
        .expect("the snapshot finishes");
    assert_eq!(op.state, OperationState::Succeeded, "{:?}", op.error);
    op.manifest.expect("a manifest")
}

#[test]
fn incremental_chain_of_three_restores_from_the_last_link() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).expect("the test config parses");
    let image = test_guest_image(w);
    let inst = "vm-chain-1";
    let rec = launch(&stack, &cfg, &image, &w.join("data"), inst);
    let guest = rec.guest().unwrap();
    let m = microvm(guest.as_ref());
    wait_ready(m);
    let engine = SnapshotEngine::new(EngineConfig::local(
        &w.join("store"),
        &w.join("engine"),
        cfg.endpoints.clone(),
    ))
    .unwrap();
    let rounds: [&[u32]; 3] = [&[1, 2, 3], &[2, 7], &[3, 9, 11]];
    let mut manifests = Vec::new();
    for (i, pages) in rounds.iter().enumerate() {
        dirty(m, pages);
        let mf = take(&engine, &rec, i > 0);
        eprintln!(
            "{}: memory {} base {:?} pause {} us seq_at_cut {} objects {}",
            mf.snapshot_id,
            mf.memory,
            mf.base_snapshot_id,
            mf.pause_us,
            mf.seq_at_cut,
            mf.objects.len()
        );
        manifests.push(mf);
    }
    assert_eq!(manifests[0].memory, "full");
    assert_eq!(manifests[1].memory, "incremental");
    assert_eq!(manifests[2].memory, "incremental");
    assert_eq!(manifests[1].base_snapshot_id, manifests[0].snapshot_id);
    assert_eq!(manifests[2].base_snapshot_id, manifests[1].snapshot_id);
    // Each snapshot froze one more disk layer; the last names all three.
    let layers: Vec<_> = manifests[2]
        .objects
        .iter()
        .filter(|o| o.kind == "disk_layer")
        .collect();
    assert_eq!(layers.len(), 3, "{layers:?}");
    assert!(manifests[2].seq_at_cut >= manifests[1].seq_at_cut);
    let expect: Vec<(u32, u64)> = [1u32, 2, 3, 7, 9, 11]
        .iter()
        .map(|&p| (p, read_u64(m, arena(p))))
        .collect();
    dirty(m, &[1, 2, 3]); // after the cut: not in the snapshot
    drop(guest);
    let image_file = w.join("data").join(inst).join("vda.img");
    rec.shutdown();

    // Restore from the last link: the memory chain and the disk chain.
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
        .expect("the chain materialises");
    assert_eq!(mat.chain.len(), 3, "{:?}", mat.chain);
    let cdir = w.join("clone");
    std::fs::create_dir_all(&cdir).unwrap();
    let sock = cdir.join("vda.sock");
    let bin = vmr_testkit::workspace_bin("vhost-tap-blk").unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&image_file);
    for l in &mat.disk_layers {
        cmd.arg("--layer").arg(&l.path);
    }
    cmd.arg("--overlay")
        .arg(cdir.join("vda.top"))
        .arg("--device")
        .arg("vda")
        .stdout(std::fs::File::create(cdir.join("blk.log")).unwrap())
        .stderr(std::fs::File::create(cdir.join("blk.err")).unwrap());
    let mut blk = vmr_testkit::ChildGuard::spawn("clone-blk", &mut cmd).unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(blk.try_wait().is_none(), "the clone's disk backend exited");
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let machine = vmr_hypervisor::image::MachineImage::load(&image).unwrap();
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    let spec = machine
        .instance_spec("microvm", "vm-chain-clone", &cdir.join("work"), |_| {
            sock.clone()
        })
        .unwrap();
    let t = Instant::now();
    let clone = vmr_hypervisor::driver("microvm")
        .unwrap()
        .restore(&spec, &mat.snapshot_dir)
        .unwrap_or_else(|e| panic!("restore: {}", vmr_hypervisor::error_chain(&e)));
    eprintln!("restored in {:?}", t.elapsed());
    let mc = microvm(clone.as_ref());
    for &(p, v) in &expect {
        assert_eq!(read_u64(mc, arena(p)), v, "arena page {p} of the clone");
    }
    clone.resume().expect("the clone runs");
    dirty(mc, &[5]);
    assert_ne!(read_u64(mc, arena(5)), 0, "the clone executes guest code");
    clone.stop(Duration::from_secs(5)).unwrap();
}

#[test]
fn staggered_schedules_and_retention_with_a_pinned_snapshot() {
    require_kvm();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("capture_agent=info")
        .with_test_writer()
        .try_init();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).expect("the test config parses");
    let image = test_guest_image(w);
    let a = launch(&stack, &cfg, &image, &w.join("data"), "vm-sched-a");
    let b = launch(&stack, &cfg, &image, &w.join("data"), "vm-sched-b");
    for r in [&a, &b] {
        wait_ready(microvm(r.guest().unwrap().as_ref()));
    }
    let mut ecfg = EngineConfig::local(&w.join("store"), &w.join("engine"), cfg.endpoints.clone());
    ecfg.policy = vmr_snapshot::Policy {
        keep_last: Some(2),
        keep_within: None,
    };
    let engine = SnapshotEngine::new(ecfg).unwrap();
    let period = Duration::from_secs(10);
    let t0 = std::time::SystemTime::now();
    let sched = Schedule::start(
        engine.clone(),
        vec![a.clone(), b.clone()],
        period,
        SnapshotRequest {
            incremental: false,
            pin: false,
        },
    )
    .unwrap();
    // Pin a's first snapshot as soon as it exists.
    let first_a = loop {
        if let Some(m) = engine.manifests("vm-sched-a").unwrap().first() {
            break m.clone();
        }
        assert!(
            t0.elapsed().unwrap() < Duration::from_secs(30),
            "no scheduled snapshot of a"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    engine.pin(a.id(), &first_a.snapshot_id, true).expect("pin");
    let mut seen: std::collections::BTreeMap<String, Vec<(String, u64)>> = Default::default();
    let enough = |seen: &std::collections::BTreeMap<String, Vec<(String, u64)>>| {
        seen.len() == 2 && seen.values().all(|v| v.len() >= 4)
    };
    while !enough(&seen) && t0.elapsed().unwrap() < period * 7 {
        for r in [&a, &b] {
            for m in engine.manifests(r.id().as_str()).unwrap() {
                let v = seen.entry(r.id().to_string()).or_default();
                if !v.iter().any(|(id, _)| *id == m.snapshot_id) {
                    v.push((m.snapshot_id.clone(), m.wall_time_ns));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sched.stop();
    // Let a running snapshot (and its retention) finish.
    std::thread::sleep(period);
    let start_ns = t0.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for (inst, v) in &seen {
        let rel: Vec<f64> = v
            .iter()
            .map(|(_, t)| (t.saturating_sub(start_ns)) as f64 / 1e9)
            .collect();
        eprintln!("{inst}: cuts at {rel:.2?} s");
    }
    let ta: Vec<u64> = seen["vm-sched-a"].iter().map(|x| x.1).collect();
    let tb: Vec<u64> = seen["vm-sched-b"].iter().map(|x| x.1).collect();
    assert!(ta.len() >= 4 && tb.len() >= 4, "a {ta:?} b {tb:?}");
    let secs = |ns: u64| ns as f64 / 1e9;
    let p = period.as_secs_f64();
    // a at t, t+p, t+2p, ...; b half a period later. A slot skipped
    // because the instance's previous snapshot still ran (a loaded host)
    // shows as a gap of two periods.
    for w in ta.windows(2).chain(tb.windows(2)) {
        let d = secs(w[1] - w[0]);
        let k = (d / p).round();
        assert!(
            k >= 1.0 && (d - k * p).abs() < 1.0,
            "consecutive cuts {d:.2} s apart, period {p} s"
        );
    }
    for &b in &tb {
        let stagger = (secs(b) - secs(ta[0])).rem_euclid(p);
        assert!(
            (stagger - p / 2.0).abs() < 1.0,
            "b's cut {stagger:.2} s after a's slots, expected {:.2}",
            p / 2.0
        );
    }
    // Retention: a keeps its pinned first snapshot and the newest two; b the
    // newest two.
    let left_a: Vec<String> = engine
        .manifests("vm-sched-a")
        .unwrap()
        .into_iter()
        .map(|m| m.snapshot_id)
        .collect();
    let left_b: Vec<String> = engine
        .manifests("vm-sched-b")
        .unwrap()
        .into_iter()
        .map(|m| m.snapshot_id)
        .collect();
    eprintln!("kept: a {left_a:?}, b {left_b:?}");
    assert_eq!(left_a.len(), 3, "{left_a:?}");
    assert_eq!(left_a[0], first_a.snapshot_id);
    assert_eq!(left_b.len(), 2, "{left_b:?}");
    // Every snapshot of a (one started just before the stop lands after
    // the watch); ids sort by time.
    let mut all_a: Vec<String> = seen["vm-sched-a"]
        .iter()
        .map(|x| x.0.clone())
        .chain(left_a.iter().cloned())
        .collect();
    all_a.sort();
    all_a.dedup();
    assert_eq!(&left_a[1..], &all_a[all_a.len() - 2..]);
    // A deleted snapshot's manifest and memory are gone from the store; what
    // stays under its id is only what a kept snapshot names (a disk layer
    // the later snapshots took over).
    let kept_keys: std::collections::BTreeSet<String> = engine
        .manifests("vm-sched-a")
        .unwrap()
        .iter()
        .flat_map(|m| m.objects.iter().map(|o| o.key.clone()))
        .collect();
    for (id, _) in &seen["vm-sched-a"] {
        let dir = w.join("store").join("vm-sched-a").join(id);
        if left_a.contains(id) {
            assert!(dir.join("manifest.json").is_file(), "{}", dir.display());
            continue;
        }
        assert!(!dir.join("manifest.json").exists(), "{}", dir.display());
        let mut stack = vec![dir.clone()];
        let mut left = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                    continue;
                }
                let key = e
                    .path()
                    .strip_prefix(w.join("store").join("vm-sched-a"))
                    .unwrap()
                    .display()
                    .to_string();
                assert!(
                    kept_keys.contains(&key),
                    "{key} of a deleted snapshot stayed"
                );
                left += 1;
            }
        }
        eprintln!("deleted {id}: {left} shared object(s) stay");
    }
    let e = engine.delete(a.id(), &first_a.snapshot_id).unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    let rt = common::runtime();
    rt.block_on(vmr_snapshot::materialize(
        engine.store(),
        "vm-sched-a",
        &vmr_snapshot::Selector::Id(first_a.snapshot_id.clone()),
        &w.join("pinned"),
        &vmr_snapshot::RestoreOptions::default(),
    ))
    .expect("the pinned snapshot is still whole");
    a.shutdown();
    b.shutdown();
}
