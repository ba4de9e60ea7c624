//! Supervision of an instance's device backends.
//!
//! Each device's vhost-tap backend (`vhost-tap-blk`, `vhost-tap-net`) runs as
//! its own process, so an agent crash never takes a guest's disk or NIC
//! away. The [`Supervisor`] starts one backend per device, recording into a
//! rolling spool at `<data>/<instance>/<device>/` and numbering from the
//! instance's shared sequence file `<data>/<instance>/seq`; it waits (bounded)
//! for each backend's socket, restarts a backend that exits with a doubling
//! backoff, and stops the backends when asked (after the guest).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmr_hypervisor::process::Pidfd;
use vmr_proto::InstanceId;

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A directory or log file could not be created.
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A backend binary could not be started.
    #[error("cannot start {binary} for device {device}")]
    Spawn {
        device: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A backend exited or did not listen in time.
    #[error("backend of device {device} did not listen on {socket} within {timeout:?}: {reason}")]
    NotListening {
        device: String,
        socket: PathBuf,
        timeout: Duration,
        reason: String,
    },
    /// The sequence file is on tmpfs, which does not survive a host restart.
    #[error(
        "the sequence file {0} is on tmpfs; put the data directory on a persistent filesystem"
    )]
    SeqOnTmpfs(PathBuf),
    /// Two devices share a name.
    #[error("device {0} is given twice")]
    DuplicateDevice(String),
    /// A device name that cannot be a directory name.
    #[error("device name {0:?} is not a plain name")]
    BadDeviceName(String),
    /// No device of that name.
    #[error("no device {0:?}")]
    UnknownDevice(String),
    /// A filter of the other kind (a net filter for a disk, ...).
    #[error("device {device} is a {kind} device; give a {kind} filter")]
    FilterKind { device: String, kind: &'static str },
    /// The backend's control socket failed or refused the command.
    #[error("backend of device {device}: {reason}")]
    Control { device: String, reason: String },
}

/// What a device records; `None` fields do not restrict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureFilter {
    /// Block operations recorded (empty: every operation).
    Block {
        /// The operations.
        ops: Vec<vmr_proto::pb::BlockOp>,
    },
    /// Frames recorded.
    Net {
        /// One direction only (`None`: both).
        direction: Option<vmr_proto::pb::Direction>,
        /// Only frames from or to this MAC.
        mac: Option<[u8; 6]>,
        /// Only IP packets from or to this address.
        ip: Option<std::net::IpAddr>,
        /// Only TCP/UDP packets from or to this port.
        port: Option<u16>,
    },
}

fn op_name(op: vmr_proto::pb::BlockOp) -> &'static str {
    use vmr_proto::pb::BlockOp as O;
    match op {
        O::Read => "read",
        O::Write => "write",
        O::Flush => "flush",
        O::Discard => "discard",
        O::WriteZeroes => "write-zeroes",
        O::GetId => "get-id",
        O::Unspecified => "",
    }
}

const ALL_OPS: &str = "read,write,flush,discard,write-zeroes,get-id";

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CaptureFilter {
    /// `block` or `net`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block { .. } => "block",
            Self::Net { .. } => "net",
        }
    }

    fn ops_list(ops: &[vmr_proto::pb::BlockOp]) -> String {
        let names: Vec<&str> = ops
            .iter()
            .map(|&o| op_name(o))
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            ALL_OPS.to_string()
        } else {
            names.join(",")
        }
    }

    fn directions(d: Option<vmr_proto::pb::Direction>) -> &'static str {
        match d {
            Some(vmr_proto::pb::Direction::Rx) => "rx",
            Some(vmr_proto::pb::Direction::Tx) => "tx",
            _ => "rx,tx",
        }
    }

    /// The backend flags that set this filter at start.
    pub fn args(&self) -> Vec<String> {
        match self {
            Self::Block { ops } => vec!["--capture-ops".into(), Self::ops_list(ops)],
            Self::Net {
                direction,
                mac,
                ip,
                port,
            } => {
                let mut a = vec![
                    "--capture-directions".to_string(),
                    Self::directions(*direction).to_string(),
                ];
                if let Some(m) = mac {
                    a.extend(["--capture-mac".into(), mac_text(m)]);
                }
                if let Some(ip) = ip {
                    a.extend(["--capture-ip".into(), ip.to_string()]);
                }
                if let Some(p) = port {
                    a.extend(["--capture-port".into(), p.to_string()]);
                }
                a
            }
        }
    }

    /// The control-socket form (`set-filter`).
    pub fn runtime(&self) -> vhost_tap::filter::RuntimeFilter {
        match self {
            Self::Block { ops } => vhost_tap::filter::RuntimeFilter::Block {
                ops: Self::ops_list(ops),
            },
            Self::Net {
                direction,
                mac,
                ip,
                port,
            } => vhost_tap::filter::RuntimeFilter::Net {
                directions: Some(Self::directions(*direction).to_string()),
                mac: mac.as_ref().map(mac_text),
                ip: ip.map(|i| i.to_string()),
                port: *port,
            },
        }
    }
}

/// What a backend serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// A disk (`vhost-tap-blk --image`).
    Blk {
        /// The disk file.
        image: PathBuf,
    },
    /// A NIC (`vhost-tap-net --tap`, optionally `--netns`).
    Net {
        /// TAP interface name.
        tap: String,
        /// Network namespace (`/var/run/netns/<name>`).
        netns: Option<String>,
    },
}

/// One device's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Device name (`vda`, `net0`); also the spool directory's name.
    pub device: String,
    /// What it serves.
    pub kind: BackendKind,
    /// Extra arguments passed to the backend as they are.
    pub extra_args: Vec<String>,
    /// What it records (`None`: everything).
    pub filter: Option<CaptureFilter>,
}

impl BackendKind {
    /// `block` or `net`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Blk { .. } => "block",
            Self::Net { .. } => "net",
        }
    }
}

/// Settings of a [`Supervisor`].
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Directory holding `vhost-tap-blk` and `vhost-tap-net`; without it,
    /// the directory of the running executable, then `$PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Spool size bound (`--capture-retain-mib`).
    pub retain_mib: u64,
    /// Spool segment size (`--capture-segment-mib`).
    pub segment_mib: u64,
    /// How long a backend may take to create its socket.
    pub listen_timeout: Duration,
    /// First restart delay; it doubles per quick exit up to `restart_max`.
    pub restart_initial: Duration,
    /// Longest restart delay.
    pub restart_max: Duration,
    /// A backend that ran at least this long restarts after `restart_initial` again.
    pub restart_reset_after: Duration,
    /// How long a backend has after SIGTERM before SIGKILL at shutdown.
    pub stop_grace: Duration,
    /// Refuse a sequence file on tmpfs.
    pub refuse_tmpfs_seq: bool,
    /// What a device does when its spool is full (`--capture-policy`).
    pub spool_full: crate::config::SpoolFull,
    /// Under `block`, the longest a guest request waits for a full spool
    /// (`--capture-block-max-ms`; `None`: as long as it takes).
    pub block_bound: Option<Duration>,
    /// How long a control-socket command may take.
    pub control_timeout: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            bin_dir: None,
            retain_mib: 256,
            segment_mib: 16,
            listen_timeout: Duration::from_secs(15),
            restart_initial: Duration::from_millis(200),
            restart_max: Duration::from_secs(10),
            restart_reset_after: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            refuse_tmpfs_seq: true,
            spool_full: crate::config::SpoolFull::Block,
            block_bound: Some(Duration::from_secs(5)),
            control_timeout: Duration::from_secs(5),
        }
    }
}

/// The on-disk layout of one instance under the data directory.
#[derive(Debug, Clone)]
pub struct InstanceDirs {
    /// `<data>/<instance>`.
    pub root: PathBuf,
}

impl InstanceDirs {
    /// The layout of `instance` under `data`.
    pub fn new(data: &Path, instance: &InstanceId) -> Self {
        Self {
            root: data.join(instance.to_string()),
        }
    }
    /// The shared sequence file.
    pub fn seq_file(&self) -> PathBuf {
        self.root.join("seq")
    }
    /// A device's spool directory.
    pub fn spool(&self, device: &str) -> PathBuf {
        self.root.join(device)
    }
    /// A device's vhost-user socket.
    pub fn socket(&self, device: &str) -> PathBuf {
        self.root.join(format!("{device}.sock"))
    }
    /// A device's backend log (appended to across restarts).
    pub fn log(&self, device: &str) -> PathBuf {
        self.root.join(format!("{device}.backend.log"))
    }
    /// A device's backend control socket.
    pub fn control(&self, device: &str) -> PathBuf {
        self.root.join(format!("{device}.ctl"))
    }
    /// The agent's event-log spool.
    pub fn agent_spool(&self) -> PathBuf {
        self.root.join("agent")
    }
}

/// A device's backend state, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// Device name.
    pub device: String,
    /// Process id of the running backend, if one runs.
    pub pid: Option<u32>,
    /// How often it was restarted.
    pub restarts: u64,
    /// The last exit status seen, if any.
    pub last_exit: Option<String>,
}

/// A running backend: started by this supervisor, or by an earlier agent
/// process and adopted ([`Supervisor::adopt`]); an adopted one is no child
/// of this process, so it is watched and signalled through a pidfd.
enum Proc {
    Owned(Child),
    Adopted(Pidfd),
}

impl Proc {
    fn id(&self) -> u32 {
        match self {
            Proc::Owned(c) => c.id(),
            Proc::Adopted(p) => p.pid(),
        }
    }
}

struct Slot {
    spec: BackendSpec,
    child: Option<Proc>,
    started: Instant,
    restarts: u64,
    delay: Duration,
    restart_at: Option<Instant>,
    last_exit: Option<String>,
}

struct Shared {
    instance: InstanceId,
    dirs: InstanceDirs,
    cfg: SupervisorConfig,
    slots: Mutex<Vec<Slot>>,
    stopping: AtomicBool,
    on_restart: Mutex<Option<RestartHook>>,
}

/// Called with every backend's state after the supervisor restarted one
/// (outside its lock).
pub type RestartHook = Arc<dyn Fn(&[BackendStatus]) + Send + Sync>;

fn status_of(s: &Slot) -> BackendStatus {
    BackendStatus {
        device: s.spec.device.clone(),
        pid: s.child.as_ref().map(Proc::id),
        restarts: s.restarts,
        last_exit: s.last_exit.clone(),
    }
}

/// A device's backend as an earlier agent process recorded it, for
/// [`Supervisor::adopt`].
#[derive(Debug, Clone)]
pub struct RecordedBackend {
    /// The device's backend.
    pub spec: BackendSpec,
    /// Its process (pid, start time), if one was recorded.
    pub process: Option<(u32, u64)>,
    /// How often it was restarted before.
    pub restarts: u64,
}

/// Runs and restarts an instance's device backends.
pub struct Supervisor {
    shared: Arc<Shared>,
    monitor: Option<JoinHandle<()>>,
}

fn binary(cfg: &SupervisorConfig, name: &str) -> PathBuf {
    if let Some(d) = &cfg.bin_dir {
        return d.join(name);
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
    {
        return p;
    }
    PathBuf::from(name)
}

/// What a backend's log says of its last error: the final `Error:` report
/// with its causes (without a backtrace), else the last line logged at
/// ERROR; shortened.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let found = match text.rfind("Error: ") {
        Some(at) => {
            let rest = &text[at..];
            let end = rest.find("Stack backtrace").unwrap_or(rest.len());
            rest[..end].split_whitespace().collect::<Vec<_>>().join(" ")
        }
        None => text
            .lines()
            .rev()
            .find(|l| l.contains("ERROR"))?
            .trim()
            .to_string(),
    };
    Some(if found.len() > 400 {
        let mut end = 400;
        while !found.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &found[..end])
    } else {
        found
    })
}

fn valid_device(name: &str) -> bool {
    !name.is_empty()
        && name != "agent"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Shared {
    fn command(&self, spec: &BackendSpec) -> Result<Command, SupervisorError> {
        let name = match spec.kind {
            BackendKind::Blk { .. } => "vhost-tap-blk",
            BackendKind::Net { .. } => "vhost-tap-net",
        };
        let log_path = self.dirs.log(&spec.device);
        let prep = |source| SupervisorError::Prepare {
            path: log_path.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(prep)?;
        let log2 = log.try_clone().map_err(prep)?;
        let mut cmd = Command::new(binary(&self.cfg, name));
        cmd.arg("--socket")
            .arg(self.dirs.socket(&spec.device))
            .arg("--instance-id")
            .arg(self.instance.to_string())
            .arg("--device")
            .arg(&spec.device)
            .arg("--capture")
            .arg(self.dirs.spool(&spec.device))
            .arg("--capture-retain-mib")
            .arg(self.cfg.retain_mib.to_string())
            .arg("--capture-segment-mib")
            .arg(self.cfg.segment_mib.to_string())
            .arg("--capture-recycle")
            .arg("committed")
            .arg("--seq-file")
            .arg(self.dirs.seq_file())
            .arg("--control")
            .arg(self.dirs.control(&spec.device))
            .arg("--capture-policy")
            .arg(self.cfg.spool_full.as_arg())
            .arg("--capture-block-max-ms")
            .arg(
                self.cfg
                    .block_bound
                    .map_or(0, |b| b.as_millis().max(1) as u64)
                    .to_string(),
            );
        match &spec.kind {
            BackendKind::Blk { image } => {
                cmd.arg("--image").arg(image);
            }
            BackendKind::Net { tap, netns } => {
                cmd.arg("--tap").arg(tap);
                if let Some(ns) = netns {
                    cmd.arg("--netns").arg(ns);
                }
            }
        }
        if let Some(f) = &spec.filter {
            cmd.args(f.args());
        }
        // Its own process group, so a signal to the agent's group (a
        // terminal's Ctrl-C) does not reach it: the agent stops it in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(&spec.extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        Ok(cmd)
    }

    /// Starts `spec`'s backend; returns the child once its socket exists.
    fn spawn(&self, spec: &BackendSpec) -> Result<Child, SupervisorError> {
        let socket = self.dirs.socket(&spec.device);
        let _ = std::fs::remove_file(&socket);
        let mut cmd = self.command(spec)?;
        let mut child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
            device: spec.device.clone(),
            binary: PathBuf::from(cmd.get_program()),
            source,
        })?;
        let timeout = self.cfg.listen_timeout;
        let start = Instant::now();
        loop {
            if socket.exists() {
                tracing::info!(instance = %self.instance, device = %spec.device, pid = child.id(), "backend listening");
                return Ok(child);
            }
            let reason = match child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "exited ({status}){}; see {}",
                    last_error_line(&self.dirs.log(&spec.device))
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default(),
                    self.dirs.log(&spec.device).display()
                )),
                Ok(None) if start.elapsed() > timeout => Some("timed out".to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            };
            if let Some(reason) = reason {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::NotListening {
                    device: spec.device.clone(),
                    socket,
                    timeout,
                    reason,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One pass of the monitor: reap exits, restart what is due.
    fn tick(&self) {
        let mut restarted = false;
        let mut slots = self
            .slots
            .lock()
            .expect("supervisor lock is never poisoned");
        for slot in slots.iter_mut() {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let polled = match slot.child.as_mut() {
                Some(Proc::Owned(child)) => {
                    Some(child.try_wait().map(|s| s.map(|s| s.to_string())))
                }
                Some(Proc::Adopted(p)) => Some(Ok(p.exited().then(|| {
                    "exited (status unknown: started by an earlier agent process)".to_string()
                }))),
                None => None,
            };
            if let Some(polled) = polled {
                match polled {
                    Ok(Some(status)) => {
                        let ran = slot.started.elapsed();
                        if ran >= self.cfg.restart_reset_after {
                            slot.delay = self.cfg.restart_initial;
                        }
                        tracing::warn!(instance = %self.instance, device = %slot.spec.device, %status, ran_ms = ran.as_millis() as u64, delay_ms = slot.delay.as_millis() as u64, "backend exited; restarting");
                        slot.last_exit = Some(status);
                        slot.child = None;
                        slot.restart_at = Some(Instant::now() + slot.delay);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(instance = %self.instance, device = %slot.spec.device, error = %e, "cannot poll the backend")
                    }
                }
            }
            if slot.child.is_none() && slot.restart_at.is_some_and(|t| Instant::now() >= t) {
                match self.spawn(&slot.spec) {
                    Ok(child) => {
                        slot.child = Some(Proc::Owned(child));
                        slot.started = Instant::now();
                        slot.restarts += 1;
                        slot.restart_at = None;
                        restarted = true;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %self.instance, device = %slot.spec.device, error = %crate::shipper::display_chain(&e), "backend restart failed");
                        slot.restart_at = Some(Instant::now() + slot.delay);
                    }
                }
                slot.delay = (slot.delay * 2).min(self.cfg.restart_max);
            }
        }
        let status: Vec<BackendStatus> = if restarted {
            slots.iter().map(status_of).collect()
        } else {
            Vec::new()
        };
        drop(slots);
        if restarted {
            let hook = self
                .on_restart
                .lock()
                .expect("supervisor lock is never poisoned")
                .clone();
            if let Some(h) = hook {
                h(&status);
            }
        }
    }
}

impl Supervisor {
    /// Starts one backend per device of `instance` under `data` and waits
    /// until each listens. A failure stops the ones already started.
    pub fn start(
        instance: InstanceId,
        data: &Path,
        devices: Vec<BackendSpec>,
        cfg: SupervisorConfig,
    ) -> Result<Self, SupervisorError> {
        let dirs = InstanceDirs::new(data, &instance);
        let mut seen = std::collections::BTreeSet::new();
        for d in &devices {
            if !valid_device(&d.device) {
                return Err(SupervisorError::BadDeviceName(d.device.clone()));
            }
            if !seen.insert(d.device.clone()) {
                return Err(SupervisorError::DuplicateDevice(d.device.clone()));
            }
        }
        std::fs::create_dir_all(&dirs.root).map_err(|source| SupervisorError::Prepare {
            path: dirs.root.clone(),
            source,
        })?;
        if cfg.refuse_tmpfs_seq && vhost_tap::seq::on_tmpfs(&dirs.root) {
            return Err(SupervisorError::SeqOnTmpfs(dirs.seq_file()));
        }
        let shared = Arc::new(Shared {
            instance,
            dirs,
            cfg,
            slots: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            on_restart: Mutex::new(None),
        });
        let mut sup = Supervisor {
            shared: shared.clone(),
            monitor: None,
        };
        for spec in devices {
            // `sup` stops what was started if this fails.
            let child = shared.spawn(&spec)?;
            shared
                .slots
                .lock()
                .expect("supervisor lock is never poisoned")
                .push(Slot {
                    spec,
                    child: Some(Proc::Owned(child)),
                    started: Instant::now(),
                    restarts: 0,
                    delay: shared.cfg.restart_initial,
                    restart_at: None,
                    last_exit: None,
                });
        }
        sup.spawn_monitor()?;
        Ok(sup)
    }

    /// Takes over the backends an earlier agent process started for
    /// `instance`: each device's recorded backend (pid and start time, see
    /// [`vmr_hypervisor::process`]) that still runs is adopted and
    /// supervised as if started here; a device whose backend is gone (or
    /// whose pid is another process now, which is never signalled) gets a
    /// new backend at once when `restart_missing`, else stays down. Each
    /// device comes with its recorded process (pid, start time) and how
    /// often it was restarted before, which the count continues from.
    pub fn adopt(
        instance: InstanceId,
        data: &Path,
        devices: Vec<RecordedBackend>,
        cfg: SupervisorConfig,
        restart_missing: bool,
    ) -> Result<Self, SupervisorError> {
        let dirs = InstanceDirs::new(data, &instance);
        let shared = Arc::new(Shared {
            instance,
            dirs,
            cfg,
            slots: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            on_restart: Mutex::new(None),
        });
        let mut sup = Supervisor {
            shared: shared.clone(),
            monitor: None,
        };
        for RecordedBackend {
            spec,
            process: recorded,
            restarts,
        } in devices
        {
            let (child, last_exit) = match recorded.map(|(pid, st)| Pidfd::adopt(pid, st)) {
                Some(Ok(p)) => {
                    tracing::info!(instance = %shared.instance, device = %spec.device, pid = p.pid(), "backend adopted");
                    (Some(Proc::Adopted(p)), None)
                }
                Some(Err(e)) => {
                    tracing::warn!(instance = %shared.instance, device = %spec.device, error = %e, "the recorded backend is not running");
                    (
                        None,
                        Some(format!("not running when the agent restarted: {e}")),
                    )
                }
                None => (None, Some("no backend was recorded".to_string())),
            };
            let missing = child.is_none();
            shared
                .slots
                .lock()
                .expect("supervisor lock is never poisoned")
                .push(Slot {
                    spec,
                    child,
                    started: Instant::now(),
                    restarts,
                    delay: shared.cfg.restart_initial,
                    restart_at: (missing && restart_missing).then(Instant::now),
                    last_exit,
                });
        }
        sup.spawn_monitor()?;
        Ok(sup)
    }

    /// Calls `hook` after each restart of a backend.
    pub fn on_restart(&self, hook: RestartHook) {
        *self
            .shared
            .on_restart
            .lock()
            .expect("supervisor lock is never poisoned") = Some(hook);
    }

    fn spawn_monitor(&mut self) -> Result<(), SupervisorError> {
        let shared = self.shared.clone();
        let s = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("backend-supervisor".into())
            .spawn(move || {
                while !s.stopping.load(Ordering::Acquire) {
                    s.tick();
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .map_err(|source| SupervisorError::Prepare {
                path: shared.dirs.root.clone(),
                source,
            })?;
        self.monitor = Some(monitor);
        Ok(())
    }

    /// The instance's directories.
    pub fn dirs(&self) -> &InstanceDirs {
        &self.shared.dirs
    }

    /// The vhost-user socket of each device.
    pub fn sockets(&self) -> BTreeMap<String, PathBuf> {
        self.status()
            .into_iter()
            .map(|s| {
                let p = self.shared.dirs.socket(&s.device);
                (s.device, p)
            })
            .collect()
    }

    /// Each backend's state.
    pub fn status(&self) -> Vec<BackendStatus> {
        self.shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned")
            .iter()
            .map(status_of)
            .collect()
    }

    /// Each device's name and kind.
    pub fn devices(&self) -> Vec<(String, BackendKind)> {
        self.shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned")
            .iter()
            .map(|s| (s.spec.device.clone(), s.spec.kind.clone()))
            .collect()
    }

    /// The filter a device records with now (`None`: everything).
    pub fn filter(&self, device: &str) -> Result<Option<CaptureFilter>, SupervisorError> {
        self.shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned")
            .iter()
            .find(|s| s.spec.device == device)
            .map(|s| s.spec.filter.clone())
            .ok_or_else(|| SupervisorError::UnknownDevice(device.to_string()))
    }

    /// Sends one control command to a device's backend and returns its
    /// reply (an `{"ok":false}` reply is an error).
    pub fn control(
        &self,
        device: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, SupervisorError> {
        use std::io::{BufRead, BufReader, Write};
        let err = |reason: String| SupervisorError::Control {
            device: device.to_string(),
            reason,
        };
        if !self
            .shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned")
            .iter()
            .any(|s| s.spec.device == device)
        {
            return Err(SupervisorError::UnknownDevice(device.to_string()));
        }
        let path = self.shared.dirs.control(device);
        let stream = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| err(format!("cannot connect to {}: {e}", path.display())))?;
        let t = Some(self.shared.cfg.control_timeout);
        stream
            .set_read_timeout(t)
            .and_then(|()| stream.set_write_timeout(t))
            .map_err(|e| err(e.to_string()))?;
        (&stream)
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| err(format!("send: {e}")))?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| err(format!("no reply: {e}")))?;
        let reply: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| err(format!("bad reply: {e}")))?;
        if reply["ok"] != serde_json::Value::Bool(true) {
            return Err(err(reply["error"]
                .as_str()
                .unwrap_or("refused")
                .to_string()));
        }
        Ok(reply)
    }

    /// The backend's counters (vhost-tap `metrics`), as JSON.
    pub fn backend_metrics(&self, device: &str) -> Result<serde_json::Value, SupervisorError> {
        let r = self.control(device, &serde_json::json!({"cmd": "metrics"}))?;
        Ok(r["metrics"].clone())
    }

    /// Changes what `device` records, in the running backend (through its
    /// control socket) and for every later restart of it.
    pub fn set_filter(&self, device: &str, filter: CaptureFilter) -> Result<(), SupervisorError> {
        let kind = {
            let slots = self
                .shared
                .slots
                .lock()
                .expect("supervisor lock is never poisoned");
            let slot = slots
                .iter()
                .find(|s| s.spec.device == device)
                .ok_or_else(|| SupervisorError::UnknownDevice(device.to_string()))?;
            slot.spec.kind.name()
        };
        if kind != filter.kind() {
            return Err(SupervisorError::FilterKind {
                device: device.to_string(),
                kind,
            });
        }
        let cmd = serde_json::json!({"cmd": "set-filter", "filter": filter.runtime()});
        self.control(device, &cmd)?;
        if let Some(slot) = self
            .shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned")
            .iter_mut()
            .find(|s| s.spec.device == device)
        {
            slot.spec.filter = Some(filter);
        }
        tracing::info!(instance = %self.shared.instance, device, "capture filter changed");
        Ok(())
    }

    /// Stops every backend: SIGTERM, then SIGKILL after the grace period.
    /// Call it after the guest stopped.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let mut slots = self
            .shared
            .slots
            .lock()
            .expect("supervisor lock is never poisoned");
        for slot in slots.iter_mut() {
            match slot.child.as_mut() {
                Some(Proc::Owned(child)) => {
                    // SAFETY: kill(2) on our own child's pid; it has not been
                    // reaped yet, so the pid cannot have been reused.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                }
                Some(Proc::Adopted(p)) => {
                    if let Err(e) = p.signal(libc::SIGTERM) {
                        tracing::warn!(device = %slot.spec.device, error = %e, "cannot signal the backend");
                    }
                }
                None => {}
            }
        }
        let deadline = Instant::now() + self.shared.cfg.stop_grace;
        for slot in slots.iter_mut() {
            if let Some(Proc::Adopted(p)) = slot.child.as_ref() {
                if !p.wait(deadline.saturating_duration_since(Instant::now())) {
                    tracing::warn!(device = %slot.spec.device, "backend ignored SIGTERM; killing it");
                    let _ = p.signal(libc::SIGKILL);
                    p.wait(Duration::from_secs(5));
                }
                slot.child = None;
            }
            if let Some(Proc::Owned(mut child)) = slot.child.take() {
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            tracing::warn!(device = %slot.spec.device, "backend ignored SIGTERM; killing it");
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
            let _ = std::fs::remove_file(self.shared.dirs.socket(&slot.spec.device));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(device: &str) -> BackendSpec {
        BackendSpec {
            device: device.into(),
            kind: BackendKind::Blk {
                image: PathBuf::from("disk.img"),
            },
            extra_args: Vec::new(),
            filter: None,
        }
    }

    fn err(devices: Vec<BackendSpec>, cfg: SupervisorConfig) -> String {
        let dir = tempfile::tempdir().unwrap();
        match Supervisor::start("vm-1".parse().unwrap(), dir.path(), devices, cfg) {
            Ok(_) => panic!("expected an error"),
            Err(e) => crate::shipper::display_chain(&e),
        }
    }

    #[test]
    fn refuses_bad_and_duplicate_device_names() {
        let cfg = SupervisorConfig::default();
        assert!(err(vec![blk("../x")], cfg.clone()).contains("not a plain name"));
        assert!(err(vec![blk("agent")], cfg.clone()).contains("not a plain name"));
        assert!(err(vec![blk("vda"), blk("vda")], cfg).contains("given twice"));
    }

    #[test]
    fn filters_become_backend_flags() {
        use vmr_proto::pb::{BlockOp, Direction};
        let b = CaptureFilter::Block {
            ops: vec![BlockOp::Write, BlockOp::Flush],
        };
        assert_eq!(b.args(), ["--capture-ops", "write,flush"]);
        let all = CaptureFilter::Block { ops: vec![] };
        assert_eq!(all.args()[1], ALL_OPS);
        let n = CaptureFilter::Net {
            direction: Some(Direction::Rx),
            mac: Some([2, 0, 0, 0, 0, 0xab]),
            ip: Some("10.0.0.1".parse().unwrap()),
            port: Some(80),
        };
        assert_eq!(
            n.args(),
            [
                "--capture-directions",
                "rx",
                "--capture-mac",
                "02:00:00:00:00:ab",
                "--capture-ip",
                "10.0.0.1",
                "--capture-port",
                "80"
            ]
        );
        let rt =
            serde_json::to_value(serde_json::json!({"f": format!("{:?}", n.runtime())})).unwrap();
        assert!(rt["f"].as_str().unwrap().contains("02:00:00:00:00:ab"));
        // The runtime form is what the backend parses.
        vhost_tap::filter::RuntimeFilters::new()
            .set(&n.runtime())
            .unwrap();
        vhost_tap::filter::RuntimeFilters::new()
            .set(&b.runtime())
            .unwrap();
    }

    #[test]
    fn adopts_a_recorded_process_and_stops_it_but_not_a_reused_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut adopted = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let st = |pid| vmr_hypervisor::process::start_time(pid).unwrap();
        let (a, o) = (adopted.id(), other.id());
        let sup = Supervisor::adopt(
            "vm-1".parse().unwrap(),
            dir.path(),
            vec![
                RecordedBackend {
                    spec: blk("vda"),
                    process: Some((a, st(a))),
                    restarts: 2,
                },
                // The pid is right, the start time is not: another process.
                RecordedBackend {
                    spec: blk("vdb"),
                    process: Some((o, st(o) + 1)),
                    restarts: 0,
                },
            ],
            SupervisorConfig::default(),
            false,
        )
        .unwrap();
        let status = sup.status();
        assert_eq!(status[0].pid, Some(a));
        // The restart count goes on from the record's.
        assert_eq!(status[0].restarts, 2);
        assert_eq!(status[1].pid, None);
        assert!(status[1]
            .last_exit
            .as_deref()
            .unwrap()
            .contains("another process"));
        sup.stop();
        // The adopted process got SIGTERM; the other one was left alone.
        assert!(adopted.wait().unwrap().code().is_none());
        assert!(other.try_wait().unwrap().is_none());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn names_a_missing_backend_binary() {
        let bins = tempfile::tempdir().unwrap();
        let cfg = SupervisorConfig {
            bin_dir: Some(bins.path().to_path_buf()),
            ..SupervisorConfig::default()
        };
        let e = err(vec![blk("vda")], cfg);
        assert!(
            e.contains("cannot start") && e.contains("vhost-tap-blk"),
            "{e}"
        );
    }
}
