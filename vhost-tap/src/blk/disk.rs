//! The disk behind a block backend: a raw image, optionally with a chain of
//! copy-on-write layers over it.
//!
//! A chain is the image, any number of read-only *frozen* layers, and one
//! writable *top* layer. A read of a cluster comes from the top layer if it
//! holds the cluster, else from the highest frozen layer that holds it, else
//! from the image, which is never written while a layer is in use.
//!
//! The writable layer (the *overlay*) is a sparse file as large as the image
//! plus an allocation map in `<overlay>.map`: a 32-byte header (magic
//! `VMRCOW01`, `u32` version 1, `u32` cluster size, `u64` disk size, `u64`
//! reserved; little endian) followed by one bit per 4 KiB cluster (bit
//! `c % 8` of byte `c / 8`). A set bit means the cluster's current contents
//! live in that layer. Writes that cover part of a cluster the top layer
//! does not hold first copy the cluster from the layers below. Discard and
//! write-zeroes on a whole cluster punch a hole in the top layer and mark it
//! allocated, so it reads as zeros. Data and map are made durable by FLUSH.
//! A write that allocates clusters makes the layer's data durable
//! (`fdatasync`) before it sets their map bits, so after a crash a cluster
//! marked in the map never reads as zeros instead of its data.
//!
//! [`Disk::checkpoint`] freezes the top layer and opens a new one over it
//! (the snapshot cut). Frozen layers are either overlays (sparse file and
//! map, as the checkpoint leaves them) or *packed* layers ([`pack_layer`]:
//! header, map and only the allocated clusters, the form a snapshot stores;
//! see `docs/snapshot-format.md`). After the first checkpoint the chain is
//! recorded in `<overlay>.chain` next to the overlay the disk was opened
//! with, so a restarted backend opens the chain as it was last checkpointed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

/// Cluster size of every layer.
pub const CLUSTER: u64 = 4096;
const MAP_MAGIC: &[u8; 8] = b"VMRCOW01";
const MAP_HEADER: u64 = 32;
/// Magic of a packed layer file.
pub const PACKED_MAGIC: &[u8; 8] = b"VMRLAY01";
/// Header length of a packed layer file.
pub const PACKED_HEADER: u64 = 64;
const CHAIN_VERSION: u32 = 1;
/// Most layers a chain may have (frozen ones and the top).
pub const MAX_LAYERS: usize = 4096;

/// Errors opening or using a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0} is empty")]
    Empty(PathBuf),
    #[error("overlay map {path} does not belong to this image: {reason}")]
    BadMap { path: PathBuf, reason: &'static str },
    #[error("layer {path} cannot be used: {reason}")]
    BadLayer { path: PathBuf, reason: String },
    #[error("layer chain {path} cannot be used: {reason}")]
    BadChain { path: PathBuf, reason: String },
    #[error("the disk has no writable layer to freeze (start it with --overlay)")]
    NoOverlay,
    #[error("request beyond the end of the disk")]
    OutOfRange,
    #[error("disk is read-only")]
    ReadOnly,
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

struct Overlay {
    path: PathBuf,
    data: File,
    map: File,
    bits: Vec<AtomicU64>,
    alloc: Mutex<()>,
}

impl Overlay {
    #[inline]
    fn allocated(&self, cluster: u64) -> bool {
        let w = &self.bits[(cluster / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    /// Sets the bit and persists its map byte; caller holds `alloc`.
    fn mark(&self, cluster: u64) -> Result<(), DiskError> {
        let w = &self.bits[(cluster / 64) as usize];
        let v = w.fetch_or(1 << (cluster % 64), Ordering::AcqRel) | (1 << (cluster % 64));
        let byte = (v >> ((cluster % 64) / 8 * 8)) as u8;
        self.map.write_all_at(&[byte], MAP_HEADER + cluster / 8)?;
        Ok(())
    }
}

/// Where a frozen layer keeps its clusters.
enum FrozenData {
    /// An overlay's sparse file: cluster `c` at offset `c * CLUSTER`.
    Sparse(File),
    /// A packed file: the `n`-th allocated cluster at `data_at + n * CLUSTER`;
    /// `rank[w]` counts the allocated clusters before word `w` of the map.
    Packed {
        file: File,
        data_at: u64,
        rank: Vec<u64>,
    },
}

/// A read-only layer of the chain.
struct Frozen {
    path: PathBuf,
    bits: Vec<u64>,
    data: FrozenData,
}

impl Frozen {
    /// Offset in the layer's file of byte `at` of the disk (its cluster must
    /// be allocated in this layer).
    fn offset(&self, at: u64) -> u64 {
        match &self.data {
            FrozenData::Sparse(_) => at,
            FrozenData::Packed { data_at, rank, .. } => {
                let c = at / CLUSTER;
                let w = (c / 64) as usize;
                let below = self.bits[w] & ((1u64 << (c % 64)) - 1);
                data_at + (rank[w] + u64::from(below.count_ones())) * CLUSTER + at % CLUSTER
            }
        }
    }

    fn file(&self) -> &File {
        match &self.data {
            FrozenData::Sparse(f) => f,
            FrozenData::Packed { file, .. } => file,
        }
    }

    fn clusters(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The layers over the image.
struct Chain {
    /// Bottom first.
    frozen: Vec<Frozen>,
    /// Per cluster: 0 for the image, `i + 1` for `frozen[i]` (empty while
    /// there are no frozen layers).
    owner: Vec<u16>,
    top: Option<Overlay>,
}

/// Where a read of one cluster comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Image,
    Frozen(usize),
    Top,
}

/// What a checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    /// The layer that was frozen (the previous top).
    pub frozen_layer: PathBuf,
    /// Clusters it holds.
    pub clusters: u64,
    /// The new writable top layer.
    pub top: PathBuf,
    /// Every frozen layer, bottom first, after the checkpoint.
    pub chain: Vec<PathBuf>,
}

/// A raw image with an optional chain of copy-on-write layers.
pub struct Disk {
    base: File,
    chain: RwLock<Chain>,
    /// `<overlay>.chain` for the overlay the disk was opened with.
    chain_file: Option<PathBuf>,
    size: u64,
    read_only: bool,
}

fn open_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Open {
        path: path.to_owned(),
        source,
    }
}

fn bad_layer(path: &Path, reason: impl Into<String>) -> DiskError {
    DiskError::BadLayer {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn bad_chain(path: &Path, reason: impl Into<String>) -> DiskError {
    DiskError::BadChain {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The recorded chain (`<overlay>.chain`, JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainFile {
    version: u32,
    /// Frozen layers, bottom first.
    layers: Vec<PathBuf>,
    /// The writable top layer.
    top: PathBuf,
}

impl Disk {
    /// Opens `image`, and `overlay` (created if missing) if given. With an
    /// overlay the image is opened read-only.
    pub fn open(image: &Path, overlay: Option<&Path>, read_only: bool) -> Result<Self, DiskError> {
        Self::open_chain(image, &[], overlay, read_only)
    }

    /// Opens `image` with the read-only `layers` (bottom first, overlays or
    /// packed layers) over it and the writable `overlay` (created if
    /// missing) on top. If `<overlay>.chain` exists (written by an earlier
    /// [`Disk::checkpoint`]) it names the chain instead; `layers` must then
    /// be the bottom of the recorded chain. Layers without an overlay make a
    /// read-only disk.
    pub fn open_chain(
        image: &Path,
        layers: &[PathBuf],
        overlay: Option<&Path>,
        read_only: bool,
    ) -> Result<Self, DiskError> {
        let in_place = overlay.is_none() && layers.is_empty();
        let base = OpenOptions::new()
            .read(true)
            .write(!read_only && in_place)
            .open(image)
            .map_err(open_err(image))?;
        let size = base.metadata().map_err(open_err(image))?.len() / 512 * 512;
        if size == 0 {
            return Err(DiskError::Empty(image.to_owned()));
        }
        let chain_file = overlay.map(chain_path);
        let (layers, top): (Vec<PathBuf>, Option<PathBuf>) = match &chain_file {
            Some(cf) if cf.exists() => {
                let rec = read_chain(cf)?;
                if rec.layers.len() < layers.len() || rec.layers[..layers.len()] != *layers {
                    return Err(bad_chain(
                        cf,
                        format!(
                            "it records the layers {:?}, which do not start with the given {:?}",
                            rec.layers, layers
                        ),
                    ));
                }
                (rec.layers, Some(rec.top))
            }
            _ => (layers.to_vec(), overlay.map(Path::to_owned)),
        };
        if layers.len() + 1 > MAX_LAYERS {
            return Err(DiskError::BadLayer {
                path: layers.last().cloned().unwrap_or_default(),
                reason: format!("a chain has at most {MAX_LAYERS} layers"),
            });
        }
        let mut frozen = Vec::with_capacity(layers.len());
        for p in &layers {
            frozen.push(open_frozen(p, size)?);
        }
        let top = match top {
            None => None,
            Some(p) => Some(open_overlay(&p, size)?),
        };
        let mut chain = Chain {
            frozen,
            owner: Vec::new(),
            top,
        };
        chain.rebuild_owner(size);
        Ok(Self {
            base,
            chain: RwLock::new(chain),
            chain_file,
            size,
            read_only: read_only || (overlay.is_none() && !in_place),
        })
    }

    /// Size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check(&self, off: u64, len: u64) -> Result<(), DiskError> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange),
        }
    }

    fn layers(&self) -> RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(off, buf.len() as u64)?;
        let chain = self.layers();
        self.read_in(&chain, off, buf, true)
    }

    /// Reads through the chain; `with_top` false skips the top layer (the
    /// contents a copy-on-write copies from).
    fn read_in(
        &self,
        chain: &Chain,
        off: u64,
        buf: &mut [u8],
        with_top: bool,
    ) -> Result<(), DiskError> {
        if chain.top.is_none() && chain.frozen.is_empty() {
            self.base.read_exact_at(buf, off)?;
            return Ok(());
        }
        let src = |c: u64| -> Src {
            if with_top && chain.top.as_ref().is_some_and(|t| t.allocated(c)) {
                return Src::Top;
            }
            match chain.owner.get(c as usize) {
                Some(&i) if i > 0 => Src::Frozen(i as usize - 1),
                _ => Src::Image,
            }
        };
        // Runs of clusters read from the same layer.
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let s = src(at / CLUSTER);
            let mut end = pos;
            while end < buf.len() && src((off + end as u64) / CLUSTER) == s {
                let a = off + end as u64;
                end = ((a / CLUSTER + 1) * CLUSTER - off).min(buf.len() as u64) as usize;
            }
            let part = &mut buf[pos..end];
            match s {
                Src::Image => self.base.read_exact_at(part, at)?,
                Src::Top => chain
                    .top
                    .as_ref()
                    .expect("Src::Top only with a top layer")
                    .data
                    .read_exact_at(part, at)?,
                Src::Frozen(i) => {
                    // Consecutive clusters of one layer are consecutive in
                    // its file in both forms.
                    let l = &chain.frozen[i];
                    l.file().read_exact_at(part, l.offset(at))?;
                }
            }
            pos = end;
        }
        Ok(())
    }

    /// Whether writes go straight to the base image (no layers, writable),
    /// so [`Disk::write_iov`] can be used.
    pub fn writes_in_place(&self) -> bool {
        let c = self.layers();
        c.top.is_none() && c.frozen.is_empty() && !self.read_only
    }

    /// Writes the buffers `iov` describes, in order, at `off`, with as few
    /// `pwritev` calls as possible. Only for disks that write in place; the
    /// others return [`DiskError::ReadOnly`] or go through [`Disk::write`].
    ///
    /// # Safety
    /// Every entry of `iov` must describe memory that is mapped and readable
    /// for the duration of the call.
    pub unsafe fn write_iov(&self, off: u64, iov: &mut [libc::iovec]) -> Result<(), DiskError> {
        if !self.writes_in_place() {
            return Err(DiskError::ReadOnly);
        }
        let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        self.check(off, total)?;
        // SAFETY: the caller guarantees the iovecs describe readable, mapped
        // memory; the file descriptor is ours and open.
        unsafe { crate::iov::write_all(self.base.as_raw_fd(), iov, Some(off)) }?;
        Ok(())
    }

    /// Writes `data` at `off`. `scratch` is reused for cluster copies.
    pub fn write(&self, off: u64, data: &[u8], scratch: &mut Vec<u8>) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check(off, data.len() as u64)?;
        let chain = self.layers();
        let Some(ov) = &chain.top else {
            self.base.write_all_at(data, off)?;
            return Ok(());
        };
        let first = off / CLUSTER;
        let last = (off + data.len() as u64).saturating_sub(1) / CLUSTER;
        if data.is_empty() || (first..=last).all(|c| ov.allocated(c)) {
            ov.data.write_all_at(data, off)?;
            return Ok(());
        }
        // Some clusters are new. Their data is written and made durable
        // before their map bits are, so a crash can never leave a cluster
        // marked in the map whose data did not reach the layer (it would
        // read as zeros). The allocation lock is held until the bits are
        // set, so two writers never both copy a new cluster from below.
        let _g = ov.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let cluster = at / CLUSTER;
            let cstart = cluster * CLUSTER;
            let end = ((cstart + CLUSTER - off) as usize).min(data.len());
            let chunk = &data[pos..end];
            if ov.allocated(cluster) {
                ov.data.write_all_at(chunk, at)?;
            } else {
                let clen = CLUSTER.min(self.size - cstart) as usize;
                if chunk.len() == clen {
                    ov.data.write_all_at(chunk, cstart)?;
                } else {
                    scratch.resize(clen, 0);
                    self.read_in(&chain, cstart, &mut scratch[..clen], false)?;
                    let o = (at - cstart) as usize;
                    scratch[o..o + chunk.len()].copy_from_slice(chunk);
                    ov.data.write_all_at(&scratch[..clen], cstart)?;
                }
                fresh.push(cluster);
            }
            pos = end;
        }
        ov.data.sync_data()?;
        for cluster in fresh {
            ov.mark(cluster)?;
        }
        Ok(())
    }

    /// Makes the range read as zeros (discard and write-zeroes).
    pub fn zero(&self, off: u64, len: u64, scratch: &mut Vec<u8>) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check(off, len)?;
        let chain = self.layers();
        let Some(ov) = &chain.top else {
            if punch_hole(&self.base, off, len).is_err() {
                write_zeros(&self.base, off, len, scratch)?;
            }
            return Ok(());
        };
        let end = off + len;
        let mut at = off;
        while at < end {
            let cluster = at / CLUSTER;
            let cstart = cluster * CLUSTER;
            let cend = (cstart + CLUSTER).min(self.size);
            let stop = cend.min(end);
            if at == cstart && stop == cend {
                let _g = ov.alloc.lock().unwrap_or_else(|p| p.into_inner());
                if punch_hole(&ov.data, cstart, cend - cstart).is_err() {
                    write_zeros(&ov.data, cstart, cend - cstart, scratch)?;
                }
                if !ov.allocated(cluster) {
                    ov.mark(cluster)?;
                }
            } else {
                let n = (stop - at) as usize;
                let mut zeros = std::mem::take(scratch);
                zeros.clear();
                zeros.resize(n, 0);
                let mut s2 = Vec::new();
                drop(chain);
                let r = self.write(at, &zeros, &mut s2);
                *scratch = zeros;
                r?;
                return self.zero(stop, end - stop, scratch);
            }
            at = stop;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        let chain = self.layers();
        match &chain.top {
            None => {
                if !self.read_only && chain.frozen.is_empty() {
                    self.base.sync_data()?;
                }
            }
            Some(ov) => {
                ov.data.sync_data()?;
                ov.map.sync_data()?;
            }
        }
        Ok(())
    }

    /// Number of clusters allocated in the top layer (0 without one).
    pub fn allocated_clusters(&self) -> u64 {
        self.layers().top.as_ref().map_or(0, |ov| {
            ov.bits
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum()
        })
    }

    /// The frozen layers, bottom first, and the top layer.
    pub fn layer_paths(&self) -> (Vec<PathBuf>, Option<PathBuf>) {
        let c = self.layers();
        (
            c.frozen.iter().map(|f| f.path.clone()).collect(),
            c.top.as_ref().map(|t| t.path.clone()),
        )
    }

    /// Freezes the top layer and opens a new, empty top layer at `next`
    /// over it. The caller makes sure no request is in flight (the block
    /// backend's [`crate::checkpoint`] does). In order: the top layer's data
    /// and map are made durable; the new layer's files are created, made
    /// durable and their directory synced; the chain file
    /// (`<overlay>.chain`) is replaced atomically; only then are writes
    /// directed to the new layer. A crash before the chain file is replaced
    /// leaves the old chain in use (and `next` unused); after it, the new
    /// one. The frozen layer's files are made read-only.
    pub fn checkpoint(&self, next: &Path) -> Result<Checkpointed, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let chain_file = self.chain_file.clone().ok_or(DiskError::NoOverlay)?;
        let mut chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        let Some(top) = chain.top.as_ref() else {
            return Err(DiskError::NoOverlay);
        };
        if chain.frozen.len() + 2 > MAX_LAYERS {
            return Err(bad_chain(
                &chain_file,
                format!("a chain has at most {MAX_LAYERS} layers"),
            ));
        }
        let in_use = |p: &Path| p == top.path || chain.frozen.iter().any(|f| f.path == p);
        if in_use(next) || in_use(&map_path(next)) {
            return Err(bad_layer(next, "it is already a layer of this disk"));
        }
        top.data.sync_data()?;
        top.map.sync_all()?;
        // A leftover of an earlier checkpoint that did not finish.
        for p in [next.to_owned(), map_path(next)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_err(&p)(e)),
            }
        }
        let fresh = open_overlay(next, self.size)?;
        fresh.data.sync_all().map_err(open_err(next))?;
        fresh.map.sync_all().map_err(open_err(next))?;
        sync_parent(next)?;
        let mut layers: Vec<PathBuf> = chain.frozen.iter().map(|f| f.path.clone()).collect();
        layers.push(top.path.clone());
        write_chain(
            &chain_file,
            &ChainFile {
                version: CHAIN_VERSION,
                layers: layers.clone(),
                top: next.to_owned(),
            },
        )?;
        let old = chain.top.replace(fresh).expect("checked above");
        let bits: Vec<u64> = old.bits.iter().map(|w| w.load(Ordering::Acquire)).collect();
        let frozen = Frozen {
            path: old.path.clone(),
            bits,
            data: FrozenData::Sparse(old.data),
        };
        let clusters = frozen.clusters();
        for p in [old.path.clone(), map_path(&old.path)] {
            if let Ok(m) = std::fs::metadata(&p) {
                let mut perm = m.permissions();
                perm.set_readonly(true);
                let _ = std::fs::set_permissions(&p, perm);
            }
        }
        chain.frozen.push(frozen);
        chain.rebuild_owner(self.size);
        Ok(Checkpointed {
            frozen_layer: old.path,
            clusters,
            top: next.to_owned(),
            chain: layers,
        })
    }
}

impl Chain {
    fn rebuild_owner(&mut self, size: u64) {
        if self.frozen.is_empty() {
            self.owner = Vec::new();
            return;
        }
        let clusters = size.div_ceil(CLUSTER) as usize;
        let mut owner = vec![0u16; clusters];
        for (i, l) in self.frozen.iter().enumerate() {
            let id = (i + 1) as u16;
            for (w, &word) in l.bits.iter().enumerate() {
                let mut v = word;
                while v != 0 {
                    let b = v.trailing_zeros() as usize;
                    v &= v - 1;
                    if let Some(o) = owner.get_mut(w * 64 + b) {
                        *o = id;
                    }
                }
            }
        }
        self.owner = owner;
    }
}

fn map_header(size: u64) -> [u8; MAP_HEADER as usize] {
    let mut header = [0u8; MAP_HEADER as usize];
    header[0..8].copy_from_slice(MAP_MAGIC);
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    header[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
    header[16..24].copy_from_slice(&size.to_le_bytes());
    header
}

/// Reads and checks an overlay's map; `None` if the map file is empty.
fn read_map(map: &File, map_path: &Path, size: u64) -> Result<Option<Vec<u64>>, DiskError> {
    let clusters = size.div_ceil(CLUSTER);
    let existing = map.metadata().map_err(open_err(map_path))?.len();
    if existing == 0 {
        return Ok(None);
    }
    let bad = |reason| DiskError::BadMap {
        path: map_path.to_owned(),
        reason,
    };
    let header = map_header(size);
    let mut got = [0u8; MAP_HEADER as usize];
    map.read_exact_at(&mut got, 0)
        .map_err(|_| bad("short header"))?;
    if got[0..8] != MAP_MAGIC[..] {
        return Err(bad("bad magic"));
    }
    if got[8..24] != header[8..24] {
        return Err(bad("version, cluster size or disk size differ"));
    }
    let mut bytes = vec![0u8; clusters.div_ceil(8) as usize];
    map.read_exact_at(&mut bytes, MAP_HEADER)
        .map_err(|_| bad("map shorter than the disk"))?;
    Ok(Some(bits_from_bytes(&bytes, clusters)))
}

fn bits_from_bytes(bytes: &[u8], clusters: u64) -> Vec<u64> {
    let mut bits = vec![0u64; clusters.div_ceil(64) as usize];
    for (i, b) in bytes.iter().enumerate() {
        bits[i / 8] |= u64::from(*b) << ((i % 8) * 8);
    }
    // Bits past the last cluster are ignored.
    if clusters % 64 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (clusters % 64)) - 1;
        }
    }
    bits
}

fn open_overlay(path: &Path, size: u64) -> Result<Overlay, DiskError> {
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(open_err(path))?;
    data.set_len(size).map_err(open_err(path))?;
    let map_path = map_path(path);
    let map = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&map_path)
        .map_err(open_err(&map_path))?;
    let clusters = size.div_ceil(CLUSTER);
    let bits = match read_map(&map, &map_path, size)? {
        Some(b) => b,
        None => {
            map.write_all_at(&map_header(size), 0)
                .map_err(open_err(&map_path))?;
            map.set_len(MAP_HEADER + clusters.div_ceil(8))
                .map_err(open_err(&map_path))?;
            vec![0u64; clusters.div_ceil(64) as usize]
        }
    };
    Ok(Overlay {
        path: path.to_owned(),
        data,
        map,
        bits: bits.into_iter().map(AtomicU64::new).collect(),
        alloc: Mutex::new(()),
    })
}

/// Opens a read-only layer: a packed layer file, or an overlay with its map.
fn open_frozen(path: &Path, size: u64) -> Result<Frozen, DiskError> {
    let file = File::open(path).map_err(open_err(path))?;
    let mut magic = [0u8; 8];
    let packed = file.read_exact_at(&mut magic, 0).is_ok() && &magic == PACKED_MAGIC;
    if packed {
        let h = read_packed_header(&file, path)?;
        if h.disk_size != size {
            return Err(bad_layer(
                path,
                format!(
                    "it is for a disk of {} bytes, this disk has {size}",
                    h.disk_size
                ),
            ));
        }
        let clusters = size.div_ceil(CLUSTER);
        let mut bytes = vec![0u8; clusters.div_ceil(8) as usize];
        file.read_exact_at(&mut bytes, PACKED_HEADER)
            .map_err(|_| bad_layer(path, "its map is cut short"))?;
        let bits = bits_from_bytes(&bytes, clusters);
        let mut rank = Vec::with_capacity(bits.len());
        let mut n = 0u64;
        for w in &bits {
            rank.push(n);
            n += u64::from(w.count_ones());
        }
        if n != h.clusters {
            return Err(bad_layer(
                path,
                format!("its header counts {} clusters, its map {n}", h.clusters),
            ));
        }
        let len = file.metadata().map_err(open_err(path))?.len();
        if len != h.data_at + n * CLUSTER {
            return Err(bad_layer(
                path,
                format!(
                    "it is {len} bytes long, its header says {}",
                    h.data_at + n * CLUSTER
                ),
            ));
        }
        return Ok(Frozen {
            path: path.to_owned(),
            bits,
            data: FrozenData::Packed {
                file,
                data_at: h.data_at,
                rank,
            },
        });
    }
    let mp = map_path(path);
    let map = File::open(&mp).map_err(open_err(&mp))?;
    let bits = read_map(&map, &mp, size)?
        .ok_or_else(|| bad_layer(path, format!("its map {} is empty", mp.display())))?;
    Ok(Frozen {
        path: path.to_owned(),
        bits,
        data: FrozenData::Sparse(file),
    })
}

struct PackedHeader {
    disk_size: u64,
    clusters: u64,
    data_at: u64,
}

fn read_packed_header(file: &File, path: &Path) -> Result<PackedHeader, DiskError> {
    let mut h = [0u8; PACKED_HEADER as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| bad_layer(path, "its header is cut short"))?;
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if &h[0..8] != PACKED_MAGIC {
        return Err(bad_layer(path, "bad magic"));
    }
    if u32_at(8) != 1 {
        return Err(bad_layer(
            path,
            format!("version {} (this build reads 1)", u32_at(8)),
        ));
    }
    if u64::from(u32_at(12)) != CLUSTER {
        return Err(bad_layer(
            path,
            format!("cluster size {} (this build uses {CLUSTER})", u32_at(12)),
        ));
    }
    let disk_size = u64_at(16);
    let clusters = u64_at(24);
    let data_at = u64_at(32);
    let map_end = PACKED_HEADER + disk_size.div_ceil(CLUSTER).div_ceil(8);
    if disk_size == 0 || data_at != map_end.div_ceil(CLUSTER) * CLUSTER {
        return Err(bad_layer(path, "its disk size and data offset disagree"));
    }
    Ok(PackedHeader {
        disk_size,
        clusters,
        data_at,
    })
}

/// What [`pack_layer`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Clusters in the layer.
    pub clusters: u64,
    /// Size of the packed file.
    pub bytes: u64,
}

/// Writes the frozen overlay `layer` (sparse file and map) as a packed layer
/// file `out` (fsync'd): a 64-byte header, the map, and only the allocated
/// clusters (layout in `docs/snapshot-format.md`). `out` opens as a frozen
/// layer of the same disk ([`Disk::open_chain`]).
pub fn pack_layer(layer: &Path, out: &Path) -> Result<Packed, DiskError> {
    let data = File::open(layer).map_err(open_err(layer))?;
    let size = data.metadata().map_err(open_err(layer))?.len();
    if size == 0 || size % 512 != 0 {
        return Err(bad_layer(layer, "it is not an overlay (size)"));
    }
    let mp = map_path(layer);
    let map = File::open(&mp).map_err(open_err(&mp))?;
    let bits = read_map(&map, &mp, size)?
        .ok_or_else(|| bad_layer(layer, format!("its map {} is empty", mp.display())))?;
    let clusters = size.div_ceil(CLUSTER);
    let n: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
    let map_bytes = clusters.div_ceil(8);
    let data_at = (PACKED_HEADER + map_bytes).div_ceil(CLUSTER) * CLUSTER;
    let mut h = [0u8; PACKED_HEADER as usize];
    h[0..8].copy_from_slice(PACKED_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&n.to_le_bytes());
    h[32..40].copy_from_slice(&data_at.to_le_bytes());
    let mut bytes = vec![0u8; (data_at - PACKED_HEADER) as usize];
    for (i, w) in bits.iter().enumerate() {
        for (j, b) in w.to_le_bytes().iter().enumerate() {
            if let Some(slot) = bytes.get_mut(i * 8 + j) {
                if (i * 8 + j) < map_bytes as usize {
                    *slot = *b;
                }
            }
        }
    }
    let tmp = {
        let mut s = out.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let f = File::create(&tmp).map_err(open_err(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    w.write_all(&h)?;
    w.write_all(&bytes)?;
    let mut buf = vec![0u8; CLUSTER as usize];
    for (wi, &word) in bits.iter().enumerate() {
        let mut v = word;
        while v != 0 {
            let b = u64::from(v.trailing_zeros());
            v &= v - 1;
            let c = wi as u64 * 64 + b;
            let at = c * CLUSTER;
            let len = CLUSTER.min(size - at) as usize;
            buf.fill(0);
            data.read_exact_at(&mut buf[..len], at)?;
            w.write_all(&buf)?;
        }
    }
    w.flush()?;
    drop(w);
    f.sync_all()?;
    std::fs::rename(&tmp, out).map_err(open_err(out))?;
    sync_parent(out)?;
    Ok(Packed {
        clusters: n,
        bytes: data_at + n * CLUSTER,
    })
}

/// The allocation map file of an overlay.
pub fn map_path(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

/// The chain file of a disk opened with `overlay`.
pub fn chain_path(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".chain");
    PathBuf::from(s)
}

fn read_chain(path: &Path) -> Result<ChainFile, DiskError> {
    let body = std::fs::read(path).map_err(open_err(path))?;
    let rec: ChainFile =
        serde_json::from_slice(&body).map_err(|e| bad_chain(path, e.to_string()))?;
    if rec.version != CHAIN_VERSION {
        return Err(bad_chain(
            path,
            format!("version {} (this build reads {CHAIN_VERSION})", rec.version),
        ));
    }
    Ok(rec)
}

fn write_chain(path: &Path, rec: &ChainFile) -> Result<(), DiskError> {
    let body = serde_json::to_vec_pretty(rec).map_err(|e| bad_chain(path, e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(open_err(&tmp))?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(open_err(path))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), DiskError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(open_err(dir))
}

fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own with plain integer
    // arguments; the result is checked.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_zeros(f: &File, off: u64, len: u64, scratch: &mut Vec<u8>) -> std::io::Result<()> {
    scratch.clear();
    scratch.resize(len.min(1 << 20) as usize, 0);
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(scratch.len() as u64) as usize;
        f.write_all_at(&scratch[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_iov_writes_every_buffer_in_order_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(dir.path(), 64 << 10);
        let disk = Disk::open(&base, None, false).unwrap();
        assert!(disk.writes_in_place());
        let a = vec![0xaau8; 4096];
        let b = vec![0xbbu8; 100];
        let c = vec![0xccu8; 8192];
        let mut iov: Vec<libc::iovec> = [&a, &b, &c]
            .iter()
            .map(|v| libc::iovec {
                iov_base: v.as_ptr().cast_mut().cast(),
                iov_len: v.len(),
            })
            .collect();
        // SAFETY: the iovecs point at the live vectors above.
        unsafe { disk.write_iov(1024, &mut iov) }.unwrap();
        let got = std::fs::read(&base).unwrap();
        assert_eq!(&got[1024..1024 + 4096], a.as_slice());
        assert_eq!(&got[5120..5220], b.as_slice());
        assert_eq!(&got[5220..5220 + 8192], c.as_slice());
        assert_eq!(got[1023], 1, "bytes before the write are untouched");

        let mut past_end = vec![libc::iovec {
            iov_base: a.as_ptr().cast_mut().cast(),
            iov_len: a.len(),
        }];
        // SAFETY: as above.
        let r = unsafe { disk.write_iov((64 << 10) - 100, &mut past_end) };
        assert!(matches!(r, Err(DiskError::OutOfRange)));

        let with_overlay = Disk::open(&base, Some(&dir.path().join("ov")), false).unwrap();
        assert!(!with_overlay.writes_in_place());
    }

    fn image(dir: &Path, size: usize) -> PathBuf {
        let p = dir.join("base.raw");
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn overlay_copy_on_write_keeps_base_intact() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 64 * 1024);
        let before = std::fs::read(&img).unwrap();
        let ov = dir.path().join("ov");
        let d = Disk::open(&img, Some(&ov), false).unwrap();
        let mut s = Vec::new();
        // Partial-cluster write in the middle of cluster 1.
        d.write(4096 + 512, &[0xaa; 1024], &mut s).unwrap();
        let mut buf = vec![0u8; 8192];
        d.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &before[..4096]);
        assert_eq!(&buf[4096..4608], &before[4096..4608]);
        assert_eq!(&buf[4608..5632], &[0xaa; 1024][..]);
        assert_eq!(&buf[5632..], &before[5632..8192]);
        d.zero(8192, 4096 + 512, &mut s).unwrap();
        let mut z = vec![1u8; 4096 + 512];
        d.read(8192, &mut z).unwrap();
        assert!(z.iter().all(|b| *b == 0));
        assert_eq!(d.allocated_clusters(), 3);
        d.flush().unwrap();
        drop(d);
        assert_eq!(std::fs::read(&img).unwrap(), before);
        // Reopen: the map persisted.
        let d = Disk::open(&img, Some(&ov), false).unwrap();
        assert_eq!(d.allocated_clusters(), 3);
        let mut buf = vec![0u8; 1024];
        d.read(4608, &mut buf).unwrap();
        assert_eq!(buf, vec![0xaa; 1024]);
        assert!(matches!(
            d.read(64 * 1024 - 512, &mut buf),
            Err(DiskError::OutOfRange)
        ));
    }

    #[test]
    fn a_write_over_old_and_new_clusters_marks_only_clusters_whose_data_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 64 * 1024);
        let before = std::fs::read(&img).unwrap();
        let ov = dir.path().join("ov");
        let d = Disk::open(&img, Some(&ov), false).unwrap();
        let mut s = Vec::new();
        d.write(4096, &[0x11; 4096], &mut s).unwrap(); // cluster 1 allocated
                                                       // Tail of cluster 1 (allocated), all of cluster 2 (new, whole),
                                                       // head of cluster 3 (new, partial: copied from the image first).
        let data = vec![0x22u8; 2048 + 4096 + 1024];
        d.write(4096 + 2048, &data, &mut s).unwrap();
        assert_eq!(d.allocated_clusters(), 3);
        let mut got = vec![0u8; 4 * 4096];
        d.read(0, &mut got).unwrap();
        assert_eq!(&got[..4096], &before[..4096]);
        assert_eq!(&got[4096..6144], &[0x11; 2048][..]);
        assert_eq!(&got[6144..6144 + data.len()], data.as_slice());
        assert_eq!(&got[13312..], &before[13312..16384]);
        // The files themselves: every cluster set in the map file holds
        // its data in the overlay file.
        let map = std::fs::read(map_path(&ov)).unwrap();
        let raw = std::fs::read(&ov).unwrap();
        for c in 0..16u64 {
            let set = map[MAP_HEADER as usize + (c / 8) as usize] & (1 << (c % 8)) != 0;
            assert_eq!(set, (1..=3).contains(&c), "cluster {c}");
            if set {
                let at = (c * CLUSTER) as usize;
                assert_eq!(&raw[at..at + 4096], &got[at..at + 4096], "cluster {c}");
            }
        }
    }

    #[test]
    fn map_of_another_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8192);
        let ov = dir.path().join("ov");
        drop(Disk::open(&img, Some(&ov), false).unwrap());
        std::fs::write(&img, vec![0u8; 16384]).unwrap();
        assert!(matches!(
            Disk::open(&img, Some(&ov), false),
            Err(DiskError::BadMap { .. })
        ));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8192);
        let d = Disk::open(&img, None, true).unwrap();
        assert!(matches!(
            d.write(0, &[1; 512], &mut Vec::new()),
            Err(DiskError::ReadOnly)
        ));
    }

    fn read_all(d: &Disk) -> Vec<u8> {
        let mut v = vec![0u8; d.size() as usize];
        d.read(0, &mut v).unwrap();
        v
    }

    #[test]
    fn checkpoint_freezes_the_top_and_reads_go_through_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 64 * 1024 + 512);
        let before = std::fs::read(&img).unwrap();
        let l0 = dir.path().join("l0");
        let d = Disk::open(&img, Some(&l0), false).unwrap();
        let mut s = Vec::new();
        let mut want = before.clone();
        let mut put = |d: &Disk, want: &mut Vec<u8>, off: usize, b: &[u8]| {
            d.write(off as u64, b, &mut s).unwrap();
            want[off..off + b.len()].copy_from_slice(b);
        };
        put(&d, &mut want, 100, &[1; 5000]); // clusters 0, 1
        let c1 = d.checkpoint(&dir.path().join("l1")).unwrap();
        assert_eq!(c1.frozen_layer, l0);
        assert_eq!(c1.clusters, 2);
        assert_eq!(c1.chain, vec![l0.clone()]);
        assert!(read_all(&d) == want, "a checkpoint changes no contents");
        // A partial write over a cluster of the frozen layer copies it from
        // there, not from the image.
        put(&d, &mut want, 4096 + 10, &[2; 10]);
        put(&d, &mut want, 5 * 4096, &[3; 4096]);
        // The last, short cluster of the disk.
        put(&d, &mut want, 64 * 1024 + 100, &[4; 50]);
        let c2 = d.checkpoint(&dir.path().join("l2")).unwrap();
        assert_eq!(c2.clusters, 3);
        let at_cut = want.clone();
        put(&d, &mut want, 0, &[5; 512]);
        d.zero(5 * 4096, 4096, &mut s).unwrap();
        want[5 * 4096..6 * 4096].fill(0);
        assert!(read_all(&d) == want, "reads go through the chain");
        assert_eq!(d.layer_paths().0.len(), 2);
        // Frozen layers are untouched by later writes; the image too.
        let frozen0 = std::fs::read(&l0).unwrap();
        assert!(frozen0[100..5100].iter().all(|b| *b == 1));
        assert!(std::fs::metadata(&l0).unwrap().permissions().readonly());
        d.flush().unwrap();
        drop(d);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "the image is untouched"
        );

        // Reopened with the overlay it was first opened with: the chain file
        // names the layers and the current top.
        let d = Disk::open(&img, Some(&l0), false).unwrap();
        let (frozen, top) = d.layer_paths();
        assert_eq!(frozen, vec![l0.clone(), dir.path().join("l1")]);
        assert_eq!(top, Some(dir.path().join("l2")));
        assert!(read_all(&d) == want, "the reopened chain reads the same");
        drop(d);

        // Packed layers read exactly like the overlays they came from.
        let p0 = dir.path().join("p0");
        let p1 = dir.path().join("p1");
        assert_eq!(pack_layer(&l0, &p0).unwrap().clusters, 2);
        let packed = pack_layer(&dir.path().join("l1"), &p1).unwrap();
        assert_eq!(packed.clusters, 3);
        assert_eq!(packed.bytes, std::fs::metadata(&p1).unwrap().len());
        assert_eq!(packed.bytes, 4096 + 3 * 4096);
        let top = dir.path().join("private");
        let d = Disk::open_chain(&img, &[p0.clone(), p1.clone()], Some(&top), false).unwrap();
        assert!(
            read_all(&d) == at_cut,
            "the packed chain reads as the disk at the cut"
        );
        // Its own writes go to the private top.
        d.write(4096 + 10, &[9; 4], &mut Vec::new()).unwrap();
        let mut b = [0u8; 6];
        d.read(4096 + 9, &mut b).unwrap();
        assert_eq!(b, [1, 9, 9, 9, 9, 2]);
        drop(d);
        // Read-only without a top layer.
        let ro = Disk::open_chain(&img, &[p0, p1], None, false).unwrap();
        assert!(ro.read_only());
        assert!(matches!(
            ro.write(0, &[1], &mut Vec::new()),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(
            ro.checkpoint(&dir.path().join("x")),
            Err(DiskError::ReadOnly)
        ));
    }

    #[test]
    fn checkpoint_refuses_bad_targets_and_a_chain_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 16384);
        let plain = Disk::open(&img, None, false).unwrap();
        assert!(matches!(
            plain.checkpoint(&dir.path().join("n")),
            Err(DiskError::NoOverlay)
        ));
        drop(plain);
        let l0 = dir.path().join("l0");
        let d = Disk::open(&img, Some(&l0), false).unwrap();
        assert!(matches!(d.checkpoint(&l0), Err(DiskError::BadLayer { .. })));
        // A leftover file at the target (a checkpoint that crashed before
        // recording the chain) is replaced.
        std::fs::write(dir.path().join("l1"), b"junk").unwrap();
        d.checkpoint(&dir.path().join("l1")).unwrap();
        assert_eq!(d.allocated_clusters(), 0);
        drop(d);
        let other = dir.path().join("other");
        std::fs::write(&other, vec![0u8; 16384]).unwrap();
        drop(Disk::open(&img, Some(&other), false).unwrap());
        let e = Disk::open_chain(&img, &[other], Some(&l0), false)
            .err()
            .expect("a chain file that does not start with the given layers is refused");
        assert!(matches!(e, DiskError::BadChain { .. }), "{e}");
    }

    #[test]
    fn damaged_packed_layers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 32768);
        let l0 = dir.path().join("l0");
        let d = Disk::open(&img, Some(&l0), false).unwrap();
        d.write(0, &[7; 8192], &mut Vec::new()).unwrap();
        d.checkpoint(&dir.path().join("l1")).unwrap();
        let p = dir.path().join("p");
        pack_layer(&l0, &p).unwrap();
        let good = std::fs::read(&p).unwrap();
        let try_open = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            Disk::open_chain(&img, std::slice::from_ref(&p), None, true)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(try_open(&good), None);
        assert!(try_open(&good[..good.len() - 1])
            .unwrap()
            .contains("bytes long"));
        let mut bad = good.clone();
        bad[8] = 2;
        assert!(try_open(&bad).unwrap().contains("version 2"));
        let mut bad = good.clone();
        bad[PACKED_HEADER as usize] = 0x07; // a third cluster in the map
        assert!(try_open(&bad).unwrap().contains("clusters"));
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 16384]).unwrap();
        std::fs::write(&p, &good).unwrap();
        let e = Disk::open_chain(&small, &[p], None, true).err().unwrap();
        assert!(e.to_string().contains("cannot be used"), "{e}");
    }
}
