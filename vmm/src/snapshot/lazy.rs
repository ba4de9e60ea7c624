//! Lazy restore of shared guest memory.
//!
//! The guest memory is a fresh memfd mapped `MAP_SHARED` (so vhost-user
//! backends can map it), registered with a userfaultfd in MISSING mode
//! before anything touches it. A page is filled from the snapshot's chain
//! (the newest diff that holds it, else the base file; holes stay holes) the
//! first time anyone needs it:
//!
//! - a vCPU (through KVM) or a VMM thread faults in the VMM's mapping: the
//!   handler thread copies the page in with `UFFDIO_COPY`, which wakes it;
//! - a backend faults in its own mapping of the memfd: backends that offer
//!   the vhost-user `PAGEFAULT` protocol feature register their mapping with
//!   a userfaultfd of their own and hand it over (`POSTCOPY_ADVISE`); the
//!   handler fills the page through the VMM's mapping (the memfd's page cache
//!   is shared, so the backend then sees it) and wakes the backend's thread
//!   with `UFFDIO_WAKE` on the backend's descriptor. A backend write into a
//!   page nobody touched yet therefore lands on the snapshot's contents: the
//!   rest of the page is kept.
//!
//! With background prefetch a second thread copies every page that holds
//! data, in runs of up to 2 MiB; a page that already exists (`EEXIST`) is
//! skipped. When it is done, every data page is present and every page still
//! missing is a zero page, which a plain shared-memory fault fills with zeros
//! anyway: the backends get `POSTCOPY_END` (each one's faults are still
//! served until it has processed it), their descriptors are closed, the
//! VMM's range is unregistered and the handler stops.
//!
//! A page the handler cannot fill (the snapshot file became unreadable) is
//! logged and recorded in [`LazyStats::error`]; the thread that faulted on it
//! stays blocked rather than see wrong contents.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memfile;
use super::{MemoryKind, SnapshotError};
use crate::memory::PAGE_SIZE;
use crate::uffd::{Fill, Uffd, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_MISSING_SHMEM};

/// How long a caller waits for lazily restored memory to be fully
/// populated ([`LazyMemory::populate_all`]): a device whose backend cannot
/// take part in lazy restore, before it starts, and a full snapshot, before
/// it reads every page.
pub const POPULATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest run of pages the prefetcher copies in one `UFFDIO_COPY`.
const MAX_RUN_PAGES: u64 = 512;

/// A read-only mapping of one snapshot memory file.
struct FileMap {
    addr: u64,
    len: usize,
    /// Offset of page 0 of this file's page data.
    data_offset: u64,
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn map_file(path: &Path, data_offset: u64) -> Result<FileMap, SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len() as usize;
    // SAFETY: a new read-only shared mapping of a file we opened; the kernel
    // picks the address. The files must not change while a clone runs (the
    // VMM never writes into a chain a VM depends on).
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    Ok(FileMap {
        addr: addr as u64,
        len: len.max(1),
        data_offset,
    })
}

/// Where each guest page's contents come from.
struct Sources {
    files: Vec<FileMap>,
    /// Per page: 0 for a zero page, else `(file + 1) << 40 | page_in_file`.
    page: Vec<u64>,
    data_pages: u64,
}

impl Sources {
    fn build(chain: &[(PathBuf, MemoryKind, u64)], mem_size: u64) -> Result<Self, SnapshotError> {
        let pages = mem_size / PAGE_SIZE;
        let mut page = vec![0u64; pages as usize];
        let mut files = Vec::with_capacity(chain.len());
        let (base, _, _) = &chain[0];
        let f = File::open(base).map_err(io_err(base))?;
        let len = f.metadata().map_err(io_err(base))?.len();
        if len != mem_size {
            return Err(SnapshotError::Inconsistent(format!(
                "{} is {len} bytes, expected {mem_size}",
                base.display()
            )));
        }
        // The base's data extents; holes read as zeros.
        let fd = f.as_raw_fd();
        let mut off: i64 = 0;
        while (off as u64) < len {
            // SAFETY: lseek on a descriptor we own; no memory is touched.
            let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { len as i64 } else { hole };
            let first = data as u64 / PAGE_SIZE;
            let end = (hole as u64).div_ceil(PAGE_SIZE).min(pages);
            for p in first..end {
                page[p as usize] = (1 << 40) | p;
            }
            off = hole;
        }
        files.push(map_file(base, 0)?);
        for (i, (diff, _, _)) in chain[1..].iter().enumerate() {
            let hdr = memfile::read_diff_header(diff, mem_size)?;
            if hdr.pages.is_empty() {
                // Keeps file indexes aligned with the chain.
                files.push(FileMap {
                    addr: 0,
                    len: 0,
                    data_offset: 0,
                });
                continue;
            }
            for (k, p) in hdr.pages.iter().enumerate() {
                page[*p as usize] = ((i as u64 + 2) << 40) | k as u64;
            }
            files.push(map_file(diff, hdr.data_offset)?);
        }
        let data_pages = page.iter().filter(|e| **e != 0).count() as u64;
        Ok(Sources {
            files,
            page,
            data_pages,
        })
    }

    /// Address (in this process) of page `p`'s contents, `None` for zeros.
    fn addr(&self, p: u64) -> Option<u64> {
        let e = *self.page.get(p as usize)?;
        if e == 0 {
            return None;
        }
        let f = &self.files[(e >> 40) as usize - 1];
        Some(f.addr + f.data_offset + (e & ((1 << 40) - 1)) * PAGE_SIZE)
    }
}

// SAFETY: the mappings are read-only and live as long as `Sources`; sharing
// their addresses between threads is sound.
unsafe impl Send for Sources {}
// SAFETY: as above; nothing mutates a `Sources` after it is built.
unsafe impl Sync for Sources {}

/// One region of a backend's mapping of guest memory, as its
/// `SET_MEM_TABLE` reply named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRegion {
    /// Start of the region in the backend's address space.
    pub local_base: u64,
    /// Length.
    pub size: u64,
    /// Guest physical address of the region's start.
    pub guest_phys_addr: u64,
}

/// Sends `POSTCOPY_END` to a backend.
pub type PeerEnd = Box<dyn FnMut() -> Result<(), String> + Send>;

struct Peer {
    id: u64,
    name: String,
    uffd: Arc<Uffd>,
    regions: Vec<PeerRegion>,
    end: Option<PeerEnd>,
}

/// Counters of a lazy restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Pages that hold data in the snapshot (the rest are zero).
    pub data_pages: u64,
    /// Pages the background prefetcher copied.
    pub prefetched: u64,
    /// Faults served for the VMM's own mapping (vCPUs through KVM, VMM threads).
    pub vmm_faults: u64,
    /// Faults served for backends' mappings.
    pub backend_faults: u64,
    /// Every data page is present and fault handling has ended.
    pub complete: bool,
    /// Time from the start of the restore to `complete`.
    pub populated_after: Option<Duration>,
    /// The first page that could not be filled.
    pub error: Option<String>,
}

#[derive(Default)]
struct Done {
    complete: bool,
    populated_after: Option<Duration>,
    prefetch_started: bool,
}

struct Inner {
    uffd: Uffd,
    base: u64,
    size: u64,
    sources: Sources,
    wake: EventFd,
    stop: AtomicBool,
    /// Held across a device's postcopy handshake; `true` once postcopy ended.
    handshake: Mutex<bool>,
    peers: Mutex<Vec<Peer>>,
    peer_gen: AtomicU64,
    next_peer: AtomicU64,
    prefetched: AtomicU64,
    vmm_faults: AtomicU64,
    backend_faults: AtomicU64,
    error: Mutex<Option<String>>,
    done: Mutex<Done>,
    done_cv: Condvar,
    started: Instant,
    zero_page: ZeroPage,
}

/// A page of zeros for `UFFDIO_COPY` when `UFFDIO_ZEROPAGE` is refused.
struct ZeroPage(u64);

impl ZeroPage {
    fn new() -> std::io::Result<Self> {
        // SAFETY: a new private anonymous read-only mapping of one page
        // (zeros); the kernel picks the address.
        let a = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if a == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ZeroPage(a as u64))
    }

    fn addr(&self) -> u64 {
        self.0
    }
}

impl Drop for ZeroPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page this value mapped.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, PAGE_SIZE as usize) };
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors of lazily restored memory.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The userfaultfd could not be set up.
    #[error("cannot set up userfaultfd for lazy restore ({what})")]
    Uffd {
        /// The failing step.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Population did not finish in time.
    #[error("guest memory was not fully populated within {0:?}")]
    Timeout(Duration),
    /// A page could not be filled.
    #[error("lazy restore failed: {0}")]
    Failed(String),
}

/// A handle on lazily restored guest memory, shared by the devices (which
/// register their backends' userfaultfds with it). Cheap to clone.
#[derive(Clone)]
pub struct LazyMemory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("size", &self.inner.size)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Owns the threads; dropping it stops them (the memory keeps working:
/// unresolved faults are woken by closing the descriptors).
pub struct LazyOwner {
    handle: LazyMemory,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.handle.fmt(f)
    }
}

impl LazyOwner {
    /// Registers the mapping `[base, base + size)` (a fresh shared memfd
    /// mapping nothing has touched) and starts the fault handler, plus the
    /// background prefetcher when `prefetch`.
    pub(crate) fn start(
        base: u64,
        size: u64,
        chain: &[(PathBuf, MemoryKind, u64)],
        prefetch: bool,
    ) -> Result<Self, SnapshotError> {
        let started = Instant::now();
        let sources = Sources::build(chain, size)?;
        let uffd_err = |what| move |source| SnapshotError::Lazy(LazyError::Uffd { what, source });
        let uffd = Uffd::new(UFFD_FEATURE_MISSING_SHMEM).map_err(uffd_err("create"))?;
        // A transparent huge page would populate its neighbours without a
        // fault. Best effort: shmem huge pages are off by default.
        // SAFETY: advice on a mapping we own; no memory is touched.
        unsafe {
            libc::madvise(
                base as *mut libc::c_void,
                size as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        uffd.register(base, size).map_err(uffd_err("register"))?;
        let zero = ZeroPage::new().map_err(uffd_err("zero page"))?;
        let inner = Arc::new(Inner {
            uffd,
            base,
            size,
            wake: EventFd::new(EFD_NONBLOCK).map_err(uffd_err("eventfd"))?,
            stop: AtomicBool::new(false),
            handshake: Mutex::new(false),
            peers: Mutex::new(Vec::new()),
            peer_gen: AtomicU64::new(0),
            next_peer: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            vmm_faults: AtomicU64::new(0),
            backend_faults: AtomicU64::new(0),
            error: Mutex::new(None),
            done: Mutex::new(Done::default()),
            done_cv: Condvar::new(),
            started,
            zero_page: zero,
            sources,
        });
        let handle = LazyMemory { inner };
        let owner = LazyOwner {
            handle: handle.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let h = handle.clone();
        let t = std::thread::Builder::new()
            .name("vmr-uffd".into())
            .spawn(move || h.inner.handler())
            .map_err(uffd_err("handler thread"))?;
        lock(&owner.threads).push(t);
        if prefetch {
            owner.start_prefetch();
        }
        info!(
            size,
            data_pages = handle.inner.sources.data_pages,
            prefetch,
            "guest memory restored lazily"
        );
        Ok(owner)
    }

    /// Starts the background prefetcher (once).
    pub fn start_prefetch(&self) {
        self.handle.start_prefetch_into(&self.threads);
    }

    /// The shareable handle.
    pub fn handle(&self) -> &LazyMemory {
        &self.handle
    }
}

impl Drop for LazyOwner {
    fn drop(&mut self) {
        // Backends still attached: end postcopy first, while the handler
        // still serves their faults, so none is left waiting.
        self.handle.inner.end_peers();
        self.handle.inner.stop.store(true, Ordering::Release);
        let _ = self.handle.inner.wake.write(1);
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

/// A device's hold on the postcopy handshake (see
/// [`LazyMemory::handshake`]).
pub struct Handshake<'a> {
    mem: &'a LazyMemory,
    _guard: MutexGuard<'a, bool>,
}

impl Handshake<'_> {
    /// Adds a backend's userfaultfd (from `POSTCOPY_ADVISE`); `end` sends it
    /// `POSTCOPY_END` when population is complete. Returns the peer's id.
    pub fn add_peer(&self, name: &str, uffd: OwnedFd, end: PeerEnd) -> u64 {
        let inner = &self.mem.inner;
        let id = inner.next_peer.fetch_add(1, Ordering::Relaxed);
        lock(&inner.peers).push(Peer {
            id,
            name: name.to_string(),
            uffd: Arc::new(Uffd::from_fd(uffd)),
            regions: Vec::new(),
            end: Some(end),
        });
        id
    }

    /// Sets the regions of a peer's mapping (its `SET_MEM_TABLE` reply).
    pub fn set_regions(&self, peer: u64, regions: Vec<PeerRegion>) {
        let inner = &self.mem.inner;
        if let Some(p) = lock(&inner.peers).iter_mut().find(|p| p.id == peer) {
            p.regions = regions;
        }
        inner.peer_gen.fetch_add(1, Ordering::Release);
        let _ = inner.wake.write(1);
    }
}

impl LazyMemory {
    /// Counters.
    pub fn stats(&self) -> LazyStats {
        let i = &self.inner;
        let d = lock(&i.done);
        LazyStats {
            data_pages: i.sources.data_pages,
            prefetched: i.prefetched.load(Ordering::Relaxed),
            vmm_faults: i.vmm_faults.load(Ordering::Relaxed),
            backend_faults: i.backend_faults.load(Ordering::Relaxed),
            complete: d.complete,
            populated_after: d.populated_after,
            error: lock(&i.error).clone(),
        }
    }

    /// Whether every data page is present and fault handling has ended.
    pub fn is_complete(&self) -> bool {
        lock(&self.inner.done).complete
    }

    /// Starts a postcopy handshake for one backend: `None` once population
    /// has ended (then the backend maps the memory as usual). Population
    /// cannot end while the returned value lives.
    pub fn handshake(&self) -> Option<Handshake<'_>> {
        let g = lock(&self.inner.handshake);
        if *g {
            return None;
        }
        Some(Handshake {
            mem: self,
            _guard: g,
        })
    }

    fn start_prefetch_into(&self, threads: &Mutex<Vec<JoinHandle<()>>>) {
        {
            let mut d = lock(&self.inner.done);
            if d.prefetch_started {
                return;
            }
            d.prefetch_started = true;
        }
        let h = self.clone();
        match std::thread::Builder::new()
            .name("vmr-prefetch".into())
            .spawn(move || h.inner.prefetch())
        {
            Ok(t) => lock(threads).push(t),
            Err(e) => {
                lock(&self.inner.done).prefetch_started = false;
                warn!(error = %e, "cannot start the memory prefetcher");
            }
        }
    }

    /// Fills every data page now (for a backend that cannot take part in
    /// postcopy) and waits until population has ended, at most `timeout`.
    pub fn populate_all(&self, timeout: Duration) -> Result<(), LazyError> {
        let i = &self.inner;
        let run_here = {
            let mut d = lock(&i.done);
            !std::mem::replace(&mut d.prefetch_started, true)
        };
        if run_here {
            // The caller waits for it anyway.
            i.prefetch();
        }
        self.wait_populated(timeout)
    }

    /// Waits until population has ended, at most `timeout`.
    pub fn wait_populated(&self, timeout: Duration) -> Result<(), LazyError> {
        let i = &self.inner;
        let deadline = Instant::now() + timeout;
        let mut d = lock(&i.done);
        while !d.complete {
            if let Some(e) = lock(&i.error).clone() {
                return Err(LazyError::Failed(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LazyError::Timeout(timeout));
            }
            d = i
                .done_cv
                .wait_timeout(d, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
}

impl Inner {
    fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Fills page `p` through the VMM's mapping.
    fn fill(&self, p: u64) -> std::io::Result<Fill> {
        let dst = self.base + p * PAGE_SIZE;
        match self.sources.addr(p) {
            // SAFETY: `src` is a page inside a live read-only file mapping.
            Some(src) => unsafe { self.uffd.copy(dst, src, PAGE_SIZE) },
            None => match self.uffd.zero(dst, PAGE_SIZE) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // SAFETY: the zero page is a live buffer of PAGE_SIZE bytes.
                    unsafe { self.uffd.copy(dst, self.zero_page.addr(), PAGE_SIZE) }
                }
                other => other,
            },
        }
    }

    fn fail(&self, what: String) {
        error!(%what, "lazy restore cannot fill a guest page");
        lock(&self.error).get_or_insert(what);
    }

    fn handler(&self) {
        let mut gen = u64::MAX;
        let mut peers: Vec<(Arc<Uffd>, Vec<PeerRegion>, String)> = Vec::new();
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let g = self.peer_gen.load(Ordering::Acquire);
            if g != gen {
                gen = g;
                peers = lock(&self.peers)
                    .iter()
                    .map(|p| (p.uffd.clone(), p.regions.clone(), p.name.clone()))
                    .collect();
            }
            let mut fds = vec![
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            for (u, _, _) in &peers {
                fds.push(libc::pollfd {
                    fd: u.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: poll on pollfds we own for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if r <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.wake.read();
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.serve_vmm();
            }
            for (k, (u, regions, name)) in peers.iter().enumerate() {
                if fds[k + 2].revents & libc::POLLIN != 0 {
                    self.serve_peer(u, regions, name);
                }
            }
        }
        debug!("lazy memory fault handler stopped");
    }

    fn serve_vmm(&self) {
        loop {
            let msg = match self.uffd.read() {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    self.fail(format!("reading the VMM's userfaultfd: {e}"));
                    return;
                }
            };
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let off = msg.address.wrapping_sub(self.base);
            if off >= self.size {
                continue;
            }
            let p = off / PAGE_SIZE;
            self.vmm_faults.fetch_add(1, Ordering::Relaxed);
            match self.fill(p) {
                Ok(Fill::Done) | Ok(Fill::Gone) => {}
                Ok(Fill::Exists(_)) => {
                    let _ = self.uffd.wake(self.base + p * PAGE_SIZE, PAGE_SIZE);
                }
                Err(e) => self.fail(format!("guest page {p:#x}: {e}")),
            }
        }
    }

    fn serve_peer(&self, u: &Uffd, regions: &[PeerRegion], name: &str) {
        loop {
            let msg = match u.read() {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    warn!(backend = name, error = %e, "reading a backend's userfaultfd");
                    return;
                }
            };
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = msg.address & !(PAGE_SIZE - 1);
            let Some(gpa) = regions.iter().find_map(|r| {
                (addr >= r.local_base && addr - r.local_base < r.size)
                    .then(|| addr - r.local_base + r.guest_phys_addr)
            }) else {
                warn!(
                    backend = name,
                    addr = format_args!("{addr:#x}"),
                    "fault outside the backend's guest memory"
                );
                continue;
            };
            let p = gpa / PAGE_SIZE;
            if p >= self.pages() {
                continue;
            }
            self.backend_faults.fetch_add(1, Ordering::Relaxed);
            match self.fill(p) {
                Ok(_) => {
                    if let Err(e) = u.wake(addr, PAGE_SIZE) {
                        warn!(backend = name, error = %e, "waking a backend's fault");
                    }
                }
                Err(e) => self.fail(format!("guest page {p:#x} for {name}: {e}")),
            }
        }
    }

    fn prefetch(&self) {
        let t0 = Instant::now();
        let pages = self.pages();
        let mut p = 0;
        while p < pages {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let Some(src) = self.sources.addr(p) else {
                p += 1;
                continue;
            };
            let mut n = 1;
            while n < MAX_RUN_PAGES
                && p + n < pages
                && self.sources.addr(p + n) == Some(src + n * PAGE_SIZE)
            {
                n += 1;
            }
            let dst = self.base + p * PAGE_SIZE;
            // SAFETY: `src..src + n pages` lies in one live file mapping.
            match unsafe { self.uffd.copy(dst, src, n * PAGE_SIZE) } {
                Ok(Fill::Done) => {
                    self.prefetched.fetch_add(n, Ordering::Relaxed);
                    p += n;
                }
                Ok(Fill::Exists(b)) => {
                    let k = b / PAGE_SIZE;
                    self.prefetched.fetch_add(k, Ordering::Relaxed);
                    p += k + 1;
                }
                Ok(Fill::Gone) => return,
                Err(e) => {
                    self.fail(format!("prefetching guest page {p:#x}: {e}"));
                    return;
                }
            }
        }
        debug!(elapsed = ?t0.elapsed(), "every data page is present");
        self.finish();
    }

    /// All data pages are present: end postcopy with the backends,
    /// unregister the VMM's range, stop the handler.
    fn finish(&self) {
        self.end_peers();
        if let Err(e) = self.uffd.unregister(self.base, self.size) {
            warn!(error = %e, "unregistering guest memory from userfaultfd");
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        let mut d = lock(&self.done);
        d.complete = true;
        d.populated_after = Some(self.started.elapsed());
        info!(after = ?d.populated_after, "guest memory fully populated");
        self.done_cv.notify_all();
    }

    /// Sends every backend `POSTCOPY_END`. A backend may be blocked on a
    /// fault while the message waits behind its current request, so each
    /// peer stays in the list the handler serves until its `POSTCOPY_END`
    /// has returned (the backend has closed its userfaultfd by then); only
    /// then is the VMM's copy of the descriptor dropped.
    fn end_peers(&self) {
        let mut ended = lock(&self.handshake);
        if *ended {
            return;
        }
        *ended = true;
        let ends: Vec<(u64, String, PeerEnd)> = lock(&self.peers)
            .iter_mut()
            .filter_map(|p| Some((p.id, p.name.clone(), p.end.take()?)))
            .collect();
        for (id, name, mut end) in ends {
            if let Err(e) = end() {
                warn!(backend = %name, error = %e, "POSTCOPY_END failed");
            }
            lock(&self.peers).retain(|p| p.id != id);
            self.peer_gen.fetch_add(1, Ordering::Release);
            let _ = self.wake.write(1);
        }
        drop(ended);
    }
}
