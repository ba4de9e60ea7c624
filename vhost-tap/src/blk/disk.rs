//! The disk behind a block backend: a raw image, optionally with a
//! copy-on-write overlay.
//!
//! The overlay is a sparse file as large as the image plus an allocation map
//! in `<overlay>.map`: a 32-byte header (magic `VMRCOW01`, `u32` version 1,
//! `u32` cluster size, `u64` disk size, `u64` reserved; little endian)
//! followed by one bit per 4 KiB cluster (bit `c % 8` of byte `c / 8`). A
//! set bit means the cluster's current contents live in the overlay; reads of
//! other clusters come from the image, which is never written while an
//! overlay is in use. Writes that cover part of an unallocated cluster first
//! copy the image's cluster into the overlay. Discard and write-zeroes on a
//! whole cluster punch a hole in the overlay and mark it allocated, so it
//! reads as zeros. Data and map are made durable by FLUSH. A write that
//! allocates clusters makes the overlay's data durable (`fdatasync`) before
//! it sets their map bits, so after a crash a cluster marked in the map
//! never reads as zeros instead of its data.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Cluster size of the overlay.
pub const CLUSTER: u64 = 4096;
const MAP_MAGIC: &[u8; 8] = b"VMRCOW01";
const MAP_HEADER: u64 = 32;

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
    #[error("request beyond the end of the disk")]
    OutOfRange,
    #[error("disk is read-only")]
    ReadOnly,
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

struct Overlay {
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

/// A raw image with an optional overlay.
pub struct Disk {
    base: File,
    overlay: Option<Overlay>,
    size: u64,
    read_only: bool,
}

fn open_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Open {
        path: path.to_owned(),
        source,
    }
}

impl Disk {
    /// Opens `image`, and `overlay` (created if missing) if given. With an
    /// overlay the image is opened read-only.
    pub fn open(image: &Path, overlay: Option<&Path>, read_only: bool) -> Result<Self, DiskError> {
        let base = OpenOptions::new()
            .read(true)
            .write(!read_only && overlay.is_none())
            .open(image)
            .map_err(open_err(image))?;
        let size = base.metadata().map_err(open_err(image))?.len() / 512 * 512;
        if size == 0 {
            return Err(DiskError::Empty(image.to_owned()));
        }
        let overlay = match overlay {
            None => None,
            Some(p) => Some(Self::open_overlay(p, size)?),
        };
        Ok(Self {
            base,
            overlay,
            size,
            read_only,
        })
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
        let map_len = MAP_HEADER + clusters.div_ceil(8);
        let mut header = [0u8; MAP_HEADER as usize];
        header[0..8].copy_from_slice(MAP_MAGIC);
        header[8..12].copy_from_slice(&1u32.to_le_bytes());
        header[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
        header[16..24].copy_from_slice(&size.to_le_bytes());
        let existing = map.metadata().map_err(open_err(&map_path))?.len();
        let mut bytes = vec![0u8; clusters.div_ceil(8) as usize];
        if existing == 0 {
            map.write_all_at(&header, 0).map_err(open_err(&map_path))?;
            map.set_len(map_len).map_err(open_err(&map_path))?;
        } else {
            let bad = |reason| DiskError::BadMap {
                path: map_path.clone(),
                reason,
            };
            let mut got = [0u8; MAP_HEADER as usize];
            map.read_exact_at(&mut got, 0)
                .map_err(|_| bad("short header"))?;
            if got[0..8] != MAP_MAGIC[..] {
                return Err(bad("bad magic"));
            }
            if got[8..24] != header[8..24] {
                return Err(bad("version, cluster size or disk size differ"));
            }
            map.read_exact_at(&mut bytes, MAP_HEADER)
                .map_err(|_| bad("map shorter than the disk"))?;
        }
        let mut bits: Vec<AtomicU64> = (0..clusters.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        for (i, b) in bytes.iter().enumerate() {
            *bits[i / 8].get_mut() |= u64::from(*b) << ((i % 8) * 8);
        }
        Ok(Overlay {
            data,
            map,
            bits,
            alloc: Mutex::new(()),
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

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(off, buf.len() as u64)?;
        let Some(ov) = &self.overlay else {
            self.base.read_exact_at(buf, off)?;
            return Ok(());
        };
        // Runs of clusters with the same allocation state.
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let alloc = ov.allocated(at / CLUSTER);
            let mut end = pos;
            while end < buf.len() && ov.allocated((off + end as u64) / CLUSTER) == alloc {
                let a = off + end as u64;
                end = ((a / CLUSTER + 1) * CLUSTER - off).min(buf.len() as u64) as usize;
            }
            let file = if alloc { &ov.data } else { &self.base };
            file.read_exact_at(&mut buf[pos..end], at)?;
            pos = end;
        }
        Ok(())
    }

    /// Whether writes go straight to the base image (no overlay, writable),
    /// so [`Disk::write_iov`] can be used.
    pub fn writes_in_place(&self) -> bool {
        self.overlay.is_none() && !self.read_only
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
        let Some(ov) = &self.overlay else {
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
        // marked in the map whose data did not reach the overlay (it would
        // read as zeros). The allocation lock is held until the bits are
        // set, so two writers never both copy a new cluster from the image.
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
                    self.base.read_exact_at(&mut scratch[..clen], cstart)?;
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
        let Some(ov) = &self.overlay else {
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
                let r = self.write(at, &zeros, &mut s2);
                *scratch = zeros;
                r?;
            }
            at = stop;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        match &self.overlay {
            None => {
                if !self.read_only {
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

    /// Number of clusters allocated in the overlay (0 without one).
    pub fn allocated_clusters(&self) -> u64 {
        self.overlay.as_ref().map_or(0, |ov| {
            ov.bits
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum()
        })
    }
}

/// The allocation map file of an overlay.
pub fn map_path(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
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
}
