//! `capture-agent`: runs recorded instances, ships capture spools to Kafka
//! and reads host sensors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use capture_agent::metrics::ShipperMetrics;
use capture_agent::sensors::Sensors;
use capture_agent::shipper::{display_chain, Shipper, ShipperOptions};
use capture_agent::source::SpoolSource;
use clap::{Parser, Subcommand};
use vmr_proto::InstanceId;

#[derive(Parser)]
#[command(name = "capture-agent", version, about)]
struct Cli {
    /// Parse and validate a configuration file, print the result, and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (vmr.v1.CaptureAgent, health, reflection) and
    /// Prometheus /metrics until SIGTERM or SIGINT; then stop every
    /// instance.
    Serve(ServeArgs),
    /// Ship one spool to Kafka until SIGTERM or SIGINT.
    Ship(ShipArgs),
    /// Run one recorded instance (backends, shippers, guest) until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Print what host sensors exist and one reading of each, as JSON.
    Sensors {
        /// Configuration file (the `[sensors]` table is used).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Root of sysfs.
        #[arg(long)]
        sys_root: Option<PathBuf>,
        /// Root of procfs.
        #[arg(long)]
        proc_root: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ShipArgs {
    /// The spool directory (vhost-tap `--capture` with `--capture-retain-mib`).
    #[arg(long)]
    spool: PathBuf,
    /// The instance whose events the spool holds.
    #[arg(long)]
    instance: String,
    /// Configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides the file and VMR_BOOTSTRAP_SERVERS).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Schema Registry URL (overrides the file and VMR_REGISTRY_URL).
    #[arg(long)]
    registry_url: Option<String>,
    /// Name of this source in the `vmr.source` header (default: the spool
    /// directory's name); keep it the same across restarts.
    #[arg(long)]
    source: Option<String>,
    /// State file (default: `shipper.json` in the spool).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Write the counters as JSON to this file, replaced atomically.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// How often the metrics file is written (ms).
    #[arg(long, default_value_t = 500)]
    metrics_interval_ms: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides `[agent] listen`).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Metrics listen address (overrides `[agent] metrics-listen`).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Data directory (overrides `[agent] data-dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Machine image directory (repeat; overrides `[agent] image-dirs`).
    #[arg(long = "image-dir")]
    image_dirs: Vec<PathBuf>,
    /// Emit logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The machine image directory (with `image.toml`).
    #[arg(long)]
    image: PathBuf,
    /// The instance id.
    #[arg(long)]
    instance: String,
    /// Hypervisor driver.
    #[arg(long, default_value = "qemu")]
    driver: String,
    /// Data directory; the instance lives in `<data>/<instance>/`.
    #[arg(long)]
    data: PathBuf,
    /// Network namespace the NICs' TAP devices live in.
    #[arg(long)]
    netns: Option<String>,
    /// TAP name prefix; NIC i gets `<prefix><i>`.
    #[arg(long, default_value = "vmrtap")]
    tap_prefix: String,
    /// Configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// QEMU acceleration: kvm, tcg or auto.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Directory holding vhost-tap-blk and vhost-tap-net (default: next to
    /// this executable, then $PATH).
    #[arg(long)]
    backend_dir: Option<PathBuf>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

fn install_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` has no other requirements.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<AgentConfig> {
    let cfg = match path {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    Ok(cfg)
}

fn write_metrics(path: &std::path::Path, m: &ShipperMetrics) {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(&m.snapshot()).expect("metrics always serialise");
    if std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "cannot write the metrics file");
    }
}

fn ship(a: ShipArgs) -> anyhow::Result<()> {
    let mut cfg = load(a.config.as_ref())?;
    cfg.endpoints = cfg.endpoints.with_env(|k| std::env::var(k).ok());
    if let Some(b) = a.bootstrap_servers {
        cfg.endpoints.bootstrap_servers = b;
    }
    if let Some(r) = a.registry_url {
        cfg.endpoints.registry_url = r;
    }
    cfg.validate()?;
    let instance = InstanceId::new(a.instance).context("--instance")?;
    let mut opts = ShipperOptions::for_spool(
        &a.spool,
        instance,
        cfg.endpoints.clone(),
        cfg.shipper.clone(),
    );
    if let Some(s) = a.source {
        opts.source_name = s;
    }
    if let Some(s) = a.state_file {
        opts.state_file = s;
    }
    let source = SpoolSource::open(&a.spool)?;
    let metrics = Arc::new(ShipperMetrics::default());
    let mut shipper = Shipper::new(opts, source, metrics.clone())?;
    install_signals();
    let reporter = a.metrics_file.clone().map(|path| {
        let m = metrics.clone();
        let every = Duration::from_millis(a.metrics_interval_ms.max(10));
        std::thread::spawn(move || {
            while !STOP.load(Ordering::Acquire) {
                write_metrics(&path, &m);
                std::thread::sleep(every);
            }
        })
    });
    shipper.run(&STOP);
    if let Some(r) = reporter {
        STOP.store(true, Ordering::Release);
        let _ = r.join();
    }
    if let Some(path) = &a.metrics_file {
        write_metrics(path, &metrics);
    }
    tracing::info!(metrics = ?metrics.snapshot(), "stopped");
    Ok(())
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut cfg = load(a.config.as_ref())?;
    cfg.endpoints = cfg.endpoints.with_env(|k| std::env::var(k).ok());
    cfg.validate()?;
    let instance = InstanceId::new(a.instance).context("--instance")?;
    let mut opts = LaunchOptions::new(&a.image, instance, a.driver, &a.data);
    opts.netns = a.netns;
    opts.tap_prefix = a.tap_prefix;
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.accel = a.accel.parse().context("--accel")?;
    opts.supervisor.bin_dir = a.backend_dir;
    install_signals();
    opts.sensors = Some(cfg.sensors.clone());
    opts.supervisor.spool_full = cfg.capture.spool_full;
    opts.supervisor.block_bound = Some(cfg.capture.block_bound());
    opts.supervisor.retain_mib = cfg.capture.spool_retain_mib;
    opts.supervisor.segment_mib = cfg.capture.spool_segment_mib;
    let inst = RecordedInstance::launch(opts).map_err(|e| anyhow::anyhow!(display_chain(&e)))?;
    while !STOP.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = inst.stop();
    tracing::info!(exit = ?report.exit, shippers = ?report.shippers, "stopped");
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = load(a.config.as_ref())?;
    cfg.endpoints = cfg.endpoints.with_env(|k| std::env::var(k).ok());
    if let Some(l) = a.listen {
        cfg.agent.listen = l;
    }
    if let Some(l) = a.metrics_listen {
        cfg.agent.metrics_listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.agent.data_dir = d;
    }
    if !a.image_dirs.is_empty() {
        cfg.agent.image_dirs = a.image_dirs;
    }
    cfg.validate()?;
    let snapshots: Option<Arc<dyn capture_agent::service::SnapshotControl>> = if cfg
        .snapshots
        .enabled
    {
        let ecfg = capture_agent::snapshot::EngineConfig::from_agent(&cfg);
        tracing::info!(store = %ecfg.store.url, staging = %ecfg.staging_dir.display(), "snapshot engine");
        let engine = capture_agent::snapshot::SnapshotEngine::new(ecfg)
            .context("cannot start the snapshot engine ([snapshots])")?;
        Some(Arc::new(engine))
    } else {
        tracing::info!("snapshots disabled ([snapshots] enabled = false)");
        None
    };
    // The engine owns a runtime of its own; it is dropped here, outside
    // the service's runtime.
    let engine = snapshots.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(async move {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
            tracing::info!("shutdown requested");
        };
        capture_agent::service::serve(cfg, snapshots, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!(display_chain(&e)))
    });
    drop(rt);
    drop(engine);
    r
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = matches!(&cli.command, Some(Command::Serve(a)) if a.log_json);
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(path) = cli.check_config {
        let cfg = AgentConfig::load(&path)?;
        println!("{}: valid", path.display());
        println!("{cfg:#?}");
        return Ok(());
    }
    match cli.command {
        Some(Command::Serve(a)) => serve(a),
        Some(Command::Ship(a)) => ship(a),
        Some(Command::Run(a)) => run(a),
        Some(Command::Sensors {
            config,
            sys_root,
            proc_root,
        }) => {
            let mut cfg = load(config.as_ref())?.sensors;
            if let Some(r) = sys_root {
                cfg.sys_root = r;
            }
            if let Some(r) = proc_root {
                cfg.proc_root = r;
            }
            let sensors = Sensors::probe(&cfg);
            let readings: Vec<serde_json::Value> = sensors
                .read()
                .into_iter()
                .map(|s| serde_json::json!({"sensor": s.sensor, "value": s.value, "unit": s.unit}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "inventory": sensors.describe(),
                    "readings": readings,
                }))?
            );
            Ok(())
        }
        None => {
            anyhow::bail!(
                "nothing to do: give a command (serve, ship, run, sensors) or --check-config"
            )
        }
    }
}
