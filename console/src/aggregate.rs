//! Per-instance rollups of the recorded events, so that a timeline overview
//! is answered from counts and never from raw events.
//!
//! For each instance the aggregator keeps, at every resolution of
//! [`RESOLUTIONS_NS`]: event counts per series (device and direction: block
//! `read` / `write` / `other`, net `rx` / `tx`) per time bucket, and sensor
//! readings per bucket (count, sum, min, max). It also keeps the lifecycle
//! markers, a sparse `seq` → time index (to place a clone's replay position
//! on the timeline) and, per topic, the first Kafka offset of every second
//! (to read the raw events of a selected range back from the log).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use vmr_proto::{BlockOp, Direction, Event, LifecycleKind, Payload};

/// Bucket widths, finest first: 10 ms, 100 ms, 1 s, 10 s, 1 min.
pub const RESOLUTIONS_NS: [u64; 5] = [
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    60_000_000_000,
];

/// Most lifecycle markers kept per instance (the oldest go first).
pub const MAX_MARKERS: usize = 20_000;

/// Every `seq` up to this one is indexed exactly; later ones every
/// [`SEQ_STRIDE`]th (positions in between are interpolated).
pub const SEQ_EXACT_UPTO: u64 = 65_536;
/// Stride of the sparse `seq` index beyond [`SEQ_EXACT_UPTO`].
pub const SEQ_STRIDE: u64 = 16;

/// Granularity of the offset index used by range queries.
const OFFSET_INDEX_NS: u64 = 1_000_000_000;

/// Which series an event counts in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SeriesKey {
    /// `block` or `net`.
    pub kind: &'static str,
    pub device: String,
    /// `read`, `write` or `other` for block; `rx` or `tx` for net.
    pub direction: &'static str,
}

/// Counts per bucket at one resolution; buckets sorted by index.
#[derive(Debug, Default, Clone)]
struct Counts(Vec<(u64, u32)>);

impl Counts {
    fn add(&mut self, bucket: u64) {
        match self.0.last_mut() {
            Some((b, n)) if *b == bucket => *n += 1,
            Some((b, _)) if *b > bucket => match self.0.binary_search_by_key(&bucket, |e| e.0) {
                Ok(i) => self.0[i].1 += 1,
                Err(i) => self.0.insert(i, (bucket, 1)),
            },
            _ => self.0.push((bucket, 1)),
        }
    }

    fn range(&self, from: u64, to: u64) -> &[(u64, u32)] {
        let a = self.0.partition_point(|e| e.0 < from);
        let b = self.0.partition_point(|e| e.0 <= to);
        &self.0[a..b]
    }
}

/// Sensor readings of one bucket.
#[derive(Debug, Clone, Copy)]
struct Reading {
    bucket: u64,
    count: u32,
    sum: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Default, Clone)]
struct Readings(Vec<Reading>);

impl Readings {
    fn add(&mut self, bucket: u64, v: f64) {
        let fresh = Reading {
            bucket,
            count: 1,
            sum: v,
            min: v,
            max: v,
        };
        let merge = |r: &mut Reading| {
            r.count += 1;
            r.sum += v;
            r.min = r.min.min(v);
            r.max = r.max.max(v);
        };
        match self.0.last_mut() {
            Some(r) if r.bucket == bucket => merge(r),
            Some(r) if r.bucket > bucket => {
                match self.0.binary_search_by_key(&bucket, |r| r.bucket) {
                    Ok(i) => merge(&mut self.0[i]),
                    Err(i) => self.0.insert(i, fresh),
                }
            }
            _ => self.0.push(fresh),
        }
    }

    fn range(&self, from: u64, to: u64) -> &[Reading] {
        let a = self.0.partition_point(|r| r.bucket < from);
        let b = self.0.partition_point(|r| r.bucket <= to);
        &self.0[a..b]
    }
}

/// A lifecycle event of the recording.
#[derive(Debug, Clone, Serialize)]
pub struct Marker {
    pub t: u64,
    pub seq: u64,
    /// `boot`, `pause`, `resume`, `snapshot`, `crash`, `gap`, `shutdown`,
    /// `triple_fault`, `internal_error`.
    pub kind: &'static str,
    pub detail: String,
}

/// Name of a lifecycle kind as the console shows it.
pub fn lifecycle_name(k: LifecycleKind) -> &'static str {
    match k {
        LifecycleKind::Boot => "boot",
        LifecycleKind::Pause => "pause",
        LifecycleKind::Resume => "resume",
        LifecycleKind::Snapshot => "snapshot",
        LifecycleKind::Crash => "crash",
        LifecycleKind::Gap => "gap",
        LifecycleKind::Shutdown => "shutdown",
        LifecycleKind::TripleFault => "triple_fault",
        LifecycleKind::InternalError => "internal_error",
    }
}

/// Name of a protobuf lifecycle kind (`unspecified` when unknown).
pub fn lifecycle_name_pb(kind: i32) -> &'static str {
    LifecycleKind::try_from(kind)
        .map(lifecycle_name)
        .unwrap_or("unspecified")
}

/// Whether a lifecycle kind ends the guest abnormally.
pub fn is_crash(k: LifecycleKind) -> bool {
    matches!(
        k,
        LifecycleKind::Crash | LifecycleKind::TripleFault | LifecycleKind::InternalError
    )
}

/// Where in the log the events of one second start.
#[derive(Debug, Clone, Default)]
pub struct OffsetIndex {
    pub partition: i32,
    /// (second since the epoch, first offset of the instance in it), sorted.
    pub entries: Vec<(u64, i64)>,
    /// Offset of the instance's last record on this topic.
    pub last_offset: i64,
}

impl OffsetIndex {
    /// The offset to start reading at for events at or after `t_ns`.
    pub fn start_for(&self, t_ns: u64) -> Option<i64> {
        let sec = t_ns / OFFSET_INDEX_NS;
        let i = self.entries.partition_point(|e| e.0 <= sec);
        if i == 0 {
            self.entries.first().map(|e| e.1)
        } else {
            Some(self.entries[i - 1].1)
        }
    }
}

/// Everything the aggregator knows of one instance.
#[derive(Debug, Default)]
pub struct InstanceRollup {
    pub events: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub last_seq: u64,
    series: BTreeMap<SeriesKey, [Counts; 5]>,
    sensors: BTreeMap<String, (String, [Readings; 5])>,
    markers: Vec<Marker>,
    seq_index: BTreeMap<u64, u64>,
    /// Per topic.
    pub offsets: HashMap<&'static str, OffsetIndex>,
}

/// Where an event came from in the log.
#[derive(Debug, Clone, Copy)]
pub struct LogPos {
    pub topic: &'static str,
    pub partition: i32,
    pub offset: i64,
}

/// One series of counts in an overview.
#[derive(Debug, Serialize)]
pub struct SeriesOut {
    #[serde(flatten)]
    pub key: SeriesKey,
    /// (bucket start ns, count).
    pub buckets: Vec<(u64, u32)>,
    pub total: u64,
}

/// One sensor in an overview.
#[derive(Debug, Serialize)]
pub struct SensorOut {
    pub name: String,
    pub unit: String,
    /// (bucket start ns, mean, min, max).
    pub points: Vec<(u64, f64, f64, f64)>,
}

/// A timeline overview of one instance over one time range.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub instance: String,
    pub from_ns: u64,
    pub to_ns: u64,
    pub resolution_ns: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub events: u64,
    pub last_seq: u64,
    pub series: Vec<SeriesOut>,
    pub sensors: Vec<SensorOut>,
    pub markers: Vec<Marker>,
}

/// A summary line of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSummary {
    pub id: String,
    pub events: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub last_seq: u64,
    /// Time of the last crash marker, if any.
    pub crashed_ns: Option<u64>,
}

/// The rollups of every instance seen.
#[derive(Debug, Default)]
pub struct Aggregator {
    instances: HashMap<String, InstanceRollup>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one event read from `pos`.
    pub fn ingest(&mut self, e: &Event, pos: Option<LogPos>) {
        let r = match self.instances.get_mut(e.instance.as_str()) {
            Some(r) => r,
            None => self
                .instances
                .entry(e.instance.as_str().to_string())
                .or_default(),
        };
        r.ingest(e, pos);
    }

    pub fn instance(&self, id: &str) -> Option<&InstanceRollup> {
        self.instances.get(id)
    }

    /// Every instance for which `visible` holds, by id.
    pub fn instances(&self, visible: impl Fn(&str) -> bool) -> Vec<InstanceSummary> {
        let mut out: Vec<_> = self
            .instances
            .iter()
            .filter(|(id, _)| visible(id))
            .map(|(id, r)| r.summary(id))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

impl InstanceRollup {
    fn ingest(&mut self, e: &Event, pos: Option<LogPos>) {
        let t = e.wall_time_ns;
        self.events += 1;
        if self.first_ns == 0 || t < self.first_ns {
            self.first_ns = t;
        }
        self.last_ns = self.last_ns.max(t);
        self.last_seq = self.last_seq.max(e.seq);
        let lifecycle = matches!(e.payload, Payload::Lifecycle(_));
        if e.seq <= SEQ_EXACT_UPTO || e.seq % SEQ_STRIDE == 0 || lifecycle {
            self.seq_index.insert(e.seq, t);
        }
        if let Some(p) = pos {
            let idx = self.offsets.entry(p.topic).or_default();
            idx.partition = p.partition;
            idx.last_offset = idx.last_offset.max(p.offset);
            let sec = t / OFFSET_INDEX_NS;
            match idx.entries.last() {
                Some(&(s, _)) if s >= sec => {}
                _ => idx.entries.push((sec, p.offset)),
            }
        }
        let key = match &e.payload {
            Payload::Block(b) => SeriesKey {
                kind: "block",
                device: b.device.clone(),
                direction: match b.op {
                    BlockOp::Read => "read",
                    BlockOp::Write | BlockOp::WriteZeroes | BlockOp::Discard => "write",
                    BlockOp::Flush | BlockOp::GetId => "other",
                },
            },
            Payload::Net(n) => SeriesKey {
                kind: "net",
                device: n.device.clone(),
                direction: match n.direction {
                    Direction::Tx => "tx",
                    _ => "rx",
                },
            },
            Payload::Env(s) => {
                let (_, rs) = match self.sensors.get_mut(&s.sensor) {
                    Some(x) => x,
                    None => self
                        .sensors
                        .entry(s.sensor.clone())
                        .or_insert_with(|| (s.unit.clone(), Default::default())),
                };
                for (i, res) in RESOLUTIONS_NS.iter().enumerate() {
                    rs[i].add(t / res, s.value);
                }
                return;
            }
            Payload::Lifecycle(l) => {
                let mut detail = l.detail.clone();
                if let Some(g) = &l.gap {
                    detail = format!(
                        "{} events lost from seq {} ({})",
                        g.count, g.first_seq, g.reason
                    );
                }
                if let Some(id) = &l.snapshot_id {
                    detail = format!("snapshot {id}");
                }
                if self.markers.len() >= MAX_MARKERS {
                    self.markers.remove(0);
                }
                let m = Marker {
                    t,
                    seq: e.seq,
                    kind: lifecycle_name(l.kind),
                    detail,
                };
                let i = self.markers.partition_point(|x| (x.t, x.seq) <= (t, e.seq));
                self.markers.insert(i, m);
                return;
            }
        };
        let counts = match self.series.get_mut(&key) {
            Some(c) => c,
            None => self.series.entry(key).or_default(),
        };
        for (i, res) in RESOLUTIONS_NS.iter().enumerate() {
            counts[i].add(t / res);
        }
    }

    fn summary(&self, id: &str) -> InstanceSummary {
        InstanceSummary {
            id: id.to_string(),
            events: self.events,
            first_ns: self.first_ns,
            last_ns: self.last_ns,
            last_seq: self.last_seq,
            crashed_ns: self
                .markers
                .iter()
                .rev()
                .find(|m| matches!(m.kind, "crash" | "triple_fault" | "internal_error"))
                .map(|m| m.t),
        }
    }

    /// The finest resolution that covers `[from, to]` in at most `points`
    /// buckets (the coarsest one when none does).
    pub fn resolution_for(from: u64, to: u64, points: u64) -> u64 {
        let span = to.saturating_sub(from).max(1);
        RESOLUTIONS_NS
            .iter()
            .copied()
            .find(|r| span / r < points.max(1))
            .unwrap_or(RESOLUTIONS_NS[RESOLUTIONS_NS.len() - 1])
    }

    /// The overview of `[from, to]` (ns; 0 and 0 mean the whole recording)
    /// in about `points` buckets.
    pub fn overview(&self, id: &str, from: u64, to: u64, points: u64) -> Overview {
        let (from, to) = if from == 0 && to == 0 {
            // The whole recording, with a margin so that the first and last
            // events do not sit on the edges.
            let span = self.last_ns.saturating_sub(self.first_ns).max(1);
            let pad = span / 50;
            (
                self.first_ns.saturating_sub(pad),
                self.last_ns.max(self.first_ns + 1) + pad,
            )
        } else {
            (from, to.max(from + 1))
        };
        let res = Self::resolution_for(from, to, points);
        let ri = RESOLUTIONS_NS
            .iter()
            .position(|r| *r == res)
            .expect("resolution_for returns one of RESOLUTIONS_NS");
        let (bf, bt) = (from / res, to / res);
        let series = self
            .series
            .iter()
            .map(|(k, c)| {
                let slice = c[ri].range(bf, bt);
                SeriesOut {
                    key: k.clone(),
                    total: slice.iter().map(|e| u64::from(e.1)).sum(),
                    buckets: slice.iter().map(|&(b, n)| (b * res, n)).collect(),
                }
            })
            .collect();
        let sensors = self
            .sensors
            .iter()
            .map(|(name, (unit, rs))| SensorOut {
                name: name.clone(),
                unit: unit.clone(),
                points: rs[ri]
                    .range(bf, bt)
                    .iter()
                    .map(|r| (r.bucket * res, r.sum / f64::from(r.count), r.min, r.max))
                    .collect(),
            })
            .collect();
        let a = self.markers.partition_point(|m| m.t < from);
        let b = self.markers.partition_point(|m| m.t <= to);
        Overview {
            instance: id.to_string(),
            from_ns: from,
            to_ns: to,
            resolution_ns: res,
            first_ns: self.first_ns,
            last_ns: self.last_ns,
            events: self.events,
            last_seq: self.last_seq,
            series,
            sensors,
            markers: self.markers[a..b].to_vec(),
        }
    }

    /// Recorded wall time of `seq`: exact where indexed, otherwise
    /// interpolated between the nearest indexed neighbours.
    pub fn time_of_seq(&self, seq: u64) -> Option<u64> {
        if let Some(t) = self.seq_index.get(&seq) {
            return Some(*t);
        }
        let before = self.seq_index.range(..seq).next_back();
        let after = self.seq_index.range(seq..).next();
        match (before, after) {
            (Some((&s0, &t0)), Some((&s1, &t1))) => {
                let f = (seq - s0) as f64 / (s1 - s0) as f64;
                Some(t0 + ((t1 as f64 - t0 as f64) * f) as u64)
            }
            (Some((_, &t)), None) | (None, Some((_, &t))) => Some(t),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::{BlockIo, BlockStatus, EnvSample, InstanceId, Lifecycle, NetFrame};

    fn ev(seq: u64, t: u64, payload: Payload) -> Event {
        Event {
            instance: InstanceId::new("vm-1").expect("valid id"),
            seq,
            wall_time_ns: t,
            mono_time_ns: t,
            epoch: 1,
            payload,
        }
    }

    fn blk(op: BlockOp) -> Payload {
        Payload::Block(BlockIo {
            device: "vda".into(),
            queue: 0,
            op,
            sector: 8,
            len: 4096,
            data: vec![],
            content_hash: None,
            status: BlockStatus::Ok,
        })
    }

    fn net(direction: Direction) -> Payload {
        Payload::Net(NetFrame {
            device: "net0".into(),
            queue: 0,
            direction,
            frame: vec![0; 60],
        })
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn counts_per_series_and_bucket() {
        let mut a = Aggregator::new();
        let t0 = 1_700_000_000 * S;
        for i in 0..100u64 {
            let p = match i % 4 {
                0 => blk(BlockOp::Read),
                1 => blk(BlockOp::Write),
                2 => net(Direction::Rx),
                _ => net(Direction::Tx),
            };
            a.ingest(&ev(i + 1, t0 + i * S / 10, p), None);
        }
        let r = a.instance("vm-1").expect("seen");
        let o = r.overview("vm-1", 0, 0, 200);
        assert_eq!(o.resolution_ns, 100_000_000);
        assert_eq!(o.series.len(), 4);
        assert_eq!(o.series.iter().map(|s| s.total).sum::<u64>(), 100);
        let reads = o
            .series
            .iter()
            .find(|s| s.key.kind == "block" && s.key.direction == "read")
            .expect("read series");
        assert_eq!(reads.total, 25);
        // A coarse overview sums to the same counts.
        let coarse = r.overview("vm-1", t0, t0 + 10 * S, 5);
        assert_eq!(coarse.resolution_ns, 10 * S);
        assert_eq!(coarse.series.iter().map(|s| s.total).sum::<u64>(), 100);
    }

    #[test]
    fn out_of_order_buckets_are_merged() {
        let mut c = Counts::default();
        for b in [5, 7, 6, 5, 9, 1] {
            c.add(b);
        }
        assert_eq!(c.0, vec![(1, 1), (5, 2), (6, 1), (7, 1), (9, 1)]);
        assert_eq!(c.range(5, 7).len(), 3);
    }

    #[test]
    fn markers_sensors_and_seq_positions() {
        let mut a = Aggregator::new();
        let life = |kind| {
            Payload::Lifecycle(Lifecycle {
                kind,
                detail: "x".into(),
                regs: vec![],
                gap: None,
                snapshot_id: None,
            })
        };
        a.ingest(&ev(1, 10 * S, life(LifecycleKind::Boot)), None);
        for i in 0..10 {
            a.ingest(
                &ev(
                    2 + i,
                    (11 + i) * S,
                    Payload::Env(EnvSample {
                        sensor: "host.load1".into(),
                        value: i as f64,
                        unit: "".into(),
                    }),
                ),
                None,
            );
        }
        a.ingest(&ev(12, 30 * S, life(LifecycleKind::TripleFault)), None);
        let r = a.instance("vm-1").expect("seen");
        let o = r.overview("vm-1", 0, 0, 100);
        assert_eq!(o.markers.len(), 2);
        assert_eq!(o.markers[1].kind, "triple_fault");
        assert_eq!(o.sensors[0].points.len(), 10);
        assert_eq!(o.sensors[0].points[3].1, 3.0);
        assert_eq!(r.time_of_seq(12), Some(30 * S));
        let s = a.instances(|_| true);
        assert_eq!(s[0].crashed_ns, Some(30 * S));
        assert!(a.instances(|id| id != "vm-1").is_empty());
    }

    #[test]
    fn sparse_seq_index_interpolates() {
        let mut a = Aggregator::new();
        let base = SEQ_EXACT_UPTO - 4;
        for i in 0..64 {
            a.ingest(&ev(base + i, (base + i) * S, net(Direction::Rx)), None);
        }
        let r = a.instance("vm-1").expect("seen");
        // Not indexed itself: interpolated between SEQ_EXACT_UPTO and the
        // next multiple of the stride.
        assert!(!r.seq_index.contains_key(&(base + 10)));
        assert_eq!(r.time_of_seq(base + 10), Some((base + 10) * S));
    }

    #[test]
    fn offset_index_finds_the_second() {
        let mut a = Aggregator::new();
        for i in 0..30u64 {
            let pos = LogPos {
                topic: "vmr.net.v1",
                partition: 2,
                offset: 100 + i as i64,
            };
            a.ingest(
                &ev(i + 1, 50 * S + i * S / 10, net(Direction::Rx)),
                Some(pos),
            );
        }
        let idx = &a.instance("vm-1").expect("seen").offsets["vmr.net.v1"];
        assert_eq!(idx.partition, 2);
        assert_eq!(idx.start_for(51 * S + S / 2), Some(110));
        assert_eq!(idx.start_for(0), Some(100));
        assert_eq!(idx.last_offset, 129);
    }
}
