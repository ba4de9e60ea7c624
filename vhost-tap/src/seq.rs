//! Per-instance sequence numbers.
//!
//! Every event of an instance carries a `seq` that grows by one across all its
//! topics, so the block and net backends of one instance (separate processes)
//! draw from one counter. [`AtomicSeq`] is the in-process counter;
//! [`FileSeq`] is a small file mapped shared by every process of the instance
//! (the capture agent passes the same `--seq-file` to each backend).
//!
//! # Leases
//!
//! Numbers are handed out with an atomic `fetch_add` on the shared mapping,
//! so concurrent processes never hand out the same number and the numbers of
//! all devices stay in one order. A number is only used once it lies below
//! the *lease end*, a high-water mark that is written to the file and made
//! durable (`fsync`) before any number under it is handed out. A process that
//! reaches the end extends the lease by [`DEFAULT_LEASE`] numbers under an
//! exclusive `flock` of the file (and a mutex for its own threads).
//!
//! The mapping survives a killed process (the page cache holds it), so a
//! restarted backend simply continues. After a host restart the counter in
//! the file may be older than the numbers that were handed out, so the
//! first process that opens it in a new boot (the file records the kernel's
//! boot id) moves the counter to the lease end, past every number that may
//! have been used, and reports the skipped range ([`FileSeq::skipped`]).
//!
//! Each open takes a new **epoch** from the file (a counter incremented and
//! made durable under the lock): the incarnation number written into every
//! event of that process.
//!
//! # File layout (little endian, 80 bytes)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `VMRSEQ02` |
//! | 8 | 8 | next number to hand out |
//! | 16 | 8 | lease end, durable: no number at or above it was handed out |
//! | 24 | 8 | lease end usable by `fetch_add` callers (set after the `fsync`) |
//! | 32 | 8 | last epoch handed out |
//! | 40 | 40 | boot id of the host when the file was last opened (ASCII) |
//!
//! The file is created atomically: a complete initial file is written and
//! made durable under a temporary name, then linked to its name with
//! `link(2)`, which fails if another process created it first.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Numbers a lease extension adds.
pub const DEFAULT_LEASE: u64 = 1 << 16;
const MAGIC: &[u8; 8] = b"VMRSEQ02";
const FILE_LEN: usize = 80;
const NEXT: usize = 1;
const LEASE_END: usize = 2;
const LEASE_READY: usize = 3;
const EPOCH: usize = 4;
const BOOT_ID_AT: usize = 40;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Errors opening a shared counter.
#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    #[error("cannot open sequence file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sequence file {0} is not a vmreplay sequence file (version 2)")]
    Format(String),
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
    /// The incarnation stamped on this process's events (0: unknown).
    fn epoch(&self) -> u64 {
        0
    }
    /// The next number that will be handed out.
    fn peek(&self) -> u64;
    /// Numbers `(first, count)` the counter skipped when it was opened
    /// (after a host restart), which need a GAP event.
    fn skipped(&self) -> Option<(u64, u64)> {
        None
    }
}

/// In-process counter; the first number handed out is `start`.
#[derive(Debug)]
pub struct AtomicSeq {
    next: AtomicU64,
    epoch: u64,
}

impl AtomicSeq {
    /// A counter whose first number is `start` (epoch 0).
    pub fn new(start: u64) -> Self {
        Self::with_epoch(start, 0)
    }

    /// A counter whose first number is `start`, stamping `epoch`.
    pub fn with_epoch(start: u64, epoch: u64) -> Self {
        Self {
            next: AtomicU64::new(start),
            epoch,
        }
    }
}

impl Default for AtomicSeq {
    fn default() -> Self {
        Self::new(1)
    }
}

impl SeqSource for AtomicSeq {
    fn next_n(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn peek(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

/// The shared, leased counter file (see the module documentation).
#[derive(Debug)]
pub struct FileSeq {
    ptr: *mut AtomicU64,
    file: File,
    path: PathBuf,
    lease: u64,
    epoch: u64,
    skipped: Option<(u64, u64)>,
    extend: Mutex<()>,
}

// SAFETY: the mapping is only accessed through `AtomicU64`s, which are safe to
// share between threads; the pointer stays valid until drop.
unsafe impl Send for FileSeq {}
// SAFETY: as above: all access is atomic.
unsafe impl Sync for FileSeq {}

/// The kernel's boot id (empty if unreadable).
fn boot_id() -> [u8; 40] {
    let mut out = [0u8; 40];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let b = s.trim().as_bytes();
        let n = b.len().min(out.len());
        out[..n].copy_from_slice(&b[..n]);
    }
    out
}

/// Holds an exclusive `flock` until dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn lock(f: &'a File) -> std::io::Result<Self> {
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Whether `path` lies on a tmpfs.
pub fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let Ok(c) = std::ffi::CString::new(dir.unwrap_or(Path::new(".")).as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct we own.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == TMPFS_MAGIC
    }
}

/// Creates `path` holding a fresh counter, atomically: `Ok(false)` if it
/// already existed.
fn create_atomically(path: &Path) -> std::io::Result<bool> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut init = [0u8; FILE_LEN];
    init[..8].copy_from_slice(MAGIC);
    init[8..16].copy_from_slice(&1u64.to_le_bytes());
    init[16..24].copy_from_slice(&1u64.to_le_bytes());
    init[24..32].copy_from_slice(&1u64.to_le_bytes());
    init[BOOT_ID_AT..].copy_from_slice(&boot_id());
    let tmp = tempfile_in(dir)?;
    tmp.0.write_all_at(&init, 0)?;
    tmp.0.sync_all()?;
    let r = std::fs::hard_link(&tmp.1, path);
    let _ = std::fs::remove_file(&tmp.1);
    match r {
        Ok(()) => {
            File::open(dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new file with a unique name in `dir` (`O_EXCL`).
fn tempfile_in(dir: &Path) -> std::io::Result<(File, PathBuf)> {
    for i in 0..1000u32 {
        let p = dir.join(format!(".seq.{}.{i}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

impl FileSeq {
    /// Opens (creating if needed) the counter file at `path`, with leases
    /// of [`DEFAULT_LEASE`] numbers.
    pub fn open(path: &Path) -> Result<Self, SeqError> {
        Self::open_with_lease(path, DEFAULT_LEASE)
    }

    /// Opens the counter file with leases of `lease` numbers (at least 1).
    pub fn open_with_lease(path: &Path, lease: u64) -> Result<Self, SeqError> {
        let open_err = |source| SeqError::Open {
            path: path.display().to_string(),
            source,
        };
        if on_tmpfs(path) {
            tracing::warn!(path = %path.display(), "the sequence file is on a tmpfs: a host restart loses it and numbers would be reused");
        }
        create_atomically(path).map_err(open_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let mut head = [0u8; FILE_LEN];
        let lock = Flock::lock(&file).map_err(open_err)?;
        let n = file.read_at(&mut head, 0).map_err(open_err)?;
        if n < FILE_LEN || &head[..8] != MAGIC {
            return Err(SeqError::Format(path.display().to_string()));
        }
        // SAFETY: mapping the first bytes of a file we hold open, shared,
        // read/write; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SeqError::Map(std::io::Error::last_os_error()));
        }
        let mut s = Self {
            ptr: ptr.cast::<AtomicU64>(),
            file: file.try_clone().map_err(open_err)?,
            path: path.to_owned(),
            lease: lease.max(1),
            epoch: 0,
            skipped: None,
            extend: Mutex::new(()),
        };
        s.epoch = s.word(EPOCH).fetch_add(1, Ordering::SeqCst) + 1;
        let now = boot_id();
        if head[BOOT_ID_AT..] != now {
            // A new boot: the counter may be older than what was handed out.
            let end = s.word(LEASE_END).load(Ordering::SeqCst);
            let mut cur = s.word(NEXT).load(Ordering::SeqCst);
            while cur < end {
                match s
                    .word(NEXT)
                    .compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => {
                        s.skipped = Some((cur, end - cur));
                        break;
                    }
                    Err(v) => cur = v,
                }
            }
            s.word(LEASE_READY).store(end, Ordering::SeqCst);
            file.write_all_at(&now, BOOT_ID_AT as u64)
                .map_err(open_err)?;
        }
        file.sync_all().map_err(open_err)?;
        drop(lock);
        Ok(s)
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `ptr` is a live, page-aligned shared mapping of FILE_LEN
        // bytes; word `i` (< 10) lies inside it and is 8-byte aligned. Other
        // processes only touch it atomically too.
        unsafe { &*self.ptr.add(i) }
    }

    /// The durable lease end: no number at or above it was handed out.
    pub fn lease_end(&self) -> u64 {
        self.word(LEASE_END).load(Ordering::SeqCst)
    }

    /// Extends the lease past `want` (exclusive), durably.
    fn extend(&self, want: u64) {
        let _g = self.extend.lock().unwrap_or_else(|p| p.into_inner());
        if self.word(LEASE_READY).load(Ordering::SeqCst) >= want {
            return;
        }
        let lock = match Flock::lock(&self.file) {
            Ok(l) => Some(l),
            Err(error) => {
                tracing::error!(%error, path = %self.path.display(), "cannot lock the sequence file");
                None
            }
        };
        let ready = self.word(LEASE_READY).load(Ordering::SeqCst);
        if ready < want {
            let end = self.word(LEASE_END).load(Ordering::SeqCst).max(want) + self.lease;
            self.word(LEASE_END).store(end, Ordering::SeqCst);
            if let Err(error) = self.file.sync_data() {
                tracing::error!(%error, path = %self.path.display(), "cannot make the sequence lease durable");
            }
            self.word(LEASE_READY).store(end, Ordering::SeqCst);
        }
        drop(lock);
    }
}

impl SeqSource for FileSeq {
    fn next_n(&self, n: u64) -> u64 {
        let first = self.word(NEXT).fetch_add(n, Ordering::SeqCst);
        if first + n > self.word(LEASE_READY).load(Ordering::SeqCst) {
            self.extend(first + n);
        }
        first
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn peek(&self) -> u64 {
        self.word(NEXT).load(Ordering::SeqCst)
    }

    fn skipped(&self) -> Option<(u64, u64)> {
        self.skipped
    }
}

impl Drop for FileSeq {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `open`; nothing refers to
        // it after drop.
        unsafe { libc::munmap(self.ptr.cast(), FILE_LEN) };
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
        assert_ne!(a.epoch(), b.epoch(), "every open is a new epoch");
        assert_eq!(a.next(), 1);
        assert_eq!(b.next(), 2);
        assert_eq!(a.next_n(10), 3);
        assert_eq!(b.peek(), 13);
        drop(a);
        drop(b);
        let c = FileSeq::open(&path).unwrap();
        assert_eq!(c.next(), 13);
        assert_eq!(c.epoch(), 3);
    }

    #[test]
    fn the_lease_is_durable_before_numbers_under_it_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.seq");
        let s = FileSeq::open_with_lease(&path, 100).unwrap();
        for _ in 0..250 {
            let n = s.next();
            // What a crash would find on disk covers every number used.
            let mut disk = [0u8; FILE_LEN];
            File::open(&path).unwrap().read_at(&mut disk, 0).unwrap();
            let end = u64::from_le_bytes(disk[16..24].try_into().unwrap());
            assert!(n < end, "{n} handed out beyond the lease end {end}");
        }
        assert!(s.lease_end() <= 251 + 100);
    }

    #[test]
    fn a_new_boot_continues_past_the_lease_and_reports_the_skip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.seq");
        let s = FileSeq::open_with_lease(&path, 50).unwrap();
        for _ in 0..10 {
            s.next();
        }
        let end = s.lease_end();
        drop(s);
        // What a host restart leaves: another boot id, and a counter older
        // than what was handed out (its page never reached the disk).
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[b'x'; 40], BOOT_ID_AT as u64).unwrap();
        f.write_all_at(&4u64.to_le_bytes(), 8).unwrap();
        let s = FileSeq::open_with_lease(&path, 50).unwrap();
        assert_eq!(s.skipped(), Some((4, end - 4)));
        assert_eq!(s.next(), end);
        // The same boot again: nothing skipped.
        drop(s);
        let s = FileSeq::open_with_lease(&path, 50).unwrap();
        assert_eq!(s.skipped(), None);
        assert_eq!(s.next(), end + 1);
    }

    #[test]
    fn concurrent_processes_never_share_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.seq");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    // Each thread opens its own mapping, like a process.
                    let s = FileSeq::open_with_lease(&p, 7).unwrap();
                    (0..2000).map(|_| s.next()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=8000).collect::<Vec<_>>());
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.seq");
        std::fs::write(&path, 5u64.to_ne_bytes()).unwrap();
        assert!(matches!(FileSeq::open(&path), Err(SeqError::Format(_))));
    }
}
