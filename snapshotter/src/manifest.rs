//! The snapshot manifest: what a snapshot consists of and where its objects
//! are, written as `manifest.json` beside the objects and published to
//! `vmr.snapshots.v1` as a `vmr.v1.SnapshotManifest`.
//!
//! Every object key is relative to the instance's prefix in the store, so a
//! snapshot stays restorable when its objects move to another bucket or host.
//! A manifest carries a digest of its own protobuf encoding, so an edited or
//! damaged manifest is refused.

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmr_hypervisor::artifacts::HostInfo;
use vmr_hypervisor::MemoryKind;
use vmr_proto::pb;

/// Version of the manifest layout this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// The manifest's file name beside the objects of a snapshot.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Longest chain of base snapshots followed on restore.
pub const MAX_CHAIN: usize = 64;

/// Errors reading or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON or protobuf for a manifest.
    #[error("manifest {what} is malformed: {reason}")]
    Malformed {
        /// Which manifest (`<instance>/<snapshot-id>` or a file).
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A field is missing or out of range.
    #[error("manifest {what} is invalid: {reason}")]
    Invalid {
        /// Which manifest.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The digest does not match the content: edited or damaged.
    #[error("manifest {what} does not match its digest (edited or damaged): recorded {recorded}, content hashes to {actual}")]
    Digest {
        /// Which manifest.
        what: String,
        /// The digest it carries.
        recorded: String,
        /// The digest of its content.
        actual: String,
    },
    /// Written by a newer (or unknown) layout version.
    #[error("manifest {what} has version {version}; this build reads version {MANIFEST_VERSION}")]
    Version {
        /// Which manifest.
        what: String,
        /// Its version.
        version: u32,
    },
}

impl ManifestError {
    /// The same error, naming the manifest `what` (a file) instead.
    fn naming(self, what: &str) -> Self {
        let what = what.to_string();
        match self {
            ManifestError::Malformed { reason, .. } => ManifestError::Malformed { what, reason },
            ManifestError::Invalid { reason, .. } => ManifestError::Invalid { what, reason },
            ManifestError::Digest {
                recorded, actual, ..
            } => ManifestError::Digest {
                what,
                recorded,
                actual,
            },
            ManifestError::Version { version, .. } => ManifestError::Version { what, version },
        }
    }
}

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// Guest memory (full, or the pages dirtied since the base snapshot).
    Memory,
    /// vCPU, device and machine state.
    State,
    /// QEMU's migration stream (memory and device state together).
    MigrationStream,
    /// The microVM's device map (`devices.json`).
    Devices,
    /// The driver's `artifacts.json`.
    Artifacts,
    /// One copy-on-write layer of a disk's chain.
    DiskLayer,
}

impl ObjectKind {
    /// The name used in the protobuf manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Memory => "memory",
            ObjectKind::State => "state",
            ObjectKind::MigrationStream => "migration_stream",
            ObjectKind::Devices => "devices",
            ObjectKind::Artifacts => "artifacts",
            ObjectKind::DiskLayer => "disk_layer",
        }
    }

    /// The kind called `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "memory" => ObjectKind::Memory,
            "state" => ObjectKind::State,
            "migration_stream" => ObjectKind::MigrationStream,
            "devices" => ObjectKind::Devices,
            "artifacts" => ObjectKind::Artifacts,
            "disk_layer" => ObjectKind::DiskLayer,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a disk layer sits in its disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLayer {
    /// Disk device name (`vda`).
    pub device: String,
    /// Position in the chain: 0 lies on the machine image, n on n-1.
    pub position: u32,
    /// What it lies on: the key of the layer at `position - 1`, or
    /// `image:<image>` for position 0.
    pub base: String,
}

/// One object of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    /// File name it is materialised as (inside the snapshot directory, or
    /// the disk layer directory for disk layers).
    pub name: String,
    /// What it holds.
    pub kind: ObjectKind,
    /// Key relative to the instance's prefix (`<snapshot-id>/<file>`).
    pub key: String,
    /// Lower-case hex SHA-256 of its bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Its place in a disk chain (kind `disk_layer` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskLayer>,
}

/// Where to resume one topic partition after the cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionOffset {
    /// Topic name.
    pub topic: String,
    /// The instance's partition on it.
    pub partition: i32,
    /// The earliest offset that can hold an event with a `seq` after the
    /// cut.
    pub next_offset: i64,
}

/// A snapshot manifest (`manifest.json`; `vmr.v1.SnapshotManifest` on the
/// topic). Field meanings are those of `snapshot.proto`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version ([`MANIFEST_VERSION`]).
    pub manifest_version: u32,
    /// The instance.
    pub instance: String,
    /// The snapshot's id (its directory name when materialised).
    pub snapshot_id: String,
    /// The snapshot this one is an increment of.
    pub base_snapshot_id: Option<String>,
    /// The driver that wrote it.
    pub driver: String,
    /// The driver's format version of its files.
    pub driver_format: u32,
    /// Machine image the instance booted from.
    pub image: String,
    /// Full or incremental memory.
    pub memory: MemoryKind,
    /// The instance's `seq` at the cut.
    pub seq_at_cut: u64,
    /// Wall-clock time of the cut, ns since the Unix epoch.
    pub wall_time_ns: u64,
    /// Host monotonic time of the cut, ns (0 when unknown).
    pub mono_time_ns: u64,
    /// Guest pause for the cut, µs (0 when not paused by the driver).
    pub pause_us: u64,
    /// When the last object was stored, ns since the Unix epoch.
    pub uploaded_at_ns: u64,
    /// The host it was taken on.
    pub host: HostInfo,
    /// Its objects.
    pub objects: Vec<ObjectEntry>,
    /// Where to resume each topic partition after the cut.
    pub offsets: Vec<PartitionOffset>,
    /// SHA-256 of the protobuf encoding with this field empty.
    pub digest: String,
}

/// Whether `s` is usable as one path segment of a key (instance and
/// snapshot ids, object names).
pub fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Whether `key` is a relative key of segments (no `..`, no empty or
/// absolute parts).
pub fn is_relative_key(key: &str) -> bool {
    !key.is_empty() && key.split('/').all(is_segment)
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl Manifest {
    /// `<instance>/<snapshot-id>`: the record key on `vmr.snapshots.v1`
    /// and the manifest's directory in the store.
    pub fn key(&self) -> String {
        format!("{}/{}", self.instance, self.snapshot_id)
    }

    /// Total bytes of its objects.
    pub fn total_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// The disk layers, ordered by device then position.
    pub fn disk_layers(&self) -> Vec<&ObjectEntry> {
        let mut v: Vec<&ObjectEntry> = self
            .objects
            .iter()
            .filter(|o| o.kind == ObjectKind::DiskLayer)
            .collect();
        v.sort_by(|a, b| {
            let (da, db) = (a.disk.as_ref(), b.disk.as_ref());
            (da.map(|d| &d.device), da.map(|d| d.position))
                .cmp(&(db.map(|d| &d.device), db.map(|d| d.position)))
        });
        v
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::SnapshotManifest {
        pb::SnapshotManifest {
            instance_id: self.instance.clone(),
            snapshot_id: self.snapshot_id.clone(),
            base_snapshot_id: self.base_snapshot_id.clone().unwrap_or_default(),
            driver: self.driver.clone(),
            image: self.image.clone(),
            seq_at_cut: self.seq_at_cut,
            wall_time_ns: self.wall_time_ns,
            mono_time_ns: self.mono_time_ns,
            objects: self
                .objects
                .iter()
                .map(|o| pb::SnapshotObject {
                    kind: o.kind.as_str().into(),
                    key: o.key.clone(),
                    sha256: o.sha256.clone(),
                    size: o.size,
                    name: o.name.clone(),
                    disk: o.disk.as_ref().map(|d| pb::DiskLayer {
                        device: d.device.clone(),
                        position: d.position,
                        base: d.base.clone(),
                    }),
                })
                .collect(),
            offsets: self
                .offsets
                .iter()
                .map(|o| pb::TopicOffset {
                    topic: o.topic.clone(),
                    partition: o.partition,
                    next_offset: o.next_offset,
                })
                .collect(),
            manifest_version: self.manifest_version,
            driver_format: self.driver_format,
            memory: match self.memory {
                MemoryKind::Full => "full".into(),
                MemoryKind::Incremental => "incremental".into(),
            },
            host: Some(pb::SnapshotHost {
                cpu_model: self.host.cpu_model.clone(),
                tsc_khz: self.host.tsc_khz.unwrap_or(0),
            }),
            pause_us: self.pause_us,
            uploaded_at_ns: self.uploaded_at_ns,
            digest: self.digest.clone(),
        }
    }

    /// Reads the protobuf form, checking it ([`Manifest::check`]).
    pub fn from_proto(m: pb::SnapshotManifest) -> Result<Self, ManifestError> {
        let what = format!("{}/{}", m.instance_id, m.snapshot_id);
        let invalid = |reason: String| ManifestError::Invalid {
            what: what.clone(),
            reason,
        };
        let memory = match m.memory.as_str() {
            "full" => MemoryKind::Full,
            "incremental" => MemoryKind::Incremental,
            other => {
                return Err(invalid(format!(
                    "memory {other:?} is neither full nor incremental"
                )))
            }
        };
        let objects = m
            .objects
            .into_iter()
            .map(|o| {
                let kind = ObjectKind::parse(&o.kind).ok_or_else(|| {
                    invalid(format!("object {:?} has unknown kind {:?}", o.key, o.kind))
                })?;
                Ok(ObjectEntry {
                    name: o.name,
                    kind,
                    key: o.key,
                    sha256: o.sha256,
                    size: o.size,
                    disk: o.disk.map(|d| DiskLayer {
                        device: d.device,
                        position: d.position,
                        base: d.base,
                    }),
                })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        let host = m.host.unwrap_or_default();
        let out = Manifest {
            manifest_version: m.manifest_version,
            instance: m.instance_id,
            snapshot_id: m.snapshot_id,
            base_snapshot_id: (!m.base_snapshot_id.is_empty()).then_some(m.base_snapshot_id),
            driver: m.driver,
            driver_format: m.driver_format,
            image: m.image,
            memory,
            seq_at_cut: m.seq_at_cut,
            wall_time_ns: m.wall_time_ns,
            mono_time_ns: m.mono_time_ns,
            pause_us: m.pause_us,
            uploaded_at_ns: m.uploaded_at_ns,
            host: HostInfo {
                cpu_model: host.cpu_model,
                tsc_khz: (host.tsc_khz != 0).then_some(host.tsc_khz),
            },
            objects,
            offsets: m
                .offsets
                .into_iter()
                .map(|o| PartitionOffset {
                    topic: o.topic,
                    partition: o.partition,
                    next_offset: o.next_offset,
                })
                .collect(),
            digest: m.digest,
        };
        out.check()?;
        Ok(out)
    }

    /// Decodes a protobuf-encoded manifest and checks it.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m = pb::SnapshotManifest::decode(bytes).map_err(|e| ManifestError::Malformed {
            what: "(protobuf)".into(),
            reason: e.to_string(),
        })?;
        Self::from_proto(m)
    }

    /// The protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// The digest of the content: SHA-256 of the protobuf encoding with
    /// `digest` empty.
    pub fn compute_digest(&self) -> String {
        let mut p = self.to_proto();
        p.digest.clear();
        hex(&Sha256::digest(p.encode_to_vec()))
    }

    /// Sets `digest` from the content.
    pub fn seal(&mut self) {
        self.digest = self.compute_digest();
    }

    /// `manifest.json`'s content.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }

    /// Reads `manifest.json` content and checks it. `what` names it in
    /// errors.
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            what: what.into(),
            reason: e.to_string(),
        })?;
        m.check().map_err(|e| e.naming(what))?;
        Ok(m)
    }

    /// Checks the version, the digest and every field: ids are path
    /// segments, keys are relative, sha256s are hex, an incremental
    /// snapshot names its base, disk chains are complete.
    pub fn check(&self) -> Result<(), ManifestError> {
        let what = self.key();
        let invalid = |reason: String| ManifestError::Invalid {
            what: what.clone(),
            reason,
        };
        if self.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version {
                what,
                version: self.manifest_version,
            });
        }
        let actual = self.compute_digest();
        if actual != self.digest {
            return Err(ManifestError::Digest {
                what,
                recorded: self.digest.clone(),
                actual,
            });
        }
        if !is_segment(&self.instance) {
            return Err(invalid(format!(
                "instance id {:?} is not a valid id",
                self.instance
            )));
        }
        if !is_segment(&self.snapshot_id) {
            return Err(invalid(format!(
                "snapshot id {:?} is not a valid id",
                self.snapshot_id
            )));
        }
        if self.driver.is_empty() {
            return Err(invalid("names no driver".into()));
        }
        match (&self.base_snapshot_id, self.memory) {
            (Some(b), _) if !is_segment(b) || *b == self.snapshot_id => {
                return Err(invalid(format!("base snapshot id {b:?} is not valid")))
            }
            (None, MemoryKind::Incremental) => {
                return Err(invalid("incremental memory but no base snapshot".into()))
            }
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for o in &self.objects {
            if !is_relative_key(&o.key) {
                return Err(invalid(format!(
                    "object key {:?} is not a relative key (segments of letters, digits, '.', '_', '-')",
                    o.key
                )));
            }
            if !is_segment(&o.name) {
                return Err(invalid(format!(
                    "object {} has an invalid name {:?}",
                    o.key, o.name
                )));
            }
            if !is_hex_sha256(&o.sha256) {
                return Err(invalid(format!(
                    "object {} has an invalid sha256 {:?}",
                    o.key, o.sha256
                )));
            }
            if (o.kind == ObjectKind::DiskLayer) != o.disk.is_some() {
                return Err(invalid(format!(
                    "object {} is of kind {} but {} disk layer position",
                    o.key,
                    o.kind,
                    if o.disk.is_some() { "has a" } else { "has no" }
                )));
            }
            let scope = o.disk.as_ref().map(|d| d.device.as_str()).unwrap_or("");
            if !names.insert((scope.to_string(), o.name.clone())) {
                return Err(invalid(format!("object name {:?} appears twice", o.name)));
            }
        }
        // Each disk's layers are 0..n, each on the one below.
        let layers = self.disk_layers();
        for (i, o) in layers.iter().enumerate() {
            let d = o
                .disk
                .as_ref()
                .expect("disk_layers() returns disk layers only");
            let prev = i
                .checked_sub(1)
                .map(|j| layers[j])
                .filter(|p| p.disk.as_ref().map(|pd| &pd.device) == Some(&d.device));
            let (want_pos, want_base) = match prev {
                Some(p) => (
                    p.disk.as_ref().map(|pd| pd.position + 1).unwrap_or(0),
                    p.key.clone(),
                ),
                None => (0, format!("image:{}", self.image)),
            };
            if d.position != want_pos || d.base != want_base {
                return Err(invalid(format!(
                    "disk {} layer {} at position {} on {:?}: expected position {want_pos} on {want_base:?}",
                    d.device, o.key, d.position, d.base
                )));
            }
        }
        for o in &self.offsets {
            if o.partition < 0 || o.next_offset < 0 || o.topic.is_empty() {
                return Err(invalid(format!(
                    "offset {}/{}@{} is invalid",
                    o.topic, o.partition, o.next_offset
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest {
            manifest_version: MANIFEST_VERSION,
            instance: "vm-1".into(),
            snapshot_id: "s-2".into(),
            base_snapshot_id: Some("s-1".into()),
            driver: "microvm".into(),
            driver_format: 1,
            image: "test-guest".into(),
            memory: MemoryKind::Incremental,
            seq_at_cut: 41,
            wall_time_ns: 5,
            mono_time_ns: 6,
            pause_us: 7,
            uploaded_at_ns: 8,
            host: HostInfo {
                cpu_model: "cpu".into(),
                tsc_khz: Some(2_000_000),
            },
            objects: vec![
                ObjectEntry {
                    name: "memory.incr".into(),
                    kind: ObjectKind::Memory,
                    key: "s-2/memory.incr".into(),
                    sha256: "ab".repeat(32),
                    size: 4096,
                    disk: None,
                },
                ObjectEntry {
                    name: "vda.0".into(),
                    kind: ObjectKind::DiskLayer,
                    key: "s-1/disk/vda.0".into(),
                    sha256: "cd".repeat(32),
                    size: 10,
                    disk: Some(DiskLayer {
                        device: "vda".into(),
                        position: 0,
                        base: "image:test-guest".into(),
                    }),
                },
                ObjectEntry {
                    name: "vda.1".into(),
                    kind: ObjectKind::DiskLayer,
                    key: "s-2/disk/vda.1".into(),
                    sha256: "ef".repeat(32),
                    size: 11,
                    disk: Some(DiskLayer {
                        device: "vda".into(),
                        position: 1,
                        base: "s-1/disk/vda.0".into(),
                    }),
                },
            ],
            offsets: vec![PartitionOffset {
                topic: "vmr.net.v1".into(),
                partition: 2,
                next_offset: 9,
            }],
            digest: String::new(),
        };
        m.seal();
        m
    }

    #[test]
    fn json_and_protobuf_round_trip() {
        let m = sample();
        m.check().unwrap();
        assert_eq!(Manifest::from_json("t", &m.to_json()).unwrap(), m);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.key(), "vm-1/s-2");
    }

    #[test]
    fn edits_and_bad_fields_are_refused() {
        let mut m = sample();
        m.seq_at_cut += 1;
        let e = m.check().unwrap_err();
        assert!(matches!(e, ManifestError::Digest { .. }), "{e}");

        let mut m = sample();
        m.objects[0].key = "../other/memory".into();
        m.seal();
        let e = m.check().unwrap_err().to_string();
        assert!(e.contains("not a relative key"), "{e}");

        let mut m = sample();
        m.objects[2].disk.as_mut().unwrap().position = 2;
        m.seal();
        let e = m.check().unwrap_err().to_string();
        assert!(e.contains("expected position 1"), "{e}");

        let mut m = sample();
        m.base_snapshot_id = None;
        m.seal();
        let e = m.check().unwrap_err().to_string();
        assert!(e.contains("no base snapshot"), "{e}");

        let mut m = sample();
        m.manifest_version = 9;
        m.seal();
        assert!(matches!(
            m.check(),
            Err(ManifestError::Version { version: 9, .. })
        ));

        let e = Manifest::from_json("x/manifest.json", b"{")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/manifest.json is malformed"), "{e}");
    }
}
