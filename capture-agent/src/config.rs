//! The agent's configuration file (TOML).
//!
//! Every table rejects unknown keys, and every key has a default, so an empty
//! file is a valid configuration. `config/capture-agent.example.toml` shows
//! every key with its default and is parsed by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vmr_proto::config::{Endpoints, EndpointsError};

/// Errors loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid endpoints")]
    Endpoints(#[from] EndpointsError),
    #[error("{0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// Where the Kafka cluster and the Schema Registry are.
    #[serde(default)]
    pub endpoints: Endpoints,
    /// How spools are shipped to Kafka.
    #[serde(default)]
    pub shipper: ShipperConfig,
    /// Which host sensors are read, and how often.
    #[serde(default)]
    pub sensors: SensorsConfig,
    /// The gRPC service, the metrics endpoint and where instances live.
    #[serde(default)]
    pub agent: ServiceConfig,
    /// How devices record by default (a launch request may override it).
    #[serde(default)]
    pub capture: CaptureConfig,
    /// The snapshot engine of `serve`: store, retention, schedule.
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.endpoints.validate()?;
        self.shipper.validate()?;
        self.sensors.validate()?;
        self.agent.validate()?;
        self.capture.validate()?;
        self.snapshots.validate()?;
        Ok(())
    }
}

/// The snapshot engine of `capture-agent serve`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SnapshotsConfig {
    /// Run the engine at all; `false`: the snapshot RPCs answer
    /// `UNIMPLEMENTED`.
    pub enabled: bool,
    /// The store, `file:///absolute/path` or `s3://bucket[/prefix]`
    /// (S3 endpoint and credentials from the environment). Unset: the
    /// `[endpoints] object-store-url` when the file or
    /// `VMR_OBJECT_STORE_URL` sets it, else
    /// `file://<data-dir>/.snapshots/store`.
    pub store_url: Option<String>,
    /// On a `file://` store, fsync each object before the manifest.
    pub fsync: bool,
    /// Where driver snapshots and layers are staged before upload
    /// (default `<data-dir>/.snapshots/staging`).
    pub staging_dir: Option<PathBuf>,
    /// Where pins are kept (default `<data-dir>/.snapshots/state`).
    pub state_dir: Option<PathBuf>,
    /// Retention: keep the newest N (unset: no count limit).
    pub keep_last: Option<usize>,
    /// Retention: keep those cut within this many seconds (unset: no age
    /// limit). With neither rule set every snapshot is kept; pinned ones
    /// always are.
    pub keep_within_secs: Option<u64>,
    /// Period of scheduled snapshots of an instance whose launch request
    /// gives no `snapshot_interval_secs` (seconds; 0: only on demand).
    pub period_secs: u64,
    /// How long a device backend may take to answer its checkpoint (s).
    pub checkpoint_timeout_secs: u64,
    /// Bound on the broker requests of a snapshot (offsets, publishing; s).
    pub broker_timeout_secs: u64,
    /// Publish each manifest on `vmr.snapshots.v1`.
    pub publish: bool,
    /// Upload bandwidth limit per snapshot upload, bytes per second
    /// (unset: as fast as the store takes it), so uploads do not starve the
    /// host's other traffic.
    pub max_upload_bytes_per_sec: Option<u64>,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store_url: None,
            fsync: true,
            staging_dir: None,
            state_dir: None,
            keep_last: None,
            keep_within_secs: None,
            period_secs: 0,
            checkpoint_timeout_secs: 10,
            broker_timeout_secs: 10,
            publish: true,
            max_upload_bytes_per_sec: None,
        }
    }
}

impl SnapshotsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("snapshots: {m}")));
        if let Some(u) = &self.store_url {
            if !(u.starts_with("file://") || u.starts_with("s3://")) {
                return bad("store-url must be file:///absolute/path or s3://bucket[/prefix]");
            }
        }
        if self.keep_last == Some(0) {
            return bad("keep-last must be positive (leave it out to keep any number)");
        }
        if self.keep_within_secs == Some(0) {
            return bad("keep-within-secs must be positive (leave it out for no age limit)");
        }
        if self.max_upload_bytes_per_sec == Some(0) {
            return bad("max-upload-bytes-per-sec must be positive (leave it out for no limit)");
        }
        if self.checkpoint_timeout_secs == 0 || self.broker_timeout_secs == 0 {
            return bad("checkpoint-timeout-secs and broker-timeout-secs must be positive");
        }
        for (k, d) in [
            ("staging-dir", &self.staging_dir),
            ("state-dir", &self.state_dir),
        ] {
            if d.as_ref().is_some_and(|d| d.is_relative()) {
                return Err(ConfigError::Invalid(format!(
                    "snapshots: {k} must be an absolute path"
                )));
            }
        }
        Ok(())
    }
}

/// Settings of `capture-agent serve`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServiceConfig {
    /// Address of the gRPC service (`vmr.v1.CaptureAgent`, health,
    /// reflection).
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint serving Prometheus `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Data directory; instance `<id>` lives in `<data-dir>/<id>/` (its
    /// disks, spools, sequence file, backend logs). Not on tmpfs: the
    /// sequence file must survive a host restart.
    pub data_dir: PathBuf,
    /// Directories holding machine images: image `<name>` is
    /// `<dir>/<name>/image.toml`, the first directory that has it wins.
    pub image_dirs: Vec<PathBuf>,
    /// Directory holding `vhost-tap-blk` and `vhost-tap-net` (default: next
    /// to the agent's executable, then `$PATH`).
    pub backend_dir: Option<PathBuf>,
    /// QEMU binary (default: the driver's, `qemu-system-x86_64` on `$PATH`).
    pub qemu_binary: Option<PathBuf>,
    /// How long a stopping guest may take to power off before it is killed
    /// (seconds).
    pub stop_grace_secs: u64,
    /// How long a stopping instance waits for its shippers to ship what
    /// the spools hold (seconds); the rest stays in the spools.
    pub drain_timeout_secs: u64,
    /// Most instances this agent runs at once.
    pub max_instances: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            data_dir: PathBuf::from("/var/lib/vmreplay/instances"),
            image_dirs: vec![PathBuf::from("/var/lib/vmreplay/images")],
            backend_dir: None,
            qemu_binary: None,
            stop_grace_secs: 10,
            drain_timeout_secs: 30,
            max_instances: 64,
        }
    }
}

impl ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("agent: {m}")));
        if self.image_dirs.is_empty() {
            return bad("image-dirs must name at least one directory");
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return bad("listen and metrics-listen must differ");
        }
        if self.max_instances == 0 {
            return bad("max-instances must be positive");
        }
        Ok(())
    }
}

/// What a device does when its spool is full because shipping stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpoolFull {
    /// The guest's I/O waits, at most `block-bound-ms`; past it records
    /// are dropped with a GAP event until the spool takes records again.
    Block,
    /// Records that do not fit are dropped at once, with a GAP event.
    Drop,
}

impl SpoolFull {
    /// The backends' `--capture-policy` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Drop => "drop",
        }
    }
}

/// Default capture policy of the devices.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CaptureConfig {
    /// block or drop.
    pub spool_full: SpoolFull,
    /// Under `block`, the longest one guest request waits for a full spool
    /// (ms).
    pub block_bound_ms: u64,
    /// Most MiB each device's spool holds.
    pub spool_retain_mib: u64,
    /// Size of one spool segment, MiB.
    pub spool_segment_mib: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            spool_full: SpoolFull::Block,
            block_bound_ms: 5000,
            spool_retain_mib: 256,
            spool_segment_mib: 16,
        }
    }
}

impl CaptureConfig {
    /// Checks the values (also those of a launch request's policy).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("capture: {m}")));
        if self.block_bound_ms == 0 {
            return bad("block-bound-ms must be positive");
        }
        if self.spool_segment_mib == 0 || self.spool_retain_mib < 2 * self.spool_segment_mib {
            return bad("spool-retain-mib must hold at least two segments of spool-segment-mib");
        }
        Ok(())
    }

    /// `block-bound-ms` as a duration.
    pub fn block_bound(&self) -> Duration {
        Duration::from_millis(self.block_bound_ms)
    }
}

/// Compression of record batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Zstd,
    Lz4,
    None,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
            Self::None => "none",
        }
    }
}

/// Settings of the Kafka shipper.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ShipperConfig {
    /// Compression of record batches: zstd, lz4 or none.
    pub compression: Compression,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    pub linger_ms: u64,
    /// Largest batch of records sent to one partition in one request
    /// (librdkafka `batch.size`), bytes.
    pub batch_bytes: u64,
    /// Largest record the producer sends (`message.max.bytes`); the block
    /// topic accepts 8 MiB.
    pub max_message_bytes: u64,
    /// Records handed to the producer and not yet acknowledged, at most.
    pub max_in_flight_records: usize,
    /// Value bytes handed to the producer and not yet acknowledged, at most
    /// (MiB).
    pub max_in_flight_mib: u64,
    /// How often the acknowledged position is committed to the spool (ms).
    pub commit_interval_ms: u64,
    /// How long the shipper sleeps when it has caught up with the writer (ms).
    pub idle_poll_ms: u64,
    /// Register the event schemas under `<topic>-value` if missing (true), or
    /// only look up the ids of schemas registered beforehand, for example
    /// by `schema-registry register` (false).
    pub register_schemas: bool,
    /// First wait before a failed session (broker or registry unreachable,
    /// delivery failed) is retried (ms); it doubles up to `retry-max-ms`.
    pub retry_initial_ms: u64,
    /// Longest wait between retries (ms).
    pub retry_max_ms: u64,
    /// Bound on each broker request at start (metadata, watermarks) and on
    /// the scan of the partition tails (seconds).
    pub request_timeout_secs: u64,
    /// How long a stopping shipper waits for outstanding acknowledgements
    /// before it exits; what is not acknowledged then is shipped again (and
    /// recognised as already there) by the next run (seconds).
    pub shutdown_timeout_secs: u64,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        Self {
            compression: Compression::Zstd,
            linger_ms: 5,
            batch_bytes: 1 << 20,
            max_message_bytes: vmr_proto::topics::BLOCK_MAX_MESSAGE_BYTES as u64,
            max_in_flight_records: 100_000,
            max_in_flight_mib: 128,
            commit_interval_ms: 200,
            idle_poll_ms: 20,
            register_schemas: false,
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
            request_timeout_secs: 30,
            shutdown_timeout_secs: 10,
        }
    }
}

impl ShipperConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("shipper: {m}")));
        if self.max_in_flight_records == 0 {
            return bad("max-in-flight-records must be positive");
        }
        if self.max_in_flight_mib == 0 {
            return bad("max-in-flight-mib must be positive");
        }
        if self.max_message_bytes < 1024 {
            return bad("max-message-bytes must be at least 1024");
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return bad("retry-initial-ms must be positive and at most retry-max-ms");
        }
        if self.request_timeout_secs == 0 {
            return bad("request-timeout-secs must be positive");
        }
        Ok(())
    }

    /// `request-timeout-secs` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Kinds of host sensors.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SensorKind {
    /// `<sys>/class/hwmon/*`: temperatures, fans, voltages, currents, power.
    Hwmon,
    /// `<sys>/class/thermal/thermal_zone*`: thermal zone temperatures.
    Thermal,
    /// `<sys>/class/power_supply/*`: batteries and adapters.
    PowerSupply,
    /// `<proc>/pressure/{cpu,memory,io}`: pressure stall information.
    Pressure,
}

impl SensorKind {
    /// Every kind.
    pub const ALL: [SensorKind; 4] = [
        SensorKind::Hwmon,
        SensorKind::Thermal,
        SensorKind::PowerSupply,
        SensorKind::Pressure,
    ];

    /// The kind's name in configuration and sensor names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hwmon => "hwmon",
            Self::Thermal => "thermal",
            Self::PowerSupply => "power_supply",
            Self::Pressure => "pressure",
        }
    }
}

/// A rule that emits a sample between the periodic ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TriggerConfig {
    /// Sensor name, or a prefix ending in `*` (for example `thermal.*`).
    pub sensor: String,
    /// Emit when the value moved at least this much since it was last
    /// emitted.
    #[serde(default)]
    pub change: Option<f64>,
    /// Emit when the value rises to or above this.
    #[serde(default)]
    pub above: Option<f64>,
    /// Emit when the value falls to or below this.
    #[serde(default)]
    pub below: Option<f64>,
}

/// Settings of the host sensors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SensorsConfig {
    /// Read sensors at all.
    pub enabled: bool,
    /// Kinds to read.
    pub kinds: Vec<SensorKind>,
    /// Every reading is emitted this often (seconds).
    pub interval_secs: u64,
    /// Sensors are read this often to check the triggers (ms).
    pub poll_ms: u64,
    /// Root of sysfs (tests point it at a tree they build).
    pub sys_root: PathBuf,
    /// Root of procfs.
    pub proc_root: PathBuf,
    /// Threshold and change triggers.
    #[serde(rename = "trigger")]
    pub triggers: Vec<TriggerConfig>,
}

impl Default for SensorsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            kinds: SensorKind::ALL.to_vec(),
            interval_secs: 10,
            poll_ms: 1000,
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            triggers: Vec::new(),
        }
    }
}

impl SensorsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_secs == 0 || self.poll_ms == 0 {
            return Err(ConfigError::Invalid(
                "sensors: interval-secs and poll-ms must be positive".into(),
            ));
        }
        for t in &self.triggers {
            if t.change.is_none() && t.above.is_none() && t.below.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "sensors: trigger for {:?} needs change, above or below",
                    t.sensor
                )));
            }
            if t.change.is_some_and(|c| c.is_nan() || c <= 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "sensors: trigger for {:?} needs a positive change",
                    t.sensor
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(c.shipper, ShipperConfig::default());
        assert_eq!(c.sensors, SensorsConfig::default());
        assert_eq!(c.agent, ServiceConfig::default());
        assert_eq!(c.capture, CaptureConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(AgentConfig::parse("[shipper]\nlinger = 5").is_err());
        assert!(AgentConfig::parse("[shipper]\ncompression = \"gzip\"").is_err());
        assert!(AgentConfig::parse("[shipper]\nmax-in-flight-records = 0").is_err());
        assert!(AgentConfig::parse("[[sensors.trigger]]\nsensor = \"x\"").is_err());
        assert!(AgentConfig::parse("[sensors]\nkinds = [\"gpu\"]").is_err());
        assert!(AgentConfig::parse("[agent]\nlisten = \"nowhere\"").is_err());
        assert!(AgentConfig::parse("[agent]\nimage-dirs = []").is_err());
        assert!(AgentConfig::parse("[agent]\nport = 1").is_err());
        assert!(AgentConfig::parse("[capture]\nspool-full = \"wait\"").is_err());
        assert!(AgentConfig::parse("[capture]\nblock-bound-ms = 0").is_err());
        assert!(AgentConfig::parse("[capture]\nspool-retain-mib = 16").is_err());
    }
}
