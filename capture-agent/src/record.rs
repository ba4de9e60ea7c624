//! The durable record of an instance the agent launched, so that an agent
//! restarted after a crash (`kill -9`) can re-attach to the processes that
//! kept running: the guest (QEMU) and each device's backend.
//!
//! The record is `<data>/<instance>/instance.json`, written atomically
//! (temporary file, `fsync`, `rename`, `fsync` of the directory) at launch,
//! after every backend restart and after a capture filter change, and
//! removed when the instance is stopped. It identifies each process by pid
//! and start time (`/proc/<pid>/stat`), so a pid reused by another process
//! is never taken for the instance's (see [`vmr_hypervisor::process`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::supervisor::BackendStatus;

/// The file name of the record in the instance's directory.
pub const RECORD_FILE: &str = "instance.json";
/// The record format version this agent writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// Errors of records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an instance record: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// A process by pid and start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessRef {
    /// Process `pid` as it runs now (`None`: it does not).
    pub fn of(pid: u32) -> Option<Self> {
        vmr_hypervisor::process::start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether the process still runs and is the same process.
    pub fn alive(&self) -> bool {
        vmr_hypervisor::process::start_time(self.pid) == Some(self.start_time)
    }
}

/// The guest's hypervisor process and its control channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// The process running the guest (QEMU; the agent itself for the
    /// microVM, which runs in the agent's process).
    pub process: Option<ProcessRef>,
    /// Whether the guest runs inside the agent's process (microVM): it
    /// ends with the agent.
    pub in_agent: bool,
    /// The accelerator (`kvm`, `tcg`).
    pub accel: Option<String>,
    /// QEMU's QMP socket.
    pub qmp: Option<PathBuf>,
    /// QEMU's serial console socket.
    pub serial: Option<PathBuf>,
    /// The console file.
    pub console: PathBuf,
    /// The debugger endpoint (`tcp:<addr>` or `unix:<path>`).
    pub debugger: Option<String>,
}

/// One device's backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub device: String,
    /// `block` or `net`.
    pub kind: String,
    pub process: Option<ProcessRef>,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The capture spool.
    pub spool: PathBuf,
    /// How often the agent restarted it.
    pub restarts: u64,
}

/// Everything a restarted agent needs to re-attach to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub version: u32,
    pub instance: String,
    pub driver: String,
    /// The machine image directory it was launched from.
    pub image_dir: PathBuf,
    /// The launch request's spec (`vmr.v1.InstanceSpec`, protobuf, hex),
    /// with the capture filters as they are now; it also carries the
    /// snapshot schedule.
    pub spec_pb: String,
    /// Wall time of the launch, ns since the Unix epoch.
    pub launched_ns: u64,
    /// The agent process that launched it (or last re-attached to it).
    pub agent: ProcessRef,
    pub guest: GuestRecord,
    pub backends: Vec<BackendRecord>,
    /// The agent's event-log spool.
    pub agent_spool: PathBuf,
    /// The instance's shared sequence file.
    pub seq_file: PathBuf,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl InstanceRecord {
    /// The spec bytes.
    pub fn spec_bytes(&self) -> Option<Vec<u8>> {
        unhex(&self.spec_pb)
    }

    /// Sets the spec bytes.
    pub fn set_spec_bytes(&mut self, b: &[u8]) {
        self.spec_pb = hex(b);
    }

    /// Reads the record at `path`.
    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecordError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let r: Self = serde_json::from_str(&text).map_err(|e| RecordError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if r.version != RECORD_VERSION {
            return Err(RecordError::Format {
                path: path.to_path_buf(),
                reason: format!("version {} (this agent reads {RECORD_VERSION})", r.version),
            });
        }
        if r.spec_bytes().is_none() {
            return Err(RecordError::Format {
                path: path.to_path_buf(),
                reason: "spec_pb is not hex".into(),
            });
        }
        Ok(r)
    }

    /// Writes the record to `path` atomically and durably.
    pub fn store(&self, path: &Path) -> Result<(), RecordError> {
        let err = |source| RecordError::Write {
            path: path.to_path_buf(),
            source,
        };
        let body = serde_json::to_vec_pretty(self).expect("a record always serialises");
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)?;
        sync_parent(path).map_err(err)
    }

    /// Every record under the data directory `data`, by instance
    /// directory, with the ones that cannot be read as errors.
    pub fn scan(data: &Path) -> Vec<(PathBuf, Result<Self, RecordError>)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(data) else {
            return out;
        };
        let mut paths: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path().join(RECORD_FILE))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            let r = Self::load(&p);
            out.push((p, r));
        }
        out
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The record of one running instance, kept up to date on disk.
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    rec: Mutex<InstanceRecord>,
}

impl RecordFile {
    /// Writes `rec` to `path` and keeps it.
    pub fn create(path: PathBuf, rec: InstanceRecord) -> Result<Self, RecordError> {
        rec.store(&path)?;
        Ok(Self {
            path,
            rec: Mutex::new(rec),
        })
    }

    /// The record now.
    pub fn get(&self) -> InstanceRecord {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the record with `f` and writes it (a failure is logged:
    /// the instance runs on; a restart would then find the older record).
    pub fn update(&self, f: impl FnOnce(&mut InstanceRecord)) {
        let mut g = self.rec.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        if let Err(e) = g.store(&self.path) {
            tracing::warn!(instance = %g.instance, error = %crate::shipper::display_chain(&e), "cannot update the instance record");
        }
    }

    /// Takes the backends' pids from `status`.
    pub fn set_backends(&self, status: &[BackendStatus]) {
        self.update(|r| {
            for b in &mut r.backends {
                if let Some(s) = status.iter().find(|s| s.device == b.device) {
                    b.process = s.pid.and_then(ProcessRef::of);
                    b.restarts = s.restarts;
                }
            }
        });
    }

    /// Removes the record (the instance was stopped).
    pub fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                let _ = sync_parent(&self.path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the instance record")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InstanceRecord {
        InstanceRecord {
            version: RECORD_VERSION,
            instance: "vm-1".into(),
            driver: "qemu".into(),
            image_dir: "/images/demo".into(),
            spec_pb: hex(&[1, 2, 0xab]),
            launched_ns: 5,
            agent: ProcessRef {
                pid: 1,
                start_time: 2,
            },
            guest: GuestRecord {
                process: None,
                in_agent: false,
                accel: Some("tcg".into()),
                qmp: None,
                serial: None,
                console: "/c".into(),
                debugger: None,
            },
            backends: vec![],
            agent_spool: "/a".into(),
            seq_file: "/s".into(),
        }
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let inst = d.path().join("vm-1");
        std::fs::create_dir_all(&inst).unwrap();
        let p = inst.join(RECORD_FILE);
        let r = sample();
        r.store(&p).unwrap();
        assert_eq!(InstanceRecord::load(&p).unwrap(), r);
        assert_eq!(r.spec_bytes().unwrap(), vec![1, 2, 0xab]);
        let bad = d.path().join("vm-2");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join(RECORD_FILE), "{ not json").unwrap();
        let all = InstanceRecord::scan(d.path());
        assert_eq!(all.len(), 2);
        assert!(all[0].1.is_ok());
        assert!(matches!(all[1].1, Err(RecordError::Format { .. })));
    }

    #[test]
    fn knows_a_live_process_from_a_reused_pid() {
        let me = ProcessRef::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.alive());
    }
}
