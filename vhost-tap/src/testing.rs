//! Driver-side helpers for tests and benchmarks: guest RAM in a shared
//! memfd, split virtqueues laid out in it, and a vhost-user front-end that
//! sets a backend up over a unix socket.
//!
//! Everything here plays the role of the VMM and the guest driver; the
//! backend under test is the real one.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// Errors of the test helpers.
#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("out of descriptors or guest memory")]
    Full,
}

/// Guest RAM backed by a memfd (shared with the backend through
/// `SET_MEM_TABLE`), starting at guest physical address 0.
pub struct GuestRam {
    file: File,
    mem: GuestMemoryMmap<()>,
    size: usize,
    next_free: u64,
}

impl GuestRam {
    /// Creates `size` bytes of RAM. The first megabyte is reserved for rings;
    /// [`GuestRam::alloc`] hands out the rest.
    pub fn new(size: usize) -> Result<Self, TestingError> {
        let name = c"vhost-tap-test";
        // SAFETY: memfd_create with a valid NUL-terminated name; checked below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size)
            .map_err(|e| TestingError::Memory(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| TestingError::Memory("region overflows".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| TestingError::Memory(e.to_string()))?;
        Ok(Self {
            file,
            mem,
            size,
            next_free: 0x10_0000,
        })
    }

    /// The driver's view of the memory.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Host address of a guest address (what a VMM puts in vring addresses).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .unwrap_or(0)
    }

    /// The region description for `SET_MEM_TABLE`.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.host_addr(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Allocates `len` bytes (4 KiB aligned) above the ring area.
    pub fn alloc(&mut self, len: u64) -> Result<u64, TestingError> {
        let at = self.next_free;
        let end = at
            .checked_add(len.div_ceil(4096) * 4096)
            .ok_or(TestingError::Full)?;
        if end > self.size as u64 {
            return Err(TestingError::Full);
        }
        self.next_free = end;
        Ok(at)
    }

    /// Forgets every allocation.
    pub fn reset_alloc(&mut self) {
        self.next_free = 0x10_0000;
    }

    /// Writes bytes at a guest address.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("test addresses come from alloc and lie inside the RAM");
    }

    /// Reads bytes at a guest address.
    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        self.mem
            .read_slice(out, GuestAddress(gpa))
            .expect("test addresses come from alloc and lie inside the RAM");
    }
}

/// The driver side of one split virtqueue living in [`GuestRam`].
pub struct DriverQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    /// Lays a queue of `size` entries out at `base` (needs `16*size + 6 +
    /// 2*size + 6 + 8*size` bytes plus alignment; 64 KiB fits 1024 entries).
    pub fn new(ram: &GuestRam, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).div_ceil(4096) * 4096;
        ram.write(desc, &vec![0u8; 16 * size as usize]);
        ram.write(avail, &vec![0u8; 6 + 2 * size as usize]);
        ram.write(used, &vec![0u8; 6 + 8 * size as usize]);
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// The addresses for `SET_VRING_ADDR`.
    pub fn config(&self, ram: &GuestRam) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host_addr(self.desc),
            used_ring_addr: ram.host_addr(self.used),
            avail_ring_addr: ram.host_addr(self.avail),
            log_addr: None,
        }
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers into the
    /// descriptor table and returns its head (not yet made available).
    pub fn add_chain(&mut self, ram: &GuestRam, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(ram, idx, addr, len, flags, next);
            self.next_desc = next;
        }
        head
    }

    /// Writes one raw descriptor (for malformed chains).
    pub fn write_desc(&self, ram: &GuestRam, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(self.desc + 16 * u64::from(idx), &d);
    }

    /// Makes a chain available (publishes the avail index).
    pub fn publish(&mut self, ram: &GuestRam, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        ram.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.write(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// Skips descriptor slots (to place the next chain elsewhere).
    pub fn set_next_desc(&mut self, idx: u16) {
        self.next_desc = idx % self.size;
    }

    /// The used index the device published.
    pub fn used_idx(&self, ram: &GuestRam) -> u16 {
        let mut b = [0u8; 2];
        ram.read(self.used + 2, &mut b);
        u16::from_le_bytes(b)
    }

    /// Number of chains made available so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Takes the next used element `(head, len)` if the device published one.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Option<(u16, u32)> {
        if self.used_idx(ram) == self.last_used {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let mut e = [0u8; 8];
        ram.read(at, &mut e);
        self.last_used = self.last_used.wrapping_add(1);
        Some((
            u32::from_le_bytes(e[0..4].try_into().expect("4 bytes")) as u16,
            u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
        ))
    }

    /// Sets `used_event` (the EVENT_IDX field after the avail ring).
    pub fn set_used_event(&self, ram: &GuestRam, idx: u16) {
        ram.write(
            self.avail + 4 + 2 * u64::from(self.size),
            &idx.to_le_bytes(),
        );
    }
}

/// A vhost-user front-end (the VMM side) connected to a backend socket.
pub struct TestFrontend {
    /// The protocol client.
    pub fe: Frontend,
    /// Per-queue kick eventfds.
    pub kicks: Vec<EventFd>,
    /// Per-queue call eventfds.
    pub calls: Vec<EventFd>,
    /// Features acked.
    pub features: u64,
    /// Protocol features acked.
    pub protocol: VhostUserProtocolFeatures,
}

impl TestFrontend {
    /// Connects, retrying for up to 5 s while the backend starts.
    pub fn connect(path: &Path, num_queues: u64) -> Result<Self, TestingError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let fe = loop {
            match Frontend::connect(path, num_queues) {
                Ok(fe) => break fe,
                Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        Ok(Self {
            fe,
            kicks: Vec::new(),
            calls: Vec::new(),
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
        })
    }

    /// Negotiates features (everything offered, minus `mask_out`), shares the
    /// RAM and starts every queue in `queues`.
    pub fn setup(
        &mut self,
        ram: &GuestRam,
        queues: &[&DriverQueue],
        mask_out: u64,
    ) -> Result<(), TestingError> {
        self.fe.set_owner()?;
        let offered = self.fe.get_features()?;
        self.features = offered & !mask_out;
        self.fe.set_features(self.features)?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.protocol = self.fe.get_protocol_features()?;
            self.fe.set_protocol_features(self.protocol)?;
        }
        self.fe.set_mem_table(&[ram.region_info()])?;
        for (i, q) in queues.iter().enumerate() {
            self.start_queue(ram, i, q)?;
        }
        Ok(())
    }

    /// Starts queue `i` (size, addresses, base from the queue's avail index,
    /// call and kick fds, enable).
    pub fn start_queue(
        &mut self,
        ram: &GuestRam,
        i: usize,
        q: &DriverQueue,
    ) -> Result<(), TestingError> {
        self.restart_queue(ram, i, q, 0)
    }

    /// Starts queue `i` with the device's next available index at `base`
    /// (after a `GET_VRING_BASE` returned it).
    pub fn restart_queue(
        &mut self,
        ram: &GuestRam,
        i: usize,
        q: &DriverQueue,
        base: u16,
    ) -> Result<(), TestingError> {
        self.fe.set_vring_num(i, q.size)?;
        self.fe.set_vring_addr(i, &q.config(ram))?;
        self.fe.set_vring_base(i, base)?;
        while self.calls.len() <= i {
            self.calls.push(EventFd::new(libc::EFD_NONBLOCK)?);
            self.kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        self.fe.set_vring_call(i, &self.calls[i])?;
        self.fe.set_vring_kick(i, &self.kicks[i])?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.fe.set_vring_enable(i, true)?;
        }
        Ok(())
    }

    /// Kicks queue `i`.
    pub fn kick(&self, i: usize) -> Result<(), TestingError> {
        self.kicks[i].write(1)?;
        Ok(())
    }

    /// Waits until `cond` holds, polling every millisecond, for up to `secs`.
    pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        cond()
    }
}

/// Builds virtio-blk requests in guest RAM.
pub struct BlkRequestBuilder;

impl BlkRequestBuilder {
    /// Writes a request header at a fresh allocation; returns
    /// `(header_addr, status_addr)`.
    pub fn header(ram: &mut GuestRam, rtype: u32, sector: u64) -> Result<(u64, u64), TestingError> {
        let at = ram.alloc(4096)?;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write(at, &h);
        ram.write(at + 64, &[0xff]);
        Ok((at, at + 64))
    }

    /// Reads the status byte.
    pub fn status(ram: &GuestRam, status_addr: u64) -> u8 {
        let mut b = [0u8; 1];
        ram.read(status_addr, &mut b);
        b[0]
    }
}
