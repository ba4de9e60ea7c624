//! vhost-user block and net backends that tee every request into a capture
//! sink, and serve clones in replay mode.
//!
//! - [`blk`]: virtio-blk over a raw image with an optional copy-on-write
//!   overlay.
//! - [`net`]: virtio-net over a TAP device (or, in replay mode, over frames
//!   pushed by the replayer).
//! - [`capture`]: the tee (records, the bounded queue, policies, GAP events,
//!   the FLUSH barrier), the capture file and the rolling spool with the
//!   shipper's reader and commit.
//! - [`seq`]: per-instance sequence numbers shared by all backends of an
//!   instance, from a durable lease.
//! - [`server`]: the accept loop that serves one front-end after another on a
//!   socket, in-process or from the binaries.
//! - [`control`]: the control socket (metrics, faults, frame injection,
//!   checkpoints).
//! - [`checkpoint`]: the backend's part of a snapshot cut: drain, durable
//!   capture, `seq`, and freezing the disk's copy-on-write layer.
//!
//! Everything a benchmark or test needs to start a backend in-process is
//! public: build a [`blk::BlockBackend`] or [`net::NetBackend`] and hand it to
//! [`server::Server::spawn`].

pub mod app;
pub mod blk;
pub mod capture;
pub mod checkpoint;
pub mod control;
pub mod fault;
pub mod filter;
pub mod iov;
pub mod metrics;
pub mod net;
pub mod relay;
pub mod seq;
pub mod server;
#[cfg(feature = "test-utils")]
pub mod testing;

/// Mode of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Serve the original VM and record its inputs.
    Capture,
    /// Serve a clone: private writes, injected frames, recorded outputs.
    Replay,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "capture" => Ok(Self::Capture),
            "replay" => Ok(Self::Replay),
            other => Err(format!("unknown mode {other:?} (capture|replay)")),
        }
    }
}

/// Guest memory as the backends see it: mmap'ed regions with a dirty-page
/// bitmap that the front-end can share through `SET_LOG_BASE`.
pub type GuestMem = vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
/// The atomically replaceable guest memory handed over by `SET_MEM_TABLE`.
pub type GuestMemAtomic = vm_memory::GuestMemoryAtomic<GuestMem>;

/// Wall-clock and monotonic time, nanoseconds.
pub(crate) fn now_ns() -> (u64, u64) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    (wall, mono)
}
