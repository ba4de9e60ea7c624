//! The background consumer: one thread per event topic reads every partition
//! from the beginning and feeds the aggregator, then follows the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use vmr_proto::{pb, topics, Event};

use crate::aggregate::{Aggregator, LogPos};

/// Largest record value fetched (a full block record plus framing).
pub const MAX_RECORD_BYTES: usize = topics::BLOCK_MAX_MESSAGE_BYTES + 1024 * 1024;

/// How the consumer is doing, for the health view.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConsumerStatus {
    /// Records read, all topics.
    pub records: u64,
    /// Records that did not decode as a `vmr.v1.Event` (left out).
    pub undecodable: u64,
    /// Topics assigned so far.
    pub topics_ready: Vec<String>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The consumer threads; dropping it stops them.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub status: Arc<Mutex<ConsumerStatus>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

/// Decodes a Confluent-framed `vmr.v1.Event`.
pub fn decode_value(value: &[u8]) -> Result<Event, String> {
    let framed = schema_registry::codec::decode(value).map_err(|e| e.to_string())?;
    if framed.message_indexes.as_slice() != [0] {
        return Err(format!(
            "message index {:?} is not vmr.v1.Event",
            framed.message_indexes
        ));
    }
    let pb = pb::Event::decode(framed.payload).map_err(|e| format!("protobuf: {e}"))?;
    Event::try_from(pb).map_err(|e| e.to_string())
}

/// A consumer client that is never a group member.
pub fn client(bootstrap: &str, timeout: Duration) -> Result<BaseConsumer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "vmr-console")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("fetch.max.bytes", (2 * MAX_RECORD_BYTES).to_string())
        .set(
            "receive.message.max.bytes",
            (2 * MAX_RECORD_BYTES + 65536).to_string(),
        )
        .set("fetch.wait.max.ms", "100")
        .set("socket.timeout.ms", timeout.as_millis().max(10).to_string())
        .create()
}

impl Consumer {
    /// Starts one thread per event topic.
    pub fn start(bootstrap: &str, timeout: Duration, agg: Arc<RwLock<Aggregator>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(ConsumerStatus::default()));
        let threads = topics::EVENT_TOPICS
            .iter()
            .map(|&topic| {
                let (stop, status, agg) = (stop.clone(), status.clone(), agg.clone());
                let bootstrap = bootstrap.to_string();
                std::thread::Builder::new()
                    .name(format!("consume {topic}"))
                    .spawn(move || run(&bootstrap, topic, timeout, &agg, &stop, &status))
                    .expect("spawning a thread succeeds unless the process is out of resources")
            })
            .collect();
        Self {
            stop,
            threads,
            status,
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(
    bootstrap: &str,
    topic: &'static str,
    timeout: Duration,
    agg: &RwLock<Aggregator>,
    stop: &AtomicBool,
    status: &Mutex<ConsumerStatus>,
) {
    // Assign every partition from the beginning, retrying until the broker
    // answers and the topic exists.
    let consumer = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match assign(bootstrap, topic, timeout) {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot consume yet; retrying");
                status.lock().last_error = Some(format!("{topic}: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    status.lock().topics_ready.push(topic.to_string());
    let mut batch: Vec<(Event, LogPos)> = Vec::with_capacity(4096);
    let mut bad = 0u64;
    let mut read = 0u64;
    let mut last_flush = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                status.lock().last_error = Some(format!("{topic}: {e}"));
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(m)) => {
                read += 1;
                match m.payload().map(decode_value) {
                    Some(Ok(e)) => batch.push((
                        e,
                        LogPos {
                            topic,
                            partition: m.partition(),
                            offset: m.offset(),
                        },
                    )),
                    _ => bad += 1,
                }
            }
        }
        if !batch.is_empty() && (batch.len() >= 4096 || last_flush.elapsed().as_millis() >= 50)
            || read > 0 && last_flush.elapsed().as_millis() >= 50
        {
            let mut a = agg.write();
            for (e, pos) in batch.drain(..) {
                a.ingest(&e, Some(pos));
            }
            drop(a);
            let mut s = status.lock();
            s.records += read;
            s.undecodable += bad;
            s.last_error = None;
            read = 0;
            bad = 0;
            last_flush = Instant::now();
        }
    }
}

fn assign(bootstrap: &str, topic: &str, timeout: Duration) -> Result<BaseConsumer, String> {
    let c = client(bootstrap, timeout).map_err(|e| e.to_string())?;
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata: {e}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| format!("topic {topic} does not exist"))?;
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    c.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(c)
}

/// Reads the events of `instance` on `topic`/`partition` from `start`,
/// keeping those with wall time in `[from, to]`; stops past `to` (with a
/// second of slack for out-of-order capture), at `last_offset`, after
/// `limit` kept events, or at the deadline.
#[allow(clippy::too_many_arguments)]
pub fn read_range(
    bootstrap: &str,
    timeout: Duration,
    topic: &str,
    partition: i32,
    start: i64,
    last_offset: i64,
    instance: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<Event>, String> {
    let c = client(bootstrap, timeout).map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    c.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let slack = 1_000_000_000;
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "{topic}/{partition}: no answer from the broker within {} s",
                timeout.as_secs()
            ));
        }
        match c.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(out),
            Some(Err(e)) => return Err(format!("{topic}/{partition}: {e}")),
            Some(Ok(m)) => {
                let done = m.offset() >= last_offset;
                if m.key() == Some(instance.as_bytes()) {
                    if let Some(Ok(e)) = m.payload().map(decode_value) {
                        if e.wall_time_ns > to.saturating_add(slack) {
                            return Ok(out);
                        }
                        if e.wall_time_ns >= from && e.wall_time_ns <= to {
                            out.push(e);
                            if out.len() >= limit {
                                return Ok(out);
                            }
                        }
                    }
                }
                if done {
                    return Ok(out);
                }
            }
        }
    }
}
