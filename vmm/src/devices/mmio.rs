//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2)
//! in front of a vhost-user backend.
//!
//! The guest programs the registers through MMIO exits. Device features and
//! configuration space come from the backend; when the driver sets
//! `DRIVER_OK`, the transport hands the backend the guest memory and the
//! rings. Queue notifications reach the backend through an ioeventfd on the
//! `QueueNotify` register (one per queue, matched on the queue index) when KVM
//! accepts it, else through an MMIO exit that writes the kick eventfd. Used
//! buffer notifications from the backend land on a call eventfd per queue; a
//! relay thread sets `InterruptStatus` and, when the VM has an in-kernel
//! irqchip, pulses the device's GSI through an irqfd. Drivers that poll the
//! used ring need neither.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dirty_log::DirtyLog;
use super::vhost_user::{SharedRegion, VhostUserConnection, VhostUserError, VringAddrs};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Transport version: 2 is virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("VMR\0").
pub const MMIO_VENDOR_ID: u32 = 0x0052_4d56;

/// Register offsets of the virtio-mmio v2 layout.
pub mod regs {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// `InterruptStatus` bit: a used buffer was returned.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Largest queue the transport offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// The kinds of device the transport fronts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk (device ID 2), one request queue.
    Block,
    /// virtio-net (device ID 1), a receive and a transmit queue.
    Net,
}

impl DeviceKind {
    /// Virtio device ID.
    pub fn device_id(self) -> u32 {
        match self {
            DeviceKind::Block => 2,
            DeviceKind::Net => 1,
        }
    }

    /// Number of virtqueues the transport exposes.
    pub fn num_queues(self) -> usize {
        match self {
            DeviceKind::Block => 1,
            DeviceKind::Net => 2,
        }
    }

    /// Size of the configuration space the transport serves.
    pub fn config_len(self) -> usize {
        match self {
            // struct virtio_blk_config up to and including `num_queues`.
            DeviceKind::Block => 36,
            // mac[6], status, max_virtqueue_pairs, mtu.
            DeviceKind::Net => 12,
        }
    }

    /// Configuration space computed locally, used when the backend does not
    /// serve `GET_CONFIG`: a block device's capacity in 512-byte sectors, a
    /// NIC's MAC address.
    pub fn local_config(self, disk_bytes: u64, mac: [u8; 6]) -> Vec<u8> {
        let mut c = vec![0u8; self.config_len()];
        match self {
            DeviceKind::Block => c[..8].copy_from_slice(&(disk_bytes / 512).to_le_bytes()),
            DeviceKind::Net => {
                c[..6].copy_from_slice(&mac);
                c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
                c[8..10].copy_from_slice(&1u16.to_le_bytes());
            }
        }
        c
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The backend failed.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The interrupt relay thread could not start.
    #[error("cannot start the interrupt relay thread")]
    Thread(#[source] std::io::Error),
    /// A saved state does not fit this device.
    #[error("saved device state is invalid: {0}")]
    BadState(String),
    /// The dirty log could not be created.
    #[error(transparent)]
    DirtyLog(#[from] super::dirty_log::DirtyLogError),
    /// Lazily restored memory could not be populated for a backend.
    #[error(transparent)]
    Lazy(#[from] crate::snapshot::lazy::LazyError),
}

/// How long a device whose backend cannot take part in lazy restore waits
/// for guest memory to be fully populated before it starts.
pub use crate::snapshot::lazy::POPULATE_TIMEOUT;

/// Where a device sits and what it talks to.
#[derive(Debug, Clone)]
pub struct MmioDeviceConfig {
    /// Kind of device.
    pub kind: DeviceKind,
    /// vhost-user socket of the backend.
    pub socket: PathBuf,
    /// Guest physical base of the device's register window.
    pub mmio_base: u64,
    /// GSI of the device's interrupt.
    pub gsi: u32,
    /// Configuration space to serve when the backend does not serve it.
    pub local_config: Vec<u8>,
}

/// Driver-visible state of one virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueState {
    /// `QueueNumMax`.
    pub max_size: u16,
    /// `QueueNum`.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub avail: u64,
    /// Device (used) ring address.
    pub used: u64,
    /// Next available index the backend will process (from `GET_VRING_BASE`).
    pub next_avail: u16,
}

/// Everything needed to rebuild a transport in a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDeviceState {
    /// Kind of device.
    pub kind: DeviceKind,
    /// Register window base.
    pub mmio_base: u64,
    /// Interrupt.
    pub gsi: u32,
    /// Features offered to the driver when the state was saved.
    pub device_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `Status`.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Local configuration space.
    pub local_config: Vec<u8>,
    /// Queues.
    pub queues: Vec<QueueState>,
    /// Whether the backend had been started (`DRIVER_OK` seen).
    pub activated: bool,
}

/// What a transport needs from the VM it lives in.
#[derive(Clone)]
pub struct VmResources {
    /// The VM, for ioeventfds and irqfds (`None`: handle notifications by
    /// MMIO exits and never inject interrupts).
    pub vm: Option<Arc<VmFd>>,
    /// Whether the VM has an in-kernel irqchip (irqfds need it).
    pub irqchip: bool,
    /// Guest memory, shared with backends.
    pub regions: Vec<SharedRegion>,
    /// Dirty log shared with backends that support it.
    pub dirty_log: Option<Arc<DirtyLog>>,
    /// Lazily restored guest memory (`None`: the memory is populated).
    pub lazy: Option<crate::snapshot::lazy::LazyMemory>,
}

impl std::fmt::Debug for VmResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmResources")
            .field("vm", &self.vm.is_some())
            .field("irqchip", &self.irqchip)
            .field("regions", &self.regions)
            .field("dirty_log", &self.dirty_log.is_some())
            .field("lazy", &self.lazy.is_some())
            .finish()
    }
}

struct QueueRuntime {
    kick: EventFd,
    call: EventFd,
    /// Whether a kernel ioeventfd forwards notifications for this queue.
    ioeventfd: bool,
    /// Whether the backend is currently running this ring.
    started: bool,
}

struct InterruptRelay {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for InterruptRelay {
    fn drop(&mut self) {
        // A failed write only means the thread is already gone.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A virtio-mmio device whose device side is a vhost-user backend.
pub struct VirtioMmioDevice {
    config: MmioDeviceConfig,
    conn: VhostUserConnection,
    res: VmResources,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    queues: Vec<QueueState>,
    runtime: Vec<QueueRuntime>,
    interrupt_status: Arc<AtomicU32>,
    irq: Option<EventFd>,
    relay: Option<InterruptRelay>,
    activated: bool,
    logging: bool,
    /// The backend's id with the lazy memory once it joined postcopy.
    postcopy_peer: Option<u64>,
}

impl std::fmt::Debug for VirtioMmioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioDevice")
            .field("kind", &self.config.kind)
            .field("mmio_base", &format_args!("{:#x}", self.config.mmio_base))
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl VirtioMmioDevice {
    /// Connects to the backend and builds a device in reset state.
    pub fn new(config: MmioDeviceConfig, res: VmResources) -> Result<Self, MmioError> {
        let n = config.kind.num_queues();
        let conn = VhostUserConnection::connect(&config.socket, n as u64)?;
        let mut dev = Self::build(config, res, conn)?;
        dev.setup_irq();
        Ok(dev)
    }

    fn build(
        config: MmioDeviceConfig,
        res: VmResources,
        conn: VhostUserConnection,
    ) -> Result<Self, MmioError> {
        let n = config.kind.num_queues();
        if (conn.queue_num() as usize) < n {
            return Err(VhostUserError::MissingFeature("enough queues").into());
        }
        let mut runtime = Vec::with_capacity(n);
        for _ in 0..n {
            runtime.push(QueueRuntime {
                kick: EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
                ioeventfd: false,
                started: false,
            });
        }
        let queues = vec![
            QueueState {
                max_size: QUEUE_MAX_SIZE,
                ..Default::default()
            };
            n
        ];
        Ok(Self {
            device_features: conn.guest_features(),
            conn,
            res,
            config,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            queues,
            runtime,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irq: None,
            relay: None,
            activated: false,
            logging: false,
            postcopy_peer: None,
        })
    }

    /// Registers an irqfd for the device's GSI when the VM has an in-kernel
    /// irqchip.
    fn setup_irq(&mut self) {
        let Some(vm) = self.res.vm.as_ref().filter(|_| self.res.irqchip) else {
            return;
        };
        let fd = match EventFd::new(EFD_NONBLOCK) {
            Ok(fd) => fd,
            Err(error) => {
                warn!(%error, "no irq eventfd; the device will not raise interrupts");
                return;
            }
        };
        match vm.register_irqfd(&fd, self.config.gsi) {
            Ok(()) => self.irq = Some(fd),
            Err(error) => {
                warn!(%error, gsi = self.config.gsi, "irqfd registration failed; the device will not raise interrupts")
            }
        }
    }

    /// Kind of device.
    pub fn kind(&self) -> DeviceKind {
        self.config.kind
    }

    /// Guest physical base of the register window.
    pub fn mmio_base(&self) -> u64 {
        self.config.mmio_base
    }

    /// The device's interrupt.
    pub fn gsi(&self) -> u32 {
        self.config.gsi
    }

    /// Whether the backend is running the rings.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The backend connection (for example to check its features).
    pub fn connection(&self) -> &VhostUserConnection {
        &self.conn
    }

    /// Whether queue notifications for `queue` go through a kernel
    /// ioeventfd (no exit to the VMM).
    pub fn notify_uses_ioeventfd(&self, queue: usize) -> bool {
        self.runtime.get(queue).is_some_and(|q| q.ioeventfd)
    }

    /// Whether used-buffer notifications raise the device's GSI (an irqfd
    /// is registered with the in-kernel irqchip).
    pub fn raises_interrupts(&self) -> bool {
        self.irq.is_some()
    }

    /// Whether the backend logs its guest-memory writes into the shared
    /// dirty log.
    pub fn is_logging(&self) -> bool {
        self.logging
    }

    /// Whether the backend joined a lazy restore's postcopy (its faults on
    /// guest memory are served by the VMM).
    pub fn joined_postcopy(&self) -> bool {
        self.postcopy_peer.is_some()
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            warn!(offset, len = data.len(), "non 32-bit register read");
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize).copied();
        let v: u32 = match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.config.kind.device_id(),
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt_status.load(Ordering::Acquire),
            regs::STATUS => self.status,
            regs::QUEUE_DESC_LOW => q.map_or(0, |q| q.desc as u32),
            regs::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc >> 32) as u32),
            regs::QUEUE_DRIVER_LOW => q.map_or(0, |q| q.avail as u32),
            regs::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail >> 32) as u32),
            regs::QUEUE_DEVICE_LOW => q.map_or(0, |q| q.used as u32),
            regs::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used >> 32) as u32),
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!(offset, "read of unknown virtio-mmio register");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` in the window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(offset, len = data.len(), "non 32-bit register write");
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers may only change while the queue is not ready.
        let queue_writable = !self.activated
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready);
        let set_low = |x: &mut u64| *x = (*x & !0xffff_ffff) | u64::from(v);
        let set_high = |x: &mut u64| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    warn!("driver features written after FEATURES_OK; ignored");
                } else {
                    match self.driver_features_sel {
                        0 => set_low(&mut self.driver_features),
                        1 => set_high(&mut self.driver_features),
                        _ => {}
                    }
                }
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.size = v.min(u32::from(q.max_size)) as u16;
                }
            }
            regs::QUEUE_READY if queue_writable || v == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH
                if queue_writable =>
            {
                if let Some(q) = self.selected_queue() {
                    // Each high half sits 4 bytes above its low half.
                    let addr = match offset {
                        regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => &mut q.desc,
                        regs::QUEUE_DRIVER_LOW | regs::QUEUE_DRIVER_HIGH => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if offset & 4 == 0 {
                        set_low(addr);
                    } else {
                        set_high(addr);
                    }
                }
            }
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            regs::STATUS => self.write_status(v),
            _ => debug!(offset, value = v, "ignored virtio-mmio register write"),
        }
    }

    /// A `QueueNotify` write that reached the VMM (no ioeventfd matched).
    fn notify(&mut self, queue: u32) {
        match self.runtime.get(queue as usize) {
            Some(rt) if rt.started => {
                if let Err(error) = rt.kick.write(1) {
                    warn!(%error, queue, "cannot kick the backend");
                }
            }
            Some(_) => debug!(queue, "notify on a queue that is not running"),
            None => warn!(queue, "notify on a queue that does not exist"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & super::vhost_user::VIRTIO_F_VERSION_1 != 0;
            if !ok {
                warn!(
                    driver = format_args!("{:#x}", self.driver_features),
                    device = format_args!("{:#x}", self.device_features),
                    "driver features rejected"
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FAILED == 0
            && !self.activated
        {
            if let Err(error) = self.activate(None) {
                error!(%error, kind = ?self.config.kind, "cannot start the vhost-user backend");
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    /// Hands memory and rings to the backend and starts it. `bases` gives
    /// each queue's first available index (restore); `None` starts at 0.
    fn activate(&mut self, bases: Option<&[u16]>) -> Result<(), MmioError> {
        let logging = self.res.dirty_log.is_some() && self.conn.supports_dirty_log();
        self.conn.set_features(self.driver_features, logging)?;
        self.share_memory()?;
        if let (true, Some(log)) = (logging, self.res.dirty_log.as_ref()) {
            self.conn.set_log_base(log.fd(), log.size())?;
        }
        self.logging = logging;
        for i in 0..self.queues.len() {
            let q = self.queues[i];
            if !q.ready {
                continue;
            }
            let base = bases.and_then(|b| b.get(i).copied()).unwrap_or(0);
            self.register_ioeventfd(i);
            let rt = &self.runtime[i];
            self.conn.start_vring(
                i,
                q.max_size,
                VringAddrs {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                },
                base,
                &self.res.regions,
                &rt.call,
                &rt.kick,
                logging,
            )?;
            self.runtime[i].started = true;
            self.queues[i].next_avail = base;
        }
        self.start_relay()?;
        self.activated = true;
        info!(kind = ?self.config.kind, base = format_args!("{:#x}", self.config.mmio_base), logging, "virtio device activated");
        // Kick once so the backend looks at buffers queued before it started.
        for rt in self.runtime.iter().filter(|rt| rt.started) {
            let _ = rt.kick.write(1);
        }
        Ok(())
    }

    /// `SET_MEM_TABLE`. While lazily restored memory is still being
    /// populated, a backend that offers `PAGEFAULT` joins postcopy (its
    /// faults are served from the snapshot); one that does not waits until
    /// every page is present, so it never sees a page before its contents.
    fn share_memory(&mut self) -> Result<(), MmioError> {
        let Some(lazy) = self.res.lazy.clone().filter(|l| !l.is_complete()) else {
            self.conn.set_mem_table(&self.res.regions)?;
            return Ok(());
        };
        if !self.conn.supports_postcopy() {
            warn!(
                socket = %self.conn.socket().display(),
                "backend lacks the PAGEFAULT protocol feature; populating all guest memory before it starts"
            );
            lazy.populate_all(POPULATE_TIMEOUT)?;
            self.conn.set_mem_table(&self.res.regions)?;
            return Ok(());
        }
        let Some(hs) = lazy.handshake() else {
            // Population ended meanwhile.
            self.conn.set_mem_table(&self.res.regions)?;
            return Ok(());
        };
        let peer = match self.postcopy_peer {
            Some(p) => p,
            None => {
                let uffd = self.conn.postcopy_listen()?;
                let name = self.conn.socket().display().to_string();
                let p = hs.add_peer(&name, uffd, Box::new(self.conn.postcopy_ender()));
                self.postcopy_peer = Some(p);
                p
            }
        };
        let bases = self.conn.set_mem_table_postcopy(&self.res.regions)?;
        hs.set_regions(
            peer,
            self.res
                .regions
                .iter()
                .zip(bases)
                .map(|(r, b)| crate::snapshot::lazy::PeerRegion {
                    local_base: b,
                    size: r.size,
                    guest_phys_addr: r.guest_phys_addr,
                })
                .collect(),
        );
        self.conn.postcopy_ack()?;
        debug!(socket = %self.conn.socket().display(), "backend joined lazy restore (postcopy)");
        Ok(())
    }

    fn register_ioevent_addr(&self) -> IoEventAddress {
        IoEventAddress::Mmio(self.config.mmio_base + regs::QUEUE_NOTIFY)
    }

    fn register_ioeventfd(&mut self, i: usize) {
        if self.runtime[i].ioeventfd {
            return;
        }
        let Some(vm) = self.res.vm.as_ref() else {
            return;
        };
        let addr = self.register_ioevent_addr();
        match vm.register_ioevent(&self.runtime[i].kick, &addr, i as u32) {
            Ok(()) => self.runtime[i].ioeventfd = true,
            Err(error) => {
                debug!(%error, queue = i, "no ioeventfd; notifications go through MMIO exits")
            }
        }
    }

    fn unregister_ioeventfds(&mut self) {
        let addr = self.register_ioevent_addr();
        for (i, rt) in self.runtime.iter_mut().enumerate() {
            if !rt.ioeventfd {
                continue;
            }
            if let Some(vm) = self.res.vm.as_ref() {
                if let Err(error) = vm.unregister_ioevent(&rt.kick, &addr, i as u32) {
                    warn!(%error, queue = i, "cannot unregister ioeventfd");
                }
            }
            rt.ioeventfd = false;
        }
    }

    fn start_relay(&mut self) -> Result<(), MmioError> {
        if self.relay.is_some() {
            return Ok(());
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        let stop_t = stop.try_clone().map_err(MmioError::EventFd)?;
        let calls = self
            .runtime
            .iter()
            .map(|rt| rt.call.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        let irq = match &self.irq {
            Some(fd) => Some(fd.try_clone().map_err(MmioError::EventFd)?),
            None => None,
        };
        let status = Arc::clone(&self.interrupt_status);
        let thread = std::thread::Builder::new()
            .name(format!("virtio-irq-{:x}", self.config.mmio_base))
            .spawn(move || relay_interrupts(&stop_t, &calls, irq.as_ref(), &status))
            .map_err(MmioError::Thread)?;
        self.relay = Some(InterruptRelay {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Stops every running ring and records where the backend stopped.
    /// The vCPUs must be paused. Call [`VirtioMmioDevice::resume`] to restart
    /// the rings, or drop the device.
    pub fn pause(&mut self) -> Result<(), MmioError> {
        for i in 0..self.queues.len() {
            if self.runtime[i].started {
                let base = self.conn.stop_vring(i)?;
                self.queues[i].next_avail = base;
                self.runtime[i].started = false;
            }
        }
        self.relay = None;
        Ok(())
    }

    /// Restarts rings stopped by [`VirtioMmioDevice::pause`] where they
    /// stopped.
    pub fn resume(&mut self) -> Result<(), MmioError> {
        if !self.activated {
            return Ok(());
        }
        for i in 0..self.queues.len() {
            let q = self.queues[i];
            if !q.ready || self.runtime[i].started {
                continue;
            }
            let rt = &self.runtime[i];
            self.conn.start_vring(
                i,
                q.max_size,
                VringAddrs {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                },
                q.next_avail,
                &self.res.regions,
                &rt.call,
                &rt.kick,
                self.logging,
            )?;
            self.runtime[i].started = true;
        }
        self.start_relay()?;
        for rt in self.runtime.iter().filter(|rt| rt.started) {
            let _ = rt.kick.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            if let Err(error) = self.pause() {
                warn!(%error, "cannot stop the backend's rings on reset");
            }
        }
        self.unregister_ioeventfds();
        self.relay = None;
        self.activated = false;
        self.logging = false;
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::Release);
        for q in &mut self.queues {
            *q = QueueState {
                max_size: q.max_size,
                ..Default::default()
            };
        }
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let local = &self.config.local_config;
        if offset + len > self.config.kind.config_len() as u64 {
            data.fill(0);
            return;
        }
        if let Some(bytes) = self.conn.get_config(offset as u32, len as u32) {
            if bytes.len() == data.len() {
                data.copy_from_slice(&bytes);
                return;
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = local.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Err(error) = self.conn.set_config(offset as u32, data) {
            warn!(%error, offset, "config write failed");
        }
        let local = &mut self.config.local_config;
        let start = offset as usize;
        if let Some(dst) = local.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Saves the transport's state. Call [`VirtioMmioDevice::pause`] first
    /// so that the saved ring indices are the backend's.
    pub fn save(&self) -> MmioDeviceState {
        if self.runtime.iter().any(|rt| rt.started) {
            warn!("saving a device whose rings run; ring indices may be stale");
        }
        MmioDeviceState {
            kind: self.config.kind,
            mmio_base: self.config.mmio_base,
            gsi: self.config.gsi,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status.load(Ordering::Acquire),
            config_generation: self.config_generation,
            local_config: self.config.local_config.clone(),
            queues: self.queues.clone(),
            activated: self.activated,
        }
    }

    /// Rebuilds a device in a new VM from saved state: connects to the
    /// backend at `socket` and, if the device was running, restarts its rings
    /// at the saved indices.
    pub fn restore(
        socket: &Path,
        res: VmResources,
        state: &MmioDeviceState,
    ) -> Result<Self, MmioError> {
        let n = state.kind.num_queues();
        if state.queues.len() != n {
            return Err(MmioError::BadState(format!(
                "{:?} has {n} queues, state has {}",
                state.kind,
                state.queues.len()
            )));
        }
        let conn = VhostUserConnection::connect(socket, n as u64)?;
        Self::restore_with(conn, socket, res, state)
    }

    fn restore_with(
        conn: VhostUserConnection,
        socket: &Path,
        res: VmResources,
        state: &MmioDeviceState,
    ) -> Result<Self, MmioError> {
        if state.driver_features & !conn.guest_features() != 0 {
            return Err(MmioError::BadState(format!(
                "backend lacks features the driver acknowledged ({:#x} of {:#x})",
                state.driver_features & !conn.guest_features(),
                state.driver_features
            )));
        }
        let config = MmioDeviceConfig {
            kind: state.kind,
            socket: socket.to_path_buf(),
            mmio_base: state.mmio_base,
            gsi: state.gsi,
            local_config: state.local_config.clone(),
        };
        let mut dev = Self::build(config, res, conn)?;
        dev.setup_irq();
        dev.device_features = state.device_features;
        dev.device_features_sel = state.device_features_sel;
        dev.driver_features = state.driver_features;
        dev.driver_features_sel = state.driver_features_sel;
        dev.queue_sel = state.queue_sel;
        dev.status = state.status;
        dev.config_generation = state.config_generation;
        dev.queues.clone_from(&state.queues);
        dev.interrupt_status
            .store(state.interrupt_status, Ordering::Release);
        if state.activated {
            let bases: Vec<u16> = state.queues.iter().map(|q| q.next_avail).collect();
            dev.activate(Some(&bases))?;
        }
        Ok(dev)
    }
}

impl Drop for VirtioMmioDevice {
    fn drop(&mut self) {
        self.relay = None;
        self.unregister_ioeventfds();
        if let (Some(vm), Some(irq)) = (self.res.vm.as_ref(), self.irq.as_ref()) {
            let _ = vm.unregister_irqfd(irq, self.config.gsi);
        }
    }
}

impl crate::bus::MmioDevice for VirtioMmioDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data);
    }
}

/// Waits for used-buffer notifications from the backend and turns them into
/// `InterruptStatus` bits and irqfd pulses, until `stop` fires.
fn relay_interrupts(stop: &EventFd, calls: &[EventFd], irq: Option<&EventFd>, status: &AtomicU32) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop)
        .chain(calls.iter())
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd for its whole length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            error!(error = %e, "interrupt relay poll failed");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        let mut fired = false;
        for (pfd, call) in fds[1..].iter().zip(calls) {
            if pfd.revents & libc::POLLIN != 0 && call.read().is_ok() {
                fired = true;
            }
        }
        if fired {
            status.fetch_or(INT_VRING, Ordering::AcqRel);
            if let Some(irq) = irq {
                if let Err(error) = irq.write(1) {
                    warn!(%error, "cannot raise the device interrupt");
                }
            }
        }
    }
}
