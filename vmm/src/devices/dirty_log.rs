//! The dirty-page log shared with vhost-user backends.
//!
//! While a snapshot is being taken, vhost-user backends write into guest
//! memory behind KVM's back, so KVM's dirty log misses those pages. With the
//! `LOG_SHMFD` protocol feature and the `LOG_ALL` feature, the frontend hands
//! the backend a shared bitmap (`SET_LOG_BASE`): one bit per 4 KiB page of
//! guest physical memory, counted from address 0, byte `page / 8`, bit
//! `page % 8`. The backend sets bits with atomic ORs; [`DirtyLog::drain`]
//! swaps them out atomically so the VMM can merge them into the KVM log of an
//! incremental snapshot.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Page size the log counts in.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Errors creating the log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// memfd_create, ftruncate or mmap failed.
    #[error("cannot create the dirty-page log ({what})")]
    Os {
        /// Which call failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest memory is too large for a log on this host.
    #[error("guest memory end {0:#x} is too large for a dirty log")]
    TooLarge(u64),
}

/// A shared bitmap of dirtied guest pages.
#[derive(Debug)]
pub struct DirtyLog {
    fd: OwnedFd,
    addr: *mut AtomicU64,
    words: usize,
}

// SAFETY: the mapping is owned by this struct and only accessed through
// atomics, so it can move between and be shared by threads.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: all accesses are atomic.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Creates a zeroed log covering guest physical addresses `0..mem_end`.
    pub fn new(mem_end: u64) -> Result<Self, DirtyLogError> {
        let pages = mem_end.div_ceil(LOG_PAGE_SIZE);
        let words =
            usize::try_from(pages.div_ceil(64)).map_err(|_| DirtyLogError::TooLarge(mem_end))?;
        let bytes = words
            .checked_mul(8)
            .ok_or(DirtyLogError::TooLarge(mem_end))?
            .max(8);
        let os = |what| move |source| DirtyLogError::Os { what, source };
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new descriptor or -1.
        let raw = unsafe { libc::memfd_create(c"vmr-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just created and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(os("ftruncate")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh shared mapping of a file we sized to `bytes`; the
        // kernel picks the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(os("mmap")(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            addr: addr.cast(),
            words: bytes / 8,
        })
    }

    /// Size of the shared bitmap in bytes.
    pub fn size(&self) -> u64 {
        self.words as u64 * 8
    }

    /// Descriptor of the shared file, for `SET_LOG_BASE`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words, "dirty-log word index out of range");
        // SAFETY: `i < words`, so the pointer stays inside the mapping, which
        // is 8-byte aligned (page aligned) and lives as long as `self`.
        unsafe { &*self.addr.add(i) }
    }

    /// Returns the bitmap as 64-bit words (bit `n` of word `w` is page
    /// `w * 64 + n`, the layout KVM's dirty log uses) and clears it.
    pub fn drain(&self) -> Vec<u64> {
        (0..self.words)
            .map(|i| u64::from_le(self.word(i).swap(0, Ordering::AcqRel)))
            .collect()
    }

    /// Guest physical page numbers currently marked dirty (does not clear).
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.words {
            let mut w = u64::from_le(self.word(i).load(Ordering::Acquire));
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        out
    }

    /// Marks the page holding `gpa` dirty, as a backend would.
    pub fn mark(&self, gpa: u64) {
        let page = gpa / LOG_PAGE_SIZE;
        if let Ok(i) = usize::try_from(page / 64) {
            if i < self.words {
                self.word(i)
                    .fetch_or((1u64 << (page % 64)).to_le(), Ordering::AcqRel);
            }
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references
        // into it outlive `self`.
        unsafe { libc::munmap(self.addr.cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_drain_in_kvm_layout() {
        let log = DirtyLog::new(64 << 20).expect("memfd works in tests");
        assert_eq!(log.size(), (64 << 20) / 4096 / 8);
        log.mark(0x1000);
        log.mark(0x41_000);
        assert_eq!(log.dirty_pages(), vec![1, 0x41]);
        let words = log.drain();
        assert_eq!(words[0], 1 << 1);
        assert_eq!(words[1], 1 << 1);
        assert!(log.dirty_pages().is_empty());
    }

    #[test]
    fn byte_layout_matches_vhost_user() {
        // Backends set bit page%8 of byte page/8; our words read that back.
        let log = DirtyLog::new(1 << 20).expect("memfd works in tests");
        // SAFETY: byte 1 of a mapping at least 8 bytes long.
        unsafe {
            (*(log.addr.cast::<std::sync::atomic::AtomicU8>().add(1)))
                .fetch_or(0x4, Ordering::SeqCst)
        };
        assert_eq!(log.dirty_pages(), vec![10]);
    }
}
