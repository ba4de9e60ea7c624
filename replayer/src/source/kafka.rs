//! One topic partition read with a `BaseConsumer` from an explicit offset up
//! to the high watermark.

use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use vmr_proto::{pb, Event, TopicOffset};

use super::{PoisonRecord, RecordPos, SourceConfig, SourceError, TopicStats};
use crate::Kind;

/// Longest single `poll`, so that a deadline is checked often.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Largest record value accepted (a full block record plus framing).
const MAX_RECORD_BYTES: usize = vmr_proto::topics::BLOCK_MAX_MESSAGE_BYTES + 1024 * 1024;

pub(crate) enum ReadOutcome {
    /// An event of the instance after the cut.
    Event(Event, RecordPos),
    /// A record that is not wanted (other instance, before the cut); its
    /// `seq` when known.
    Skipped { seq: Option<u64> },
    /// An undecodable record of the instance.
    Poison(PoisonRecord),
    /// The topic has nothing more (it is now exhausted).
    End,
}

pub(crate) struct TopicReader {
    consumer: BaseConsumer,
    kind: Kind,
    topic: String,
    partition: i32,
    instance: String,
    seq_at_cut: u64,
    timeout: Duration,
    /// Offset of the next record to read.
    next_offset: i64,
    /// Whether a record has been read yet (the first one must be at the
    /// start offset, or records before it are gone).
    first_read: bool,
    pub exhausted: bool,
    /// Highest `seq` of the instance read so far (skipped ones included).
    pub last_seq: Option<u64>,
    pub stats: TopicStats,
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> SourceError {
    let what = what.into();
    move |source| SourceError::Kafka { what, source }
}

impl TopicReader {
    pub fn open(
        config: &SourceConfig,
        kind: Kind,
        start: &TopicOffset,
    ) -> Result<Self, SourceError> {
        let topic = start.topic.clone();
        let timeout = config.fetch_timeout;
        let mut client = ClientConfig::new();
        for (key, value) in config.security.client_properties() {
            client.set(key, value);
        }
        let consumer: BaseConsumer = client
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("client.id", format!("vmr-replayer-{}", config.instance))
            // Needed by rdkafka for `assign`; the group is never joined and
            // nothing is committed.
            .set("group.id", format!("vmr-replayer-{}", config.instance))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset outside the log is an error, never a silent jump.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            .set("fetch.message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set("fetch.max.bytes", (2 * MAX_RECORD_BYTES).to_string())
            .set(
                "receive.message.max.bytes",
                (2 * MAX_RECORD_BYTES + 65536).to_string(),
            )
            // Prefetch bound per partition: with the merge window, this
            // bounds the memory a replay holds.
            .set("queued.max.messages.kbytes", "16384")
            .set("queued.min.messages", "1000")
            .set("fetch.wait.max.ms", "50")
            .set("socket.timeout.ms", timeout.as_millis().max(10).to_string())
            .create()
            .map_err(kafka(format!("client for {topic}")))?;

        let metadata = consumer
            .fetch_metadata(Some(&topic), timeout)
            .map_err(kafka(format!("metadata of {topic}")))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|&n| n > 0)
            .ok_or_else(|| SourceError::UnknownTopic(topic.clone()))?;
        let expected = config.instance.partition(partitions);
        if start.partition != expected {
            return Err(SourceError::PartitionMismatch {
                topic,
                instance: config.instance.to_string(),
                given: start.partition,
                expected,
                partitions,
            });
        }
        let (low, high) = consumer
            .fetch_watermarks(&topic, start.partition, timeout)
            .map_err(kafka(format!("watermarks of {topic}/{}", start.partition)))?;
        if start.next_offset < low {
            return Err(SourceError::Retention {
                topic,
                partition: start.partition,
                wanted: start.next_offset,
                earliest: low,
            });
        }
        if start.next_offset > high {
            return Err(SourceError::BeyondEnd {
                topic,
                partition: start.partition,
                wanted: start.next_offset,
                end: high,
            });
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, start.partition, Offset::Offset(start.next_offset))
            .map_err(kafka(format!("assignment of {topic}")))?;
        consumer
            .assign(&tpl)
            .map_err(kafka(format!("assignment of {topic}")))?;
        let stats = TopicStats {
            kind: Some(kind),
            topic: topic.clone(),
            partition: start.partition,
            start_offset: start.next_offset,
            end_offset: high,
            ..TopicStats::default()
        };
        Ok(Self {
            consumer,
            kind,
            topic,
            partition: start.partition,
            instance: config.instance.to_string(),
            seq_at_cut: config.seq_at_cut,
            timeout,
            next_offset: start.next_offset,
            first_read: false,
            exhausted: false,
            last_seq: None,
            stats,
        })
    }

    /// The partitions this reader's consumer is assigned.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the log ends at `next_offset`: asks the broker again once
    /// the known end is reached, since records may have been added since.
    fn at_end(&mut self) -> Result<bool, SourceError> {
        if self.next_offset < self.stats.end_offset {
            return Ok(false);
        }
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, self.partition, self.timeout)
            .map_err(kafka(format!(
                "watermarks of {}/{}",
                self.topic, self.partition
            )))?;
        self.stats.end_offset = high;
        Ok(self.next_offset >= high)
    }

    fn pos(&self, offset: i64) -> RecordPos {
        RecordPos {
            kind: self.kind,
            partition: self.partition,
            offset,
        }
    }

    /// Reads the next record, waiting at most the fetch timeout for it.
    pub fn read(&mut self) -> Result<ReadOutcome, SourceError> {
        if self.exhausted {
            return Ok(ReadOutcome::End);
        }
        if self.at_end()? {
            self.exhausted = true;
            return Ok(ReadOutcome::End);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(SourceError::Timeout {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: self.next_offset,
                    end: self.stats.end_offset,
                    waited: self.timeout,
                });
            }
            let slice = POLL_SLICE.min(deadline - now);
            let msg = match self.consumer.poll(slice) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if self.at_end()? {
                        self.exhausted = true;
                        return Ok(ReadOutcome::End);
                    }
                    continue;
                }
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                    let (low, high) = self
                        .consumer
                        .fetch_watermarks(&self.topic, self.partition, self.timeout)
                        .map_err(kafka(format!("watermarks of {}", self.topic)))?;
                    return Err(if self.next_offset < low {
                        SourceError::Retention {
                            topic: self.topic.clone(),
                            partition: self.partition,
                            wanted: self.next_offset,
                            earliest: low,
                        }
                    } else {
                        SourceError::BeyondEnd {
                            topic: self.topic.clone(),
                            partition: self.partition,
                            wanted: self.next_offset,
                            end: high,
                        }
                    });
                }
                Some(Err(e)) => {
                    return Err(SourceError::Kafka {
                        what: format!("fetch from {}/{}", self.topic, self.partition),
                        source: e,
                    })
                }
                Some(Ok(m)) => m,
            };
            let offset = msg.offset();
            if !self.first_read && offset > self.next_offset {
                // The broker skipped ahead: the records before `offset` are
                // gone (a broker may delete records without moving the log
                // start it reports).
                return Err(SourceError::Retention {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    wanted: self.next_offset,
                    earliest: offset,
                });
            }
            self.first_read = true;
            self.next_offset = offset + 1;
            self.stats.records += 1;
            let value = msg.payload();
            self.stats.bytes += value.map_or(0, |v| v.len() as u64);
            if msg.key() != Some(self.instance.as_bytes()) {
                self.stats.other_instance += 1;
                return Ok(ReadOutcome::Skipped { seq: None });
            }
            if let Some(seq) = header_seq(&msg) {
                if seq <= self.seq_at_cut {
                    // Skipped without decoding the value (up to 8 MiB).
                    self.last_seq = Some(self.last_seq.map_or(seq, |s| s.max(seq)));
                    self.stats.before_cut += 1;
                    self.stats.before_cut_by_header += 1;
                    return Ok(ReadOutcome::Skipped { seq: Some(seq) });
                }
            }
            let pos = self.pos(offset);
            let event = match decode(value, self.kind, &self.instance) {
                Ok(e) => e,
                Err(error) => {
                    self.stats.poison += 1;
                    tracing::warn!(topic = %self.topic, partition = self.partition, offset, %error, "skipping a record that does not decode");
                    return Ok(ReadOutcome::Poison(PoisonRecord { pos, error }));
                }
            };
            self.last_seq = Some(self.last_seq.map_or(event.seq, |s| s.max(event.seq)));
            if event.seq <= self.seq_at_cut {
                self.stats.before_cut += 1;
                return Ok(ReadOutcome::Skipped {
                    seq: Some(event.seq),
                });
            }
            self.stats.events += 1;
            return Ok(ReadOutcome::Event(event, pos));
        }
    }
}

/// The `seq` a record's header gives (`vmr.seq`, or `seq`; ASCII decimal).
fn header_seq(msg: &impl Message) -> Option<u64> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == "vmr.seq" || h.key == "seq")
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
}

/// Decodes a Confluent-framed `vmr.v1.Event` of `instance` on a `kind` topic.
fn decode(value: Option<&[u8]>, kind: Kind, instance: &str) -> Result<Event, String> {
    let value = value.ok_or("the record has no value")?;
    let framed = schema_registry::codec::decode(value).map_err(|e| e.to_string())?;
    if framed.message_indexes.as_slice() != [0] {
        return Err(format!(
            "message index {:?} is not vmr.v1.Event",
            framed.message_indexes
        ));
    }
    let pb = pb::Event::decode(framed.payload).map_err(|e| format!("protobuf: {e}"))?;
    let event = Event::try_from(pb).map_err(|e| e.to_string())?;
    if event.instance.as_str() != instance {
        return Err(format!(
            "the value names instance {}, the key {instance}",
            event.instance
        ));
    }
    let got = Kind::of(&event.payload);
    if got != kind {
        return Err(format!("a {got} event on the {kind} topic"));
    }
    Ok(event)
}
