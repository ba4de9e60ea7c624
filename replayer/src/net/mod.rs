//! TCP-aware network replay: the replayer acts as the recorded peer of the
//! clone.
//!
//! A clone restored from a snapshot continues the TCP connections that were
//! open at the snapshot with the same state, but every connection set up
//! after it gets the clone's own initial sequence number, TCP timestamps and
//! (for connections the guest opens) possibly another ephemeral port. The
//! recorded inbound frames therefore no longer fit, and the clone would reset
//! them. [`TcpPeer`] rewrites them to follow the clone's actual segments:
//!
//! - ACK numbers and SACK blocks are moved by the difference between the
//!   clone's and the recording's initial sequence numbers, and never
//!   acknowledge what the clone has not sent; the timestamp echo (TSecr) is
//!   the clone's latest TSval on that connection; the guest port is the
//!   clone's; IPv4 and TCP checksums are recomputed.
//! - A recorded frame that in the recording came after guest segments of the
//!   same connection is held until the clone has sent as far
//!   ([`Next::WaitForClone`], bounded by [`PeerConfig::wait_timeout`]), and a
//!   data frame is held while it does not fit the clone's receive window.
//!   While a frame is held, the clone's unacknowledged bytes get a delayed
//!   ACK ([`Next::Ack`], after [`PeerConfig::delayed_ack`]).
//! - ARP requests and IPv6 neighbour solicitations of the clone for
//!   addresses seen in the recording are answered with the recorded MAC.
//! - Where the clone departs from the recording, the peer stays consistent:
//!   it acknowledges retransmissions and bytes the recording will never
//!   acknowledge, never resets, and reports the divergence per connection
//!   (the guest-to-peer payload byte streams are compared).
//! - Connections with no SYN in the recording (open at the snapshot) replay
//!   with their recorded numbers. Frames other than TCP pass unchanged.
//!
//! The module does no I/O: the caller moves frames between it and the
//! clone's NIC and passes the time in. See `docs/replay-network.md`.

mod packet;
mod peer;
mod report;
mod stream;

#[cfg(test)]
mod tests;

pub use packet::Mac;
pub use peer::{Action, Direction, InjectReason, Next, PeerConfig, RecordedFrame, TcpPeer};
pub use report::{Divergence, FlowId, FlowReport, FlowStats, Report, Setup, Unexpected};

/// Errors of the network peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    /// Recorded frames must come in strictly increasing `seq` order.
    #[error("recorded frames out of order: seq {next} after {previous}")]
    OutOfOrder { previous: u64, next: u64 },
}
