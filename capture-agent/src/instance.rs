//! A recorded instance: its supervised device backends, one shipper per
//! spool, the agent's event log, host sensors, and the guest under a
//! hypervisor driver.
//!
//! [`RecordedInstance::launch`] starts, in order: the backends (through the
//! [`Supervisor`]), a [`Shipper`] per device spool and one over the agent's
//! [`EventLog`] spool, the sensor loop, the guest, and a thread that
//! forwards the driver's lifecycle events into the event log.
//! [`RecordedInstance::shutdown`] tears it down the other way round: guest,
//! forwarder, sensors, backends, then the shippers once they have shipped
//! what the spools hold (bounded).
//!
//! A running instance is shared (`Arc<RecordedInstance>`): every method
//! takes `&self`, so the service, the metrics endpoint and the snapshot
//! engine can use it at the same time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_tap::capture::{SpoolItem, SpoolReader};
use vhost_tap::seq::{FileSeq, SeqSource};
use vmr_hypervisor::image::{DiskSource, MachineImage};
use vmr_hypervisor::{Accel, DebugListen, DriverError, ExitInfo, Instance, RunState};
use vmr_proto::domain::LifecycleKind;
use vmr_proto::InstanceId;

use crate::config::{SensorsConfig, ShipperConfig};
use crate::events::{EventLog, EventLogConfig, EventsError};
use crate::metrics::{MetricsSnapshot, ShipperMetrics};
use crate::record::{
    BackendRecord, GuestRecord, InstanceRecord, ProcessRef, RecordFile, RECORD_FILE, RECORD_VERSION,
};
use crate::sensors::{Inventory, Schedule, SensorLoop, Sensors};
use crate::shipper::{display_chain, Shipper, ShipperHandle, ShipperOptions};
use crate::source::{SourceError, SpoolSource};
use crate::supervisor::{
    BackendKind, BackendSpec, BackendStatus, CaptureFilter, InstanceDirs, RecordedBackend,
    Supervisor, SupervisorConfig, SupervisorError,
};
use vmr_proto::config::Endpoints;

/// Errors of a recorded instance.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The machine image could not be loaded or does not fit the driver.
    #[error("machine image")]
    Image(#[source] DriverError),
    /// The driver refused or failed.
    #[error("driver")]
    Driver(#[source] DriverError),
    /// A device setting names no device of the image, or does not fit it.
    #[error("{field}: {reason}")]
    Device { field: String, reason: String },
    /// The backends could not be started.
    #[error("backends")]
    Backends(#[from] SupervisorError),
    /// A disk could not be created from the image.
    #[error("cannot create disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The sequence file could not be opened.
    #[error("sequence file {0}")]
    Seq(PathBuf, #[source] vhost_tap::seq::SeqError),
    /// The agent's event log could not be opened.
    #[error("event log")]
    Events(#[from] EventsError),
    /// A spool could not be opened for shipping.
    #[error("spool {0}")]
    Spool(PathBuf, #[source] SourceError),
    /// A shipper could not be created.
    #[error("shipper for {0}")]
    Shipper(String, #[source] crate::shipper::ShipperError),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// The instance was stopped.
    #[error("the instance is stopped")]
    Stopped,
    /// The instance record could not be written.
    #[error("instance record")]
    Record(#[from] crate::record::RecordError),
}

/// Settings of one device of the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// What it records (`None`: everything).
    pub filter: Option<CaptureFilter>,
    /// NICs only: the TAP name (default `<tap_prefix><index>`).
    pub tap: Option<String>,
}

/// A lifecycle change of a recorded instance, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNote {
    /// The guest event (`None` for agent steps without one: launched,
    /// stopped).
    pub kind: Option<LifecycleKind>,
    /// What happened.
    pub detail: String,
    /// `seq` of the lifecycle event recorded for it (0: none).
    pub seq: u64,
    /// Wall-clock time, ns since the Unix epoch.
    pub wall_time_ns: u64,
}

/// Called with every [`InstanceNote`] of an instance, from the instance's
/// own threads.
pub type NoteHook = Arc<dyn Fn(&InstanceId, &InstanceNote) + Send + Sync>;

/// How to launch a recorded instance.
#[derive(Clone)]
pub struct LaunchOptions {
    /// The machine image directory (with `image.toml`).
    pub image_dir: PathBuf,
    /// The instance.
    pub instance: InstanceId,
    /// Driver name (`qemu`, `microvm`).
    pub driver: String,
    /// Data directory; the instance lives in `<data>/<instance>/`.
    pub data_dir: PathBuf,
    /// Network namespace the NICs' TAPs live in.
    pub netns: Option<String>,
    /// TAP name per NIC: `<tap_prefix><index>` (default `vmrtap`).
    pub tap_prefix: String,
    /// Per-device settings, by device name.
    pub devices: BTreeMap<String, DeviceOptions>,
    /// Kafka and Schema Registry.
    pub endpoints: Endpoints,
    /// Shipper settings (one shipper per spool).
    pub shipper: ShipperConfig,
    /// Backend supervision and capture policy settings.
    pub supervisor: SupervisorConfig,
    /// Host sensors recorded into the instance's env topic (`None`: none).
    pub sensors: Option<SensorsConfig>,
    /// QEMU acceleration.
    pub accel: Accel,
    /// QEMU binary (default: the driver's).
    pub qemu_binary: Option<PathBuf>,
    /// How long `stop` lets the guest shut down before it is killed.
    pub stop_grace: Duration,
    /// How long `stop` waits for the shippers to ship what the spools hold.
    pub drain_timeout: Duration,
    /// Told about every lifecycle change.
    pub on_note: Option<NoteHook>,
    /// Keep a durable record of the instance (`<data>/<instance>/instance.json`,
    /// see [`crate::record`]) holding this spec (`vmr.v1.InstanceSpec`,
    /// protobuf), so a restarted agent can re-attach; `None`: no record.
    pub record_spec: Option<Vec<u8>>,
    /// Wall time of the launch (ns since the Unix epoch) for the record.
    pub launched_ns: u64,
}

impl std::fmt::Debug for LaunchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchOptions")
            .field("image_dir", &self.image_dir)
            .field("instance", &self.instance)
            .field("driver", &self.driver)
            .field("data_dir", &self.data_dir)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl LaunchOptions {
    /// Defaults for `instance` of `image_dir` under `driver` in `data_dir`.
    pub fn new(
        image_dir: impl Into<PathBuf>,
        instance: InstanceId,
        driver: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            image_dir: image_dir.into(),
            instance,
            driver: driver.into(),
            data_dir: data_dir.into(),
            netns: None,
            tap_prefix: "vmrtap".into(),
            devices: BTreeMap::new(),
            endpoints: Endpoints::default(),
            shipper: ShipperConfig::default(),
            supervisor: SupervisorConfig::default(),
            sensors: None,
            accel: Accel::default(),
            qemu_binary: None,
            stop_grace: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            on_note: None,
            record_spec: None,
            launched_ns: 0,
        }
    }
}

/// What [`RecordedInstance::stop`] saw.
#[derive(Debug)]
pub struct StopReport {
    /// How the guest ended.
    pub exit: Result<ExitInfo, DriverError>,
    /// Each shipper's final counters, by source (device name or `agent`).
    pub shippers: Vec<(String, MetricsSnapshot)>,
}

/// One device of a running instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// What its backend serves.
    pub kind: BackendKind,
    /// Its spool directory.
    pub spool: PathBuf,
    /// Its backend's control socket.
    pub control: PathBuf,
    /// A disk (else a NIC).
    pub disk: bool,
    /// Directory of the disk's copy-on-write layers, when the backend runs
    /// with a layer chain (`None`: a plain disk file).
    pub layers: Option<PathBuf>,
}

/// Shipping progress of one spool now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStatus {
    /// Source name: a device, or `agent`.
    pub source: String,
    /// Bytes of the spool's files.
    pub spool_bytes: u64,
    /// Wall time (ns) of the oldest record not committed as shipped, if
    /// the spool holds one.
    pub oldest_unshipped_wall_ns: Option<u64>,
    /// The shipper's counters.
    pub shipper: MetricsSnapshot,
}

/// A running recorded instance. Dropping it stops it.
pub struct RecordedInstance {
    instance: InstanceId,
    driver: String,
    image: MachineImage,
    endpoints: Endpoints,
    dirs: InstanceDirs,
    devices: Vec<DeviceInfo>,
    guest: Mutex<Option<Arc<dyn Instance>>>,
    supervisor: Mutex<Option<Supervisor>>,
    /// The backends' state when they were stopped.
    final_backends: Mutex<Vec<BackendStatus>>,
    shippers: Mutex<Vec<(String, ShipperHandle)>>,
    shipper_metrics: Vec<(String, Arc<ShipperMetrics>)>,
    events: Arc<EventLog>,
    sensors: Mutex<Option<SensorLoop>>,
    inventory: Option<Inventory>,
    forward_stop: Arc<AtomicBool>,
    forwarder: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
    teardown_lock: Mutex<()>,
    stop_grace: Duration,
    drain_timeout: Duration,
    on_note: Option<NoteHook>,
    record: Option<Arc<RecordFile>>,
}

/// What [`RecordedInstance::reattach`] found.
pub struct Reattached {
    /// The instance: shipping its spools, its backends supervised.
    pub instance: RecordedInstance,
    /// Whether its guest still ran and is re-attached (else it ended while
    /// no agent ran: a CRASH lifecycle event says so, and the instance
    /// only ships what its spools hold until it is stopped).
    pub guest_alive: bool,
    /// What was found, for the log and the lifecycle history.
    pub detail: String,
}

/// Driver events that become lifecycle events in the agent's log.
fn forwarded(kind: LifecycleKind) -> bool {
    matches!(
        kind,
        LifecycleKind::Boot
            | LifecycleKind::Pause
            | LifecycleKind::Resume
            | LifecycleKind::Crash
            | LifecycleKind::Shutdown
            | LifecycleKind::TripleFault
            | LifecycleKind::InternalError
    )
}

fn make_disk(source: &DiskSource, path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("img.tmp");
    match source {
        DiskSource::Blank(bytes) => std::fs::File::create(&tmp)?.set_len(*bytes)?,
        DiskSource::File(f) => {
            std::fs::copy(f, &tmp)?;
        }
    }
    std::fs::rename(&tmp, path)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Disk space the regular files in `dir` take (allocated blocks, so a
/// recycled segment's unused tail does not count; not recursive).
pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Wall time of the first event after the committed position of the spool
/// in `dir`, if there is one.
pub fn oldest_unshipped(dir: &Path) -> Option<u64> {
    let committed = vhost_tap::capture::spool::read_committed(dir).ok()?;
    let mut r = SpoolReader::from_position(dir, committed.as_ref());
    for _ in 0..64 {
        match r.next_item() {
            Ok(Some(SpoolItem::Event { event, .. })) => return Some(event.wall_time_ns),
            Ok(Some(SpoolItem::Skipped { .. })) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
    None
}

fn now_wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn check_devices(opts: &LaunchOptions, image: &MachineImage) -> Result<(), InstanceError> {
    for (name, d) in &opts.devices {
        let field = format!("devices[{name}]");
        let kind = if image.disks.iter().any(|x| &x.name == name) {
            "block"
        } else if image.nics.iter().any(|x| &x.name == name) {
            "net"
        } else {
            return Err(InstanceError::Device {
                field,
                reason: format!("the image {} has no device {name:?}", image.name),
            });
        };
        if let Some(f) = &d.filter {
            if f.kind() != kind {
                return Err(InstanceError::Device {
                    field: format!("{field}.filter"),
                    reason: format!("{name} is a {kind} device; give a {kind} filter"),
                });
            }
        }
        if d.tap.is_some() && kind != "net" {
            return Err(InstanceError::Device {
                field: format!("{field}.tap"),
                reason: format!("{name} is not a NIC"),
            });
        }
    }
    Ok(())
}

/// One backend per disk and NIC of the image (creating missing disks).
fn backend_specs(
    opts: &LaunchOptions,
    image: &MachineImage,
    dirs: &InstanceDirs,
) -> Result<Vec<BackendSpec>, InstanceError> {
    let dev_opts = |name: &str| opts.devices.get(name).cloned().unwrap_or_default();
    let mut specs = Vec::new();
    for d in &image.disks {
        let path = dirs.root.join(format!("{}.img", d.name));
        make_disk(&d.source, &path).map_err(|source| InstanceError::Disk {
            path: path.clone(),
            source,
        })?;
        // The disk is the image under a chain of copy-on-write layers,
        // so a snapshot can freeze the top one (crate::snapshot).
        let layers = dirs.root.join(format!("{}.layers", d.name));
        std::fs::create_dir_all(&layers).map_err(|source| InstanceError::Disk {
            path: layers.clone(),
            source,
        })?;
        specs.push(BackendSpec {
            device: d.name.clone(),
            kind: BackendKind::Blk { image: path },
            extra_args: vec![
                "--overlay".into(),
                layers.join("base").display().to_string(),
            ],
            filter: dev_opts(&d.name).filter,
        });
    }
    for (i, n) in image.nics.iter().enumerate() {
        let o = dev_opts(&n.name);
        specs.push(BackendSpec {
            device: n.name.clone(),
            kind: BackendKind::Net {
                tap: o.tap.unwrap_or_else(|| format!("{}{i}", opts.tap_prefix)),
                netns: opts.netns.clone(),
            },
            extra_args: Vec::new(),
            filter: o.filter,
        });
    }
    Ok(specs)
}

fn device_infos(specs: &[BackendSpec], dirs: &InstanceDirs) -> Vec<DeviceInfo> {
    specs
        .iter()
        .map(|s| DeviceInfo {
            name: s.device.clone(),
            kind: s.kind.clone(),
            spool: dirs.spool(&s.device),
            control: dirs.control(&s.device),
            disk: matches!(s.kind, BackendKind::Blk { .. }),
            layers: None,
        })
        .collect()
}

/// The driver's spec of the guest.
fn guest_spec(
    opts: &LaunchOptions,
    image: &MachineImage,
    dirs: &InstanceDirs,
) -> Result<vmr_hypervisor::InstanceSpec, InstanceError> {
    let work = dirs.root.join("work");
    std::fs::create_dir_all(&work).map_err(|source| InstanceError::Disk {
        path: work.clone(),
        source,
    })?;
    let mut spec = image
        .instance_spec(&opts.driver, opts.instance.as_str(), &work, |d| {
            dirs.socket(d)
        })
        .map_err(InstanceError::Image)?;
    spec.qemu.accel = opts.accel;
    if opts.qemu_binary.is_some() {
        spec.qemu.binary = opts.qemu_binary.clone();
    }
    Ok(spec)
}

fn parse_debugger(s: &str) -> Option<DebugListen> {
    if let Some(a) = s.strip_prefix("tcp:") {
        return a.parse().ok().map(DebugListen::Tcp);
    }
    s.strip_prefix("unix:")
        .map(|p| DebugListen::Unix(PathBuf::from(p)))
}

impl RecordedInstance {
    /// Launches the instance; on failure, whatever was started is stopped.
    pub fn launch(opts: LaunchOptions) -> Result<Self, InstanceError> {
        let image = MachineImage::load(&opts.image_dir).map_err(InstanceError::Image)?;
        let driver = vmr_hypervisor::driver(&opts.driver).map_err(InstanceError::Driver)?;
        // Names a driver the image does not run under before anything starts.
        image
            .instance_spec(&opts.driver, opts.instance.as_str(), &opts.data_dir, |_| {
                PathBuf::new()
            })
            .map_err(InstanceError::Image)?;
        check_devices(&opts, &image)?;
        let dirs = InstanceDirs::new(&opts.data_dir, &opts.instance);
        std::fs::create_dir_all(&dirs.root).map_err(|source| InstanceError::Disk {
            path: dirs.root.clone(),
            source,
        })?;
        let specs = backend_specs(&opts, &image, &dirs)?;
        let devices = device_infos(&specs, &dirs);
        let supervisor = Supervisor::start(
            opts.instance.clone(),
            &opts.data_dir,
            specs,
            opts.supervisor.clone(),
        )?;
        let mut me = Self::assemble(&opts, &image, &dirs, devices, supervisor)?;
        let spec = guest_spec(&opts, &image, &dirs)?;
        let guest: Arc<dyn Instance> =
            Arc::from(driver.launch(&spec).map_err(InstanceError::Driver)?);
        *lock(&me.guest) = Some(guest.clone());
        if let Some(spec_pb) = &opts.record_spec {
            let rec = me.new_record(&opts, spec_pb);
            me.keep_record(RecordFile::create(dirs.root.join(RECORD_FILE), rec)?);
        }
        // "launched" goes out before the lifecycle forwarder starts, so it
        // is always an instance's first note; the forwarder then delivers
        // every guest event since the launch (the boot among them).
        if let Some(h) = &me.on_note {
            h(
                &me.instance,
                &InstanceNote {
                    kind: None,
                    detail: "launched".into(),
                    seq: 0,
                    wall_time_ns: now_wall_ns(),
                },
            );
        }
        me.attach_guest(guest)?;
        tracing::info!(instance = %me.instance, driver = %opts.driver, image = %me.image.name, "recorded instance running");
        Ok(me)
    }

    /// Takes over an instance an earlier agent process launched, from its
    /// record: adopts the backends that still run (starting the missing
    /// ones when the guest lives), ships every spool from where Kafka says
    /// it stopped, restarts the sensors, and re-attaches to the guest if
    /// its process is still the recorded one (QEMU, over QMP). A guest that
    /// ended meanwhile (a microVM always does: it ran inside the agent) is
    /// recorded as a CRASH lifecycle event. No process other than the
    /// recorded ones (same pid and start time) is ever signalled.
    pub fn reattach(
        opts: LaunchOptions,
        rec: &InstanceRecord,
    ) -> Result<Reattached, InstanceError> {
        let image = MachineImage::load(&opts.image_dir).map_err(InstanceError::Image)?;
        check_devices(&opts, &image)?;
        let dirs = InstanceDirs::new(&opts.data_dir, &opts.instance);
        let specs = backend_specs(&opts, &image, &dirs)?;
        let devices = device_infos(&specs, &dirs);
        let guest_proc = rec.guest.process.filter(|_| !rec.guest.in_agent);
        let mut guest_alive = guest_proc.is_some_and(|p| p.alive());
        let adopt: Vec<RecordedBackend> = specs
            .into_iter()
            .map(|spec| {
                let b = rec.backends.iter().find(|b| b.device == spec.device);
                RecordedBackend {
                    process: b.and_then(|b| b.process).map(|p| (p.pid, p.start_time)),
                    restarts: b.map_or(0, |b| b.restarts),
                    spec,
                }
            })
            .collect();
        let supervisor = Supervisor::adopt(
            opts.instance.clone(),
            &opts.data_dir,
            adopt,
            opts.supervisor.clone(),
            guest_alive,
        )?;
        let mut me = Self::assemble(&opts, &image, &dirs, devices, supervisor)?;
        let mut detail = String::new();
        if guest_alive {
            let p = guest_proc.expect("alive implies a process");
            let spec = guest_spec(&opts, &image, &dirs)?;
            let debugger = rec.guest.debugger.as_deref().and_then(parse_debugger);
            let accel = rec.guest.accel.clone().unwrap_or_else(|| "tcg".into());
            match vmr_hypervisor::qemu::QemuDriver.reattach(
                &spec,
                p.pid,
                p.start_time,
                &accel,
                debugger,
            ) {
                Ok(g) => {
                    me.attach_guest(Arc::new(g))?;
                    detail = format!(
                        "re-attached after an agent restart: guest pid {}, backends {}",
                        p.pid,
                        me.backends()
                            .iter()
                            .map(|b| format!(
                                "{}={}",
                                b.device,
                                b.pid.map_or("restarting".to_string(), |p| p.to_string())
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                }
                Err(e) => {
                    guest_alive = false;
                    detail = format!(
                        "the guest process (pid {}) runs but cannot be re-attached: {}; it is left running",
                        p.pid,
                        vmr_hypervisor::error_chain(&e)
                    );
                }
            }
        } else if rec.guest.in_agent {
            detail = format!(
                "the {} guest ran inside the agent process (pid {}) and ended with it",
                rec.driver, rec.agent.pid
            );
        } else if detail.is_empty() {
            detail = match guest_proc {
                Some(p) => format!(
                    "the guest process (pid {}) ended while the agent was down",
                    p.pid
                ),
                None => "no guest process was recorded".to_string(),
            };
        }
        let path = dirs.root.join(RECORD_FILE);
        if guest_alive {
            let spec_pb = rec.spec_bytes().unwrap_or_default();
            let mut fresh = me.new_record(&opts, &spec_pb);
            fresh.launched_ns = rec.launched_ns;
            fresh.guest.accel = rec.guest.accel.clone();
            me.keep_record(RecordFile::create(path, fresh)?);
            tracing::info!(instance = %me.instance, %detail, "recorded instance re-attached");
        } else {
            // Stopping the instance removes the record.
            me.record = Some(Arc::new(RecordFile::create(path, rec.clone())?));
            let kind = LifecycleKind::Crash;
            let seq = match me.events.lifecycle(kind, &detail) {
                Ok(seq) => seq,
                Err(e) => {
                    tracing::warn!(instance = %me.instance, error = %display_chain(&e), "cannot record the crash");
                    0
                }
            };
            tracing::warn!(instance = %me.instance, seq, %detail, "the guest did not survive the agent restart; shipping what its spools hold");
            if let Some(h) = &me.on_note {
                h(
                    &me.instance,
                    &InstanceNote {
                        kind: Some(kind),
                        detail: detail.clone(),
                        seq,
                        wall_time_ns: now_wall_ns(),
                    },
                );
            }
        }
        Ok(Reattached {
            instance: me,
            guest_alive,
            detail,
        })
    }

    /// The event log, shippers and sensors over started (or adopted)
    /// backends.
    fn assemble(
        opts: &LaunchOptions,
        image: &MachineImage,
        dirs: &InstanceDirs,
        devices: Vec<DeviceInfo>,
        supervisor: Supervisor,
    ) -> Result<Self, InstanceError> {
        let seq_path = dirs.seq_file();
        let seq: Arc<dyn SeqSource> = Arc::new(
            FileSeq::open(&seq_path).map_err(|e| InstanceError::Seq(seq_path.clone(), e))?,
        );
        let events = Arc::new(EventLog::open(
            opts.instance.clone(),
            seq,
            EventLogConfig::new(dirs.agent_spool()),
        )?);
        let names: Vec<String> = devices
            .iter()
            .map(|d| d.name.clone())
            .chain(std::iter::once("agent".to_string()))
            .collect();
        let shipper_metrics: Vec<(String, Arc<ShipperMetrics>)> = names
            .iter()
            .map(|n| (n.clone(), Arc::new(ShipperMetrics::default())))
            .collect();
        let sensors = opts
            .sensors
            .as_ref()
            .filter(|c| c.enabled)
            .map(|c| (Sensors::probe(c), c.clone()));
        let me = RecordedInstance {
            instance: opts.instance.clone(),
            driver: opts.driver.clone(),
            image: image.clone(),
            endpoints: opts.endpoints.clone(),
            dirs: dirs.clone(),
            devices,
            guest: Mutex::new(None),
            supervisor: Mutex::new(Some(supervisor)),
            final_backends: Mutex::new(Vec::new()),
            shippers: Mutex::new(Vec::new()),
            shipper_metrics,
            events,
            sensors: Mutex::new(None),
            inventory: sensors.as_ref().map(|(s, _)| s.describe().clone()),
            forward_stop: Arc::new(AtomicBool::new(false)),
            forwarder: Mutex::new(None),
            stopped: AtomicBool::new(false),
            teardown_lock: Mutex::new(()),
            stop_grace: opts.stop_grace,
            drain_timeout: opts.drain_timeout,
            on_note: opts.on_note.clone(),
            record: None,
        };
        for (name, metrics) in &me.shipper_metrics {
            let dir = if name == "agent" {
                dirs.agent_spool()
            } else {
                dirs.spool(name)
            };
            let source =
                SpoolSource::open(&dir).map_err(|e| InstanceError::Spool(dir.clone(), e))?;
            let shipper = Shipper::new(
                ShipperOptions::for_spool(
                    &dir,
                    opts.instance.clone(),
                    opts.endpoints.clone(),
                    opts.shipper.clone(),
                ),
                source,
                metrics.clone(),
            )
            .map_err(|e| InstanceError::Shipper(name.clone(), e))?;
            let handle = ShipperHandle::spawn(shipper).map_err(InstanceError::Thread)?;
            lock(&me.shippers).push((name.clone(), handle));
        }
        if let Some((s, cfg)) = sensors {
            let poll = Duration::from_millis(cfg.poll_ms);
            let lp = SensorLoop::spawn(Schedule::new(s, &cfg), me.events.clone(), poll)
                .map_err(InstanceError::Thread)?;
            *lock(&me.sensors) = Some(lp);
        }
        Ok(me)
    }

    /// Takes the guest and forwards its lifecycle events into the event
    /// log.
    fn attach_guest(&self, guest: Arc<dyn Instance>) -> Result<(), InstanceError> {
        let sub = guest.subscribe();
        *lock(&self.guest) = Some(guest);
        let log = self.events.clone();
        let stop = self.forward_stop.clone();
        let id = self.instance.clone();
        let hook = self.on_note.clone();
        let forwarder = std::thread::Builder::new()
            .name("lifecycle-forward".into())
            .spawn(move || loop {
                match sub.recv_timeout(Duration::from_millis(100)) {
                    Some(ev) => {
                        let kind = ev.kind();
                        if !forwarded(kind) {
                            continue;
                        }
                        let seq = match log.lifecycle(kind, &ev.lifecycle.detail) {
                            Ok(seq) => seq,
                            Err(e) => {
                                tracing::warn!(instance = %id, ?kind, error = %display_chain(&e), "cannot record a lifecycle event");
                                0
                            }
                        };
                        tracing::info!(instance = %id, ?kind, seq, detail = %ev.lifecycle.detail, "lifecycle");
                        if let Some(h) = &hook {
                            h(
                                &id,
                                &InstanceNote {
                                    kind: Some(kind),
                                    detail: ev.lifecycle.detail.clone(),
                                    seq,
                                    wall_time_ns: ev.wall_time_ns,
                                },
                            );
                        }
                    }
                    None if stop.load(Ordering::Acquire) => break,
                    None => {}
                }
            })
            .map_err(InstanceError::Thread)?;
        *lock(&self.forwarder) = Some(forwarder);
        Ok(())
    }

    /// The record of the running instance now.
    fn new_record(&self, opts: &LaunchOptions, spec_pb: &[u8]) -> InstanceRecord {
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let info = self.guest().and_then(|g| g.query().ok());
        let in_agent = opts.driver == vmr_hypervisor::microvm::NAME;
        let work = self.dirs.root.join("work");
        let qemu = opts.driver == vmr_hypervisor::qemu::NAME;
        let mut rec = InstanceRecord {
            version: RECORD_VERSION,
            instance: self.instance.to_string(),
            driver: opts.driver.clone(),
            image_dir: abs(opts.image_dir.clone()),
            spec_pb: String::new(),
            launched_ns: opts.launched_ns,
            agent: ProcessRef::of(std::process::id()).unwrap_or(ProcessRef {
                pid: std::process::id(),
                start_time: 0,
            }),
            guest: GuestRecord {
                process: info.as_ref().and_then(|i| i.pid).and_then(ProcessRef::of),
                in_agent,
                accel: info
                    .as_ref()
                    .and_then(|i| i.accel.as_ref().map(|a| a.0.clone())),
                qmp: qemu.then(|| abs(work.join("qmp.sock"))),
                serial: qemu.then(|| abs(work.join("serial.sock"))),
                console: info
                    .as_ref()
                    .map(|i| abs(i.console_file.clone()))
                    .unwrap_or_default(),
                debugger: info
                    .as_ref()
                    .and_then(|i| i.debugger.as_ref())
                    .map(|d| match d {
                        DebugListen::Tcp(a) => format!("tcp:{a}"),
                        DebugListen::Unix(p) => format!("unix:{}", p.display()),
                    }),
            },
            backends: self
                .devices
                .iter()
                .map(|d| BackendRecord {
                    device: d.name.clone(),
                    kind: d.kind.name().to_string(),
                    process: None,
                    socket: abs(self.dirs.socket(&d.name)),
                    control: abs(d.control.clone()),
                    spool: abs(d.spool.clone()),
                    restarts: 0,
                })
                .collect(),
            agent_spool: abs(self.dirs.agent_spool()),
            seq_file: abs(self.dirs.seq_file()),
        };
        rec.set_spec_bytes(spec_pb);
        let status = self.backends();
        for b in &mut rec.backends {
            if let Some(s) = status.iter().find(|s| s.device == b.device) {
                b.process = s.pid.and_then(ProcessRef::of);
                b.restarts = s.restarts;
            }
        }
        rec
    }

    /// Keeps `rec` up to date with the backends' restarts.
    fn keep_record(&mut self, rec: RecordFile) {
        let rec = Arc::new(rec);
        let r = rec.clone();
        if let Some(s) = lock(&self.supervisor).as_ref() {
            s.on_restart(Arc::new(move |status| r.set_backends(status)));
        }
        self.record = Some(rec);
    }

    /// Replaces the spec kept in the instance record (after a capture
    /// filter change); without a record this does nothing.
    pub fn update_record_spec(&self, spec_pb: &[u8]) {
        if let Some(r) = &self.record {
            r.update(|rec| rec.set_spec_bytes(spec_pb));
        }
    }

    /// Waits until every spool's records are committed as shipped (none
    /// left unshipped), at most `timeout`; returns whether they are.
    pub fn wait_shipped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .spools()
                .iter()
                .all(|s| s.oldest_unshipped_wall_ns.is_none())
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The instance record, if one is kept.
    pub fn record(&self) -> Option<InstanceRecord> {
        self.record.as_ref().map(|r| r.get())
    }

    /// The instance.
    pub fn id(&self) -> &InstanceId {
        &self.instance
    }

    /// The driver's name.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The machine image it was launched from.
    pub fn image(&self) -> &MachineImage {
        &self.image
    }

    /// The Kafka cluster and Schema Registry it ships to.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Its directories under the data directory.
    pub fn dirs(&self) -> &InstanceDirs {
        &self.dirs
    }

    /// Its devices.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The guest, while it runs.
    pub fn guest(&self) -> Option<Arc<dyn Instance>> {
        lock(&self.guest).clone()
    }

    /// The guest's run state (`None` once the instance is stopped).
    pub fn run_state(&self) -> Option<RunState> {
        if self.stopped.load(Ordering::Acquire) {
            return None;
        }
        self.guest().and_then(|g| g.query().ok()).map(|i| i.state)
    }

    /// Whether [`Self::shutdown`] ran.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Pauses the guest.
    pub fn pause(&self) -> Result<(), InstanceError> {
        self.guest()
            .ok_or(InstanceError::Stopped)?
            .pause()
            .map_err(InstanceError::Driver)
    }

    /// Resumes the guest.
    pub fn resume(&self) -> Result<(), InstanceError> {
        self.guest()
            .ok_or(InstanceError::Stopped)?
            .resume()
            .map_err(InstanceError::Driver)
    }

    /// Each backend's state (once stopped: as it was at the stop, without
    /// pids).
    pub fn backends(&self) -> Vec<BackendStatus> {
        match lock(&self.supervisor).as_ref() {
            Some(s) => s.status(),
            None => lock(&self.final_backends).clone(),
        }
    }

    /// Runs `f` with the backend supervisor, while the instance runs.
    pub fn with_supervisor<T>(
        &self,
        f: impl FnOnce(&Supervisor) -> Result<T, SupervisorError>,
    ) -> Result<T, InstanceError> {
        let s = lock(&self.supervisor);
        let s = s.as_ref().ok_or(InstanceError::Stopped)?;
        f(s).map_err(InstanceError::Backends)
    }

    /// Changes what `device` records, now and for later backend restarts.
    pub fn set_filter(&self, device: &str, filter: CaptureFilter) -> Result<(), InstanceError> {
        self.with_supervisor(|s| s.set_filter(device, filter))
    }

    /// The filter `device` records with (`None`: everything).
    pub fn filter(&self, device: &str) -> Result<Option<CaptureFilter>, InstanceError> {
        self.with_supervisor(|s| s.filter(device))
    }

    /// A backend's counters (vhost-tap `metrics` JSON), if it answers.
    pub fn backend_metrics(&self, device: &str) -> Option<serde_json::Value> {
        self.with_supervisor(|s| s.backend_metrics(device)).ok()
    }

    /// The agent's event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// What the host sensor probe found (`None`: sensors off).
    pub fn sensors(&self) -> Option<&Inventory> {
        self.inventory.as_ref()
    }

    /// Each shipper's counters now, by source.
    pub fn shipper_metrics(&self) -> Vec<(String, MetricsSnapshot)> {
        self.shipper_metrics
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect()
    }

    /// The live counters of one source's shipper (a device, or `agent`).
    pub fn shipper_metrics_full(&self, source: &str) -> Option<Arc<ShipperMetrics>> {
        self.shipper_metrics
            .iter()
            .find(|(n, _)| n == source)
            .map(|(_, m)| m.clone())
    }

    /// Each spool's shipping progress now (devices, then `agent`).
    pub fn spools(&self) -> Vec<SpoolStatus> {
        self.shipper_metrics
            .iter()
            .map(|(n, m)| {
                let dir = if n == "agent" {
                    self.dirs.agent_spool()
                } else {
                    self.dirs.spool(n)
                };
                SpoolStatus {
                    source: n.clone(),
                    spool_bytes: dir_bytes(&dir),
                    oldest_unshipped_wall_ns: oldest_unshipped(&dir),
                    shipper: m.snapshot(),
                }
            })
            .collect()
    }

    /// Records an agent step (no guest event) for the note hook.
    pub fn note(&self, detail: &str) {
        if let Some(h) = &self.on_note {
            h(
                &self.instance,
                &InstanceNote {
                    kind: None,
                    detail: detail.to_string(),
                    seq: 0,
                    wall_time_ns: now_wall_ns(),
                },
            );
        }
    }

    /// Stops the instance; see [`Self::shutdown`].
    pub fn stop(self) -> StopReport {
        self.shutdown()
    }

    /// Stops the guest (`stop_grace`), the lifecycle forwarder, the
    /// sensors, the backends, and then the shippers once they have read and
    /// acknowledged what the spools hold (at most `drain_timeout`; what is
    /// left stays in the spools for the next run). A second call returns
    /// at once with an empty report.
    pub fn shutdown(&self) -> StopReport {
        let _one = lock(&self.teardown_lock);
        if self.stopped.load(Ordering::Acquire) {
            return StopReport {
                exit: Err(DriverError::Gone("the instance was already stopped".into())),
                shippers: Vec::new(),
            };
        }
        let guest = lock(&self.guest).take();
        let exit = match guest {
            Some(g) => g.stop(self.stop_grace),
            None => Err(DriverError::Gone("the guest was never launched".into())),
        };
        // Let the forwarder take the final events (Shutdown, Crash) first.
        self.forward_stop.store(true, Ordering::Release);
        if let Some(f) = lock(&self.forwarder).take() {
            let _ = f.join();
        }
        if let Some(s) = lock(&self.sensors).take() {
            s.stop();
        }
        if let Some(s) = lock(&self.supervisor).take() {
            *lock(&self.final_backends) = s
                .status()
                .into_iter()
                .map(|b| BackendStatus { pid: None, ..b })
                .collect();
            s.stop();
        }
        self.drain();
        let mut shippers = Vec::new();
        for (name, h) in lock(&self.shippers).drain(..) {
            let m = h.metrics().clone();
            h.stop();
            shippers.push((name, m.snapshot()));
        }
        self.stopped.store(true, Ordering::Release);
        if let Some(r) = &self.record {
            r.remove();
        }
        tracing::info!(instance = %self.instance, "recorded instance stopped");
        self.note("stopped");
        StopReport { exit, shippers }
    }

    /// Waits until no shipper has read anything new or has records in
    /// flight for a while, at most `drain_timeout`.
    fn drain(&self) {
        let quiet_for = Duration::from_millis(1500);
        let deadline = Instant::now() + self.drain_timeout;
        let read = |s: &Self| -> Vec<(u64, u64)> {
            s.shipper_metrics
                .iter()
                .map(|(_, m)| {
                    let m = m.snapshot();
                    (m.records_read, m.in_flight)
                })
                .collect()
        };
        let mut last = read(self);
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = read(self);
            if now != last {
                last = now;
                since = Instant::now();
            } else if last.iter().all(|&(_, f)| f == 0) && since.elapsed() >= quiet_for {
                return;
            }
        }
        tracing::warn!(instance = %self.instance, "shippers still busy at the drain timeout; the rest stays in the spools");
    }
}

impl Drop for RecordedInstance {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Acquire) {
            let _ = self.shutdown();
        }
    }
}
