//! The Kafka layout: topic names and the partitioning rule.
//!
//! Every record of an instance goes to the same partition of each topic, chosen
//! from the murmur2 hash of the instance id exactly as Java's default
//! partitioner does (`toPositive(murmur2(key)) % partitions`), so that every
//! producer and consumer, in any language, agrees and per-instance order holds.

/// Block requests (`Event` with `BlockIo`).
pub const BLOCK: &str = "vmr.block.v1";
/// Network frames (`Event` with `NetFrame`).
pub const NET: &str = "vmr.net.v1";
/// Host sensor samples (`Event` with `EnvSample`).
pub const ENV: &str = "vmr.env.v1";
/// Lifecycle changes (`Event` with `Lifecycle`).
pub const LIFECYCLE: &str = "vmr.lifecycle.v1";
/// Snapshot manifests, compacted, keyed `instance/snapshot-id`.
pub const SNAPSHOTS: &str = "vmr.snapshots.v1";
/// The Schema Registry's own log, compacted, one partition.
pub const SCHEMAS: &str = "_schemas";

/// The event topics, in the order a replayer merges them.
pub const EVENT_TOPICS: [&str; 4] = [BLOCK, NET, ENV, LIFECYCLE];

/// Largest record value accepted on the block topic (`max.message.bytes`).
pub const BLOCK_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// How a topic is created: partitions and topic-level configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: &'static str,
    /// `None` means "the cluster's configured default for event topics".
    pub partitions: Option<i32>,
    pub configs: Vec<(&'static str, String)>,
}

/// The topics vmreplay needs, with their configuration. Event topics get
/// `event_partitions` partitions.
pub fn topic_specs(event_partitions: i32) -> Vec<TopicSpec> {
    let delete = |name, extra: Vec<(&'static str, String)>| {
        let mut configs = vec![("cleanup.policy", "delete".to_string())];
        configs.extend(extra);
        TopicSpec {
            name,
            partitions: Some(event_partitions),
            configs,
        }
    };
    vec![
        delete(
            BLOCK,
            vec![("max.message.bytes", BLOCK_MAX_MESSAGE_BYTES.to_string())],
        ),
        delete(NET, vec![]),
        delete(ENV, vec![]),
        delete(LIFECYCLE, vec![]),
        TopicSpec {
            name: SNAPSHOTS,
            partitions: Some(event_partitions),
            configs: vec![("cleanup.policy", "compact".to_string())],
        },
        TopicSpec {
            name: SCHEMAS,
            partitions: Some(1),
            configs: vec![("cleanup.policy", "compact".to_string())],
        },
    ]
}

/// Kafka's murmur2 hash (the variant used by the Java client's partitioner).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `instance_id` on a topic with `partitions` partitions.
///
/// # Panics
/// Never for `partitions > 0`; `partitions` must be positive.
pub fn partition_for(instance_id: &str, partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(instance_id.as_bytes()) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_java_client() {
        // Reference values from Kafka's own `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for n in 1..16 {
            let p = partition_for("vm-0001", n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for("vm-0001", n));
        }
    }

    #[test]
    fn specs_cover_every_topic() {
        let specs = topic_specs(4);
        let names: Vec<_> = specs.iter().map(|s| s.name).collect();
        for t in EVENT_TOPICS.iter().chain([&SNAPSHOTS, &SCHEMAS]) {
            assert!(names.contains(t), "{t} missing");
        }
        let schemas = specs.iter().find(|s| s.name == SCHEMAS).unwrap();
        assert_eq!(schemas.partitions, Some(1));
        let block = specs.iter().find(|s| s.name == BLOCK).unwrap();
        assert!(block
            .configs
            .contains(&("max.message.bytes", "8388608".to_string())));
    }
}
