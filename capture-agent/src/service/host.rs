//! The instances of one agent process: launch from a machine image, list,
//! inspect, pause, resume, stop, capture filters and the lifecycle history
//! that `Watch` streams.
//!
//! Blocking work (launching, stopping, the driver's QMP calls, backend
//! control sockets) runs on the caller's thread: the gRPC layer calls these
//! methods through `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use vmr_hypervisor::image::{MachineImage, IMAGE_FILE};
use vmr_hypervisor::{Accel, DriverError, RunState};
use vmr_proto::{pb, InstanceId, LifecycleKind};

use crate::config::{AgentConfig, SpoolFull};
use crate::instance::{
    DeviceOptions, InstanceError, InstanceNote, LaunchOptions, RecordedInstance,
};
use crate::record::InstanceRecord;
use crate::shipper::display_chain;
use crate::supervisor::{CaptureFilter, SupervisorError};
use prost::Message as _;

/// Errors of the host, each meaning one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// `INVALID_ARGUMENT`; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    ResourceExhausted(String),
    /// `UNAVAILABLE`.
    #[error("{0}")]
    Unavailable(String),
    /// `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl HostError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code's name, as used in metrics labels.
    pub fn code_name(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::AlreadyExists(_) => "already_exists",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<HostError> for tonic::Status {
    fn from(e: HostError) -> Self {
        let msg = e.to_string();
        match e {
            HostError::NotFound(_) => tonic::Status::not_found(msg),
            HostError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            HostError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            HostError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            HostError::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            HostError::Unavailable(_) => tonic::Status::unavailable(msg),
            HostError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// Where an instance stands, as the host tracks it.
#[derive(Clone)]
enum Phase {
    Starting,
    Up(Arc<RecordedInstance>),
    Stopping(Arc<RecordedInstance>),
    /// Stopped; the instance is kept for its final counters.
    Stopped(Option<Arc<RecordedInstance>>),
    Failed,
}

/// One instance of the host.
pub struct Entry {
    id: InstanceId,
    spec: pb::InstanceSpec,
    driver: String,
    launched_ns: u64,
    phase: Mutex<Phase>,
    detail: Mutex<String>,
    /// The last guest event that decides the state (crash, shutdown).
    last_kind: Mutex<Option<LifecycleKind>>,
    history: Mutex<Vec<(u64, pb::InstanceEvent)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Entry {
    /// The instance id.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// The running (or stopped) instance, once launched.
    pub fn instance(&self) -> Option<Arc<RecordedInstance>> {
        match &*lock(&self.phase) {
            Phase::Up(i) | Phase::Stopping(i) => Some(i.clone()),
            Phase::Stopped(i) => i.clone(),
            Phase::Starting | Phase::Failed => None,
        }
    }

    /// The instance while it runs (not stopping or stopped).
    pub fn running(&self) -> Option<Arc<RecordedInstance>> {
        match &*lock(&self.phase) {
            Phase::Up(i) => Some(i.clone()),
            _ => None,
        }
    }

    /// The state now.
    pub fn state(&self) -> pb::InstanceState {
        use pb::InstanceState as S;
        let phase = lock(&self.phase).clone();
        match phase {
            Phase::Starting => S::Starting,
            Phase::Stopping(_) => S::Stopping,
            Phase::Failed => S::Failed,
            Phase::Stopped(_) => match *lock(&self.last_kind) {
                Some(
                    LifecycleKind::Crash
                    | LifecycleKind::TripleFault
                    | LifecycleKind::InternalError,
                ) => S::Crashed,
                _ => S::Stopped,
            },
            Phase::Up(i) => match i.run_state() {
                Some(RunState::Created) => S::Starting,
                Some(RunState::Running) => S::Running,
                Some(RunState::Paused) => S::Paused,
                Some(RunState::Crashed) => S::Crashed,
                Some(RunState::Exited) => match *lock(&self.last_kind) {
                    Some(
                        LifecycleKind::Crash
                        | LifecycleKind::TripleFault
                        | LifecycleKind::InternalError,
                    ) => S::Crashed,
                    _ => S::Stopped,
                },
                None => S::Stopped,
            },
        }
    }
}

/// Counters of the host itself.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// Launches that succeeded.
    pub launches: AtomicU64,
    /// Failed RPCs by method and status code.
    pub errors: Mutex<BTreeMap<(String, String), u64>>,
    /// Broker probes that failed (at start and before each launch).
    pub broker_probe_failures: AtomicU64,
    /// 1 if the last broker probe succeeded.
    pub broker_reachable: AtomicU64,
}

/// A lifecycle event with the host's running number.
pub type Numbered = (u64, pb::InstanceEvent);

/// The instances of one agent.
pub struct Host {
    cfg: AgentConfig,
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
    events: tokio::sync::broadcast::Sender<Numbered>,
    next_event: AtomicU64,
    next_id: AtomicU64,
    counters: HostCounters,
    me: Weak<Host>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn state_after(kind: Option<LifecycleKind>, detail: &str) -> pb::InstanceState {
    use pb::InstanceState as S;
    match kind {
        Some(LifecycleKind::Boot | LifecycleKind::Resume) => S::Running,
        Some(LifecycleKind::Pause) => S::Paused,
        Some(LifecycleKind::Shutdown) => S::Stopped,
        Some(LifecycleKind::Crash | LifecycleKind::TripleFault | LifecycleKind::InternalError) => {
            S::Crashed
        }
        Some(_) => S::Unspecified,
        None => match detail {
            "launched" => S::Running,
            "stopped" => S::Stopped,
            "stopping" => S::Stopping,
            "launch failed" => S::Failed,
            _ => S::Unspecified,
        },
    }
}

/// A capture filter from its wire form; `field` names it in errors.
pub fn filter_from_pb(f: &pb::CaptureFilter, field: &str) -> Result<CaptureFilter, HostError> {
    match &f.filter {
        None => Err(HostError::invalid(field, "give a block or a net filter")),
        Some(pb::capture_filter::Filter::Block(b)) => {
            let mut ops = Vec::new();
            for (i, &o) in b.ops.iter().enumerate() {
                match pb::BlockOp::try_from(o) {
                    Ok(pb::BlockOp::Unspecified) | Err(_) => {
                        return Err(HostError::invalid(
                            format!("{field}.block.ops[{i}]"),
                            format!("{o} is not a block operation"),
                        ))
                    }
                    Ok(op) => ops.push(op),
                }
            }
            Ok(CaptureFilter::Block { ops })
        }
        Some(pb::capture_filter::Filter::Net(n)) => {
            let direction = match pb::Direction::try_from(n.direction) {
                Ok(pb::Direction::Unspecified) => None,
                Ok(d) => Some(d),
                Err(_) => {
                    return Err(HostError::invalid(
                        format!("{field}.net.direction"),
                        format!("{} is not a direction", n.direction),
                    ))
                }
            };
            let mac =
                if n.mac.is_empty() {
                    None
                } else {
                    Some(vhost_tap::filter::parse_mac(&n.mac).map_err(|e| {
                        HostError::invalid(format!("{field}.net.mac"), e.to_string())
                    })?)
                };
            let ip = if n.ip.is_empty() {
                None
            } else {
                Some(n.ip.parse().map_err(|_| {
                    HostError::invalid(
                        format!("{field}.net.ip"),
                        format!("{:?} is not an IP address", n.ip),
                    )
                })?)
            };
            let port = match n.port {
                0 => None,
                p @ 1..=65535 => Some(p as u16),
                p => {
                    return Err(HostError::invalid(
                        format!("{field}.net.port"),
                        format!("{p} is not a port (1 to 65535)"),
                    ))
                }
            };
            Ok(CaptureFilter::Net {
                direction,
                mac,
                ip,
                port,
            })
        }
    }
}

/// The wire form of a capture filter.
pub fn filter_to_pb(f: &CaptureFilter) -> pb::CaptureFilter {
    let filter = match f {
        CaptureFilter::Block { ops } => pb::capture_filter::Filter::Block(pb::BlockCaptureFilter {
            ops: ops.iter().map(|&o| o as i32).collect(),
        }),
        CaptureFilter::Net {
            direction,
            mac,
            ip,
            port,
        } => pb::capture_filter::Filter::Net(pb::NetCaptureFilter {
            direction: direction.map_or(0, |d| d as i32),
            mac: mac
                .map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                })
                .unwrap_or_default(),
            ip: ip.map(|i| i.to_string()).unwrap_or_default(),
            port: port.map_or(0, u32::from),
        }),
    };
    pb::CaptureFilter {
        filter: Some(filter),
    }
}

impl Host {
    /// A host with no instances.
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        Arc::new_cyclic(|me| Host {
            cfg,
            entries: Mutex::new(BTreeMap::new()),
            events: tokio::sync::broadcast::channel(1024).0,
            next_event: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            counters: HostCounters::default(),
            me: me.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The host's own counters.
    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    /// Counts a failed RPC.
    pub fn count_error(&self, method: &str, code: &str) {
        *lock(&self.counters.errors)
            .entry((method.to_string(), code.to_string()))
            .or_default() += 1;
    }

    /// Every instance, by id.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        lock(&self.entries).values().cloned().collect()
    }

    /// The instance `id`.
    pub fn entry(&self, id: &str) -> Result<Arc<Entry>, HostError> {
        if id.is_empty() {
            return Err(HostError::invalid("instance_id", "must not be empty"));
        }
        lock(&self.entries)
            .get(id)
            .cloned()
            .ok_or_else(|| HostError::NotFound(format!("no instance {id:?} on this agent")))
    }

    /// New lifecycle events (numbered) of every instance.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Numbered> {
        self.events.subscribe()
    }

    /// The lifecycle history of `id` (or of every instance), oldest first.
    pub fn history(&self, id: Option<&str>) -> Vec<Numbered> {
        let mut out: Vec<Numbered> = self
            .entries()
            .iter()
            .filter(|e| id.is_none_or(|id| e.id.as_str() == id))
            .flat_map(|e| lock(&e.history).clone())
            .collect();
        out.sort_by_key(|(n, _)| *n);
        out
    }

    fn record(&self, id: &InstanceId, note: &InstanceNote) {
        let Some(entry) = lock(&self.entries).get(id.as_str()).cloned() else {
            return;
        };
        if let Some(k) = note.kind {
            *lock(&entry.last_kind) = Some(k);
        }
        let mut state = state_after(note.kind, &note.detail);
        if state == pb::InstanceState::Unspecified {
            state = entry.state();
        }
        let ev = pb::InstanceEvent {
            instance_id: id.to_string(),
            state: state as i32,
            kind: note.kind.map_or(0, |k| pb::LifecycleKind::from(k) as i32),
            detail: note.detail.clone(),
            seq: note.seq,
            wall_time_ns: note.wall_time_ns,
            replayed: false,
        };
        let n = self.next_event.fetch_add(1, Ordering::AcqRel);
        lock(&entry.history).push((n, ev.clone()));
        let _ = self.events.send((n, ev));
    }

    fn note(&self, id: &InstanceId, detail: &str) {
        self.record(
            id,
            &InstanceNote {
                kind: None,
                detail: detail.to_string(),
                seq: 0,
                wall_time_ns: now_ns(),
            },
        );
    }

    /// Finds image `name` in the image directories.
    pub fn find_image(&self, name: &str) -> Result<PathBuf, HostError> {
        if !plain_name(name) {
            return Err(HostError::invalid(
                "spec.image",
                format!("{name:?} is not an image name (1 to 128 characters of [A-Za-z0-9._-])"),
            ));
        }
        for d in &self.cfg.agent.image_dirs {
            let dir = d.join(name);
            if dir.join(IMAGE_FILE).is_file() {
                return Ok(dir);
            }
        }
        Err(HostError::NotFound(format!(
            "no machine image {name:?} in {}",
            self.cfg
                .agent
                .image_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Checks that the broker answers a metadata request.
    pub fn probe_broker(&self) -> Result<(), HostError> {
        let ep = &self.cfg.endpoints;
        let timeout = Duration::from_secs(self.cfg.shipper.request_timeout_secs.clamp(1, 5));
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &ep.bootstrap_servers)
            .set("client.id", "capture-agent/probe")
            .set("socket.timeout.ms", timeout.as_millis().to_string())
            .set_log_level(RDKafkaLogLevel::Emerg);
        for (k, v) in ep.kafka_security.client_properties() {
            c.set(k, v);
        }
        let r = c
            .create::<BaseConsumer>()
            .map_err(|e| e.to_string())
            .and_then(|cons| {
                cons.fetch_metadata(Some(vmr_proto::topics::LIFECYCLE), timeout)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        match r {
            Ok(()) => {
                self.counters.broker_reachable.store(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.broker_reachable.store(0, Ordering::Relaxed);
                self.counters
                    .broker_probe_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(HostError::Unavailable(format!(
                    "the Kafka broker at {} does not answer: {e}",
                    ep.bootstrap_servers
                )))
            }
        }
    }

    fn launch_options(
        &self,
        id: &InstanceId,
        spec: &pb::InstanceSpec,
        image_dir: &Path,
        image: &MachineImage,
    ) -> Result<(LaunchOptions, String), HostError> {
        let driver = if spec.driver.is_empty() {
            image
                .drivers
                .first()
                .cloned()
                .ok_or_else(|| HostError::invalid("spec.image", "the image names no driver"))?
        } else {
            spec.driver.clone()
        };
        if vmr_hypervisor::driver(&driver).is_err() {
            return Err(HostError::invalid(
                "spec.driver",
                format!("unknown driver {driver:?} (known: qemu, microvm)"),
            ));
        }
        if !image.drivers.iter().any(|d| d == &driver) {
            return Err(HostError::invalid(
                "spec.driver",
                format!(
                    "the image {} runs under {}, not {driver}",
                    image.name,
                    image.drivers.join(", ")
                ),
            ));
        }
        let a = &self.cfg.agent;
        let mut o = LaunchOptions::new(image_dir, id.clone(), driver.clone(), &a.data_dir);
        o.accel = match spec.accel.as_str() {
            "" => Accel::default(),
            s => s.parse().map_err(|_| {
                HostError::invalid("spec.accel", format!("{s:?} is not kvm, tcg or auto"))
            })?,
        };
        let mut seen = std::collections::BTreeSet::new();
        for (i, d) in spec.devices.iter().enumerate() {
            let field = format!("spec.devices[{i}]");
            let is_disk = image.disks.iter().any(|x| x.name == d.name);
            let is_nic = image.nics.iter().any(|x| x.name == d.name);
            if !is_disk && !is_nic {
                return Err(HostError::invalid(
                    format!("{field}.name"),
                    format!("the image {} has no device {:?}", image.name, d.name),
                ));
            }
            if !seen.insert(d.name.clone()) {
                return Err(HostError::invalid(
                    format!("{field}.name"),
                    format!("device {:?} is given twice", d.name),
                ));
            }
            let filter = d
                .filter
                .as_ref()
                .map(|f| filter_from_pb(f, &format!("{field}.filter")))
                .transpose()?;
            if let Some(f) = &filter {
                let kind = if is_disk { "block" } else { "net" };
                if f.kind() != kind {
                    return Err(HostError::invalid(
                        format!("{field}.filter"),
                        format!("{} is a {kind} device; give a {kind} filter", d.name),
                    ));
                }
            }
            if !d.tap.is_empty() && (!is_nic || d.tap.len() > 15 || !plain_name(&d.tap)) {
                return Err(HostError::invalid(
                    format!("{field}.tap"),
                    "a TAP name is 1 to 15 characters of [A-Za-z0-9._-], for a NIC",
                ));
            }
            o.devices.insert(
                d.name.clone(),
                DeviceOptions {
                    filter,
                    tap: (!d.tap.is_empty()).then(|| d.tap.clone()),
                },
            );
        }
        let mut capture = self.cfg.capture.clone();
        if let Some(p) = &spec.capture {
            match pb::SpoolFullPolicy::try_from(p.spool_full) {
                Ok(pb::SpoolFullPolicy::Unspecified) => {}
                Ok(pb::SpoolFullPolicy::Block) => capture.spool_full = SpoolFull::Block,
                Ok(pb::SpoolFullPolicy::Drop) => capture.spool_full = SpoolFull::Drop,
                Err(_) => {
                    return Err(HostError::invalid(
                        "spec.capture.spool_full",
                        format!("{} is not a policy", p.spool_full),
                    ))
                }
            }
            if p.block_bound_ms > 0 {
                capture.block_bound_ms = u64::from(p.block_bound_ms);
            }
            if p.spool_retain_mib > 0 {
                capture.spool_retain_mib = p.spool_retain_mib;
            }
            if p.spool_segment_mib > 0 {
                capture.spool_segment_mib = p.spool_segment_mib;
            }
            capture
                .validate()
                .map_err(|e| HostError::invalid("spec.capture", e.to_string()))?;
        }
        if let Some(n) = &spec.network {
            if !n.netns.is_empty() {
                if !plain_name(&n.netns) {
                    return Err(HostError::invalid(
                        "spec.network.netns",
                        "a namespace name is [A-Za-z0-9._-]",
                    ));
                }
                if !Path::new("/var/run/netns").join(&n.netns).exists() {
                    return Err(HostError::invalid(
                        "spec.network.netns",
                        format!("no network namespace {:?} (/var/run/netns)", n.netns),
                    ));
                }
                o.netns = Some(n.netns.clone());
            }
            if !n.tap_prefix.is_empty() {
                if n.tap_prefix.len() > 12 || !plain_name(&n.tap_prefix) {
                    return Err(HostError::invalid(
                        "spec.network.tap_prefix",
                        "1 to 12 characters of [A-Za-z0-9._-]",
                    ));
                }
                o.tap_prefix = n.tap_prefix.clone();
            }
        }
        o.endpoints = self.cfg.endpoints.clone();
        o.shipper = self.cfg.shipper.clone();
        o.sensors = Some(self.cfg.sensors.clone());
        o.qemu_binary = a.qemu_binary.clone();
        o.stop_grace = Duration::from_secs(a.stop_grace_secs);
        o.drain_timeout = Duration::from_secs(a.drain_timeout_secs);
        o.supervisor.bin_dir = a.backend_dir.clone();
        o.supervisor.spool_full = capture.spool_full;
        o.supervisor.block_bound = Some(capture.block_bound());
        o.supervisor.retain_mib = capture.spool_retain_mib;
        o.supervisor.segment_mib = capture.spool_segment_mib;
        let me = self.me.clone();
        o.on_note = Some(Arc::new(move |id, note| {
            if let Some(h) = me.upgrade() {
                h.record(id, note);
            }
        }));
        Ok((o, driver))
    }

    /// Launches an instance (blocking: backends, shippers, guest).
    pub fn launch(&self, req: pb::LaunchInstanceRequest) -> Result<Arc<Entry>, HostError> {
        let spec = req
            .spec
            .ok_or_else(|| HostError::invalid("spec", "missing"))?;
        let id = if req.instance_id.is_empty() {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            InstanceId::new(format!("vm-{:x}-{n}", now_ns() / 1_000_000))
                .map_err(|e| HostError::Internal(e.to_string()))?
        } else {
            InstanceId::new(req.instance_id.clone())
                .map_err(|e| HostError::invalid("instance_id", e.to_string()))?
        };
        if spec.image.is_empty() {
            return Err(HostError::invalid("spec.image", "missing"));
        }
        let image_dir = self.find_image(&spec.image)?;
        let image = MachineImage::load(&image_dir).map_err(|e| match e {
            DriverError::Image { field, reason, .. } => HostError::invalid(
                "spec.image",
                format!("image {} is invalid: {field}: {reason}", spec.image),
            ),
            other => HostError::invalid("spec.image", display_chain(&other)),
        })?;
        let (mut opts, driver) = self.launch_options(&id, &spec, &image_dir, &image)?;
        let launched_ns = now_ns();
        opts.record_spec = Some(spec.encode_to_vec());
        opts.launched_ns = launched_ns;
        let entry = Arc::new(Entry {
            id: id.clone(),
            spec: spec.clone(),
            driver,
            launched_ns,
            phase: Mutex::new(Phase::Starting),
            detail: Mutex::new(String::new()),
            last_kind: Mutex::new(None),
            history: Mutex::new(Vec::new()),
        });
        {
            let mut entries = lock(&self.entries);
            if let Some(old) = entries.get(id.as_str()) {
                let state = old.state();
                if !matches!(
                    state,
                    pb::InstanceState::Stopped
                        | pb::InstanceState::Crashed
                        | pb::InstanceState::Failed
                ) || old.running().is_some()
                {
                    return Err(HostError::AlreadyExists(format!(
                        "instance {id} exists ({}); stop it first",
                        state.as_str_name()
                    )));
                }
            }
            let live = entries
                .values()
                .filter(|e| e.instance().is_some_and(|i| !i.is_stopped()))
                .count();
            if live >= self.cfg.agent.max_instances {
                return Err(HostError::ResourceExhausted(format!(
                    "this agent runs {live} instances, its max-instances"
                )));
            }
            entries.insert(id.to_string(), entry.clone());
        }
        if let Err(e) = self.probe_broker() {
            tracing::warn!(instance = %id, error = %e, "launch refused: the broker is unreachable");
            *lock(&entry.phase) = Phase::Failed;
            *lock(&entry.detail) = e.to_string();
            self.note(&id, "launch failed");
            return Err(e);
        }
        match RecordedInstance::launch(opts) {
            Ok(inst) => {
                *lock(&entry.phase) = Phase::Up(Arc::new(inst));
                // The instance itself noted "launched" before its first
                // guest event.
                self.counters.launches.fetch_add(1, Ordering::Relaxed);
                Ok(entry)
            }
            Err(e) => {
                let text = display_chain(&e);
                tracing::warn!(instance = %id, error = %text, "launch failed");
                *lock(&entry.phase) = Phase::Failed;
                *lock(&entry.detail) = text.clone();
                self.note(&id, "launch failed");
                Err(launch_error(&e, text))
            }
        }
    }

    fn up(&self, id: &str, what: &str) -> Result<(Arc<Entry>, Arc<RecordedInstance>), HostError> {
        let e = self.entry(id)?;
        let Some(i) = e.running() else {
            return Err(HostError::FailedPrecondition(format!(
                "cannot {what} instance {id}: it is {}",
                state_word(e.state())
            )));
        };
        Ok((e, i))
    }

    /// Pauses a running instance.
    pub fn pause(&self, id: &str) -> Result<Arc<Entry>, HostError> {
        let (e, i) = self.up(id, "pause")?;
        let st = e.state();
        if st != pb::InstanceState::Running {
            return Err(HostError::FailedPrecondition(format!(
                "cannot pause instance {id}: it is {}, not running",
                state_word(st)
            )));
        }
        i.pause().map_err(|err| driver_error(&err))?;
        Ok(e)
    }

    /// Resumes a paused instance.
    pub fn resume(&self, id: &str) -> Result<Arc<Entry>, HostError> {
        let (e, i) = self.up(id, "resume")?;
        let st = e.state();
        if st != pb::InstanceState::Paused {
            return Err(HostError::FailedPrecondition(format!(
                "cannot resume instance {id}: it is {}, not paused",
                state_word(st)
            )));
        }
        i.resume().map_err(|err| driver_error(&err))?;
        Ok(e)
    }

    /// Stops an instance (blocking); a stopped one is returned unchanged.
    pub fn stop(&self, id: &str) -> Result<Arc<Entry>, HostError> {
        let e = self.entry(id)?;
        let inst = {
            let mut phase = lock(&e.phase);
            match phase.clone() {
                Phase::Stopped(_) | Phase::Failed => return Ok(e.clone()),
                Phase::Starting => {
                    return Err(HostError::FailedPrecondition(format!(
                        "instance {id} is still starting"
                    )))
                }
                Phase::Stopping(_) => {
                    return Err(HostError::FailedPrecondition(format!(
                        "instance {id} is already stopping"
                    )))
                }
                Phase::Up(i) => {
                    *phase = Phase::Stopping(i.clone());
                    i
                }
            }
        };
        self.note(&e.id, "stopping");
        let report = inst.shutdown();
        tracing::info!(instance = %id, exit = ?report.exit, "instance stopped");
        *lock(&e.phase) = Phase::Stopped(Some(inst));
        Ok(e)
    }

    /// Re-attaches to the instances an earlier agent process launched on
    /// this data directory and left running (a crash or `kill -9` of the
    /// agent): one per record (`<data>/<instance>/instance.json`). Each
    /// instance's backends are adopted and its spools shipped again; a
    /// guest that still runs is re-attached, one that ended meanwhile is
    /// reported (a CRASH lifecycle event, state CRASHED) and the instance
    /// is stopped once its spools are shipped (in the background). Returns
    /// the re-attached instances whose guest runs, with their launch spec.
    /// A record that cannot be used is logged and left in place.
    pub fn recover(&self) -> Vec<(Arc<Entry>, pb::InstanceSpec)> {
        let mut out = Vec::new();
        for (path, r) in InstanceRecord::scan(&self.cfg.agent.data_dir) {
            let rec = match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(record = %path.display(), error = %display_chain(&e), "cannot read an instance record; left as it is");
                    continue;
                }
            };
            if rec.agent.pid != std::process::id() && rec.agent.alive() {
                tracing::warn!(record = %path.display(), agent_pid = rec.agent.pid, "the instance belongs to another agent process that still runs; not taken over");
                continue;
            }
            let id = match InstanceId::new(rec.instance.clone()) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(record = %path.display(), error = %e, "the record names no valid instance");
                    continue;
                }
            };
            let spec_pb = rec.spec_bytes().unwrap_or_default();
            let spec = match pb::InstanceSpec::decode(spec_pb.as_slice()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(record = %path.display(), error = %e, "the record's spec does not decode");
                    continue;
                }
            };
            if lock(&self.entries).contains_key(id.as_str()) {
                continue;
            }
            let entry = Arc::new(Entry {
                id: id.clone(),
                spec: spec.clone(),
                driver: rec.driver.clone(),
                launched_ns: rec.launched_ns,
                phase: Mutex::new(Phase::Starting),
                detail: Mutex::new(String::new()),
                last_kind: Mutex::new(None),
                history: Mutex::new(Vec::new()),
            });
            lock(&self.entries).insert(id.to_string(), entry.clone());
            let opts = MachineImage::load(&rec.image_dir)
                .map_err(|e| HostError::invalid("spec.image", display_chain(&e)))
                .and_then(|image| self.launch_options(&id, &spec, &rec.image_dir, &image));
            let mut opts = match opts {
                Ok((o, _)) => o,
                Err(e) => {
                    let text = format!("cannot re-attach: {e}");
                    tracing::error!(instance = %id, error = %text, "re-attach failed; the record is left in place");
                    *lock(&entry.phase) = Phase::Failed;
                    *lock(&entry.detail) = text;
                    self.note(&id, "launch failed");
                    continue;
                }
            };
            opts.record_spec = Some(spec_pb);
            opts.launched_ns = rec.launched_ns;
            match RecordedInstance::reattach(opts, &rec) {
                Ok(r) => {
                    let inst = Arc::new(r.instance);
                    *lock(&entry.detail) = r.detail.clone();
                    *lock(&entry.phase) = Phase::Up(inst);
                    if r.guest_alive {
                        tracing::info!(instance = %id, driver = %rec.driver, detail = %r.detail, "re-attached");
                        self.note(&id, &r.detail);
                        out.push((entry, spec));
                    } else {
                        tracing::warn!(instance = %id, driver = %rec.driver, detail = %r.detail, "guest gone after the agent restart; stopping the instance once its spools are shipped");
                        let me = self.me.clone();
                        let name = id.to_string();
                        let spawned =
                            std::thread::Builder::new()
                                .name("salvage".into())
                                .spawn(move || {
                                    let Some(h) = me.upgrade() else { return };
                                    // Ship what the spools hold (the shippers
                                    // first find their place in Kafka), then stop.
                                    if let Some(i) = h.entry(&name).ok().and_then(|e| e.running()) {
                                        let t = Duration::from_secs(h.cfg.agent.drain_timeout_secs);
                                        if !i.wait_shipped(t) {
                                            tracing::warn!(instance = %name, "spools not shipped within the drain timeout; the rest stays in them");
                                        }
                                    }
                                    let _ = h.stop(&name);
                                });
                        if let Err(e) = spawned {
                            tracing::warn!(instance = %id, error = %e, "cannot start the stop thread; stopping here");
                            let _ = self.stop(id.as_str());
                        }
                    }
                }
                Err(e) => {
                    let text = format!("cannot re-attach: {}", display_chain(&e));
                    tracing::error!(instance = %id, error = %text, "re-attach failed; the record is left in place");
                    *lock(&entry.phase) = Phase::Failed;
                    *lock(&entry.detail) = text;
                    self.note(&id, "launch failed");
                }
            }
        }
        out
    }

    /// Stops every instance (at agent exit).
    pub fn stop_all(&self) {
        for e in self.entries() {
            if e.running().is_some() {
                let _ = self.stop(e.id.as_str());
            }
        }
    }

    /// Changes what a device records.
    pub fn update_filter(
        &self,
        req: &pb::UpdateCaptureFilterRequest,
    ) -> Result<pb::DeviceStatus, HostError> {
        let e = self.entry(&req.instance_id)?;
        let Some(i) = e.running() else {
            return Err(HostError::FailedPrecondition(format!(
                "cannot change a filter of instance {}: it is {}",
                req.instance_id,
                state_word(e.state())
            )));
        };
        let Some(dev) = i.devices().iter().find(|d| d.name == req.device) else {
            return Err(HostError::NotFound(format!(
                "instance {} has no device {:?}",
                req.instance_id, req.device
            )));
        };
        let filter = filter_from_pb(
            req.filter
                .as_ref()
                .ok_or_else(|| HostError::invalid("filter", "missing"))?,
            "filter",
        )?;
        if filter.kind() != dev.kind.name() {
            return Err(HostError::invalid(
                "filter",
                format!(
                    "{} is a {} device; give a {} filter",
                    dev.name,
                    dev.kind.name(),
                    dev.kind.name()
                ),
            ));
        }
        i.set_filter(&req.device, filter.clone())
            .map_err(|err| match err {
                InstanceError::Backends(SupervisorError::Control { .. }) => {
                    HostError::Unavailable(display_chain(&err))
                }
                InstanceError::Stopped => HostError::FailedPrecondition(err.to_string()),
                other => HostError::Internal(display_chain(&other)),
            })?;
        // The record keeps the filter for an agent restart.
        if let Some(rec) = i.record() {
            if let Some(mut spec) = rec
                .spec_bytes()
                .and_then(|b| pb::InstanceSpec::decode(b.as_slice()).ok())
            {
                let f = filter_to_pb(&filter);
                match spec.devices.iter_mut().find(|d| d.name == req.device) {
                    Some(d) => d.filter = Some(f),
                    None => spec.devices.push(pb::DeviceSpec {
                        name: req.device.clone(),
                        filter: Some(f),
                        ..Default::default()
                    }),
                }
                i.update_record_spec(&spec.encode_to_vec());
            }
        }
        let inst = self.inspect(&e);
        inst.devices
            .into_iter()
            .find(|d| d.name == req.device)
            .ok_or_else(|| HostError::Internal("the device vanished".into()))
    }

    /// The instance as the API shows it.
    pub fn inspect(&self, e: &Entry) -> pb::Instance {
        let mut out = pb::Instance {
            instance_id: e.id.to_string(),
            spec: Some(e.spec.clone()),
            state: e.state() as i32,
            driver: e.driver.clone(),
            detail: lock(&e.detail).clone(),
            launched_ns: e.launched_ns,
            ..Default::default()
        };
        let Some(i) = e.instance() else {
            return out;
        };
        let backends = i.backends();
        let spools = i.spools();
        let now = now_ns();
        let mut gaps = i
            .events()
            .counters()
            .gaps
            .load(std::sync::atomic::Ordering::Relaxed);
        for s in &spools {
            let m = &s.shipper;
            out.last_seq = out.last_seq.max(m.read_seq);
            out.last_seq_shipped = out.last_seq_shipped.max(m.acked_seq);
            out.lag_events += m.in_flight;
            let shipping = pb::ShippingStatus {
                spool_bytes: s.spool_bytes,
                last_seq_shipped: m.acked_seq,
                lag_events: m.in_flight,
                oldest_unshipped_age_ms: s
                    .oldest_unshipped_wall_ns
                    .map_or(0, |w| now.saturating_sub(w) / 1_000_000),
                events_shipped: m.records_acked,
                bytes_shipped: m.bytes_acked,
                producer_errors: m.produce_errors + m.delivery_errors,
                corrupt_frames: m.corrupt_frames,
                connected: m.up == 1,
            };
            if s.source == "agent" {
                out.devices.push(pb::DeviceStatus {
                    name: "agent".into(),
                    kind: "agent".into(),
                    shipping: Some(shipping),
                    ..Default::default()
                });
                continue;
            }
            let dev = i.devices().iter().find(|d| d.name == s.source);
            let b = backends.iter().find(|b| b.device == s.source);
            if !i.is_stopped() {
                if let Some(bm) = i.backend_metrics(&s.source) {
                    gaps += bm["gaps"].as_u64().unwrap_or(0);
                }
            }
            out.devices.push(pb::DeviceStatus {
                name: s.source.clone(),
                kind: dev.map_or("", |d| d.kind.name()).to_string(),
                backend: b.map(|b| pb::BackendStatus {
                    pid: b.pid.unwrap_or(0),
                    restarts: b.restarts,
                    last_exit: b.last_exit.clone().unwrap_or_default(),
                }),
                shipping: Some(shipping),
                filter: i
                    .filter(&s.source)
                    .ok()
                    .flatten()
                    .as_ref()
                    .map(filter_to_pb),
                tap: match dev.map(|d| &d.kind) {
                    Some(crate::supervisor::BackendKind::Net { tap, .. }) => tap.clone(),
                    _ => String::new(),
                },
            });
        }
        out.gaps = gaps;
        if let Some(inv) = i.sensors() {
            let mut s = pb::SensorsStatus::default();
            for k in &inv.kinds {
                if k.sensors.is_empty() {
                    s.missing.push(k.kind.name().to_string());
                } else {
                    s.available.push(k.kind.name().to_string());
                    s.sensors += k.sensors.len() as u32;
                }
            }
            out.sensors = Some(s);
        }
        out
    }
}

fn state_word(s: pb::InstanceState) -> &'static str {
    use pb::InstanceState as S;
    match s {
        S::Unspecified => "in an unknown state",
        S::Starting => "starting",
        S::Running => "running",
        S::Paused => "paused",
        S::Stopping => "stopping",
        S::Stopped => "stopped",
        S::Crashed => "crashed",
        S::Failed => "failed",
    }
}

fn driver_error(e: &InstanceError) -> HostError {
    match e {
        InstanceError::Stopped => HostError::FailedPrecondition(e.to_string()),
        InstanceError::Driver(DriverError::Gone(_)) => {
            HostError::FailedPrecondition(display_chain(e))
        }
        _ => HostError::Internal(display_chain(e)),
    }
}

fn launch_error(e: &InstanceError, text: String) -> HostError {
    match e {
        InstanceError::Image(DriverError::Image { field, reason, .. }) => {
            HostError::invalid("spec.image", format!("{field}: {reason}"))
        }
        InstanceError::Image(other) | InstanceError::Driver(other @ DriverError::Spec { .. }) => {
            HostError::invalid("spec", display_chain(other))
        }
        InstanceError::Device { field, reason } => {
            HostError::invalid(format!("spec.{field}"), reason.clone())
        }
        InstanceError::Backends(SupervisorError::NotListening { reason, .. })
            if reason.contains("No space left on device") =>
        {
            HostError::ResourceExhausted(text)
        }
        InstanceError::Backends(SupervisorError::NotListening { .. }) => {
            HostError::FailedPrecondition(text)
        }
        InstanceError::Driver(DriverError::MissingProgram { .. })
        | InstanceError::Backends(SupervisorError::SeqOnTmpfs(_) | SupervisorError::Spawn { .. }) => {
            HostError::FailedPrecondition(text)
        }
        _ => HostError::Internal(text),
    }
}
