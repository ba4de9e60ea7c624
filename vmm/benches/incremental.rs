//! Incremental snapshots of a 512 MiB test guest, this build's write path
//! against the previous one, and the guest-visible pause against the time
//! until the snapshot is durable, in one run.
//!
//! For each dirty-set size (300 pages, 1024 pages, and 5 % of memory:
//! 6554 pages spread over it with `CMD_DIRTY_SPAN`) and each round, the
//! guest dirties the pages, then (fsync on in even rounds, off in odd ones;
//! the two ways alternate every two rounds):
//!
//! - in the pause: the guest is paused, `Vm::snapshot(Incremental)` runs
//!   (timed from the call to its return, as before), the guest resumes;
//! - staged: the guest is paused, `Vm::snapshot_staged` writes the files
//!   without syncing them, the guest resumes, and `Vm::complete_snapshot`
//!   syncs them and puts them in place while the guest runs.
//!
//! Either way the round records the guest-visible pause (from before
//! `Vm::pause` to the return of `Vm::resume`) and the time until the
//! snapshot is complete and durable (from the same start to the return of
//! the call that completed it). Then, with the VM paused again, the same
//! dirty pages and the same state file are written into scratch
//! directories by the previous write path (copied below from the build
//! before the `pwritev` write path: a 1 MiB `BufWriter` copy of each page, then `fsync`
//! of the memory file, `fsync` of the state file, rename, `fsync` of the
//! directory and of its parent, one after the other) and by this build's
//! path (`memfile::write_diff_file`, one `pwritev` iovec per run of pages
//! straight from guest memory, `fdatasync` of both files from two threads,
//! rename, both directory `fsync`s from two threads), alternating which
//! goes first.
//!
//! `cargo bench -p vmr-vmm --bench incremental` (needs /dev/kvm, make and
//! gcc). `VMR_BENCH_RUNS` sets the rounds per size (default 12: three per
//! way and fsync setting).

mod common;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vmr_vmm::guest_abi::{
    build_test_guest, dirty_span_command, TestPorts, CMD_DIRTY, END_OF_LIST, SPAN_FIRST_PAGE,
};
use vmr_vmm::memory::PageBitmap;
use vmr_vmm::snapshot::{memfile, MemoryKind, SnapshotData, DIFF_MEMORY_FILE, STATE_FILE};
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

const MEM: u64 = 512 << 20;
const WAIT: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fsync(p: &Path) {
    File::open(p).and_then(|f| f.sync_all()).expect("fsync");
}

/// The previous build's incremental write path (memfile::write_diff with a
/// buffered copy, then `Vm::snapshot`'s four syncs in a row).
fn previous_path(dir: &Path, mem: &[u8], dirty: &[u64], state: &[u8], sync: bool) {
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join(DIFF_MEMORY_FILE);
    let n = dirty.len() as u64;
    let mut head = Vec::new();
    head.extend_from_slice(b"VMRMDIFF");
    head.extend_from_slice(&1u32.to_le_bytes());
    head.extend_from_slice(&4096u32.to_le_bytes());
    head.extend_from_slice(&(mem.len() as u64).to_le_bytes());
    head.extend_from_slice(&n.to_le_bytes());
    let mut index = Vec::new();
    for p in dirty {
        index.extend_from_slice(&p.to_le_bytes());
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&index);
    head.extend_from_slice(&h.finalize().to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&index);
    head.resize((40 + 8 * n).div_ceil(4096) as usize * 4096, 0);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(&path).expect("create"));
    f.write_all(&head).expect("write");
    for p in dirty {
        let o = *p as usize * 4096;
        f.write_all(&mem[o..o + 4096]).expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    if sync {
        fsync(&path);
    }
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        let mut s = File::create(&tmp).expect("create");
        s.write_all(state).expect("write");
        if sync {
            s.sync_all().expect("fsync");
        }
    }
    std::fs::rename(&tmp, dir.join(STATE_FILE)).expect("rename");
    if sync {
        fsync(dir);
        fsync(dir.parent().expect("parent"));
    }
}

/// This build's path, through the library's own functions.
fn this_path(dir: &Path, mem: &[u8], dirty: &PageBitmap, state: &SnapshotData, sync: bool) {
    std::fs::create_dir_all(dir).expect("dir");
    let (_, mf) =
        memfile::write_diff_file(&dir.join(DIFF_MEMORY_FILE), mem, dirty).expect("write_diff");
    let pending = state.write_pending(dir).expect("state");
    if sync {
        std::thread::scope(|s| {
            let h = s.spawn(|| mf.sync_data().expect("fdatasync"));
            pending.sync().expect("fdatasync");
            h.join().expect("sync thread");
        });
    }
    pending.commit().expect("rename");
    if sync {
        let up = dir.parent().expect("parent");
        std::thread::scope(|s| {
            let h = s.spawn(|| fsync(dir));
            fsync(up);
            h.join().expect("sync thread");
        });
    }
}

/// Pause and time until durable of one way, ms.
#[derive(Default)]
struct Timing {
    pause: Vec<f64>,
    durable: Vec<f64>,
}

#[derive(Default)]
struct Cell {
    vm_sync: Vec<f64>,
    vm_nosync: Vec<f64>,
    /// [fsync on, off] of `Vm::snapshot` in the pause and of the staged way.
    whole: [Timing; 2],
    staged: [Timing; 2],
    prev_sync: Vec<f64>,
    this_sync: Vec<f64>,
    prev_nosync: Vec<f64>,
    this_nosync: Vec<f64>,
    pages: u64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list.
    }
    common::require_kvm("incremental");
    let runs: usize = std::env::var("VMR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
        .max(4);
    // Next to the target directory (the same disk the agent's staging uses).
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let elf = build_test_guest(&tmp.path().join("guest")).unwrap_or_else(|e| panic!("{e}"));
    let mut vm = Vm::new(VmConfig {
        mem_size: MEM,
        ..Default::default()
    })
    .expect("VM");
    common::fill_pages(&vm);
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports");
    vm.load(&BootSource::Elf(elf)).expect("load");
    vm.start().expect("start");
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest did not reach its command loop"
    );
    vm.pause().expect("pause");
    vm.snapshot(&tmp.path().join("base"), MemoryKind::Full)
        .expect("base");
    vm.resume().expect("resume");

    let total_pages = (MEM / 4096) as u32;
    let span = total_pages / 20; // 5 %
    let stride = (total_pages - SPAN_FIRST_PAGE as u32) / span;
    let cases: Vec<(String, Vec<u32>)> = vec![
        ("300 arena pages".into(), {
            let mut c = vec![CMD_DIRTY];
            c.extend(0..300);
            c.push(END_OF_LIST);
            c
        }),
        ("1024 arena pages".into(), {
            let mut c = vec![CMD_DIRTY];
            c.extend(0..1024);
            c.push(END_OF_LIST);
            c
        }),
        (
            format!("5 % of memory ({span} pages, every {stride}th)"),
            dirty_span_command(SPAN_FIRST_PAGE as u32, span, stride),
        ),
    ];
    let mut cells = Vec::new();
    let mut seq = 0;
    for (name, cmd) in &cases {
        let mut c = Cell::default();
        for round in 0..runs {
            let done = ports.with(|s| s.done.len());
            ports.push_commands(cmd);
            assert!(
                ports.wait(WAIT, |s| s.done.len() > done),
                "dirty workload did not finish"
            );
            let sync = round % 2 == 0;
            let staged = (round / 2) % 2 == 1;
            vm.set_sync_snapshots(sync);
            seq += 1;
            let dir = tmp.path().join(format!("inc{seq}"));
            let t0 = Instant::now();
            vm.pause().expect("pause");
            let (info, pause, durable) = if staged {
                let pending = vm
                    .snapshot_staged(&dir, MemoryKind::Incremental)
                    .expect("staged");
                vm.resume().expect("resume");
                let pause = t0.elapsed();
                let info = vm.complete_snapshot(pending).expect("complete");
                (info, pause, t0.elapsed())
            } else {
                let t = Instant::now();
                let info = vm.snapshot(&dir, MemoryKind::Incremental).expect("inc");
                let took = ms(t.elapsed());
                if sync {
                    &mut c.vm_sync
                } else {
                    &mut c.vm_nosync
                }
                .push(took);
                vm.resume().expect("resume");
                let pause = t0.elapsed();
                (info, pause, pause)
            };
            c.pages = info.pages;
            let way = if staged { &mut c.staged } else { &mut c.whole };
            let t = &mut way[usize::from(!sync)];
            t.pause.push(ms(pause));
            t.durable.push(ms(durable));
            vm.pause().expect("pause");

            // The same pages and state, through both write paths.
            let mut bitmap = PageBitmap::new(MEM / 4096);
            for p in &info.dirty_pages {
                bitmap.set(*p);
            }
            let state_bytes = std::fs::read(dir.join(STATE_FILE)).expect("state");
            let state = SnapshotData::load(&dir).expect("state loads");
            let memory = vm.memory();
            // SAFETY: the VM stays paused (as in a snapshot) until both
            // paths have run; nothing writes guest memory meanwhile.
            let mem = unsafe { memory.as_slice() };
            let order = if (round / 4) % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for prev in order {
                let d = tmp.path().join(format!("w{seq}-{prev}"));
                let t = Instant::now();
                if prev {
                    previous_path(&d, mem, &info.dirty_pages, &state_bytes, sync);
                } else {
                    this_path(&d, mem, &bitmap, &state, sync);
                }
                let took = ms(t.elapsed());
                match (prev, sync) {
                    (true, true) => c.prev_sync.push(took),
                    (false, true) => c.this_sync.push(took),
                    (true, false) => c.prev_nosync.push(took),
                    (false, false) => c.this_nosync.push(took),
                }
                std::fs::remove_dir_all(&d).expect("cleanup");
            }
            vm.resume().expect("resume");
        }
        cells.push((name.clone(), c));
    }
    vm.pause().expect("pause");
    drop(vm);

    let half = runs / 2;
    println!();
    println!("Incremental snapshot of a 512 MiB test guest (every page non-zero); ms, median of {half} rounds (write paths) or {} (`Vm::snapshot`)", half / 2);
    println!();
    println!("| dirty set | pages | fsync | previous write path | this build's write path | `Vm::snapshot` (this build) |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for (name, c) in &cells {
        println!(
            "| {name} | {} | on | {:.2} | {:.2} | {:.2} |",
            c.pages,
            median(c.prev_sync.clone()),
            median(c.this_sync.clone()),
            median(c.vm_sync.clone())
        );
        println!(
            "| {name} | {} | off | {:.2} | {:.2} | {:.2} |",
            c.pages,
            median(c.prev_nosync.clone()),
            median(c.this_nosync.clone()),
            median(c.vm_nosync.clone())
        );
    }
    println!();
    println!("Guest-visible pause and time until the snapshot is durable (both from the pause), same run; ms, median of {} rounds each", half / 2);
    println!();
    println!("| dirty set | pages | fsync | in the pause: pause = durable | staged: pause | staged: until durable |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for (name, c) in &cells {
        for (i, label) in ["on", "off"].iter().enumerate() {
            println!(
                "| {name} | {} | {label} | {:.2} | {:.2} | {:.2} |",
                c.pages,
                median(c.whole[i].pause.clone()),
                median(c.staged[i].pause.clone()),
                median(c.staged[i].durable.clone()),
            );
        }
    }
    println!();
    println!("Firecracker v1.16.1 on this kind of host: diff snapshot of ~300 dirty pages 5.7 ms with fsync, 2.0 ms without.");
}
