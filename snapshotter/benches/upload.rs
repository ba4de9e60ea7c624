//! Upload timings in one table: a full and an incremental snapshot of a
//! 512 MiB microVM guest written by the real driver, each uploaded to a
//! local (`file://`) store with and without fsync.
//!
//! `cargo bench -p vmr-snapshot --bench upload` (needs /dev/kvm and make +
//! gcc for the test guest).
//!
//! The guest's memory is filled from the host before the full snapshot, so
//! the full memory file has no holes. The test guest can dirty at most its
//! 1024 arena pages (0.8 % of 512 MiB), so the driver's incremental
//! snapshot has that many; the "~5 %" row uploads the same incremental
//! snapshot with its `memory.diff` replaced by one of the size a 6554-page
//! (5 %) diff has, filled with pseudo-random bytes. The uploader never
//! parses memory files, so its time and bytes are those of a real 5 % diff.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmr_hypervisor::artifacts::SnapshotArtifacts;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, Instance, InstanceSpec, MemoryKind, SnapshotOptions};
use vmr_snapshot::{no_progress, upload, SnapshotStore, StoreConfig, UploadRequest};
use vmr_vmm::guest_abi::{build_test_guest, ARENA_PAGES, CMD_DIRTY, END_OF_LIST};

const RUNS: usize = 3;
const MEM_MIB: u32 = 512;
const WAIT: Duration = Duration::from_secs(60);
const PAGE: u64 = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn microvm(inst: &dyn Instance) -> &MicrovmInstance {
    inst.as_any().downcast_ref().expect("a microVM instance")
}

fn snapshot(inst: &dyn Instance, dir: &Path, memory: MemoryKind) {
    std::fs::create_dir_all(dir).expect("snapshot dir");
    inst.snapshot(dir, SnapshotOptions { memory })
        .expect("snapshot");
}

/// A copy of the incremental snapshot `from` with a diff of `pages` pages.
fn with_diff_of(from: &Path, to: &Path, pages: u64) {
    std::fs::create_dir_all(to).unwrap();
    let mut arts: SnapshotArtifacts =
        serde_json::from_slice(&std::fs::read(from.join("artifacts.json")).unwrap()).unwrap();
    for a in arts.artifacts.iter_mut() {
        let src = from.join(&a.file);
        let dst = to.join(&a.file);
        if a.file.starts_with("mem") {
            let header = (40 + 8 * pages).div_ceil(PAGE) * PAGE;
            let len = header + pages * PAGE;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let body: Vec<u8> = (0..len / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            std::fs::write(&dst, &body).unwrap();
            a.size = len;
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    arts.parent = Some("../full".into());
    arts.store(to).unwrap();
}

struct Row {
    what: &'static str,
    fsync: bool,
    bytes: u64,
    ms: f64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list.
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("the upload bench needs /dev/kvm: {e}");
        std::process::exit(1);
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("upload-bench");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let elf = build_test_guest(&base.join("guest")).unwrap_or_else(|e| panic!("{e}"));

    let drv = vmr_hypervisor::driver("microvm").unwrap();
    let work = base.join("vm");
    std::fs::create_dir_all(&work).unwrap();
    let mut spec = InstanceSpec::new(
        "bench",
        &work,
        BootSpec::Kernel {
            kernel: elf.clone(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = MEM_MIB;
    let inst = drv.launch(&spec).expect("launch");
    let m = microvm(inst.as_ref());
    assert!(
        m.ports().wait(WAIT, |s| s.first_read_at.is_some()),
        "guest did not start"
    );
    {
        // A used guest: every page from 16 MiB up non-zero.
        use vm_memory::{Bytes, GuestAddress};
        let vm = m.vmm().expect("running");
        let mem = vm.memory();
        let gm = mem.guest_memory();
        for page in (16 << 20) / PAGE..(u64::from(MEM_MIB) << 20) / PAGE {
            gm.write_obj(page | 1, GuestAddress(page * PAGE)).unwrap();
        }
    }
    let snaps = base.join("snaps");
    snapshot(inst.as_ref(), &snaps.join("full"), MemoryKind::Full);
    let mut words = vec![CMD_DIRTY];
    words.extend(0..ARENA_PAGES as u32);
    words.push(END_OF_LIST);
    let before = m.ports().with(|s| s.done.len());
    m.ports().push_commands(&words);
    assert!(
        m.ports().wait(WAIT, |s| s.done.len() > before),
        "dirty did not finish"
    );
    snapshot(inst.as_ref(), &snaps.join("incr"), MemoryKind::Incremental);
    inst.stop(Duration::from_secs(5)).expect("stop");
    let five = (u64::from(MEM_MIB) << 20) / PAGE / 20;
    with_diff_of(&snaps.join("incr"), &snaps.join("incr5"), five);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let req = |id: &str| UploadRequest {
        dir: snaps.join(id),
        snapshot_id: id.into(),
        image: "test-guest".into(),
        seq_at_cut: 0,
        mono_time_ns: 0,
        offsets: vec![],
        disk_layers: vec![],
        base_snapshot_id: None,
    };
    let mut rows = Vec::new();
    for fsync in [true, false] {
        let mut t: [Vec<f64>; 3] = Default::default();
        let mut bytes = [0u64; 3];
        for run in 0..RUNS {
            let root = base.join(format!("store-{fsync}-{run}"));
            let mut cfg = StoreConfig::local(&root);
            cfg.fsync = fsync;
            let store = SnapshotStore::open(&cfg).unwrap();
            // Both incrementals need the full one as their base; "incr5"
            // names it too.
            for (i, id) in ["full", "incr", "incr5"].iter().enumerate() {
                let r = req(id);
                let start = Instant::now();
                let man = rt
                    .block_on(upload(&store, &r, &no_progress))
                    .expect("upload");
                t[i].push(start.elapsed().as_secs_f64() * 1e3);
                bytes[i] = man
                    .objects
                    .iter()
                    .filter(|o| o.key.starts_with(&format!("{id}/")))
                    .map(|o| o.size)
                    .sum::<u64>()
                    + man.to_json().len() as u64;
            }
            let _ = std::fs::remove_dir_all(&root);
        }
        let labels = [
            "full (512 MiB guest)",
            "incremental, 1024 pages dirty (0.8 %)",
            "incremental, ~5 % dirty (6553 pages)",
        ];
        for i in 0..3 {
            rows.push(Row {
                what: labels[i],
                fsync,
                bytes: bytes[i],
                ms: median(t[i].clone()),
            });
        }
    }
    println!();
    println!("upload to a file:// store (ext4), median of {RUNS} runs, release build");
    println!();
    println!("| snapshot | fsync | bytes uploaded | time (ms) | MiB/s |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.0} |",
            r.what,
            if r.fsync { "yes" } else { "no" },
            r.bytes,
            r.ms,
            r.bytes as f64 / (1 << 20) as f64 / (r.ms / 1e3)
        );
    }
    println!();
    for what in [
        "full (512 MiB guest)",
        "incremental, ~5 % dirty (6553 pages)",
    ] {
        let with = rows.iter().find(|r| r.what == what && r.fsync).unwrap().ms;
        let without = rows.iter().find(|r| r.what == what && !r.fsync).unwrap().ms;
        println!(
            "fsync cost, {what}: {:.1} ms ({:+.0} %)",
            with - without,
            (with / without - 1.0) * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}
