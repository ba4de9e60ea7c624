//! Snapshots of a paused VM and restores into a new one.
//!
//! A snapshot drains the dirty-page sources (KVM's log, pages merged with
//! [`Vm::merge_dirty`], the devices' [`SnapshotDevice::take_dirty`]) and
//! then writes the memory file and the state file. If anything fails after
//! the drain, the drained pages go back into the VM's pending set, so the
//! next snapshot still holds them. Unless turned off with
//! [`Vm::set_sync_snapshots`], the files and the directory are fsync'd
//! before `snapshot()` returns.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use tracing::{info, warn};
use vmr_proto::LifecycleKind;

use super::lifecycle::BuildSpec;
use super::{kvm_err, RestoreOptions, RunState, Vm, VmError};
use crate::memory::PageBitmap;
use crate::serial::SerialDevice;
use crate::snapshot::{
    self, memfile, DeviceState, MemoryKind, MemoryRef, SnapshotData, SnapshotError, SnapshotMeta,
    VmKvmState,
};
use crate::vcpu::VcpuState;

/// A device that takes part in pause, resume and snapshots.
///
/// The devices layer registers one per device with
/// [`Vm::add_snapshot_device`]; the VM pauses them after the vCPUs, asks for
/// their state and their backends' dirty pages when snapshotting, and
/// resumes them before the vCPUs.
pub trait SnapshotDevice: Send + Sync {
    /// Unique id; the saved state is returned under it on restore.
    fn id(&self) -> String;
    /// Quiesces the device (stop backends from touching guest memory).
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    /// Undoes [`SnapshotDevice::pause`].
    fn resume(&self) -> Result<(), String> {
        Ok(())
    }
    /// Serialized state (the device's `Persist::save`).
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// Pages the backend wrote since the last call, in KVM bitmap layout
    /// (bit `p % 64` of word `p / 64`), or `None` if it cannot tell (then an
    /// incremental snapshot is refused while the device is attached). If
    /// the snapshot that asked fails, the VM keeps the pages for the next
    /// one, so a device never reports a page twice.
    fn take_dirty(&self) -> Option<Vec<u64>>;
}

/// Result of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Snapshot id (directory name).
    pub id: String,
    /// Full or incremental.
    pub kind: MemoryKind,
    /// Pages written to the memory file.
    pub pages: u64,
    /// Pages in the dirty set (incremental: equals `pages`).
    pub dirty_pages: Vec<u64>,
}

/// `to` as a path relative to the directory `from` (both absolute and
/// canonical), e.g. `../0001` for a sibling.
pub(crate) fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component<'_>> = from.components().collect();
    let t: Vec<Component<'_>> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..f.len() {
        p.push("..");
    }
    for c in &t[common..] {
        p.push(c);
    }
    if p.as_os_str().is_empty() {
        p.push(".");
    }
    p
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| {
        VmError::Snapshot(SnapshotError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// fsync of a file or directory by path.
fn fsync(path: &Path) -> Result<(), VmError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Runs two syncs at once (the second on this thread), so the filesystem
/// can serve them with one journal commit; the first error wins.
fn sync_together(
    a: impl FnOnce() -> Result<(), VmError> + Send,
    b: impl FnOnce() -> Result<(), VmError>,
) -> Result<(), VmError> {
    std::thread::scope(|s| {
        let h = s.spawn(a);
        let rb = b();
        let ra = h
            .join()
            .unwrap_or_else(|_| Err(VmError::Config("a snapshot sync thread panicked".into())));
        ra.and(rb)
    })
}

/// The dirty-page set a snapshot drained, and the first device that could
/// not report its backend's pages.
struct Drained {
    dirty: PageBitmap,
    unknown_device: Option<String>,
}

impl Vm {
    fn kvm_dirty(&self) -> Result<PageBitmap, VmError> {
        let mut b = PageBitmap::new(self.memory.pages());
        if self.dirty_log {
            let words = self
                .fd
                .get_dirty_log(0, self.memory.size() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            b.merge_words(&words);
        }
        Ok(b)
    }

    fn vm_kvm_state(&self) -> Result<VmKvmState, VmError> {
        let mut s = VmKvmState::default();
        if self.irqchip {
            let get = |id| -> Result<kvm_irqchip, VmError> {
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut c)
                    .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
                Ok(c)
            };
            s.pic_master = Some(get(KVM_IRQCHIP_PIC_MASTER)?);
            s.pic_slave = Some(get(KVM_IRQCHIP_PIC_SLAVE)?);
            s.ioapic = Some(get(KVM_IRQCHIP_IOAPIC)?);
        }
        if self.pit {
            s.pit2 = Some(self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?);
        }
        if self.caps.adjust_clock {
            s.clock = Some(self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?);
        }
        Ok(s)
    }

    /// Takes every dirty-page source: KVM's log (which resets it), the
    /// pages merged since the last snapshot, the devices' reports. After
    /// this returns, the pages live only in the result until the snapshot
    /// is stored or [`Vm::keep_dirty`] puts them back.
    fn drain_dirty(&self) -> Result<Drained, VmError> {
        let mut dirty = self.kvm_dirty()?;
        dirty.merge(&std::mem::replace(
            &mut *self.extra_dirty.lock().unwrap_or_else(|p| p.into_inner()),
            PageBitmap::new(self.memory.pages()),
        ));
        let mut unknown_device = None;
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            match d.take_dirty() {
                Some(words) => dirty.merge_words(&words),
                None => {
                    unknown_device.get_or_insert_with(|| d.id());
                }
            }
        }
        Ok(Drained {
            dirty,
            unknown_device,
        })
    }

    /// Whether [`Vm::snapshot`] makes its files durable before it returns
    /// (default on): fsync of the memory file, the state file (before it is
    /// renamed into place), the snapshot directory and the directory that
    /// holds it. Off is for snapshots nobody needs after a host crash
    /// (benchmarks, scratch clones).
    pub fn set_sync_snapshots(&self, on: bool) {
        self.sync_snapshots.store(on, Ordering::Relaxed);
    }

    /// Returns drained pages to the pending set (a snapshot failed).
    fn keep_dirty(&self, dirty: &PageBitmap) {
        self.extra_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .merge(dirty);
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed).
    ///
    /// `Full` writes all memory and starts a new chain; `Incremental` writes
    /// the pages dirtied since this VM's previous snapshot (or the snapshot
    /// it was restored from): KVM's dirty log merged with
    /// [`Vm::merge_dirty`] pages and the devices' [`SnapshotDevice::take_dirty`],
    /// and names that snapshot as its parent by a path relative to `dir`
    /// (e.g. `../0001`), so a chain of directories moved together still
    /// restores. After a successful snapshot the dirty set restarts from
    /// here; after a failed one it keeps every page it had, and the parent
    /// of the next incremental snapshot stays the last successful one.
    ///
    /// Unless [`Vm::set_sync_snapshots`] turned it off, the memory file,
    /// the state file, `dir` and the directory holding `dir` are fsync'd
    /// before this returns.
    pub fn snapshot(&self, dir: &Path, kind: MemoryKind) -> Result<SnapshotInfo, VmError> {
        let st = self.run_state();
        if st != RunState::Paused {
            return Err(VmError::State {
                state: st,
                op: "snapshot",
                need: "paused",
            });
        }
        let parent = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if kind == MemoryKind::Incremental {
            if !self.dirty_log {
                return Err(VmError::Config(
                    "incremental snapshots need the dirty log".into(),
                ));
            }
            if parent.is_none() {
                return Err(VmError::Config(
                    "an incremental snapshot needs an earlier snapshot".into(),
                ));
            }
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        // Overwriting a snapshot this VM's memory chain depends on would
        // corrupt later increments and, for a private restore, the mapping
        // the guest runs on.
        // A full snapshot depends on nothing, so a chain that is gone (uploaded
        // and removed) only matters to an incremental one.
        let mut chain = Vec::new();
        if let Some(p) = &parent {
            match self.parent_chain(p) {
                Ok(c) => {
                    chain = c;
                    for file in &chain {
                        if file.parent() == Some(dir.as_path()) {
                            return Err(VmError::Config(format!(
                                "{} holds a snapshot this VM depends on; write to another directory",
                                dir.display()
                            )));
                        }
                    }
                }
                Err(_) if kind == MemoryKind::Full => {}
                Err(e) => {
                    return Err(VmError::Config(format!(
                        "the parent snapshot {} cannot be read ({e}); take a full snapshot",
                        p.display()
                    )))
                }
            }
        }
        // No state file until the memory file is complete: a crash midway
        // leaves an invalid snapshot, never a mismatched one.
        // With fsync on, the removal is made durable first, so a crash
        // cannot bring the old state file back next to a new memory file.
        match std::fs::remove_file(dir.join(snapshot::STATE_FILE)) {
            Ok(()) if self.sync_snapshots.load(Ordering::Relaxed) => fsync(&dir)?,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&dir)(e)),
            _ => {}
        }

        let drained = self.drain_dirty()?;
        match self.write_snapshot(&dir, kind, parent.as_deref(), &drained) {
            Ok((info, file)) => {
                if kind == MemoryKind::Full {
                    chain.clear();
                }
                chain.insert(0, file);
                *self.last_chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
                Ok(info)
            }
            Err(e) => {
                self.keep_dirty(&drained.dirty);
                warn!(
                    dir = %dir.display(),
                    ?kind,
                    error = %e,
                    pages = drained.dirty.count(),
                    "snapshot failed; its dirty pages are kept for the next one"
                );
                Err(e)
            }
        }
    }

    /// The memory files of the chain ending at `parent` (the last
    /// snapshot), newest first. When this VM wrote that snapshot, the chain
    /// it remembers is checked to be still in place (one `stat` per link)
    /// instead of reading every link's state file again.
    fn parent_chain(&self, parent: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
        let known = self
            .last_chain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if known.first().and_then(|f| f.parent()) != Some(parent) {
            return Ok(snapshot::memory_chain(parent)?
                .into_iter()
                .map(|(f, _, _)| f)
                .collect());
        }
        for f in &known {
            let state = f.with_file_name(snapshot::STATE_FILE);
            for p in [f, &state] {
                std::fs::metadata(p).map_err(|source| SnapshotError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
            }
        }
        Ok(known)
    }

    /// Writes the snapshot's files; returns its info and its memory file.
    fn write_snapshot(
        &self,
        dir: &Path,
        kind: MemoryKind,
        parent: Option<&Path>,
        drained: &Drained,
    ) -> Result<(SnapshotInfo, PathBuf), VmError> {
        if let (MemoryKind::Incremental, Some(id)) = (kind, &drained.unknown_device) {
            return Err(VmError::Device {
                id: id.clone(),
                reason: "cannot report the pages its backend wrote; take a full snapshot".into(),
            });
        }
        let dirty = &drained.dirty;
        let sync = self.sync_snapshots.load(Ordering::Relaxed);
        let mut devices = Vec::new();
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let state = d
                .save_state()
                .map_err(|reason| VmError::Device { id: d.id(), reason })?;
            devices.push(DeviceState { id: d.id(), state });
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save_state()?);
        }
        let vm = self.vm_kvm_state()?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();

        // SAFETY: vCPUs are paused and devices quiesced, so nothing writes
        // guest memory while it is copied out.
        let mem = unsafe { self.memory.as_slice() };
        let (file, (pages, mem_file)) = match kind {
            MemoryKind::Full => (
                snapshot::FULL_MEMORY_FILE,
                memfile::write_full_file(&dir.join(snapshot::FULL_MEMORY_FILE), mem)
                    .map_err(SnapshotError::from)?,
            ),
            MemoryKind::Incremental => (
                snapshot::DIFF_MEMORY_FILE,
                memfile::write_diff_file(&dir.join(snapshot::DIFF_MEMORY_FILE), mem, dirty)
                    .map_err(SnapshotError::from)?,
            ),
        };
        // A directory reused for another kind must not keep a stale file.
        let other = match kind {
            MemoryKind::Full => snapshot::DIFF_MEMORY_FILE,
            MemoryKind::Incremental => snapshot::FULL_MEMORY_FILE,
        };
        let _ = std::fs::remove_file(dir.join(other));
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let data = SnapshotData {
            meta: SnapshotMeta {
                id: id.clone(),
                created_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                mem_size: self.memory.size(),
                vcpus: self.vcpus.len() as u32,
                irqchip: self.irqchip,
                pit: self.pit,
                memory: MemoryRef {
                    kind,
                    file: file.into(),
                    parent: match kind {
                        MemoryKind::Incremental => parent.map(|p| relative_path(dir, p)),
                        MemoryKind::Full => None,
                    },
                    pages,
                },
            },
            vm,
            vcpus,
            serial,
            devices,
        };
        let state = data.write_pending(dir)?;
        if sync {
            // Both files' data (and lengths) in one go: synced from two
            // threads, they usually share one journal commit. The state
            // file is renamed into place only after both are durable.
            let mem_path = dir.join(file);
            sync_together(
                || mem_file.sync_data().map_err(io_err(&mem_path)),
                || Ok(state.sync()?),
            )?;
        }
        drop(mem_file);
        state.commit()?;
        if sync {
            // The state file's name in `dir`, and `dir`'s in its parent
            // (it may be new).
            match dir.parent() {
                Some(up) => sync_together(|| fsync(dir), || fsync(up))?,
                None => fsync(dir)?,
            }
        }
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
        info!(dir = %dir.display(), ?kind, pages, "snapshot written");
        self.emit(
            LifecycleKind::Snapshot,
            format!("{kind:?}"),
            Some(id.clone()),
        );
        Ok((
            SnapshotInfo {
                dir: dir.to_path_buf(),
                id,
                kind,
                pages,
                dirty_pages: dirty.iter().collect(),
            },
            dir.join(file),
        ))
    }

    /// Builds a new, paused VM from a snapshot directory (following its
    /// parent chain for memory). Returns the VM and the device states the
    /// caller must restore (its devices' `Persist::restore`), map on the
    /// bus and register with [`Vm::add_snapshot_device`] before
    /// [`Vm::resume`].
    pub fn restore(dir: &Path, opts: RestoreOptions) -> Result<(Vm, Vec<DeviceState>), VmError> {
        let data = SnapshotData::load(dir)?;
        let memory = snapshot::restore_memory(dir, opts.memory)?;
        let serial = SerialDevice::from_snapshot(
            &data.serial,
            opts.serial_out.unwrap_or_else(|| Box::new(std::io::sink())),
        )?;
        let vcpus = u8::try_from(data.meta.vcpus)
            .map_err(|_| VmError::Config(format!("{} vCPUs in snapshot", data.meta.vcpus)))?;
        let mut vm = Self::build(
            BuildSpec {
                mem_size: data.meta.mem_size,
                vcpus,
                irqchip: data.meta.irqchip,
                dirty_log: opts.dirty_log,
            },
            memory,
            serial,
        )?;
        if data.meta.irqchip && !vm.irqchip {
            return Err(VmError::MissingCap(
                "an in-kernel irqchip (the snapshot has one)",
            ));
        }
        if data.meta.pit && !vm.pit {
            return Err(VmError::MissingCap(
                "an in-kernel PIT (the snapshot has one)",
            ));
        }
        let s = &data.vm;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic]
            .into_iter()
            .flatten()
        {
            vm.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(p) = &s.pit2 {
            vm.fd.set_pit2(p).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        if let (Some(c), true) = (&s.clock, vm.caps.adjust_clock) {
            let mut c = *c;
            c.flags = 0;
            vm.fd.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        for (v, st) in vm.pending.iter().zip(&data.vcpus) {
            v.restore_state(st)?;
        }
        vm.spawn_vcpus(true)?;
        vm.set_state(RunState::Paused);
        let canon = dir.canonicalize().map_err(|source| {
            VmError::Snapshot(SnapshotError::Io {
                path: dir.display().to_string(),
                source,
            })
        })?;
        *vm.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(canon);
        info!(dir = %dir.display(), "VM restored (paused)");
        Ok((vm, data.devices))
    }

    /// Saved vCPU states of the paused VM (for inspection).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        self.vcpus.iter().map(|v| Ok(v.save_state()?)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_named_relative_to_the_child() {
        let rel = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(rel("/s/chain/0002", "/s/chain/0001"), Path::new("../0001"));
        assert_eq!(rel("/s/a/b", "/s/c"), Path::new("../../c"));
        assert_eq!(rel("/x/y", "/p/q"), Path::new("../../p/q"));
        assert_eq!(rel("/s/a", "/s/a/base"), Path::new("base"));
        assert_eq!(rel("/s/a", "/s/a"), Path::new("."));
    }
}
