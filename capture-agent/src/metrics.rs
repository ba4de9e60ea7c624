//! Counters of a shipper, shared with whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident ),+ $(,)?) => {
        /// Counters (monotonic) and gauges of one shipper.
        #[derive(Debug, Default)]
        pub struct ShipperMetrics {
            $( $(#[$doc])* pub $name: AtomicU64, )+
            /// Acknowledged events and value bytes per event topic.
            pub per_topic: TopicCounters,
        }

        /// A copy of [`ShipperMetrics`] at one moment.
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct MetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )+
        }

        impl ShipperMetrics {
            /// The current values.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )+ }
            }
        }
    };
}

metrics! {
    /// Events read from the spool.
    records_read,
    /// Events handed to the producer.
    records_sent,
    /// Events the broker acknowledged.
    records_acked,
    /// Value bytes the broker acknowledged.
    bytes_acked,
    /// Events found already in Kafka at a (re)start and not sent again.
    records_already_shipped,
    /// Damaged spool regions reported by the framing layer and skipped.
    corrupt_frames,
    /// Bytes in those regions.
    corrupt_bytes,
    /// Events refused before sending: another instance's, or invalid.
    invalid_records,
    /// Deliveries the producer reported as failed.
    delivery_errors,
    /// Records the producer refused to take.
    produce_errors,
    /// Errors the Kafka client reported (broker down, transport, fatal).
    broker_errors,
    /// Failed broker requests of the shipper itself (metadata, watermarks,
    /// tail scan).
    metadata_errors,
    /// Failed Schema Registry requests.
    registry_errors,
    /// Positions committed to the spool.
    commits,
    /// Commits that failed.
    commit_errors,
    /// Sessions started (1 + restarts after failures).
    sessions,
    /// Gauge: events sent and not yet acknowledged.
    in_flight,
    /// Gauge: `seq` of the last committed event.
    committed_seq,
    /// Gauge: highest `seq` acknowledged.
    acked_seq,
    /// Gauge: highest `seq` read from the source.
    read_seq,
    /// Gauge: 1 while the shipper is connected and shipping, 0 while it
    /// waits to retry.
    up,
}

/// Acknowledged events and value bytes per event topic (in the order of
/// [`vmr_proto::topics::EVENT_TOPICS`]).
#[derive(Debug, Default)]
pub struct TopicCounters {
    events: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
}

impl TopicCounters {
    pub(crate) fn acked(&self, topic: &str, bytes: u64) {
        if let Some(i) = vmr_proto::topics::EVENT_TOPICS
            .iter()
            .position(|t| *t == topic)
        {
            self.events[i].fetch_add(1, Ordering::Relaxed);
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// `(topic, events, bytes)` for each event topic.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        vmr_proto::topics::EVENT_TOPICS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    *t,
                    self.events[i].load(Ordering::Relaxed),
                    self.bytes[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

impl ShipperMetrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    pub(crate) fn max(c: &AtomicU64, v: u64) {
        c.fetch_max(v, Ordering::Relaxed);
    }
}
