//! `vmm`: run, restore and probe the built-in microVM.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmr_vmm::serial::SerialOut;
use vmr_vmm::snapshot::RestoreMemory;
use vmr_vmm::supervise::{supervise, Outcome, Report, SnapshotOnRequest, SnapshotSeries};
// `CLOCK_MONOTONIC` in nanoseconds: the clock `Instant` reads, so a parent
// process can subtract its own reading taken before it spawned this one.
use vmr_vmm::timing::{self, monotonic_ns};
use vmr_vmm::vcpu::VmEvent;
use vmr_vmm::vm::{BootSource, RestoreOptions, Vm, VmConfig};

/// vmreplay's KVM microVM.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest: an ELF or flat freestanding image, or a Linux bzImage.
    Run {
        /// Kernel image (ELF, bzImage or flat binary; detected from its
        /// first bytes).
        #[arg(long)]
        kernel: PathBuf,
        /// Initrd (bzImage only).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line (bzImage only).
        #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
        cmdline: String,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Write the serial console here instead of stdout.
        #[arg(long)]
        serial_out: Option<PathBuf>,
        /// On SIGUSR1, pause and write a snapshot into a new numbered
        /// directory under this one (the first full, later ones
        /// incremental), then resume.
        #[arg(long)]
        snapshot_on_signal: Option<PathBuf>,
    },
    /// Restore a snapshot directory into a new VM and run it.
    ///
    /// With VMR_VMM_TIMINGS=1 in the environment, once the VM runs, stderr
    /// gets `vmm: timing <stage> mono=<ns>` lines (CLOCK_MONOTONIC at entry
    /// to main, after argument parsing, at the restore's steps, after the
    /// restore, after the resume) and log lines stamped the same way.
    Restore {
        /// The snapshot directory.
        #[arg(long)]
        snapshot: PathBuf,
        /// Write the serial console here instead of stdout.
        #[arg(long)]
        serial_out: Option<PathBuf>,
        /// Back memory with a shared memfd instead of mapping the files
        /// privately (needed when vhost-user backends attach); it is filled
        /// lazily through userfaultfd unless `--eager-copy` is given.
        #[arg(long)]
        shared_memory: bool,
        /// With `--shared-memory`: copy every page in before the VM runs
        /// (the fallback for hosts without userfaultfd).
        #[arg(long, requires = "shared_memory")]
        eager_copy: bool,
        /// As for `run`.
        #[arg(long)]
        snapshot_on_signal: Option<PathBuf>,
    },
    /// Print the host's KVM capabilities and whether Linux guests can boot.
    Probe {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Give up on the speed check after this many seconds.
        #[arg(long, default_value_t = 20)]
        timeout_secs: u64,
    },
}

/// Set by the SIGUSR1 handler (a handler can only reach a static); the
/// supervisor clears it when it takes the snapshot.
static SNAPSHOT_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SNAPSHOT_REQUESTED.store(true, Ordering::SeqCst);
}

fn serial_out(path: &Option<PathBuf>) -> Result<SerialOut> {
    Ok(match path {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    })
}

/// The environment variable that makes `vmm` print restore timestamps.
const TIMINGS_ENV: &str = "VMR_VMM_TIMINGS";

/// Log timestamps as `mono=<ns>` (see [`monotonic_ns`]).
struct MonotonicTimer;

impl tracing_subscriber::fmt::time::FormatTime for MonotonicTimer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "mono={}", monotonic_ns())
    }
}

/// With `VMR_VMM_TIMINGS=1`: prints every stamp of the run (this binary's
/// stages and the library's restore milestones, all in
/// [`vmr_vmm::timing`]) to stderr as `vmm: timing <stage> mono=<ns>`, once
/// the guest runs (so printing them does not delay it).
fn print_timings() {
    for (stage, ns) in timing::take() {
        eprintln!("vmm: timing {stage} mono={ns}");
    }
}

fn main() -> Result<()> {
    let timed = std::env::var_os(TIMINGS_ENV).is_some_and(|v| v == "1");
    if timed {
        timing::enable();
    }
    timing::stamp("main");
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // Timed runs log the VM's restore milestones (info level).
            if timed { "warn,vmr_vmm=info" } else { "warn" }.into()
        })
    };
    if timed {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_timer(MonotonicTimer)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    timing::stamp("parsed");
    let wants_signal = match &cli.command {
        Command::Run {
            snapshot_on_signal, ..
        }
        | Command::Restore {
            snapshot_on_signal, ..
        } => snapshot_on_signal.is_some(),
        Command::Probe { .. } => false,
    };
    if wants_signal {
        // Before the VM exists, so an early SIGUSR1 is not fatal.
        vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_usr1)
            .context("installing the SIGUSR1 handler")?;
    }
    match cli.command {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            mem_mib,
            vcpus,
            serial_out: out,
            snapshot_on_signal,
        } => {
            let mut vm = Vm::new(VmConfig {
                mem_size: mem_mib
                    .checked_mul(1 << 20)
                    .context("--mem-mib is too large")?,
                vcpus,
                serial_out: Some(serial_out(&out)?),
                // Only the incremental snapshots of `--snapshot-on-signal`
                // need KVM's dirty log (enabling it costs milliseconds).
                dirty_log: snapshot_on_signal.is_some(),
                ..Default::default()
            })?;
            vm.load(&BootSource::Auto {
                kernel,
                initrd,
                cmdline,
            })?;
            vm.start()?;
            run_vm(&vm, snapshot_on_signal.as_deref())
        }
        Command::Restore {
            snapshot,
            serial_out: out,
            shared_memory,
            eager_copy,
            snapshot_on_signal,
        } => {
            let (vm, devices) = Vm::restore(
                &snapshot,
                RestoreOptions {
                    memory: match (shared_memory, eager_copy) {
                        (false, _) => RestoreMemory::PrivateLazy,
                        (true, false) => RestoreMemory::SharedLazy,
                        (true, true) => RestoreMemory::SharedCopy,
                    },
                    serial_out: Some(serial_out(&out)?),
                    // As for `run`: KVM's dirty log only for the incremental
                    // snapshots of `--snapshot-on-signal`.
                    dirty_log: snapshot_on_signal.is_some(),
                },
            )?;
            timing::stamp("restored");
            if let Some(d) = devices.first() {
                bail!(
                    "the snapshot has state for device {:?}; reattaching vhost-user backends is done by the capture agent, not this command",
                    d.id
                );
            }
            vm.resume()?;
            timing::stamp("resumed");
            print_timings();
            run_vm(&vm, snapshot_on_signal.as_deref())
        }
        Command::Probe { json, timeout_secs } => probe(json, timeout_secs),
    }
}

/// Runs `vm` until the guest stops, taking a snapshot on each SIGUSR1
/// when `snapshot_dir` is set.
fn run_vm(vm: &Vm, snapshot_dir: Option<&Path>) -> Result<()> {
    let mut series = snapshot_dir.map(SnapshotSeries::new);
    let snapshots = series.as_mut().map(|series| SnapshotOnRequest {
        series,
        request: &SNAPSHOT_REQUESTED,
    });
    let mut failed = None;
    let outcome = supervise(vm, Duration::from_millis(50), snapshots, |r| {
        match r {
            Report::Event(VmEvent::Debug(d)) => {
                eprintln!("vmm: debug stop on vCPU {} at {:#x}", d.vcpu, d.pc)
            }
            Report::Snapshot(info) => eprintln!(
                "vmm: {:?} snapshot {} ({} pages)",
                info.kind,
                info.dir.display(),
                info.pages
            ),
            Report::SnapshotFailed(e) => {
                failed = Some(e);
                return ControlFlow::Break(());
            }
            Report::Event(_) | Report::Idle => {}
        }
        ControlFlow::Continue(())
    });
    match outcome {
        Outcome::Shutdown(l) => {
            eprintln!("vmm: shutdown: {}", l.detail);
            Ok(())
        }
        Outcome::Fault(l) => {
            let rip = l.regs.first().map(|r| r.rip).unwrap_or(0);
            bail!("guest stopped: {:?}: {} (rip {rip:#x})", l.kind, l.detail);
        }
        Outcome::Detached => match failed {
            Some(e) => Err(anyhow::Error::new(e).context("snapshot failed")),
            None => bail!("supervision ended before the guest stopped"),
        },
    }
}

fn probe(json: bool, timeout_secs: u64) -> Result<()> {
    let r = vmr_vmm::probe::run(Duration::from_secs(timeout_secs))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let c = &r.capabilities;
    println!("KVM API version        {}", c.api_version);
    for (name, on) in [
        ("in-kernel irqchip", c.irqchip),
        ("in-kernel PIT", c.pit2),
        ("irqfd", c.irqfd),
        ("ioeventfd", c.ioeventfd),
        ("XSAVE", c.xsave),
        ("XCRS", c.xcrs),
        ("debug registers", c.debugregs),
        ("vCPU events", c.vcpu_events),
        ("guest debug", c.set_guest_debug),
        ("immediate exit", c.immediate_exit),
        ("clock adjust", c.adjust_clock),
        ("TSC deadline timer", c.tsc_deadline_timer),
    ] {
        println!("{name:<22} {}", if on { "yes" } else { "no" });
    }
    println!("vCPUs (recommended)    {}", c.nr_vcpus);
    println!("vCPUs (max)            {}", c.max_vcpus);
    println!("memory slots           {}", c.nr_memslots);
    println!("MSR index list         {}", c.msr_index_list);
    println!(
        "first instruction      {:.0} us after VMM start",
        r.first_instruction_us
    );
    println!(
        "plain ring-0 loop      {:.2} ns/iteration",
        r.plain_ns_per_iter
    );
    println!(
        "CR3 reload loop        {:.0} ns/iteration",
        r.cr3_ns_per_iter
    );
    println!(
        "linux bootable         {}",
        if r.linux_bootable { "yes" } else { "no" }
    );
    println!("verdict                {}", r.verdict);
    Ok(())
}
