//! Which events to deliver.
//!
//! A [`Filter`] includes or excludes events by kind, by device (block and
//! net), by block operation and by the addresses of a net frame (MAC, IP,
//! TCP/UDP port, matched against source or destination; frames are parsed
//! as Ethernet II, optional VLAN, IPv4/IPv6, TCP/UDP).
//!
//! A filter decides delivery only. The replay's clock must still see every
//! lifecycle event (pauses shape guest time), so feed the
//! [`Timeline`](crate::schedule::Timeline) before filtering, and read the
//! topics of [`Filter::kinds_to_read`], which always include lifecycle.
//! [`FilterStats`] counts what the filter removed, so a report can say the
//! stream was filtered.
//!
//! ```
//! use replayer::{filter::Filter, Kind, KindSet};
//! let mut f = Filter::default();
//! f.kinds = KindSet::empty().with(Kind::Net);
//! assert_eq!(f.kinds_to_read(), KindSet::empty().with(Kind::Net).with(Kind::Lifecycle));
//! ```

use std::net::IpAddr;

use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use vmr_proto::{BlockOp, Event, Payload};

use crate::{Kind, KindSet};

/// Addresses of a frame, as far as its headers parse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameAddrs {
    pub src_mac: Option<[u8; 6]>,
    pub dst_mac: Option<[u8; 6]>,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl FrameAddrs {
    /// Parses an Ethernet frame's headers. What does not parse is `None`.
    pub fn parse(frame: &[u8]) -> Self {
        let mut a = FrameAddrs::default();
        if frame.len() >= 12 {
            let mut m = [0; 6];
            m.copy_from_slice(&frame[0..6]);
            a.dst_mac = Some(m);
            m.copy_from_slice(&frame[6..12]);
            a.src_mac = Some(m);
        }
        let Ok(p) = SlicedPacket::from_ethernet(frame) else {
            return a;
        };
        if let Some(LinkSlice::Ethernet2(e)) = &p.link {
            a.src_mac = Some(e.source());
            a.dst_mac = Some(e.destination());
        }
        match &p.net {
            Some(NetSlice::Ipv4(v4)) => {
                a.src_ip = Some(IpAddr::V4(v4.header().source_addr()));
                a.dst_ip = Some(IpAddr::V4(v4.header().destination_addr()));
            }
            Some(NetSlice::Ipv6(v6)) => {
                a.src_ip = Some(IpAddr::V6(v6.header().source_addr()));
                a.dst_ip = Some(IpAddr::V6(v6.header().destination_addr()));
            }
            None => {}
        }
        match &p.transport {
            Some(TransportSlice::Tcp(t)) => {
                a.src_port = Some(t.source_port());
                a.dst_port = Some(t.destination_port());
            }
            Some(TransportSlice::Udp(u)) => {
                a.src_port = Some(u.source_port());
                a.dst_port = Some(u.destination_port());
            }
            _ => {}
        }
        a
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], FilterError> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    let bad = || FilterError::BadMac(s.to_string());
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(m)
}

/// Errors of filters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{0:?} is not a MAC address (use aa:bb:cc:dd:ee:ff)")]
    BadMac(String),
    #[error("the filter delivers nothing: every kind is excluded")]
    Empty,
}

/// Criteria on a frame's addresses. A frame matches when, for each
/// non-empty list, its source or destination is one of the list's values
/// (lists are and-ed, values within a list or-ed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetMatch {
    pub macs: Vec<[u8; 6]>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

impl NetMatch {
    pub fn is_empty(&self) -> bool {
        self.macs.is_empty() && self.ips.is_empty() && self.ports.is_empty()
    }

    /// Whether the frame with these addresses matches every non-empty list.
    pub fn matches(&self, a: &FrameAddrs) -> bool {
        fn any<T: PartialEq>(list: &[T], x: Option<T>, y: Option<T>) -> bool {
            list.is_empty()
                || x.is_some_and(|v| list.contains(&v))
                || y.is_some_and(|v| list.contains(&v))
        }
        any(&self.macs, a.src_mac, a.dst_mac)
            && any(&self.ips, a.src_ip, a.dst_ip)
            && any(&self.ports, a.src_port, a.dst_port)
    }
}

/// What a filter removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// Events the filter was asked about.
    pub examined: u64,
    /// Events it removed, by kind ([`Kind`] order: block, net, env,
    /// lifecycle).
    pub removed: [u64; 4],
}

impl FilterStats {
    /// Events removed in all.
    pub fn removed_total(&self) -> u64 {
        self.removed.iter().sum()
    }

    /// Whether the stream was filtered (something was removed).
    pub fn is_filtered(&self) -> bool {
        self.removed_total() > 0
    }

    /// Events of `kind` removed.
    pub fn removed_of(&self, kind: Kind) -> u64 {
        self.removed[kind as usize]
    }
}

/// Which events to deliver. The default delivers everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Kinds to deliver.
    pub kinds: KindSet,
    /// Kinds never to deliver (wins over `kinds`).
    pub exclude_kinds: KindSet,
    /// Block and net devices to deliver; empty means all.
    pub devices: Vec<String>,
    /// Block and net devices never to deliver.
    pub exclude_devices: Vec<String>,
    /// Block operations to deliver; empty means all.
    pub block_ops: Vec<BlockOp>,
    /// Block operations never to deliver.
    pub exclude_block_ops: Vec<BlockOp>,
    /// Net frames to deliver (empty: all).
    pub net: NetMatch,
    /// Net frames never to deliver (empty: none excluded).
    pub exclude_net: NetMatch,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            kinds: KindSet::all(),
            exclude_kinds: KindSet::empty(),
            devices: Vec::new(),
            exclude_devices: Vec::new(),
            block_ops: Vec::new(),
            exclude_block_ops: Vec::new(),
            net: NetMatch::default(),
            exclude_net: NetMatch::default(),
        }
    }
}

impl Filter {
    /// The kinds delivered.
    pub fn delivered_kinds(&self) -> KindSet {
        self.kinds
            .iter()
            .filter(|k| !self.exclude_kinds.contains(*k))
            .collect()
    }

    /// The topics a replay with this filter must read: the delivered kinds
    /// and lifecycle (for the clock), never more.
    pub fn kinds_to_read(&self) -> KindSet {
        self.delivered_kinds().with(Kind::Lifecycle)
    }

    /// Checks that the filter can deliver something.
    pub fn validate(&self) -> Result<(), FilterError> {
        if self.delivered_kinds().is_empty() {
            Err(FilterError::Empty)
        } else {
            Ok(())
        }
    }

    /// Whether `event` is to be delivered.
    pub fn matches(&self, event: &Event) -> bool {
        let kind = Kind::of(&event.payload);
        if !self.delivered_kinds().contains(kind) {
            return false;
        }
        let device_ok = |d: &str| {
            (self.devices.is_empty() || self.devices.iter().any(|x| x == d))
                && !self.exclude_devices.iter().any(|x| x == d)
        };
        match &event.payload {
            Payload::Block(b) => {
                device_ok(&b.device)
                    && (self.block_ops.is_empty() || self.block_ops.contains(&b.op))
                    && !self.exclude_block_ops.contains(&b.op)
            }
            Payload::Net(n) => {
                if !device_ok(&n.device) {
                    return false;
                }
                if self.net.is_empty() && self.exclude_net.is_empty() {
                    return true;
                }
                let a = FrameAddrs::parse(&n.frame);
                self.net.matches(&a)
                    && (self.exclude_net.is_empty() || !self.exclude_net.matches(&a))
            }
            Payload::Env(_) | Payload::Lifecycle(_) => true,
        }
    }

    /// [`Filter::matches`], counting the verdict in `stats`.
    pub fn admit(&self, event: &Event, stats: &mut FilterStats) -> bool {
        let ok = self.matches(event);
        stats.examined += 1;
        if !ok {
            stats.removed[Kind::of(&event.payload) as usize] += 1;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use vmr_proto::{
        BlockIo, BlockStatus, Direction, EnvSample, InstanceId, Lifecycle, LifecycleKind, NetFrame,
    };

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn ev(payload: Payload) -> Event {
        Event {
            instance: InstanceId::new("vm").unwrap(),
            seq: 1,
            wall_time_ns: 0,
            mono_time_ns: 0,
            epoch: 1,
            payload,
        }
    }

    fn block(device: &str, op: BlockOp) -> Event {
        ev(Payload::Block(BlockIo {
            device: device.into(),
            queue: 0,
            op,
            sector: 0,
            len: 512,
            data: vec![],
            content_hash: None,
            status: BlockStatus::Ok,
        }))
    }

    fn net(device: &str, frame: Vec<u8>) -> Event {
        ev(Payload::Net(NetFrame {
            device: device.into(),
            queue: 0,
            direction: Direction::Rx,
            frame,
        }))
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src, dst, 64)
            .udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, b"hello").unwrap();
        out
    }

    fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
            .ipv6(src, dst, 64)
            .tcp(sport, dport, 1, 1024);
        let mut out = Vec::new();
        b.write(&mut out, b"data").unwrap();
        out
    }

    fn env() -> Event {
        ev(Payload::Env(EnvSample {
            sensor: "t".into(),
            value: 1.0,
            unit: "c".into(),
        }))
    }

    fn pause() -> Event {
        ev(Payload::Lifecycle(Lifecycle {
            kind: LifecycleKind::Pause,
            detail: String::new(),
            regs: vec![],
            gap: None,
            snapshot_id: None,
        }))
    }

    #[test]
    fn parses_ipv4_udp_and_ipv6_tcp() {
        let a = FrameAddrs::parse(&udp4([10, 0, 0, 1], [10, 0, 0, 2], 5353, 53));
        assert_eq!(a.src_mac, Some(MAC_A));
        assert_eq!(a.dst_mac, Some(MAC_B));
        assert_eq!(a.src_ip, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(a.dst_ip, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))));
        assert_eq!((a.src_port, a.dst_port), (Some(5353), Some(53)));
        let v6 = Ipv6Addr::LOCALHOST.octets();
        let a = FrameAddrs::parse(&tcp6(v6, v6, 40000, 80));
        assert_eq!(a.src_ip, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(a.dst_port, Some(80));
        // A truncated frame keeps what parses; garbage gives nothing.
        let a = FrameAddrs::parse(&udp4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2)[..20]);
        assert_eq!(a.src_mac, Some(MAC_A));
        assert_eq!(a.src_ip, None);
        assert_eq!(FrameAddrs::parse(&[1, 2, 3]), FrameAddrs::default());
    }

    #[test]
    fn default_delivers_everything() {
        let f = Filter::default();
        let mut stats = FilterStats::default();
        for e in [
            block("vda", BlockOp::Write),
            net("eth0", vec![]),
            env(),
            pause(),
        ] {
            assert!(f.admit(&e, &mut stats));
        }
        assert!(!stats.is_filtered());
        assert_eq!(stats.examined, 4);
        assert_eq!(f.kinds_to_read(), KindSet::all());
    }

    #[test]
    fn by_kind_include_and_exclude() {
        let mut stats = FilterStats::default();
        let f = Filter {
            kinds: KindSet::empty().with(Kind::Net).with(Kind::Block),
            exclude_kinds: KindSet::empty().with(Kind::Block),
            ..Filter::default()
        };
        assert!(f.admit(&net("eth0", vec![]), &mut stats));
        assert!(!f.admit(&block("vda", BlockOp::Read), &mut stats));
        assert!(!f.admit(&env(), &mut stats));
        assert!(!f.admit(&pause(), &mut stats));
        let s = stats;
        assert_eq!(s.removed_total(), 3);
        assert_eq!(s.removed_of(Kind::Block), 1);
        assert_eq!(s.removed_of(Kind::Lifecycle), 1);
        assert!(s.is_filtered());
        // Lifecycle is read for the clock even when not delivered.
        assert_eq!(
            f.kinds_to_read(),
            KindSet::empty().with(Kind::Net).with(Kind::Lifecycle)
        );
        let none = Filter {
            exclude_kinds: KindSet::all(),
            ..Filter::default()
        };
        assert_eq!(none.validate(), Err(FilterError::Empty));
    }

    #[test]
    fn by_device_and_block_op() {
        let f = Filter {
            devices: vec!["vda".into(), "eth0".into()],
            exclude_block_ops: vec![BlockOp::Flush],
            ..Filter::default()
        };
        assert!(f.matches(&block("vda", BlockOp::Write)));
        assert!(!f.matches(&block("vdb", BlockOp::Write)));
        assert!(!f.matches(&block("vda", BlockOp::Flush)));
        assert!(f.matches(&net("eth0", vec![])));
        assert!(!f.matches(&net("eth1", vec![])));
        assert!(f.matches(&env()), "device criteria do not apply to env");
        let f = Filter {
            block_ops: vec![BlockOp::Write, BlockOp::Discard],
            exclude_devices: vec!["vdb".into()],
            ..Filter::default()
        };
        assert!(f.matches(&block("vda", BlockOp::Discard)));
        assert!(!f.matches(&block("vda", BlockOp::Read)));
        assert!(!f.matches(&block("vdb", BlockOp::Write)));
    }

    #[test]
    fn by_mac_ip_and_port() {
        let dns = net("eth0", udp4([10, 0, 0, 1], [10, 0, 0, 2], 5353, 53));
        let web = net("eth0", udp4([10, 0, 0, 3], [10, 0, 0, 1], 4444, 80));
        let v6 = net(
            "eth0",
            tcp6(
                Ipv6Addr::LOCALHOST.octets(),
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                1,
                22,
            ),
        );
        let port53 = Filter {
            net: NetMatch {
                ports: vec![53],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(port53.matches(&dns));
        assert!(!port53.matches(&web));
        assert!(!port53.matches(&v6));
        assert!(port53.matches(&env()), "net criteria do not apply to env");

        // Source or destination, and-ed across lists.
        let host1_80 = Filter {
            net: NetMatch {
                ips: vec!["10.0.0.1".parse().unwrap()],
                ports: vec![80],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(host1_80.matches(&web));
        assert!(!host1_80.matches(&dns));

        let no_ssh = Filter {
            exclude_net: NetMatch {
                ports: vec![22],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(!no_ssh.matches(&v6));
        assert!(no_ssh.matches(&dns));

        let by_mac = Filter {
            net: NetMatch {
                macs: vec![parse_mac("02:00:00:00:00:0B").unwrap()],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(by_mac.matches(&dns));
        let other_mac = Filter {
            net: NetMatch {
                macs: vec![parse_mac("02-00-00-00-00-0c").unwrap()],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(!other_mac.matches(&dns));
        let v6_only = Filter {
            net: NetMatch {
                ips: vec!["::1".parse().unwrap()],
                ..NetMatch::default()
            },
            ..Filter::default()
        };
        assert!(v6_only.matches(&v6));
        assert!(!v6_only.matches(&dns));
        // An unparsable frame matches no address criterion.
        assert!(!port53.matches(&net("eth0", vec![0xff; 8])));
        assert!(no_ssh.matches(&net("eth0", vec![0xff; 8])));
    }

    #[test]
    fn bad_mac_is_a_clear_error() {
        for bad in [
            "02:00:00:00:00",
            "zz:00:00:00:00:00",
            "0200.0000.0000",
            "2:0:0:0:0:0",
        ] {
            assert_eq!(parse_mac(bad), Err(FilterError::BadMac(bad.into())));
        }
    }
}
