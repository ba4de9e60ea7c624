//! The recorded peer: a state machine that turns recorded inbound frames into
//! frames the clone accepts, paced by the clone's own segments.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::packet::{self, Mac, Packet, TcpSeg, TcpSpec, ACK, RST, SYN};
use super::report::{Divergence, FlowId, FlowReport, FlowStats, Report, Setup, Unexpected};
use super::stream::Stream;
use super::NetError;

/// Which way a recorded frame crossed the guest's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received by the guest (from the peer): these are replayed.
    ToGuest,
    /// Sent by the guest: these are what the clone is expected to send.
    FromGuest,
}

/// One recorded Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFrame {
    /// The event's per-instance `seq`.
    pub seq: u64,
    pub direction: Direction,
    pub data: Vec<u8>,
}

impl RecordedFrame {
    /// The frame of a recorded `NetFrame` event (`Rx`: to the guest, `Tx`:
    /// from it); `None` for other events. A guest with several NICs needs
    /// one [`TcpPeer`] per NIC: filter by the event's `device` first.
    pub fn from_event(event: &vmr_proto::Event) -> Option<Self> {
        let vmr_proto::Payload::Net(net) = &event.payload else {
            return None;
        };
        Some(RecordedFrame {
            seq: event.seq,
            direction: match net.direction {
                vmr_proto::Direction::Rx => Direction::ToGuest,
                vmr_proto::Direction::Tx => Direction::FromGuest,
            },
            data: net.frame.clone(),
        })
    }
}

/// Settings of a [`TcpPeer`].
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The guest's MAC address. When set, frames of the clone from another
    /// source MAC are ignored.
    pub guest_mac: Option<Mac>,
    /// The guest's own addresses (the peer never answers ARP or neighbour
    /// solicitations for them). Addresses the recorded guest sent from are
    /// added automatically.
    pub guest_ips: Vec<IpAddr>,
    /// How long a recorded frame is held waiting for the clone's
    /// corresponding segment (or window) before it is injected anyway.
    pub wait_timeout: Duration,
    /// Bytes of each side shown in a divergence.
    pub snippet_len: usize,
    /// While a recorded frame waits for the clone, bytes the clone has sent
    /// and the peer not yet acknowledged are acknowledged after this long,
    /// as a receiver's delayed ACK would (a clone held back by Nagle or its
    /// congestion window then goes on).
    pub delayed_ack: Duration,
    /// Addresses to answer ARP and neighbour solicitations for besides those
    /// learned from the recording (e.g. a gateway whose ARP exchange is not
    /// in the recording), with their MAC; they take precedence.
    pub neighbors: Vec<(IpAddr, Mac)>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            guest_mac: None,
            guest_ips: Vec::new(),
            wait_timeout: Duration::from_secs(1),
            snippet_len: 64,
            delayed_ack: Duration::from_millis(40),
            neighbors: Vec::new(),
        }
    }
}

impl PeerConfig {
    /// Defaults for a guest with this MAC address.
    pub fn new(guest_mac: Mac) -> Self {
        Self {
            guest_mac: Some(guest_mac),
            ..Self::default()
        }
    }
}

/// What [`TcpPeer::next_inbound`] asks of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this frame into the clone's NIC; it is the recorded frame with
    /// event `seq` `original_seq`, rewritten.
    Inject { frame: Vec<u8>, original_seq: u64 },
    /// The next recorded frame waits for the clone: feed the clone's frames
    /// to [`TcpPeer::on_clone_output`] and ask again when one arrived or at
    /// `until`, whichever is first. Asking at or after `until` injects the
    /// frame anyway (counted in [`FlowStats::waits_timed_out`]).
    WaitForClone { flow: FlowId, until: Instant },
    /// Send this ACK, made up by the peer, into the clone's NIC now: the
    /// next recorded frame is waiting and the clone's bytes on `flow` have
    /// gone unacknowledged for [`PeerConfig::delayed_ack`].
    Ack { flow: FlowId, frame: Vec<u8> },
    /// Every recorded inbound frame has been handed out.
    Done,
}

/// Why the peer made up a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectReason {
    ArpReply,
    NeighborAdvert,
    /// An ACK for a retransmission or for bytes the recording never
    /// acknowledges.
    Ack,
    /// A recorded frame sent again: the clone's duplicate ACKs show it
    /// did not get it.
    Retransmission,
}

/// What [`TcpPeer::on_clone_output`] asks of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this frame into the clone's NIC now.
    Inject {
        frame: Vec<u8>,
        reason: InjectReason,
    },
    /// A divergence was found (it is also kept for [`TcpPeer::report`]).
    Diverged {
        flow: FlowId,
        divergence: Divergence,
    },
    /// The clone sent a segment of a connection the recording does not have
    /// (reported once per pair of ends; the peer does not answer it).
    Unexpected {
        guest: SocketAddr,
        peer: SocketAddr,
        connect: bool,
    },
}

type Key = (IpAddr, u16, IpAddr, u16);

/// Sequence offset of `seq` from `base`, valid within ±2 GiB.
fn off(seq: u32, base: u32) -> i64 {
    i64::from(seq.wrapping_sub(base) as i32)
}

fn at(base: u32, off: i64) -> u32 {
    base.wrapping_add(off as u32)
}

#[derive(Debug)]
struct InTcp {
    flow: usize,
    /// The recorded guest's sequence progress (offset past its last
    /// sequence number) before this frame; the clone must reach it first.
    wait: Option<i64>,
    /// The recorded ACK as an offset in the guest's sequence space.
    ack_off: Option<i64>,
}

#[derive(Debug)]
struct Inbound {
    seq: u64,
    frame: Vec<u8>,
    tcp: Option<InTcp>,
}

#[derive(Debug)]
struct Flow {
    setup: Setup,
    guest_ip: IpAddr,
    guest_port: u16,
    peer_ip: IpAddr,
    peer_port: u16,
    /// Offset of the first payload byte: 1 after a SYN, 0 for open flows.
    origin: i64,

    // The recording.
    rec_base: Option<u32>,
    rec_syn_seq: Option<u32>,
    rec_stream: Stream,
    rec_fin: Option<i64>,
    rec_rst: bool,
    rec_sent: Option<i64>,
    rec_peer_wscale: bool,
    /// Max ACK offset over inbound frames `i..` (index = frames handed out).
    ack_suffix: Vec<i64>,
    /// Whether one of the inbound frames `i..` acknowledges everything the
    /// recorded guest had sent before it (as for `ack_suffix`; during the
    /// build: per frame).
    full_ack_suffix: Vec<bool>,
    peer_bytes: u64,

    // The clone.
    clone_port: Option<u16>,
    clone_base: Option<u32>,
    clone_nxt: Option<i64>,
    clone_fin: Option<i64>,
    clone_rst: bool,
    clone_tsval: Option<u32>,
    clone_ack: Option<u32>,
    clone_wscale: Option<u8>,
    clone_window: Option<u64>,
    /// The clone's source and destination MAC addresses.
    clone_macs: Option<(Mac, Mac)>,
    clone_stream: Stream,
    compared: usize,
    payload_diverged: bool,
    extra_reported: bool,
    fin_reported: bool,

    // What the peer has sent the clone.
    last_ack_sent: Option<i64>,
    peer_base: Option<u32>,
    peer_nxt: Option<u32>,
    peer_tsval: Option<u32>,
    peer_window: u16,
    peer_rst: bool,
    /// Injected frames with payload or FIN: (first, end sequence number in
    /// the peer's space, index of the recorded frame).
    sent_frames: Vec<(u32, u32, usize)>,
    /// Index of the recorded SYN or SYN-ACK of the peer once injected.
    peer_syn_idx: Option<usize>,
    /// The clone's last window and how many duplicate ACKs it sent in a row.
    clone_last_window: Option<u16>,
    dup_acks: u32,
    handed_out: usize,
    no_setup_reported: bool,
    /// The clone's progress when a wait on this connection last timed out:
    /// until the clone sends more, later frames do not wait again.
    stalled_at: Option<i64>,

    divergences: Vec<Divergence>,
    stats: FlowStats,
}

impl Flow {
    fn new(setup: Setup, key: Key) -> Self {
        Flow {
            setup,
            guest_ip: key.0,
            guest_port: key.1,
            peer_ip: key.2,
            peer_port: key.3,
            origin: if setup == Setup::OpenAtSnapshot { 0 } else { 1 },
            rec_base: None,
            rec_syn_seq: None,
            rec_stream: Stream::default(),
            rec_fin: None,
            rec_rst: false,
            rec_sent: None,
            rec_peer_wscale: false,
            ack_suffix: Vec::new(),
            full_ack_suffix: Vec::new(),
            peer_bytes: 0,
            clone_port: None,
            clone_base: None,
            clone_nxt: None,
            clone_fin: None,
            clone_rst: false,
            clone_tsval: None,
            clone_ack: None,
            clone_wscale: None,
            clone_window: None,
            clone_macs: None,
            clone_stream: Stream::default(),
            compared: 0,
            payload_diverged: false,
            extra_reported: false,
            fin_reported: false,
            last_ack_sent: None,
            peer_base: None,
            peer_nxt: None,
            peer_tsval: None,
            peer_window: 0,
            peer_rst: false,
            sent_frames: Vec::new(),
            peer_syn_idx: None,
            clone_last_window: None,
            dup_acks: 0,
            handed_out: 0,
            no_setup_reported: false,
            stalled_at: None,
            divergences: Vec::new(),
            stats: FlowStats::default(),
        }
    }

    /// The clone reset the connection or never set it up: the rest of the
    /// recorded connection is dropped.
    fn dead(&self) -> bool {
        self.clone_rst || self.no_setup_reported
    }

    /// Whether the clone has sent what the recorded guest had sent by
    /// sequence offset `w`.
    fn clone_reached(&self, w: i64) -> bool {
        if self.clone_rst || self.clone_fin.is_some() {
            return true;
        }
        let Some(n) = self.clone_nxt else {
            return false;
        };
        if self.rec_fin.is_some_and(|f| w == f + 1) {
            return false;
        }
        n >= w
    }

    /// Whether a recorded frame not yet handed out will acknowledge the
    /// clone's sequence space up to offset `end` (see `map_ack` and the
    /// rewrite after a divergence).
    fn recording_will_ack(&self, end: i64) -> bool {
        let i = self.handed_out;
        let max = self.ack_suffix.get(i).copied().unwrap_or(i64::MIN);
        let acks_fin = self.rec_fin.is_some_and(|f| max > f);
        let differ = self.payload_diverged || self.extra_reported;
        let full = self.full_ack_suffix.get(i).copied().unwrap_or(false);
        max >= end || acks_fin || (differ && full)
    }

    /// Maps a recorded ACK offset to the clone's sequence space.
    fn map_ack(&self, mut o: i64) -> i64 {
        if let (Some(rf), Some(cf)) = (self.rec_fin, self.clone_fin) {
            if o == rf + 1 {
                o = cf + 1;
            }
        }
        if let Some(n) = self.clone_nxt {
            o = o.min(n);
        }
        if let Some(l) = self.last_ack_sent {
            o = o.max(l);
        }
        o
    }

    /// A pure ACK of the clone's bytes up to sequence offset `ack_off`,
    /// counted as made up; `None` before the peer has a sequence number or
    /// after it reset the connection.
    fn make_ack(&mut self, ack_off: i64) -> Option<Vec<u8>> {
        let (Some(pseq), Some(cbase), Some(port), Some((clone_mac, peer_mac))) = (
            self.peer_nxt,
            self.clone_base,
            self.clone_port,
            self.clone_macs,
        ) else {
            return None;
        };
        if self.peer_rst {
            return None;
        }
        self.last_ack_sent = Some(ack_off);
        self.stats.acks_generated += 1;
        let options = match (self.peer_tsval, self.clone_tsval) {
            (Some(tv), Some(ecr)) => packet::ts_option(tv, ecr),
            _ => Vec::new(),
        };
        Some(packet::build_tcp(&TcpSpec {
            eth_src: peer_mac,
            eth_dst: clone_mac,
            src: self.peer_ip,
            dst: self.guest_ip,
            src_port: self.peer_port,
            dst_port: port,
            seq: pseq,
            ack: at(cbase, ack_off),
            flags: ACK,
            window: self.peer_window,
            options,
            payload: &[],
        }))
    }

    fn ends(&self) -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::new(self.guest_ip, self.guest_port),
            SocketAddr::new(self.peer_ip, self.peer_port),
        )
    }

    /// Compares the clone's contiguous bytes with the recording's.
    fn compare(&mut self, snippet: usize) -> Option<Divergence> {
        if self.payload_diverged {
            return None;
        }
        let clone = self.clone_stream.contiguous();
        let rec = self.rec_stream.contiguous();
        let common = clone.len().min(rec.len());
        if self.compared < common {
            if let Some(i) = (self.compared..common).find(|&i| clone[i] != rec[i]) {
                let d = Divergence::PayloadDiffers {
                    offset: i as u64,
                    recorded: rec[i..rec.len().min(i + snippet)].to_vec(),
                    clone: clone[i..clone.len().min(i + snippet)].to_vec(),
                };
                self.payload_diverged = true;
                return Some(d);
            }
            self.compared = common;
        }
        if clone.len() > rec.len() && !self.extra_reported {
            self.extra_reported = true;
            let r = rec.len();
            return Some(Divergence::ExtraBytes {
                offset: r as u64,
                clone: clone[r..clone.len().min(r + snippet)].to_vec(),
            });
        }
        None
    }
}

/// The recorded peer of every TCP connection in a recording.
///
/// A pure state machine: it does no I/O and reads no clock; the caller
/// passes the time in and moves frames between it and the clone's NIC.
///
/// ```
/// use std::time::Instant;
/// use replayer::net::{Next, PeerConfig, TcpPeer};
///
/// let mut peer = TcpPeer::new(PeerConfig::default(), Vec::new()).expect("no frames is valid");
/// assert_eq!(peer.next_inbound(Instant::now()), Next::Done);
/// assert!(peer.report().is_clean());
/// ```
#[derive(Debug)]
pub struct TcpPeer {
    config: PeerConfig,
    inbound: Vec<Inbound>,
    cursor: usize,
    deadline: Option<Instant>,
    wait_started: Option<Instant>,
    hold_counted: bool,
    flows: Vec<Flow>,
    /// The clone's 4-tuples (guest ip, clone's guest port, peer ip, peer port).
    clone_map: HashMap<Key, usize>,
    peer_macs: HashMap<IpAddr, Mac>,
    routers: HashSet<IpAddr>,
    guest_ips: HashSet<IpAddr>,
    unexpected: Vec<Unexpected>,
    unexpected_index: HashMap<Key, usize>,
    arp_replies: u64,
    neighbor_adverts: u64,
    unanswered_lookups: u64,
}

impl TcpPeer {
    /// Builds the peer from the recorded frames of one instance, in `seq`
    /// order, both directions.
    pub fn new(config: PeerConfig, frames: Vec<RecordedFrame>) -> Result<Self, NetError> {
        let mut peer = TcpPeer {
            guest_ips: config.guest_ips.iter().copied().collect(),
            config,
            inbound: Vec::new(),
            cursor: 0,
            deadline: None,
            wait_started: None,
            hold_counted: false,
            flows: Vec::new(),
            clone_map: HashMap::new(),
            peer_macs: HashMap::new(),
            routers: HashSet::new(),
            unexpected: Vec::new(),
            unexpected_index: HashMap::new(),
            arp_replies: 0,
            neighbor_adverts: 0,
            unanswered_lookups: 0,
        };
        let mut current: HashMap<Key, usize> = HashMap::new();
        let mut prev: Option<u64> = None;
        for rf in frames {
            if let Some(p) = prev {
                if rf.seq <= p {
                    return Err(NetError::OutOfOrder {
                        previous: p,
                        next: rf.seq,
                    });
                }
            }
            prev = Some(rf.seq);
            let pkt = packet::parse(&rf.data);
            peer.learn(&pkt, rf.direction);
            let Packet::Tcp(seg) = pkt else {
                if rf.direction == Direction::ToGuest {
                    peer.inbound.push(Inbound {
                        seq: rf.seq,
                        frame: rf.data,
                        tcp: None,
                    });
                }
                continue;
            };
            let key = match rf.direction {
                Direction::ToGuest => (seg.dst, seg.dst_port, seg.src, seg.src_port),
                Direction::FromGuest => (seg.src, seg.src_port, seg.dst, seg.dst_port),
            };
            let syn_only = seg.has(SYN) && !seg.has(ACK);
            let existing = current
                .get(&key)
                .copied()
                .filter(|&f| !syn_only || peer.flows[f].rec_syn_seq == Some(seg.seq));
            let fid = match existing {
                Some(f) => f,
                None => {
                    let setup = match (syn_only, rf.direction) {
                        (false, _) => Setup::OpenAtSnapshot,
                        (true, Direction::ToGuest) => Setup::PeerInitiated,
                        (true, Direction::FromGuest) => Setup::GuestInitiated,
                    };
                    peer.flows.push(Flow::new(setup, key));
                    let f = peer.flows.len() - 1;
                    current.insert(key, f);
                    f
                }
            };
            let fl = &mut peer.flows[fid];
            if syn_only {
                fl.rec_syn_seq = Some(seg.seq);
            }
            match rf.direction {
                Direction::FromGuest => {
                    if seg.has(SYN) && fl.rec_base.is_none() {
                        fl.rec_base = Some(seg.seq);
                    }
                    let base = *fl.rec_base.get_or_insert(seg.seq);
                    let o = off(seg.seq, base);
                    let data_off = o + i64::from(seg.has(SYN));
                    fl.rec_stream
                        .insert(data_off - fl.origin, seg.payload(&rf.data));
                    if seg.has(packet::FIN) {
                        fl.rec_fin = Some(data_off + i64::from(seg.payload_len()));
                    }
                    if seg.has(RST) {
                        fl.rec_rst = true;
                    }
                    let end = o + i64::from(seg.seq_len());
                    fl.rec_sent = Some(fl.rec_sent.map_or(end, |s| s.max(end)));
                }
                Direction::ToGuest => {
                    if seg.has(SYN) {
                        fl.rec_peer_wscale = seg.wscale.is_some();
                    }
                    let ack_off = if seg.has(ACK) {
                        let base = *fl.rec_base.get_or_insert(if fl.origin == 0 {
                            seg.ack
                        } else {
                            seg.ack.wrapping_sub(1)
                        });
                        Some(off(seg.ack, base))
                    } else {
                        None
                    };
                    fl.peer_bytes += u64::from(seg.payload_len());
                    fl.ack_suffix.push(ack_off.unwrap_or(i64::MIN));
                    let wait = fl.rec_sent;
                    fl.full_ack_suffix
                        .push(matches!((ack_off, wait), (Some(a), Some(w)) if a >= w));
                    peer.inbound.push(Inbound {
                        seq: rf.seq,
                        frame: rf.data,
                        tcp: Some(InTcp {
                            flow: fid,
                            wait,
                            ack_off,
                        }),
                    });
                }
            }
        }
        for (i, fl) in peer.flows.iter_mut().enumerate() {
            // Suffix maxima of the recorded ACK offsets.
            let mut m = i64::MIN;
            let mut suffix = vec![m; fl.ack_suffix.len() + 1];
            for j in (0..fl.ack_suffix.len()).rev() {
                m = m.max(fl.ack_suffix[j]);
                suffix[j] = m;
            }
            fl.ack_suffix = suffix;
            let mut any = false;
            let mut full = vec![false; fl.full_ack_suffix.len() + 1];
            for j in (0..fl.full_ack_suffix.len()).rev() {
                any |= fl.full_ack_suffix[j];
                full[j] = any;
            }
            fl.full_ack_suffix = full;
            match fl.setup {
                Setup::OpenAtSnapshot => {
                    fl.clone_port = Some(fl.guest_port);
                    fl.clone_base = fl.rec_base;
                    peer.clone_map
                        .insert((fl.guest_ip, fl.guest_port, fl.peer_ip, fl.peer_port), i);
                }
                Setup::PeerInitiated => fl.clone_port = Some(fl.guest_port),
                Setup::GuestInitiated => {}
            }
        }
        for &(ip, mac) in &peer.config.neighbors {
            peer.peer_macs.insert(ip, mac);
        }
        Ok(peer)
    }

    fn learn(&mut self, pkt: &Packet, dir: Direction) {
        match (pkt, dir) {
            (Packet::Tcp(s), Direction::ToGuest) => {
                self.peer_macs.entry(s.src).or_insert(s.eth_src);
            }
            (Packet::OtherIp { eth_src, src }, Direction::ToGuest) => {
                self.peer_macs.entry(*src).or_insert(*eth_src);
            }
            (Packet::Arp(a), Direction::ToGuest) if !a.sender_ip.is_unspecified() => {
                self.peer_macs.insert(IpAddr::V4(a.sender_ip), a.sender_mac);
            }
            (Packet::NeighborAdvert(na), Direction::ToGuest) => {
                self.peer_macs.insert(IpAddr::V6(na.target), na.eth_src);
                if na.router {
                    self.routers.insert(IpAddr::V6(na.target));
                }
            }
            (Packet::Tcp(s), Direction::FromGuest) => {
                self.guest_ips.insert(s.src);
            }
            (Packet::OtherIp { src, .. }, Direction::FromGuest) if !src.is_unspecified() => {
                self.guest_ips.insert(*src);
            }
            (Packet::Arp(a), Direction::FromGuest) if !a.sender_ip.is_unspecified() => {
                self.guest_ips.insert(IpAddr::V4(a.sender_ip));
            }
            _ => {}
        }
    }

    /// The next recorded inbound frame for the clone, rewritten to fit the
    /// clone's TCP state, or a wait for the clone, or the end.
    pub fn next_inbound(&mut self, now: Instant) -> Next {
        loop {
            let Some(inb) = self.inbound.get(self.cursor) else {
                return Next::Done;
            };
            let Some(t) = &inb.tcp else {
                let next = Next::Inject {
                    frame: inb.frame.clone(),
                    original_seq: inb.seq,
                };
                self.advance(None);
                return next;
            };
            let fid = t.flow;
            let fl = &self.flows[fid];
            if fl.dead() {
                self.flows[fid].stats.frames_skipped += 1;
                self.advance(Some(fid));
                continue;
            }
            let ready = t.wait.is_none_or(|w| fl.clone_reached(w));
            let window_ok = self.fits_window(fid, &inb.frame);
            if !(ready && window_ok) {
                let progress = fl.clone_nxt.unwrap_or(i64::MIN);
                let unacked = fl
                    .clone_nxt
                    .is_some_and(|n| fl.last_ack_sent.is_none_or(|l| n > l));
                let stalled = fl.stalled_at == Some(progress);
                let deadline = *self.deadline.get_or_insert(now + self.config.wait_timeout);
                let started = *self.wait_started.get_or_insert(now);
                if now < deadline && !stalled {
                    if !window_ok && ready && !self.hold_counted {
                        self.hold_counted = true;
                        self.flows[fid].stats.window_holds += 1;
                    }
                    let ack_at = started + self.config.delayed_ack;
                    if unacked && now >= ack_at {
                        if let Some(frame) = self.make_ack(fid) {
                            return Next::Ack {
                                flow: FlowId(fid),
                                frame,
                            };
                        }
                    }
                    let until = if unacked {
                        deadline.min(ack_at)
                    } else {
                        deadline
                    };
                    return Next::WaitForClone {
                        flow: FlowId(fid),
                        until,
                    };
                }
                let fl = &mut self.flows[fid];
                fl.stats.waits_timed_out += 1;
                fl.stalled_at = Some(progress);
            }
            let seq = inb.seq;
            match self.rewrite(self.cursor) {
                Some(frame) => {
                    self.flows[fid].stats.frames_injected += 1;
                    self.advance(Some(fid));
                    return Next::Inject {
                        frame,
                        original_seq: seq,
                    };
                }
                None => {
                    let fl = &mut self.flows[fid];
                    fl.stats.frames_skipped += 1;
                    if !fl.no_setup_reported {
                        fl.no_setup_reported = true;
                        fl.divergences.push(Divergence::NoSetup);
                    }
                    self.advance(Some(fid));
                }
            }
        }
    }

    /// A delayed ACK of everything the clone has sent on `fid`.
    fn make_ack(&mut self, fid: usize) -> Option<Vec<u8>> {
        let fl = &mut self.flows[fid];
        let n = fl.clone_nxt?;
        fl.make_ack(n)
    }

    fn advance(&mut self, flow: Option<usize>) {
        self.cursor += 1;
        self.deadline = None;
        self.wait_started = None;
        self.hold_counted = false;
        if let Some(f) = flow {
            self.flows[f].handed_out += 1;
        }
    }

    /// Whether a recorded data frame fits the clone's advertised window.
    fn fits_window(&self, fid: usize, frame: &[u8]) -> bool {
        let fl = &self.flows[fid];
        let (Some(ack), Some(win)) = (fl.clone_ack, fl.clone_window) else {
            return true;
        };
        let Packet::Tcp(seg) = packet::parse(frame) else {
            return true;
        };
        if seg.payload_len() == 0 || seg.has(SYN) {
            return true;
        }
        let right = u64::from(ack) + win;
        let end =
            u64::from(ack) + u64::from(seg.seq.wrapping_add(seg.payload_len()).wrapping_sub(ack));
        // A segment entirely below the clone's ACK is a retransmission the
        // clone will acknowledge; it needs no room.
        off(seg.seq.wrapping_add(seg.payload_len()), ack) <= 0 || end <= right
    }

    /// The recorded frame at `idx`, rewritten; `None` when the clone never
    /// set the connection up so its sequence numbers are unknown.
    fn rewrite(&mut self, idx: usize) -> Option<Vec<u8>> {
        let inb = &self.inbound[idx];
        let t = inb.tcp.as_ref()?;
        let fid = t.flow;
        let ack_off = t.ack_off;
        let mut f = inb.frame.clone();
        let Packet::Tcp(seg) = packet::parse(&f) else {
            return Some(f);
        };
        let fl = &mut self.flows[fid];
        if let Some(cp) = fl.clone_port {
            if cp != fl.guest_port {
                packet::put16(&mut f, seg.tcp_off + 2, cp);
            }
        } else {
            return None;
        }
        if let Some(o) = ack_off {
            let (Some(cbase), Some(rbase)) = (fl.clone_base, fl.rec_base) else {
                return None;
            };
            // Once the streams differ, offsets no longer line up: a recorded
            // ACK of everything the recorded guest had sent acknowledges
            // everything the clone has sent.
            let all = (fl.payload_diverged || fl.extra_reported) && t.wait.is_some_and(|w| o >= w);
            let o = match (all, fl.clone_nxt) {
                (true, Some(n)) => fl.last_ack_sent.map_or(n, |l| l.max(n)),
                _ => fl.map_ack(o),
            };
            packet::put32(&mut f, seg.tcp_off + 8, at(cbase, o));
            fl.last_ack_sent = Some(o);
            for &b in &seg.sack_blocks {
                for edge in [b, b + 4] {
                    let mut eo = off(packet::get32(&f, edge), rbase);
                    if let Some(n) = fl.clone_nxt {
                        eo = eo.min(n);
                    }
                    packet::put32(&mut f, edge, at(cbase, eo));
                }
            }
        }
        if let Some((tsval, _, ts_at)) = seg.ts {
            if seg.has(ACK) {
                if let Some(tv) = fl.clone_tsval {
                    packet::put32(&mut f, ts_at + 4, tv);
                }
            }
            // The peer's clock never goes back, also for a frame sent again.
            let tsval = match fl.peer_tsval {
                Some(last) if off(last, tsval) > 0 => last,
                _ => tsval,
            };
            packet::put32(&mut f, ts_at, tsval);
            fl.peer_tsval = Some(tsval);
        }
        // The peer's side of the connection.
        if seg.has(SYN) {
            fl.peer_base = Some(seg.seq);
            fl.peer_syn_idx = Some(idx);
            if fl.setup == Setup::PeerInitiated {
                self.clone_map
                    .insert((fl.guest_ip, fl.guest_port, fl.peer_ip, fl.peer_port), fid);
            }
        }
        let pbase = *fl.peer_base.get_or_insert(seg.seq);
        let end = seg.seq.wrapping_add(seg.seq_len());
        if fl.peer_nxt.is_none_or(|n| off(end, pbase) > off(n, pbase)) {
            fl.peer_nxt = Some(end);
        }
        fl.peer_window = seg.window;
        if seg.has(RST) {
            fl.peer_rst = true;
        }
        let has_data = seg.payload_len() > 0 || seg.has(packet::FIN);
        if has_data && fl.sent_frames.last().is_none_or(|&(_, _, i)| i < idx) {
            fl.sent_frames.push((seg.seq, end, idx));
        }
        packet::fix_tcp_checksums(&mut f, &seg);
        Some(f)
    }

    /// Handles one frame the clone sent; returns frames to inject now and
    /// divergences found.
    pub fn on_clone_output(&mut self, frame: &[u8]) -> Vec<Action> {
        let pkt = packet::parse(frame);
        let src_mac = match &pkt {
            Packet::Tcp(s) => Some(s.eth_src),
            Packet::Arp(a) => Some(a.eth_src),
            Packet::NeighborSolicit(n) => Some(n.eth_src),
            _ => None,
        };
        if let (Some(g), Some(s)) = (self.config.guest_mac, src_mac) {
            if g != s {
                return Vec::new();
            }
        }
        match pkt {
            Packet::Arp(a) if a.op == 1 => {
                let target = IpAddr::V4(a.target_ip);
                if a.sender_ip.is_unspecified()
                    || a.sender_ip == a.target_ip
                    || self.guest_ips.contains(&target)
                {
                    return Vec::new();
                }
                match self.peer_macs.get(&target) {
                    Some(&mac) => {
                        self.arp_replies += 1;
                        vec![Action::Inject {
                            frame: packet::build_arp_reply(
                                mac,
                                a.target_ip,
                                a.sender_mac,
                                a.sender_ip,
                            ),
                            reason: InjectReason::ArpReply,
                        }]
                    }
                    None => {
                        self.unanswered_lookups += 1;
                        Vec::new()
                    }
                }
            }
            Packet::NeighborSolicit(ns) => {
                let target = IpAddr::V6(ns.target);
                if self.guest_ips.contains(&target) {
                    return Vec::new();
                }
                match self.peer_macs.get(&target) {
                    Some(&mac) => {
                        self.neighbor_adverts += 1;
                        vec![Action::Inject {
                            frame: packet::build_neighbor_advert(
                                mac,
                                ns.target,
                                ns.eth_src,
                                ns.src,
                                self.routers.contains(&target),
                            ),
                            reason: InjectReason::NeighborAdvert,
                        }]
                    }
                    None => {
                        self.unanswered_lookups += 1;
                        Vec::new()
                    }
                }
            }
            Packet::Tcp(seg) => self.clone_tcp(frame, &seg),
            _ => Vec::new(),
        }
    }

    fn unexpected(&mut self, key: Key, connect: bool) -> Vec<Action> {
        let guest = SocketAddr::new(key.0, key.1);
        let peer = SocketAddr::new(key.2, key.3);
        if let Some(&i) = self.unexpected_index.get(&key) {
            self.unexpected[i].segments += 1;
            self.unexpected[i].connect |= connect;
            return Vec::new();
        }
        self.unexpected_index.insert(key, self.unexpected.len());
        self.unexpected.push(Unexpected {
            guest,
            peer,
            connect,
            segments: 1,
        });
        vec![Action::Unexpected {
            guest,
            peer,
            connect,
        }]
    }

    fn clone_tcp(&mut self, frame: &[u8], seg: &TcpSeg) -> Vec<Action> {
        let key = (seg.src, seg.src_port, seg.dst, seg.dst_port);
        let syn_only = seg.has(SYN) && !seg.has(ACK);
        let mut fid = self.clone_map.get(&key).copied();
        if syn_only && fid.is_none_or(|f| self.flows[f].clone_base != Some(seg.seq)) {
            // A new connection of the clone: the first recorded
            // guest-initiated connection to the same peer not yet taken.
            let cand = self.flows.iter().position(|fl| {
                fl.setup == Setup::GuestInitiated
                    && fl.clone_port.is_none()
                    && fl.guest_ip == seg.src
                    && fl.peer_ip == seg.dst
                    && fl.peer_port == seg.dst_port
            });
            let Some(f) = cand else {
                return self.unexpected(key, true);
            };
            let fl = &mut self.flows[f];
            fl.clone_port = Some(seg.src_port);
            fl.clone_base = Some(seg.seq);
            self.clone_map.insert(key, f);
            fid = Some(f);
        }
        let Some(fid) = fid else {
            return self.unexpected(key, false);
        };
        let snippet = self.config.snippet_len;
        let mut acts = Vec::new();
        let fl = &mut self.flows[fid];
        fl.clone_macs = Some((seg.eth_src, seg.eth_dst));
        if seg.has(SYN) {
            if seg.has(ACK) && fl.clone_base.is_none() {
                fl.clone_base = Some(seg.seq);
            }
            if fl.clone_base != Some(seg.seq) {
                // A SYN-ACK of another incarnation of these ends.
                return acts;
            }
            fl.clone_wscale = seg.wscale;
        }
        if seg.has(RST) {
            // Before the clone's SYN-ACK, only a reset answering the peer's
            // SYN belongs to this connection.
            let ours = fl.clone_base.is_some()
                || fl.setup == Setup::OpenAtSnapshot
                || (seg.has(ACK) && fl.peer_nxt == Some(seg.ack));
            if ours && !fl.clone_rst {
                fl.clone_rst = true;
                if !fl.rec_rst {
                    let d = Divergence::CloneReset {
                        offset: fl.clone_stream.contiguous().len() as u64,
                    };
                    fl.divergences.push(d.clone());
                    acts.push(Action::Diverged {
                        flow: FlowId(fid),
                        divergence: d,
                    });
                }
            }
            return acts;
        }
        if fl.clone_base.is_none() {
            if fl.setup != Setup::OpenAtSnapshot {
                // A segment of an earlier connection between the same ends.
                return acts;
            }
            fl.clone_base = Some(seg.seq);
        }
        let base = fl.clone_base.unwrap_or(seg.seq);
        if let Some((tsval, _, _)) = seg.ts {
            fl.clone_tsval = Some(tsval);
        }
        // A pure ACK repeating the last ACK and window while the peer has
        // unacknowledged bytes is a duplicate: the clone lacks the segment
        // starting there. The second one in a row resends it.
        let mut resend = None;
        if seg.has(ACK) && seg.seq_len() == 0 && !seg.has(RST) {
            let dup = fl.clone_ack == Some(seg.ack)
                && fl.clone_last_window == Some(seg.window)
                && fl.peer_nxt.is_some_and(|n| off(n, seg.ack) > 0);
            fl.dup_acks = if dup { fl.dup_acks + 1 } else { 0 };
            if fl.dup_acks == 2 {
                fl.dup_acks = 0;
                resend = fl
                    .sent_frames
                    .iter()
                    .rev()
                    .find(|&&(first, end, _)| off(seg.ack, first) >= 0 && off(end, seg.ack) > 0)
                    .map(|&(_, _, i)| i);
            }
        }
        if seg.has(ACK) {
            fl.clone_last_window = Some(seg.window);
            if fl.clone_ack.is_none_or(|a| off(seg.ack, a) > 0) {
                fl.clone_ack = Some(seg.ack);
            }
            let shift = match (fl.clone_wscale, fl.rec_peer_wscale, seg.has(SYN)) {
                (Some(s), true, false) => s,
                _ => 0,
            };
            if fl.setup != Setup::OpenAtSnapshot {
                fl.clone_window = Some(u64::from(seg.window) << shift);
            }
        }
        let len = i64::from(seg.seq_len());
        if len == 0 {
            if let Some(idx) = resend {
                if let Some(frame) = self.rewrite(idx) {
                    self.flows[fid].stats.peer_retransmissions += 1;
                    acts.push(Action::Inject {
                        frame,
                        reason: InjectReason::Retransmission,
                    });
                }
            }
            return acts;
        }
        let o = off(seg.seq, base);
        let end = o + len;
        let retransmission = fl.clone_nxt.is_some_and(|n| end <= n);
        if retransmission {
            fl.stats.retransmissions += 1;
        }
        if fl.clone_nxt.is_none_or(|n| end > n) {
            fl.clone_nxt = Some(end);
        }
        let data_off = o + i64::from(seg.has(SYN));
        fl.clone_stream
            .insert(data_off - fl.origin, seg.payload(frame));
        let mut found = Vec::new();
        if let Some(d) = fl.compare(snippet) {
            found.push(d);
        }
        if seg.has(packet::FIN) {
            let fin = data_off + i64::from(seg.payload_len());
            fl.clone_fin = Some(fin);
            if fl.rec_fin != Some(fin) && !fl.fin_reported {
                fl.fin_reported = true;
                found.push(Divergence::FinDiffers {
                    recorded: fl.rec_fin.map(|f| (f - fl.origin) as u64),
                    clone: Some((fin - fl.origin).max(0) as u64),
                });
            }
        }
        for d in found {
            fl.divergences.push(d.clone());
            acts.push(Action::Diverged {
                flow: FlowId(fid),
                divergence: d,
            });
        }
        // A repeated SYN of a guest-initiated connection after the peer's
        // SYN-ACK went out: the SYN-ACK again.
        if syn_only && retransmission {
            if let Some(idx) = fl.peer_syn_idx {
                if let Some(frame) = self.rewrite(idx) {
                    self.flows[fid].stats.peer_retransmissions += 1;
                    acts.push(Action::Inject {
                        frame,
                        reason: InjectReason::Retransmission,
                    });
                }
            }
            return acts;
        }
        // ACK what the recording will never acknowledge, and repeats.
        if (retransmission || !fl.recording_will_ack(end)) && !fl.peer_rst {
            let ack_off = fl.last_ack_sent.map_or(end, |l| l.max(end));
            if let Some(frame) = fl.make_ack(ack_off) {
                acts.push(Action::Inject {
                    frame,
                    reason: InjectReason::Ack,
                });
            }
        }
        acts
    }

    /// The report so far. The end-of-replay checks (missing bytes, missing
    /// close or reset, unacknowledged peer bytes, no set-up) describe the
    /// state at the time of the call, so call it once replay is over.
    pub fn report(&self) -> Report {
        let snippet = self.config.snippet_len;
        let flows = self
            .flows
            .iter()
            .enumerate()
            .map(|(i, fl)| {
                let mut divergences = fl.divergences.clone();
                let set_up = fl.setup == Setup::OpenAtSnapshot
                    || (fl.clone_base.is_some() && fl.clone_port.is_some());
                if !set_up && !fl.no_setup_reported {
                    divergences.push(Divergence::NoSetup);
                }
                let rec = fl.rec_stream.contiguous();
                let clone = fl.clone_stream.contiguous();
                if set_up && !fl.payload_diverged && clone.len() < rec.len() {
                    let c = clone.len();
                    divergences.push(Divergence::MissingBytes {
                        offset: c as u64,
                        recorded: rec[c..rec.len().min(c + snippet)].to_vec(),
                    });
                }
                if set_up && fl.rec_fin.is_some() && fl.clone_fin.is_none() && !fl.clone_rst {
                    divergences.push(Divergence::FinDiffers {
                        recorded: fl.rec_fin.map(|f| (f - fl.origin) as u64),
                        clone: None,
                    });
                }
                if fl.rec_rst && !fl.clone_rst {
                    divergences.push(Divergence::MissingReset);
                }
                if let (Some(pb), Some(pn)) = (fl.peer_base, fl.peer_nxt) {
                    if set_up && !fl.peer_rst && !fl.clone_rst {
                        let sent = off(pn, pb).max(0) as u64;
                        let acked = fl.clone_ack.map_or(0, |a| off(a, pb).max(0) as u64);
                        if acked < sent {
                            divergences.push(Divergence::PeerBytesUnacknowledged {
                                sent,
                                acknowledged: acked,
                            });
                        }
                    }
                }
                let (guest, peer) = fl.ends();
                FlowReport {
                    flow: FlowId(i),
                    setup: fl.setup,
                    guest,
                    peer,
                    clone_guest_port: fl.clone_port.filter(|_| set_up),
                    recorded_guest_bytes: rec.len() as u64,
                    clone_guest_bytes: clone.len() as u64,
                    peer_bytes: fl.peer_bytes,
                    divergences,
                    stats: fl.stats.clone(),
                }
            })
            .collect();
        Report {
            flows,
            unexpected: self.unexpected.clone(),
            arp_replies: self.arp_replies,
            neighbor_adverts: self.neighbor_adverts,
            unanswered_lookups: self.unanswered_lookups,
        }
    }

    /// Recorded inbound frames not yet handed out.
    pub fn pending(&self) -> usize {
        self.inbound.len() - self.cursor
    }

    /// The number of recorded TCP connections.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}
