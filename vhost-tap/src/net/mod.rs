//! The virtio-net backend: a TAP device (capture mode) or a replay source
//! (replay mode) on the host side.

pub mod backend;
pub mod replay;
pub mod tap;

pub use backend::{NetBackend, NetConfig, NetError};
pub use replay::{ChannelReplaySource, ReplaySource};
pub use tap::{Tap, TapError};
