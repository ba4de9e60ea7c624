//! The vhost-user frontend side of a virtio device: one connection to a
//! backend process (for example `vhost-tap-blk` or `vhost-tap-net`), the
//! feature negotiation done at connect time, and the ring setup done when the
//! guest driver sets `DRIVER_OK`.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use tracing::{debug, info};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the device speaks virtio 1.x (required by the
/// modern MMIO transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Protocol features the frontend knows how to use.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::PAGEFAULT);

/// `VHOST_VRING_F_LOG`: the backend logs writes to the used ring.
const VRING_F_LOG: u32 = 1;

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The backend's socket could not be connected or configured.
    #[error("cannot connect to vhost-user backend at {path}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request failed.
    #[error("vhost-user request {request} failed")]
    Request {
        /// Name of the request.
        request: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a feature the transport needs.
    #[error("vhost-user backend lacks {0}")]
    MissingFeature(&'static str),
    /// A guest address is outside every memory region.
    #[error("guest address {0:#x} is not in guest memory")]
    BadGuestAddress(u64),
}

fn req<T>(request: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|source| VhostUserError::Request { request, source })
}

/// One region of guest memory as the backend must map it: a range of guest
/// physical addresses backed by a shareable file (a memfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRegion {
    /// First guest physical address of the region.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: u64,
    /// File descriptor of the backing file. It must stay open while the
    /// device lives.
    pub fd: RawFd,
    /// Offset of the region in the backing file.
    pub fd_offset: u64,
}

impl SharedRegion {
    /// Translates a guest physical address into this process's address.
    pub fn host_addr_of(regions: &[SharedRegion], gpa: u64) -> Option<u64> {
        regions.iter().find_map(|r| {
            (gpa >= r.guest_phys_addr && gpa - r.guest_phys_addr < r.size)
                .then(|| r.host_addr + (gpa - r.guest_phys_addr))
        })
    }
}

/// Addresses and size of one split virtqueue, as the driver programmed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VringAddrs {
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table (guest physical).
    pub desc: u64,
    /// Driver (available) ring (guest physical).
    pub avail: u64,
    /// Device (used) ring (guest physical).
    pub used: u64,
}

/// A connected, feature-negotiated vhost-user backend.
pub struct VhostUserConnection {
    frontend: Frontend,
    socket: PathBuf,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: u64,
}

impl std::fmt::Debug for VhostUserConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserConnection")
            .field("socket", &self.socket)
            .field(
                "backend_features",
                &format_args!("{:#x}", self.backend_features),
            )
            .field("protocol_features", &self.protocol_features)
            .field("queue_num", &self.queue_num)
            .finish()
    }
}

/// The longest a backend may take to answer one request (GET_VRING_BASE
/// waits for the backend to finish the requests in flight). A backend that
/// stops answering fails the request instead of hanging the VM.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects to `socket`, retrying briefly while the backend is not yet
/// accepting, with [`REQUEST_TIMEOUT`] on reads and writes.
fn connect_stream(socket: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let mut retries = 5;
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && retries > 0 => {
                retries -= 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(stream)
}

impl VhostUserConnection {
    /// Connects to the backend listening on `socket`, takes ownership of the
    /// session and negotiates protocol features. `max_queues` is the number of
    /// queues the transport will expose.
    pub fn connect(socket: &Path, max_queues: u64) -> Result<Self, VhostUserError> {
        let stream = connect_stream(socket).map_err(|source| VhostUserError::Socket {
            path: socket.to_path_buf(),
            source,
        })?;
        let mut frontend = Frontend::from_stream(stream, max_queues);
        req("SET_OWNER", frontend.set_owner())?;
        let backend_features = req("GET_FEATURES", frontend.get_features())?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        let mut queue_num = max_queues;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = req("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            protocol_features = offered & WANTED_PROTOCOL_FEATURES;
            req(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol_features),
            )?;
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let n = req("GET_QUEUE_NUM", frontend.get_queue_num())?;
                queue_num = n.min(max_queues);
            }
        }
        info!(
            socket = %socket.display(),
            features = format_args!("{backend_features:#x}"),
            protocol = format_args!("{:#x}", protocol_features.bits()),
            queue_num,
            "connected to vhost-user backend"
        );
        Ok(Self {
            frontend,
            socket: socket.to_path_buf(),
            backend_features,
            protocol_features,
            queue_num,
        })
    }

    /// Socket path of the backend.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Virtio feature bits the backend offers.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Virtio feature bits the guest may see: the backend's, without the
    /// vhost-user-only bits (protocol features, log-all).
    pub fn guest_features(&self) -> u64 {
        self.backend_features
            & !(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | VhostUserVirtioFeatures::LOG_ALL.bits())
    }

    /// Negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Number of queues the backend serves (bounded by the transport's).
    pub fn queue_num(&self) -> u64 {
        self.queue_num
    }

    /// Whether the backend can log its writes to guest memory into a shared
    /// bitmap (`LOG_SHMFD` protocol feature and `LOG_ALL` feature).
    pub fn supports_dirty_log(&self) -> bool {
        self.protocol_features
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && self.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Reads `buf.len()` bytes of the device configuration space at `offset`
    /// from the backend. `None` when the backend does not serve its config.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Option<Vec<u8>> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return None;
        }
        let buf = vec![0u8; len as usize];
        match self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
        {
            Ok((_, data)) => Some(data),
            Err(error) => {
                debug!(%error, offset, len, "GET_CONFIG failed; using local config");
                None
            }
        }
    }

    /// Writes device configuration space (only when the backend serves it).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            req(
                "SET_CONFIG",
                self.frontend
                    .set_config(offset, VhostUserConfigFlags::WRITABLE, data),
            )?;
        }
        Ok(())
    }

    /// Sends the acknowledged virtio features (plus the vhost-user-only bits
    /// the frontend uses).
    pub fn set_features(
        &mut self,
        driver_features: u64,
        log_all: bool,
    ) -> Result<(), VhostUserError> {
        let mut features = driver_features & self.backend_features;
        features |= self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if log_all {
            features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        req("SET_FEATURES", self.frontend.set_features(features))
    }

    /// Whether the backend takes part in lazy restore (`PAGEFAULT`: it
    /// registers its mapping with a userfaultfd it hands over).
    pub fn supports_postcopy(&self) -> bool {
        self.protocol_features
            .contains(VhostUserProtocolFeatures::PAGEFAULT)
    }

    /// `POSTCOPY_ADVISE` then `POSTCOPY_LISTEN`: returns the backend's
    /// userfaultfd; from now on the backend registers every mapping of guest
    /// memory with it.
    pub fn postcopy_listen(&mut self) -> Result<std::os::fd::OwnedFd, VhostUserError> {
        let file = req("POSTCOPY_ADVISE", self.frontend.postcopy_advise())?;
        req("POSTCOPY_LISTEN", self.frontend.postcopy_listen())?;
        Ok(file.into())
    }

    /// `SET_MEM_TABLE` while postcopy listens: returns where the backend
    /// mapped each region. The backend does not use the memory until
    /// [`VhostUserConnection::postcopy_ack`].
    pub fn set_mem_table_postcopy(
        &mut self,
        regions: &[SharedRegion],
    ) -> Result<Vec<u64>, VhostUserError> {
        let bases = self.set_mem_table_inner(regions)?;
        bases.ok_or(VhostUserError::MissingFeature(
            "postcopy mapping bases in the SET_MEM_TABLE reply",
        ))
    }

    /// Tells the backend the frontend can serve faults on the regions of the
    /// last `SET_MEM_TABLE`.
    pub fn postcopy_ack(&mut self) -> Result<(), VhostUserError> {
        req(
            "SET_MEM_TABLE (postcopy ack)",
            self.frontend
                .postcopy_ack_mem_regions(vhost::vhost_user::message::FrontendReq::SET_MEM_TABLE),
        )
    }

    /// A function that sends `POSTCOPY_END` on this connection (from another
    /// thread; requests are serialized with the device's own) and returns
    /// once the backend has processed it. Requests go out without asking
    /// for an acknowledgement, so a request that always has a reply
    /// (`GET_PROTOCOL_FEATURES`) follows it as a barrier: when its reply
    /// arrives, the backend has handled everything before it, and has
    /// closed its userfaultfd.
    pub fn postcopy_ender(&self) -> impl FnMut() -> Result<(), String> + Send + 'static {
        let mut f = self.frontend.clone();
        move || {
            f.postcopy_end().map_err(|e| e.to_string())?;
            f.get_protocol_features()
                .map(|_| ())
                .map_err(|e| format!("no reply after POSTCOPY_END: {e}"))
        }
    }

    /// Shares guest memory with the backend.
    pub fn set_mem_table(&mut self, regions: &[SharedRegion]) -> Result<(), VhostUserError> {
        self.set_mem_table_inner(regions).map(|_| ())
    }

    fn set_mem_table_inner(
        &mut self,
        regions: &[SharedRegion],
    ) -> Result<Option<Vec<u64>>, VhostUserError> {
        let infos: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.fd_offset,
                mmap_handle: r.fd,
            })
            .collect();
        req("SET_MEM_TABLE", self.frontend.set_mem_table(&infos))
    }

    /// Shares the dirty-page log with the backend.
    pub fn set_log_base(&mut self, fd: RawFd, size: u64) -> Result<(), VhostUserError> {
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: fd,
        };
        req("SET_LOG_BASE", self.frontend.set_log_base(0, Some(region)))
    }

    /// Programs and starts one ring: size, addresses, first available index,
    /// call and kick eventfds, then enables it.
    #[allow(clippy::too_many_arguments)]
    pub fn start_vring(
        &mut self,
        index: usize,
        max_size: u16,
        addrs: VringAddrs,
        base: u16,
        regions: &[SharedRegion],
        call: &EventFd,
        kick: &EventFd,
        log: bool,
    ) -> Result<(), VhostUserError> {
        let hva = |gpa| {
            SharedRegion::host_addr_of(regions, gpa).ok_or(VhostUserError::BadGuestAddress(gpa))
        };
        // vhost-user ring addresses are in the frontend's address space; the
        // log address is guest physical.
        let config = VringConfigData {
            queue_max_size: max_size,
            queue_size: addrs.size,
            flags: if log { VRING_F_LOG } else { 0 },
            desc_table_addr: hva(addrs.desc)?,
            used_ring_addr: hva(addrs.used)?,
            avail_ring_addr: hva(addrs.avail)?,
            log_addr: log.then_some(addrs.used),
        };
        req(
            "SET_VRING_NUM",
            self.frontend.set_vring_num(index, addrs.size),
        )?;
        req(
            "SET_VRING_ADDR",
            self.frontend.set_vring_addr(index, &config),
        )?;
        req("SET_VRING_BASE", self.frontend.set_vring_base(index, base))?;
        req("SET_VRING_CALL", self.frontend.set_vring_call(index, call))?;
        req("SET_VRING_KICK", self.frontend.set_vring_kick(index, kick))?;
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            req(
                "SET_VRING_ENABLE",
                self.frontend.set_vring_enable(index, true),
            )?;
        }
        debug!(index, size = addrs.size, base, "vring started");
        Ok(())
    }

    /// Stops one ring and returns the index of the next available descriptor
    /// the backend would have processed.
    pub fn stop_vring(&mut self, index: usize) -> Result<u16, VhostUserError> {
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            req(
                "SET_VRING_ENABLE",
                self.frontend.set_vring_enable(index, false),
            )?;
        }
        let base = req("GET_VRING_BASE", self.frontend.get_vring_base(index))?;
        Ok(base as u16)
    }
}

impl AsRawFd for VhostUserConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

impl From<crate::memory::RegionInfo> for SharedRegion {
    fn from(r: crate::memory::RegionInfo) -> Self {
        Self {
            guest_phys_addr: r.guest_phys_addr,
            size: r.size,
            host_addr: r.host_addr,
            fd: r.fd,
            fd_offset: r.fd_offset,
        }
    }
}
