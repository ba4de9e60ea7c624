//! Restore from process start: the real `vmm restore --snapshot <dir>`
//! binary, spawned N times per case, timed from just before `spawn()` to a
//! running clone.
//!
//! The snapshot: a 512 MiB test guest (every page non-zero, as in a guest
//! that has used its memory) boots, runs a counting workload, goes back to
//! polling its command port and is snapshotted (full, then three
//! incremental links, each after the guest dirtied 5 % of memory with
//! `CMD_DIRTY_SPAN`). Under `vmm restore` nothing serves the command port,
//! so the restored guest's next read of it returns `0xffff_ffff` and it
//! prints `no command port: exiting` on its serial port (the process's
//! stdout, written byte by byte as the guest sends them) and stops the VM.
//! "Running" is the first byte of that line arriving on the pipe: the
//! restored vCPU has executed restored guest code (its stack and code pages
//! come from the snapshot's memory) and driven the restored serial device.
//! The whole line is checked and its time reported too.
//!
//! Cases: the full snapshot and the last link of the chain, for each memory
//! mode the CLI offers (none: `MAP_PRIVATE` of the memory file; lazily
//! filled shared memfd, `--shared-memory`; eager copy into it,
//! `--shared-memory --eager-copy`), each with KVM's dirty log off (this
//! build, unless `--snapshot-on-signal` is given) and on (what every
//! `vmm restore` did before; here through `--snapshot-on-signal` with no
//! signal sent). Runs are interleaved across cases after one warm-up run
//! each (the snapshot files and the binary are in the page cache, as on a
//! host that restores clones of a recent snapshot). Two floors for
//! reference: `/bin/true` and `vmm --version`, spawn to exit.
//!
//! The headline runs carry no instrumentation. A second set of runs sets
//! `VMR_VMM_TIMINGS=1`: the binary then stamps its stages with
//! `CLOCK_MONOTONIC` (the clock this process reads before `spawn()`) and
//! logs the VM's restore milestones, for the breakdown table, and prints
//! the library's own milestones (`vmr_vmm::timing`: state file, memory,
//! each KVM VM ioctl, vCPU state), for the table of the restore's steps. A
//! last table times the same library calls inside this process.
//!
//! The restored clones have no vhost-user devices: `vmm restore` refuses a
//! snapshot with device state (the capture agent reattaches backends in
//! its own process; `restore_devices` measures that path from
//! `Vm::restore` on).
//!
//! With `VMR_BENCH_BASELINE_VMM=<path>` (a `vmm` binary built from another
//! commit), the private and shared lazy cases also run that binary,
//! interleaved with this build's runs, so a before/after comparison shares
//! the host's load; its rows are marked "baseline".
//!
//! `cargo bench -p vmr-vmm --bench restore_process` (needs /dev/kvm, make
//! and gcc, and userfaultfd for `--shared-memory` and for the private
//! restore of a chain: root or `vm.unprivileged_userfaultfd = 1`).
//! `VMR_BENCH_RUNS` sets the runs per case (default 20); `VMR_BENCH_KEEP=1`
//! only writes the snapshots, prints their directories and keeps them (for
//! strace or perf by hand; delete them after).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmr_vmm::guest_abi::{
    build_test_guest, dirty_span_command, TestPorts, CMD_COUNT, SPAN_FIRST_PAGE,
};
use vmr_vmm::snapshot::{self, MemoryKind, RestoreMemory, SnapshotData};
use vmr_vmm::timing::monotonic_ns;
use vmr_vmm::vm::{BootSource, RestoreOptions, Vm, VmConfig};

const MEM: u64 = 512 << 20;
const WAIT: Duration = Duration::from_secs(60);
/// What the restored guest prints first (see `guest/test-guest/main.c`).
const RUNNING_LINE: &str = "no command port: exiting\n";
const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// One spawn of `vmm restore`.
#[derive(Debug, Default)]
struct Run {
    /// `CLOCK_MONOTONIC` just before `spawn()`.
    spawn: u64,
    /// The first byte of guest output arrived on stdout.
    first_output: u64,
    /// The guest's whole line had arrived.
    line: u64,
    /// The process exited (after the guest stopped the VM).
    exited: u64,
    /// `vmm: timing <stage> mono=<ns>` and `mono=<ns> ... <message>` lines.
    stamps: Vec<(String, u64)>,
}

/// Waits for `fd` to be readable, up to `deadline`.
fn poll_readable(fd: i32, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    n > 0
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn parse_stamps(stderr: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix("vmm: timing ") {
            // "<stage> mono=<ns>"
            if let Some((stage, ns)) = rest.split_once(" mono=") {
                if let Ok(ns) = ns.trim().parse() {
                    out.push((stage.to_string(), ns));
                }
            }
        } else if let Some(rest) = line.strip_prefix("mono=") {
            // tracing: "mono=<ns>  INFO target: message fields"
            let (ns, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Ok(ns) = ns.parse() {
                let msg = msg.split_once(": ").map_or(msg, |(_, m)| m);
                out.push((msg.trim().to_string(), ns));
            }
        }
    }
    out
}

/// Spawns `cmd`, reads its stdout until EOF (noting when the first byte
/// arrived and when the output started with all of `line`), waits for it
/// to exit.
fn spawn_once(mut cmd: Command, line: Option<&str>) -> Result<Run, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn = monotonic_ns();
    let mut child = cmd.spawn().map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    let deadline = Instant::now() + WAIT;
    let mut stdout = child.stdout.take().expect("piped");
    let mut seen = Vec::new();
    let mut first_output = None;
    let mut line_at = None;
    let mut buf = [0u8; 4096];
    loop {
        if !poll_readable(stdout.as_raw_fd(), deadline) {
            kill(&mut child);
            return Err(format!(
                "no end of output within {WAIT:?}; stdout: {}",
                String::from_utf8_lossy(&seen)
            ));
        }
        let n = stdout.read(&mut buf).map_err(|e| format!("stdout: {e}"))?;
        if n == 0 {
            break;
        }
        let now = monotonic_ns();
        first_output.get_or_insert(now);
        seen.extend_from_slice(&buf[..n]);
        // The guest's line must be the first output: nothing else is
        // written to stdout before it.
        if line_at.is_none() && line.is_some_and(|l| seen.starts_with(l.as_bytes())) {
            line_at = Some(now);
        }
    }
    let status = loop {
        match child.try_wait().map_err(|e| format!("wait: {e}"))? {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                kill(&mut child);
                return Err("the process did not exit".into());
            }
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    let exited = monotonic_ns();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .map_err(|e| format!("stderr: {e}"))?;
    if !status.success() {
        return Err(format!("{cmd:?} failed ({status}): {stderr}"));
    }
    let line_at = match line {
        Some(l) => line_at.ok_or_else(|| {
            format!(
                "stdout does not start with {l:?}: {}; stderr: {stderr}",
                String::from_utf8_lossy(&seen)
            )
        })?,
        None => exited,
    };
    Ok(Run {
        spawn,
        first_output: first_output.unwrap_or(exited),
        line: line_at,
        exited,
        stamps: parse_stamps(&stderr),
    })
}

fn restore_once(
    vmm: &Path,
    snapshot: &Path,
    args: &[&str],
    dirty_log: Option<&Path>,
    timed: bool,
) -> Result<Run, String> {
    let mut cmd = Command::new(vmm);
    cmd.arg("restore")
        .arg("--snapshot")
        .arg(snapshot)
        .args(args);
    if let Some(series) = dirty_log {
        // Turns KVM's dirty log on, as every `vmm restore` did before it
        // was limited to this option; no signal comes, so nothing is
        // written there.
        cmd.arg("--snapshot-on-signal").arg(series);
    }
    cmd.env_remove("RUST_LOG");
    if timed {
        cmd.env("VMR_VMM_TIMINGS", "1");
    } else {
        cmd.env_remove("VMR_VMM_TIMINGS");
    }
    let run = spawn_once(cmd, Some(RUNNING_LINE))?;
    if timed && stamp(&run, "resumed").is_none() {
        return Err(format!(
            "no timing stamps from {}: {:?}",
            vmm.display(),
            run.stamps
        ));
    }
    Ok(run)
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn median(v: Vec<f64>) -> f64 {
    stats(v).median
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

struct Case {
    /// The binary (this build's, or the baseline's).
    vmm: PathBuf,
    baseline: bool,
    snapshot: &'static str,
    dir: PathBuf,
    mode: &'static str,
    memory: RestoreMemory,
    args: &'static [&'static str],
    /// Dirty log on (the previous behaviour).
    before: bool,
    plain: Vec<Run>,
    timed: Vec<Run>,
    /// In-process: `SnapshotData::load`, `snapshot::restore_memory`,
    /// `Vm::restore` (ms).
    load: Vec<f64>,
    memory_ms: Vec<f64>,
    vm_restore: Vec<f64>,
}

/// Builds the snapshot chain under `dir`; returns the full snapshot's and
/// the last link's directories.
fn make_snapshots(dir: &Path) -> (PathBuf, PathBuf) {
    let elf = build_test_guest(&dir.join("guest")).unwrap_or_else(|e| panic!("{e}"));
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
    ports.push_commands(&[CMD_COUNT | (4096 << 8)]);
    assert!(
        ports.wait(WAIT, |s| s.done.len() == 1),
        "counting workload did not finish"
    );
    vm.pause().expect("pause");
    // Restore reads the files from the page cache either way; durability
    // is not what this measures.
    vm.set_sync_snapshots(false);
    let full = dir.join("full");
    vm.snapshot(&full, MemoryKind::Full).expect("full snapshot");
    let total_pages = (MEM / 4096) as u32;
    let span = total_pages / 20; // 5 %
    let stride = (total_pages - SPAN_FIRST_PAGE as u32) / span;
    let mut last = full.clone();
    for link in 1..=3 {
        vm.resume().expect("resume");
        ports.push_commands(&dirty_span_command(SPAN_FIRST_PAGE as u32, span, stride));
        assert!(
            ports.wait(WAIT, |s| s.done.len() == 1 + link),
            "dirty workload did not finish"
        );
        vm.pause().expect("pause");
        last = dir.join(format!("inc{link}"));
        vm.snapshot(&last, MemoryKind::Incremental)
            .expect("incremental snapshot");
    }
    (full, last)
}

/// The stamp of `stage` in `run`, if present.
fn stamp(run: &Run, stage: &str) -> Option<u64> {
    run.stamps
        .iter()
        .find(|(s, _)| s.starts_with(stage))
        .map(|(_, ns)| *ns)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list.
    }
    common::require_kvm("restore_process");
    let runs: usize = std::env::var("VMR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(1);
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (full, last) = make_snapshots(tmp.path());
    if std::env::var_os("VMR_BENCH_KEEP").is_some() {
        // For profiling by hand (strace, perf); the caller deletes it.
        let kept = tmp.keep();
        println!("snapshots kept: {} and {}", full.display(), last.display());
        drop(kept);
        return;
    }
    let series = tmp.path().join("series");

    let modes: [(&str, RestoreMemory, &[&str]); 3] = [
        ("private lazy (default)", RestoreMemory::PrivateLazy, &[]),
        (
            "shared lazy",
            RestoreMemory::SharedLazy,
            &["--shared-memory"],
        ),
        (
            "shared copy",
            RestoreMemory::SharedCopy,
            &["--shared-memory", "--eager-copy"],
        ),
    ];
    let baseline = std::env::var_os("VMR_BENCH_BASELINE_VMM").map(PathBuf::from);
    if let Some(b) = &baseline {
        assert!(
            b.is_file(),
            "VMR_BENCH_BASELINE_VMM: {} is not a file",
            b.display()
        );
    }
    let mut cases = Vec::new();
    for (snapshot, dir) in [("full", &full), ("inc3 (chain of 3)", &last)] {
        for (mode, memory, args) in modes {
            if let (Some(b), true) = (&baseline, memory != RestoreMemory::SharedCopy) {
                cases.push(Case {
                    vmm: b.clone(),
                    baseline: true,
                    snapshot,
                    dir: dir.clone(),
                    mode,
                    memory,
                    args,
                    before: false,
                    plain: Vec::new(),
                    timed: Vec::new(),
                    load: Vec::new(),
                    memory_ms: Vec::new(),
                    vm_restore: Vec::new(),
                });
            }
            for before in [false, true] {
                cases.push(Case {
                    vmm: PathBuf::from(VMM),
                    baseline: false,
                    snapshot,
                    dir: dir.clone(),
                    mode,
                    memory,
                    args,
                    before,
                    plain: Vec::new(),
                    timed: Vec::new(),
                    load: Vec::new(),
                    memory_ms: Vec::new(),
                    vm_restore: Vec::new(),
                });
            }
        }
    }
    let dirty = |c: &Case| c.before.then_some(series.as_path());
    for c in &cases {
        restore_once(&c.vmm, &c.dir, c.args, dirty(c), false)
            .unwrap_or_else(|e| panic!("warm-up: {e}"));
    }
    let mut floor_true = Vec::new();
    let mut floor_vmm = Vec::new();
    for _ in 0..runs {
        let r = spawn_once(Command::new("/bin/true"), None).unwrap_or_else(|e| panic!("{e}"));
        floor_true.push(ms_between(r.spawn, r.exited));
        let mut v = Command::new(VMM);
        v.arg("--version");
        let r = spawn_once(v, None).unwrap_or_else(|e| panic!("{e}"));
        floor_vmm.push(ms_between(r.spawn, r.exited));
        for c in &mut cases {
            let d = c.before.then_some(series.as_path());
            c.plain.push(
                restore_once(&c.vmm, &c.dir, c.args, d, false).unwrap_or_else(|e| panic!("{e}")),
            );
            if c.before || c.baseline {
                continue;
            }
            c.timed.push(
                restore_once(&c.vmm, &c.dir, c.args, None, true).unwrap_or_else(|e| panic!("{e}")),
            );
            // The same library calls in this process (the VM is dropped
            // paused).
            c.load.push(time_ms(|| {
                SnapshotData::load(&c.dir).expect("state loads");
            }));
            // Teardown (dropped after the clock stops) is not timed.
            let t = Instant::now();
            let memory = snapshot::restore_memory(&c.dir, c.memory).expect("memory");
            c.memory_ms.push(t.elapsed().as_secs_f64() * 1e3);
            drop(memory);
            let t = Instant::now();
            let (vm, _) = Vm::restore(
                &c.dir,
                RestoreOptions {
                    memory: c.memory,
                    serial_out: None,
                    dirty_log: false,
                },
            )
            .expect("restore");
            c.vm_restore.push(t.elapsed().as_secs_f64() * 1e3);
            drop(vm);
        }
    }
    assert!(
        std::fs::read_dir(&series).map_or(true, |mut d| d.next().is_none()),
        "a snapshot was written under {}",
        series.display()
    );

    println!();
    println!(
        "Restore from process start: `vmm restore` of a 512 MiB test guest (every page non-zero), {runs} runs per case, interleaved; ms from just before spawn()"
    );
    println!();
    println!(
        "| snapshot | memory | dirty log | to first guest output: median | min | max | to the whole line (median) | to process exit (median) |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for c in &cases {
        let s = stats(
            c.plain
                .iter()
                .map(|r| ms_between(r.spawn, r.first_output))
                .collect(),
        );
        let line = median(
            c.plain
                .iter()
                .map(|r| ms_between(r.spawn, r.line))
                .collect(),
        );
        let exit = median(
            c.plain
                .iter()
                .map(|r| ms_between(r.spawn, r.exited))
                .collect(),
        );
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            c.snapshot,
            c.mode,
            if c.baseline {
                "off (baseline binary)"
            } else if c.before {
                "on (`--snapshot-on-signal`; before)"
            } else {
                "off (this build)"
            },
            s.median,
            s.min,
            s.max,
            line,
            exit
        );
    }
    let t = stats(floor_true);
    let v = stats(floor_vmm);
    println!(
        "| floor: `/bin/true`, spawn to exit | | | {:.2} | {:.2} | {:.2} | | |",
        t.median, t.min, t.max
    );
    println!(
        "| floor: `vmm --version`, spawn to exit | | | {:.2} | {:.2} | {:.2} | | |",
        v.median, v.min, v.max
    );
    println!();
    println!(
        "Where the time goes (this build), with VMR_VMM_TIMINGS=1: median of {runs} runs per stage; ms"
    );
    println!();
    println!("| snapshot | memory | exec + loading to main | log + CLI setup | state load, memory, KVM VM + vCPUs | vCPU/irqchip state, vCPU thread | resume | resume to first guest output | total |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for c in cases.iter().filter(|c| !c.before && !c.baseline) {
        let col = |from: &dyn Fn(&Run) -> Option<u64>, to: &dyn Fn(&Run) -> Option<u64>| {
            let v: Vec<f64> = c
                .timed
                .iter()
                .filter_map(|r| Some(ms_between(from(r)?, to(r)?)))
                .collect();
            if v.len() == c.timed.len() {
                format!("{:.2}", median(v))
            } else {
                "n/a".into()
            }
        };
        let spawn = |r: &Run| Some(r.spawn);
        let main = |r: &Run| stamp(r, "main");
        let parsed = |r: &Run| stamp(r, "parsed");
        let created = |r: &Run| stamp(r, "VM created");
        let restored = |r: &Run| stamp(r, "restored");
        let resumed = |r: &Run| stamp(r, "resumed");
        let output = |r: &Run| Some(r.first_output);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.snapshot,
            c.mode,
            col(&spawn, &main),
            col(&main, &parsed),
            col(&parsed, &created),
            col(&created, &restored),
            col(&restored, &resumed),
            col(&resumed, &output),
            col(&spawn, &output),
        );
    }
    println!();
    println!(
        "Inside the restore (this build), with VMR_VMM_TIMINGS=1: the `vmr_vmm::timing` milestones, median of {runs} runs per step; ms"
    );
    println!();
    // (from stamp, to stamp, column)
    let steps = [
        ("parsed", "state loaded", "state file read and decoded"),
        ("state loaded", "memory mapped", "memory mapped"),
        (
            "memory mapped",
            "kvm opened",
            "/dev/kvm opened, capabilities",
        ),
        ("kvm opened", "KVM_CREATE_VM", "KVM_CREATE_VM"),
        (
            "KVM_CREATE_VM",
            "KVM_SET_USER_MEMORY_REGION",
            "KVM_SET_USER_MEMORY_REGION",
        ),
        (
            "KVM_SET_USER_MEMORY_REGION",
            "KVM_CREATE_IRQCHIP",
            "KVM_CREATE_IRQCHIP",
        ),
        ("KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2", "KVM_CREATE_PIT2"),
        ("KVM_CREATE_PIT2", "vCPUs created", "vCPUs created"),
        (
            "vCPUs created",
            "irqchip, PIT and clock state set",
            "irqchip, PIT and clock state set",
        ),
        (
            "irqchip, PIT and clock state set",
            "vCPU state set",
            "vCPU state set",
        ),
        ("vCPU state set", "restored", "vCPU thread"),
    ];
    print!("| snapshot | memory |");
    for (_, _, label) in &steps {
        print!(" {label} |");
    }
    println!();
    println!("| --- | --- |{}", " ---: |".repeat(steps.len()));
    for c in cases.iter().filter(|c| !c.before && !c.baseline) {
        print!("| {} | {} |", c.snapshot, c.mode);
        for (from, to, _) in &steps {
            let v: Vec<f64> = c
                .timed
                .iter()
                .filter_map(|r| Some(ms_between(stamp(r, from)?, stamp(r, to)?)))
                .collect();
            if v.len() == c.timed.len() && !v.is_empty() {
                print!(" {:.2} |", median(v));
            } else {
                print!(" n/a |");
            }
        }
        println!();
    }
    println!();
    println!(
        "The same library calls inside this process (no exec), dirty log off: median of {runs}; ms"
    );
    println!();
    println!("| snapshot | memory | `SnapshotData::load` (one state file) | `snapshot::restore_memory` | `Vm::restore` (paused VM) |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for c in cases.iter().filter(|c| !c.before && !c.baseline) {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            c.snapshot,
            c.mode,
            median(c.load.clone()),
            median(c.memory_ms.clone()),
            median(c.vm_restore.clone()),
        );
    }
}
