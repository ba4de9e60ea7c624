//! A minimal vhost-user-blk frontend: shared memfd "guest" memory, one split
//! virtqueue driven by hand, and the vhost-user handshake through the `vhost`
//! crate's [`Frontend`].
//!
//! Memory layout (guest physical addresses, queue size [`QUEUE_SIZE`]):
//!
//! | GPA          | content                                  |
//! | ------------ | ---------------------------------------- |
//! | `0x0000`     | descriptor table (16 B per descriptor)   |
//! | `0x1000`     | available ring                           |
//! | `0x2000`     | used ring                                |
//! | `0x4000`     | request headers (16 B per slot)          |
//! | `0x5000`     | status bytes (1 B per slot)              |
//! | `0x10_0000`  | data buffers ([`MAX_IO`] per slot)       |
//!
//! Request slot `k` always uses descriptors `3k` (header), `3k + 1` (data) and
//! `3k + 2` (status), so the hot path allocates nothing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest request payload.
pub const MAX_IO: usize = 1 << 20;
/// Most requests in flight.
pub const MAX_SLOTS: usize = 32;

const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x10_0000;
/// Size of the shared memory.
pub const MEM_SIZE: usize = DATA as usize + MAX_SLOTS * MAX_IO;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;

/// Errors setting up or driving the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("could not create the shared memory")]
    Memory(#[source] std::io::Error),
    #[error("could not create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("vhost-user {step} failed")]
    VhostUser {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("request too large or slot out of range")]
    BadRequest,
    #[error("waiting for the backend failed")]
    Wait(#[source] std::io::Error),
    #[error("the backend reported status {status} for a request")]
    Status { status: u8 },
}

fn vu(step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { step, source }
}

/// Shared "guest" memory backed by a memfd.
struct SharedMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    size: usize,
}

impl SharedMemory {
    fn new(size: usize) -> Result<Self, FrontendError> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // returned fd is checked before use.
        let raw = unsafe { libc::memfd_create(c"vmr-bench-mem".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(FrontendError::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a valid fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(FrontendError::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: mapping `size` bytes of a file of exactly that size, shared;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FrontendError::Memory(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            ptr: ptr.cast(),
            size,
        })
    }

    /// Host pointer of `gpa`; `gpa + len` must lie inside the memory.
    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            (gpa as usize)
                .checked_add(len)
                .is_some_and(|e| e <= self.size),
            "access outside the shared memory is a bug in this driver"
        );
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe { self.ptr.add(gpa as usize) }
    }

    fn write<T: Copy>(&self, gpa: u64, v: T) {
        let p = self.at(gpa, std::mem::size_of::<T>()).cast::<T>();
        // SAFETY: `p` is inside the mapping (checked by `at`); all our fields
        // are naturally aligned at the GPAs this driver uses.
        unsafe { std::ptr::write_volatile(p, v) }
    }

    fn read<T: Copy>(&self, gpa: u64) -> T {
        let p = self.at(gpa, std::mem::size_of::<T>()).cast::<T>();
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_volatile(p) }
    }

    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        let p = self.at(gpa, 2);
        assert!(gpa & 1 == 0, "ring indexes are 2-byte aligned");
        // SAFETY: `p` is inside the mapping, aligned, and lives as long as
        // `self`; the backend accesses it concurrently only atomically.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// Kind of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// A FLUSH: header and status only (`sector` and `len` are ignored).
    Flush,
}

/// A completed request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub slot: usize,
}

/// A connected vhost-user-blk device with one queue.
pub struct BlkDevice {
    frontend: Frontend,
    mem: SharedMemory,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    last_used: u16,
    pending_publish: bool,
}

impl BlkDevice {
    /// Connects to the backend at `socket` and sets up queue 0.
    pub fn connect(socket: &Path) -> Result<Self, FrontendError> {
        let mem = SharedMemory::new(MEM_SIZE)?;
        let mut frontend = Frontend::connect(socket, 1).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let wanted = offered & (VIRTIO_F_VERSION_1 | protocol);
        frontend.set_features(wanted).map_err(vu("SET_FEATURES"))?;
        if wanted & protocol != 0 {
            let pf = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        };
        frontend
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;

        let kick = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?;
        let call = EventFd::new(0).map_err(FrontendError::EventFd)?;
        let dev = Self {
            frontend,
            mem,
            kick,
            call,
            next_avail: 0,
            last_used: 0,
            pending_publish: false,
        };
        dev.init_descriptors();
        let base = dev.mem.ptr as u64;
        dev.frontend
            .set_vring_num(0, QUEUE_SIZE)
            .map_err(vu("SET_VRING_NUM"))?;
        dev.frontend
            .set_vring_base(0, 0)
            .map_err(vu("SET_VRING_BASE"))?;
        let addrs = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: base + DESC,
            used_ring_addr: base + USED,
            avail_ring_addr: base + AVAIL,
            log_addr: None,
        };
        dev.frontend
            .set_vring_addr(0, &addrs)
            .map_err(vu("SET_VRING_ADDR"))?;
        dev.frontend
            .set_vring_call(0, &dev.call)
            .map_err(vu("SET_VRING_CALL"))?;
        dev.frontend
            .set_vring_kick(0, &dev.kick)
            .map_err(vu("SET_VRING_KICK"))?;
        let mut dev = dev;
        if wanted & protocol != 0 {
            dev.frontend
                .set_vring_enable(0, true)
                .map_err(vu("SET_VRING_ENABLE"))?;
        }
        Ok(dev)
    }

    fn init_descriptors(&self) {
        for slot in 0..MAX_SLOTS as u64 {
            let d = slot * 3;
            self.write_desc(
                d,
                HEADERS + slot * 16,
                16,
                VIRTQ_DESC_F_NEXT,
                (d + 1) as u16,
            );
            self.write_desc(
                d + 1,
                DATA + slot * MAX_IO as u64,
                0,
                VIRTQ_DESC_F_NEXT,
                (d + 2) as u16,
            );
            self.write_desc(d + 2, STATUS + slot, 1, VIRTQ_DESC_F_WRITE, 0);
        }
        self.mem.write::<u16>(AVAIL, 0); // flags
        self.mem.write::<u16>(AVAIL + 2, 0); // idx
    }

    fn write_desc(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + index * 16;
        self.mem.write::<u64>(at, addr);
        self.mem.write::<u32>(at + 8, len);
        self.mem.write::<u16>(at + 12, flags);
        self.mem.write::<u16>(at + 14, next);
    }

    /// The data buffer of `slot` (to fill before writes).
    pub fn buffer_mut(&mut self, slot: usize) -> &mut [u8] {
        let p = self.mem.at(DATA + (slot * MAX_IO) as u64, MAX_IO);
        // SAFETY: the range lies inside the mapping and `&mut self` makes this
        // the only reference handed out; the backend touches it only while the
        // slot's request is in flight, and callers fill it before submitting.
        unsafe { std::slice::from_raw_parts_mut(p, MAX_IO) }
    }

    /// Queues a request on `slot` (published by [`Self::publish`]).
    pub fn submit(
        &mut self,
        slot: usize,
        op: Op,
        sector: u64,
        len: usize,
    ) -> Result<(), FrontendError> {
        if slot >= MAX_SLOTS || len > MAX_IO || (len == 0 && op != Op::Flush) {
            return Err(FrontendError::BadRequest);
        }
        let s = slot as u64;
        let hdr = HEADERS + s * 16;
        let kind = match op {
            Op::Read => VIRTIO_BLK_T_IN,
            Op::Write => VIRTIO_BLK_T_OUT,
            Op::Flush => VIRTIO_BLK_T_FLUSH,
        };
        self.mem.write::<u32>(hdr, kind.to_le());
        self.mem.write::<u32>(hdr + 4, 0);
        let sector = if op == Op::Flush { 0 } else { sector };
        self.mem.write::<u64>(hdr + 8, sector.to_le());
        // The header's descriptor chains to the data, or straight to the
        // status for a FLUSH.
        let hdr_desc = DESC + s * 3 * 16;
        let next = if op == Op::Flush {
            s * 3 + 2
        } else {
            s * 3 + 1
        };
        self.mem.write::<u16>(hdr_desc + 14, next as u16);
        let data_desc = DESC + (s * 3 + 1) * 16;
        self.mem.write::<u32>(data_desc + 8, len as u32);
        let flags = match op {
            Op::Read => VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            Op::Write | Op::Flush => VIRTQ_DESC_F_NEXT,
        };
        self.mem.write::<u16>(data_desc + 12, flags);
        self.mem.write::<u8>(STATUS + s, 0xff);
        let ring_at = AVAIL + 4 + u64::from(self.next_avail % QUEUE_SIZE) * 2;
        self.mem.write::<u16>(ring_at, (s * 3) as u16);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.pending_publish = true;
        Ok(())
    }

    /// Makes queued requests visible and kicks the backend.
    pub fn publish(&mut self) -> Result<(), FrontendError> {
        if !self.pending_publish {
            return Ok(());
        }
        self.pending_publish = false;
        self.mem
            .atomic_u16(AVAIL + 2)
            .store(self.next_avail, Ordering::Release);
        fence(Ordering::SeqCst);
        self.kick.write(1).map_err(FrontendError::Wait)
    }

    /// Collects completed requests into `out` (cleared first); blocks on the
    /// call eventfd when none are ready.
    pub fn wait_completions(&mut self, out: &mut Vec<Completion>) -> Result<(), FrontendError> {
        out.clear();
        loop {
            let used_idx = self.mem.atomic_u16(USED + 2).load(Ordering::Acquire);
            while self.last_used != used_idx {
                let elem = USED + 4 + u64::from(self.last_used % QUEUE_SIZE) * 8;
                let id = u32::from_le(self.mem.read::<u32>(elem)) as usize;
                self.last_used = self.last_used.wrapping_add(1);
                let slot = id / 3;
                if slot >= MAX_SLOTS {
                    return Err(FrontendError::BadRequest);
                }
                let status = self.mem.read::<u8>(STATUS + slot as u64);
                if status != 0 {
                    return Err(FrontendError::Status { status });
                }
                out.push(Completion { slot });
            }
            if !out.is_empty() {
                return Ok(());
            }
            self.wait_call()?;
        }
    }

    /// Blocks until the backend signals the call eventfd (whose file status
    /// flags the backend may have made non-blocking).
    fn wait_call(&self) -> Result<(), FrontendError> {
        loop {
            match self.call.read() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.call.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll(2) on one valid pollfd that lives across the call.
                    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
                    if rc == 0 {
                        return Err(FrontendError::Wait(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no completion from the backend within 10 s",
                        )));
                    }
                    if rc < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            return Err(FrontendError::Wait(e));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrontendError::Wait(e)),
            }
        }
    }
}
