//! Snapshots: what is saved, the files it goes to, and how memory comes
//! back.
//!
//! A snapshot is a directory with two files:
//!
//! - `vmstate.bin`: the [`format`](mod@format) container with metadata, VM-wide KVM
//!   state (irqchip, PIT, clock), each vCPU, the serial port and the device
//!   blobs;
//! - `memory.bin` (full: raw image, sparse) or `memory.diff` (incremental:
//!   only pages dirtied since the parent snapshot; see [`memfile`]).
//!
//! An incremental snapshot names its parent directory by a path relative to
//! its own (`../0001`), so a chain moved as a whole still restores;
//! restoring it applies the chain base → ... → it. The byte layouts are in
//! `docs/snapshot-format.md`.

pub mod format;
pub mod lazy;
pub mod memfile;

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::memory::{MemoryError, VmMemory};
use crate::serial::{SerialDevice, SerialError, SerialOut, SerialSnapshot};
use crate::vcpu::VcpuState;
use format::{kind, Section};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "vmstate.bin";
/// Name of a full memory file.
pub const FULL_MEMORY_FILE: &str = "memory.bin";
/// Name of an incremental memory file.
pub const DIFF_MEMORY_FILE: &str = "memory.diff";
/// Longest parent chain followed on restore.
pub const MAX_CHAIN: usize = 1024;

/// A Firecracker-style snapshot contract: `save` captures a value's state,
/// `restore` builds a new value from it.
pub trait Persist: Sized {
    /// The serializable state.
    type State: Serialize + DeserializeOwned;
    /// What `restore` needs besides the state.
    type ConstructorArgs;
    /// Restore failure.
    type Error;
    /// Captures the state.
    fn save(&self) -> Self::State;
    /// Builds a value from saved state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

impl Persist for SerialDevice {
    type State = SerialSnapshot;
    type ConstructorArgs = SerialOut;
    type Error = SerialError;
    fn save(&self) -> SerialSnapshot {
        self.snapshot()
    }
    fn restore(out: SerialOut, state: &SerialSnapshot) -> Result<Self, SerialError> {
        SerialDevice::from_snapshot(state, out)
    }
}

/// Errors taking or loading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The container is malformed.
    #[error("snapshot {path}: {source}")]
    Format {
        /// The state file.
        path: String,
        /// Cause.
        #[source]
        source: format::FormatError,
    },
    /// I/O failed.
    #[error("snapshot {path}: I/O error")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A section does not parse.
    #[error("snapshot section {section} does not parse")]
    Section {
        /// Section name.
        section: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A required section is missing or a section is repeated.
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// A memory file is bad.
    #[error(transparent)]
    MemFile(#[from] memfile::MemFileError),
    /// Guest memory cannot be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Lazy restore cannot be set up.
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    /// An incremental snapshot's parent directory cannot be found.
    #[error("snapshot {snapshot} names parent {parent}, which cannot be opened")]
    MissingParent {
        /// The child snapshot directory.
        snapshot: String,
        /// The parent as named in the child's metadata.
        parent: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Whether a memory file holds everything or only changed pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// Every page.
    Full,
    /// Pages dirtied since the parent snapshot.
    Incremental,
}

/// Where a snapshot's memory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRef {
    /// Full or incremental.
    pub kind: MemoryKind,
    /// File name inside the snapshot directory.
    pub file: String,
    /// Parent snapshot directory (incremental only). The VMM writes it
    /// relative to this snapshot's directory (`../0001`); an absolute path
    /// (written by earlier versions) is read as well.
    pub parent: Option<PathBuf>,
    /// Pages stored (non-zero pages for full, dirtied pages for incremental).
    pub pages: u64,
}

/// Snapshot metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// Snapshot id.
    pub id: String,
    /// Creation time (Unix ms).
    pub created_unix_ms: u64,
    /// Version of the VMM that wrote it.
    pub vmm_version: String,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Whether the VM had an in-kernel irqchip.
    pub irqchip: bool,
    /// Whether the VM had an in-kernel PIT.
    pub pit: bool,
    /// The memory file.
    pub memory: MemoryRef,
}

/// VM-wide KVM state.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master (irqchip 0).
    pub pic_master: Option<kvm_irqchip>,
    /// PIC slave (irqchip 1).
    pub pic_slave: Option<kvm_irqchip>,
    /// IOAPIC (irqchip 2).
    pub ioapic: Option<kvm_irqchip>,
    /// PIT.
    pub pit2: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("irqchip", &self.pic_master.is_some())
            .field("pit2", &self.pit2.is_some())
            .field("clock", &self.clock.is_some())
            .finish()
    }
}

/// A device's saved state, opaque to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Device id (unique in the VM).
    pub id: String,
    /// The device's own serialization.
    pub state: Vec<u8>,
}

/// Everything in a state file.
#[derive(Debug)]
pub struct SnapshotData {
    /// Metadata.
    pub meta: SnapshotMeta,
    /// VM-wide KVM state.
    pub vm: VmKvmState,
    /// vCPUs in index order.
    pub vcpus: Vec<VcpuState>,
    /// Serial port.
    pub serial: SerialSnapshot,
    /// Devices.
    pub devices: Vec<DeviceState>,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v)
        .expect("snapshot state types serialize infallibly: no maps with non-string keys")
}

fn parse<T: DeserializeOwned>(section: &'static str, b: &[u8]) -> Result<T, SnapshotError> {
    serde_json::from_slice(b).map_err(|source| SnapshotError::Section { section, source })
}

impl SnapshotData {
    /// Serializes into the container.
    pub fn encode(&self) -> Result<Vec<u8>, format::FormatError> {
        let mut s = vec![
            Section {
                kind: kind::META,
                payload: json(&self.meta),
            },
            Section {
                kind: kind::VM,
                payload: json(&self.vm),
            },
        ];
        for v in &self.vcpus {
            s.push(Section {
                kind: kind::VCPU,
                payload: json(v),
            });
        }
        s.push(Section {
            kind: kind::SERIAL,
            payload: json(&self.serial),
        });
        for d in &self.devices {
            let id = d.id.as_bytes();
            let mut p = Vec::with_capacity(2 + id.len() + d.state.len());
            p.extend_from_slice(&(id.len().min(u16::MAX as usize) as u16).to_le_bytes());
            p.extend_from_slice(&id[..id.len().min(u16::MAX as usize)]);
            p.extend_from_slice(&d.state);
            s.push(Section {
                kind: kind::DEVICE,
                payload: p,
            });
        }
        format::encode(&s)
    }

    /// Parses a container's sections.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        let sections = format::decode(bytes).map_err(|source| SnapshotError::Format {
            path: path.display().to_string(),
            source,
        })?;
        let (mut meta, mut vm, mut serial) = (None, None, None);
        let mut vcpus = Vec::new();
        let mut devices = Vec::new();
        for s in sections {
            let dup = |n: &str| SnapshotError::Inconsistent(format!("repeated {n} section"));
            match s.kind {
                kind::META if meta.is_none() => {
                    meta = Some(parse::<SnapshotMeta>("meta", &s.payload)?)
                }
                kind::VM if vm.is_none() => vm = Some(parse::<VmKvmState>("vm", &s.payload)?),
                kind::SERIAL if serial.is_none() => {
                    serial = Some(parse::<SerialSnapshot>("serial", &s.payload)?)
                }
                kind::META => return Err(dup("meta")),
                kind::VM => return Err(dup("vm")),
                kind::SERIAL => return Err(dup("serial")),
                kind::VCPU => vcpus.push(parse::<VcpuState>("vcpu", &s.payload)?),
                kind::DEVICE => {
                    let p = &s.payload;
                    if p.len() < 2 {
                        return Err(SnapshotError::Inconsistent(
                            "device section too short".into(),
                        ));
                    }
                    let n = u16::from_le_bytes([p[0], p[1]]) as usize;
                    if p.len() < 2 + n {
                        return Err(SnapshotError::Inconsistent(
                            "device id runs past its section".into(),
                        ));
                    }
                    let id = std::str::from_utf8(&p[2..2 + n]).map_err(|_| {
                        SnapshotError::Inconsistent("device id is not UTF-8".into())
                    })?;
                    devices.push(DeviceState {
                        id: id.to_string(),
                        state: p[2 + n..].to_vec(),
                    });
                }
                other => {
                    return Err(SnapshotError::Inconsistent(format!(
                        "unknown section kind {other}"
                    )));
                }
            }
        }
        let meta = meta.ok_or_else(|| SnapshotError::Inconsistent("no meta section".into()))?;
        if vcpus.len() != meta.vcpus as usize {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPU sections for {} vCPUs",
                vcpus.len(),
                meta.vcpus
            )));
        }
        for (i, v) in vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(SnapshotError::Inconsistent(format!(
                    "vCPU section {i} holds vCPU {}",
                    v.id
                )));
            }
        }
        crate::memory::check_size(meta.mem_size)?;
        Ok(SnapshotData {
            meta,
            vm: vm.ok_or_else(|| SnapshotError::Inconsistent("no vm section".into()))?,
            vcpus,
            serial: serial
                .ok_or_else(|| SnapshotError::Inconsistent("no serial section".into()))?,
            devices,
        })
    }

    /// Reads and verifies `dir/vmstate.bin` (the size cap is checked before
    /// reading).
    pub fn load(dir: &Path) -> Result<Self, SnapshotError> {
        let (bytes, path) = read_state_file(dir)?;
        Self::decode(&bytes, &path)
    }

    /// Writes `dir/vmstate.bin` atomically (temporary file, then rename)
    /// and durably (the file is fsync'd before the rename; the caller
    /// fsyncs `dir` to make the rename durable). The memory file is written
    /// separately, before.
    pub fn store(&self, dir: &Path) -> Result<(), SnapshotError> {
        self.store_with_sync(dir, true)
    }

    /// As [`SnapshotData::store`]; without `fsync` the file is renamed into
    /// place without waiting for it to reach the disk.
    pub fn store_with_sync(&self, dir: &Path, fsync: bool) -> Result<(), SnapshotError> {
        let pending = self.write_pending(dir)?;
        if fsync {
            pending.sync()?;
        }
        pending.commit()
    }

    /// Writes the state into a temporary file in `dir`, not yet synced nor
    /// renamed into place: [`PendingState::sync`] then
    /// [`PendingState::commit`] finish what [`SnapshotData::store`] does, so
    /// a caller can sync it together with other files.
    pub fn write_pending(&self, dir: &Path) -> Result<PendingState, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = self.encode().map_err(|source| SnapshotError::Format {
            path: path.display().to_string(),
            source,
        })?;
        let io = |source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        };
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        Ok(PendingState { path, tmp, file })
    }
}

/// A state file written under a temporary name (see
/// [`SnapshotData::write_pending`]).
#[derive(Debug)]
pub struct PendingState {
    path: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
}

impl PendingState {
    fn io(&self) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The open temporary file (to sync it alongside others).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// `fdatasync` of the temporary file: its bytes and its length (the
    /// only metadata a reader needs) reach the disk.
    pub fn sync(&self) -> Result<(), SnapshotError> {
        self.file.sync_data().map_err(self.io())
    }

    /// Renames the temporary file into place (the caller fsyncs the
    /// directory to make the rename durable).
    pub fn commit(self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.path).map_err(self.io())
    }
}

/// How restored memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMemory {
    /// `MAP_PRIVATE` of the base memory file: pages load lazily on first
    /// touch, restore cost does not grow with memory size, the files are
    /// never written. vhost-user backends cannot map it, so use this for
    /// CPU-only clones (no vhost-user devices).
    ///
    /// The last link of an incremental chain is restored as
    /// [`RestoreMemory::SharedOnDemand`] instead (each page copied in from
    /// the newest file that holds it on its first access, no background
    /// copy), so its restore does not grow with the diffs either; where
    /// userfaultfd cannot be set up, the diffs are copied over the private
    /// mapping before the VM runs.
    #[default]
    PrivateLazy,
    /// A fresh memfd filled from the files before the VM runs (eager): costs
    /// a copy of the non-zero pages, but backends can share it. The fallback
    /// for hosts without userfaultfd.
    SharedCopy,
    /// A fresh memfd, filled lazily: every page is copied in from the files
    /// on its first access (vCPU, VMM or a vhost-user backend that offers
    /// the `PAGEFAULT` protocol feature) through userfaultfd, and a
    /// background thread copies the rest from the VM's first resume on (so the
    /// copy does not slow the restore itself). Backends can share it; restore
    /// time does not grow with memory size. See [`lazy`].
    SharedLazy,
    /// As [`RestoreMemory::SharedLazy`] without the background prefetch:
    /// pages are only filled when accessed (until
    /// [`crate::memory::VmMemory::start_prefetch`], or a backend without
    /// `PAGEFAULT` is attached, which fills everything first).
    SharedOnDemand,
}

impl RestoreMemory {
    /// The shared mode to restore a VM with devices in: `SharedLazy`, or
    /// `SharedCopy` when the environment variable `VMR_RESTORE_MEMORY` is
    /// `copy` (the eager fallback).
    pub fn shared_default() -> Self {
        match std::env::var("VMR_RESTORE_MEMORY").as_deref() {
            Ok("copy") => RestoreMemory::SharedCopy,
            _ => RestoreMemory::SharedLazy,
        }
    }
}

/// The memory files of a snapshot's chain, base first. Each link's
/// directory is canonical (a relative parent is resolved against its
/// child's directory). Each link's state file is verified as a container
/// (size cap, magic, version, length, CRC-32); only its meta section is
/// parsed.
pub fn memory_chain(dir: &Path) -> Result<Vec<(PathBuf, MemoryKind, u64)>, SnapshotError> {
    chain_from(dir, None)
}

/// As [`memory_chain`], with `dir`'s own state already loaded (by
/// [`SnapshotData::load`]) so it is not read again; its parents are read
/// and checked as there.
pub fn memory_chain_of(
    dir: &Path,
    state: &SnapshotData,
) -> Result<Vec<(PathBuf, MemoryKind, u64)>, SnapshotError> {
    chain_from(dir, Some(state))
}

/// The bytes of `dir/vmstate.bin` and its path (the size cap is checked
/// before reading).
fn read_state_file(dir: &Path) -> Result<(Vec<u8>, PathBuf), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let io = |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(&path).map_err(io)?.len();
    if len > format::MAX_FILE_LEN {
        return Err(SnapshotError::Format {
            path: path.display().to_string(),
            source: format::FormatError::TooLarge(len),
        });
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    Ok((bytes, path))
}

/// The meta section of `dir/vmstate.bin`, for a parent in a memory chain:
/// the container is verified as by [`SnapshotData::load`] (size cap,
/// magic, version, length, CRC-32), but of its sections only the meta one
/// is parsed (a parent's vCPU, VM and device state are never used).
fn load_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let (bytes, path) = read_state_file(dir)?;
    let sections = format::decode(&bytes).map_err(|source| SnapshotError::Format {
        path: path.display().to_string(),
        source,
    })?;
    let mut metas = sections.iter().filter(|s| s.kind == kind::META);
    let meta = match (metas.next(), metas.next()) {
        (Some(m), None) => parse::<SnapshotMeta>("meta", &m.payload)?,
        (None, _) => return Err(SnapshotError::Inconsistent("no meta section".into())),
        (Some(_), Some(_)) => {
            return Err(SnapshotError::Inconsistent("repeated meta section".into()))
        }
    };
    crate::memory::check_size(meta.mem_size)?;
    Ok(meta)
}

fn chain_from(
    dir: &Path,
    mut head: Option<&SnapshotData>,
) -> Result<Vec<(PathBuf, MemoryKind, u64)>, SnapshotError> {
    let mut chain = Vec::new();
    let mut cur = dir.canonicalize().map_err(|source| SnapshotError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut mem_size = None;
    loop {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::Inconsistent(format!(
                "parent chain longer than {MAX_CHAIN} (or a loop)"
            )));
        }
        let loaded;
        let meta = match head.take() {
            Some(d) => &d.meta,
            None => {
                loaded = load_meta(&cur)?;
                &loaded
            }
        };
        if *mem_size.get_or_insert(meta.mem_size) != meta.mem_size {
            return Err(SnapshotError::Inconsistent(format!(
                "{} has a different memory size than its child",
                cur.display()
            )));
        }
        let m = &meta.memory;
        if m.file.contains('/') || m.file.is_empty() {
            return Err(SnapshotError::Inconsistent(format!(
                "bad memory file name {:?}",
                m.file
            )));
        }
        chain.push((cur.join(&m.file), m.kind, meta.mem_size));
        match (m.kind, &m.parent) {
            (MemoryKind::Full, _) => break,
            (MemoryKind::Incremental, Some(p)) => {
                // `join` keeps an absolute `p` as it is.
                cur =
                    cur.join(p)
                        .canonicalize()
                        .map_err(|source| SnapshotError::MissingParent {
                            snapshot: cur.display().to_string(),
                            parent: p.display().to_string(),
                            source,
                        })?;
            }
            (MemoryKind::Incremental, None) => {
                return Err(SnapshotError::Inconsistent(format!(
                    "incremental snapshot {} names no parent",
                    cur.display()
                )))
            }
        }
    }
    chain.reverse();
    Ok(chain)
}

/// Builds guest memory from a snapshot's chain.
pub fn restore_memory(dir: &Path, mode: RestoreMemory) -> Result<VmMemory, SnapshotError> {
    memory_from_chain(memory_chain(dir)?, mode)
}

/// As [`restore_memory`], with `dir`'s own state already loaded (see
/// [`memory_chain_of`]).
pub fn restore_memory_of(
    dir: &Path,
    state: &SnapshotData,
    mode: RestoreMemory,
) -> Result<VmMemory, SnapshotError> {
    memory_from_chain(memory_chain_of(dir, state)?, mode)
}

/// A private copy-on-write mapping of the full memory file `base`.
fn private_file(base: &Path, mem_size: u64) -> Result<VmMemory, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: base.display().to_string(),
        source,
    };
    let f = std::fs::File::open(base).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len != mem_size {
        return Err(SnapshotError::Inconsistent(format!(
            "{} is {len} bytes, expected {mem_size}",
            base.display()
        )));
    }
    Ok(VmMemory::from_file_private(f, mem_size)?)
}

/// A fresh memfd filled lazily from `chain` (`SharedLazy` or
/// `SharedOnDemand`).
fn lazy_memory(
    chain: &[(PathBuf, MemoryKind, u64)],
    mem_size: u64,
    mode: RestoreMemory,
) -> Result<VmMemory, SnapshotError> {
    let mut m = VmMemory::new_shared(mem_size)?;
    // Nothing has touched the new mapping: register it before anything
    // does. The chain's diffs are sources, not applied. The prefetch of
    // `SharedLazy` starts when the VM resumes.
    let owner = lazy::LazyOwner::start(m.host_base() as u64, mem_size, chain, false)?;
    m.set_lazy(owner, mode == RestoreMemory::SharedLazy);
    Ok(m)
}

fn memory_from_chain(
    chain: Vec<(PathBuf, MemoryKind, u64)>,
    mode: RestoreMemory,
) -> Result<VmMemory, SnapshotError> {
    let (base, _, mem_size) = &chain[0];
    let mem = match mode {
        RestoreMemory::PrivateLazy if chain.len() > 1 => {
            match lazy_memory(&chain, *mem_size, RestoreMemory::SharedOnDemand) {
                Err(SnapshotError::Lazy(e @ lazy::LazyError::Uffd { .. })) => {
                    tracing::warn!(
                        error = %e,
                        diffs = chain.len() - 1,
                        "no userfaultfd: the diffs are copied in before the VM runs"
                    );
                    private_file(base, *mem_size)?
                }
                r => return r,
            }
        }
        RestoreMemory::PrivateLazy => private_file(base, *mem_size)?,
        RestoreMemory::SharedCopy => {
            let m = VmMemory::new_shared(*mem_size)?;
            // SAFETY: the memory is new and not yet visible to any guest or
            // backend; this is the only reference.
            memfile::read_full_into(base, unsafe { m.as_mut_slice() })?;
            m
        }
        RestoreMemory::SharedLazy | RestoreMemory::SharedOnDemand => {
            return lazy_memory(&chain, *mem_size, mode);
        }
    };
    for (diff, _, _) in &chain[1..] {
        // SAFETY: as above: no guest or backend uses the memory yet.
        memfile::apply_diff(diff, unsafe { mem.as_mut_slice() })?;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: MemoryKind, parent: Option<PathBuf>) -> SnapshotMeta {
        SnapshotMeta {
            id: "s".into(),
            created_unix_ms: 1,
            vmm_version: "0.1.0".into(),
            mem_size: 16 * 4096,
            vcpus: 0,
            irqchip: false,
            pit: false,
            memory: MemoryRef {
                kind,
                file: if kind == MemoryKind::Full {
                    FULL_MEMORY_FILE.into()
                } else {
                    DIFF_MEMORY_FILE.into()
                },
                parent,
                pages: 0,
            },
        }
    }

    fn data(m: SnapshotMeta) -> SnapshotData {
        SnapshotData {
            meta: m,
            vm: VmKvmState::default(),
            vcpus: vec![],
            serial: SerialDevice::new(Box::new(std::io::sink()))
                .expect("eventfd")
                .snapshot(),
            devices: vec![DeviceState {
                id: "blk0".into(),
                state: b"{\"x\":1}".to_vec(),
            }],
        }
    }

    #[test]
    fn state_file_round_trip() {
        let d = data(meta(MemoryKind::Full, None));
        let bytes = d.encode().expect("encodes");
        let back = SnapshotData::decode(&bytes, Path::new("x")).expect("decodes");
        assert_eq!(back.meta, d.meta);
        assert_eq!(back.devices, d.devices);
        assert_eq!(back.serial, d.serial);
    }

    #[test]
    fn vm_state_round_trip() {
        let mut s = VmKvmState::default();
        let mut chip = kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        chip.chip.ioapic.base_address = 0xfec0_0000;
        s.ioapic = Some(chip);
        s.pit2 = Some(kvm_pit_state2 {
            flags: 1,
            ..Default::default()
        });
        s.clock = Some(kvm_clock_data {
            clock: 12345,
            ..Default::default()
        });
        let back: VmKvmState = serde_json::from_slice(&json(&s)).expect("parses");
        let chip = back.ioapic.expect("saved");
        // SAFETY: reading the IOAPIC member written above (chip_id 2).
        let base = unsafe { chip.chip.ioapic.base_address };
        assert_eq!(base, 0xfec0_0000);
        assert_eq!(back.pit2.expect("saved").flags, 1);
        assert_eq!(back.clock.expect("saved").clock, 12345);
    }

    #[test]
    fn vcpu_state_round_trip() {
        let mut v = VcpuState {
            id: 0,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x10_0000,
                rax: 7,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: Some(Default::default()),
            xcrs: Some(Default::default()),
            debugregs: Some(Default::default()),
            lapic: Some(Default::default()),
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: Some(Default::default()),
        };
        v.sregs.cr3 = 0x9000;
        if let Some(x) = v.xsave.as_mut() {
            x.region[5] = 0xabcd;
        }
        if let Some(l) = v.lapic.as_mut() {
            l.regs[0x20] = 3;
        }
        let back: VcpuState = serde_json::from_slice(&json(&v)).expect("parses");
        assert_eq!(back.regs, v.regs);
        assert_eq!(back.sregs, v.sregs);
        assert_eq!(back.msrs, v.msrs);
        assert_eq!(back.cpuid, v.cpuid);
        assert_eq!(back.xsave.expect("saved").region[5], 0xabcd);
        assert_eq!(back.lapic.expect("saved").regs[0x20], 3);
    }

    #[test]
    fn serial_persist_round_trip() {
        let mut s = SerialDevice::new(Box::new(std::io::sink())).expect("eventfd");
        crate::bus::MmioDevice::write(&mut s, 7, &[0x42]);
        s.enqueue(b"in").expect("fifo has room");
        let state = Persist::save(&s);
        let bytes = json(&state);
        let back: SerialSnapshot = parse("serial", &bytes).expect("parses");
        let r =
            <SerialDevice as Persist>::restore(Box::new(std::io::sink()), &back).expect("valid");
        assert_eq!(Persist::save(&r), state);
    }

    #[test]
    fn inconsistent_state_files_are_refused() {
        let mut d = data(meta(MemoryKind::Full, None));
        d.meta.vcpus = 1;
        let e = SnapshotData::decode(&d.encode().expect("encodes"), Path::new("x"))
            .expect_err("no vcpu");
        assert!(e.to_string().contains("vCPU"), "{e}");
        let bad = format::encode(&[Section {
            kind: kind::META,
            payload: b"{not json".to_vec(),
        }])
        .expect("encodes");
        assert!(matches!(
            SnapshotData::decode(&bad, Path::new("x")),
            Err(SnapshotError::Section {
                section: "meta",
                ..
            })
        ));
    }

    #[test]
    fn chain_restores_base_plus_diffs() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        let mut img = vec![0u8; 16 * 4096];
        img[4096] = 1;
        data(meta(MemoryKind::Full, None))
            .store(&a)
            .expect("stores");
        memfile::write_full(&a.join(FULL_MEMORY_FILE), &img).expect("writes");
        img[3 * 4096] = 3;
        let mut dirty = crate::memory::PageBitmap::new(16);
        dirty.set(3);
        data(meta(MemoryKind::Incremental, Some(PathBuf::from("../a"))))
            .store(&b)
            .expect("stores");
        memfile::write_diff(&b.join(DIFF_MEMORY_FILE), &img, &dirty).expect("writes");
        for mode in [
            RestoreMemory::PrivateLazy,
            RestoreMemory::SharedCopy,
            RestoreMemory::SharedLazy,
            RestoreMemory::SharedOnDemand,
        ] {
            let m = restore_memory(&b, mode).expect("restores");
            // Only the eager copy fills the memory before it is used.
            assert_eq!(
                m.lazy().is_some(),
                mode != RestoreMemory::SharedCopy,
                "{mode:?}"
            );
            // SAFETY: no guest uses this memory.
            assert_eq!(unsafe { m.as_slice() }, &img[..], "{mode:?}");
        }
        // Background prefetch alone brings every data page in, then ends.
        // A VM's resume starts it; nothing runs this memory, so start it here.
        let m = restore_memory(&b, RestoreMemory::SharedLazy).expect("restores");
        assert!(
            m.prefetch_at_run(),
            "SharedLazy prefetches from the resume on"
        );
        m.start_prefetch();
        let lazy = m.lazy().expect("lazy").clone();
        lazy.wait_populated(std::time::Duration::from_secs(30))
            .expect("populated");
        let st = lazy.stats();
        assert!(st.complete && st.error.is_none(), "{st:?}");
        // Pages 1 (base) and 3 (diff) hold data; the rest are holes.
        assert_eq!(st.data_pages, 2, "{st:?}");
        assert_eq!(st.prefetched + st.vmm_faults, 2, "{st:?}");
        // SAFETY: no guest uses this memory.
        assert_eq!(unsafe { m.as_slice() }, &img[..]);
        // The base file is untouched by a private restore.
        let base = std::fs::read(a.join(FULL_MEMORY_FILE)).expect("readable");
        assert_eq!(base[3 * 4096], 0);
        // The pair moved elsewhere restores: the parent is relative.
        let moved = root.path().join("moved");
        std::fs::create_dir_all(&moved).expect("mkdir");
        std::fs::rename(&a, moved.join("a")).expect("mv a");
        std::fs::rename(&b, moved.join("b")).expect("mv b");
        let m = restore_memory(&moved.join("b"), RestoreMemory::SharedCopy).expect("restores");
        // SAFETY: no guest uses this memory.
        assert_eq!(unsafe { m.as_slice() }, &img[..]);
        // A missing parent is a clear error.
        std::fs::remove_dir_all(moved.join("a")).expect("rm");
        let e = restore_memory(&moved.join("b"), RestoreMemory::PrivateLazy)
            .expect_err("the parent is gone");
        assert!(
            matches!(e, SnapshotError::MissingParent { ref parent, .. } if parent == "../a"),
            "{e}"
        );
    }

    #[test]
    fn a_parent_state_file_is_verified_though_only_its_meta_is_read() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        let img = vec![0u8; 16 * 4096];
        data(meta(MemoryKind::Full, None))
            .store(&a)
            .expect("stores");
        memfile::write_full(&a.join(FULL_MEMORY_FILE), &img).expect("writes");
        data(meta(MemoryKind::Incremental, Some(PathBuf::from("../a"))))
            .store(&b)
            .expect("stores");
        let dirty = crate::memory::PageBitmap::new(16);
        memfile::write_diff(&b.join(DIFF_MEMORY_FILE), &img, &dirty).expect("writes");
        assert_eq!(memory_chain(&b).expect("the chain reads").len(), 2);
        // A flipped byte anywhere in the parent's state file (here, its
        // last section) fails the container's CRC.
        let state = a.join(STATE_FILE);
        let mut bytes = std::fs::read(&state).expect("readable");
        let at = bytes.len() - 8;
        bytes[at] ^= 0x40;
        std::fs::write(&state, &bytes).expect("writes");
        let e = memory_chain(&b).expect_err("the parent is corrupt");
        assert!(matches!(e, SnapshotError::Format { .. }), "{e}");
    }

    #[test]
    fn a_preloaded_state_keeps_the_chain_checks() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        data(meta(MemoryKind::Full, None))
            .store(&a)
            .expect("stores");
        let child = data(meta(MemoryKind::Incremental, Some(PathBuf::from("../a"))));
        child.store(&b).expect("stores");
        let loaded = SnapshotData::load(&b).expect("loads");
        assert_eq!(
            memory_chain_of(&b, &loaded).expect("chain"),
            memory_chain(&b).expect("chain")
        );
        // The loaded state's own links are checked as a read one's are.
        let mut bad = SnapshotData::load(&b).expect("loads");
        bad.meta.memory.parent = None;
        let e = memory_chain_of(&b, &bad).expect_err("no parent");
        assert!(matches!(e, SnapshotError::Inconsistent(_)), "{e}");
        let mut bad = SnapshotData::load(&b).expect("loads");
        bad.meta.memory.file = "../x".into();
        let e = memory_chain_of(&b, &bad).expect_err("bad name");
        assert!(matches!(e, SnapshotError::Inconsistent(_)), "{e}");
        let mut bad = SnapshotData::load(&b).expect("loads");
        bad.meta.mem_size *= 2;
        let e = memory_chain_of(&b, &bad).expect_err("size differs");
        assert!(matches!(e, SnapshotError::Inconsistent(_)), "{e}");
        // Parents are still read and verified.
        let state = a.join(STATE_FILE);
        let mut bytes = std::fs::read(&state).expect("reads");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&state, &bytes).expect("writes");
        let e = memory_chain_of(&b, &loaded).expect_err("corrupt parent");
        assert!(matches!(e, SnapshotError::Format { .. }), "{e}");
        std::fs::remove_dir_all(&a).expect("rm");
        let e = memory_chain_of(&b, &loaded).expect_err("parent gone");
        assert!(matches!(e, SnapshotError::MissingParent { .. }), "{e}");
    }
}
