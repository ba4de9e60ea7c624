//! The virtio-blk backend.

pub mod backend;
pub mod disk;
mod hooks;
pub mod request;
mod writer;

pub use backend::{BlockBackend, BlockConfig, BlockError};
pub use disk::{pack_layer, Checkpointed, Disk, DiskError, Packed};

#[cfg(test)]
mod tests;
