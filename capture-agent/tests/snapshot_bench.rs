//! One benchmark run of the snapshot engine, both drivers, one table.
//!
//! - microVM: a 512 MiB test-guest instance with a 64 MiB `vda` on a
//!   vhost-tap backend. Before each incremental snapshot the guest dirties
//!   5 % of its memory (6553 pages spread over it, `CMD_DIRTY_SPAN`) and
//!   1 % of its disk (163 4 KiB blocks spread over it, `CMD_BLK_FILL`). Run
//!   twice, on two instances: durable (the VM's snapshot files and the
//!   `file://` store fsync'd) and without any fsync. A full snapshot, then
//!   three incremental ones; the durable chain's last link is restored into
//!   a running clone.
//! - QEMU/TCG: demo-linux with 512 MiB (the image's manifest with the memory
//!   raised, same kernel and initramfs) and its 64 MiB `vda`, durable. Before
//!   each snapshot after the first, the guest's key-value service dirties
//!   5 % of its memory (`DIRTY 6553`: 6553 4 KiB pages of a tmpfs file
//!   rewritten with new non-zero content) and 163 `PUT`s write 1 % of the
//!   disk (one 4 KiB block each). The QEMU driver has no incremental memory:
//!   every snapshot's memory is a full migration stream, while its disk is a
//!   new layer over the previous snapshot's.
//!   The last link is restored into a new QEMU that answers a `GET`.
//!
//! "pause" is the guest-visible pause of the whole cut (pause, checkpoint of
//! the disk backend, state save, lifecycle event, resume); "upload" is from
//! the end of the pause to the manifest stored; "restore" is from the
//! materialised snapshot (downloaded and verified, timed apart) to a running
//! clone, including the start of its disk backend.
//!
//! Needs /dev/kvm, root (network namespaces), qemu-system-x86_64, demo-linux,
//! the Tansu broker and the workspace binaries
//! (`cargo build --release -p vhost-tap --bins`). Run:
//! `cargo test --release -p capture-agent --test snapshot_bench -- --nocapture`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::service::{OperationState, SnapshotRequest};
use capture_agent::snapshot::{EngineConfig, SnapshotEngine};
use common::{demo_linux_image_dir, enter_netns, qemu_binary, request, Stack, SERVICE};
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::Accel;
use vmr_proto::InstanceId;
use vmr_testkit::qemu::NetNs;
use vmr_vmm::guest_abi::{blk_fill_command, dirty_span_command, SPAN_FIRST_PAGE};

const MEM_MIB: u64 = 512;
const DISK_MIB: u64 = 64;
/// 5 % of the guest's pages.
const DIRTY_PAGES: u32 = (MEM_MIB * 256 / 20) as u32;
/// 1 % of the disk in 4 KiB blocks.
const DIRTY_BLOCKS: u32 = (DISK_MIB * 256 / 100) as u32;
const INCREMENTS: usize = 3;
const PEER_CIDR: &str = "192.168.77.1/24";
const PEER_MAC: &str = "02:00:00:77:00:01";

struct Row {
    driver: &'static str,
    durable: bool,
    memory: String,
    dirtied: String,
    pause_ms: f64,
    bytes: u64,
    upload_ms: f64,
}

struct Restore {
    driver: &'static str,
    links: usize,
    bytes: u64,
    materialise_ms: u128,
    running_ms: f64,
    note: String,
}

fn take(
    engine: &SnapshotEngine,
    rec: &Arc<RecordedInstance>,
    incremental: bool,
) -> (String, f64, u64, f64) {
    let op = engine
        .take_and_wait(
            rec.clone(),
            SnapshotRequest {
                incremental,
                pin: false,
            },
            Duration::from_secs(600),
        )
        .expect("the snapshot finishes");
    assert_eq!(op.state, OperationState::Succeeded, "{:?}", op.error);
    let mf = op.manifest.expect("a manifest");
    eprintln!(
        "snapshot {} ({}): pause {} us, {} objects",
        mf.snapshot_id,
        mf.memory,
        mf.pause_us,
        mf.objects.len()
    );
    let id = mf.snapshot_id.clone();
    let new: u64 = mf
        .objects
        .iter()
        .filter(|o| o.key.starts_with(&format!("{id}/")))
        .map(|o| o.size)
        .sum();
    let pause_ms = mf.pause_us as f64 / 1e3;
    // The manifest's monotonic time is the pause's start (its wall time is
    // the driver's save, later in the pause); its `uploaded_at_ns` is wall
    // time. The pause's end on the wall clock, through this host's
    // wall-minus-monotonic offset:
    let (wall, mono) = vmr_hypervisor::events::now_ns();
    let resumed_wall =
        (mf.mono_time_ns + mf.pause_us * 1000) as i128 + (wall as i128 - mono as i128);
    let upload_ms = (mf.uploaded_at_ns as i128 - resumed_wall) as f64 / 1e6;
    (mf.memory.clone(), pause_ms, new, upload_ms)
}

fn engine(cfg: &AgentConfig, w: &Path, name: &str, durable: bool) -> SnapshotEngine {
    let mut ec = EngineConfig::local(
        &w.join(format!("store-{name}")),
        &w.join(format!("engine-{name}")),
        cfg.endpoints.clone(),
    );
    ec.store.fsync = durable;
    SnapshotEngine::new(ec).expect("the engine starts")
}

fn test_guest_image(w: &Path) -> PathBuf {
    let tg = w.join("test-guest");
    std::fs::create_dir_all(&tg).unwrap();
    let elf = vmr_vmm::guest_abi::build_test_guest(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"),
    )
    .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"));
    std::fs::copy(&elf, tg.join("test-guest.elf")).unwrap();
    std::fs::write(
        tg.join("image.toml"),
        format!(
            "format_version = 1\nname = \"test-guest\"\ndrivers = [\"microvm\"]\n\
             [boot]\nkernel = \"test-guest.elf\"\n[machine]\nmemory_mib = {MEM_MIB}\nvcpus = 1\n\
             [[disks]]\nname = \"vda\"\nsize_mib = {DISK_MIB}\n"
        ),
    )
    .unwrap();
    tg
}

/// Runs a guest command and waits for its done word; returns it.
fn command(m: &MicrovmInstance, words: &[u32]) -> u32 {
    let before = m.ports().with(|s| s.done.len());
    m.ports().push_commands(words);
    assert!(
        m.ports()
            .wait(Duration::from_secs(300), |s| s.done.len() > before),
        "the guest did not finish command {:#x}",
        words[0]
    );
    m.ports().with(|s| s.done[before])
}

fn microvm(
    cfg: &AgentConfig,
    w: &Path,
    tg: &Path,
    blk: &Path,
    durable: bool,
    rows: &mut Vec<Row>,
) -> Option<Restore> {
    let name = if durable { "durable" } else { "nosync" };
    let inst = format!("vm-bench-{name}");
    let mut opts = LaunchOptions::new(
        tg,
        InstanceId::new(&inst).unwrap(),
        "microvm",
        w.join(format!("data-{name}")),
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
    m.vmm().expect("a running VM").set_sync_snapshots(durable);
    let engine = engine(cfg, w, name, durable);
    let total_pages = (MEM_MIB * 256) as u32;
    let page_stride = (total_pages - SPAN_FIRST_PAGE as u32) / DIRTY_PAGES;
    let block_stride = (DISK_MIB * 256) as u32 / DIRTY_BLOCKS;
    for round in 0..=INCREMENTS {
        let mut dirtied = "-".to_string();
        if round > 0 {
            let r = round as u32;
            let pages = command(
                m,
                &dirty_span_command(SPAN_FIRST_PAGE as u32 + r, DIRTY_PAGES, page_stride),
            );
            assert_eq!(pages, DIRTY_PAGES);
            let blocks = command(m, &blk_fill_command(r, DIRTY_BLOCKS, 1, block_stride));
            assert_eq!(blocks, DIRTY_BLOCKS, "disk fill failed: {}", blocks as i32);
            dirtied = format!("{pages} pages, {blocks} blocks");
        }
        let (memory, pause_ms, bytes, upload_ms) = take(&engine, &rec, round > 0);
        rows.push(Row {
            driver: "microvm",
            durable,
            memory,
            dirtied,
            pause_ms,
            bytes,
            upload_ms,
        });
    }
    drop(guest);
    rec.shutdown();
    if !durable {
        return None;
    }

    // Restore to a running clone: materialise (download + verify), start
    // the disk backend on the chain, restore, resume.
    let rt = common::runtime();
    let t = Instant::now();
    let mat = rt
        .block_on(vmr_snapshot::materialize(
            engine.store(),
            &inst,
            &vmr_snapshot::Selector::Latest,
            &w.join("restore-microvm"),
            &vmr_snapshot::RestoreOptions::default(),
        ))
        .unwrap();
    let materialise_ms = t.elapsed().as_millis();
    let cdir = w.join("clone-microvm");
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    let sock = cdir.join("vda.sock");
    let t = Instant::now();
    let mut cmd = std::process::Command::new(blk);
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(w.join(format!("data-{name}")).join(&inst).join("vda.img"));
    for l in &mat.disk_layers {
        cmd.arg("--layer").arg(&l.path);
    }
    cmd.arg("--overlay")
        .arg(cdir.join("vda.top"))
        .arg("--device")
        .arg("vda");
    let mut g = vmr_testkit::ChildGuard::spawn("clone-blk", &mut cmd).unwrap();
    while !sock.exists() {
        assert!(g.try_wait().is_none(), "the clone's disk backend exited");
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    let t_backend = t.elapsed();
    let machine = vmr_hypervisor::image::MachineImage::load(tg).unwrap();
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
    let running = t.elapsed();
    // The clone runs its guest: one more span is dirtied and reported.
    let cm = clone.as_any().downcast_ref::<MicrovmInstance>().unwrap();
    assert_eq!(
        command(cm, &dirty_span_command(SPAN_FIRST_PAGE as u32, 16, 1)),
        16
    );
    clone.stop(Duration::from_secs(5)).unwrap();
    drop(g);
    Some(Restore {
        driver: "microvm",
        links: mat.chain.len(),
        bytes: mat.bytes,
        materialise_ms,
        running_ms: running.as_secs_f64() * 1e3,
        note: format!(
            "disk backend listening after {:.1} ms; lazy shared memory (userfaultfd)",
            t_backend.as_secs_f64() * 1e3
        ),
    })
}

/// `n` PUTs over one connection to the guest's service; returns the slots.
fn puts(ns: &NetNs, tag: &str, n: u32) -> Vec<u32> {
    let path = ns.path();
    let tag = tag.to_string();
    std::thread::spawn(move || {
        enter_netns(&path).expect("enter the namespace");
        let addr: SocketAddr = SERVICE.parse().unwrap();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut slots = Vec::new();
        for i in 0..n {
            (&s).write_all(format!("PUT {tag}-{i} value-{i}\n").as_bytes())
                .expect("send");
            let mut line = String::new();
            r.read_line(&mut line).expect("a reply");
            let slot = line
                .strip_prefix("OK ")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("PUT {i}: {line:?}"));
            slots.push(slot);
        }
        slots
    })
    .join()
    .expect("the PUT thread")
}

fn qemu(cfg: &AgentConfig, w: &Path, blk: &Path, rows: &mut Vec<Row>) -> Restore {
    let qemu = qemu_binary();
    let src = demo_linux_image_dir();
    // The same image with 512 MiB of memory.
    let image = w.join("demo-linux-512");
    std::fs::create_dir_all(&image).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "image.toml" {
            std::os::unix::fs::symlink(e.path(), image.join(e.file_name())).unwrap();
        }
    }
    let manifest = std::fs::read_to_string(src.join("image.toml")).unwrap();
    assert!(manifest.contains("memory_mib = 256") && manifest.contains("size_mib = 64"));
    std::fs::write(
        image.join("image.toml"),
        manifest.replace("memory_mib = 256", &format!("memory_mib = {MEM_MIB}")),
    )
    .unwrap();
    let ns = NetNs::create().expect("create a network namespace (needs root and iproute2)");
    let inst = "vm-bench-qemu";
    let mut opts = LaunchOptions::new(
        &image,
        InstanceId::new(inst).unwrap(),
        "qemu",
        w.join("data-qemu"),
    );
    opts.netns = Some(ns.name().to_string());
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.accel = Accel::Tcg;
    opts.qemu_binary = Some(qemu.clone());
    opts.supervisor.bin_dir = blk.parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(30);
    let rec = Arc::new(
        RecordedInstance::launch(opts)
            .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e))),
    );
    ns.wait_for_link("vmrtap0", Duration::from_secs(60))
        .expect("the TAP appears in the namespace");
    ns.ip(&["link", "set", "dev", "vmrtap0", "address", PEER_MAC])
        .unwrap();
    ns.configure("vmrtap0", PEER_CIDR).unwrap();
    let reply = request(&ns, "PUT warm up").unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.starts_with("OK "), "first PUT: {reply:?}");
    let engine = engine(cfg, w, "qemu", true);
    let mut last_slot = 0;
    for round in 0..=INCREMENTS {
        let mut dirtied = "-".to_string();
        if round > 0 {
            let t = Instant::now();
            let reply =
                request(&ns, &format!("DIRTY {DIRTY_PAGES}")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                reply,
                format!("OK dirty {DIRTY_PAGES}"),
                "DIRTY (an image without it needs a rebuild: guest/linux/build.sh)"
            );
            eprintln!(
                "DIRTY {DIRTY_PAGES} under TCG: {:.2} s",
                t.elapsed().as_secs_f64()
            );
            let slots = puts(&ns, &format!("r{round}"), DIRTY_BLOCKS);
            last_slot = *slots.last().unwrap();
            dirtied = format!("{DIRTY_PAGES} pages (DIRTY), {} blocks (PUTs)", slots.len());
        }
        // QEMU's memory is always a full migration stream; its disk is a
        // new layer over the previous snapshot's either way.
        let (memory, pause_ms, bytes, upload_ms) = take(&engine, &rec, false);
        let memory = if round > 0 {
            format!("{memory} (disk layer incremental)")
        } else {
            memory
        };
        rows.push(Row {
            driver: "qemu",
            durable: true,
            memory,
            dirtied,
            pause_ms,
            bytes,
            upload_ms,
        });
    }
    rec.shutdown();
    drop(ns);

    let rt = common::runtime();
    let t = Instant::now();
    let mat = rt
        .block_on(vmr_snapshot::materialize(
            engine.store(),
            inst,
            &vmr_snapshot::Selector::Latest,
            &w.join("restore-qemu"),
            &vmr_snapshot::RestoreOptions::default(),
        ))
        .expect("the snapshot materialises");
    let materialise_ms = t.elapsed().as_millis();
    let cns = NetNs::create().expect("a namespace for the clone");
    let cdir = w.join("clone-qemu");
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    let t = Instant::now();
    let spawn = |name: &str, args: Vec<std::ffi::OsString>| {
        let bin = vmr_testkit::workspace_bin(name).unwrap();
        let sock = cdir.join(format!("{name}.sock"));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--socket")
            .arg(&sock)
            .arg("--instance-id")
            .arg("vm-bench-qemu-clone")
            .args(args)
            .env("NO_COLOR", "1");
        let mut g = vmr_testkit::ChildGuard::spawn(name, &mut cmd).expect("start a backend");
        let t = Instant::now();
        while !sock.exists() {
            assert!(g.try_wait().is_none(), "{name} exited");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{name} did not listen"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        g
    };
    let image_file = w.join("data-qemu").join(inst).join("vda.img");
    let mut blk_args: Vec<std::ffi::OsString> = vec!["--image".into(), image_file.into()];
    for l in &mat.disk_layers {
        blk_args.push("--layer".into());
        blk_args.push(l.path.clone().into());
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
        .instance_spec("qemu", "vm-bench-qemu-clone", &cdir.join("work"), |d| {
            if d == "vda" {
                cdir.join("vhost-tap-blk.sock")
            } else {
                cdir.join("vhost-tap-net.sock")
            }
        })
        .unwrap();
    spec.qemu.accel = Accel::Tcg;
    spec.qemu.binary = Some(qemu);
    let clone = vmr_hypervisor::driver("qemu")
        .unwrap()
        .restore(&spec, &mat.snapshot_dir)
        .unwrap_or_else(|e| panic!("restore: {}", vmr_hypervisor::error_chain(&e)));
    clone.resume().expect("the clone resumes");
    let running = t.elapsed();
    cns.wait_for_link("vmrtap0", Duration::from_secs(60))
        .unwrap();
    cns.ip(&["link", "set", "dev", "vmrtap0", "address", PEER_MAC])
        .unwrap();
    cns.configure("vmrtap0", PEER_CIDR).unwrap();
    let got = request(&cns, &format!("GET {last_slot}")).unwrap_or_else(|e| panic!("{e}"));
    let want = format!("VAL {last_slot} r{INCREMENTS}-{} ", DIRTY_BLOCKS - 1);
    assert!(
        got.starts_with(&want),
        "the restored guest's answer: {got:?}"
    );
    let _ = clone.stop(Duration::from_secs(5));
    drop(cns);
    Restore {
        driver: "qemu",
        links: mat.chain.len(),
        bytes: mat.bytes,
        materialise_ms,
        running_ms: running.as_secs_f64() * 1e3,
        note: "new QEMU process (TCG) on new vhost-tap disk and NIC backends; answered a GET of the last PUT".into(),
    }
}

#[test]
fn snapshot_figures_for_512_mib_guests_on_both_drivers() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this benchmark needs /dev/kvm (read-write), which is unavailable: {e}");
    }
    let blk = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    vmr_testkit::workspace_bin("vhost-tap-net")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let stack = Stack::start();
    // Next to the target directory: the same disk as a real agent's data.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).unwrap();
    let tg = test_guest_image(w);
    let mut rows = Vec::new();
    let mut restores = Vec::new();
    restores.extend(microvm(&cfg, w, &tg, &blk, true, &mut rows));
    microvm(&cfg, w, &tg, &blk, false, &mut rows);
    restores.push(qemu(&cfg, w, &blk, &mut rows));

    println!();
    println!(
        "512 MiB guests, {DISK_MIB} MiB disk; before each incremental snapshot: microVM {DIRTY_PAGES} pages (5 %) + {DIRTY_BLOCKS} 4 KiB blocks (1 %), QEMU {DIRTY_PAGES} pages (5 %) + {DIRTY_BLOCKS} blocks (1 %) through its service"
    );
    println!();
    println!("| driver | durable (fsync) | memory | dirtied before | pause (ms) | bytes uploaded | upload (ms) |");
    println!("| --- | --- | --- | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {:.0} |",
            r.driver,
            if r.durable { "yes" } else { "no" },
            r.memory,
            r.dirtied,
            r.pause_ms,
            r.bytes,
            r.upload_ms
        );
    }
    println!();
    println!("| driver | restore of the last link | bytes | materialise (ms) | materialised to running (ms) | notes |");
    println!("| --- | --- | ---: | ---: | ---: | --- |");
    for r in &restores {
        println!(
            "| {} | chain of {} | {} | {} | {:.1} | {} |",
            r.driver, r.links, r.bytes, r.materialise_ms, r.running_ms, r.note
        );
    }
    for r in rows.iter().filter(|r| r.driver == "microvm") {
        if r.memory != "full" {
            let full = rows
                .iter()
                .find(|f| f.driver == r.driver && f.durable == r.durable && f.memory == "full")
                .expect("a full row");
            assert!(
                r.bytes * 10 < full.bytes,
                "incremental {} vs full {}",
                r.bytes,
                full.bytes
            );
        }
    }
}
