//! Unit tests of the recorded peer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::packet::{
    self, build_tcp, parse, tcp_checksums_ok, Packet, TcpSeg, TcpSpec, ACK, FIN, PSH, RST, SYN,
};
use super::*;

const GM: Mac = [0x52, 0x54, 0, 0, 0, 2];
const PM: Mac = [0x52, 0x54, 0, 0, 0, 1];
const G: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const P: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn cfg() -> PeerConfig {
    PeerConfig {
        guest_mac: Some(GM),
        guest_ips: vec![IpAddr::V4(G)],
        wait_timeout: Duration::from_millis(500),
        snippet_len: 16,
        delayed_ack: Duration::from_millis(100),
        neighbors: Vec::new(),
    }
}

/// A TCP frame between the peer P and the guest G.
#[allow(clippy::too_many_arguments)]
fn seg(
    dir: Direction,
    gport: u16,
    pport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    ts: Option<(u32, u32)>,
    payload: &[u8],
) -> Vec<u8> {
    let options = ts.map(|(v, e)| packet::ts_option(v, e)).unwrap_or_default();
    let (eth_src, eth_dst, src, dst, sp, dp) = match dir {
        Direction::ToGuest => (PM, GM, P, G, pport, gport),
        Direction::FromGuest => (GM, PM, G, P, gport, pport),
    };
    build_tcp(&TcpSpec {
        eth_src,
        eth_dst,
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        src_port: sp,
        dst_port: dp,
        seq,
        ack,
        flags,
        window: 1000,
        options,
        payload,
    })
}

fn tcp(f: &[u8]) -> TcpSeg {
    match parse(f) {
        Packet::Tcp(s) => {
            assert!(tcp_checksums_ok(f, &s), "bad checksum in {f:02x?}");
            s
        }
        other => panic!("not TCP: {other:?}"),
    }
}

fn frames(list: Vec<(Direction, Vec<u8>)>) -> Vec<RecordedFrame> {
    list.into_iter()
        .enumerate()
        .map(|(i, (direction, data))| RecordedFrame {
            seq: 100 + i as u64,
            direction,
            data,
        })
        .collect()
}

fn inject(peer: &mut TcpPeer, now: Instant) -> Vec<u8> {
    match peer.next_inbound(now) {
        Next::Inject { frame, .. } => frame,
        other => panic!("expected an injection, got {other:?}"),
    }
}

fn expect_wait(peer: &mut TcpPeer, now: Instant) -> Instant {
    match peer.next_inbound(now) {
        Next::WaitForClone { until, .. } => until,
        other => panic!("expected a wait, got {other:?}"),
    }
}

use Direction::{FromGuest as OUT, ToGuest as IN};

/// A peer-initiated request/response: recorded guest ISN 1000, peer ISN
/// 5000, guest TSval 100.., peer TSval 9000...
fn conversation(answer: &[u8]) -> Vec<RecordedFrame> {
    let n = answer.len() as u32;
    frames(vec![
        (IN, seg(IN, 80, 4000, 5000, 0, SYN, Some((9000, 0)), b"")),
        (
            OUT,
            seg(OUT, 80, 4000, 1000, 5001, SYN | ACK, Some((100, 9000)), b""),
        ),
        (
            IN,
            seg(IN, 80, 4000, 5001, 1001, ACK, Some((9001, 100)), b""),
        ),
        (
            IN,
            seg(
                IN,
                80,
                4000,
                5001,
                1001,
                PSH | ACK,
                Some((9002, 100)),
                b"GET",
            ),
        ),
        (
            OUT,
            seg(
                OUT,
                80,
                4000,
                1001,
                5004,
                PSH | ACK,
                Some((101, 9002)),
                answer,
            ),
        ),
        (
            IN,
            seg(IN, 80, 4000, 5004, 1001 + n, ACK, Some((9003, 101)), b""),
        ),
        (
            IN,
            seg(
                IN,
                80,
                4000,
                5004,
                1001 + n,
                FIN | ACK,
                Some((9004, 101)),
                b"",
            ),
        ),
        (
            OUT,
            seg(
                OUT,
                80,
                4000,
                1001 + n,
                5005,
                FIN | ACK,
                Some((102, 9004)),
                b"",
            ),
        ),
        (
            IN,
            seg(IN, 80, 4000, 5005, 1002 + n, ACK, Some((9005, 102)), b""),
        ),
    ])
}

const CISN: u32 = 777_000;

fn clone_seg(seq: u32, ack: u32, flags: u8, tsval: u32, payload: &[u8]) -> Vec<u8> {
    seg(OUT, 80, 4000, seq, ack, flags, Some((tsval, 9999)), payload)
}

#[test]
fn peer_initiated_flow_follows_the_clones_isn_and_timestamps() {
    let rec = conversation(b"OK!");
    let mut peer = TcpPeer::new(cfg(), rec.clone()).expect("valid recording");
    let now = Instant::now();

    let syn = inject(&mut peer, now);
    assert_eq!(syn, rec[0].data, "the peer's SYN needs no rewrite");
    expect_wait(&mut peer, now);

    assert!(peer
        .on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 55_555, b""))
        .is_empty());
    let f = inject(&mut peer, now);
    let s = tcp(&f);
    assert_eq!((s.seq, s.ack), (5001, CISN + 1));
    assert_eq!(s.ts.map(|t| (t.0, t.1)), Some((9001, 55_555)));

    let f = inject(&mut peer, now);
    let s = tcp(&f);
    assert_eq!(s.payload(&f), b"GET");
    assert_eq!(s.ack, CISN + 1);
    expect_wait(&mut peer, now);

    assert!(peer
        .on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 55_556, b"OK!"))
        .is_empty());
    let s = tcp(&inject(&mut peer, now));
    assert_eq!(s.ack, CISN + 4);
    assert_eq!(s.ts.map(|t| t.1), Some(55_556));
    let s = tcp(&inject(&mut peer, now));
    assert!(s.has(FIN));
    // The last ACK acknowledges the guest's FIN: it waits for the clone's.
    expect_wait(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN + 4, 5005, FIN | ACK, 55_557, b""));
    let s = tcp(&inject(&mut peer, now));
    assert_eq!(s.ack, CISN + 5);
    assert_eq!(peer.next_inbound(now), Next::Done);

    let report = peer.report();
    assert!(report.is_clean(), "{report}");
    let fl = &report.flows[0];
    assert_eq!(fl.setup, Setup::PeerInitiated);
    assert_eq!(
        (fl.recorded_guest_bytes, fl.clone_guest_bytes, fl.peer_bytes),
        (3, 3, 3)
    );
    assert_eq!(fl.stats.frames_injected, 6);
    assert_eq!(fl.stats.acks_generated, 0);
}

#[test]
fn a_wait_that_times_out_never_acknowledges_unsent_bytes() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let t0 = Instant::now();
    inject(&mut peer, t0);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, t0);
    inject(&mut peer, t0);
    // The clone sends one byte of the three.
    peer.on_clone_output(&clone_seg(CISN + 1, 5004, ACK, 2, b"O"));
    let ack_at = expect_wait(&mut peer, t0);
    assert_eq!(ack_at, t0 + Duration::from_millis(100));
    // After the delayed-ACK time the peer acknowledges that byte itself.
    match peer.next_inbound(ack_at) {
        Next::Ack { flow, frame } => {
            assert_eq!(flow, FlowId(0));
            let s = tcp(&frame);
            assert_eq!((s.seq, s.ack, s.flags), (5004, CISN + 2, ACK));
            assert_eq!(s.ts.map(|t| (t.0, t.1)), Some((9002, 2)));
        }
        other => panic!("expected a delayed ACK, got {other:?}"),
    }
    let until = expect_wait(&mut peer, ack_at);
    assert_eq!(until, t0 + Duration::from_millis(500));
    assert_eq!(
        expect_wait(&mut peer, t0 + Duration::from_millis(200)),
        until
    );
    let s = tcp(&inject(&mut peer, until));
    assert_eq!(s.ack, CISN + 2, "clamped to what the clone sent");
    // The clone sent nothing more: the FIN and the last ACK, which wait for
    // its bytes and FIN, do not wait a second time.
    assert!(tcp(&inject(&mut peer, until)).has(FIN));
    assert_eq!(tcp(&inject(&mut peer, until)).ack, CISN + 2);
    assert_eq!(peer.next_inbound(until), Next::Done);
    let report = peer.report();
    assert_eq!(report.flows[0].stats.waits_timed_out, 3);
    assert_eq!(report.flows[0].stats.acks_generated, 1);
    assert!(
        matches!(
            report.flows[0].divergences.as_slice(),
            [
                Divergence::MissingBytes { offset: 1, .. },
                Divergence::FinDiffers {
                    recorded: Some(3),
                    clone: None
                },
                // The clone never acknowledged the peer's FIN.
                Divergence::PeerBytesUnacknowledged {
                    sent: 5,
                    acknowledged: 4
                }
            ]
        ),
        "{report}"
    );
}

#[test]
fn sack_blocks_move_with_the_isn_delta_and_stay_within_what_was_sent() {
    // NOP NOP SACK with two blocks (in the recorded guest's space).
    let mut sack = vec![1, 1, 5, 18];
    for e in [1101u32, 1201, 1301, 1401] {
        sack.extend_from_slice(&e.to_be_bytes());
    }
    let data = vec![b'x'; 500];
    let sack_ack = build_tcp(&TcpSpec {
        eth_src: PM,
        eth_dst: GM,
        src: IpAddr::V4(P),
        dst: IpAddr::V4(G),
        src_port: 4000,
        dst_port: 80,
        seq: 5001,
        ack: 1001,
        flags: ACK,
        window: 1000,
        options: sack,
        payload: b"",
    });
    let rec = frames(vec![
        (IN, seg(IN, 80, 4000, 5000, 0, SYN, None, b"")),
        (OUT, seg(OUT, 80, 4000, 1000, 5001, SYN | ACK, None, b"")),
        (IN, seg(IN, 80, 4000, 5001, 1001, ACK, None, b"")),
        (OUT, seg(OUT, 80, 4000, 1001, 5001, ACK, None, &data)),
        (IN, sack_ack),
        (IN, seg(IN, 80, 4000, 5001, 1501, ACK, None, b"")),
    ]);
    let config = PeerConfig {
        delayed_ack: Duration::from_secs(10),
        ..cfg()
    };
    let mut peer = TcpPeer::new(config, rec).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&seg(OUT, 80, 4000, CISN, 5001, SYN | ACK, None, b""));
    inject(&mut peer, now);
    // The clone has sent only 350 of the 500 bytes.
    peer.on_clone_output(&seg(OUT, 80, 4000, CISN + 1, 5001, ACK, None, &data[..350]));
    let until = expect_wait(&mut peer, now);
    let f = inject(&mut peer, until);
    let s = tcp(&f);
    assert_eq!(s.ack, CISN + 1);
    let edges: Vec<u32> = [0, 4, 8, 12]
        .iter()
        .map(|d| packet::get32(&f, s.sack_blocks[0] + d))
        .collect();
    assert_eq!(edges, vec![CISN + 101, CISN + 201, CISN + 301, CISN + 351]);
}

#[test]
fn guest_initiated_flow_gets_the_clones_port_isn_and_timestamp_echo() {
    let rec = frames(vec![
        (
            OUT,
            seg(OUT, 33_000, 5432, 2000, 0, SYN, Some((500, 0)), b""),
        ),
        (
            IN,
            seg(
                IN,
                33_000,
                5432,
                8000,
                2001,
                SYN | ACK,
                Some((7000, 500)),
                b"",
            ),
        ),
        (
            OUT,
            seg(OUT, 33_000, 5432, 2001, 8001, ACK, Some((501, 7000)), b""),
        ),
        (
            OUT,
            seg(
                OUT,
                33_000,
                5432,
                2001,
                8001,
                PSH | ACK,
                Some((501, 7000)),
                b"hello",
            ),
        ),
        (
            IN,
            seg(
                IN,
                33_000,
                5432,
                8001,
                2006,
                PSH | ACK,
                Some((7001, 501)),
                b"world",
            ),
        ),
    ]);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");
    let now = Instant::now();
    expect_wait(&mut peer, now);
    let cs = |seq, ack, flags, payload: &[u8]| {
        seg(
            OUT,
            41_000,
            5432,
            seq,
            ack,
            flags,
            Some((1234, 7000)),
            payload,
        )
    };
    assert!(peer.on_clone_output(&cs(99_000, 0, SYN, b"")).is_empty());
    let s = tcp(&inject(&mut peer, now));
    assert_eq!((s.dst_port, s.seq, s.ack), (41_000, 8000, 99_001));
    assert_eq!(s.ts.map(|t| (t.0, t.1)), Some((7000, 1234)));
    // The clone did not get it and sends its SYN again: the SYN-ACK again.
    let acts = peer.on_clone_output(&cs(99_000, 0, SYN, b""));
    let [Action::Inject {
        frame,
        reason: InjectReason::Retransmission,
    }] = acts.as_slice()
    else {
        panic!("no SYN-ACK again: {acts:?}");
    };
    let s = tcp(frame);
    assert_eq!((s.flags, s.dst_port, s.ack), (SYN | ACK, 41_000, 99_001));
    expect_wait(&mut peer, now);
    peer.on_clone_output(&cs(99_001, 8001, ACK, b""));
    expect_wait(&mut peer, now);
    peer.on_clone_output(&cs(99_001, 8001, PSH | ACK, b"hello"));
    let f = inject(&mut peer, now);
    let s = tcp(&f);
    assert_eq!((s.dst_port, s.ack), (41_000, 99_006));
    assert_eq!(s.payload(&f), b"world");
    assert_eq!(peer.next_inbound(now), Next::Done);
    // The clone acknowledges "world".
    peer.on_clone_output(&cs(99_006, 8006, ACK, b""));
    let report = peer.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.flows[0].setup, Setup::GuestInitiated);
    assert_eq!(report.flows[0].clone_guest_port, Some(41_000));
}

fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GM);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GM);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn neighbor_solicit(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0xff, 0, 0, 1];
    f.extend_from_slice(&GM);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&target.octets()); // (not the solicited-node address; unused)
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&[1, 1]);
    f.extend_from_slice(&GM);
    f
}

#[test]
fn arp_and_neighbor_solicitations_are_answered_as_the_peer() {
    let p6: Ipv6Addr = "fe80::1".parse().expect("literal");
    let g6: Ipv6Addr = "fe80::2".parse().expect("literal");
    // A recorded neighbour advertisement of the peer's IPv6 address (a router).
    let na = packet::build_neighbor_advert(PM, p6, GM, g6, true);
    let rec = frames(vec![
        (IN, seg(IN, 80, 4000, 5000, 0, SYN, None, b"")),
        (IN, na),
    ]);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");

    let acts = peer.on_clone_output(&arp_request(G, P));
    let [Action::Inject {
        frame,
        reason: InjectReason::ArpReply,
    }] = acts.as_slice()
    else {
        panic!("no ARP reply: {acts:?}");
    };
    assert_eq!(frame.len(), 60);
    assert_eq!(&frame[0..6], &GM);
    assert_eq!(&frame[6..12], &PM);
    assert_eq!(&frame[20..22], &[0, 2], "op reply");
    assert_eq!(&frame[22..28], &PM);
    assert_eq!(&frame[28..32], &P.octets());
    assert_eq!(&frame[32..38], &GM);
    assert_eq!(&frame[38..42], &G.octets());

    // Probes, the guest's own address and unknown addresses get no answer.
    assert!(peer
        .on_clone_output(&arp_request(Ipv4Addr::UNSPECIFIED, P))
        .is_empty());
    assert!(peer.on_clone_output(&arp_request(G, G)).is_empty());
    assert!(peer
        .on_clone_output(&arp_request(G, Ipv4Addr::new(10, 0, 0, 99)))
        .is_empty());
    // Another sender MAC than the guest's is not the clone.
    let mut other = arp_request(G, P);
    other[6..12].copy_from_slice(&[2, 2, 2, 2, 2, 2]);
    assert!(peer.on_clone_output(&other).is_empty());

    let acts = peer.on_clone_output(&neighbor_solicit(g6, p6));
    let [Action::Inject {
        frame,
        reason: InjectReason::NeighborAdvert,
    }] = acts.as_slice()
    else {
        panic!("no neighbour advertisement: {acts:?}");
    };
    let Packet::NeighborAdvert(adv) = parse(frame) else {
        panic!("not an NA");
    };
    assert_eq!(adv.target, p6);
    assert!(adv.router, "the recorded router flag is kept");
    assert_eq!(&frame[0..6], &GM);
    assert_eq!(&frame[frame.len() - 6..], &PM, "target link-layer address");

    let report = peer.report();
    assert_eq!(
        (
            report.arp_replies,
            report.neighbor_adverts,
            report.unanswered_lookups
        ),
        (1, 1, 1)
    );

    // A configured neighbour (say the gateway) is answered too.
    let gw = Ipv4Addr::new(10, 0, 0, 254);
    let config = PeerConfig {
        neighbors: vec![(IpAddr::V4(gw), [2, 0, 0, 0, 0, 0xfe])],
        ..cfg()
    };
    let mut peer = TcpPeer::new(config, Vec::new()).expect("valid recording");
    let acts = peer.on_clone_output(&arp_request(G, gw));
    let [Action::Inject { frame, .. }] = acts.as_slice() else {
        panic!("no ARP reply: {acts:?}");
    };
    assert_eq!(&frame[22..28], &[2, 0, 0, 0, 0, 0xfe]);
}

/// A clone that behaves like the recorded guest with other ISNs, TSvals and
/// ephemeral ports: it sends each recorded guest segment, translated, once
/// every inbound frame recorded before it has been injected.
struct SimClone {
    rec: Vec<RecordedFrame>,
    next: usize,
    delta_seq: std::collections::HashMap<(u16, u16), u32>,
    port: std::collections::HashMap<(u16, u16), u16>,
}

impl SimClone {
    fn key(s: &TcpSeg, dir: Direction) -> (u16, u16) {
        match dir {
            IN => (s.dst_port, s.src_port),
            OUT => (s.src_port, s.dst_port),
        }
    }

    /// Translated guest frames that are due after `injected` inbound frames.
    fn due(&mut self, injected_upto_seq: Option<u64>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(rf) = self.rec.get(self.next) {
            if rf.direction == IN {
                if injected_upto_seq.is_some_and(|s| s >= rf.seq) {
                    self.next += 1;
                    continue;
                }
                break;
            }
            self.next += 1;
            let mut f = rf.data.clone();
            let s = tcp(&f);
            let k = Self::key(&s, OUT);
            let n = self.delta_seq.len() as u32;
            let d = *self.delta_seq.entry(k).or_insert(0x1000_0000 + n * 7919);
            packet::put32(&mut f, s.tcp_off + 4, s.seq.wrapping_add(d));
            if let Some(&p) = self.port.get(&k) {
                packet::put16(&mut f, s.tcp_off, p);
            }
            if let Some((v, _, at)) = s.ts {
                packet::put32(&mut f, at, v.wrapping_add(3_000_000));
            }
            packet::fix_tcp_checksums(&mut f, &s);
            out.push(f);
        }
        out
    }
}

#[test]
fn many_concurrent_flows_in_both_directions() {
    // 40 clients connect to the guest's port 80; the guest opens 10
    // connections to the peer's port 5432. Their frames interleave.
    let mut script: Vec<Vec<(Direction, Vec<u8>)>> = Vec::new();
    for i in 0..50u16 {
        let isn_g = 10_000 * u32::from(i) + 17;
        let isn_p = 3_000_000 + 1000 * u32::from(i);
        let req = format!("request {i}");
        let resp = format!("response to {i}!");
        let (rl, sl) = (req.len() as u32, resp.len() as u32);
        let ts = |v: u32, e: u32| Some((v, e));
        let steps = if i < 40 {
            let (g, p) = (80, 20_000 + i);
            vec![
                (IN, seg(IN, g, p, isn_p, 0, SYN, ts(1, 0), b"")),
                (
                    OUT,
                    seg(OUT, g, p, isn_g, isn_p + 1, SYN | ACK, ts(100, 1), b""),
                ),
                (
                    IN,
                    seg(IN, g, p, isn_p + 1, isn_g + 1, ACK, ts(2, 100), b""),
                ),
                (
                    IN,
                    seg(
                        IN,
                        g,
                        p,
                        isn_p + 1,
                        isn_g + 1,
                        PSH | ACK,
                        ts(3, 100),
                        req.as_bytes(),
                    ),
                ),
                (
                    OUT,
                    seg(
                        OUT,
                        g,
                        p,
                        isn_g + 1,
                        isn_p + 1 + rl,
                        PSH | ACK,
                        ts(101, 3),
                        resp.as_bytes(),
                    ),
                ),
                (
                    IN,
                    seg(
                        IN,
                        g,
                        p,
                        isn_p + 1 + rl,
                        isn_g + 1 + sl,
                        FIN | ACK,
                        ts(4, 101),
                        b"",
                    ),
                ),
                (
                    OUT,
                    seg(
                        OUT,
                        g,
                        p,
                        isn_g + 1 + sl,
                        isn_p + 2 + rl,
                        FIN | ACK,
                        ts(102, 4),
                        b"",
                    ),
                ),
                (
                    IN,
                    seg(
                        IN,
                        g,
                        p,
                        isn_p + 2 + rl,
                        isn_g + 2 + sl,
                        ACK,
                        ts(5, 102),
                        b"",
                    ),
                ),
            ]
        } else {
            let (g, p) = (30_000 + i, 5432);
            vec![
                (OUT, seg(OUT, g, p, isn_g, 0, SYN, ts(100, 0), b"")),
                (
                    IN,
                    seg(IN, g, p, isn_p, isn_g + 1, SYN | ACK, ts(1, 100), b""),
                ),
                (
                    OUT,
                    seg(
                        OUT,
                        g,
                        p,
                        isn_g + 1,
                        isn_p + 1,
                        PSH | ACK,
                        ts(101, 1),
                        resp.as_bytes(),
                    ),
                ),
                (
                    IN,
                    seg(
                        IN,
                        g,
                        p,
                        isn_p + 1,
                        isn_g + 1 + sl,
                        PSH | ACK,
                        ts(2, 101),
                        req.as_bytes(),
                    ),
                ),
                (
                    OUT,
                    seg(
                        OUT,
                        g,
                        p,
                        isn_g + 1 + sl,
                        isn_p + 1 + rl,
                        FIN | ACK,
                        ts(102, 2),
                        b"",
                    ),
                ),
                (
                    IN,
                    seg(
                        IN,
                        g,
                        p,
                        isn_p + 1 + rl,
                        isn_g + 2 + sl,
                        FIN | ACK,
                        ts(3, 102),
                        b"",
                    ),
                ),
                (
                    OUT,
                    seg(
                        OUT,
                        g,
                        p,
                        isn_g + 2 + sl,
                        isn_p + 2 + rl,
                        ACK,
                        ts(103, 3),
                        b"",
                    ),
                ),
            ]
        };
        script.push(steps);
    }
    // Round-robin interleaving.
    let mut list = Vec::new();
    let mut at = vec![0usize; script.len()];
    loop {
        let mut any = false;
        for (i, steps) in script.iter().enumerate() {
            if let Some(s) = steps.get(at[i]) {
                list.push(s.clone());
                at[i] += 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let rec = frames(list);
    let mut peer = TcpPeer::new(cfg(), rec.clone()).expect("valid recording");
    assert_eq!(peer.flow_count(), 50);
    let mut clone = SimClone {
        rec,
        next: 0,
        delta_seq: Default::default(),
        port: (40..50u16)
            .map(|i| ((30_000 + i, 5432), 50_000 + i))
            .collect(),
    };
    let now = Instant::now();
    let mut last_injected = None;
    let mut injected = 0;
    loop {
        for f in clone.due(last_injected) {
            let acts = peer.on_clone_output(&f);
            assert!(acts.is_empty(), "{acts:?}");
        }
        match peer.next_inbound(now) {
            Next::Inject {
                frame,
                original_seq,
            } => {
                injected += 1;
                last_injected = Some(original_seq);
                let s = tcp(&frame);
                let k = (s.dst_port, s.src_port);
                if s.has(ACK) {
                    // The ACK is in the clone's sequence space.
                    let rec_frame = &clone.rec[(original_seq - 100) as usize].data;
                    let r = tcp(rec_frame);
                    let rk = (r.dst_port, r.src_port);
                    let d = clone.delta_seq[&rk];
                    assert_eq!(s.ack, r.ack.wrapping_add(d), "flow {k:?}");
                    assert_eq!(s.ts.map(|t| t.1), r.ts.map(|t| t.1 + 3_000_000));
                    assert_eq!(s.dst_port, *clone.port.get(&rk).unwrap_or(&rk.0));
                }
            }
            Next::WaitForClone { flow, .. } | Next::Ack { flow, .. } => {
                panic!("stalled on {flow} although the clone did everything due");
            }
            Next::Done => break,
        }
    }
    for f in clone.due(last_injected) {
        peer.on_clone_output(&f);
    }
    assert_eq!(injected, 40 * 5 + 10 * 3);
    let report = peer.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        report
            .flows
            .iter()
            .filter(|f| f.setup == Setup::GuestInitiated)
            .count(),
        10
    );
    assert!(report.flows.iter().all(|f| f.stats.acks_generated == 0));
}

#[test]
fn connection_open_at_the_snapshot_replays_as_recorded() {
    let rec = frames(vec![
        (IN, seg(IN, 22, 50_000, 300, 7000, PSH | ACK, None, b"ls\n")),
        (
            OUT,
            seg(OUT, 22, 50_000, 7000, 303, PSH | ACK, None, b"a b c\n"),
        ),
        (IN, seg(IN, 22, 50_000, 303, 7006, ACK, None, b"")),
    ]);
    let mut peer = TcpPeer::new(cfg(), rec.clone()).expect("valid recording");
    let now = Instant::now();
    assert_eq!(inject(&mut peer, now), rec[0].data);
    expect_wait(&mut peer, now);
    assert!(peer.on_clone_output(&rec[1].data).is_empty());
    assert_eq!(inject(&mut peer, now), rec[2].data);
    let report = peer.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.flows[0].setup, Setup::OpenAtSnapshot);
}

#[test]
fn a_different_answer_is_reported_with_both_sides() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK, 42")).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, now);
    inject(&mut peer, now);
    let acts = peer.on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 2, b"OK, 43"));
    let want = Divergence::PayloadDiffers {
        offset: 5,
        recorded: b"2".to_vec(),
        clone: b"3".to_vec(),
    };
    assert_eq!(
        acts,
        vec![Action::Diverged {
            flow: FlowId(0),
            divergence: want.clone()
        }]
    );
    // The peer goes on with the clone.
    let s = tcp(&inject(&mut peer, now));
    assert_eq!(s.ack, CISN + 7);
    let report = peer.report();
    assert!(!report.is_clean());
    let d = report.divergences();
    assert_eq!(d[0].1, &want);
    assert_eq!(d[0].0.peer.port(), 4000);
    assert_eq!(
        d[0].1.to_string(),
        "payload differs at byte 5: recorded \"2\", clone \"3\""
    );
}

#[test]
fn extra_bytes_and_retransmissions_are_acknowledged() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, now);
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 2, b"OK!"));
    inject(&mut peer, now); // ACK of "OK!"

    // A retransmission of acknowledged bytes gets a duplicate ACK.
    let acts = peer.on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 3, b"OK!"));
    let [Action::Inject {
        frame,
        reason: InjectReason::Ack,
    }] = acts.as_slice()
    else {
        panic!("no ACK: {acts:?}");
    };
    let s = tcp(frame);
    assert_eq!((s.seq, s.ack, s.flags), (5004, CISN + 4, ACK));
    assert_eq!(s.ts.map(|t| (t.0, t.1)), Some((9003, 3)));
    assert!((s.src, s.dst) == (IpAddr::V4(P), IpAddr::V4(G)));

    // Extra bytes: a later recorded ACK (of everything the recorded guest
    // had sent) covers them, so they wait for it.
    let acts = peer.on_clone_output(&clone_seg(CISN + 4, 5004, PSH | ACK, 4, b"MORE"));
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Diverged { divergence: Divergence::ExtraBytes { offset: 3, clone }, .. }] if clone == b"MORE"
        ),
        "{acts:?}"
    );
    assert_eq!(tcp(&inject(&mut peer, now)).ack, CISN + 8, "the peer's FIN");
    let report = peer.report();
    assert_eq!(report.flows[0].stats.retransmissions, 1);
    assert_eq!(report.flows[0].stats.acks_generated, 1);
}

#[test]
fn a_reset_of_the_clone_is_reported_and_the_rest_of_the_flow_dropped() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    let acts = peer.on_clone_output(&seg(OUT, 80, 4000, 0, 5001, RST | ACK, None, b""));
    assert!(matches!(
        acts.as_slice(),
        [Action::Diverged {
            divergence: Divergence::CloneReset { offset: 0 },
            ..
        }]
    ));
    assert_eq!(peer.next_inbound(now), Next::Done);
    let report = peer.report();
    let fl = &report.flows[0];
    assert_eq!(fl.stats.frames_skipped, 5);
    assert_eq!(fl.divergences[0], Divergence::CloneReset { offset: 0 });
}

#[test]
fn a_clone_that_never_answers_is_reported() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let t0 = Instant::now();
    inject(&mut peer, t0);
    let until = expect_wait(&mut peer, t0);
    // Everything after the SYN needs the clone's ISN.
    assert_eq!(peer.next_inbound(until), Next::Done);
    let report = peer.report();
    assert_eq!(report.flows[0].divergences, vec![Divergence::NoSetup]);
}

#[test]
fn frames_other_than_tcp_pass_unchanged_and_unexpected_connections_are_reported() {
    let mut udp = vec![];
    udp.extend_from_slice(&GM);
    udp.extend_from_slice(&PM);
    udp.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 29, 0, 0, 0, 0, 64, 17, 0, 0]);
    udp.extend_from_slice(&P.octets());
    udp.extend_from_slice(&G.octets());
    udp.extend_from_slice(&[0, 53, 0x30, 0x39, 0, 9, 0, 0, b'x']);
    let rec = frames(vec![(IN, udp.clone())]);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");
    assert_eq!(
        peer.next_inbound(Instant::now()),
        Next::Inject {
            frame: udp,
            original_seq: 100
        }
    );
    let acts = peer.on_clone_output(&seg(OUT, 45_000, 443, 1, 0, SYN, None, b""));
    assert_eq!(acts.len(), 1);
    assert!(peer
        .on_clone_output(&seg(OUT, 45_000, 443, 1, 0, SYN, None, b""))
        .is_empty());
    let report = peer.report();
    assert_eq!(report.unexpected.len(), 1);
    assert!(report.unexpected[0].connect);
    assert_eq!(report.unexpected[0].segments, 2);
    assert!(!report.is_clean());
}

#[test]
fn data_waits_for_room_in_the_clones_window() {
    let rec = frames(vec![
        (IN, seg(IN, 80, 4000, 5000, 0, SYN, None, b"")),
        (OUT, seg(OUT, 80, 4000, 1000, 5001, SYN | ACK, None, b"")),
        (
            IN,
            seg(IN, 80, 4000, 5001, 1001, PSH | ACK, None, b"0123456789"),
        ),
    ]);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    let mut synack = seg(OUT, 80, 4000, CISN, 5001, SYN | ACK, None, b"");
    // Window 4 in the SYN-ACK.
    let s = tcp(&synack);
    packet::put16(&mut synack, s.tcp_off + 14, 4);
    packet::fix_tcp_checksums(&mut synack, &s);
    peer.on_clone_output(&synack);
    expect_wait(&mut peer, now);
    assert_eq!(peer.report().flows[0].stats.window_holds, 1);
    peer.on_clone_output(&seg(OUT, 80, 4000, CISN + 1, 5001, ACK, None, b""));
    let s = tcp(&inject(&mut peer, now));
    assert_eq!(s.payload_len(), 10);
}

#[test]
fn frames_out_of_seq_order_are_rejected() {
    let mut rec = conversation(b"OK!");
    rec.swap(2, 3);
    assert_eq!(
        TcpPeer::new(cfg(), rec).err(),
        Some(NetError::OutOfOrder {
            previous: 103,
            next: 102
        })
    );
}

#[test]
fn garbage_from_the_clone_never_panics() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let good = clone_seg(CISN, 5001, SYN | ACK, 1, b"abc");
    for cut in 0..good.len() {
        let _ = peer.on_clone_output(&good[..cut]);
    }
    let mut x = 99u32;
    for _ in 0..500 {
        let mut f = good.clone();
        for _ in 0..4 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let i = (x >> 8) as usize % f.len();
            f[i] = (x >> 20) as u8;
        }
        let _ = peer.on_clone_output(&f);
    }
    let _ = peer.report();
}

#[test]
fn ipv6_connections_are_rewritten_too() {
    let g6: IpAddr = "fd00::2".parse().expect("literal");
    let p6: IpAddr = "fd00::1".parse().expect("literal");
    let s6 = |dir: Direction, seq: u32, ack: u32, flags: u8, payload: &[u8]| {
        let (eth_src, eth_dst, src, dst, sp, dp) = match dir {
            IN => (PM, GM, p6, g6, 4000, 80),
            OUT => (GM, PM, g6, p6, 80, 4000),
        };
        build_tcp(&TcpSpec {
            eth_src,
            eth_dst,
            src,
            dst,
            src_port: sp,
            dst_port: dp,
            seq,
            ack,
            flags,
            window: 1000,
            options: Vec::new(),
            payload,
        })
    };
    let rec = frames(vec![
        (IN, s6(IN, 5000, 0, SYN, b"")),
        (OUT, s6(OUT, 1000, 5001, SYN | ACK, b"")),
        (IN, s6(IN, 5001, 1001, PSH | ACK, b"hi")),
    ]);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&s6(OUT, CISN, 5001, SYN | ACK, b""));
    let f = inject(&mut peer, now);
    let s = tcp(&f);
    assert_eq!((s.src, s.ack), (p6, CISN + 1));
    assert_eq!(s.payload(&f), b"hi");
}

#[test]
fn a_second_connection_between_the_same_ends_is_its_own_flow() {
    let mut list = Vec::new();
    for (isn_p, isn_g, msg) in [(5000u32, 1000u32, b"one"), (9000, 3000, b"two")] {
        list.extend([
            (IN, seg(IN, 80, 4000, isn_p, 0, SYN, None, b"")),
            (
                OUT,
                seg(OUT, 80, 4000, isn_g, isn_p + 1, SYN | ACK, None, b""),
            ),
            (
                IN,
                seg(IN, 80, 4000, isn_p + 1, isn_g + 1, PSH | ACK, None, msg),
            ),
            (
                OUT,
                seg(OUT, 80, 4000, isn_g + 1, isn_p + 4, ACK, None, b""),
            ),
            (
                IN,
                seg(IN, 80, 4000, isn_p + 4, isn_g + 1, RST | ACK, None, b""),
            ),
        ]);
    }
    let mut peer = TcpPeer::new(cfg(), frames(list)).expect("valid recording");
    assert_eq!(peer.flow_count(), 2);
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&seg(OUT, 80, 4000, CISN, 5001, SYN | ACK, None, b""));
    assert_eq!(tcp(&inject(&mut peer, now)).ack, CISN + 1);
    // The guest's ACK of "one" takes no sequence space, so the peer's
    // reset after it is not held.
    let s = tcp(&inject(&mut peer, now));
    assert!(s.has(RST));
    // The second SYN; a late segment of the first connection must not be
    // taken for the second one's ISN.
    let syn2 = tcp(&inject(&mut peer, now));
    assert_eq!(syn2.seq, 9000);
    assert!(peer
        .on_clone_output(&seg(OUT, 80, 4000, CISN + 1, 5004, ACK, None, b""))
        .is_empty());
    peer.on_clone_output(&seg(OUT, 80, 4000, 444_000, 9001, SYN | ACK, None, b""));
    assert_eq!(tcp(&inject(&mut peer, now)).ack, 444_001);
    assert!(tcp(&inject(&mut peer, now)).has(RST));
    assert_eq!(peer.next_inbound(now), Next::Done);
    let report = peer.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.flows[1].clone_guest_port, Some(80));
    assert!(
        report.flows.iter().all(|f| f.stats.frames_injected == 3),
        "{report}"
    );
}

#[test]
fn after_a_longer_answer_recorded_acks_cover_everything_the_clone_sent() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, now);
    inject(&mut peer, now);
    let acts = peer.on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 2, b"OK!!"));
    assert!(matches!(
        acts.as_slice(),
        [Action::Diverged {
            divergence: Divergence::ExtraBytes { offset: 3, .. },
            ..
        }]
    ));
    // The recorded ACK of the whole answer acknowledges the clone's whole
    // answer, one byte longer.
    assert_eq!(tcp(&inject(&mut peer, now)).ack, CISN + 5);
    assert_eq!(tcp(&inject(&mut peer, now)).ack, CISN + 5);
    peer.on_clone_output(&clone_seg(CISN + 5, 5005, FIN | ACK, 3, b""));
    assert_eq!(tcp(&inject(&mut peer, now)).ack, CISN + 6);
    let report = peer.report();
    assert_eq!(
        report.flows[0].divergences[1],
        Divergence::FinDiffers {
            recorded: Some(3),
            clone: Some(4)
        }
    );
    assert_eq!(report.flows[0].divergences.len(), 2, "{report}");
}

#[test]
fn bytes_past_the_end_of_the_recording_are_acknowledged_at_once() {
    // The recording ends before the guest answered.
    let mut rec = conversation(b"OK!");
    rec.truncate(4);
    let mut peer = TcpPeer::new(cfg(), rec).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, now);
    inject(&mut peer, now);
    assert_eq!(peer.next_inbound(now), Next::Done);
    let acts = peer.on_clone_output(&clone_seg(CISN + 1, 5004, PSH | ACK, 2, b"OK!"));
    assert_eq!(acts.len(), 2, "{acts:?}");
    assert!(matches!(
        &acts[0],
        Action::Diverged { divergence: Divergence::ExtraBytes { offset: 0, clone }, .. } if clone == b"OK!"
    ));
    let Action::Inject {
        frame,
        reason: InjectReason::Ack,
    } = &acts[1]
    else {
        panic!("no ACK: {acts:?}");
    };
    let s = tcp(frame);
    assert_eq!((s.seq, s.ack), (5004, CISN + 4));
    assert_eq!(peer.report().flows[0].stats.acks_generated, 1);
}

#[test]
fn recorded_frames_come_from_net_frame_events() {
    let event = |seq, payload| vmr_proto::Event {
        instance: vmr_proto::InstanceId::new("vm-1").expect("valid id"),
        seq,
        wall_time_ns: 0,
        mono_time_ns: 0,
        epoch: 1,
        payload,
    };
    let net = |direction| {
        vmr_proto::Payload::Net(vmr_proto::NetFrame {
            device: "net0".into(),
            queue: 0,
            direction,
            frame: vec![1, 2, 3],
        })
    };
    assert_eq!(
        RecordedFrame::from_event(&event(7, net(vmr_proto::Direction::Rx))),
        Some(RecordedFrame {
            seq: 7,
            direction: Direction::ToGuest,
            data: vec![1, 2, 3]
        })
    );
    let tx = RecordedFrame::from_event(&event(8, net(vmr_proto::Direction::Tx)));
    assert_eq!(tx.map(|f| f.direction), Some(Direction::FromGuest));
    let env = vmr_proto::Payload::Env(vmr_proto::EnvSample {
        sensor: "t".into(),
        value: 1.0,
        unit: "C".into(),
    });
    assert_eq!(RecordedFrame::from_event(&event(9, env)), None);
}

#[test]
fn a_frame_the_clone_did_not_get_is_sent_again_after_two_duplicate_acks() {
    let mut peer = TcpPeer::new(cfg(), conversation(b"OK!")).expect("valid recording");
    let now = Instant::now();
    inject(&mut peer, now);
    peer.on_clone_output(&clone_seg(CISN, 5001, SYN | ACK, 1, b""));
    inject(&mut peer, now);
    inject(&mut peer, now); // "GET", lost on the way
                            // (Say the clone answers anyway; the peer's ACK of it has TSval 9003.)
    peer.on_clone_output(&clone_seg(CISN + 1, 5001, PSH | ACK, 2, b"OK!"));
    assert_eq!(tcp(&inject(&mut peer, now)).ts.map(|t| t.0), Some(9003));
    let dup = clone_seg(CISN + 4, 5001, ACK, 2, b"");
    assert!(peer.on_clone_output(&dup).is_empty());
    let acts = peer.on_clone_output(&dup);
    let [Action::Inject {
        frame,
        reason: InjectReason::Retransmission,
    }] = acts.as_slice()
    else {
        panic!("no retransmission: {acts:?}");
    };
    let s = tcp(frame);
    assert_eq!((s.seq, s.ack), (5001, CISN + 4));
    assert_eq!(s.payload(frame), b"GET");
    assert_eq!(
        s.ts.map(|t| t.0),
        Some(9003),
        "the peer's clock does not go back"
    );
    assert_eq!(
        s.ts.map(|t| t.1),
        Some(2),
        "echoes the clone's latest TSval"
    );
    assert_eq!(peer.report().flows[0].stats.peer_retransmissions, 1);
    // An ACK that moves on is no duplicate.
    assert!(peer
        .on_clone_output(&clone_seg(CISN + 4, 5004, ACK, 3, b""))
        .is_empty());
    assert!(peer
        .on_clone_output(&clone_seg(CISN + 4, 5004, ACK, 3, b""))
        .is_empty());
}
