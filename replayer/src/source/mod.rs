//! The event source: one instance's recorded events read back from Kafka,
//! merged by `seq` into one ordered stream.
//!
//! Each wanted topic is read by its own rdkafka [`BaseConsumer`] assigned to
//! the instance's partition at an explicit offset (the snapshot manifest's
//! "earliest offset that can hold a seq after the cut"). Records of other
//! instances (the partition is shared by hash) are skipped by key without
//! decoding, events with `seq <= seq_at_cut` are skipped (by their
//! `vmr.seq` header when it is there, so without decoding), and the rest are
//! merged by `seq` in a bounded window ([`MergeWindow`]).
//!
//! The stream is an iterator of [`SourceItem`]s: events in `seq` order, gaps
//! (a missing `seq` range, or a recorded `GAP` event) and poison records
//! (values that do not decode), each in its place. A topic's end is its high
//! watermark, read when the source opens (and read again once reached), so
//! the stream ends instead of waiting for data that is not there; every
//! other wait is bounded by [`SourceConfig::fetch_timeout`].
//!
//! When all four kinds are read, `seq` is contiguous and a hole is reported
//! as a [`GapCause::Missing`] gap. When only some kinds are read (a net-only
//! replay reads `vmr.net.v1` and `vmr.lifecycle.v1`), the other kinds' numbers
//! are holes by design, so only recorded `GAP` events are reported.
//!
//! [`BaseConsumer`]: rdkafka::consumer::BaseConsumer

mod kafka;
mod merge;

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::error::KafkaError;
use vmr_proto::{Event, InstanceId, SnapshotManifest, TopicOffset};

use crate::{Kind, KindSet};

pub use merge::{MergeStats, MergeWindow};

use kafka::{ReadOutcome, TopicReader};

/// The topic of each kind (the standard `vmr.*.v1` names by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    pub block: String,
    pub net: String,
    pub env: String,
    pub lifecycle: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        Self {
            block: Kind::Block.topic().into(),
            net: Kind::Net.topic().into(),
            env: Kind::Env.topic().into(),
            lifecycle: Kind::Lifecycle.topic().into(),
        }
    }
}

impl TopicNames {
    /// The topic of `kind`.
    pub fn get(&self, kind: Kind) -> &str {
        match kind {
            Kind::Block => &self.block,
            Kind::Net => &self.net,
            Kind::Env => &self.env,
            Kind::Lifecycle => &self.lifecycle,
        }
    }

    /// The kind whose topic is `topic`.
    pub fn kind_of(&self, topic: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| self.get(*k) == topic)
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Kafka `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The recorded instance.
    pub instance: InstanceId,
    /// Events up to this `seq` are in the snapshot; the stream starts after it.
    pub seq_at_cut: u64,
    /// Where to start on each topic (topic, partition, offset), usually the
    /// manifest's offsets. Every topic of [`SourceConfig::kinds`] needs one.
    pub start: Vec<TopicOffset>,
    /// Which kinds to read. Topics of other kinds are not consumed at all.
    pub kinds: KindSet,
    /// Last `seq` wanted; `None` reads to the end of the recorded data.
    pub until_seq: Option<u64>,
    /// Topic names.
    pub topics: TopicNames,
    /// Bound of the merge.
    pub window: MergeWindow,
    /// Longest wait for one broker answer (metadata, watermarks) or for a
    /// record the high watermark says exists.
    pub fetch_timeout: Duration,
    /// Security of the Kafka clients.
    pub security: vmr_proto::config::KafkaSecurity,
}

impl SourceConfig {
    /// Reads `kinds` of the manifest's instance from the manifest's offsets
    /// on, with the default window and a 10 s fetch timeout.
    pub fn from_manifest(
        bootstrap_servers: impl Into<String>,
        manifest: &SnapshotManifest,
        kinds: KindSet,
    ) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            instance: manifest.instance.clone(),
            seq_at_cut: manifest.seq_at_cut,
            start: manifest.offsets.clone(),
            kinds,
            until_seq: None,
            topics: TopicNames::default(),
            window: MergeWindow::default(),
            fetch_timeout: Duration::from_secs(10),
            security: Default::default(),
        }
    }
}

/// Where a record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPos {
    pub kind: Kind,
    pub partition: i32,
    pub offset: i64,
}

/// An event with where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedEvent {
    pub event: Event,
    pub pos: RecordPos,
}

/// Why numbers are missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapCause {
    /// No topic holds them (all four kinds were read).
    Missing,
    /// A `GAP` lifecycle event (at `event_seq`) recorded them as lost.
    Recorded { reason: String, event_seq: u64 },
}

/// Sequence numbers `[first_seq, first_seq + count)` without events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapReport {
    pub first_seq: u64,
    pub count: u64,
    pub cause: GapCause,
}

/// A record of the instance whose value could not be decoded; it is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonRecord {
    pub pos: RecordPos,
    /// Why it could not be decoded.
    pub error: String,
}

/// One item of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// The next event by `seq`.
    Event(SourcedEvent),
    /// Numbers without events, reported before the next event after them
    /// (a recorded gap: just before its `GAP` event).
    Gap(GapReport),
    /// A record that was skipped because it does not decode.
    Poison(PoisonRecord),
}

/// Counters of one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicStats {
    pub kind: Option<Kind>,
    pub topic: String,
    pub partition: i32,
    /// First offset read from.
    pub start_offset: i64,
    /// The high watermark the read goes up to.
    pub end_offset: i64,
    /// Records fetched (of any instance).
    pub records: u64,
    /// Value bytes fetched.
    pub bytes: u64,
    /// Records of other instances, skipped by key.
    pub other_instance: u64,
    /// Events with `seq <= seq_at_cut`, skipped.
    pub before_cut: u64,
    /// Of those, the ones skipped by their `vmr.seq` (or `seq`) header
    /// without decoding the value.
    pub before_cut_by_header: u64,
    /// Undecodable records, reported and skipped.
    pub poison: u64,
    /// Events handed to the merge.
    pub events: u64,
}

/// Counters of the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// One entry per consumed topic, in [`Kind::ALL`] order.
    pub topics: Vec<TopicStats>,
    pub merge: MergeStats,
}

/// Errors of the event source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source configuration: {0}")]
    Config(String),
    #[error("no start offset for topic {0}")]
    MissingStart(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error(
        "start offset of {topic} names partition {given}, but instance {instance} is on partition {expected} of {partitions}"
    )]
    PartitionMismatch {
        topic: String,
        instance: String,
        given: i32,
        expected: i32,
        partitions: i32,
    },
    #[error(
        "events missing from Kafka (retention): {topic}/{partition} has nothing before offset {earliest}, the replay needs offset {wanted}"
    )]
    Retention {
        topic: String,
        partition: i32,
        wanted: i64,
        earliest: i64,
    },
    #[error("start offset {wanted} of {topic}/{partition} is beyond the end of the log ({end})")]
    BeyondEnd {
        topic: String,
        partition: i32,
        wanted: i64,
        end: i64,
    },
    #[error("the requested range ends at seq {wanted}, but the recorded events end at seq {last}")]
    RangeBeyondEnd { wanted: u64, last: u64 },
    #[error(
        "no record from {topic}/{partition} at offset {offset} within {waited:?}, though the log ends at {end}"
    )]
    Timeout {
        topic: String,
        partition: i32,
        offset: i64,
        end: i64,
        waited: Duration,
    },
    #[error("Kafka {what} failed")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
}

/// The merged stream of one instance's events. See the [module docs](self).
pub struct EventSource {
    readers: Vec<TopicReader>,
    merger: merge::Merger,
    out: VecDeque<SourceItem>,
    until_seq: Option<u64>,
    /// Highest `seq` of the instance seen on any topic (also before the cut).
    max_seq_seen: u64,
    finished: bool,
}

impl std::fmt::Debug for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSource")
            .field("topics", &self.assignment())
            .field("expected", &self.merger.expected())
            .finish_non_exhaustive()
    }
}

impl EventSource {
    /// Connects, checks each topic's partition and retained range, and
    /// assigns one consumer per wanted topic at its start offset.
    pub fn open(config: SourceConfig) -> Result<Self, SourceError> {
        if config.kinds.is_empty() {
            return Err(SourceError::Config("no event kind to read".into()));
        }
        if config.window.max_events == 0 {
            return Err(SourceError::Config(
                "the merge window must hold at least one event".into(),
            ));
        }
        if config.fetch_timeout.is_zero() {
            return Err(SourceError::Config(
                "the fetch timeout must be positive".into(),
            ));
        }
        if let Some(u) = config.until_seq {
            if u <= config.seq_at_cut {
                return Err(SourceError::Config(format!(
                    "the range ends at seq {u}, not after the cut at seq {}",
                    config.seq_at_cut
                )));
            }
        }
        let mut readers = Vec::new();
        for kind in config.kinds.iter() {
            let topic = config.topics.get(kind);
            let start = config
                .start
                .iter()
                .find(|o| o.topic == topic)
                .ok_or_else(|| SourceError::MissingStart(topic.to_string()))?;
            readers.push(TopicReader::open(&config, kind, start)?);
        }
        Ok(Self {
            readers,
            merger: merge::Merger::new(config.seq_at_cut, config.kinds.is_all(), config.window),
            out: VecDeque::new(),
            until_seq: config.until_seq,
            max_seq_seen: config.seq_at_cut,
            finished: false,
        })
    }

    /// The topic partitions the consumers are assigned, as rdkafka reports
    /// them.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.readers.iter().flat_map(|r| r.assignment()).collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> SourceStats {
        SourceStats {
            topics: self.readers.iter().map(|r| r.stats.clone()).collect(),
            merge: self.merger.stats,
        }
    }

    fn read_state(&self) -> merge::ReadState {
        let active: Vec<&TopicReader> = self.readers.iter().filter(|r| !r.exhausted).collect();
        let passed = if active.iter().any(|r| r.last_seq.is_none()) {
            None
        } else {
            active.iter().filter_map(|r| r.last_seq).min()
        };
        merge::ReadState {
            exhausted: active.is_empty(),
            passed,
        }
    }

    /// The reader to read next: one that has read nothing yet, else the one
    /// whose reads are furthest behind.
    fn pick_reader(&self) -> Option<usize> {
        let active = self
            .readers
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.exhausted);
        active
            .min_by_key(|(_, r)| r.last_seq.map_or((0, 0), |s| (1, s)))
            .map(|(i, _)| i)
    }

    fn past_until(&self, seq: u64) -> bool {
        self.until_seq.is_some_and(|u| seq > u)
    }

    fn step(&mut self) -> Result<Option<SourceItem>, SourceError> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Ok(Some(item));
            }
            if self.finished {
                return Ok(None);
            }
            let state = self.read_state();
            if let Some(m) = self.merger.min_seq() {
                if self.past_until(m) && (state.exhausted || state.passed.is_some_and(|p| p > m)) {
                    // Nothing at or below the range's end can come any more.
                    self.finished = true;
                    continue;
                }
            }
            if self.merger.release(state, &mut self.out) {
                if let Some(SourceItem::Event(e)) = self.out.back() {
                    if self.past_until(e.event.seq) {
                        // Released only because the window filled up.
                        self.out.pop_back();
                        self.finished = true;
                    }
                }
                continue;
            }
            if self.until_seq.is_some_and(|u| self.merger.expected() > u) {
                self.finished = true;
                continue;
            }
            let Some(i) = self.pick_reader() else {
                // Every reader is exhausted and the window is empty.
                self.finished = true;
                if let Some(u) = self.until_seq {
                    if self.max_seq_seen < u {
                        return Err(SourceError::RangeBeyondEnd {
                            wanted: u,
                            last: self.max_seq_seen,
                        });
                    }
                }
                continue;
            };
            match self.readers[i].read()? {
                ReadOutcome::Event(event, pos) => {
                    self.max_seq_seen = self.max_seq_seen.max(event.seq);
                    self.merger.push(event, pos);
                }
                ReadOutcome::Skipped { seq } => {
                    if let Some(s) = seq {
                        self.max_seq_seen = self.max_seq_seen.max(s);
                    }
                }
                ReadOutcome::Poison(p) => self.out.push_back(SourceItem::Poison(p)),
                ReadOutcome::End => {}
            }
        }
    }
}

impl Iterator for EventSource {
    type Item = Result<SourceItem, SourceError>;

    /// The next item; after an error the stream ends.
    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(item) => item.map(Ok),
            Err(e) => {
                self.finished = true;
                self.out.clear();
                Some(Err(e))
            }
        }
    }
}
