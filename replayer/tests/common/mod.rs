//! Shared by the replayer's broker tests: a real Tansu broker and Schema
//! Registry (from vmr-testkit), and a producer that writes events the way the
//! capture agent's shipper does (key = instance id, explicit partition by
//! murmur2, Confluent-framed `vmr.v1.Event`, ASCII headers `vmr.seq` and
//! `vmr.epoch`).
//!
//! Heavy: needs the Tansu broker (`~/.cache/vmreplay/tansu-0.6.0/bin/tansu`)
//! and the `schema-registry` binary (`cargo build -p schema-registry`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use replayer::Kind;
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_proto::topics::partition_for;
use vmr_proto::{
    pb, BlockIo, BlockOp, BlockStatus, Direction, EnvSample, Event, Gap, InstanceId, Lifecycle,
    LifecycleKind, NetFrame, Payload, TopicOffset,
};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::registry::Registry;

pub const PARTITIONS: i32 = TEST_EVENT_PARTITIONS;

/// A broker, a registry and a producer.
pub struct Recording {
    pub broker: Broker,
    pub registry: Registry,
    rt: tokio::runtime::Runtime,
    producer: FutureProducer,
    schema_ids: HashMap<String, (u32, Vec<i32>)>,
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "10000000")
        .set("linger.ms", "5")
        .create()
        .expect("create producer")
}

impl Recording {
    pub fn start() -> Self {
        let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
        let registry = Registry::start(&broker.bootstrap())
            .unwrap_or_else(|e| panic!("starting the schema registry: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = RegistryClient::new(&registry.url()).expect("registry client");
        let registered = rt
            .block_on(client.register_vmr_schemas())
            .expect("register the vmr schemas");
        let schema_ids = registered
            .into_iter()
            .map(|r| (r.topic.to_string(), (r.id as u32, r.message_indexes)))
            .collect();
        let producer = producer(&broker.bootstrap());
        Self {
            broker,
            registry,
            rt,
            producer,
            schema_ids,
        }
    }

    pub fn bootstrap(&self) -> String {
        self.broker.bootstrap()
    }

    /// Frames an event as the shipper does.
    pub fn frame(&self, e: &Event) -> Vec<u8> {
        let (id, idx) = &self.schema_ids[e.topic()];
        let mut buf = Vec::new();
        codec::encode_message(*id, idx, &pb::Event::from(e.clone()), &mut buf);
        buf
    }

    /// Produces `events` in order, each to its topic and its instance's
    /// partition; waits for every acknowledgement. Returns each offset.
    pub fn send(&self, events: &[Event]) -> Vec<i64> {
        self.send_at(events, None)
    }

    /// Like [`Recording::send`] with an explicit record timestamp (ms).
    pub fn send_at(&self, events: &[Event], timestamp_ms: Option<i64>) -> Vec<i64> {
        let mut pending = Vec::new();
        for e in events {
            let value = self.frame(e);
            let key = e.instance.as_str().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "vmr.seq",
                    value: Some(e.seq.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "vmr.epoch",
                    value: Some(e.epoch.to_string().as_bytes()),
                });
            let mut record = FutureRecord::to(e.topic())
                .key(key.as_bytes())
                .partition(partition_for(&key, PARTITIONS))
                .payload(&value)
                .headers(headers);
            if let Some(ts) = timestamp_ms {
                record = record.timestamp(ts);
            }
            let fut = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("enqueue a record");
            pending.push(fut);
        }
        self.rt.block_on(async {
            let mut offsets = Vec::new();
            for f in pending {
                let d = tokio::time::timeout(Duration::from_secs(30), f)
                    .await
                    .expect("delivery within 30 s")
                    .expect("delivery future")
                    .map_err(|(e, _)| e)
                    .expect("delivered");
                offsets.push(d.offset);
            }
            offsets
        })
    }

    /// Produces a raw value under `instance`'s key to `topic`.
    pub fn send_raw(&self, topic: &str, instance: &str, value: &[u8]) -> i64 {
        let record = FutureRecord::to(topic)
            .key(instance.as_bytes())
            .partition(partition_for(instance, PARTITIONS))
            .payload(value);
        self.rt.block_on(async {
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .expect("delivered")
                .offset
        })
    }
}

/// Start offsets `offset` on every event topic for `instance`.
pub fn start_offsets(instance: &str, offset: i64) -> Vec<TopicOffset> {
    Kind::ALL
        .iter()
        .map(|k| TopicOffset {
            topic: k.topic().to_string(),
            partition: partition_for(instance, PARTITIONS),
            next_offset: offset,
        })
        .collect()
}

/// Two instance ids on the same partition.
pub fn two_instances_sharing_a_partition() -> (String, String) {
    let a = "vm-alpha".to_string();
    let pa = partition_for(&a, PARTITIONS);
    let b = (0..1000)
        .map(|n| format!("vm-beta-{n}"))
        .find(|b| partition_for(b, PARTITIONS) == pa)
        .expect("some id shares the partition");
    (a, b)
}

pub const MS: u64 = 1_000_000;
/// Host monotonic time of the cut in these recordings.
pub const T0: u64 = 1_000_000 * MS;

pub fn event(instance: &str, seq: u64, mono: u64, payload: Payload) -> Event {
    Event {
        instance: InstanceId::new(instance).expect("valid id"),
        seq,
        wall_time_ns: 1_700_000_000_000_000_000 + mono,
        mono_time_ns: mono,
        epoch: 1,
        payload,
    }
}

pub fn block(device: &str, op: BlockOp, data_len: usize, seq: u64) -> Payload {
    Payload::Block(BlockIo {
        device: device.into(),
        queue: 0,
        op,
        sector: seq * 8,
        len: data_len as u32,
        data: vec![(seq % 251) as u8; data_len],
        content_hash: None,
        status: BlockStatus::Ok,
    })
}

pub fn net(direction: Direction, seq: u64) -> Payload {
    Payload::Net(NetFrame {
        device: "eth0".into(),
        queue: 0,
        direction,
        frame: vec![(seq % 251) as u8; 64],
    })
}

pub fn env(seq: u64) -> Payload {
    Payload::Env(EnvSample {
        sensor: "host.load1".into(),
        value: seq as f64,
        unit: "".into(),
    })
}

pub fn life(kind: LifecycleKind) -> Payload {
    Payload::Lifecycle(Lifecycle {
        kind,
        detail: String::new(),
        regs: vec![],
        gap: None,
        snapshot_id: None,
    })
}

pub fn gap(first_seq: u64, count: u64) -> Payload {
    Payload::Lifecycle(Lifecycle {
        kind: LifecycleKind::Gap,
        detail: "backend restarted".into(),
        regs: vec![],
        gap: Some(Gap {
            first_seq,
            count,
            reason: "restart".into(),
        }),
        snapshot_id: None,
    })
}

/// A mixed recording of `instance`: seqs `1..=n`, one event per 10 ms,
/// kinds rotating block, net, env, net, with a pause/resume pair around
/// seq 20 when `n` reaches it.
pub fn mixed(instance: &str, n: u64) -> Vec<Event> {
    (1..=n)
        .map(|seq| {
            let mono = T0 + seq * 10 * MS;
            let payload = match seq {
                20 => life(LifecycleKind::Pause),
                21 => life(LifecycleKind::Resume),
                _ => match seq % 4 {
                    0 => block("vda", BlockOp::Write, 4096, seq),
                    1 => net(Direction::Rx, seq),
                    2 => env(seq),
                    _ => net(Direction::Tx, seq),
                },
            };
            event(instance, seq, mono, payload)
        })
        .collect()
}

/// Fails, naming it, when the host lacks what the microVM clone tests need:
/// a read-write /dev/kvm and root (network namespaces).
pub fn require_prerequisites() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (network namespaces)");
}

/// Polls `f` every 50 ms until it gives a value, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
