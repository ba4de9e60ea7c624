//! Capture filters: which requests and frames are recorded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::RwLock;

use serde::Deserialize;

use vmr_proto::pb;

/// Errors parsing a filter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("unknown block operation {0:?}")]
    Op(String),
    #[error("unknown direction {0:?} (rx|tx)")]
    Direction(String),
    #[error("invalid MAC address {0:?}")]
    Mac(String),
}

/// Which block operations are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFilter {
    ops: u8,
}

impl Default for BlockFilter {
    fn default() -> Self {
        Self { ops: 0xff }
    }
}

fn op_bit(op: pb::BlockOp) -> u8 {
    1 << (op as i32 as u8)
}

impl BlockFilter {
    /// Records every operation.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses a comma list of `read,write,flush,discard,write-zeroes,get-id`.
    pub fn parse(list: &str) -> Result<Self, FilterError> {
        let mut ops = 0;
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let op = match name {
                "read" => pb::BlockOp::Read,
                "write" => pb::BlockOp::Write,
                "flush" => pb::BlockOp::Flush,
                "discard" => pb::BlockOp::Discard,
                "write-zeroes" => pb::BlockOp::WriteZeroes,
                "get-id" => pb::BlockOp::GetId,
                other => return Err(FilterError::Op(other.into())),
            };
            ops |= op_bit(op);
        }
        Ok(Self { ops })
    }

    /// Whether `op` is recorded: by the process's runtime filter if one
    /// was set (see [`set_runtime`]), else by this filter.
    #[inline]
    pub fn matches(&self, op: pb::BlockOp) -> bool {
        self.matches_in(&RUNTIME, op)
    }

    /// Whether `op` is recorded, with `rt`'s block filter in force if set.
    #[inline]
    pub fn matches_in(&self, rt: &RuntimeFilters, op: pb::BlockOp) -> bool {
        let o = rt.block.load(Ordering::Relaxed);
        let ops = if o & RUNTIME_SET != 0 {
            o as u8
        } else {
            self.ops
        };
        ops & op_bit(op) != 0
    }
}

/// Which frames are recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetFilter {
    /// Directions recorded (`None`: both).
    pub direction: Option<pb::Direction>,
    /// Only frames from or to this MAC.
    pub mac: Option<[u8; 6]>,
    /// Only IP packets from or to this address.
    pub ip: Option<IpAddr>,
    /// Only TCP/UDP packets from or to this port.
    pub port: Option<u16>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], FilterError> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(|| FilterError::Mac(s.into()))?;
        if p.len() != 2 {
            return Err(FilterError::Mac(s.into()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| FilterError::Mac(s.into()))?;
    }
    if parts.next().is_some() {
        return Err(FilterError::Mac(s.into()));
    }
    Ok(out)
}

/// Parses a comma list of directions (`rx,tx`) into the filter's direction.
pub fn parse_directions(list: &str) -> Result<Option<pb::Direction>, FilterError> {
    let (mut rx, mut tx) = (false, false);
    for d in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match d {
            "rx" => rx = true,
            "tx" => tx = true,
            other => return Err(FilterError::Direction(other.into())),
        }
    }
    Ok(match (rx, tx) {
        (true, false) => Some(pb::Direction::Rx),
        (false, true) => Some(pb::Direction::Tx),
        _ => None,
    })
}

impl NetFilter {
    /// Whether a frame in `dir` is recorded: by the process's runtime
    /// filter if one was set (see [`set_runtime`]), else by this filter.
    pub fn matches(&self, dir: pb::Direction, frame: &[u8]) -> bool {
        self.matches_in(&RUNTIME, dir, frame)
    }

    /// Whether a frame in `dir` is recorded, with `rt`'s net filter in force
    /// if set.
    pub fn matches_in(&self, rt: &RuntimeFilters, dir: pb::Direction, frame: &[u8]) -> bool {
        if rt.net_set.load(Ordering::Acquire) {
            let f = rt.net.read().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = f.as_ref() {
                return f.matches_own(dir, frame);
            }
        }
        self.matches_own(dir, frame)
    }

    fn matches_own(&self, dir: pb::Direction, frame: &[u8]) -> bool {
        if self.direction.is_some_and(|d| d != dir) {
            return false;
        }
        if let Some(mac) = self.mac {
            if frame.len() < 12 || (frame[0..6] != mac && frame[6..12] != mac) {
                return false;
            }
        }
        if self.ip.is_none() && self.port.is_none() {
            return true;
        }
        let Some((src, dst, proto, l4)) = parse_ip(frame) else {
            return false;
        };
        if let Some(ip) = self.ip {
            if ip != src && ip != dst {
                return false;
            }
        }
        if let Some(port) = self.port {
            if proto != 6 && proto != 17 || l4.len() < 4 {
                return false;
            }
            let sp = u16::from_be_bytes([l4[0], l4[1]]);
            let dp = u16::from_be_bytes([l4[2], l4[3]]);
            if sp != port && dp != port {
                return false;
            }
        }
        true
    }
}

/// Set in [`BLOCK_RUNTIME`] when a runtime block filter is in force; the
/// low byte holds its operation bits.
const RUNTIME_SET: u16 = 1 << 8;

/// Filters set at runtime that replace the ones given at start.
#[derive(Debug)]
pub struct RuntimeFilters {
    block: AtomicU16,
    net_set: AtomicBool,
    net: RwLock<Option<NetFilter>>,
}

impl RuntimeFilters {
    /// None set.
    pub const fn new() -> Self {
        Self {
            block: AtomicU16::new(0),
            net_set: AtomicBool::new(false),
            net: RwLock::new(None),
        }
    }

    /// Puts `f` in force.
    pub fn set(&self, f: &RuntimeFilter) -> Result<(), RuntimeFilterError> {
        match f {
            RuntimeFilter::Block { ops } => {
                let b = BlockFilter::parse(ops)?;
                self.block
                    .store(RUNTIME_SET | u16::from(b.ops), Ordering::Relaxed);
            }
            RuntimeFilter::Net {
                directions,
                mac,
                ip,
                port,
            } => {
                let n = NetFilter {
                    direction: parse_directions(directions.as_deref().unwrap_or("rx,tx"))?,
                    mac: mac.as_deref().map(parse_mac).transpose()?,
                    ip: ip
                        .as_deref()
                        .map(|s| s.parse().map_err(|_| RuntimeFilterError::Ip(s.into())))
                        .transpose()?,
                    port: *port,
                };
                *self.net.write().unwrap_or_else(|p| p.into_inner()) = Some(n);
                self.net_set.store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

impl Default for RuntimeFilters {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's runtime filters ([`BlockFilter::matches`] and
/// [`NetFilter::matches`] consult them).
static RUNTIME: RuntimeFilters = RuntimeFilters::new();

/// A filter sent over the control socket (`set-filter`), in the same
/// syntax as the backends' flags: `{"kind":"block","ops":"read,write"}` or
/// `{"kind":"net","directions":"rx","mac":null,"ip":"10.0.0.1","port":80}`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RuntimeFilter {
    /// `--capture-ops`.
    Block { ops: String },
    /// `--capture-directions`, `--capture-mac`, `--capture-ip`,
    /// `--capture-port`.
    Net {
        #[serde(default)]
        directions: Option<String>,
        #[serde(default)]
        mac: Option<String>,
        #[serde(default)]
        ip: Option<String>,
        #[serde(default)]
        port: Option<u16>,
    },
}

/// Errors of a runtime filter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeFilterError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("invalid IP address {0:?}")]
    Ip(String),
}

/// Replaces, for every backend of this process, the filter given at start
/// with `f` (a backend process serves one device, so this is that
/// device's filter). Requests and frames seen after the call are filtered
/// by it.
pub fn set_runtime(f: &RuntimeFilter) -> Result<(), RuntimeFilterError> {
    RUNTIME.set(f)
}

/// The `set-filter` control command: applies `f`, answers the reply
/// object.
pub fn control_set_filter(f: &RuntimeFilter) -> serde_json::Value {
    match set_runtime(f) {
        Ok(()) => {
            tracing::info!(filter = ?f, "capture filter changed");
            serde_json::json!({"ok": true})
        }
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}

/// Source, destination, protocol and L4 bytes of an Ethernet frame carrying
/// IPv4 or IPv6 (one optional 802.1Q tag).
fn parse_ip(frame: &[u8]) -> Option<(IpAddr, IpAddr, u8, &[u8])> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    off += 2;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
        off += 4;
    }
    let ip = frame.get(off..)?;
    match ethertype {
        0x0800 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            if ihl < 20 || ip.len() < ihl {
                return None;
            }
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            Some((src.into(), dst.into(), ip[9], &ip[ihl..]))
        }
        0x86dd => {
            if ip.len() < 40 {
                return None;
            }
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            Some((src.into(), dst.into(), ip[6], &ip[40..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn runtime_filter_replaces_the_start_filter() {
        let rt = RuntimeFilters::new();
        let start = BlockFilter::all();
        assert!(start.matches_in(&rt, pb::BlockOp::Read));
        rt.set(&RuntimeFilter::Block {
            ops: "write".into(),
        })
        .unwrap();
        assert!(!start.matches_in(&rt, pb::BlockOp::Read));
        assert!(start.matches_in(&rt, pb::BlockOp::Write));
        let f = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
        let net = NetFilter::default();
        assert!(net.matches_in(&rt, pb::Direction::Rx, &f));
        let json = r#"{"kind":"net","directions":"tx","port":53}"#;
        rt.set(&serde_json::from_str(json).unwrap()).unwrap();
        assert!(!net.matches_in(&rt, pb::Direction::Rx, &f));
        assert!(net.matches_in(&rt, pb::Direction::Tx, &f));
        let bad: RuntimeFilter = serde_json::from_str(r#"{"kind":"block","ops":"erase"}"#).unwrap();
        assert_eq!(
            rt.set(&bad).unwrap_err().to_string(),
            "unknown block operation \"erase\""
        );
        assert!(rt
            .set(&RuntimeFilter::Net {
                directions: None,
                mac: None,
                ip: Some("x".into()),
                port: None
            })
            .is_err());
        assert!(serde_json::from_str::<RuntimeFilter>(r#"{"kind":"block","opz":"x"}"#).is_err());
    }

    #[test]
    fn block_ops() {
        let f = BlockFilter::parse("read, write").unwrap();
        assert!(f.matches(pb::BlockOp::Read));
        assert!(!f.matches(pb::BlockOp::Flush));
        assert!(BlockFilter::all().matches(pb::BlockOp::GetId));
        assert_eq!(
            BlockFilter::parse("read,bogus"),
            Err(FilterError::Op("bogus".into()))
        );
    }

    #[test]
    fn net_fields() {
        let f = udp4([10, 0, 0, 1], [10, 0, 0, 2], 5000, 53);
        let mut nf = NetFilter {
            port: Some(53),
            ..Default::default()
        };
        assert!(nf.matches(pb::Direction::Tx, &f));
        nf.ip = Some("10.0.0.2".parse().unwrap());
        assert!(nf.matches(pb::Direction::Rx, &f));
        nf.ip = Some("10.0.0.9".parse().unwrap());
        assert!(!nf.matches(pb::Direction::Rx, &f));
        let nf = NetFilter {
            mac: Some(parse_mac("02:00:00:00:00:02").unwrap()),
            direction: parse_directions("tx").unwrap(),
            ..Default::default()
        };
        assert!(nf.matches(pb::Direction::Tx, &f));
        assert!(!nf.matches(pb::Direction::Rx, &f));
        assert!(!nf.matches(pb::Direction::Tx, &f[..5]));
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }
}
