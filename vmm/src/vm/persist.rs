//! Snapshots of a paused VM and restores into a new one.
//!
//! A snapshot drains the dirty-page sources (KVM's log, pages merged with
//! [`Vm::merge_dirty`], the devices' [`SnapshotDevice::take_dirty`]) and
//! then writes the memory file and the state file under staging names
//! ([`Vm::snapshot_staged`], while the VM is paused). Unless turned off
//! with [`Vm::set_sync_snapshots`], [`Vm::complete_snapshot`] then fsyncs
//! them, renames them into place and fsyncs the directories; it may run
//! after the guest resumed, so the flush is not part of the pause.
//! [`Vm::snapshot`] does both in a row. If anything fails after the drain
//! (or the staged snapshot is dropped), the drained pages go back into the
//! VM's pending set, so the next snapshot still holds them.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
use crate::timing;
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

/// A snapshot [`Vm::snapshot_staged`] wrote but that is not complete:
/// its files are under staging names, not yet synced. Hand it to
/// [`Vm::complete_snapshot`] (the guest may run meanwhile). Dropping it
/// instead removes its files and gives its dirty pages back to the VM, so
/// the next incremental snapshot still holds them.
#[derive(Debug)]
pub struct PendingSnapshot {
    extra_dirty: Arc<Mutex<PageBitmap>>,
    staged_flag: Arc<AtomicBool>,
    info: SnapshotInfo,
    mem_tmp: PathBuf,
    mem_path: PathBuf,
    mem_file: Option<File>,
    state: Option<snapshot::PendingState>,
    /// The pages this snapshot drained from the VM.
    dirty: PageBitmap,
    /// The VM's memory chain once this snapshot is its last one.
    chain: Vec<PathBuf>,
    sync: bool,
    /// The files are in place (a later failure removes the state file).
    renamed: bool,
    done: bool,
}

impl PendingSnapshot {
    /// What the snapshot holds (its directory, kind and pages); it exists
    /// only after [`Vm::complete_snapshot`].
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Syncs (if on), renames into place, syncs the directories (if on).
    fn finish(&mut self) -> Result<(), VmError> {
        let dir = self.info.dir.clone();
        let mem_file = self
            .mem_file
            .take()
            .ok_or_else(|| VmError::Config("the staged snapshot was already finished".into()))?;
        let state = self
            .state
            .take()
            .ok_or_else(|| VmError::Config("the staged snapshot was already finished".into()))?;
        if self.sync {
            // Both files' data (and lengths) in one go: synced from two
            // threads, they usually share one journal commit. Neither is
            // renamed into place before both are durable.
            let mem_tmp = &self.mem_tmp;
            sync_together(
                || mem_file.sync_data().map_err(io_err(mem_tmp)),
                || Ok(state.sync()?),
            )?;
        }
        drop(mem_file);
        std::fs::rename(&self.mem_tmp, &self.mem_path).map_err(io_err(&self.mem_path))?;
        // The state file last: its name is what makes the directory a
        // snapshot.
        state.commit()?;
        self.renamed = true;
        if self.sync {
            // The names in `dir`, and `dir`'s in its parent (it may be new).
            match dir.parent() {
                Some(up) => sync_together(|| fsync(&dir), || fsync(up))?,
                None => fsync(&dir)?,
            }
        }
        Ok(())
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if !self.done {
            // Not a snapshot: its files go, its pages return.
            let dir = &self.info.dir;
            if self.renamed {
                let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
            }
            let _ = std::fs::remove_file(dir.join(format!("{}.tmp", snapshot::STATE_FILE)));
            let _ = std::fs::remove_file(&self.mem_tmp);
            self.extra_dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(&self.dirty);
        }
        self.staged_flag.store(false, Ordering::Release);
    }
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
    ///
    /// This is [`Vm::snapshot_staged`] followed at once by
    /// [`Vm::complete_snapshot`]; a caller that can resume the guest in
    /// between (so the fsyncs are not part of the pause) calls those two.
    pub fn snapshot(&self, dir: &Path, kind: MemoryKind) -> Result<SnapshotInfo, VmError> {
        let staged = self.snapshot_staged(dir, kind)?;
        self.complete_snapshot(staged)
    }

    /// The part of [`Vm::snapshot`] that needs the VM paused: drains the
    /// dirty-page sources, saves the vCPU, VM and device state and writes
    /// the memory file and the state file under staging names
    /// (`memory.diff.tmp` or `memory.bin.tmp`, and `vmstate.bin.tmp`),
    /// neither synced nor in place. The writes copy guest memory into the
    /// page cache, so the guest may be resumed as soon as this returns:
    /// what it writes afterwards does not change the snapshot, and KVM's
    /// dirty log (reset by the drain) collects it for the next incremental
    /// snapshot.
    ///
    /// The snapshot exists only once [`Vm::complete_snapshot`] returned:
    /// until then `dir` holds no state file, so nothing restores from it,
    /// and a crash leaves only the staging files. Dropping the returned
    /// handle instead removes them and gives its dirty pages back, as a
    /// failed snapshot does. One staged snapshot at a time: another
    /// `snapshot_staged` (or `snapshot`) is refused until it completed or
    /// was dropped.
    pub fn snapshot_staged(
        &self,
        dir: &Path,
        kind: MemoryKind,
    ) -> Result<PendingSnapshot, VmError> {
        let st = self.run_state();
        if st != RunState::Paused {
            return Err(VmError::State {
                state: st,
                op: "snapshot",
                need: "paused",
            });
        }
        if self
            .snapshot_staged
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(VmError::Config(
                "an earlier snapshot has not completed yet".into(),
            ));
        }
        // From here on the flag is cleared by the pending snapshot (on
        // completion or drop) or below, on failure.
        let r = self.stage(dir, kind);
        if r.is_err() {
            self.snapshot_staged.store(false, Ordering::Release);
        }
        r
    }

    fn stage(&self, dir: &Path, kind: MemoryKind) -> Result<PendingSnapshot, VmError> {
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
        // No state file until the memory file is complete and durable: a
        // crash midway leaves an invalid snapshot, never a mismatched one.
        // With fsync on, the removal is made durable first, so a crash
        // cannot bring the old state file back next to a new memory file.
        let sync = self.sync_snapshots.load(Ordering::Relaxed);
        match std::fs::remove_file(dir.join(snapshot::STATE_FILE)) {
            Ok(()) if sync => fsync(&dir)?,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&dir)(e)),
            _ => {}
        }

        let drained = self.drain_dirty()?;
        match self.write_staged(&dir, kind, parent.as_deref(), &drained) {
            Ok(mut pending) => {
                if kind == MemoryKind::Full {
                    chain.clear();
                }
                chain.insert(0, pending.mem_path.clone());
                pending.chain = chain;
                pending.sync = sync;
                pending.dirty = drained.dirty;
                Ok(pending)
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

    /// Finishes a snapshot [`Vm::snapshot_staged`] wrote; the VM may be
    /// running. With fsync on (see [`Vm::set_sync_snapshots`]): `fdatasync`
    /// of the memory file and the state file (from two threads, so they
    /// usually share one journal commit), then both are renamed into place
    /// (the state file last), then `dir` and the directory holding it are
    /// fsync'd. Only then is the snapshot this VM's last one (the parent of
    /// the next incremental snapshot), and only then is its `Snapshot`
    /// lifecycle event sent. On failure the snapshot's pages go back into
    /// the dirty set and its files are removed, as for a failed
    /// [`Vm::snapshot`].
    pub fn complete_snapshot(&self, mut p: PendingSnapshot) -> Result<SnapshotInfo, VmError> {
        if !Arc::ptr_eq(&p.extra_dirty, &self.extra_dirty) {
            return Err(VmError::Config(
                "the staged snapshot belongs to another VM".into(),
            ));
        }
        match p.finish() {
            Ok(()) => {}
            Err(e) => {
                warn!(
                    dir = %p.info.dir.display(),
                    kind = ?p.info.kind,
                    error = %e,
                    pages = p.dirty.count(),
                    "snapshot failed; its dirty pages are kept for the next one"
                );
                // Dropping `p` gives the pages back and removes the files.
                return Err(e);
            }
        }
        let dir = p.info.dir.clone();
        *self.last_chain.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut p.chain);
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
        let info = p.info.clone();
        p.done = true;
        drop(p);
        info!(dir = %dir.display(), kind = ?info.kind, pages = info.pages, "snapshot written");
        self.emit(
            LifecycleKind::Snapshot,
            format!("{:?}", info.kind),
            Some(info.id.clone()),
        );
        Ok(info)
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

    /// Writes the snapshot's files under their staging names.
    fn write_staged(
        &self,
        dir: &Path,
        kind: MemoryKind,
        parent: Option<&Path>,
        drained: &Drained,
    ) -> Result<PendingSnapshot, VmError> {
        if let (MemoryKind::Incremental, Some(id)) = (kind, &drained.unknown_device) {
            return Err(VmError::Device {
                id: id.clone(),
                reason: "cannot report the pages its backend wrote; take a full snapshot".into(),
            });
        }
        let dirty = &drained.dirty;
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

        let file = match kind {
            MemoryKind::Full => snapshot::FULL_MEMORY_FILE,
            MemoryKind::Incremental => snapshot::DIFF_MEMORY_FILE,
        };
        let mem_path = dir.join(file);
        let mem_tmp = dir.join(format!("{file}.tmp"));
        if let (MemoryKind::Full, Some(lazy)) = (kind, self.memory.lazy()) {
            // A full snapshot reads every page: bring the missing ones in
            // with the prefetcher (runs of up to 2 MiB) instead of one
            // fault per page. An incremental one reads only dirty pages,
            // which the guest's writes brought in already.
            lazy.populate_all(snapshot::lazy::POPULATE_TIMEOUT)
                .map_err(SnapshotError::from)?;
        }
        // SAFETY: vCPUs are paused and devices quiesced, so nothing writes
        // guest memory while it is copied out (into the page cache: once
        // written, later guest writes do not reach the file).
        let mem = unsafe { self.memory.as_slice() };
        let written = match kind {
            MemoryKind::Full => memfile::write_full_file(&mem_tmp, mem),
            MemoryKind::Incremental => memfile::write_diff_file(&mem_tmp, mem, dirty),
        };
        let (pages, mem_file) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&mem_tmp);
                return Err(SnapshotError::from(e).into());
            }
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
        let state = match data.write_pending(dir) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&mem_tmp);
                let _ = std::fs::remove_file(dir.join(format!("{}.tmp", snapshot::STATE_FILE)));
                return Err(e.into());
            }
        };
        Ok(PendingSnapshot {
            extra_dirty: self.extra_dirty.clone(),
            staged_flag: self.snapshot_staged.clone(),
            info: SnapshotInfo {
                dir: dir.to_path_buf(),
                id,
                kind,
                pages,
                dirty_pages: dirty.iter().collect(),
            },
            mem_tmp,
            mem_path,
            mem_file: Some(mem_file),
            state: Some(state),
            dirty: PageBitmap::new(0),
            chain: Vec::new(),
            sync: true,
            renamed: false,
            done: false,
        })
    }

    /// Builds a new, paused VM from a snapshot directory (following its
    /// parent chain for memory). Returns the VM and the device states the
    /// caller must restore (its devices' `Persist::restore`), map on the
    /// bus and register with [`Vm::add_snapshot_device`] before
    /// [`Vm::resume`].
    pub fn restore(dir: &Path, opts: RestoreOptions) -> Result<(Vm, Vec<DeviceState>), VmError> {
        let data = SnapshotData::load(dir)?;
        timing::stamp("state loaded");
        let memory = snapshot::restore_memory_of(dir, &data, opts.memory)?;
        timing::stamp("memory mapped");
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
                restoring: Some(&data.vcpus),
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
        timing::stamp("irqchip, PIT and clock state set");
        for (v, st) in vm.pending.iter().zip(&data.vcpus) {
            v.restore_state(st)?;
        }
        timing::stamp("vCPU state set");
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
