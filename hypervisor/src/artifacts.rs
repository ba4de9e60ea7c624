//! Snapshot artifacts: the named files a driver writes for one snapshot and
//! reads back to restore it.
//!
//! A driver writes its files into one directory and describes them in
//! `artifacts.json` there. Every path in it is relative to that directory
//! (an incremental snapshot names its parent as `../<id>`), so a snapshot
//! directory, or a chain of them, can be moved or uploaded and restored
//! elsewhere.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::DriverError;

/// The file that lists a snapshot's artifacts.
pub const ARTIFACTS_FILE: &str = "artifacts.json";
/// Version of the `artifacts.json` layout.
pub const ARTIFACTS_VERSION: u32 = 1;

/// Full memory, or only the pages dirtied since the parent snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// All of guest memory.
    #[default]
    Full,
    /// Pages written since the previous snapshot of the same instance
    /// (microVM only).
    Incremental,
}

/// What a snapshot artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// Guest memory (or the dirty pages of it).
    Memory,
    /// vCPU, device and machine state.
    State,
    /// QEMU's migration stream (memory and device state together).
    MigrationStream,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Stable name (`memory`, `state`, `vmstate`).
    pub name: String,
    /// What it holds.
    pub kind: ArtifactKind,
    /// File name relative to the snapshot directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
}

/// The host a snapshot was taken on, for restore compatibility checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// CPU model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// TSC frequency in kHz, where known.
    pub tsc_khz: Option<u64>,
}

/// What one snapshot consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArtifacts {
    /// Layout version ([`ARTIFACTS_VERSION`]).
    pub version: u32,
    /// The driver that wrote it (restore needs the same driver).
    pub driver: String,
    /// The driver's own format version of the files.
    pub driver_format: u32,
    /// The instance.
    pub instance: String,
    /// Full or incremental memory.
    pub memory: MemoryKind,
    /// The parent snapshot directory, relative to this one (incremental).
    pub parent: Option<String>,
    /// The files.
    pub artifacts: Vec<Artifact>,
    /// How long the guest was paused for this snapshot, when the driver
    /// paused it (it was running when asked).
    #[serde(with = "opt_micros")]
    pub pause: Option<Duration>,
    /// Wall-clock time of the cut, nanoseconds since the Unix epoch.
    pub taken_at_ns: u64,
    /// The host it was taken on.
    pub host: HostInfo,
}

mod opt_micros {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| d.as_micros() as u64).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

impl SnapshotArtifacts {
    /// Total size of the files.
    pub fn total_bytes(&self) -> u64 {
        self.artifacts.iter().map(|a| a.size).sum()
    }

    /// The artifact called `name`.
    pub fn get(&self, name: &str) -> Result<&Artifact, DriverError> {
        self.artifacts
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| DriverError::Artifact {
                artifact: name.to_string(),
                reason: "not listed in artifacts.json".into(),
            })
    }

    /// Writes `artifacts.json` into `dir` (fsync'd, then renamed into place).
    pub fn store(&self, dir: &Path) -> Result<(), DriverError> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| DriverError::Artifact {
            artifact: ARTIFACTS_FILE.into(),
            reason: e.to_string(),
        })?;
        write_durable(&dir.join(ARTIFACTS_FILE), &body)
    }

    /// Reads `artifacts.json` from `dir` and checks that every file exists
    /// with its recorded size and that it was written by `driver`.
    pub fn load(dir: &Path, driver: &str) -> Result<Self, DriverError> {
        let path = dir.join(ARTIFACTS_FILE);
        let body = std::fs::read(&path).map_err(|e| DriverError::Artifact {
            artifact: ARTIFACTS_FILE.into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let a: SnapshotArtifacts =
            serde_json::from_slice(&body).map_err(|e| DriverError::Artifact {
                artifact: ARTIFACTS_FILE.into(),
                reason: format!("malformed: {e}"),
            })?;
        if a.version != ARTIFACTS_VERSION {
            return Err(DriverError::Artifact {
                artifact: ARTIFACTS_FILE.into(),
                reason: format!(
                    "version {} is not supported (this build reads version {ARTIFACTS_VERSION})",
                    a.version
                ),
            });
        }
        if a.driver != driver {
            return Err(DriverError::Artifact {
                artifact: ARTIFACTS_FILE.into(),
                reason: format!(
                    "written by the {} driver; restore it with that driver, not {driver}",
                    a.driver
                ),
            });
        }
        for art in &a.artifacts {
            let outside = Path::new(&art.file)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
            if art.file.is_empty() || outside {
                return Err(DriverError::Artifact {
                    artifact: art.name.clone(),
                    reason: format!("file {:?} is outside the snapshot directory", art.file),
                });
            }
            let p = dir.join(&art.file);
            let len = std::fs::metadata(&p)
                .map_err(|e| DriverError::Artifact {
                    artifact: art.name.clone(),
                    reason: format!("cannot open {}: {e}", p.display()),
                })?
                .len();
            if len != art.size {
                return Err(DriverError::Artifact {
                    artifact: art.name.clone(),
                    reason: format!(
                        "{} is {len} bytes, the snapshot recorded {} (truncated or replaced)",
                        p.display(),
                        art.size
                    ),
                });
            }
        }
        Ok(a)
    }
}

impl HostInfo {
    /// This host.
    pub fn current() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let tsc_khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        HostInfo { cpu_model, tsc_khz }
    }
}

/// Writes `body` to `path` durably: a temporary file, fsync, rename, fsync
/// of the directory.
pub fn write_durable(path: &Path, body: &[u8]) -> Result<(), DriverError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(DriverError::io(tmp.display().to_string()))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .map_err(DriverError::io(tmp.display().to_string()))?;
    std::fs::rename(&tmp, path).map_err(DriverError::io(path.display().to_string()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory, so a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), DriverError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DriverError::io(dir.display().to_string()))
}

/// fsyncs a file.
pub fn sync_file(path: &Path) -> Result<(), DriverError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(DriverError::io(path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> SnapshotArtifacts {
        std::fs::write(dir.join("vmstate"), vec![7u8; 100]).unwrap();
        SnapshotArtifacts {
            version: ARTIFACTS_VERSION,
            driver: "qemu".into(),
            driver_format: 1,
            instance: "i-1".into(),
            memory: MemoryKind::Full,
            parent: None,
            artifacts: vec![Artifact {
                name: "vmstate".into(),
                kind: ArtifactKind::MigrationStream,
                file: "vmstate".into(),
                size: 100,
            }],
            pause: Some(Duration::from_millis(12)),
            taken_at_ns: 1,
            host: HostInfo::current(),
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let d = tempfile::tempdir().unwrap();
        let a = sample(d.path());
        a.store(d.path()).unwrap();
        assert_eq!(SnapshotArtifacts::load(d.path(), "qemu").unwrap(), a);

        let e = SnapshotArtifacts::load(d.path(), "microvm").unwrap_err();
        assert!(e.to_string().contains("written by the qemu driver"), "{e}");

        std::fs::write(d.path().join("vmstate"), vec![7u8; 99]).unwrap();
        let e = SnapshotArtifacts::load(d.path(), "qemu").unwrap_err();
        assert!(e.to_string().contains("artifact vmstate"), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        std::fs::remove_file(d.path().join("vmstate")).unwrap();
        let e = SnapshotArtifacts::load(d.path(), "qemu").unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");

        std::fs::write(d.path().join(ARTIFACTS_FILE), b"{").unwrap();
        let e = SnapshotArtifacts::load(d.path(), "qemu").unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
