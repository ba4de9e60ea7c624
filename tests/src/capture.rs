//! Reading what vhost-tap backends recorded, and feeding a replay-mode NIC:
//! the helpers the microVM tests share.

use std::io::{BufRead, Write};
use std::path::Path;

use vmr_proto::framing::EventReader;
use vmr_proto::{BlockOp, Direction, Event, Payload};

/// Every complete record of a capture file (a tail still being written is
/// left out).
pub fn records(path: &Path) -> Vec<Event> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut r = EventReader::new(std::io::BufReader::new(f));
    let mut out = Vec::new();
    while let Ok(Some(e)) = r.next_event() {
        if let Ok(e) = Event::try_from(e) {
            out.push(e);
        }
    }
    out
}

/// The recorded frames of `ethertype` in direction `dir`.
pub fn frames(path: &Path, dir: Direction, ethertype: [u8; 2]) -> Vec<Vec<u8>> {
    records(path)
        .into_iter()
        .filter_map(|e| match e.payload {
            Payload::Net(n)
                if n.direction == dir && n.frame.get(12..14) == Some(&ethertype[..]) =>
            {
                Some(n.frame)
            }
            _ => None,
        })
        .collect()
}

/// The data of the first recorded write to `sector`.
pub fn disk_write(path: &Path, sector: u64) -> Option<Vec<u8>> {
    records(path).into_iter().find_map(|e| match e.payload {
        Payload::Block(b) if b.op == BlockOp::Write && b.sector == sector => Some(b.data),
        _ => None,
    })
}

/// An Ethernet frame to `dst` from `src`, padded to the 60-byte minimum.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// Injects `frame` into a replay-mode `vhost-tap-net` through its control
/// socket; panics with the backend's answer if it refuses.
pub fn inject(control: &Path, frame: &[u8]) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let mut s = std::os::unix::net::UnixStream::connect(control)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", control.display()));
    writeln!(s, "{{\"cmd\":\"inject\",\"frame\":\"{hex}\"}}").expect("control write");
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .expect("control reply");
    assert!(line.contains("\"ok\":true"), "inject refused: {line}");
}
