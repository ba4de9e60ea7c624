//! Command lines of `vhost-tap-blk` and `vhost-tap-net` and the code that
//! runs them (the binaries only parse and call [`run_blk`] / [`run_net`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::blk::{BlockBackend, BlockConfig, Disk};
use crate::capture::replay::{Expectations, Outputs, ReplayClock};
use crate::capture::{
    CaptureSink, FileSink, Policy, Recycle, SpoolConfig, SpoolSink, Tee, TeeConfig,
};
use crate::control::{ControlLimits, ControlServer, ControlTargets};
use crate::fault::{FaultHook, RuleFaults};
use crate::filter::{parse_directions, parse_mac, BlockFilter, NetFilter};
use crate::metrics::Metrics;
use crate::net::replay::SourceConfig;
use crate::net::{ChannelReplaySource, NetBackend, NetConfig, ReplaySource, Tap};
use crate::seq::{FileSeq, SeqSource};
use crate::server::{Serve, Server};
use crate::Mode;

/// Most original block records a replay backend holds for comparison.
const EXPECT_LIMIT: usize = 4 << 20;

/// Errors running a backend binary.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid argument: {0}")]
    Arg(String),
    #[error(transparent)]
    Block(#[from] crate::blk::BlockError),
    #[error(transparent)]
    Disk(#[from] crate::blk::DiskError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Tap(#[from] crate::net::TapError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Seq(#[from] crate::seq::SeqError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("i/o")]
    Io(#[from] std::io::Error),
}

/// Flags shared by both binaries.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// vhost-user unix socket to listen on (an existing file is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// Instance id written into every record.
    #[arg(long, default_value = "local")]
    pub instance_id: String,
    /// Device name written into every record (default vda / net0).
    #[arg(long)]
    pub device: Option<String>,
    /// capture: serve the original; replay: serve a clone.
    #[arg(long, default_value = "capture")]
    pub mode: Mode,
    /// Largest virtqueue size offered.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Capture file (a header, then checksummed vmr.v1.Event frames; see
    /// docs/vhost-tap.md); tee off without it. An existing capture is
    /// appended to, never truncated.
    #[arg(long)]
    pub capture: Option<PathBuf>,
    /// block: the guest waits when the sink falls behind or the spool is
    /// full; drop: records are dropped and a GAP event written.
    #[arg(long, default_value = "block")]
    pub capture_policy: Policy,
    /// With `--capture-policy block`: the longest the capture waits for a
    /// full spool (ms; 0: as long as it takes). Past it, records are
    /// dropped with a GAP event until the spool takes records again.
    #[arg(long, default_value_t = 0)]
    pub capture_block_max_ms: u64,
    /// Capacity (records) of the queue in front of the sink.
    #[arg(long, default_value_t = 4096)]
    pub capture_queue: usize,
    /// Capacity (MiB of write data and frames) of the queue in front of the
    /// sink; the queue is full when either limit is reached.
    #[arg(long, default_value_t = 64)]
    pub capture_queue_mib: usize,
    /// Capture into a rolling spool of at most this many MiB: `--capture`
    /// names a directory of segment files. Which segments make room is set
    /// by `--capture-recycle`. Without it the capture file grows without
    /// bound.
    #[arg(long)]
    pub capture_retain_mib: Option<u64>,
    /// Size of one segment file with `--capture-retain-mib`.
    #[arg(long, default_value_t = 64)]
    pub capture_segment_mib: u64,
    /// committed: a full spool deletes only segments the shipper committed
    /// past (the `committed` file), else `--capture-policy` applies;
    /// oldest: the oldest segments go regardless (a flight recorder with no
    /// shipper).
    #[arg(long, default_value = "committed")]
    pub capture_recycle: Recycle,
    /// Shared per-instance sequence counter file (leased, durable; created
    /// atomically if missing). Default with `--capture`: `<capture>.seq`
    /// next to a capture file, `<capture>/seq` inside a spool directory.
    #[arg(long)]
    pub seq_file: Option<PathBuf>,
    /// Numbers one lease of the sequence file adds (one fsync per lease).
    #[arg(long, default_value_t = crate::seq::DEFAULT_LEASE)]
    pub seq_lease: u64,
    /// Control socket (line-delimited JSON: metrics, faults, inject).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Log a metrics snapshot every SECS seconds (0: never; SIGUSR1 always).
    #[arg(long, default_value_t = 0)]
    pub metrics_interval: u64,
    /// Serve a single front-end, then exit.
    #[arg(long)]
    pub exit_on_disconnect: bool,
}

/// `vhost-tap-blk` flags.
#[derive(Debug, Clone, Args)]
pub struct BlkArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Raw base image.
    #[arg(long)]
    pub image: PathBuf,
    /// Copy-on-write overlay (created if missing); the image stays untouched.
    /// It is the writable top of the disk's layer chain; after a
    /// `checkpoint` the chain is recorded in `<overlay>.chain`, which a
    /// restart with the same flags follows.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// A read-only layer under the overlay (repeat, bottom first): an
    /// overlay frozen by a checkpoint or a packed layer from a snapshot.
    /// Without `--overlay` the disk is read-only.
    #[arg(long = "layer")]
    pub layers: Vec<PathBuf>,
    /// Offer a read-only disk.
    #[arg(long)]
    pub read_only: bool,
    /// Request queues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub num_queues: usize,
    /// Answer to GET_ID (at most 20 bytes; default: the device name).
    #[arg(long)]
    pub serial: Option<String>,
    /// Operations to record: read,write,flush,discard,write-zeroes,get-id.
    #[arg(long)]
    pub capture_ops: Option<String>,
}

/// `vhost-tap-net` flags.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// TAP interface to open or create (`%d`: the kernel numbers it).
    #[arg(long, default_value = "vmrtap%d")]
    pub tap: String,
    /// Open the TAP inside /var/run/netns/NAME.
    #[arg(long)]
    pub netns: Option<String>,
    /// MAC address in the config space.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    pub mac: String,
    /// MTU in the config space.
    #[arg(long, default_value_t = 1500)]
    pub mtu: u16,
    /// Replay mode: also open the TAP and forward frames both ways.
    #[arg(long)]
    pub forward: bool,
    /// Directions to record: rx,tx.
    #[arg(long, default_value = "rx,tx")]
    pub capture_directions: String,
    /// Record only frames from or to this MAC.
    #[arg(long)]
    pub capture_mac: Option<String>,
    /// Record only IP packets from or to this address.
    #[arg(long)]
    pub capture_ip: Option<std::net::IpAddr>,
    /// Record only TCP/UDP packets from or to this port.
    #[arg(long)]
    pub capture_port: Option<u16>,
}

struct Running {
    tee: Option<Tee>,
    metrics: Arc<Metrics>,
    device: String,
}

/// Where the capture's companion files go: next to a capture file, inside a
/// spool directory.
fn companion(capture: &std::path::Path, spool: bool, name: &str) -> PathBuf {
    if spool {
        capture.join(name)
    } else {
        let mut p = capture.as_os_str().to_owned();
        p.push(".");
        p.push(name);
        PathBuf::from(p)
    }
}

type Recording = Option<(Tee, Arc<dyn SeqSource>)>;

fn start_tee(c: &CommonArgs, metrics: &Arc<Metrics>) -> Result<Recording, AppError> {
    vmr_proto::InstanceId::new(c.instance_id.clone()).map_err(|e| AppError::Arg(e.to_string()))?;
    let Some(path) = &c.capture else {
        return Ok(None);
    };
    let spool = c.capture_retain_mib.is_some();
    if spool {
        std::fs::create_dir_all(path).map_err(|source| crate::capture::CaptureError::Open {
            path: path.display().to_string(),
            source,
        })?;
    }
    let seq_path = c
        .seq_file
        .clone()
        .unwrap_or_else(|| companion(path, spool, "seq"));
    let seq = Arc::new(FileSeq::open_with_lease(&seq_path, c.seq_lease)?);
    let epoch = seq.epoch();
    tracing::info!(seq_file = %seq_path.display(), epoch, next = seq.peek(), "sequence counter open");
    let sink: Arc<dyn CaptureSink> = match c.capture_retain_mib {
        Some(retain) => Arc::new(SpoolSink::open(SpoolConfig {
            dir: path.clone(),
            segment_bytes: c.capture_segment_mib.saturating_mul(1 << 20),
            capacity_bytes: retain.saturating_mul(1 << 20),
            recycle: c.capture_recycle,
            instance_id: c.instance_id.clone(),
            epoch,
        })?),
        None => Arc::new(FileSink::open(path, &c.instance_id, epoch)?),
    };
    let mut cfg = TeeConfig::new(c.instance_id.clone());
    cfg.capacity = c.capture_queue;
    cfg.max_bytes = c.capture_queue_mib.saturating_mul(1 << 20);
    cfg.policy = c.capture_policy;
    cfg.block_bound =
        (c.capture_block_max_ms > 0).then(|| Duration::from_millis(c.capture_block_max_ms));
    cfg.state = Some(companion(path, spool, "state"));
    let seq: Arc<dyn SeqSource> = seq;
    let tee = Tee::start(cfg, sink, seq.clone(), metrics.clone())?;
    Ok(Some((tee, seq)))
}

/// Blocks SIGUSR1, SIGTERM and SIGINT in this thread (and threads it
/// spawns later), so [`wait_signals`] can take them synchronously.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on the
    // calling thread; all arguments are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Serves until SIGTERM/SIGINT (or the first disconnect with
/// `--exit-on-disconnect`), logging metrics on SIGUSR1 and every interval.
fn serve<B: Serve>(
    name: &str,
    backend: B,
    c: &CommonArgs,
    run: Running,
    set: libc::sigset_t,
) -> Result<(), AppError> {
    let server = Server::spawn(name, backend, &c.socket, c.exit_on_disconnect)?;
    tracing::info!(socket = %c.socket.display(), device = %run.device, mode = ?c.mode, "listening");
    let interval = (c.metrics_interval > 0).then(|| Duration::from_secs(c.metrics_interval));
    let mut last = std::time::Instant::now();
    loop {
        if server.is_finished() {
            break;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: sigtimedwait on a valid set with a null info pointer and a
        // valid timeout.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig == libc::SIGUSR1 {
            run.metrics.snapshot().log(&run.device);
        } else if sig == libc::SIGTERM || sig == libc::SIGINT {
            tracing::info!(signal = sig, "stopping");
            break;
        }
        if let Some(iv) = interval {
            if last.elapsed() >= iv {
                run.metrics.snapshot().log(&run.device);
                last = std::time::Instant::now();
            }
        }
    }
    let result = server.stop();
    if let Some(tee) = &run.tee {
        tee.shutdown();
    }
    run.metrics.snapshot().log(&run.device);
    result.map_err(Into::into)
}

/// Runs `vhost-tap-blk`.
pub fn run_blk(a: BlkArgs) -> Result<(), AppError> {
    let set = block_signals();
    let c = &a.common;
    crate::blk::backend::check_mode(c.mode, a.overlay.is_some())?;
    let device = c.device.clone().unwrap_or_else(|| "vda".into());
    let metrics = Arc::new(Metrics::default());
    let disk = Disk::open_chain(&a.image, &a.layers, a.overlay.as_deref(), a.read_only)?;
    let (frozen, top) = disk.layer_paths();
    if top.is_some() || !frozen.is_empty() {
        tracing::info!(layers = frozen.len(), top = ?top, "disk layer chain open");
    }
    let mut cfg = BlockConfig::new(device.clone());
    cfg.num_queues = a.num_queues;
    cfg.queue_size = c.queue_size;
    cfg.mode = c.mode;
    if let Some(s) = &a.serial {
        cfg.serial = s.clone();
    }
    if let Some(ops) = &a.capture_ops {
        cfg.filter = BlockFilter::parse(ops).map_err(|e| AppError::Arg(e.to_string()))?;
    }
    let replay = c.mode == Mode::Replay;
    let faults = replay.then(|| Arc::new(RuleFaults::new()));
    let outputs = replay.then(|| Arc::new(Outputs::new()));
    let expect = replay.then(|| Arc::new(Expectations::new(EXPECT_LIMIT)));
    let clock = replay.then(|| Arc::new(ReplayClock::new()));
    cfg.outputs = outputs.clone();
    cfg.expect = expect.clone();
    cfg.clock = clock.clone();
    let (tee, seq) = start_tee(c, &metrics)?.unzip();
    let backend = BlockBackend::new(
        cfg,
        disk,
        tee.clone(),
        faults.clone().map(|f| f as Arc<dyn FaultHook>),
        metrics.clone(),
    )?;
    let _control = match &c.control {
        Some(p) => Some(ControlServer::spawn(
            p,
            ControlTargets {
                metrics: metrics.clone(),
                faults,
                source: None,
                checkpoint: Some(Arc::new(crate::checkpoint::BlockCheckpoint {
                    backend: backend.clone(),
                    seq,
                })),
                clock,
                outputs,
                expect,
                limits: ControlLimits::default(),
            },
        )?),
        None => None,
    };
    serve(
        "vhost-tap-blk",
        backend,
        c,
        Running {
            tee,
            metrics,
            device,
        },
        set,
    )
}

/// Runs `vhost-tap-net`.
pub fn run_net(a: NetArgs) -> Result<(), AppError> {
    let set = block_signals();
    let c = &a.common;
    let device = c.device.clone().unwrap_or_else(|| "net0".into());
    let metrics = Arc::new(Metrics::default());
    let mut cfg = NetConfig::new(device.clone());
    cfg.mac = parse_mac(&a.mac).map_err(|e| AppError::Arg(e.to_string()))?;
    cfg.mtu = a.mtu;
    cfg.queue_size = c.queue_size;
    cfg.mode = c.mode;
    cfg.filter = NetFilter {
        direction: parse_directions(&a.capture_directions)
            .map_err(|e| AppError::Arg(e.to_string()))?,
        mac: a
            .capture_mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| AppError::Arg(e.to_string()))?,
        ip: a.capture_ip,
        port: a.capture_port,
    };
    let replay = c.mode == Mode::Replay;
    if a.forward && !replay {
        return Err(AppError::Arg(
            "--forward only applies to --mode replay".into(),
        ));
    }
    let tap = if !replay || a.forward {
        let t = Tap::open(&a.tap, a.netns.as_deref())?;
        tracing::info!(tap = t.name(), netns = ?a.netns, "tap open");
        Some(t)
    } else {
        None
    };
    let faults = replay.then(|| Arc::new(RuleFaults::new()));
    let outputs = replay.then(|| Arc::new(Outputs::new()));
    cfg.outputs = outputs.clone();
    let source = if replay {
        let mut sc = SourceConfig::new(device.clone());
        sc.faults = faults.clone().map(|f| f as Arc<dyn FaultHook>);
        sc.outputs = outputs.clone();
        sc.metrics = metrics.clone();
        Some(Arc::new(ChannelReplaySource::with_config(sc)?))
    } else {
        None
    };
    let clock = source.as_ref().map(|s| s.clock().clone());
    let (tee, seq) = start_tee(c, &metrics)?.unzip();
    let backend = NetBackend::new(
        cfg,
        tap,
        source.clone().map(|s| s as Arc<dyn ReplaySource>),
        tee.clone(),
        faults.clone().map(|f| f as Arc<dyn FaultHook>),
        metrics.clone(),
    )?;
    let _control = match &c.control {
        Some(p) => Some(ControlServer::spawn(
            p,
            ControlTargets {
                metrics: metrics.clone(),
                faults,
                source,
                checkpoint: Some(Arc::new(crate::checkpoint::NetCheckpoint {
                    backend: backend.clone(),
                    seq,
                })),
                clock,
                outputs,
                expect: None,
                limits: ControlLimits::default(),
            },
        )?),
        None => None,
    };
    serve(
        "vhost-tap-net",
        backend,
        c,
        Running {
            tee,
            metrics,
            device,
        },
        set,
    )
}

/// Sets up `tracing` for the binaries (stderr, `RUST_LOG`, default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
