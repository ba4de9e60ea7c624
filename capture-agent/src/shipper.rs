//! The Kafka shipper: sends every event of one [`RecordSource`] (a device's
//! spool, or the agent's own event log) to its topic, exactly once.
//!
//! # Records
//!
//! Each event becomes one record on the topic of its payload
//! (`vmr.block.v1`, `vmr.net.v1`, `vmr.env.v1`, `vmr.lifecycle.v1`), keyed
//! by the instance id, on the partition `partition_for(instance, n)` where
//! `n` is the partition count the broker reports for that topic. The value
//! is the protobuf `Event` in the Confluent wire format, with the id of the
//! schema registered under `<topic>-value`. The record timestamp is the
//! capture's wall time. Headers (ASCII):
//!
//! | header | value |
//! | --- | --- |
//! | `vmr.seq` | the event's `seq` |
//! | `vmr.epoch` | the event's `epoch` |
//! | `vmr.source` | the shipper's source name (stable per spool) |
//! | `vmr.position` | `<segment>:<offset>`, the spool position after the event |
//!
//! # Delivery
//!
//! The producer is idempotent (`acks=all`, gapless), never times a record
//! out (it retries, with backoff, for as long as the broker is away) and
//! keeps many records in flight. The position of an event is committed to
//! the source only once the broker acknowledged it and every event before
//! it; only then may the spool recycle the segment. While the broker is
//! away nothing is acknowledged, the in-flight window fills, the shipper
//! stops reading, and the spool buffers.
//!
//! # Restart
//!
//! A session starts by finding what is already in Kafka: for each event
//! topic the source ever sent to, it reads the instance's partition from the
//! offset noted in the shipper's state file (written just before each
//! commit, and before the first record goes to a new topic) to the end, and
//! takes the last `vmr.position` of its own source. Without a state file
//! and without a commit nothing was sent and nothing is scanned; with a
//! commit but no usable state file every event topic is scanned whole. Events at or before that
//! position on that topic are not sent again. Since the producer delivers in
//! order per partition and a session ends at its first failed delivery,
//! what a topic holds of a source is a prefix of what was sent, so this
//! finds exactly where each topic stopped. Any failure (broker unreachable,
//! registry unreachable or refusing, delivery failed, fatal producer error)
//! ends the session; the next one starts after a backoff that doubles up to
//! `retry-max-ms`, with a fresh producer and a fresh look at the tails.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schema_registry::api::SchemaRequest;
use schema_registry::client::RegistryClient;
use vmr_proto::config::Endpoints;
use vmr_proto::{pb, topics, InstanceId};

use crate::config::ShipperConfig;
use crate::metrics::ShipperMetrics;
use crate::source::{at_or_before, later, Position, RecordSource, SourceItem};

/// Header with the event's `seq`.
pub const HEADER_SEQ: &str = "vmr.seq";
/// Header with the event's `epoch`.
pub const HEADER_EPOCH: &str = "vmr.epoch";
/// Header with the shipper's source name.
pub const HEADER_SOURCE: &str = "vmr.source";
/// Header with the spool position after the event.
pub const HEADER_POSITION: &str = "vmr.position";

/// Errors of a shipper.
#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error("invalid source name {0:?}: use 1 to 128 characters from [A-Za-z0-9._-]")]
    SourceName(String),
    #[error("cannot open the record source")]
    Source(#[from] crate::source::SourceError),
    #[error("cannot start the registry client")]
    Registry(#[from] schema_registry::client::ClientError),
    #[error("cannot start the async runtime for registry calls")]
    Runtime(#[source] std::io::Error),
}

/// Why a session ended (it is retried).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("schema registry at {url}: {detail}")]
    Registry { url: String, detail: String },
    #[error("cannot create the Kafka client")]
    Client(#[source] KafkaError),
    #[error("broker request failed ({what})")]
    Broker {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "topic {0} does not exist on the cluster (create it, for example with scripts/stack.sh)"
    )]
    NoTopic(String),
    #[error("scanning {topic} for records already shipped did not finish within {secs} s")]
    ScanTimeout { topic: String, secs: u64 },
    #[error("delivery of seq {seq} to {topic} failed: {detail}")]
    Delivery {
        seq: u64,
        topic: &'static str,
        detail: String,
    },
    #[error("the producer refused a record")]
    Produce(#[source] KafkaError),
    #[error("the producer hit a fatal error: {0}")]
    Fatal(String),
    #[error("reading the source failed")]
    Source(#[from] crate::source::SourceError),
    #[error("cannot write the shipper state")]
    State(#[source] std::io::Error),
}

/// What to ship, and where.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// The instance whose events the source holds; events of another
    /// instance are refused and counted.
    pub instance: InstanceId,
    /// Names this source in the `vmr.source` header; it must stay the same
    /// for a spool across restarts (the default is the spool directory's
    /// name).
    pub source_name: String,
    /// Kafka and registry addresses.
    pub endpoints: Endpoints,
    /// Producer and retry settings.
    pub config: ShipperConfig,
    /// The shipper's state file (per-topic offsets to resume the tail scan
    /// from); by default `shipper.json` in the spool directory.
    pub state_file: PathBuf,
}

impl ShipperOptions {
    /// Options for the spool in `dir`: source name from the directory
    /// name, state file inside it.
    pub fn for_spool(
        dir: &Path,
        instance: InstanceId,
        endpoints: Endpoints,
        config: ShipperConfig,
    ) -> Self {
        let source_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("spool")
            .to_owned();
        Self {
            instance,
            source_name,
            endpoints,
            config,
            state_file: dir.join(STATE_FILE),
        }
    }
}

/// Default name of the shipper's state file in a spool directory.
pub const STATE_FILE: &str = "shipper.json";

/// The shipper's state file: where its records are in Kafka, as of the last
/// commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperState {
    /// The source name the offsets belong to.
    pub source: String,
    /// Position committed with this state.
    pub position: Option<Position>,
    /// Per topic: every record of this source after `position` lies at or
    /// after this offset of the instance's partition.
    pub offsets: BTreeMap<String, i64>,
    /// Topics this source ever sent to (written before the first record
    /// to a new topic is sent); only these are scanned at a restart.
    #[serde(default)]
    pub topics: Vec<String>,
}

/// The state file: `Ok(None)` when there is none, `Err` when it cannot be
/// used.
fn read_state(path: &Path) -> Result<Option<ShipperState>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn write_state(path: &Path, state: &ShipperState) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(state).expect("the state always serialises"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Result of one delivery, reported by the producer's callback.
type Delivery = (usize, Result<(i32, i64), String>);

/// The Kafka client context: counts errors, logs through `tracing`, and
/// collects delivery reports.
struct ShipperContext {
    metrics: Arc<ShipperMetrics>,
    deliveries: Mutex<Vec<Delivery>>,
    fatal: Mutex<Option<String>>,
    instance: String,
}

impl ClientContext for ShipperContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(instance = %self.instance, facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(instance = %self.instance, facility = fac, "librdkafka: {log_message}")
            }
            _ => {
                tracing::debug!(instance = %self.instance, facility = fac, "librdkafka: {log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        ShipperMetrics::add(&self.metrics.broker_errors, 1);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
        }
        tracing::warn!(instance = %self.instance, %error, reason, "kafka client error");
    }
}

impl ProducerContext for ShipperContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let r = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.to_string()),
        };
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, r));
    }
}

/// The topic of an event's payload.
fn topic_of(event: &pb::Event) -> Option<&'static str> {
    use pb::event::Payload as P;
    match event.payload.as_ref()? {
        P::Block(_) => Some(topics::BLOCK),
        P::Net(_) => Some(topics::NET),
        P::Env(_) => Some(topics::ENV),
        P::Lifecycle(_) => Some(topics::LIFECYCLE),
    }
}

/// One event handed to the producer (or settled without sending).
struct Pending {
    position: Position,
    seq: u64,
    topic: Option<&'static str>,
    bytes: u64,
    /// `Some(offset)` once acknowledged (`-1`: settled without a record).
    offset: Option<i64>,
}

/// Where a session starts: the base position and, per topic, the last
/// position already in Kafka.
#[derive(Debug, Default)]
struct Resume {
    base: Option<Position>,
    last: BTreeMap<&'static str, Position>,
    next_scan: BTreeMap<String, i64>,
    /// Topics this source has sent to.
    topics: Vec<String>,
}

/// Schema id and message indexes of one topic.
#[derive(Debug, Clone)]
struct Schema {
    id: u32,
    indexes: Vec<i32>,
}

/// Ships one source (see the module documentation).
pub struct Shipper<S: RecordSource> {
    opts: ShipperOptions,
    source: S,
    metrics: Arc<ShipperMetrics>,
    registry: RegistryClient,
    runtime: tokio::runtime::Runtime,
}

impl<S: RecordSource> Shipper<S> {
    /// A shipper of `source`; nothing is contacted before [`Shipper::run`].
    pub fn new(
        opts: ShipperOptions,
        source: S,
        metrics: Arc<ShipperMetrics>,
    ) -> Result<Self, ShipperError> {
        if InstanceId::new(opts.source_name.clone()).is_err() {
            return Err(ShipperError::SourceName(opts.source_name));
        }
        let registry = RegistryClient::new(&opts.endpoints.registry_url)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ShipperError::Runtime)?;
        Ok(Self {
            opts,
            source,
            metrics,
            registry,
            runtime,
        })
    }

    /// The shipper's counters.
    pub fn metrics(&self) -> &Arc<ShipperMetrics> {
        &self.metrics
    }

    /// Ships until `stop` is set: sessions are retried after failures with
    /// backoff. On stop, waits up to `shutdown-timeout-secs` for the records
    /// in flight and commits what was acknowledged.
    pub fn run(&mut self, stop: &AtomicBool) {
        let cfg = &self.opts.config;
        let mut backoff = Duration::from_millis(cfg.retry_initial_ms);
        let max = Duration::from_millis(cfg.retry_max_ms);
        while !stop.load(Ordering::Acquire) {
            ShipperMetrics::add(&self.metrics.sessions, 1);
            let started = Instant::now();
            match self.session(stop) {
                Ok(()) => break,
                Err(error) => {
                    ShipperMetrics::set(&self.metrics.up, 0);
                    ShipperMetrics::set(&self.metrics.in_flight, 0);
                    // A session that ran a while starts the backoff afresh.
                    if started.elapsed() > max {
                        backoff = Duration::from_millis(self.opts.config.retry_initial_ms);
                    }
                    tracing::error!(
                        instance = %self.opts.instance,
                        source = %self.opts.source_name,
                        error = %display_chain(&error),
                        retry_in_ms = backoff.as_millis() as u64,
                        "shipping stopped; retrying"
                    );
                    sleep_unless(stop, backoff);
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        ShipperMetrics::set(&self.metrics.up, 0);
    }

    fn schemas(&self) -> Result<BTreeMap<&'static str, Schema>, SessionError> {
        let timeout = self.opts.config.request_timeout();
        let url = self.registry.base_url().to_owned();
        let register = self.opts.config.register_schemas;
        let mut out = BTreeMap::new();
        for (topic, source, index) in vmr_proto::schemas::topic_value_schemas() {
            if topic == topics::SNAPSHOTS {
                continue;
            }
            let subject = vmr_proto::schemas::value_subject(topic);
            let req = SchemaRequest::protobuf(source);
            let call = async {
                if register {
                    self.registry.register(&subject, &req).await
                } else {
                    self.registry.lookup(&subject, &req).await.map(|v| v.id)
                }
            };
            let id = self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, call).await })
                .map_err(|_| SessionError::Registry {
                    url: url.clone(),
                    detail: format!("no answer within {} s", timeout.as_secs()),
                })
                .and_then(|r| {
                    r.map_err(|e| {
                        let hint = match e.code() {
                            Some(40401) | Some(40403) if !register => {
                                " (register the schemas first: `schema-registry register`)"
                            }
                            _ => "",
                        };
                        SessionError::Registry {
                            url: url.clone(),
                            detail: format!(
                                "{} subject {subject}: {}{hint}",
                                if register {
                                    "registering"
                                } else {
                                    "looking up"
                                },
                                display_chain(&e)
                            ),
                        }
                    })
                })
                .inspect_err(|_| ShipperMetrics::add(&self.metrics.registry_errors, 1))?;
            out.insert(
                topic,
                Schema {
                    id: id as u32,
                    indexes: vec![index],
                },
            );
        }
        Ok(out)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.opts.endpoints.bootstrap_servers)
            .set(
                "client.id",
                format!("capture-agent/{}", self.opts.source_name),
            )
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "5000")
            .set(
                "socket.timeout.ms",
                (self.opts.config.request_timeout_secs * 1000).to_string(),
            )
            .set_log_level(RDKafkaLogLevel::Warning);
        for (key, value) in self.opts.endpoints.kafka_security.client_properties() {
            c.set(key, value);
        }
        c
    }

    fn producer(&self) -> Result<BaseProducer<ShipperContext>, SessionError> {
        let cfg = &self.opts.config;
        let ctx = ShipperContext {
            metrics: self.metrics.clone(),
            deliveries: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            instance: self.opts.instance.to_string(),
        };
        let max_msg = cfg.max_message_bytes + 64 * 1024;
        self.client_config()
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            // Retry until the broker acknowledges: a record never times out.
            .set("message.timeout.ms", "0")
            .set("retry.backoff.ms", "100")
            .set("retry.backoff.max.ms", "2000")
            .set("compression.type", cfg.compression.as_librdkafka())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("batch.size", cfg.batch_bytes.max(max_msg).to_string())
            .set("message.max.bytes", max_msg.to_string())
            .set(
                "queue.buffering.max.messages",
                (cfg.max_in_flight_records + 1024)
                    .min(2_000_000)
                    .to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                ((cfg.max_in_flight_mib * 1024 + max_msg / 1024 + 1024).min(2_097_151)).to_string(),
            )
            .create_with_context(ctx)
            .map_err(SessionError::Client)
    }

    /// Partition of the instance on each event topic, from the broker's
    /// metadata.
    fn partitions(
        &self,
        producer: &BaseProducer<ShipperContext>,
    ) -> Result<BTreeMap<&'static str, i32>, SessionError> {
        let timeout = self.opts.config.request_timeout();
        let mut out = BTreeMap::new();
        for topic in topics::EVENT_TOPICS {
            let md = producer
                .client()
                .fetch_metadata(Some(topic), timeout)
                .map_err(|source| SessionError::Broker {
                    what: format!(
                        "metadata of {topic} from {}",
                        self.opts.endpoints.bootstrap_servers
                    ),
                    source,
                })
                .inspect_err(|_| ShipperMetrics::add(&self.metrics.metadata_errors, 1))?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len() as i32);
            if n == 0 {
                ShipperMetrics::add(&self.metrics.metadata_errors, 1);
                return Err(SessionError::NoTopic(topic.to_owned()));
            }
            if n != self.opts.endpoints.event_partitions {
                tracing::debug!(
                    topic,
                    partitions = n,
                    configured = self.opts.endpoints.event_partitions,
                    "the broker's partition count is used"
                );
            }
            out.insert(topic, self.opts.instance.partition(n));
        }
        Ok(out)
    }

    /// Finds what the topics already hold of this source.
    fn resume(&self, partitions: &BTreeMap<&'static str, i32>) -> Result<Resume, SessionError> {
        let timeout = self.opts.config.request_timeout();
        let committed = self.source.committed()?;
        let state_path = self.opts.state_file.display().to_string();
        let state = match read_state(&self.opts.state_file) {
            Ok(Some(s)) if s.source == self.opts.source_name => Some(s),
            Ok(Some(s)) => {
                tracing::warn!(path = %state_path, other = %s.source, "the shipper state belongs to another source; scanning whole partitions");
                None
            }
            // The state is written before the first record goes to a topic:
            // without it and without a commit, nothing was ever sent.
            Ok(None) if committed.is_none() => Some(ShipperState {
                source: self.opts.source_name.clone(),
                ..ShipperState::default()
            }),
            Ok(None) => {
                tracing::warn!(path = %state_path, "the spool has a commit but no shipper state; scanning whole partitions");
                None
            }
            Err(error) => {
                tracing::warn!(path = %state_path, %error, "the shipper state is unreadable; scanning whole partitions");
                None
            }
        };
        let mut resume = Resume {
            base: later(committed, state.as_ref().and_then(|s| s.position.clone())),
            // Without a state file, every topic may hold records of ours.
            topics: state.as_ref().map_or_else(
                || topics::EVENT_TOPICS.iter().map(|t| t.to_string()).collect(),
                |s| s.topics.clone(),
            ),
            ..Resume::default()
        };
        let consumer: BaseConsumer = self
            .client_config()
            .set(
                "group.id",
                format!("vmr-capture-agent-resume-{}", self.opts.source_name),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.message.max.bytes", (16 << 20).to_string())
            .set("fetch.wait.max.ms", "100")
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(SessionError::Client)?;
        let key = self.opts.instance.as_str().as_bytes();
        for (&topic, &partition) in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .map_err(|source| SessionError::Broker {
                    what: format!("watermarks of {topic}/{partition}"),
                    source,
                })
                .inspect_err(|_| ShipperMetrics::add(&self.metrics.metadata_errors, 1))?;
            let from = state
                .as_ref()
                .and_then(|s| s.offsets.get(topic).copied())
                .unwrap_or(low)
                .clamp(low, high);
            resume.next_scan.insert(topic.to_owned(), high);
            if from >= high || !resume.topics.iter().any(|t| t == topic) {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(from))
                .map_err(|source| SessionError::Broker {
                    what: "assigning a partition".into(),
                    source,
                })?;
            consumer
                .assign(&tpl)
                .map_err(|source| SessionError::Broker {
                    what: format!("assigning {topic}/{partition}"),
                    source,
                })?;
            // Bounded by progress: the scan gives up when no record came for
            // a whole request timeout.
            let mut deadline = Instant::now() + timeout;
            let mut seen = 0u64;
            loop {
                if Instant::now() >= deadline {
                    ShipperMetrics::add(&self.metrics.metadata_errors, 1);
                    return Err(SessionError::ScanTimeout {
                        topic: topic.to_owned(),
                        secs: timeout.as_secs(),
                    });
                }
                let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(_)) => break,
                    Err(source) => {
                        ShipperMetrics::add(&self.metrics.metadata_errors, 1);
                        return Err(SessionError::Broker {
                            what: format!("reading {topic}/{partition}"),
                            source,
                        });
                    }
                };
                seen += 1;
                deadline = Instant::now() + timeout;
                if msg.key() == Some(key) {
                    if let Some(pos) = own_position(&msg, &self.opts.source_name) {
                        resume.last.insert(topic, pos);
                    }
                }
                if msg.offset() >= high - 1 {
                    break;
                }
            }
            // Records of ours found after the base position keep the next
            // scan at `from` until a newer record of ours is acknowledged
            // there: the state's offsets never skip a record its position
            // does not cover.
            let beyond = resume
                .last
                .get(topic)
                .is_some_and(|p| resume.base.as_ref().is_none_or(|b| !at_or_before(p, b)));
            if beyond {
                resume.next_scan.insert(topic.to_owned(), from);
            }
            tracing::info!(
                instance = %self.opts.instance,
                source = %self.opts.source_name,
                topic,
                partition,
                from,
                to = high,
                records = seen,
                last = ?resume.last.get(topic),
                "scanned the partition tail"
            );
        }
        if state.is_none() {
            // A whole-partition scan saw every record of ours: only topics
            // that hold some need scanning next time.
            resume.topics = resume.last.keys().map(|t| t.to_string()).collect();
        }
        Ok(resume)
    }

    /// One session: connect, find where the topics stopped, ship until stop
    /// or failure.
    fn session(&mut self, stop: &AtomicBool) -> Result<(), SessionError> {
        let schemas = self.schemas()?;
        let producer = self.producer()?;
        let result = self.connected(stop, &producer, &schemas);
        if result.is_err() {
            // Nothing more of this session may reach the broker; the error
            // callbacks queued so far are counted.
            producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            producer.poll(Duration::from_millis(100));
        }
        result
    }

    fn connected(
        &mut self,
        stop: &AtomicBool,
        producer: &BaseProducer<ShipperContext>,
        schemas: &BTreeMap<&'static str, Schema>,
    ) -> Result<(), SessionError> {
        let partitions = self.partitions(producer)?;
        let resume = self.resume(&partitions)?;
        tracing::info!(
            instance = %self.opts.instance,
            source = %self.opts.source_name,
            base = ?resume.base,
            already = ?resume.last,
            "shipping"
        );
        self.source.seek(resume.base.as_ref())?;
        ShipperMetrics::set(&self.metrics.up, 1);
        self.ship(stop, producer, schemas, &partitions, resume)
    }

    #[allow(clippy::too_many_lines)]
    fn ship(
        &mut self,
        stop: &AtomicBool,
        producer: &BaseProducer<ShipperContext>,
        schemas: &BTreeMap<&'static str, Schema>,
        partitions: &BTreeMap<&'static str, i32>,
        mut resume: Resume,
    ) -> Result<(), SessionError> {
        let cfg = self.opts.config.clone();
        let m = self.metrics.clone();
        let max_bytes = cfg.max_in_flight_mib << 20;
        let idle = Duration::from_millis(cfg.idle_poll_ms.max(1));
        let commit_every = Duration::from_millis(cfg.commit_interval_ms);
        let key = self.opts.instance.as_str().to_owned();
        let source_name = self.opts.source_name.clone();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut first_id = 0usize;
        let mut in_flight_bytes = 0u64;
        let mut items = Vec::new();
        let mut value = Vec::new();
        let mut acked_pos: Option<Position> = None;
        let mut last_commit = Instant::now();
        let mut committed_pos = resume.base.clone();
        // The last acknowledged position that `resume.next_scan` matches.
        let mut popped_pos = resume.base.clone();
        let mut deliveries = Vec::new();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            if let Some(reason) = producer
                .context()
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return Err(SessionError::Fatal(reason));
            }
            // Read and send while the window has room.
            let mut read_any = false;
            let room = cfg.max_in_flight_records.saturating_sub(pending.len());
            if !stopping && room > 0 && in_flight_bytes < max_bytes {
                items.clear();
                self.source.read_batch(room.min(512), &mut items)?;
                read_any = !items.is_empty();
                for item in items.drain(..) {
                    let (event, position) = match item {
                        SourceItem::Event { event, position } => (event, position),
                        SourceItem::Corrupt {
                            segment,
                            offset,
                            len,
                            reason,
                        } => {
                            ShipperMetrics::add(&m.corrupt_frames, 1);
                            ShipperMetrics::add(&m.corrupt_bytes, len);
                            tracing::warn!(
                                instance = %key, source = %source_name, %segment, offset, len, %reason,
                                "damaged spool frame skipped"
                            );
                            continue;
                        }
                    };
                    ShipperMetrics::add(&m.records_read, 1);
                    ShipperMetrics::max(&m.read_seq, event.seq);
                    let settle = |pending: &mut VecDeque<Pending>| {
                        pending.push_back(Pending {
                            position: position.clone(),
                            seq: event.seq,
                            topic: None,
                            bytes: 0,
                            offset: Some(-1),
                        })
                    };
                    let Some(topic) = topic_of(&event) else {
                        ShipperMetrics::add(&m.invalid_records, 1);
                        tracing::warn!(instance = %key, seq = event.seq, "event without payload refused");
                        settle(&mut pending);
                        continue;
                    };
                    if event.instance_id != key || event.seq == 0 {
                        ShipperMetrics::add(&m.invalid_records, 1);
                        tracing::warn!(
                            instance = %key, event_instance = %event.instance_id, seq = event.seq,
                            "event of another instance (or without seq) refused"
                        );
                        settle(&mut pending);
                        continue;
                    }
                    if resume
                        .last
                        .get(topic)
                        .is_some_and(|last| at_or_before(&position, last))
                    {
                        ShipperMetrics::add(&m.records_already_shipped, 1);
                        settle(&mut pending);
                        continue;
                    }
                    if !resume.topics.iter().any(|t| t == topic) {
                        // Noted durably before the first record goes there,
                        // so a restart knows to scan this topic.
                        resume.topics.push(topic.to_owned());
                        let state = ShipperState {
                            source: source_name.clone(),
                            position: popped_pos.clone(),
                            offsets: resume.next_scan.clone(),
                            topics: resume.topics.clone(),
                        };
                        if let Err(e) = write_state(&self.opts.state_file, &state) {
                            ShipperMetrics::add(&m.commit_errors, 1);
                            resume.topics.pop();
                            return Err(SessionError::State(e));
                        }
                    }
                    let schema = &schemas[topic];
                    value.clear();
                    schema_registry::codec::encode_header(schema.id, &schema.indexes, &mut value);
                    event
                        .encode(&mut value)
                        .expect("encoding into a Vec cannot run out of space");
                    if value.len() as u64 > cfg.max_message_bytes + 64 {
                        ShipperMetrics::add(&m.invalid_records, 1);
                        tracing::error!(
                            instance = %key, seq = event.seq, bytes = value.len(),
                            "event larger than max-message-bytes refused"
                        );
                        settle(&mut pending);
                        continue;
                    }
                    let seq_s = event.seq.to_string();
                    let epoch_s = event.epoch.to_string();
                    let pos_s = format!("{}:{}", position.segment, position.offset);
                    let headers = OwnedHeaders::new_with_capacity(4)
                        .insert(Header {
                            key: HEADER_SEQ,
                            value: Some(seq_s.as_bytes()),
                        })
                        .insert(Header {
                            key: HEADER_EPOCH,
                            value: Some(epoch_s.as_bytes()),
                        })
                        .insert(Header {
                            key: HEADER_SOURCE,
                            value: Some(source_name.as_bytes()),
                        })
                        .insert(Header {
                            key: HEADER_POSITION,
                            value: Some(pos_s.as_bytes()),
                        });
                    let id = first_id + pending.len();
                    let mut record = BaseRecord::with_opaque_to(topic, id)
                        .key(key.as_bytes())
                        .payload(value.as_slice())
                        .partition(partitions[topic])
                        .headers(headers);
                    if event.wall_time_ns > 0 {
                        record = record.timestamp((event.wall_time_ns / 1_000_000) as i64);
                    }
                    loop {
                        match producer.send(record) {
                            Ok(()) => break,
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                r,
                            )) => {
                                record = r;
                                producer.poll(Duration::from_millis(10));
                                if stop.load(Ordering::Acquire) {
                                    return Ok(());
                                }
                            }
                            Err((e, _)) => {
                                ShipperMetrics::add(&m.produce_errors, 1);
                                return Err(SessionError::Produce(e));
                            }
                        }
                    }
                    ShipperMetrics::add(&m.records_sent, 1);
                    in_flight_bytes += value.len() as u64;
                    pending.push_back(Pending {
                        position,
                        seq: event.seq,
                        topic: Some(topic),
                        bytes: value.len() as u64,
                        offset: None,
                    });
                }
            }
            let full = pending.len() >= cfg.max_in_flight_records || in_flight_bytes >= max_bytes;
            producer.poll(if read_any && !full {
                Duration::ZERO
            } else {
                idle
            });
            // Apply the delivery reports.
            std::mem::swap(
                &mut deliveries,
                &mut *producer
                    .context()
                    .deliveries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for (id, result) in deliveries.drain(..) {
                let Some(p) = id.checked_sub(first_id).and_then(|i| pending.get_mut(i)) else {
                    continue;
                };
                match result {
                    Ok((_, offset)) => {
                        p.offset = Some(offset);
                        ShipperMetrics::add(&m.records_acked, 1);
                        ShipperMetrics::add(&m.bytes_acked, p.bytes);
                        ShipperMetrics::max(&m.acked_seq, p.seq);
                        if let Some(t) = p.topic {
                            m.per_topic.acked(t, p.bytes);
                        }
                    }
                    Err(detail) => {
                        ShipperMetrics::add(&m.delivery_errors, 1);
                        return Err(SessionError::Delivery {
                            seq: p.seq,
                            topic: p.topic.unwrap_or("?"),
                            detail,
                        });
                    }
                }
            }
            // Everything acknowledged in order is done.
            while pending.front().is_some_and(|p| p.offset.is_some()) {
                let p = pending.pop_front().expect("checked above");
                first_id += 1;
                in_flight_bytes -= p.bytes;
                if let (Some(topic), Some(offset)) = (p.topic, p.offset) {
                    resume.next_scan.insert(topic.to_owned(), offset + 1);
                }
                popped_pos = Some(p.position.clone());
                acked_pos = Some(p.position);
            }
            ShipperMetrics::set(&m.in_flight, pending.len() as u64);
            let done = stopping && pending.is_empty();
            if acked_pos.is_some() && (done || stopping || last_commit.elapsed() >= commit_every) {
                let pos = acked_pos.take().expect("checked above");
                if committed_pos.as_ref() != Some(&pos) {
                    self.commit(&pos, &resume);
                    committed_pos = Some(pos);
                }
                last_commit = Instant::now();
            }
            if stopping {
                return self.drain(
                    producer,
                    pending,
                    first_id,
                    acked_pos,
                    resume,
                    committed_pos,
                );
            }
        }
    }

    /// At stop: waits (bounded) for what is in flight, commits it.
    fn drain(
        &mut self,
        producer: &BaseProducer<ShipperContext>,
        mut pending: VecDeque<Pending>,
        mut first_id: usize,
        mut acked_pos: Option<Position>,
        mut resume: Resume,
        committed_pos: Option<Position>,
    ) -> Result<(), SessionError> {
        let deadline = Instant::now() + Duration::from_secs(self.opts.config.shutdown_timeout_secs);
        while !pending.is_empty() && Instant::now() < deadline {
            producer.poll(Duration::from_millis(50));
            let reports = std::mem::take(
                &mut *producer
                    .context()
                    .deliveries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            let mut failed = false;
            for (id, result) in reports {
                if let Some(p) = id.checked_sub(first_id).and_then(|i| pending.get_mut(i)) {
                    match result {
                        Ok((_, offset)) => {
                            p.offset = Some(offset);
                            ShipperMetrics::add(&self.metrics.records_acked, 1);
                            ShipperMetrics::add(&self.metrics.bytes_acked, p.bytes);
                            ShipperMetrics::max(&self.metrics.acked_seq, p.seq);
                            if let Some(t) = p.topic {
                                self.metrics.per_topic.acked(t, p.bytes);
                            }
                        }
                        Err(_) => {
                            ShipperMetrics::add(&self.metrics.delivery_errors, 1);
                            failed = true;
                        }
                    }
                }
            }
            while pending.front().is_some_and(|p| p.offset.is_some()) {
                let p = pending.pop_front().expect("checked above");
                first_id += 1;
                if let (Some(topic), Some(offset)) = (p.topic, p.offset) {
                    resume.next_scan.insert(topic.to_owned(), offset + 1);
                }
                acked_pos = Some(p.position);
            }
            if failed {
                break;
            }
        }
        if let Some(pos) = acked_pos {
            if committed_pos.as_ref() != Some(&pos) {
                self.commit(&pos, &resume);
            }
        }
        if !pending.is_empty() {
            tracing::warn!(
                instance = %self.opts.instance,
                source = %self.opts.source_name,
                unacknowledged = pending.len(),
                "stopping with records unacknowledged; the next run ships them"
            );
            producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            producer.poll(Duration::from_millis(100));
        }
        ShipperMetrics::set(&self.metrics.in_flight, 0);
        Ok(())
    }

    /// Writes the state file, then commits to the source.
    fn commit(&mut self, pos: &Position, resume: &Resume) {
        let state = ShipperState {
            source: self.opts.source_name.clone(),
            position: Some(pos.clone()),
            offsets: resume.next_scan.clone(),
            topics: resume.topics.clone(),
        };
        let r = write_state(&self.opts.state_file, &state)
            .map_err(|e| e.to_string())
            .and_then(|()| self.source.commit(pos).map_err(|e| display_chain(&e)));
        match r {
            Ok(()) => {
                ShipperMetrics::add(&self.metrics.commits, 1);
                ShipperMetrics::set(&self.metrics.committed_seq, pos.seq);
            }
            Err(error) => {
                ShipperMetrics::add(&self.metrics.commit_errors, 1);
                tracing::warn!(instance = %self.opts.instance, %error, "commit failed; retried at the next one");
            }
        }
    }
}

/// The spool position in a record of `source`.
fn own_position<M: Message>(msg: &M, source: &str) -> Option<Position> {
    let headers = msg.headers()?;
    let mut ours = false;
    let mut pos = None;
    let mut seq = 0;
    for h in headers.iter() {
        match h.key {
            HEADER_SOURCE => ours = h.value == Some(source.as_bytes()),
            HEADER_POSITION => pos = h.value.and_then(|v| std::str::from_utf8(v).ok()),
            HEADER_SEQ => {
                seq = h
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    if !ours {
        return None;
    }
    let (segment, offset) = pos?.rsplit_once(':')?;
    Some(Position {
        segment: segment.to_owned(),
        offset: offset.parse().ok()?,
        seq,
    })
}

/// An error with its sources, `: `-separated.
pub fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sleeps `d` in short steps, returning early once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A shipper running on its own thread.
pub struct ShipperHandle {
    stop: Arc<AtomicBool>,
    metrics: Arc<ShipperMetrics>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShipperHandle {
    /// Starts `shipper` on a thread named after its source.
    pub fn spawn<S: RecordSource + 'static>(mut shipper: Shipper<S>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = shipper.metrics.clone();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ship-{}", shipper.opts.source_name))
            .spawn(move || shipper.run(&s))?;
        Ok(Self {
            stop,
            metrics,
            thread: Some(thread),
        })
    }

    /// The shipper's counters.
    pub fn metrics(&self) -> &Arc<ShipperMetrics> {
        &self.metrics
    }

    /// Asks the shipper to stop and waits for it (it finishes within
    /// `shutdown-timeout-secs` plus one request timeout).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("shipper thread panicked");
            }
        }
    }
}

impl Drop for ShipperHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
