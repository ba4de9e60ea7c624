//! Dispatch benchmark: the replay loop (timeline, window, filter, clock,
//! delivery callback) over events already read, so Kafka and the guest are
//! not measured.
//!
//! - As fast as possible: events/s for a block-heavy and a net-heavy mix,
//!   with the default filter and with a filter that parses every frame.
//! - At 1x: the lateness of each dispatch against its due time (p50, p99,
//!   max) over a 2-second recording.
//! - For comparison, the event source's read rate from a real broker
//!   (Tansu with sqlite storage, from vmr-testkit; needs
//!   `~/.cache/vmreplay/tansu-0.6.0/bin/tansu`).
//!
//! Run with `cargo bench -p replayer --bench dispatch`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use replayer::filter::{Filter, NetMatch};
use replayer::replay::{self, BeforeWindow};
use replayer::schedule::{ReplayClock, Speed, Timeline, TimingSummary};
use replayer::source::{RecordPos, SourceItem, SourcedEvent};
use replayer::window::Window;
use replayer::Kind;
use vmr_proto::{
    BlockIo, BlockOp, BlockStatus, Direction, EnvSample, Event, InstanceId, Lifecycle,
    LifecycleKind, NetFrame, Payload,
};

fn udp_frame(seq: u64, len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(4000 + (seq % 16) as u16, 53);
    let mut out = Vec::with_capacity(len);
    b.write(&mut out, &vec![0x5a; len.saturating_sub(42)])
        .expect("writing to a Vec cannot fail");
    out
}

/// `n` events 10 µs apart; `block_share` percent block, the rest mostly
/// net, some env, and a pause/resume pair every 10 000 events.
fn mix(n: u64, block_share: u64) -> Vec<SourceItem> {
    let instance = InstanceId::new("bench-vm").expect("valid id");
    (1..=n)
        .map(|seq| {
            let payload = if seq % 10_000 == 5000 {
                Payload::Lifecycle(Lifecycle {
                    kind: LifecycleKind::Pause,
                    detail: String::new(),
                    regs: vec![],
                    gap: None,
                    snapshot_id: None,
                })
            } else if seq % 10_000 == 5001 {
                Payload::Lifecycle(Lifecycle {
                    kind: LifecycleKind::Resume,
                    detail: String::new(),
                    regs: vec![],
                    gap: None,
                    snapshot_id: None,
                })
            } else if seq % 100 < block_share {
                let write = seq % 3 != 0;
                Payload::Block(BlockIo {
                    device: "vda".into(),
                    queue: 0,
                    op: if write { BlockOp::Write } else { BlockOp::Read },
                    sector: seq * 8,
                    len: 4096,
                    data: if write { vec![7; 4096] } else { vec![] },
                    content_hash: None,
                    status: BlockStatus::Ok,
                })
            } else if seq % 100 < 95 {
                Payload::Net(NetFrame {
                    device: "eth0".into(),
                    queue: 0,
                    direction: if seq % 2 == 0 {
                        Direction::Rx
                    } else {
                        Direction::Tx
                    },
                    frame: udp_frame(seq, 1514),
                })
            } else {
                Payload::Env(EnvSample {
                    sensor: "host.load1".into(),
                    value: 0.5,
                    unit: String::new(),
                })
            };
            let kind = Kind::of(&payload);
            SourceItem::Event(SourcedEvent {
                event: Event {
                    instance: instance.clone(),
                    seq,
                    wall_time_ns: seq * 10_000,
                    mono_time_ns: seq * 10_000,
                    epoch: 1,
                    payload,
                },
                pos: RecordPos {
                    kind,
                    partition: 0,
                    offset: seq as i64,
                },
            })
        })
        .collect()
}

fn afap(items: Vec<SourceItem>, filter: Filter) -> (u64, u64, Duration) {
    let n = items.len() as u64;
    let mut timeline = Timeline::new(0, false);
    let mut clock = ReplayClock::new(Speed::AsFastAsPossible);
    let bounds = Window::All.resolve(None).expect("all resolves");
    let mut bytes = 0u64;
    let start = Instant::now();
    let report = replay::run(
        items.into_iter().map(Ok),
        &mut timeline,
        &bounds,
        BeforeWindow::Skip,
        &filter,
        &mut clock,
        |e, d| {
            bytes += match &e.event.payload {
                Payload::Block(b) => b.data.len() as u64,
                Payload::Net(f) => f.frame.len() as u64,
                _ => 0,
            };
            black_box(d);
            Ok::<_, std::io::Error>(())
        },
    )
    .expect("in-memory replay cannot fail");
    let took = start.elapsed();
    black_box(bytes);
    assert_eq!(report.delivered + report.filter.removed_total(), n);
    (n, report.delivered, took)
}

/// Produces `items` to a fresh Tansu broker and times reading them back
/// through the event source.
fn from_kafka(items: &[SourceItem]) -> (u64, Duration) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use replayer::source::{EventSource, SourceConfig};
    use replayer::KindSet;
    use vmr_proto::topics::partition_for;
    use vmr_proto::TopicOffset;

    let broker = vmr_testkit::broker::Broker::start()
        .unwrap_or_else(|e| panic!("the Kafka row needs the Tansu broker: {e}"));
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .expect("create producer");
    let parts = vmr_testkit::broker::TEST_EVENT_PARTITIONS;
    let mut buf = Vec::new();
    for item in items {
        let SourceItem::Event(e) = item else { continue };
        buf.clear();
        // Schema id 1: the source decodes the framing without the registry.
        schema_registry::codec::encode_message(
            1,
            &[0],
            &vmr_proto::pb::Event::from(e.event.clone()),
            &mut buf,
        );
        let key = e.event.instance.as_str();
        let mut record = BaseRecord::to(e.event.topic())
            .key(key)
            .partition(partition_for(key, parts))
            .payload(&buf);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    // The queue is full: let the producer's thread drain it.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .expect("all records delivered");
    let instance = InstanceId::new("bench-vm").expect("valid id");
    let start_offsets = Kind::ALL
        .iter()
        .map(|k| TopicOffset {
            topic: k.topic().into(),
            partition: instance.partition(parts),
            next_offset: 0,
        })
        .collect();
    let config = SourceConfig {
        bootstrap_servers: broker.bootstrap(),
        instance,
        seq_at_cut: 0,
        start: start_offsets,
        kinds: KindSet::all(),
        until_seq: None,
        topics: Default::default(),
        window: Default::default(),
        fetch_timeout: Duration::from_secs(30),
        security: Default::default(),
    };
    let start = Instant::now();
    let mut n = 0;
    for item in EventSource::open(config).expect("open the source") {
        if let SourceItem::Event(e) = item.expect("read") {
            black_box(&e);
            n += 1;
        }
    }
    (n, start.elapsed())
}

/// Dispatches `n` events `spacing` apart at 1x; lateness percentiles.
fn one_x(n: u64, spacing: Duration) -> TimingSummary {
    let mut clock = ReplayClock::new(Speed::REALTIME);
    let mut dispatches = Vec::with_capacity(n as usize);
    for seq in 1..=n {
        let d = clock
            .wait(seq, spacing * seq as u32)
            .expect("the clock is not stopped");
        dispatches.push(d);
    }
    TimingSummary::of(&dispatches).expect("timed dispatches")
}

fn main() {
    const N: u64 = 200_000;
    println!(
        "As fast as possible (timeline + window + filter + clock + delivery; no Kafka, no guest)"
    );
    println!(
        "{:<12} {:<22} {:>9} {:>10} {:>10} {:>12}",
        "mix", "filter", "events", "delivered", "seconds", "events/s"
    );
    let port_filter = || Filter {
        exclude_net: NetMatch {
            ports: vec![4001],
            ..NetMatch::default()
        },
        ..Filter::default()
    };
    for (name, block_share) in [("block-heavy", 80), ("net-heavy", 10)] {
        for (fname, filter) in [
            ("none", Filter::default()),
            ("exclude udp port 4001", port_filter()),
        ] {
            let items = mix(N, block_share);
            let (n, delivered, took) = afap(items, filter);
            println!(
                "{:<12} {:<22} {:>9} {:>10} {:>10.3} {:>12.0}",
                name,
                fname,
                n,
                delivered,
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64()
            );
        }
    }

    println!();
    println!("Timing at 1x: 2000 events 1 ms apart (2 s), lateness of dispatch against due time");
    println!(
        "{:<34} {:>8} {:>12} {:>12} {:>12}",
        "dispatch thread", "events", "p50", "p99", "max"
    );
    for (name, realtime) in [
        ("default policy", false),
        ("set_realtime_priority(10)", true),
    ] {
        let t = std::thread::spawn(move || {
            if realtime {
                replayer::schedule::set_realtime_priority(10)?;
            }
            Ok::<_, std::io::Error>(one_x(2000, Duration::from_millis(1)))
        })
        .join()
        .expect("the timing thread does not panic");
        match t {
            Ok(t) => println!(
                "{:<34} {:>8} {:>12?} {:>12?} {:>12?}",
                name, t.count, t.p50, t.p99, t.max
            ),
            Err(e) => println!("{name:<34} not measured: {e}"),
        }
    }

    println!();
    println!("Event source reading from Kafka (Tansu 0.6, sqlite storage, one instance)");
    println!(
        "{:<12} {:>9} {:>10} {:>12}",
        "mix", "events", "seconds", "events/s"
    );
    for (name, block_share) in [("block-heavy", 80), ("net-heavy", 10)] {
        let items = mix(20_000, block_share);
        let (n, took) = from_kafka(&items);
        assert_eq!(n, 20_000, "every event read back");
        println!(
            "{:<12} {:>9} {:>10.3} {:>12.0}",
            name,
            n,
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        );
    }
}
