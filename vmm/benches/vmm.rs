//! VMM timings in one table: start to first guest instruction, pause,
//! snapshot (full and incremental, each with and without the fsync that
//! makes it durable) and restore to the first guest instruction, for
//! 128 MiB and 512 MiB guests.
//!
//! `cargo bench -p vmr-vmm` (needs /dev/kvm and make + gcc for the test
//! guest). Firecracker's published figures are shown for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use vmr_vmm::guest_abi::{build_test_guest, TestPorts, CMD_DIRTY, END_OF_LIST};
use vmr_vmm::snapshot::{MemoryKind, RestoreMemory};
use vmr_vmm::vm::{BootSource, RestoreOptions, Vm, VmConfig};

const RUNS: usize = 5;
const WAIT: Duration = Duration::from_secs(60);
/// Pages the guest dirties between the base and the incremental snapshot.
const DIRTY_PAGES: u32 = 1024;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// "range MIN-MAX" of the runs, for the notes column.
fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("range {min:.1}-{max:.1}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn boot(elf: &Path, mem: u64, fill: bool) -> (Vm, TestPorts, Instant) {
    let t0 = Instant::now();
    let mut vm = Vm::new(VmConfig {
        mem_size: mem,
        ..Default::default()
    })
    .expect("VM");
    if fill {
        // Make every page non-zero, as in a guest that has used its memory,
        // so the full snapshot writes all of it.
        // SAFETY: the guest has not started; nothing else uses the memory.
        let memory = vm.memory();
        // SAFETY: as above.
        let m = unsafe { memory.as_mut_slice() };
        for (i, page) in m.chunks_mut(4096).enumerate() {
            page[8..16].copy_from_slice(&(i as u64 | 1).to_le_bytes());
        }
    }
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports");
    vm.load(&BootSource::Elf(elf.to_path_buf())).expect("load");
    vm.start().expect("start");
    assert!(
        ports.wait(WAIT, |s| s.boot_at.is_some()),
        "guest did not boot"
    );
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest did not reach its command loop"
    );
    (vm, ports, t0)
}

struct Row {
    what: String,
    ours: f64,
    note: String,
    anchor: &'static str,
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
        eprintln!("vmm bench needs /dev/kvm: {e}");
        std::process::exit(1);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let elf = build_test_guest(&tmp.path().join("guest")).unwrap_or_else(|e| panic!("{e}"));
    let mut rows = Vec::new();

    let first: Vec<f64> = (0..RUNS)
        .map(|_| {
            let (vm, ports, t0) = boot(&elf, 128 << 20, false);
            let at = ports.with(|s| s.boot_at).expect("booted");
            drop(vm);
            ms(at - t0)
        })
        .collect();
    rows.push(Row {
        what: "VMM start to first guest instruction (128 MiB)".into(),
        ours: median(first),
        note: format!("median of {RUNS}"),
        anchor: "-",
    });

    for mem_mib in [128u64, 512] {
        let mem = mem_mib << 20;
        let (mut pause, mut full, mut inc, mut restore_lazy, mut restore_copy) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut full_nosync, mut inc_nosync) = (vec![], vec![]);
        let mut full_pages = 0;
        let mut inc_pages = 0;
        for run in 0..RUNS {
            let dir = tmp.path().join(format!("{mem_mib}-{run}"));
            let (vm, ports, _) = boot(&elf, mem, true);
            let t = Instant::now();
            vm.pause().expect("pause");
            pause.push(ms(t.elapsed()));
            // Both kinds of full snapshot, in alternating order: the second
            // one runs while the first one's pages may still be written back.
            let order = if run % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for sync in order {
                vm.set_sync_snapshots(sync);
                let name = if sync { "base" } else { "base-nosync" };
                let t = Instant::now();
                let f = vm
                    .snapshot(&dir.join(name), MemoryKind::Full)
                    .expect("full");
                let took = ms(t.elapsed());
                if sync {
                    full.push(took);
                } else {
                    full_nosync.push(took);
                }
                full_pages = f.pages;
            }
            vm.resume().expect("resume");
            // Two rounds of the same dirty workload: one increment is
            // fsync'd, the other is not (alternating which comes first).
            for round in 1..=2 {
                let mut cmd = vec![CMD_DIRTY];
                cmd.extend(0..DIRTY_PAGES);
                cmd.push(END_OF_LIST);
                ports.push_commands(&cmd);
                assert!(
                    ports.wait(WAIT, |s| s.done.len() >= round),
                    "dirty workload did not finish"
                );
                vm.pause().expect("pause");
                let sync = (round == 1) == (run % 2 == 0);
                vm.set_sync_snapshots(sync);
                let t = Instant::now();
                let i = vm
                    .snapshot(&dir.join(format!("inc{round}")), MemoryKind::Incremental)
                    .expect("incremental");
                if sync {
                    inc.push(ms(t.elapsed()));
                } else {
                    inc_nosync.push(ms(t.elapsed()));
                }
                inc_pages = i.pages;
                vm.resume().expect("resume");
            }
            vm.pause().expect("pause");
            drop(vm);

            for (mode, out) in [
                (RestoreMemory::PrivateLazy, &mut restore_lazy),
                (RestoreMemory::SharedCopy, &mut restore_copy),
            ] {
                let t = Instant::now();
                let (clone, _) = Vm::restore(
                    &dir.join("inc1"),
                    RestoreOptions {
                        memory: mode,
                        ..Default::default()
                    },
                )
                .expect("restore");
                let p = TestPorts::new();
                p.attach(&clone.pio_bus()).expect("ports");
                clone.resume().expect("resume");
                assert!(
                    p.wait(WAIT, |s| s.first_read_at.is_some()),
                    "clone did not run"
                );
                out.push(ms(p.with(|s| s.first_read_at).expect("ran") - t));
            }
            std::fs::remove_dir_all(&dir).expect("cleanup");
        }
        rows.push(Row {
            what: format!("pause ({mem_mib} MiB)"),
            ours: median(pause),
            note: "1 vCPU".into(),
            anchor: "-",
        });
        rows.push(Row {
            what: format!("full snapshot, fsync'd ({mem_mib} MiB)"),
            note: format!("{full_pages} pages written; {}", range(&full)),
            ours: median(full),
            anchor: "-",
        });
        rows.push(Row {
            what: format!("full snapshot, no fsync ({mem_mib} MiB)"),
            note: format!("{full_pages} pages written; {}", range(&full_nosync)),
            ours: median(full_nosync),
            anchor: "-",
        });
        rows.push(Row {
            what: format!("incremental snapshot, fsync'd ({mem_mib} MiB)"),
            note: format!("{inc_pages} dirty pages; {}", range(&inc)),
            ours: median(inc),
            anchor: if mem_mib == 512 {
                "~18 ms (diff, 512 MiB)"
            } else {
                "-"
            },
        });
        rows.push(Row {
            what: format!("incremental snapshot, no fsync ({mem_mib} MiB)"),
            note: format!("{inc_pages} dirty pages; {}", range(&inc_nosync)),
            ours: median(inc_nosync),
            anchor: "-",
        });
        rows.push(Row {
            what: format!("restore to first instruction, private lazy ({mem_mib} MiB)"),
            ours: median(restore_lazy),
            note: "base + 1 increment".into(),
            anchor: "< 8 ms (resume)",
        });
        rows.push(Row {
            what: format!("restore to first instruction, shared copy ({mem_mib} MiB)"),
            ours: median(restore_copy),
            note: "base + 1 increment".into(),
            anchor: "-",
        });
    }

    println!();
    let (a, b, c, d) = ("vmr-vmm", "ms", "Firecracker anchor", "notes");
    println!("{a:<58} {b:>10}  {c:<24} {d}");
    println!("{}", "-".repeat(120));
    for r in rows {
        println!(
            "{:<58} {:>10.2}  {:<24} {}",
            r.what, r.ours, r.anchor, r.note
        );
    }
}
