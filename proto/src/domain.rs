//! Domain types shared by the services, and their conversions to and from the
//! generated protobuf types.
//!
//! Conversions from protobuf validate: an `Event` without a payload, with an
//! unknown enum value or an invalid instance id is refused with a
//! [`ConversionError`] rather than passed on.

use std::fmt;

use crate::{pb, topics};

/// Errors converting generated types into domain types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error("instance id {0:?} is invalid: use 1 to 128 characters from [A-Za-z0-9._-]")]
    InvalidInstanceId(String),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} has unknown value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("{0}")]
    Invalid(String),
}

/// A validated instance identifier: 1 to 128 characters of `[A-Za-z0-9._-]`.
///
/// ```
/// use vmr_proto::InstanceId;
/// assert!(InstanceId::new("web-01").is_ok());
/// assert!(InstanceId::new("../etc").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn new(id: impl Into<String>) -> Result<Self, ConversionError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 128
            && id != "."
            && id != ".."
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(Self(id))
        } else {
            Err(ConversionError::InvalidInstanceId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The partition of this instance on a topic with `partitions` partitions.
    pub fn partition(&self, partitions: i32) -> i32 {
        topics::partition_for(&self.0, partitions)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for InstanceId {
    type Err = ConversionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

macro_rules! enum_conv {
    ($domain:ident, $pb:path, $field:literal, { $($d:ident => $p:ident),+ $(,)? }) => {
        impl From<$domain> for $pb {
            fn from(v: $domain) -> Self {
                match v { $($domain::$d => <$pb>::$p),+ }
            }
        }
        impl TryFrom<i32> for $domain {
            type Error = ConversionError;
            fn try_from(v: i32) -> Result<Self, ConversionError> {
                match <$pb>::try_from(v) {
                    $(Ok(<$pb>::$p) => Ok($domain::$d),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(ConversionError::UnknownEnum { field: $field, value: v }),
                }
            }
        }
    };
}

/// Operation of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}
enum_conv!(BlockOp, pb::BlockOp, "block.op", {
    Read => Read, Write => Write, Flush => Flush, Discard => Discard,
    WriteZeroes => WriteZeroes, GetId => GetId,
});

/// Completion status of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockStatus {
    Ok,
    IoErr,
    Unsupported,
}
enum_conv!(BlockStatus, pb::BlockStatus, "block.status", {
    Ok => Ok, IoErr => Ioerr, Unsupported => Unsupported,
});

/// Direction of a frame, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to guest.
    Rx,
    /// Guest to host.
    Tx,
}
enum_conv!(Direction, pb::Direction, "net.direction", { Rx => Rx, Tx => Tx });

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleKind {
    Boot,
    Pause,
    Resume,
    Snapshot,
    Crash,
    Gap,
    Shutdown,
    TripleFault,
    InternalError,
}
enum_conv!(LifecycleKind, pb::LifecycleKind, "lifecycle.kind", {
    Boot => Boot, Pause => Pause, Resume => Resume, Snapshot => Snapshot,
    Crash => Crash, Gap => Gap, Shutdown => Shutdown, TripleFault => TripleFault,
    InternalError => InternalError,
});

/// A content hash with its algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContentHash {
    Sha256([u8; 32]),
    Xxh3_128([u8; 16]),
}

/// One block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIo {
    pub device: String,
    pub queue: u16,
    pub op: BlockOp,
    pub sector: u64,
    pub len: u32,
    /// Payload of writes.
    pub data: Vec<u8>,
    /// Hash of the data a read returned.
    pub content_hash: Option<ContentHash>,
    pub status: BlockStatus,
}

/// One Ethernet frame (without the virtio-net header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetFrame {
    pub device: String,
    pub queue: u16,
    pub direction: Direction,
    pub frame: Vec<u8>,
}

/// One host sensor reading.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvSample {
    pub sensor: String,
    pub value: f64,
    pub unit: String,
}

/// General-purpose registers of one vCPU.
pub type VcpuRegs = pb::VcpuRegs;

/// Events that were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub first_seq: u64,
    pub count: u64,
    pub reason: String,
}

/// A lifecycle change.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    pub kind: LifecycleKind,
    pub detail: String,
    pub regs: Vec<VcpuRegs>,
    pub gap: Option<Gap>,
    pub snapshot_id: Option<String>,
}

/// What an event records.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Block(BlockIo),
    Net(NetFrame),
    Env(EnvSample),
    Lifecycle(Lifecycle),
}

impl Payload {
    /// The topic this payload is recorded on.
    pub fn topic(&self) -> &'static str {
        match self {
            Payload::Block(_) => topics::BLOCK,
            Payload::Net(_) => topics::NET,
            Payload::Env(_) => topics::ENV,
            Payload::Lifecycle(_) => topics::LIFECYCLE,
        }
    }
}

/// One recorded event of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub instance: InstanceId,
    /// Per-instance sequence number, contiguous across all topics.
    pub seq: u64,
    pub wall_time_ns: u64,
    pub mono_time_ns: u64,
    /// Incarnation of the recording process (0: unknown).
    pub epoch: u64,
    pub payload: Payload,
}

impl Event {
    /// The topic this event is recorded on.
    pub fn topic(&self) -> &'static str {
        self.payload.topic()
    }
}

fn u16_field(v: u32, field: &'static str) -> Result<u16, ConversionError> {
    u16::try_from(v).map_err(|_| ConversionError::Invalid(format!("{field} {v} exceeds 65535")))
}

impl From<ContentHash> for (Vec<u8>, pb::HashAlgorithm) {
    fn from(h: ContentHash) -> Self {
        match h {
            ContentHash::Sha256(b) => (b.to_vec(), pb::HashAlgorithm::Sha256),
            ContentHash::Xxh3_128(b) => (b.to_vec(), pb::HashAlgorithm::Xxh3128),
        }
    }
}

fn hash_from_pb(bytes: Vec<u8>, algo: i32) -> Result<Option<ContentHash>, ConversionError> {
    let wrong_len = |n: usize| ConversionError::Invalid(format!("content hash has {n} bytes"));
    match pb::HashAlgorithm::try_from(algo) {
        Ok(pb::HashAlgorithm::Unspecified) if bytes.is_empty() => Ok(None),
        Ok(pb::HashAlgorithm::Sha256) => bytes
            .as_slice()
            .try_into()
            .map(|b| Some(ContentHash::Sha256(b)))
            .map_err(|_| wrong_len(bytes.len())),
        Ok(pb::HashAlgorithm::Xxh3128) => bytes
            .as_slice()
            .try_into()
            .map(|b| Some(ContentHash::Xxh3_128(b)))
            .map_err(|_| wrong_len(bytes.len())),
        _ => Err(ConversionError::UnknownEnum {
            field: "block.hash_algorithm",
            value: algo,
        }),
    }
}

impl From<BlockIo> for pb::BlockIo {
    fn from(b: BlockIo) -> Self {
        let (content_hash, algo) = match b.content_hash {
            Some(h) => h.into(),
            None => (Vec::new(), pb::HashAlgorithm::Unspecified),
        };
        pb::BlockIo {
            device: b.device,
            queue: u32::from(b.queue),
            op: pb::BlockOp::from(b.op) as i32,
            sector: b.sector,
            len: b.len,
            data: b.data,
            content_hash,
            hash_algorithm: algo as i32,
            status: pb::BlockStatus::from(b.status) as i32,
        }
    }
}

impl TryFrom<pb::BlockIo> for BlockIo {
    type Error = ConversionError;
    fn try_from(b: pb::BlockIo) -> Result<Self, ConversionError> {
        Ok(BlockIo {
            device: b.device,
            queue: u16_field(b.queue, "block.queue")?,
            op: b.op.try_into()?,
            sector: b.sector,
            len: b.len,
            data: b.data,
            content_hash: hash_from_pb(b.content_hash, b.hash_algorithm)?,
            status: b.status.try_into()?,
        })
    }
}

impl From<NetFrame> for pb::NetFrame {
    fn from(n: NetFrame) -> Self {
        pb::NetFrame {
            device: n.device,
            queue: u32::from(n.queue),
            direction: pb::Direction::from(n.direction) as i32,
            frame: n.frame,
        }
    }
}

impl TryFrom<pb::NetFrame> for NetFrame {
    type Error = ConversionError;
    fn try_from(n: pb::NetFrame) -> Result<Self, ConversionError> {
        Ok(NetFrame {
            device: n.device,
            queue: u16_field(n.queue, "net.queue")?,
            direction: n.direction.try_into()?,
            frame: n.frame,
        })
    }
}

impl From<Lifecycle> for pb::Lifecycle {
    fn from(l: Lifecycle) -> Self {
        pb::Lifecycle {
            kind: pb::LifecycleKind::from(l.kind) as i32,
            detail: l.detail,
            regs: l.regs,
            gap: l.gap.map(|g| pb::Gap {
                first_seq: g.first_seq,
                count: g.count,
                reason: g.reason,
            }),
            snapshot_id: l.snapshot_id.unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Lifecycle> for Lifecycle {
    type Error = ConversionError;
    fn try_from(l: pb::Lifecycle) -> Result<Self, ConversionError> {
        let kind: LifecycleKind = l.kind.try_into()?;
        if kind == LifecycleKind::Gap && l.gap.is_none() {
            return Err(ConversionError::Missing("lifecycle.gap"));
        }
        Ok(Lifecycle {
            kind,
            detail: l.detail,
            regs: l.regs,
            gap: l.gap.map(|g| Gap {
                first_seq: g.first_seq,
                count: g.count,
                reason: g.reason,
            }),
            snapshot_id: (!l.snapshot_id.is_empty()).then_some(l.snapshot_id),
        })
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        use pb::event::Payload as P;
        let payload = match e.payload {
            Payload::Block(b) => P::Block(b.into()),
            Payload::Net(n) => P::Net(n.into()),
            Payload::Env(s) => P::Env(pb::EnvSample {
                sensor: s.sensor,
                value: s.value,
                unit: s.unit,
            }),
            Payload::Lifecycle(l) => P::Lifecycle(l.into()),
        };
        pb::Event {
            instance_id: e.instance.0,
            seq: e.seq,
            wall_time_ns: e.wall_time_ns,
            mono_time_ns: e.mono_time_ns,
            epoch: e.epoch,
            payload: Some(payload),
        }
    }
}

impl TryFrom<pb::Event> for Event {
    type Error = ConversionError;
    fn try_from(e: pb::Event) -> Result<Self, ConversionError> {
        use pb::event::Payload as P;
        let payload = match e.payload.ok_or(ConversionError::Missing("event.payload"))? {
            P::Block(b) => Payload::Block(b.try_into()?),
            P::Net(n) => Payload::Net(n.try_into()?),
            P::Env(s) => Payload::Env(EnvSample {
                sensor: s.sensor,
                value: s.value,
                unit: s.unit,
            }),
            P::Lifecycle(l) => Payload::Lifecycle(l.try_into()?),
        };
        if e.seq == 0 {
            return Err(ConversionError::Invalid("event.seq starts at 1".into()));
        }
        Ok(Event {
            instance: InstanceId::new(e.instance_id)?,
            seq: e.seq,
            wall_time_ns: e.wall_time_ns,
            mono_time_ns: e.mono_time_ns,
            epoch: e.epoch,
            payload,
        })
    }
}

/// One object of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotObject {
    pub kind: String,
    pub key: String,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    pub size: u64,
}

/// Next offset to read on one topic partition after a snapshot's cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub instance: InstanceId,
    pub snapshot_id: String,
    pub base_snapshot_id: Option<String>,
    pub driver: String,
    pub image: String,
    pub seq_at_cut: u64,
    pub wall_time_ns: u64,
    pub mono_time_ns: u64,
    pub objects: Vec<SnapshotObject>,
    pub offsets: Vec<TopicOffset>,
}

impl SnapshotManifest {
    /// The record key on `vmr.snapshots.v1`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.instance, self.snapshot_id)
    }

    /// The next offset to read on `topic` after the cut, if recorded.
    pub fn offset_for(&self, topic: &str) -> Option<&TopicOffset> {
        self.offsets.iter().find(|o| o.topic == topic)
    }
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl From<SnapshotManifest> for pb::SnapshotManifest {
    fn from(m: SnapshotManifest) -> Self {
        pb::SnapshotManifest {
            instance_id: m.instance.0,
            snapshot_id: m.snapshot_id,
            base_snapshot_id: m.base_snapshot_id.unwrap_or_default(),
            driver: m.driver,
            image: m.image,
            seq_at_cut: m.seq_at_cut,
            wall_time_ns: m.wall_time_ns,
            mono_time_ns: m.mono_time_ns,
            objects: m
                .objects
                .into_iter()
                .map(|o| pb::SnapshotObject {
                    kind: o.kind,
                    key: o.key,
                    sha256: o.sha256,
                    size: o.size,
                    ..Default::default()
                })
                .collect(),
            offsets: m
                .offsets
                .into_iter()
                .map(|o| pb::TopicOffset {
                    topic: o.topic,
                    partition: o.partition,
                    next_offset: o.next_offset,
                })
                .collect(),
            // The full manifest (host, digest, disk layers) is vmr-snapshot's
            // `Manifest`; this summary leaves those fields empty.
            ..Default::default()
        }
    }
}

impl TryFrom<pb::SnapshotManifest> for SnapshotManifest {
    type Error = ConversionError;
    fn try_from(m: pb::SnapshotManifest) -> Result<Self, ConversionError> {
        if m.snapshot_id.is_empty() {
            return Err(ConversionError::Missing("manifest.snapshot_id"));
        }
        if m.driver.is_empty() {
            return Err(ConversionError::Missing("manifest.driver"));
        }
        let objects = m
            .objects
            .into_iter()
            .map(|o| {
                if !is_hex_sha256(&o.sha256) {
                    return Err(ConversionError::Invalid(format!(
                        "object {:?} has an invalid sha256",
                        o.key
                    )));
                }
                Ok(SnapshotObject {
                    kind: o.kind,
                    key: o.key,
                    sha256: o.sha256,
                    size: o.size,
                })
            })
            .collect::<Result<_, _>>()?;
        let offsets = m
            .offsets
            .into_iter()
            .map(|o| {
                if o.partition < 0 || o.next_offset < 0 {
                    return Err(ConversionError::Invalid(format!(
                        "offset {}/{}@{} is negative",
                        o.topic, o.partition, o.next_offset
                    )));
                }
                Ok(TopicOffset {
                    topic: o.topic,
                    partition: o.partition,
                    next_offset: o.next_offset,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SnapshotManifest {
            instance: InstanceId::new(m.instance_id)?,
            snapshot_id: m.snapshot_id,
            base_snapshot_id: (!m.base_snapshot_id.is_empty()).then_some(m.base_snapshot_id),
            driver: m.driver,
            image: m.image,
            seq_at_cut: m.seq_at_cut,
            wall_time_ns: m.wall_time_ns,
            mono_time_ns: m.mono_time_ns,
            objects,
            offsets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn block_event() -> Event {
        Event {
            instance: InstanceId::new("vm-7").unwrap(),
            seq: 42,
            wall_time_ns: 1_700_000_000_000_000_000,
            mono_time_ns: 99,
            epoch: 3,
            payload: Payload::Block(BlockIo {
                device: "vda".into(),
                queue: 1,
                op: BlockOp::Read,
                sector: 8,
                len: 4096,
                data: vec![],
                content_hash: Some(ContentHash::Sha256([7; 32])),
                status: BlockStatus::Ok,
            }),
        }
    }

    #[test]
    fn event_round_trips_through_protobuf_bytes() {
        let e = block_event();
        let bytes = pb::Event::from(e.clone()).encode_to_vec();
        let back = Event::try_from(pb::Event::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.topic(), topics::BLOCK);
    }

    #[test]
    fn invalid_events_are_refused() {
        let mut p = pb::Event::from(block_event());
        p.payload = None;
        assert_eq!(
            Event::try_from(p).unwrap_err(),
            ConversionError::Missing("event.payload")
        );
        let mut p = pb::Event::from(block_event());
        p.instance_id = "a/b".into();
        assert!(matches!(
            Event::try_from(p),
            Err(ConversionError::InvalidInstanceId(_))
        ));
        let mut p = pb::Event::from(block_event());
        if let Some(pb::event::Payload::Block(b)) = &mut p.payload {
            b.op = 77;
        }
        assert!(matches!(
            Event::try_from(p),
            Err(ConversionError::UnknownEnum { value: 77, .. })
        ));
    }

    #[test]
    fn manifest_round_trip_and_validation() {
        let m = SnapshotManifest {
            instance: InstanceId::new("vm-7").unwrap(),
            snapshot_id: "s-1".into(),
            base_snapshot_id: None,
            driver: "qemu".into(),
            image: "debian".into(),
            seq_at_cut: 10,
            wall_time_ns: 1,
            mono_time_ns: 2,
            objects: vec![SnapshotObject {
                kind: "memory".into(),
                key: "vm-7/s-1/memory".into(),
                sha256: "ab".repeat(32),
                size: 4096,
            }],
            offsets: vec![TopicOffset {
                topic: topics::NET.into(),
                partition: 3,
                next_offset: 17,
            }],
        };
        assert_eq!(m.key(), "vm-7/s-1");
        let back = SnapshotManifest::try_from(pb::SnapshotManifest::from(m.clone())).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.offset_for(topics::NET).unwrap().next_offset, 17);
        let mut bad = pb::SnapshotManifest::from(m);
        bad.objects[0].sha256 = "xyz".into();
        assert!(SnapshotManifest::try_from(bad).is_err());
    }
}
