//! Decoded, display-sized summaries of recorded events, for the range view.

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use serde::Serialize;
use vmr_proto::{BlockOp, BlockStatus, Direction, Event, Payload};

use crate::aggregate::lifecycle_name;

/// Bytes of a frame's payload shown in the preview.
pub const PREVIEW_BYTES: usize = 32;

/// One event as the range view shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventSummary {
    pub seq: u64,
    /// Wall time, ns since the Unix epoch.
    pub t: u64,
    /// `block`, `net`, `env` or `lifecycle`.
    pub kind: &'static str,
    /// Device, sensor name or lifecycle kind.
    pub device: String,
    #[serde(flatten)]
    pub detail: Detail,
}

/// What is known of an event beyond its kind.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Detail {
    Block {
        op: &'static str,
        sector: u64,
        len: u32,
        status: &'static str,
    },
    Net(Box<FrameSummary>),
    Env {
        value: f64,
        unit: String,
    },
    Lifecycle {
        lifecycle: &'static str,
        detail: String,
    },
}

/// A frame in one line: addresses, ports, TCP flags and a payload preview.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct FrameSummary {
    /// `rx` (to the guest) or `tx` (from the guest).
    pub direction: &'static str,
    pub len: usize,
    pub src_mac: String,
    pub dst_mac: String,
    /// EtherType in hex (`0x0800`).
    pub ethertype: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `ipv4`, `ipv6` or empty.
    pub proto: &'static str,
    pub src: String,
    pub dst: String,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// TCP flags, for example `SYN ACK`.
    pub flags: String,
    /// The first [`PREVIEW_BYTES`] of the innermost payload, in hex.
    pub preview_hex: String,
    /// The same bytes as ASCII (`.` for the unprintable).
    pub preview_text: String,
    pub payload_len: usize,
}

fn mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn preview(out: &mut FrameSummary, payload: &[u8]) {
    let p = &payload[..payload.len().min(PREVIEW_BYTES)];
    out.payload_len = payload.len();
    out.preview_hex = p.iter().map(|x| format!("{x:02x}")).collect();
    out.preview_text = p
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            }
        })
        .collect();
}

/// Summarises an Ethernet frame.
pub fn frame_summary(direction: Direction, frame: &[u8]) -> FrameSummary {
    let mut out = FrameSummary {
        direction: if direction == Direction::Tx {
            "tx"
        } else {
            "rx"
        },
        len: frame.len(),
        ..Default::default()
    };
    if frame.len() < 14 {
        preview(&mut out, frame);
        return out;
    }
    out.dst_mac = mac(&frame[0..6]);
    out.src_mac = mac(&frame[6..12]);
    out.ethertype = format!("0x{:02x}{:02x}", frame[12], frame[13]);
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        preview(&mut out, &frame[14..]);
        return out;
    };
    let mut inner: &[u8] = &frame[14..];
    match &p.net {
        Some(NetSlice::Ipv4(s)) => {
            out.proto = "ipv4";
            out.src = s.header().source_addr().to_string();
            out.dst = s.header().destination_addr().to_string();
            inner = s.payload().payload;
        }
        Some(NetSlice::Ipv6(s)) => {
            out.proto = "ipv6";
            out.src = s.header().source_addr().to_string();
            out.dst = s.header().destination_addr().to_string();
            inner = s.payload().payload;
        }
        None => {}
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            out.proto = "tcp";
            out.src_port = Some(t.source_port());
            out.dst_port = Some(t.destination_port());
            let flags = [
                (t.syn(), "SYN"),
                (t.ack(), "ACK"),
                (t.fin(), "FIN"),
                (t.rst(), "RST"),
                (t.psh(), "PSH"),
                (t.urg(), "URG"),
            ];
            out.flags = flags
                .iter()
                .filter(|f| f.0)
                .map(|f| f.1)
                .collect::<Vec<_>>()
                .join(" ");
            inner = t.payload();
        }
        Some(TransportSlice::Udp(u)) => {
            out.proto = "udp";
            out.src_port = Some(u.source_port());
            out.dst_port = Some(u.destination_port());
            inner = u.payload();
        }
        Some(TransportSlice::Icmpv4(_)) => out.proto = "icmp",
        Some(TransportSlice::Icmpv6(_)) => out.proto = "icmpv6",
        None => {}
    }
    preview(&mut out, inner);
    out
}

fn op_name(op: BlockOp) -> &'static str {
    match op {
        BlockOp::Read => "read",
        BlockOp::Write => "write",
        BlockOp::Flush => "flush",
        BlockOp::Discard => "discard",
        BlockOp::WriteZeroes => "write_zeroes",
        BlockOp::GetId => "get_id",
    }
}

fn status_name(s: BlockStatus) -> &'static str {
    match s {
        BlockStatus::Ok => "ok",
        BlockStatus::IoErr => "ioerr",
        BlockStatus::Unsupported => "unsupported",
    }
}

/// The summary of one event.
pub fn summarize(e: &Event) -> EventSummary {
    let (kind, device, detail) = match &e.payload {
        Payload::Block(b) => (
            "block",
            b.device.clone(),
            Detail::Block {
                op: op_name(b.op),
                sector: b.sector,
                len: b.len,
                status: status_name(b.status),
            },
        ),
        Payload::Net(n) => (
            "net",
            n.device.clone(),
            Detail::Net(Box::new(frame_summary(n.direction, &n.frame))),
        ),
        Payload::Env(s) => (
            "env",
            s.sensor.clone(),
            Detail::Env {
                value: s.value,
                unit: s.unit.clone(),
            },
        ),
        Payload::Lifecycle(l) => (
            "lifecycle",
            String::new(),
            Detail::Lifecycle {
                lifecycle: lifecycle_name(l.kind),
                detail: l.detail.clone(),
            },
        ),
    };
    EventSummary {
        seq: e.seq,
        t: e.wall_time_ns,
        kind,
        device,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_frame_summary() {
        let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1000, 4096)
            .syn()
            .ack(5);
        let payload = b"GET / HTTP/1.1\r\n";
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).expect("build a frame");
        let s = frame_summary(Direction::Rx, &frame);
        assert_eq!(s.proto, "tcp");
        assert_eq!(s.src, "10.0.0.1");
        assert_eq!(s.dst, "10.0.0.2");
        assert_eq!((s.src_port, s.dst_port), (Some(40000), Some(80)));
        assert_eq!(s.flags, "SYN ACK");
        assert_eq!(s.src_mac, "02:00:00:00:00:01");
        assert_eq!(s.ethertype, "0x0800");
        assert_eq!(s.preview_text, "GET / HTTP/1.1..");
        assert_eq!(s.payload_len, payload.len());
    }

    #[test]
    fn raw_and_short_frames() {
        let mut f = vec![
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 2, 0, 0, 0, 0, 1, 0x88, 0xb5,
        ];
        f.extend_from_slice(b"POISON: crash now");
        let s = frame_summary(Direction::Rx, &f);
        assert_eq!(s.ethertype, "0x88b5");
        assert_eq!(s.proto, "");
        assert!(s.preview_text.starts_with("POISON"));
        let s = frame_summary(Direction::Tx, &[1, 2, 3]);
        assert_eq!(s.len, 3);
        assert_eq!(s.direction, "tx");
        assert_eq!(s.preview_hex, "010203");
    }
}
