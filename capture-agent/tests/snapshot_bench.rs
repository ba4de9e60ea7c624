//! One benchmark run of the snapshot engine on the microVM: a 512 MiB
//! test-guest instance (disk `vda` on a vhost-tap backend), a full
//! snapshot, then incremental snapshots after the guest dirtied 1024 pages
//! (0.8 % of its memory; the test guest's arena holds no more), into an
//! fsync'd `file://` store; then the time from materialising the last
//! snapshot to a running clone. Prints one table row per snapshot; checks
//! that an incremental snapshot uploads far less than a full one.
//!
//! Needs /dev/kvm, the Tansu broker and the workspace binaries. Run:
//! `cargo test --release -p capture-agent --test snapshot_bench -- --nocapture`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::Stack;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_proto::InstanceId;
use vmr_vmm::guest_abi::{CMD_DIRTY, END_OF_LIST};

const INSTANCE: &str = "vm-bench-1";

#[test]
fn snapshot_figures_for_a_512_mib_microvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this benchmark needs /dev/kvm (read-write), which is unavailable: {e}");
    }
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).unwrap();
    let tg = w.join("test-guest");
    std::fs::create_dir_all(&tg).unwrap();
    let elf = vmr_vmm::guest_abi::build_test_guest(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"),
    )
    .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"));
    std::fs::copy(&elf, tg.join("test-guest.elf")).unwrap();
    std::fs::write(
        tg.join("image.toml"),
        "format_version = 1\nname = \"test-guest\"\ndrivers = [\"microvm\"]\n\
         [boot]\nkernel = \"test-guest.elf\"\n[machine]\nmemory_mib = 512\nvcpus = 1\n\
         [[disks]]\nname = \"vda\"\nsize_mib = 64\n",
    )
    .unwrap();
    let blk = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let mut opts = LaunchOptions::new(
        &tg,
        InstanceId::new(INSTANCE).unwrap(),
        "microvm",
        w.join("data"),
    );
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.supervisor.bin_dir = blk.parent().map(Path::to_path_buf);
    let rec = Arc::new(
        RecordedInstance::launch(opts)
            .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e))),
    );
    let guest = rec.guest().unwrap();
    let m = guest.as_any().downcast_ref::<MicrovmInstance>().unwrap();
    assert!(m
        .ports()
        .wait(Duration::from_secs(60), |s| s.first_read_at.is_some()));
    let engine = SnapshotEngine::new(EngineConfig::local(
        &w.join("store"),
        &w.join("engine"),
        cfg.endpoints.clone(),
    ))
    .unwrap();
    println!("| snapshot | pause (ms) | bytes uploaded | upload (ms) | operation (ms) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut bytes = Vec::new();
    for round in 0..3u32 {
        let pages: Vec<u32> = (0..1024).collect();
        let mut words = vec![CMD_DIRTY];
        words.extend_from_slice(&pages);
        words.push(END_OF_LIST);
        let before = m.ports().with(|s| s.done.len());
        m.ports().push_commands(&words);
        assert!(m
            .ports()
            .wait(Duration::from_secs(60), |s| s.done.len() > before));
        let t = Instant::now();
        let op = engine
            .take_and_wait(
                rec.clone(),
                SnapshotRequest {
                    incremental: round > 0,
                    pin: false,
                },
                Duration::from_secs(600),
            )
            .unwrap();
        let total = t.elapsed();
        assert_eq!(op.state, OperationState::Succeeded, "{:?}", op.error);
        let mf = op.manifest.unwrap();
        let id = mf.snapshot_id.clone();
        let new: u64 = mf
            .objects
            .iter()
            .filter(|o| o.key.starts_with(&format!("{id}/")))
            .map(|o| o.size)
            .sum();
        let upload_ms = (mf.uploaded_at_ns.saturating_sub(mf.wall_time_ns)) as f64 / 1e6
            - mf.pause_us as f64 / 1e3;
        println!(
            "| {} | {:.1} | {new} | {upload_ms:.0} | {} |",
            mf.memory,
            mf.pause_us as f64 / 1e3,
            total.as_millis()
        );
        bytes.push(new);
    }
    assert!(
        bytes[1] * 10 < bytes[0],
        "incremental {} vs full {}",
        bytes[1],
        bytes[0]
    );
    drop(guest);
    rec.shutdown();

    // Restore to a running clone: materialise (download + verify), start
    // the disk backend on the chain, restore, resume.
    let t = Instant::now();
    let rt = common::runtime();
    let mat = rt
        .block_on(vmr_snapshot::materialize(
            engine.store(),
            INSTANCE,
            &vmr_snapshot::Selector::Latest,
            &w.join("restore"),
            &vmr_snapshot::RestoreOptions::default(),
        ))
        .unwrap();
    let t_mat = t.elapsed();
    let cdir = w.join("clone");
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    let sock = cdir.join("vda.sock");
    let mut cmd = std::process::Command::new(&blk);
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(w.join("data").join(INSTANCE).join("vda.img"));
    for l in &mat.disk_layers {
        cmd.arg("--layer").arg(&l.path);
    }
    cmd.arg("--overlay")
        .arg(cdir.join("vda.top"))
        .arg("--device")
        .arg("vda");
    let mut g = vmr_testkit::ChildGuard::spawn("clone-blk", &mut cmd).unwrap();
    while !sock.exists() {
        assert!(g.try_wait().is_none());
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let t_backend = t.elapsed();
    let machine = vmr_hypervisor::image::MachineImage::load(&tg).unwrap();
    let spec = machine
        .instance_spec("microvm", "vm-bench-clone", &cdir.join("work"), |_| {
            sock.clone()
        })
        .unwrap();
    let clone = vmr_hypervisor::driver("microvm")
        .unwrap()
        .restore(&spec, &mat.snapshot_dir)
        .unwrap();
    clone.resume().unwrap();
    let t_run = t.elapsed();
    println!(
        "restore of a chain of {} links ({} bytes): materialised {} ms, disk backend up {} ms, clone running {} ms",
        mat.chain.len(),
        mat.bytes,
        t_mat.as_millis(),
        t_backend.as_millis(),
        t_run.as_millis()
    );
    clone.stop(Duration::from_secs(5)).unwrap();
}
