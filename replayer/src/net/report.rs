//! The divergence report of a network replay.

use std::fmt;
use std::net::SocketAddr;

/// A recorded TCP connection, numbered in the order of its first recorded
/// frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub usize);

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "flow {}", self.0)
    }
}

/// How a recorded connection started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// The peer sent the SYN (a client connecting to the guest's service).
    PeerInitiated,
    /// The guest sent the SYN (the guest connecting out).
    GuestInitiated,
    /// No SYN in the recording: the connection was open at the snapshot, so
    /// the clone has the same sequence numbers and it replays as recorded.
    OpenAtSnapshot,
}

/// One difference between what the recording's guest did on a connection
/// and what the clone does. Offsets are positions in the guest-to-peer
/// payload byte stream (0 is the first byte after the SYN; for connections
/// open at the snapshot, the first byte of the recording).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Divergence {
    /// The clone sent other bytes than the recording's guest at `offset`;
    /// both sides from there (at most the report's snippet length).
    PayloadDiffers {
        offset: u64,
        recorded: Vec<u8>,
        clone: Vec<u8>,
    },
    /// The clone sent bytes past the end of what the recording's guest sent.
    ExtraBytes { offset: u64, clone: Vec<u8> },
    /// The clone did not send bytes the recording's guest sent (checked by
    /// [`crate::net::TcpPeer::report`], so meaningful once replay is over).
    MissingBytes { offset: u64, recorded: Vec<u8> },
    /// The clone reset the connection; the recording's guest did not.
    CloneReset { offset: u64 },
    /// The recording's guest reset the connection; the clone did not.
    MissingReset,
    /// The clone closed (FIN) at another offset than the recording's guest,
    /// or only one of them closed.
    FinDiffers {
        recorded: Option<u64>,
        clone: Option<u64>,
    },
    /// The clone never answered the connection set-up (peer-initiated: no
    /// SYN-ACK; guest-initiated: no SYN).
    NoSetup,
    /// The clone did not acknowledge all the bytes the peer sent it.
    PeerBytesUnacknowledged { sent: u64, acknowledged: u64 },
}

fn escaped(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Divergence::PayloadDiffers {
                offset,
                recorded,
                clone,
            } => write!(
                f,
                "payload differs at byte {offset}: recorded \"{}\", clone \"{}\"",
                escaped(recorded),
                escaped(clone)
            ),
            Divergence::ExtraBytes { offset, clone } => write!(
                f,
                "clone sent bytes past the recorded end at byte {offset}: \"{}\"",
                escaped(clone)
            ),
            Divergence::MissingBytes { offset, recorded } => write!(
                f,
                "clone did not send the recorded bytes from byte {offset}: \"{}\"",
                escaped(recorded)
            ),
            Divergence::CloneReset { offset } => {
                write!(f, "clone reset the connection after byte {offset}")
            }
            Divergence::MissingReset => {
                f.write_str("recorded guest reset the connection, the clone did not")
            }
            Divergence::FinDiffers { recorded, clone } => write!(
                f,
                "close differs: recorded FIN after {}, clone FIN after {}",
                opt(recorded),
                opt(clone)
            ),
            Divergence::NoSetup => f.write_str("clone never took part in the connection set-up"),
            Divergence::PeerBytesUnacknowledged { sent, acknowledged } => write!(
                f,
                "clone acknowledged {acknowledged} of the {sent} bytes the peer sent"
            ),
        }
    }
}

fn opt(v: &Option<u64>) -> String {
    v.map_or_else(|| "none".to_string(), |v| format!("byte {v}"))
}

/// Counters of what the peer did on one connection; none of them is a
/// divergence by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Recorded frames injected.
    pub frames_injected: u64,
    /// Recorded frames dropped because the clone had reset the connection
    /// or never set it up.
    pub frames_skipped: u64,
    /// ACKs the peer made up (for retransmissions and for bytes the
    /// recording never acknowledges).
    pub acks_generated: u64,
    /// Segments of the clone that repeated sequence space it had sent.
    pub retransmissions: u64,
    /// Recorded frames injected after the wait for the clone timed out.
    pub waits_timed_out: u64,
    /// Times a recorded data frame was held because it did not fit the
    /// clone's advertised receive window.
    pub window_holds: u64,
    /// Recorded frames sent again after the clone's duplicate ACKs.
    pub peer_retransmissions: u64,
}

/// What happened on one recorded connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowReport {
    pub flow: FlowId,
    pub setup: Setup,
    /// The guest's end as recorded.
    pub guest: SocketAddr,
    /// The peer's end.
    pub peer: SocketAddr,
    /// The guest port the clone used (differs from `guest` when a
    /// guest-initiated connection got another ephemeral port).
    pub clone_guest_port: Option<u16>,
    /// Guest-to-peer payload bytes in the recording.
    pub recorded_guest_bytes: u64,
    /// Guest-to-peer payload bytes the clone sent (contiguous from the start).
    pub clone_guest_bytes: u64,
    /// Peer-to-guest payload bytes the recording holds.
    pub peer_bytes: u64,
    /// Differences, in the order they were found: the first one is the first
    /// divergence of the connection.
    pub divergences: Vec<Divergence>,
    pub stats: FlowStats,
}

/// A segment of the clone that belongs to no recorded connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unexpected {
    pub guest: SocketAddr,
    pub peer: SocketAddr,
    /// True when it was a connection attempt (SYN).
    pub connect: bool,
    /// Segments seen for this pair of ends.
    pub segments: u64,
}

/// The report of a network replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub flows: Vec<FlowReport>,
    /// Traffic of the clone on connections the recording does not have.
    pub unexpected: Vec<Unexpected>,
    /// ARP requests of the clone the peer answered.
    pub arp_replies: u64,
    /// IPv6 neighbour solicitations of the clone the peer answered.
    pub neighbor_adverts: u64,
    /// ARP requests and neighbour solicitations for addresses the recording
    /// does not know (left unanswered).
    pub unanswered_lookups: u64,
}

impl Report {
    /// Every divergence, with the connection it happened on, in flow order.
    pub fn divergences(&self) -> Vec<(&FlowReport, &Divergence)> {
        self.flows
            .iter()
            .flat_map(|f| f.divergences.iter().map(move |d| (f, d)))
            .collect()
    }

    /// True when no connection diverged and the clone sent nothing unexpected.
    pub fn is_clean(&self) -> bool {
        self.unexpected.is_empty() && self.flows.iter().all(|f| f.divergences.is_empty())
    }

    /// The report of the connection between these ends (as recorded).
    pub fn flow(&self, guest: SocketAddr, peer: SocketAddr) -> Option<&FlowReport> {
        self.flows
            .iter()
            .find(|f| f.guest == guest && f.peer == peer)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fl in &self.flows {
            writeln!(
                f,
                "{} {:?} guest {} peer {}: guest bytes recorded {} clone {}, peer bytes {}",
                fl.flow,
                fl.setup,
                fl.guest,
                fl.peer,
                fl.recorded_guest_bytes,
                fl.clone_guest_bytes,
                fl.peer_bytes
            )?;
            let st = &fl.stats;
            writeln!(
                f,
                "  clone guest port {}, injected {}, skipped {}, ACKs made {}, retransmissions {}, waits timed out {}, window holds {}, resent {}",
                fl.clone_guest_port.map_or_else(|| "none".to_string(), |p| p.to_string()),
                st.frames_injected,
                st.frames_skipped,
                st.acks_generated,
                st.retransmissions,
                st.waits_timed_out,
                st.window_holds,
                st.peer_retransmissions
            )?;
            for d in &fl.divergences {
                writeln!(f, "  {d}")?;
            }
        }
        writeln!(
            f,
            "ARP replies {}, neighbour advertisements {}, unanswered look-ups {}",
            self.arp_replies, self.neighbor_adverts, self.unanswered_lookups
        )?;
        for u in &self.unexpected {
            writeln!(
                f,
                "unexpected {} guest {} peer {} ({} segments)",
                if u.connect { "connection" } else { "traffic" },
                u.guest,
                u.peer,
                u.segments
            )?;
        }
        Ok(())
    }
}
