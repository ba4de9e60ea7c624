//! Publishing manifests to the compacted `vmr.snapshots.v1` topic.
//!
//! The record key is `<instance>/<snapshot-id>`; the value is the
//! `vmr.v1.SnapshotManifest` in the Confluent wire format (magic 0, the
//! schema id registered for `vmr.snapshots.v1-value`, message index 2,
//! protobuf). The partition is the instance's, chosen from the murmur2 hash
//! of the instance id like every other vmreplay topic, so one consumer of
//! one partition sees all of an instance's manifests in order.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use schema_registry::codec;
use vmr_proto::topics;

use crate::manifest::{Manifest, ManifestError};

/// The Confluent message index of `SnapshotManifest` in `snapshot.proto`.
pub const MANIFEST_MESSAGE_INDEX: i32 = 2;

/// Errors publishing or decoding a manifest record.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker's metadata for the topic cannot be read.
    #[error("cannot read the partitions of {topic}: {reason}")]
    Metadata {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The broker did not acknowledge the record.
    #[error("publishing manifest {key} to {topic} failed")]
    Send {
        /// The record key.
        key: String,
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// A record value is not a framed manifest.
    #[error("record value is not a framed manifest: {0}")]
    Framing(String),
    /// The manifest inside is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Where a manifest landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
}

/// The record value for `m`: the Confluent frame with `schema_id`.
pub fn encode_value(schema_id: u32, m: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_message(
        schema_id,
        &[MANIFEST_MESSAGE_INDEX],
        &m.to_proto(),
        &mut out,
    );
    out
}

/// Decodes and checks a record value of `vmr.snapshots.v1`; returns the
/// schema id and the manifest.
pub fn decode_value(value: &[u8]) -> Result<(u32, Manifest), PublishError> {
    let f = codec::decode(value).map_err(|e| PublishError::Framing(e.to_string()))?;
    if f.message_indexes.as_slice() != [MANIFEST_MESSAGE_INDEX] {
        return Err(PublishError::Framing(format!(
            "message indexes {:?} are not those of SnapshotManifest ([{MANIFEST_MESSAGE_INDEX}])",
            f.message_indexes.as_slice()
        )));
    }
    Ok((f.schema_id, Manifest::decode(f.payload)?))
}

/// Publishes `m` to `vmr.snapshots.v1` (partition of its instance, key
/// `<instance>/<snapshot-id>`) and waits up to `timeout` for the broker's
/// acknowledgement. `schema_id` is the id registered for the topic's value
/// subject.
pub async fn publish(
    producer: &FutureProducer,
    schema_id: u32,
    m: &Manifest,
    timeout: Duration,
) -> Result<Published, PublishError> {
    let topic = topics::SNAPSHOTS;
    let p = producer.clone();
    let partitions = tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(Some(topic), Timeout::After(timeout))
            .map_err(|e| e.to_string())
            .and_then(|md| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len() as i32)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| "the topic has no partitions (not created?)".to_string())
            })
    })
    .await
    .map_err(|e| PublishError::Metadata {
        topic: topic.into(),
        reason: e.to_string(),
    })?
    .map_err(|reason| PublishError::Metadata {
        topic: topic.into(),
        reason,
    })?;
    let key = m.key();
    let value = encode_value(schema_id, m);
    let partition = topics::partition_for(&m.instance, partitions);
    let record = FutureRecord::to(topic)
        .key(&key)
        .payload(&value)
        .partition(partition);
    let d = producer
        .send(record, Timeout::After(timeout))
        .await
        .map_err(|(source, _)| PublishError::Send {
            key: key.clone(),
            topic: topic.into(),
            source: Box::new(source),
        })?;
    Ok(Published {
        partition: d.partition,
        offset: d.offset,
    })
}
