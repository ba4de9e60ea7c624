//! A recorded instance: its supervised device backends, one shipper per
//! spool, the agent's event log, and the guest under a hypervisor driver.
//!
//! [`RecordedInstance::launch`] starts, in order: the backends (through the
//! [`Supervisor`]), a [`Shipper`] per device spool and one over the agent's
//! [`EventLog`] spool, the guest, and a thread that forwards the driver's
//! lifecycle events into the event log. [`RecordedInstance::stop`] tears it
//! down the other way round: guest, forwarder, backends, then the shippers
//! once they have shipped what the spools hold (bounded).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_tap::seq::{FileSeq, SeqSource};
use vmr_hypervisor::image::{DiskSource, MachineImage};
use vmr_hypervisor::{Accel, DriverError, ExitInfo, Instance};
use vmr_proto::domain::LifecycleKind;
use vmr_proto::InstanceId;

use crate::config::ShipperConfig;
use crate::events::{EventLog, EventLogConfig, EventsError};
use crate::metrics::{MetricsSnapshot, ShipperMetrics};
use crate::shipper::{display_chain, Shipper, ShipperHandle, ShipperOptions};
use crate::source::{SourceError, SpoolSource};
use crate::supervisor::{BackendKind, BackendSpec, Supervisor, SupervisorConfig, SupervisorError};
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
}

/// How to launch a recorded instance.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The machine image directory (with `image.toml`).
    pub image_dir: PathBuf,
    /// The instance.
    pub instance: InstanceId,
    /// Driver name (`qemu`).
    pub driver: String,
    /// Data directory; the instance lives in `<data>/<instance>/`.
    pub data_dir: PathBuf,
    /// Network namespace the NICs' TAPs live in.
    pub netns: Option<String>,
    /// TAP name per NIC: `<tap_prefix><index>` (default `vmrtap`).
    pub tap_prefix: String,
    /// Kafka and Schema Registry.
    pub endpoints: Endpoints,
    /// Shipper settings (one shipper per spool).
    pub shipper: ShipperConfig,
    /// Backend supervision settings.
    pub supervisor: SupervisorConfig,
    /// QEMU acceleration.
    pub accel: Accel,
    /// QEMU binary (default: the driver's).
    pub qemu_binary: Option<PathBuf>,
    /// How long `stop` lets the guest shut down before it is killed.
    pub stop_grace: Duration,
    /// How long `stop` waits for the shippers to ship what the spools hold.
    pub drain_timeout: Duration,
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
            endpoints: Endpoints::default(),
            shipper: ShipperConfig::default(),
            supervisor: SupervisorConfig::default(),
            accel: Accel::default(),
            qemu_binary: None,
            stop_grace: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
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

/// A running recorded instance. Dropping it stops it.
pub struct RecordedInstance {
    instance: InstanceId,
    guest: Option<Arc<dyn Instance>>,
    supervisor: Option<Supervisor>,
    shippers: Vec<(String, ShipperHandle)>,
    events: Arc<EventLog>,
    forward_stop: Arc<AtomicBool>,
    forwarder: Option<JoinHandle<()>>,
    stop_grace: Duration,
    drain_timeout: Duration,
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
        let dirs = crate::supervisor::InstanceDirs::new(&opts.data_dir, &opts.instance);
        std::fs::create_dir_all(&dirs.root).map_err(|source| InstanceError::Disk {
            path: dirs.root.clone(),
            source,
        })?;
        let mut devices = Vec::new();
        for d in &image.disks {
            let path = dirs.root.join(format!("{}.img", d.name));
            make_disk(&d.source, &path).map_err(|source| InstanceError::Disk {
                path: path.clone(),
                source,
            })?;
            devices.push(BackendSpec {
                device: d.name.clone(),
                kind: BackendKind::Blk { image: path },
                extra_args: Vec::new(),
            });
        }
        for (i, n) in image.nics.iter().enumerate() {
            devices.push(BackendSpec {
                device: n.name.clone(),
                kind: BackendKind::Net {
                    tap: format!("{}{i}", opts.tap_prefix),
                    netns: opts.netns.clone(),
                },
                extra_args: Vec::new(),
            });
        }
        let device_names: Vec<String> = devices.iter().map(|d| d.device.clone()).collect();
        let supervisor = Supervisor::start(
            opts.instance.clone(),
            &opts.data_dir,
            devices,
            opts.supervisor.clone(),
        )?;
        let seq_path = dirs.seq_file();
        let seq: Arc<dyn SeqSource> = Arc::new(
            FileSeq::open(&seq_path).map_err(|e| InstanceError::Seq(seq_path.clone(), e))?,
        );
        let events = Arc::new(EventLog::open(
            opts.instance.clone(),
            seq,
            EventLogConfig::new(dirs.agent_spool()),
        )?);
        let mut me = RecordedInstance {
            instance: opts.instance.clone(),
            guest: None,
            supervisor: Some(supervisor),
            shippers: Vec::new(),
            events,
            forward_stop: Arc::new(AtomicBool::new(false)),
            forwarder: None,
            stop_grace: opts.stop_grace,
            drain_timeout: opts.drain_timeout,
        };
        for name in device_names
            .iter()
            .cloned()
            .chain(std::iter::once("agent".to_string()))
        {
            let dir = if name == "agent" {
                dirs.agent_spool()
            } else {
                dirs.spool(&name)
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
                Arc::new(ShipperMetrics::default()),
            )
            .map_err(|e| InstanceError::Shipper(name.clone(), e))?;
            let handle = ShipperHandle::spawn(shipper).map_err(InstanceError::Thread)?;
            me.shippers.push((name, handle));
        }
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
        let guest: Arc<dyn Instance> =
            Arc::from(driver.launch(&spec).map_err(InstanceError::Driver)?);
        let sub = guest.subscribe();
        me.guest = Some(guest);
        let log = me.events.clone();
        let stop = me.forward_stop.clone();
        let id = opts.instance.clone();
        let forwarder = std::thread::Builder::new()
            .name("lifecycle-forward".into())
            .spawn(move || loop {
                match sub.recv_timeout(Duration::from_millis(100)) {
                    Some(ev) => {
                        let kind = ev.kind();
                        if !forwarded(kind) {
                            continue;
                        }
                        if let Err(e) = log.lifecycle(kind, &ev.lifecycle.detail) {
                            tracing::warn!(instance = %id, ?kind, error = %display_chain(&e), "cannot record a lifecycle event");
                        }
                    }
                    None if stop.load(Ordering::Acquire) => break,
                    None => {}
                }
            })
            .map_err(InstanceError::Thread)?;
        me.forwarder = Some(forwarder);
        tracing::info!(instance = %me.instance, driver = %opts.driver, "recorded instance running");
        Ok(me)
    }

    /// The instance.
    pub fn id(&self) -> &InstanceId {
        &self.instance
    }

    /// The guest, while it runs.
    pub fn guest(&self) -> Option<&Arc<dyn Instance>> {
        self.guest.as_ref()
    }

    /// The backend supervisor, while it runs.
    pub fn supervisor(&self) -> Option<&Supervisor> {
        self.supervisor.as_ref()
    }

    /// The agent's event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Each shipper's counters now, by source.
    pub fn shipper_metrics(&self) -> Vec<(String, MetricsSnapshot)> {
        self.shippers
            .iter()
            .map(|(n, h)| (n.clone(), h.metrics().snapshot()))
            .collect()
    }

    /// Stops the guest (`stop_grace`), the lifecycle forwarder, the
    /// backends, and then the shippers once they have read and acknowledged
    /// what the spools hold (at most `drain_timeout`; what is left stays in
    /// the spools for the next run).
    pub fn stop(mut self) -> StopReport {
        self.teardown()
    }

    fn teardown(&mut self) -> StopReport {
        let exit = match self.guest.take() {
            Some(g) => g.stop(self.stop_grace),
            None => Err(DriverError::Gone("the guest was never launched".into())),
        };
        // Let the forwarder take the final events (Shutdown, Crash) first.
        self.forward_stop.store(true, Ordering::Release);
        if let Some(f) = self.forwarder.take() {
            let _ = f.join();
        }
        if let Some(s) = self.supervisor.take() {
            s.stop();
        }
        self.drain();
        let mut shippers = Vec::new();
        for (name, h) in self.shippers.drain(..) {
            let m = h.metrics().clone();
            h.stop();
            shippers.push((name, m.snapshot()));
        }
        tracing::info!(instance = %self.instance, "recorded instance stopped");
        StopReport { exit, shippers }
    }

    /// Waits until no shipper has read anything new or has records in
    /// flight for a while, at most `drain_timeout`.
    fn drain(&self) {
        let quiet_for = Duration::from_millis(1500);
        let deadline = Instant::now() + self.drain_timeout;
        let read = |s: &Self| -> Vec<(u64, u64)> {
            s.shippers
                .iter()
                .map(|(_, h)| {
                    let m = h.metrics().snapshot();
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
        if self.guest.is_some() || self.supervisor.is_some() || !self.shippers.is_empty() {
            let _ = self.teardown();
        }
    }
}
