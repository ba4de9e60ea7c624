//! Memory files.
//!
//! - Full (`memory.bin`): the guest's memory byte for byte, exactly
//!   `mem_size` long. All-zero pages are left as holes (sparse file), which
//!   read back as zeros.
//! - Incremental (`memory.diff`): a header, the sorted page numbers, then the
//!   pages themselves starting at a page-aligned offset:
//!
//! ```text
//! offset size  field
//! 0      8     magic "VMRMDIFF"
//! 8      4     version (u32 LE, 1)
//! 12     4     page size (u32 LE, 4096)
//! 16     8     guest memory size in bytes (u64 LE)
//! 24     8     page count n (u64 LE)
//! 32     4     CRC-32 of bytes 0..32 and of the index (u32 LE)
//! 36     4     reserved (0)
//! 40     8*n   page numbers (u64 LE, strictly ascending, < mem_size/4096)
//! ...          zero padding to D = round_up(40 + 8n, 4096)
//! D      4096*n page data, in index order
//! ```
//! The file is exactly `D + 4096 n` bytes long.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::memory::{PageBitmap, PAGE_SIZE};

/// Diff magic.
pub const DIFF_MAGIC: [u8; 8] = *b"VMRMDIFF";
/// Diff version.
pub const DIFF_VERSION: u32 = 1;
/// Diff header length.
pub const DIFF_HEADER_LEN: u64 = 40;

/// Errors reading or writing memory files.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    /// I/O failed.
    #[error("memory file {path}: I/O error")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is malformed.
    #[error("memory file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MemFileError + '_ {
    move |source| MemFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> MemFileError {
    MemFileError::Malformed {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, mid, post) = // SAFETY: any byte pattern is a valid u64.
        unsafe { page.align_to::<u64>() };
    pre.iter().all(|b| *b == 0) && mid.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

/// Writes a full memory file; returns the number of non-zero pages written.
pub fn write_full(path: &Path, mem: &[u8]) -> Result<u64, MemFileError> {
    write_full_file(path, mem).map(|(n, _)| n)
}

/// As [`write_full`], also returning the open (unsynced) file.
pub fn write_full_file(path: &Path, mem: &[u8]) -> Result<(u64, File), MemFileError> {
    let f = File::create(path).map_err(io(path))?;
    f.set_len(mem.len() as u64).map_err(io(path))?;
    let ps = PAGE_SIZE as usize;
    let mut written = 0u64;
    let mut page = 0usize;
    let pages = mem.len() / ps;
    while page < pages {
        if is_zero(&mem[page * ps..(page + 1) * ps]) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages && !is_zero(&mem[page * ps..(page + 1) * ps]) {
            page += 1;
        }
        f.write_all_at(&mem[start * ps..page * ps], (start * ps) as u64)
            .map_err(io(path))?;
        written += (page - start) as u64;
    }
    Ok((written, f))
}

/// Header of a diff file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffHeader {
    /// Guest memory size.
    pub mem_size: u64,
    /// Page numbers, ascending.
    pub pages: Vec<u64>,
    /// Offset of the first page's data.
    pub data_offset: u64,
}

fn data_offset(n: u64) -> u64 {
    (DIFF_HEADER_LEN + 8 * n).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Most iovecs one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes all of `bufs` at `offset` with `pwritev`, `IOV_MAX` iovecs at a
/// time, resuming after short writes.
fn pwritev_all(f: &File, bufs: &[&[u8]], mut offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut at = 0;
    while at < iov.len() {
        let n = (iov.len() - at).min(IOV_MAX);
        // SAFETY: the iovecs point into `bufs`, which outlive the call and
        // are only read; the descriptor is open for writing.
        let r = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov[at..].as_ptr(),
                n as libc::c_int,
                offset as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = r as usize;
        offset += left as u64;
        while left > 0 {
            let v = &mut iov[at];
            if left >= v.iov_len {
                left -= v.iov_len;
                at += 1;
            } else {
                // SAFETY: advancing within the same buffer (left < len).
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// Writes an incremental memory file with the pages marked in `dirty`.
///
/// The pages go straight from `mem` to the file (no intermediate buffer):
/// one iovec per run of consecutive dirty pages, up to `IOV_MAX` runs per
/// `pwritev`. The file is not synced; see [`write_diff_file`].
pub fn write_diff(path: &Path, mem: &[u8], dirty: &PageBitmap) -> Result<u64, MemFileError> {
    write_diff_file(path, mem, dirty).map(|(n, _)| n)
}

/// As [`write_diff`], also returning the open file, so the caller can sync
/// it (for example alongside other files) without opening it again.
pub fn write_diff_file(
    path: &Path,
    mem: &[u8],
    dirty: &PageBitmap,
) -> Result<(u64, File), MemFileError> {
    let ps = PAGE_SIZE as usize;
    let mut index = Vec::with_capacity(8 * dirty.count() as usize);
    // Runs of consecutive pages: (first page, length).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for p in dirty.iter() {
        index.extend_from_slice(&p.to_le_bytes());
        let p = p as usize;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == p => *len += 1,
            _ => runs.push((p, 1)),
        }
    }
    let n = (index.len() / 8) as u64;
    if let Some((start, len)) = runs.last() {
        if (start + len) * ps > mem.len() {
            return Err(malformed(
                path,
                format!("dirty page {} beyond guest memory", start + len - 1),
            ));
        }
    }
    let mut head = Vec::with_capacity(data_offset(n) as usize);
    head.extend_from_slice(&DIFF_MAGIC);
    head.extend_from_slice(&DIFF_VERSION.to_le_bytes());
    head.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    head.extend_from_slice(&(mem.len() as u64).to_le_bytes());
    head.extend_from_slice(&n.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&index);
    head.extend_from_slice(&h.finalize().to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&index);
    head.resize(data_offset(n) as usize, 0);
    let f = File::create(path).map_err(io(path))?;
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(runs.len() + 1);
    bufs.push(&head);
    for (start, len) in &runs {
        bufs.push(&mem[start * ps..(start + len) * ps]);
    }
    pwritev_all(&f, &bufs, 0).map_err(io(path))?;
    Ok((n, f))
}

/// Reads and checks a diff file's header and index.
pub fn read_diff_header(path: &Path, expect_mem_size: u64) -> Result<DiffHeader, MemFileError> {
    let mut f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut h = [0u8; DIFF_HEADER_LEN as usize];
    f.read_exact(&mut h)
        .map_err(|_| malformed(path, format!("truncated header ({len} bytes)")))?;
    if h[..8] != DIFF_MAGIC {
        return Err(malformed(path, "bad magic"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if u32_at(8) != DIFF_VERSION {
        return Err(malformed(
            path,
            format!("unsupported version {}", u32_at(8)),
        ));
    }
    if u64::from(u32_at(12)) != PAGE_SIZE {
        return Err(malformed(
            path,
            format!("page size {} is not 4096", u32_at(12)),
        ));
    }
    let mem_size = u64_at(16);
    if mem_size != expect_mem_size {
        return Err(malformed(
            path,
            format!("memory size {mem_size} does not match the snapshot's {expect_mem_size}"),
        ));
    }
    let n = u64_at(24);
    let total_pages = mem_size / PAGE_SIZE;
    if n > total_pages {
        return Err(malformed(
            path,
            format!("{n} pages in a {total_pages}-page guest"),
        ));
    }
    let d = data_offset(n);
    let expected = d + n * PAGE_SIZE;
    if len != expected {
        return Err(malformed(
            path,
            format!("length {len}, expected {expected}"),
        ));
    }
    let mut index = vec![0u8; (8 * n) as usize];
    f.read_exact(&mut index).map_err(io(path))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..32]);
    crc.update(&index);
    if crc.finalize() != u32_at(32) {
        return Err(malformed(path, "header checksum mismatch"));
    }
    let mut pages = Vec::with_capacity(n as usize);
    for c in index.chunks_exact(8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let p = u64::from_le_bytes(a);
        if p >= total_pages || pages.last().is_some_and(|l| *l >= p) {
            return Err(malformed(
                path,
                format!("page index {p} out of order or out of range"),
            ));
        }
        pages.push(p);
    }
    Ok(DiffHeader {
        mem_size,
        pages,
        data_offset: d,
    })
}

/// Applies a diff onto `mem` (a guest memory image of the same size).
pub fn apply_diff(path: &Path, mem: &mut [u8]) -> Result<u64, MemFileError> {
    let hdr = read_diff_header(path, mem.len() as u64)?;
    let f = File::open(path).map_err(io(path))?;
    let ps = PAGE_SIZE as usize;
    // Read runs of consecutive pages in one call.
    let mut i = 0;
    while i < hdr.pages.len() {
        let mut j = i + 1;
        while j < hdr.pages.len() && hdr.pages[j] == hdr.pages[j - 1] + 1 {
            j += 1;
        }
        let dst = hdr.pages[i] as usize * ps;
        f.read_exact_at(
            &mut mem[dst..dst + (j - i) * ps],
            hdr.data_offset + i as u64 * PAGE_SIZE,
        )
        .map_err(io(path))?;
        i = j;
    }
    Ok(hdr.pages.len() as u64)
}

/// Copies a full memory file into `mem`, skipping holes (which read as
/// zeros), so `mem` must be zeroed already, as a fresh memfd is.
pub fn read_full_into(path: &Path, mem: &mut [u8]) -> Result<(), MemFileError> {
    let mut f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len != mem.len() as u64 {
        return Err(malformed(
            path,
            format!("length {len}, expected {}", mem.len()),
        ));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut off: i64 = 0;
    let end = len as i64;
    while off < end {
        // SAFETY: lseek on a descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole };
        f.seek(SeekFrom::Start(data as u64)).map_err(io(path))?;
        f.read_exact(&mut mem[data as usize..hole as usize])
            .map_err(io(path))?;
        off = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_is_sparse_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut mem = vec![0u8; 64 * 4096];
        mem[5 * 4096 + 7] = 9;
        mem[6 * 4096] = 1;
        mem[63 * 4096 + 4095] = 2;
        let p = dir.path().join("memory.bin");
        assert_eq!(write_full(&p, &mem).expect("writes"), 3);
        assert_eq!(
            std::fs::metadata(&p).expect("exists").len(),
            mem.len() as u64
        );
        let mut back = vec![0u8; mem.len()];
        read_full_into(&p, &mut back).expect("reads");
        assert!(back == mem, "image differs after a round trip");
    }

    #[test]
    fn diff_round_trip_and_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut mem = vec![0u8; 32 * 4096];
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        let mut dirty = PageBitmap::new(32);
        for p in [1, 2, 3, 17, 31] {
            dirty.set(p);
        }
        let p = dir.path().join("memory.diff");
        assert_eq!(write_diff(&p, &mem, &dirty).expect("writes"), 5);
        let h = read_diff_header(&p, mem.len() as u64).expect("valid");
        assert_eq!(h.pages, vec![1, 2, 3, 17, 31]);
        assert_eq!(h.data_offset, 4096);
        let mut target = vec![0u8; mem.len()];
        apply_diff(&p, &mut target).expect("applies");
        for pg in 0..32usize {
            let want = if [1, 2, 3, 17, 31].contains(&pg) {
                pg as u8
            } else {
                0
            };
            assert!(
                target[pg * 4096..(pg + 1) * 4096]
                    .iter()
                    .all(|b| *b == want),
                "page {pg}"
            );
        }
        // Wrong size, corrupt index, truncation.
        assert!(read_diff_header(&p, 4096).is_err());
        let mut bytes = std::fs::read(&p).expect("readable");
        bytes[40] ^= 1;
        std::fs::write(&p, &bytes).expect("writable");
        let e = read_diff_header(&p, mem.len() as u64)
            .expect_err("corrupt")
            .to_string();
        assert!(e.contains("checksum"), "{e}");
        bytes[40] ^= 1;
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&p, &bytes).expect("writable");
        assert!(read_diff_header(&p, mem.len() as u64).is_err());
    }

    #[test]
    fn diff_with_more_runs_than_one_pwritev_takes_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pages = 3 * IOV_MAX + 100;
        let mut mem = vec![0u8; pages * 4096];
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i / 4096 % 251) as u8 ^ (i % 7) as u8;
        }
        // Every other page (one run each), plus a run of 5 at the end.
        let mut dirty = PageBitmap::new(pages as u64);
        for p in (0..pages - 10).step_by(2) {
            dirty.set(p as u64);
        }
        for p in pages - 5..pages {
            dirty.set(p as u64);
        }
        let p = dir.path().join("memory.diff");
        let n = write_diff(&p, &mem, &dirty).expect("writes");
        assert_eq!(n, dirty.count());
        let mut back = vec![0u8; mem.len()];
        assert_eq!(apply_diff(&p, &mut back).expect("applies"), n);
        for pg in 0..pages {
            let r = pg * 4096..(pg + 1) * 4096;
            if dirty.get(pg as u64) {
                assert!(back[r.clone()] == mem[r], "page {pg} differs");
            } else {
                assert!(back[r].iter().all(|b| *b == 0), "page {pg} written");
            }
        }
    }
}
