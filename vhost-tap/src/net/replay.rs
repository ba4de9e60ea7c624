//! Frames the replayer injects into a clone's NIC.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// A source of frames to deliver to the guest (host to guest). The backend
/// watches [`ReplaySource::event_fd`] and calls [`ReplaySource::pop`] while
/// the guest has receive buffers.
pub trait ReplaySource: Send + Sync {
    /// The next frame (an Ethernet frame without virtio-net header).
    fn pop(&self) -> Option<Vec<u8>>;
    /// Puts a frame back at the front (no receive buffer was free).
    fn unpop(&self, frame: Vec<u8>);
    /// An eventfd that becomes readable when frames are pushed.
    fn event_fd(&self) -> RawFd;
    /// Consumes the eventfd's counter.
    fn clear_event(&self);
}

/// A queue of frames fed by [`ChannelReplaySource::push`] (library API, or
/// the control socket's `inject` command).
pub struct ChannelReplaySource {
    frames: Mutex<VecDeque<Vec<u8>>>,
    event: EventFd,
}

impl ChannelReplaySource {
    /// An empty source.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            frames: Mutex::new(VecDeque::new()),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Queues a frame for the guest.
    pub fn push(&self, frame: Vec<u8>) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(frame);
        if let Err(error) = self.event.write(1) {
            tracing::warn!(%error, "cannot signal the replay source");
        }
    }

    /// Frames waiting for a receive buffer.
    pub fn pending(&self) -> usize {
        self.frames.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl ReplaySource for ChannelReplaySource {
    fn pop(&self) -> Option<Vec<u8>> {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    fn unpop(&self, frame: Vec<u8>) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_front(frame);
    }

    fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn clear_event(&self) {
        let _ = self.event.read();
    }
}
