//! Devices of the microVM: the virtio-mmio transport as a vhost-user frontend.
//!
//! - [`mmio`]: the virtio-mmio (v2) register file, feature negotiation with the
//!   guest driver, and ring hand-off to the backend on `DRIVER_OK`.
//! - [`vhost_user`]: the connection to a vhost-user backend.
//! - [`persist`]: device snapshot state through the VMM's `Persist` trait.
//! - [`dirty_log`]: the dirty-page bitmap shared with backends while they
//!   write guest memory.
//! - [`vm`]: attaching devices to a [`crate::vm::Vm`] (MMIO bus, pause,
//!   snapshot, dirty pages) and restoring them into a new one.
//!
//! Device slots are fixed: slot `n` has its register window at
//! `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SIZE` and its interrupt on GSI
//! `VIRTIO_GSI_BASE + n`. The test guest (`guest/test-guest/virtio.h`) uses
//! the same constants.

pub mod dirty_log;
pub mod mmio;
pub mod persist;
pub mod vhost_user;
pub mod vm;

pub use vm::{attach, restore, VirtioSnapshotDevice, VirtioSpec};

/// Guest physical base of the first virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of slot 0's interrupt (IOAPIC pin); slot `n` uses `VIRTIO_GSI_BASE + n`.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Slot of the block device in the standard layout.
pub const BLOCK_SLOT: u32 = 0;
/// Slot of the network device in the standard layout.
pub const NET_SLOT: u32 = 1;

/// Register window base of slot `n`.
pub fn slot_base(n: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE
}

/// GSI of slot `n`.
pub fn slot_gsi(n: u32) -> u32 {
    VIRTIO_GSI_BASE + n
}
