//! `vmr events tail`: decoded events from the `vmr.*` event topics.
//!
//! Values are Confluent-framed `vmr.v1.Event` protobufs. With `--instance`
//! only that instance's partition is read (the murmur2 rule of
//! [`vmr_proto::topics::partition_for`]). A record that does not decode (bad
//! framing, bad protobuf, invalid event) is reported on stderr and skipped.
//!
//! Without `--follow` the command reads what the topics hold when it starts
//! and exits at their end; with `--follow` it keeps waiting for new events,
//! starting at the end unless `--from-beginning`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use prost::Message as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use vmr_proto::{pb, topics, Event, Payload};

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::output::{println_safe, Out};
use crate::util::rfc3339_ns;

/// `vmr events` subcommands.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print decoded events, one line each.
    Tail(TailArgs),
}

/// Event kinds, one per topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Block,
    Net,
    Env,
    Lifecycle,
}

impl Kind {
    /// The topic of this kind.
    pub fn topic(self) -> &'static str {
        match self {
            Kind::Block => topics::BLOCK,
            Kind::Net => topics::NET,
            Kind::Env => topics::ENV,
            Kind::Lifecycle => topics::LIFECYCLE,
        }
    }
}

/// An inclusive range of sequence numbers: `N`, `A..B`, `A..` or `..B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl std::str::FromStr for SeqRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str, d: u64| -> Result<u64, String> {
            if t.is_empty() {
                Ok(d)
            } else {
                t.parse()
                    .map_err(|_| format!("{t:?} is not a sequence number"))
            }
        };
        let r = match s.split_once("..") {
            Some((a, b)) => SeqRange {
                first: num(a, 0)?,
                last: num(b, u64::MAX)?,
            },
            None => {
                let n = num(s, 0)?;
                SeqRange { first: n, last: n }
            }
        };
        if r.first > r.last {
            return Err(format!("empty range {s:?}: {} > {}", r.first, r.last));
        }
        Ok(r)
    }
}

/// Arguments of `vmr events tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Only this instance (reads only its partition).
    #[arg(long, short)]
    pub instance: Option<String>,
    /// Only these kinds (repeat or comma-separate).
    #[arg(long, short, value_enum, value_delimiter = ',')]
    pub kind: Vec<Kind>,
    /// Only this device (block or net device name, or env sensor name).
    #[arg(long, short)]
    pub device: Option<String>,
    /// Only these sequence numbers: N, A..B (inclusive), A.. or ..B.
    #[arg(long)]
    pub seq: Option<SeqRange>,
    /// Keep waiting for new events.
    #[arg(long, short)]
    pub follow: bool,
    /// With --follow: start at the oldest event instead of the end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    pub limit: Option<u64>,
    /// With --follow: stop after this many seconds (default: until interrupted).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Seconds to wait for the broker's metadata and for reaching the end of
    /// the topics.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub timeout: f64,
}

/// Why a record was skipped.
fn decode(value: &[u8]) -> Result<Event, String> {
    let framed = schema_registry::codec::decode(value).map_err(|e| e.to_string())?;
    let pb_event = pb::Event::decode(framed.payload)
        .map_err(|e| format!("schema id {}: not a vmr.v1.Event: {e}", framed.schema_id))?;
    Event::try_from(pb_event).map_err(|e| format!("invalid event: {e}"))
}

fn lower<T: std::fmt::Debug>(v: T) -> String {
    // Enum names as words: `WriteZeroes` -> `write_zeroes`.
    let s = format!("{v:?}");
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn kind_of(e: &Event) -> Kind {
    match &e.payload {
        Payload::Block(_) => Kind::Block,
        Payload::Net(_) => Kind::Net,
        Payload::Env(_) => Kind::Env,
        Payload::Lifecycle(_) => Kind::Lifecycle,
    }
}

fn device_of(e: &Event) -> Option<&str> {
    match &e.payload {
        Payload::Block(b) => Some(&b.device),
        Payload::Net(n) => Some(&n.device),
        Payload::Env(s) => Some(&s.sensor),
        Payload::Lifecycle(_) => None,
    }
}

/// What a frame says at layers 2 to 4.
#[derive(Debug, Default)]
struct FrameInfo {
    src_mac: String,
    dst_mac: String,
    ethertype: u16,
    src_ip: Option<IpAddr>,
    dst_ip: Option<IpAddr>,
    protocol: Option<&'static str>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

fn mac(b: [u8; 6]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn frame_info(frame: &[u8]) -> FrameInfo {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let mut fi = FrameInfo::default();
    if frame.len() >= 14 {
        fi.dst_mac = mac(frame[0..6].try_into().expect("6 bytes"));
        fi.src_mac = mac(frame[6..12].try_into().expect("6 bytes"));
        fi.ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    }
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return fi;
    };
    match &p.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            fi.src_ip = Some(IpAddr::V4(Ipv4Addr::from(h.source())));
            fi.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(h.destination())));
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            fi.src_ip = Some(IpAddr::V6(Ipv6Addr::from(h.source())));
            fi.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(h.destination())));
        }
        _ => {}
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            fi.protocol = Some("tcp");
            fi.src_port = Some(t.source_port());
            fi.dst_port = Some(t.destination_port());
        }
        Some(TransportSlice::Udp(u)) => {
            fi.protocol = Some("udp");
            fi.src_port = Some(u.source_port());
            fi.dst_port = Some(u.destination_port());
        }
        Some(TransportSlice::Icmpv4(_)) => fi.protocol = Some("icmp"),
        Some(TransportSlice::Icmpv6(_)) => fi.protocol = Some("icmpv6"),
        _ => {}
    }
    if fi.protocol.is_none() && fi.ethertype == 0x0806 {
        fi.protocol = Some("arp");
    }
    fi
}

fn endpoint(ip: Option<IpAddr>, port: Option<u16>) -> String {
    match (ip, port) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => String::new(),
    }
}

/// The one-line summary of an event's payload.
pub fn summary(e: &Event) -> String {
    match &e.payload {
        Payload::Block(b) => format!(
            "{} sector={} len={} status={}",
            lower(b.op),
            b.sector,
            b.len,
            lower(b.status)
        ),
        Payload::Net(n) => {
            let fi = frame_info(&n.frame);
            let mut s = format!("{} {} > {}", lower(n.direction), fi.src_mac, fi.dst_mac);
            if fi.src_ip.is_some() {
                s.push_str(&format!(
                    " {} {} > {}",
                    fi.protocol.unwrap_or("ip"),
                    endpoint(fi.src_ip, fi.src_port),
                    endpoint(fi.dst_ip, fi.dst_port)
                ));
            } else if let Some(p) = fi.protocol {
                s.push_str(&format!(" {p}"));
            } else {
                s.push_str(&format!(" ethertype={:#06x}", fi.ethertype));
            }
            s.push_str(&format!(" len={}", n.frame.len()));
            s
        }
        Payload::Env(s) => format!("{}={} {}", s.sensor, s.value, s.unit),
        Payload::Lifecycle(l) => {
            let mut s = lower(l.kind);
            if let Some(g) = &l.gap {
                s.push_str(&format!(
                    " seq {}..{} missing ({})",
                    g.first_seq,
                    g.first_seq + g.count.saturating_sub(1),
                    g.reason
                ));
            }
            if let Some(id) = &l.snapshot_id {
                s.push_str(&format!(" snapshot={id}"));
            }
            if !l.detail.is_empty() {
                s.push_str(&format!(" {}", l.detail));
            }
            s
        }
    }
}

/// The event as one JSON object (the `--json` line format, docs/cli.md).
pub fn event_json(e: &Event, topic: &str, partition: i32, offset: i64) -> Value {
    let mut v = json!({
        "instance": e.instance.as_str(),
        "seq": e.seq,
        "epoch": e.epoch,
        "wall_time_ns": e.wall_time_ns,
        "mono_time_ns": e.mono_time_ns,
        "time": rfc3339_ns(e.wall_time_ns),
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "kind": format!("{:?}", kind_of(e)).to_lowercase(),
        "device": device_of(e),
        "summary": summary(e),
    });
    match &e.payload {
        Payload::Block(b) => {
            v["block"] = json!({
                "op": lower(b.op),
                "sector": b.sector,
                "len": b.len,
                "queue": b.queue,
                "status": lower(b.status),
                "data_bytes": b.data.len(),
            });
        }
        Payload::Net(n) => {
            let fi = frame_info(&n.frame);
            v["net"] = json!({
                "direction": lower(n.direction),
                "queue": n.queue,
                "len": n.frame.len(),
                "src_mac": fi.src_mac,
                "dst_mac": fi.dst_mac,
                "ethertype": fi.ethertype,
                "protocol": fi.protocol,
                "src_ip": fi.src_ip.map(|a| a.to_string()),
                "dst_ip": fi.dst_ip.map(|a| a.to_string()),
                "src_port": fi.src_port,
                "dst_port": fi.dst_port,
            });
        }
        Payload::Env(s) => {
            v["env"] = json!({ "sensor": s.sensor, "value": s.value, "unit": s.unit });
        }
        Payload::Lifecycle(l) => {
            v["lifecycle"] = json!({
                "kind": lower(l.kind),
                "detail": l.detail,
                "snapshot_id": l.snapshot_id,
                "gap": l.gap.as_ref().map(|g| json!({
                    "first_seq": g.first_seq, "count": g.count, "reason": g.reason
                })),
                "vcpus_with_regs": l.regs.len(),
            });
        }
    }
    v
}

fn human_line(e: &Event) -> String {
    format!(
        "{:<12} {:>8}  {}  {:<9} {:<8} {}",
        e.instance.as_str(),
        e.seq,
        rfc3339_ns(e.wall_time_ns),
        format!("{:?}", kind_of(e)).to_lowercase(),
        device_of(e).unwrap_or("-"),
        summary(e)
    )
}

fn tail(cfg: &Config, a: &TailArgs, out: &Out) -> CliResult {
    if let Some(i) = &a.instance {
        vmr_proto::InstanceId::new(i.clone())
            .map_err(|e| CliError::usage(format!("--instance {i:?}: {e}")))?;
    }
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    let timeout = Duration::from_secs_f64(a.timeout);
    let bs = &cfg.endpoints.bootstrap_servers;
    let consumer = crate::kafka::consumer(bs, &cfg.endpoints.kafka_security)?;
    let have = crate::kafka::topics(&consumer, bs, timeout)?;
    let kinds: Vec<Kind> = if a.kind.is_empty() {
        vec![Kind::Block, Kind::Net, Kind::Env, Kind::Lifecycle]
    } else {
        a.kind.clone()
    };
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let start_at_end = a.follow && !a.from_beginning;
    for k in &kinds {
        let topic = k.topic();
        let Some(&n) = have.get(topic) else {
            return Err(CliError::precondition(format!(
                "topic {topic} does not exist on the broker at {bs}"
            ))
            .hint("create the topics with `vmr stack up` (local stack); see `vmr doctor`"));
        };
        let parts: Vec<i32> = match &a.instance {
            Some(i) => vec![topics::partition_for(i, n)],
            None => (0..n).collect(),
        };
        for p in parts {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| {
                CliError::unavailable(format!(
                    "the broker at {bs} did not give the offsets of {topic}[{p}]: {e}"
                ))
                .hint("check the broker with `vmr doctor`")
            })?;
            let start = if start_at_end { high } else { low };
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| CliError::other(format!("assigning {topic}[{p}]: {e}")))?;
            if !a.follow && high > start {
                ends.insert((topic.to_string(), p), high);
            }
        }
    }
    consumer
        .assign(&tpl)
        .map_err(|e| CliError::other(format!("assigning partitions: {e}")))?;
    let started = Instant::now();
    let stop_at = a
        .duration
        .map(|d| started + Duration::from_secs_f64(d.max(0.0)));
    let mut printed: u64 = 0;
    let mut skipped: u64 = 0;
    let mut last_progress = Instant::now();
    loop {
        if !a.follow && ends.is_empty() {
            break;
        }
        if a.limit.is_some_and(|l| printed >= l) {
            break;
        }
        let now = Instant::now();
        if stop_at.is_some_and(|s| now >= s) {
            break;
        }
        if !a.follow && now.duration_since(last_progress) > timeout {
            let left: Vec<String> = ends.keys().map(|(t, p)| format!("{t}[{p}]")).collect();
            return Err(CliError::unavailable(format!(
                "no records arrived from the broker at {bs} for {:.0}s while {} still had records to read",
                timeout.as_secs_f64(),
                left.join(", ")
            ))
            .hint("check the broker with `vmr doctor`, or raise --timeout"));
        }
        let Some(res) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = match res {
            Ok(m) => m,
            Err(e) => {
                out.warn(&format!("broker: {e}"));
                continue;
            }
        };
        last_progress = Instant::now();
        let topic = msg.topic().to_string();
        let (p, off) = (msg.partition(), msg.offset());
        let key = (topic.clone(), p);
        if let Some(&end) = ends.get(&key) {
            if off + 1 >= end {
                ends.remove(&key);
            }
        }
        let Some(value) = msg.payload() else {
            skipped += 1;
            out.warn(&format!("skipped record {topic}[{p}]@{off}: no value"));
            continue;
        };
        let event = match decode(value) {
            Ok(e) => e,
            Err(why) => {
                skipped += 1;
                out.warn(&format!("skipped record {topic}[{p}]@{off}: {why}"));
                continue;
            }
        };
        if a.instance
            .as_deref()
            .is_some_and(|i| i != event.instance.as_str())
        {
            continue;
        }
        if a.seq
            .is_some_and(|r| event.seq < r.first || event.seq > r.last)
        {
            continue;
        }
        if a.device
            .as_deref()
            .is_some_and(|d| device_of(&event) != Some(d))
        {
            continue;
        }
        if out.json {
            out.json_line(&event_json(&event, &topic, p, off));
        } else {
            println_safe(&human_line(&event));
        }
        printed += 1;
    }
    if out.json {
        if !out.quiet {
            eprintln!("{}", json!({ "events": printed, "skipped": skipped }));
        }
    } else {
        out.progress(&format!("{printed} events, {skipped} skipped records"));
    }
    Ok(())
}

/// Every decodable event of `instance` the topics of `kinds` hold now
/// (oldest first per topic), with its topic; records that do not decode are
/// counted, not returned. Each wait is bounded by `timeout`.
pub fn read_instance(
    cfg: &Config,
    instance: &str,
    kinds: &[Kind],
    timeout: Duration,
) -> CliResult<(Vec<(String, Event)>, u64)> {
    let bs = &cfg.endpoints.bootstrap_servers;
    let consumer = crate::kafka::consumer(bs, &cfg.endpoints.kafka_security)?;
    let have = crate::kafka::topics(&consumer, bs, timeout)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for k in kinds {
        let topic = k.topic();
        let Some(&n) = have.get(topic) else {
            return Err(CliError::precondition(format!(
                "topic {topic} does not exist on the broker at {bs}"
            ))
            .hint("create the topics with `vmr stack up` (local stack); see `vmr doctor`"));
        };
        let p = topics::partition_for(instance, n);
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| {
            CliError::unavailable(format!(
                "the broker at {bs} did not give the offsets of {topic}[{p}]: {e}"
            ))
        })?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| CliError::other(format!("assigning {topic}[{p}]: {e}")))?;
            ends.insert((topic.to_string(), p), high);
        }
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    if ends.is_empty() {
        return Ok((out, skipped));
    }
    consumer
        .assign(&tpl)
        .map_err(|e| CliError::other(format!("assigning partitions: {e}")))?;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        if last_progress.elapsed() > timeout {
            return Err(CliError::unavailable(format!(
                "no records arrived from the broker at {bs} for {:.0}s before the end of the topics",
                timeout.as_secs_f64()
            )));
        }
        let Some(res) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(msg) = res else { continue };
        last_progress = Instant::now();
        let key = (msg.topic().to_string(), msg.partition());
        if let Some(&end) = ends.get(&key) {
            if msg.offset() + 1 >= end {
                ends.remove(&key);
            }
        }
        match msg.payload().map(decode) {
            Some(Ok(e)) if e.instance.as_str() == instance => out.push((key.0, e)),
            Some(Ok(_)) => {}
            _ => skipped += 1,
        }
    }
    Ok((out, skipped))
}

/// Runs an `events` subcommand.
pub fn run(cfg: &Config, c: &EventsCommand, out: &Out) -> CliResult {
    match c {
        EventsCommand::Tail(a) => tail(cfg, a, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_ranges_parse() {
        assert_eq!(
            "5".parse::<SeqRange>().unwrap(),
            SeqRange { first: 5, last: 5 }
        );
        assert_eq!(
            "3..".parse::<SeqRange>().unwrap(),
            SeqRange {
                first: 3,
                last: u64::MAX
            }
        );
        assert_eq!(
            "..9".parse::<SeqRange>().unwrap(),
            SeqRange { first: 0, last: 9 }
        );
        assert!("9..3".parse::<SeqRange>().is_err());
        assert!("x".parse::<SeqRange>().is_err());
    }

    #[test]
    fn enum_names_become_words() {
        assert_eq!(lower(vmr_proto::BlockOp::WriteZeroes), "write_zeroes");
        assert_eq!(lower(vmr_proto::Direction::Rx), "rx");
    }
}
