//! Guest memory: one region at guest physical address 0 backed by a shared
//! memfd (so vhost-user backends can map it with `SET_MEM_TABLE`), or, after
//! a restore, by a private copy-on-write mapping of the snapshot's memory
//! file.
//!
//! Also the page bitmap that the dirty-page log, device backends and
//! incremental snapshots use: one bit per 4 KiB page, bit `page % 64` of
//! 64-bit word `page / 64` (the layout of `KVM_GET_DIRTY_LOG` and of the
//! vhost-user log).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::boot::layout::MMIO_HOLE_START;

/// Guest memory as `vm-memory` sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest page size the VMM counts in.
pub const PAGE_SIZE: u64 = 4096;

/// Errors creating or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero, not page aligned, or reaches into the MMIO hole.
    #[error(
        "guest memory size {0:#x} must be a non-zero multiple of 4 KiB below {MMIO_HOLE_START:#x}"
    )]
    BadSize(u64),
    /// A system call failed.
    #[error("cannot set up guest memory ({what})")]
    Os {
        /// The failing call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region list.
    #[error("cannot build the guest memory map")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// How the guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A memfd mapped `MAP_SHARED`: vhost-user backends can map it.
    SharedMemfd,
    /// A snapshot memory file mapped `MAP_PRIVATE`: pages load lazily on
    /// first touch and writes stay private to this VM. Backends cannot share
    /// it.
    PrivateFile,
}

/// One guest memory region as a vhost-user backend must map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// First guest physical address.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Address of the mapping in this process.
    pub host_addr: u64,
    /// Descriptor of the backing memfd (valid while the [`VmMemory`] lives).
    pub fd: RawFd,
    /// Offset of the region in the memfd.
    pub fd_offset: u64,
}

/// The guest memory of one VM.
///
/// Cheap to share: clone the `Arc` it usually lives in. The
/// [`GuestMemoryMmap`] handle can be cloned too (its regions are
/// reference-counted).
pub struct VmMemory {
    // Dropped first: its threads stop before the mapping goes away.
    lazy: Option<crate::snapshot::lazy::LazyOwner>,
    /// Start the lazy populator's prefetch when the VM first resumes.
    prefetch_at_run: bool,
    mem: GuestMemoryMmap,
    file: Arc<File>,
    size: u64,
    backing: Backing,
}

impl std::fmt::Debug for VmMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMemory")
            .field("size", &self.size)
            .field("backing", &self.backing)
            .field("fd", &self.file.as_raw_fd())
            .field("lazy", &self.lazy)
            .finish()
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |source| MemoryError::Os { what, source }
}

/// Checks a guest memory size.
pub fn check_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 || size & (PAGE_SIZE - 1) != 0 || size > MMIO_HOLE_START {
        return Err(MemoryError::BadSize(size));
    }
    Ok(())
}

impl VmMemory {
    /// Creates `size` bytes of zeroed guest memory on a new memfd mapped
    /// `MAP_SHARED`.
    pub fn new_shared(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags and
        // returns a new descriptor or -1; nothing else is touched.
        let raw = unsafe { libc::memfd_create(c"vmr-guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just created and own exclusively.
        let file = unsafe { File::from_raw_fd(raw) };
        file.set_len(size).map_err(os("ftruncate"))?;
        Self::map(
            file,
            size,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            Backing::SharedMemfd,
        )
    }

    /// Maps a snapshot memory file privately (copy-on-write): pages are read
    /// lazily on first access and guest writes never reach the file.
    pub fn from_file_private(file: File, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        Self::map(
            file,
            size,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            Backing::PrivateFile,
        )
    }

    fn map(file: File, size: u64, flags: i32, backing: Backing) -> Result<Self, MemoryError> {
        let file = Arc::new(file);
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let region = MmapRegion::<()>::build(
            Some(FileOffset::from_arc(Arc::clone(&file), 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(MemoryError::Mmap)?;
        let region =
            GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::BadSize(size))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Regions)?;
        Ok(VmMemory {
            lazy: None,
            prefetch_at_run: false,
            mem,
            file,
            size,
            backing,
        })
    }

    /// Hands the memory to a lazy populator (restore only); with
    /// `prefetch_at_run`, [`crate::vm::Vm::resume`] starts its background
    /// prefetch, so the copy does not compete with the restore itself (the
    /// device handshakes) for the CPU.
    pub(crate) fn set_lazy(
        &mut self,
        owner: crate::snapshot::lazy::LazyOwner,
        prefetch_at_run: bool,
    ) {
        self.lazy = Some(owner);
        self.prefetch_at_run = prefetch_at_run;
    }

    /// Whether the prefetch starts when the VM resumes (see `set_lazy`).
    pub(crate) fn prefetch_at_run(&self) -> bool {
        self.prefetch_at_run
    }

    /// The lazy populator, when this memory was restored lazily
    /// ([`crate::snapshot::RestoreMemory::SharedLazy`] or
    /// [`crate::snapshot::RestoreMemory::SharedOnDemand`]).
    pub fn lazy(&self) -> Option<&crate::snapshot::lazy::LazyMemory> {
        self.lazy.as_ref().map(|o| o.handle())
    }

    /// Starts the background prefetch of a lazily restored memory (a no-op
    /// when it runs already or the memory is not lazy).
    pub fn start_prefetch(&self) {
        if let Some(o) = &self.lazy {
            o.start_prefetch();
        }
    }

    /// The `vm-memory` handle (for loaders, virtqueues, ACPI tables).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// How the memory is backed.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd a vhost-user backend maps, or `None` when the memory is a
    /// private mapping that cannot be shared.
    pub fn shared_fd(&self) -> Option<RawFd> {
        (self.backing == Backing::SharedMemfd).then(|| self.file.as_raw_fd())
    }

    /// The regions for `VHOST_USER_SET_MEM_TABLE`, or `None` when the memory
    /// is not shareable (see [`Backing::PrivateFile`]).
    pub fn shared_regions(&self) -> Option<Vec<RegionInfo>> {
        let fd = self.shared_fd()?;
        Some(
            self.mem
                .iter()
                .map(|r| RegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    size: r.len(),
                    host_addr: r.as_ptr() as u64,
                    fd,
                    fd_offset: r.file_offset().map(|f| f.start()).unwrap_or(0),
                })
                .collect(),
        )
    }

    /// Host address of guest physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.mem
            .iter()
            .next()
            .map(|r| r.as_ptr())
            .unwrap_or(std::ptr::null_mut())
    }

    /// The whole of guest memory as bytes.
    ///
    /// # Safety
    ///
    /// The guest and device backends write this memory concurrently; the
    /// caller must make sure they do not (VM paused, backends quiesced) while
    /// the slice is alive, or accept torn reads.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping covers `size` bytes from `host_base` and lives as
        // long as `self`; the caller guarantees no concurrent writers.
        unsafe { std::slice::from_raw_parts(self.host_base(), self.size as usize) }
    }

    /// The whole of guest memory as mutable bytes.
    ///
    /// # Safety
    ///
    /// As [`VmMemory::as_slice`], and no other reference to guest memory may
    /// be used while the returned slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.host_base(), self.size as usize) }
    }
}

/// A bitmap of guest pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// An empty bitmap covering `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks one page.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Whether a page is marked.
    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Marks every page.
    pub fn set_all(&mut self) {
        for p in 0..self.pages {
            self.set(p);
        }
    }

    /// ORs in a bitmap in KVM / vhost-user layout (bits beyond the covered
    /// pages are ignored).
    pub fn merge_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= *o;
        }
        self.clear_tail();
    }

    /// ORs in another bitmap.
    pub fn merge(&mut self, other: &PageBitmap) {
        self.merge_words(&other.words);
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Unmarks everything.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Marked page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn shared_memory_is_a_memfd_and_readable() {
        let m = VmMemory::new_shared(16 * PAGE_SIZE).expect("memfd memory");
        assert_eq!(m.backing(), Backing::SharedMemfd);
        let regions = m.shared_regions().expect("shared");
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].size, 16 * PAGE_SIZE);
        m.guest_memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("in range");
        // SAFETY: nothing else touches this memory in the test.
        let s = unsafe { m.as_slice() };
        assert_eq!(&s[0x1000..0x1004], &0xdead_beef_u32.to_le_bytes());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            VmMemory::new_shared(0),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            VmMemory::new_shared(100),
            Err(MemoryError::BadSize(100))
        ));
        assert!(VmMemory::new_shared(4 << 30).is_err());
    }

    #[test]
    fn bitmap_set_merge_iter() {
        let mut b = PageBitmap::new(130);
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(500);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut c = PageBitmap::new(130);
        c.merge_words(&[0b110, 0, u64::MAX]);
        assert_eq!(c.count(), 2 + 2);
        c.merge(&b);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![0, 1, 2, 64, 128, 129]);
        assert!(c.get(128) && !c.get(127));
    }
}
