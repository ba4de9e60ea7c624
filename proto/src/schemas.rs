//! The `.proto` sources of the recorded topics, as registered in the Schema
//! Registry (subject `<topic>-value`, Confluent's TopicNameStrategy).

/// `vmr/v1/event.proto`: the `Event` envelope.
pub const EVENT_PROTO: &str = include_str!("../proto/vmr/v1/event.proto");
/// `vmr/v1/snapshot.proto`: the `SnapshotManifest`.
pub const SNAPSHOT_PROTO: &str = include_str!("../proto/vmr/v1/snapshot.proto");
/// `vmr/v1/agent.proto`: the capture agent's gRPC service.
pub const AGENT_PROTO: &str = include_str!("../proto/vmr/v1/agent.proto");
/// `vmr/v1/replayer.proto`: the replayer's gRPC service.
pub const REPLAYER_PROTO: &str = include_str!("../proto/vmr/v1/replayer.proto");

/// Fully-qualified name of the event message.
pub const EVENT_MESSAGE: &str = "vmr.v1.Event";
/// Fully-qualified name of the manifest message.
pub const SNAPSHOT_MANIFEST_MESSAGE: &str = "vmr.v1.SnapshotManifest";

/// The subject under which the value schema of `topic` is registered.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// For each topic that carries protobuf values: the topic, the schema source and
/// the index of the value message within that source (Confluent message index).
pub fn topic_value_schemas() -> [(&'static str, &'static str, i32); 5] {
    use crate::topics::*;
    [
        (BLOCK, EVENT_PROTO, 0),
        (NET, EVENT_PROTO, 0),
        (ENV, EVENT_PROTO, 0),
        (LIFECYCLE, EVENT_PROTO, 0),
        (SNAPSHOTS, SNAPSHOT_PROTO, 2),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_indexes_match_sources() {
        // `Event` is the first message of event.proto, `SnapshotManifest` the
        // third of snapshot.proto; the wire format's message index relies on it.
        let first = EVENT_PROTO
            .lines()
            .find(|l| l.starts_with("message "))
            .expect("event.proto declares messages");
        assert_eq!(first, "message Event {");
        let third = SNAPSHOT_PROTO
            .lines()
            .filter(|l| l.starts_with("message "))
            .nth(2)
            .expect("snapshot.proto declares three messages");
        assert_eq!(third, "message SnapshotManifest {");
    }
}
