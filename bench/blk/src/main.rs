//! vhost-user-blk benchmark: a synthetic frontend (no guest) drives 4 KiB random
//! writes and reads at queue depth 32 and 1 MiB sequential writes against
//! qemu-storage-daemon, vhost-tap-blk with the capture tee off, and with the
//! tee writing to a file; prints one table.
//!
//! Every backend serves the same pre-filled raw image in the same directory,
//! every run lasts the same time, and the backends take turns round by round so
//! that background noise spreads over all of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmr_testkit::ChildGuard;

use vmr_bench::frontend::BlkDevice;
use vmr_bench::workload::{self, Tally, Until, WORKLOADS};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "vhost-user-blk benchmark: qemu-storage-daemon vs vhost-tap-blk")]
struct Args {
    /// Rounds; each round runs every workload once on every backend.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds per workload run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Size of the disk image in MiB.
    #[arg(long, default_value_t = 512)]
    image_mib: u64,
    /// Directory for the image, sockets and capture files (same file system for all).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "/usr/bin/qemu-storage-daemon")]
    qsd: PathBuf,
    /// vhost-tap-blk binary (default: next to this binary).
    #[arg(long)]
    tap_blk: Option<PathBuf>,
    /// A second vhost-tap-blk binary (for example a build of an earlier
    /// commit), run as backend `tap-on-base` with the same tee arguments as
    /// `tap-on`, so two builds are compared side by side in one run.
    #[arg(long)]
    tap_blk_base: Option<PathBuf>,
    /// Arguments of vhost-tap-blk; `{socket}` and `{image}` are substituted.
    #[arg(
        long,
        default_value = "--socket {socket} --image {image} --instance-id bench --device vda"
    )]
    tap_args: String,
    /// Extra arguments that turn the tee on (backend tap-on): a rolling
    /// capture that keeps the newest 1 GiB; `{capture}` is substituted.
    /// `--capture-recycle oldest` because no shipper commits positions in
    /// the benchmark: with the default rule (`committed`) the spool would
    /// fill after 1 GiB and then block the guest.
    #[arg(
        long,
        default_value = "--capture {capture} --capture-retain-mib 1024 --capture-segment-mib 64 --capture-recycle oldest"
    )]
    tee_args: String,
    /// Extra arguments of backend tap-file: the tee on with one capture file
    /// that grows without bound (reported without a target: once the page
    /// cache's dirty limit is reached it runs at the disk's write speed).
    #[arg(long, default_value = "--capture {capture}")]
    tee_file_args: String,
    /// Skip counting allocations with vmr-bench-blk-alloc.
    #[arg(long)]
    no_alloc: bool,
    /// Backends to run (comma-separated: qsd, tap-off, tap-on, tap-file,
    /// tap-on-base with `--tap-blk-base`).
    #[arg(long, default_value = "qsd,tap-off,tap-on,tap-file")]
    backends: String,
    /// Workloads to run: comma-separated prefixes of their names (`4k
    /// randwrite`, `4k randread`, `1m`), or `all`.
    #[arg(long, default_value = "all")]
    workloads: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Qsd,
    TapOff,
    TapOn,
    TapFile,
    TapOnBase,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Qsd => "qemu-storage-daemon",
            Backend::TapOff => "vhost-tap-blk tee off",
            Backend::TapOn => "vhost-tap-blk tee on",
            Backend::TapFile => "tee on, unbounded file",
            Backend::TapOnBase => "tee on, --tap-blk-base",
        }
    }
    /// Whether the tee is on (None: not a vhost-tap backend).
    fn tee(self) -> Option<bool> {
        match self {
            Backend::Qsd => None,
            Backend::TapOff => Some(false),
            Backend::TapOn | Backend::TapFile | Backend::TapOnBase => Some(true),
        }
    }
    fn target(self) -> Option<f64> {
        match self {
            Backend::Qsd => None,
            Backend::TapOff => Some(1.0),
            Backend::TapOn => Some(0.9),
            Backend::TapFile | Backend::TapOnBase => None,
        }
    }
}

/// CPU time (ns, from `/proc/PID/task/*/schedstat`) the backend's threads
/// used so far: all threads, and the capture sink thread alone.
fn cpu_ns(pid: u32) -> (u64, u64) {
    let mut total = 0;
    let mut sink = 0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in tasks.flatten() {
        let p = t.path();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        total += ns;
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() == "capture-sink" {
            sink += ns;
        }
    }
    (total, sink)
}

fn wait_for_socket(path: &Path, guard: &mut ChildGuard, what: &str) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = guard.try_wait() {
            bail!(
                "{what} exited ({status}) before creating {}",
                path.display()
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{what} did not create {} within 10 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn substitute(template: &str, vars: &[(&str, &Path)]) -> Vec<String> {
    template
        .split_whitespace()
        .map(|w| {
            let mut w = w.to_string();
            for (k, v) in vars {
                w = w.replace(&format!("{{{k}}}"), &v.to_string_lossy());
            }
            w
        })
        .collect()
}

/// Removes a capture file or a rolling capture directory.
fn remove_capture(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn start_backend(
    args: &Args,
    b: Backend,
    work: &Path,
    image: &Path,
    tap_bin: &Path,
) -> Result<(ChildGuard, PathBuf)> {
    let socket = work.join(format!("{b:?}.sock"));
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(work.join(format!("{b:?}.log")))?;
    let mut cmd = match b {
        Backend::Qsd => {
            let mut c = Command::new(&args.qsd);
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct=off",
                image.display()
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ));
            c
        }
        Backend::TapOff | Backend::TapOn | Backend::TapFile | Backend::TapOnBase => {
            let bin = match (b, &args.tap_blk_base) {
                (Backend::TapOnBase, Some(base)) => base.as_path(),
                _ => tap_bin,
            };
            let mut c = Command::new(bin);
            c.args(substitute(
                &args.tap_args,
                &[("socket", &socket), ("image", image)],
            ));
            let capture = work.join("capture.events");
            remove_capture(&capture);
            match b {
                Backend::TapOn | Backend::TapOnBase => {
                    c.args(substitute(&args.tee_args, &[("capture", &capture)]));
                }
                Backend::TapFile => {
                    c.args(substitute(&args.tee_file_args, &[("capture", &capture)]));
                }
                _ => {}
            }
            c.env("RUST_LOG", "warn");
            c
        }
    };
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut guard = ChildGuard::spawn(b.label(), &mut cmd)?;
    wait_for_socket(&socket, &mut guard, b.label())?;
    Ok((guard, socket))
}

/// Runs `vmr-bench-blk-alloc` (tee off and on, as selected) and returns
/// `(workload, tee, allocations per request)`.
fn count_allocations(
    backends: &[Backend],
    work: &Path,
    image: &Path,
) -> Result<Vec<(String, bool, f64)>> {
    let bin = std::env::current_exe()?
        .parent()
        .context("this binary has a directory")?
        .join("vmr-bench-blk-alloc");
    let mut out = Vec::new();
    for b in backends {
        let Some(tee) = b.tee() else { continue };
        if matches!(*b, Backend::TapFile | Backend::TapOnBase) {
            // Same code path as tap-on; only the sink's file differs.
            continue;
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("--image").arg(image).arg("--dir").arg(work);
        if tee {
            cmd.arg("--tee");
        }
        eprintln!("  counting allocations ({})", b.label());
        let o = cmd
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !o.status.success() {
            bail!(
                "{} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // alloc <workload words...> tee=<on|off> per_request=<f>
            let Some(rest) = line.strip_prefix("alloc ") else {
                continue;
            };
            let Some((name, tail)) = rest.split_once(" tee=") else {
                continue;
            };
            let Some(n) = tail
                .split_once("per_request=")
                .and_then(|(_, v)| v.trim().parse().ok())
            else {
                continue;
            };
            out.push((name.to_string(), tee, n));
        }
    }
    Ok(out)
}

fn prefill(image: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(image).with_context(|| format!("creating {}", image.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8 | 1;
    }
    for _ in 0..bytes >> 20 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let backends: Vec<Backend> = args
        .backends
        .split(',')
        .map(|s| match s.trim() {
            "qsd" => Ok(Backend::Qsd),
            "tap-off" => Ok(Backend::TapOff),
            "tap-on" => Ok(Backend::TapOn),
            "tap-file" => Ok(Backend::TapFile),
            "tap-on-base" => Ok(Backend::TapOnBase),
            other => {
                bail!("unknown backend {other:?} (use qsd, tap-off, tap-on, tap-file, tap-on-base)")
            }
        })
        .collect::<Result<_>>()?;
    if !args.qsd.is_file() && backends.contains(&Backend::Qsd) {
        bail!(
            "{} not found: install qemu-system-common (scripts/setup.sh)",
            args.qsd.display()
        );
    }
    let tap_bin = match &args.tap_blk {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has a directory")?
            .join("vhost-tap-blk"),
    };
    if !tap_bin.is_file() && backends.iter().any(|b| *b != Backend::Qsd) {
        bail!(
            "{} not found: build it with `cargo build --release -p vhost-tap`",
            tap_bin.display()
        );
    }
    if backends.contains(&Backend::TapOnBase)
        && !args.tap_blk_base.as_deref().is_some_and(Path::is_file)
    {
        bail!("backend tap-on-base needs --tap-blk-base naming a vhost-tap-blk binary");
    }
    let selected: Vec<bool> = WORKLOADS
        .iter()
        .map(|w| {
            args.workloads == "all"
                || args
                    .workloads
                    .split(',')
                    .any(|p| !p.trim().is_empty() && w.name.starts_with(p.trim()))
        })
        .collect();
    if !selected.contains(&true) {
        bail!(
            "--workloads {:?} selects none of: {}",
            args.workloads,
            WORKLOADS.map(|w| w.name).join(", ")
        );
    }
    let work = tempfile::Builder::new()
        .prefix("vmr-bench-blk-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let image = work.path().join("disk.raw");
    let image_bytes = args.image_mib << 20;
    prefill(&image, image_bytes)?;

    eprintln!(
        "vmr-bench-blk: {} rounds x {} workloads x {} backends, {:.1} s each, image {} MiB in {}",
        args.rounds,
        selected.iter().filter(|s| **s).count(),
        backends.len(),
        args.seconds,
        args.image_mib,
        args.dir.display()
    );
    let mut results = vec![vec![Tally::default(); backends.len()]; WORKLOADS.len()];
    let mut per_round = vec![vec![Vec::<f64>::new(); backends.len()]; WORKLOADS.len()];
    // CPU ns used by the backend process and by its sink thread, per cell.
    let mut cpu = vec![vec![(0u64, 0u64); backends.len()]; WORKLOADS.len()];
    for round in 0..args.rounds {
        // Alternate the order each round.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..backends.len()).collect()
        } else {
            (0..backends.len()).rev().collect()
        };
        for &bi in &order {
            let b = backends[bi];
            let (mut guard, socket) = start_backend(&args, b, work.path(), &image, &tap_bin)?;
            let mut dev = BlkDevice::connect(&socket)
                .with_context(|| format!("connecting to {}", b.label()))?;
            workload::verify(&mut dev, image_bytes)
                .with_context(|| format!("verifying {}", b.label()))?;
            for (wi, w) in WORKLOADS.iter().enumerate() {
                if !selected[wi] {
                    continue;
                }
                let before = cpu_ns(guard.pid());
                let t = workload::run(
                    &mut dev,
                    *w,
                    image_bytes,
                    Until::Elapsed(Duration::from_secs_f64(args.seconds)),
                    0x5eed + round as u64,
                )
                .with_context(|| format!("{} on {}", w.name, b.label()))?;
                let after = cpu_ns(guard.pid());
                let c = &mut cpu[wi][bi];
                c.0 += after.0.saturating_sub(before.0);
                c.1 += after.1.saturating_sub(before.1);
                let r = &mut results[wi][bi];
                r.ops += t.ops;
                r.bytes += t.bytes;
                r.secs += t.secs;
                per_round[wi][bi].push(t.ops as f64 / t.secs);
                eprintln!(
                    "  round {} {:<22} {:<18} {:>10.0} IOPS",
                    round + 1,
                    b.label(),
                    w.name,
                    t.ops as f64 / t.secs
                );
            }
            drop(dev);
            guard.stop(Duration::from_secs(5));
            remove_capture(&work.path().join("capture.events"));
        }
    }

    let allocs = if args.no_alloc {
        Vec::new()
    } else {
        count_allocations(&backends, work.path(), &image)?
    };

    println!();
    println!(
        "{:<18} {:<22} {:>10} {:>9} {:>13} {:>8} {:>8} {:>10} {:>9} {:>9}  result",
        "workload",
        "backend",
        "IOPS",
        "MiB/s",
        "IOPS min-max",
        "vs qsd",
        "target",
        "allocs/req",
        "cpu us/r",
        "sink us/r"
    );
    let qsd_index = backends.iter().position(|b| *b == Backend::Qsd);
    let mut misses = 0;
    for (wi, w) in WORKLOADS.iter().enumerate() {
        if !selected[wi] {
            continue;
        }
        for (bi, b) in backends.iter().enumerate() {
            let t = results[wi][bi];
            let iops = t.ops as f64 / t.secs;
            let mibs = t.bytes as f64 / t.secs / (1 << 20) as f64;
            let rounds = &per_round[wi][bi];
            let lo = rounds.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = rounds.iter().cloned().fold(0.0, f64::max);
            let ratio = qsd_index.map(|q| {
                let base = results[wi][q];
                iops / (base.ops as f64 / base.secs)
            });
            let (ratio_s, target_s, verdict) = match (ratio, b.target()) {
                (Some(r), Some(tgt)) => {
                    let ok = r >= tgt;
                    if !ok {
                        misses += 1;
                    }
                    (
                        format!("{r:.2}x"),
                        format!(">={tgt:.2}x"),
                        if ok { "ok" } else { "MISS" },
                    )
                }
                (Some(r), None) => (
                    format!("{r:.2}x"),
                    "-".into(),
                    if *b == Backend::Qsd {
                        "baseline"
                    } else {
                        "info"
                    },
                ),
                (None, _) => ("-".into(), "-".into(), "-"),
            };
            let alloc_s = allocs
                .iter()
                .find(|(name, tee, _)| name == w.name && Some(*tee) == b.tee())
                .map_or_else(|| "-".to_string(), |(_, _, n)| format!("{n:.3}"));
            let (cpu_all, cpu_sink) = cpu[wi][bi];
            let per_req = |ns: u64| ns as f64 / 1000.0 / t.ops.max(1) as f64;
            let sink_s = if b.tee() == Some(true) {
                format!("{:.1}", per_req(cpu_sink))
            } else {
                "-".into()
            };
            println!(
                "{:<18} {:<22} {:>10.0} {:>9.1} {:>13} {:>8} {:>8} {:>10} {:>9.1} {:>9}  {}",
                if bi == 0 { w.name } else { "" },
                b.label(),
                iops,
                mibs,
                format!("{:.0}-{:.0}", lo, hi),
                ratio_s,
                target_s,
                alloc_s,
                per_req(cpu_all),
                sink_s,
                verdict
            );
        }
    }
    println!();
    println!(
        "IOPS: total requests / total time over {} rounds of {:.1} s per cell; min-max: per-round IOPS.",
        args.rounds, args.seconds
    );
    println!(
        "cpu us/r: CPU time of all the backend's threads per request (schedstat), sink us/r: of its \
         capture-sink thread; both independent of what else runs on the machine, unlike IOPS."
    );
    if !allocs.is_empty() {
        println!(
            "allocs/req: heap allocations per request of the vhost-tap library run in-process \
             (vmr-bench-blk-alloc, counting allocator, steady state after warm-up)."
        );
    }
    if misses > 0 {
        println!("{misses} row(s) miss their target.");
    } else if qsd_index.is_some() && backends.len() > 1 {
        println!("all rows meet their targets.");
    }
    Ok(())
}
