//! The `_schemas` topic as the registry's only storage: an idempotent producer
//! for writes and a consumer that tails the single partition from the start
//! and applies every record to the shared [`State`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::state::{Applied, State};

/// Outcomes of recently applied records kept for writers waiting on them.
const OUTCOMES_KEPT: usize = 4096;

/// Errors reading or writing the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A Kafka client could not be created.
    #[error("could not create the Kafka {what}")]
    Client {
        what: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The broker did not take a write.
    #[error("could not write to the schemas topic")]
    Produce(#[source] rdkafka::error::KafkaError),
    /// The end of the log could not be read.
    #[error("could not read the end of the schemas topic (does it exist?)")]
    Watermarks(#[source] rdkafka::error::KafkaError),
    /// The consumer did not reach an offset in time.
    #[error("timed out after {0:?} waiting to read the schemas topic up to offset {1}")]
    Timeout(Duration, i64),
}

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Kafka bootstrap servers (`host:port,...`).
    pub bootstrap_servers: String,
    /// The compacted single-partition topic.
    pub topic: String,
    /// How long a write, or a read up to the end of the log, may take.
    pub timeout: Duration,
    /// Security of the Kafka clients.
    pub security: vmr_proto::config::KafkaSecurity,
}

/// The producer's client settings (no client is created).
pub fn producer_config(config: &LogConfig) -> ClientConfig {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set(
            "message.timeout.ms",
            config.timeout.as_millis().max(1000).to_string(),
        );
    c
}

/// The consumer's client settings (no client is created).
pub fn consumer_config(config: &LogConfig) -> ClientConfig {
    let mut c = client_config(config);
    c.set("group.id", "schema-registry")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "100")
        .set("enable.partition.eof", "false");
    c
}

fn client_config(config: &LogConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in config.security.client_properties() {
        c.set(key, value);
    }
    c
}

/// Hands the producer's and the consumer's settings to librdkafka, which
/// checks every property name and value, without creating a client or
/// reaching a broker.
pub fn check_client_configs(config: &LogConfig) -> Result<(), LogError> {
    for (what, c) in [
        ("producer", producer_config(config)),
        ("consumer", consumer_config(config)),
    ] {
        c.create_native_config()
            .map_err(|source| LogError::Client { what, source })?;
    }
    Ok(())
}

struct Shared {
    state: RwLock<State>,
    /// Next offset the consumer will apply.
    applied: watch::Sender<i64>,
    outcomes: Mutex<BTreeMap<i64, Applied>>,
}

/// The registry's log: state plus the clients that keep it in step with Kafka.
pub struct SchemaLog {
    config: LogConfig,
    shared: Arc<Shared>,
    producer: RwLock<FutureProducer>,
    consumer: Arc<StreamConsumer>,
    tail: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SchemaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaLog")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn producer(config: &LogConfig) -> Result<FutureProducer, LogError> {
    producer_config(config)
        .create()
        .map_err(|source| LogError::Client {
            what: "producer",
            source,
        })
}

impl SchemaLog {
    /// Connects to Kafka and starts tailing the topic from its beginning.
    /// Returns at once; call [`SchemaLog::sync`] to wait for the backlog.
    /// Must be called within a Tokio runtime (the tail runs as a task).
    pub fn start(config: LogConfig) -> Result<Self, LogError> {
        let consumer: StreamConsumer =
            consumer_config(&config)
                .create()
                .map_err(|source| LogError::Client {
                    what: "consumer",
                    source,
                })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&config.topic, 0, Offset::Beginning)
            .map_err(|source| LogError::Client {
                what: "consumer assignment",
                source,
            })?;
        consumer.assign(&tpl).map_err(|source| LogError::Client {
            what: "consumer assignment",
            source,
        })?;
        let consumer = Arc::new(consumer);
        let (applied, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: RwLock::new(State::default()),
            applied,
            outcomes: Mutex::new(BTreeMap::new()),
        });
        let tail = tokio::spawn(tail(consumer.clone(), shared.clone()));
        Ok(Self {
            producer: RwLock::new(producer(&config)?),
            config,
            shared,
            consumer,
            tail,
        })
    }

    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self
            .shared
            .state
            .read()
            .expect("state lock is never poisoned: apply does not panic"))
    }

    /// The next offset the consumer will apply.
    pub fn applied_offset(&self) -> i64 {
        *self.shared.applied.borrow()
    }

    /// Waits until the state reflects every record in the topic at the time
    /// of the call (the high watermark).
    pub async fn sync(&self) -> Result<(), LogError> {
        let consumer = self.consumer.clone();
        let topic = self.config.topic.clone();
        let timeout = self.config.timeout;
        let (_, high) =
            tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, 0, timeout))
                .await
                .map_err(|_| LogError::Watermarks(rdkafka::error::KafkaError::Canceled))?
                .map_err(LogError::Watermarks)?;
        self.wait_applied(high).await
    }

    async fn wait_applied(&self, next: i64) -> Result<(), LogError> {
        let mut rx = self.shared.applied.subscribe();
        tokio::time::timeout(self.config.timeout, rx.wait_for(|&a| a >= next))
            .await
            .map_err(|_| LogError::Timeout(self.config.timeout, next))?
            .map_err(|_| LogError::Timeout(self.config.timeout, next))?;
        Ok(())
    }

    /// Produces one record (a tombstone when `value` is `None`), waits until
    /// this instance's consumer has applied it, and returns the verdict.
    pub async fn append(&self, key: &[u8], value: Option<&[u8]>) -> Result<Applied, LogError> {
        let producer = self
            .producer
            .read()
            .expect("producer lock is never poisoned")
            .clone();
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.config.topic)
            .partition(0)
            .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivery = match producer.send(record, self.config.timeout).await {
            Ok(d) => d,
            Err((e, _)) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    warn!(?code, %reason, "producer failed fatally; creating a new one");
                    if let Ok(p) = self::producer(&self.config) {
                        *self
                            .producer
                            .write()
                            .expect("producer lock is never poisoned") = p;
                    }
                }
                return Err(LogError::Produce(e));
            }
        };
        debug!(offset = delivery.offset, "record written");
        self.wait_applied(delivery.offset + 1).await?;
        let outcome = self
            .shared
            .outcomes
            .lock()
            .expect("outcome lock is never poisoned")
            .remove(&delivery.offset);
        Ok(outcome.unwrap_or(Applied::Ignored))
    }
}

impl Drop for SchemaLog {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

async fn tail(consumer: Arc<StreamConsumer>, shared: Arc<Shared>) {
    let mut errors = 0u32;
    loop {
        match consumer.recv().await {
            Ok(m) => {
                if errors > 0 {
                    info!("reading the schemas topic again");
                    errors = 0;
                }
                let offset = m.offset();
                let outcome = shared
                    .state
                    .write()
                    .expect("state lock is never poisoned: apply does not panic")
                    .apply(m.key(), m.payload());
                if let Applied::Rejected(why) = &outcome {
                    debug!(offset, %why, "record rejected");
                }
                {
                    let mut outcomes = shared
                        .outcomes
                        .lock()
                        .expect("outcome lock is never poisoned");
                    outcomes.insert(offset, outcome);
                    while outcomes.len() > OUTCOMES_KEPT {
                        outcomes.pop_first();
                    }
                }
                shared.applied.send_modify(|a| *a = (*a).max(offset + 1));
            }
            Err(e) => {
                errors += 1;
                if errors.is_power_of_two() {
                    warn!(error = %e, "reading the schemas topic failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
