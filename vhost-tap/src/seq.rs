//! Per-instance sequence numbers.
//!
//! Every event of an instance carries a `seq` that grows by one across all its
//! topics, so the block and net backends of one instance (separate processes)
//! must draw from one counter. [`AtomicSeq`] is the in-process counter;
//! [`FileSeq`] is an 8-byte file mapped shared by every process of the
//! instance (the capture agent creates it and passes `--seq-file` to each
//! backend), incremented with an atomic `fetch_add` on the mapping.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors opening a shared counter.
#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    #[error("cannot open sequence file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map sequence file")]
    Map(#[source] std::io::Error),
}

/// A source of per-instance sequence numbers.
pub trait SeqSource: Send + Sync {
    /// Reserves `n` consecutive numbers and returns the first.
    fn next_n(&self, n: u64) -> u64;
    /// Reserves one number.
    fn next(&self) -> u64 {
        self.next_n(1)
    }
}

/// In-process counter; the first number handed out is `start`.
#[derive(Debug)]
pub struct AtomicSeq(AtomicU64);

impl AtomicSeq {
    /// A counter whose first number is `start`.
    pub fn new(start: u64) -> Self {
        Self(AtomicU64::new(start))
    }
}

impl Default for AtomicSeq {
    fn default() -> Self {
        Self::new(1)
    }
}

impl SeqSource for AtomicSeq {
    fn next_n(&self, n: u64) -> u64 {
        self.0.fetch_add(n, Ordering::Relaxed)
    }
}

/// A counter in an 8-byte file mapped `MAP_SHARED`, so several processes
/// share it. The file holds the next number to hand out (native endian); a
/// new or empty file starts at 1.
#[derive(Debug)]
pub struct FileSeq {
    ptr: *mut AtomicU64,
}

// SAFETY: the mapping is only accessed through an `AtomicU64`, which is safe to
// share between threads; the pointer stays valid until drop.
unsafe impl Send for FileSeq {}
// SAFETY: as above: all access is atomic.
unsafe impl Sync for FileSeq {}

impl FileSeq {
    /// Opens (creating if needed) the counter file at `path`.
    pub fn open(path: &Path) -> Result<Self, SeqError> {
        let open_err = |source| SeqError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len < 8 {
            // A fresh counter: start at 1 (0 is never a valid seq).
            use std::os::unix::fs::FileExt;
            file.write_all_at(&1u64.to_ne_bytes(), 0)
                .map_err(open_err)?;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: mapping 8 bytes of a file we hold open, shared, read/write;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SeqError::Map(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast::<AtomicU64>(),
        })
    }

    /// The next number that will be handed out.
    pub fn peek(&self) -> u64 {
        // SAFETY: `ptr` is a live, page-aligned 8-byte shared mapping.
        unsafe { &*self.ptr }.load(Ordering::SeqCst)
    }
}

impl SeqSource for FileSeq {
    fn next_n(&self, n: u64) -> u64 {
        // SAFETY: `ptr` is a live, page-aligned 8-byte shared mapping; other
        // processes only touch it atomically too.
        unsafe { &*self.ptr }.fetch_add(n, Ordering::SeqCst)
    }
}

impl Drop for FileSeq {
    fn drop(&mut self) {
        // SAFETY: unmapping the 8-byte mapping created in `open`; nothing
        // refers to it after drop.
        unsafe { libc::munmap(self.ptr.cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_counts_from_one() {
        let s = AtomicSeq::default();
        assert_eq!(s.next(), 1);
        assert_eq!(s.next_n(3), 2);
        assert_eq!(s.next(), 5);
    }

    #[test]
    fn file_counter_is_shared_between_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.seq");
        let a = FileSeq::open(&path).unwrap();
        let b = FileSeq::open(&path).unwrap();
        assert_eq!(a.next(), 1);
        assert_eq!(b.next(), 2);
        assert_eq!(a.next_n(10), 3);
        assert_eq!(b.peek(), 13);
        drop(a);
        drop(b);
        let c = FileSeq::open(&path).unwrap();
        assert_eq!(c.next(), 13);
    }
}
