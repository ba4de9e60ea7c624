//! The event source against a real broker (Tansu 0.6) and Schema Registry.
//!
//! Heavy: needs the Tansu broker (`~/.cache/vmreplay/tansu-0.6.0/bin/tansu`,
//! from scripts/setup.sh) and the `schema-registry` binary
//! (`cargo build -p schema-registry`); fails naming them when missing.

mod common;

use std::time::Duration;

use common::*;
use replayer::source::{EventSource, GapCause, SourceConfig, SourceError, SourceItem, TopicNames};
use replayer::{Kind, KindSet};
use vmr_proto::topics::partition_for;
use vmr_proto::{Event, InstanceId};

fn config(rec: &Recording, instance: &str, seq_at_cut: u64, kinds: KindSet) -> SourceConfig {
    SourceConfig {
        bootstrap_servers: rec.bootstrap(),
        instance: InstanceId::new(instance).unwrap(),
        seq_at_cut,
        start: start_offsets(instance, 0),
        kinds,
        until_seq: None,
        topics: TopicNames::default(),
        window: Default::default(),
        fetch_timeout: Duration::from_secs(10),
        security: Default::default(),
    }
}

fn collect(source: EventSource) -> Result<Vec<SourceItem>, SourceError> {
    source.collect()
}

fn events(items: &[SourceItem]) -> Vec<&Event> {
    items
        .iter()
        .filter_map(|i| match i {
            SourceItem::Event(e) => Some(&e.event),
            _ => None,
        })
        .collect()
}

#[test]
fn two_instances_on_one_partition_merge_by_seq_and_net_only_skips_block() {
    let rec = Recording::start();
    let (a, b) = two_instances_sharing_a_partition();
    let mut ea = mixed(&a, 80);
    let eb = mixed(&b, 80);
    // Two block devices ship separately: on the block topic seq 28 comes
    // before seq 24, which the merge window puts back in order.
    let i24 = ea.iter().position(|e| e.seq == 24).unwrap();
    let e24 = ea.remove(i24);
    let i28 = ea.iter().position(|e| e.seq == 28).unwrap();
    ea.insert(i28 + 1, e24);
    // Interleave the instances record by record.
    let mut all = Vec::new();
    for (x, y) in ea.iter().zip(&eb) {
        all.push(x.clone());
        all.push(y.clone());
    }
    rec.send(&all);

    // Everything after the cut at seq 30, from offset 0 on every topic (too
    // early, which is safe).
    let source = EventSource::open(config(&rec, &a, 30, KindSet::all())).unwrap();
    let items = collect(source).unwrap();
    let evs = events(&items);
    assert_eq!(items.len(), evs.len(), "no gap or poison: {items:?}");
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (31..=80).collect::<Vec<_>>());
    assert!(evs.iter().all(|e| e.instance.as_str() == a));
    for e in &evs {
        let want = mixed(&a, 80).into_iter().find(|x| x.seq == e.seq).unwrap();
        assert_eq!(**e, want, "seq {} round-trips", e.seq);
    }

    let mut source = EventSource::open(config(&rec, &a, 30, KindSet::all())).unwrap();
    let first = source.next().unwrap().unwrap();
    assert!(matches!(&first, SourceItem::Event(e) if e.event.seq == 31));
    for _ in source.by_ref() {}
    let stats = source.stats();
    assert_eq!(stats.topics.len(), 4);
    let other: u64 = stats.topics.iter().map(|t| t.other_instance).sum();
    let before: u64 = stats.topics.iter().map(|t| t.before_cut).sum();
    assert_eq!(other, 80, "every record of {b} skipped by key");
    assert_eq!(before, 30, "seqs 1..=30 skipped as before the cut");
    let by_header: u64 = stats.topics.iter().map(|t| t.before_cut_by_header).sum();
    assert_eq!(by_header, 30, "by their vmr.seq header, without decoding");
    assert_eq!(stats.merge.released, 50);
    assert_eq!(stats.merge.gaps, 0);

    // Net only (and lifecycle, for the clock): the block topic is never
    // assigned, and never read.
    let kinds = KindSet::empty().with(Kind::Net).with(Kind::Lifecycle);
    let mut source = EventSource::open(config(&rec, &a, 10, kinds)).unwrap();
    let p = partition_for(&a, PARTITIONS);
    let mut assignment = source.assignment();
    assignment.sort();
    assert_eq!(
        assignment,
        vec![
            ("vmr.lifecycle.v1".to_string(), p),
            ("vmr.net.v1".to_string(), p)
        ]
    );
    let items: Vec<SourceItem> = source.by_ref().collect::<Result<_, _>>().unwrap();
    let evs = events(&items);
    assert_eq!(
        items.len(),
        evs.len(),
        "a partial read reports no holes as gaps"
    );
    let want: Vec<u64> = mixed(&a, 80)
        .iter()
        .filter(|e| e.seq > 10 && matches!(Kind::of(&e.payload), Kind::Net | Kind::Lifecycle))
        .map(|e| e.seq)
        .collect();
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), want);
    let stats = source.stats();
    let topics: Vec<&str> = stats.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(topics, ["vmr.net.v1", "vmr.lifecycle.v1"]);
    assert!(source.assignment().iter().all(|(t, _)| t != "vmr.block.v1"));
}

#[test]
fn missing_ranges_gap_events_and_poison_records_are_items() {
    let rec = Recording::start();
    let (a, _) = two_instances_sharing_a_partition();
    let mut evs: Vec<Event> = mixed(&a, 40)
        .into_iter()
        // 15..=17 were never recorded (silently lost), and 30..=32 are lost
        // and said so by a GAP event at seq 34.
        .filter(|e| !(15..=17).contains(&e.seq) && !(30..=32).contains(&e.seq))
        .collect();
    let i34 = evs.iter().position(|e| e.seq == 34).unwrap();
    evs[i34] = event(&a, 34, evs[i34].mono_time_ns, gap(30, 3));
    let half = evs.len() / 2;
    rec.send(&evs[..half]);
    // An undecodable record of the instance between the two halves, and
    // one that frames correctly but holds no valid Event.
    let poison_at = rec.send_raw("vmr.net.v1", &a, b"\x00\x00\x00\x00\x01\x00\xff\xff\xff");
    let not_framed = rec.send_raw("vmr.env.v1", &a, b"plain text");
    rec.send(&evs[half..]);

    let source = EventSource::open(config(&rec, &a, 5, KindSet::all())).unwrap();
    let items = collect(source).unwrap();
    let mut gaps = Vec::new();
    let mut poison = Vec::new();
    let mut seqs = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            SourceItem::Event(e) => seqs.push(e.event.seq),
            SourceItem::Gap(g) => gaps.push((i, g.clone())),
            SourceItem::Poison(p) => poison.push(p.clone()),
        }
    }
    let want: Vec<u64> = (6..=40)
        .filter(|s| !(15..=17).contains(s) && !(30..=32).contains(s))
        .collect();
    assert_eq!(seqs, want);
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    let (at, missing) = &gaps[0];
    assert_eq!((missing.first_seq, missing.count), (15, 3));
    assert_eq!(missing.cause, GapCause::Missing);
    // Reported just before the event after the hole.
    assert!(matches!(&items[at + 1], SourceItem::Event(e) if e.event.seq == 18));
    let (at, recorded) = &gaps[1];
    assert_eq!((recorded.first_seq, recorded.count), (30, 3));
    assert_eq!(
        recorded.cause,
        GapCause::Recorded {
            reason: "restart".into(),
            event_seq: 34
        }
    );
    assert!(matches!(&items[at + 1], SourceItem::Event(e) if e.event.seq == 34));
    assert_eq!(poison.len(), 2, "{poison:?}");
    let net_poison = poison.iter().find(|p| p.pos.kind == Kind::Net).unwrap();
    assert_eq!(net_poison.pos.offset, poison_at);
    assert!(
        net_poison.error.contains("protobuf"),
        "{}",
        net_poison.error
    );
    let env_poison = poison.iter().find(|p| p.pos.kind == Kind::Env).unwrap();
    assert_eq!(env_poison.pos.offset, not_framed);
    assert!(env_poison.error.contains("magic"), "{}", env_poison.error);
}

#[test]
fn ranges_outside_the_retained_log_are_clear_errors() {
    let mut rec = Recording::start();
    let (a, _) = two_instances_sharing_a_partition();
    let p = partition_for(&a, PARTITIONS);
    // Eight days old: past the default seven-day retention of the
    // delete-policy event topics.
    let old_ms = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64)
        - 8 * 24 * 3600 * 1000;
    let evs = mixed(&a, 40);
    let (old, new): (Vec<Event>, Vec<Event>) = evs.into_iter().partition(|e| e.seq <= 20);
    let old_offsets = rec.send_at(&old, Some(old_ms));
    rec.send(&new);

    // A start offset beyond the end of the log.
    let mut cfg = config(&rec, &a, 0, KindSet::all());
    cfg.start = start_offsets(&a, 1000);
    let err = EventSource::open(cfg).unwrap_err();
    assert!(
        matches!(err, SourceError::BeyondEnd { wanted: 1000, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("beyond the end of the log"),
        "{err}"
    );

    // A range that ends after the recording does.
    let mut cfg = config(&rec, &a, 0, KindSet::all());
    cfg.until_seq = Some(500);
    let err = EventSource::open(cfg)
        .unwrap()
        .find_map(Result::err)
        .expect("the stream ends with an error");
    assert!(
        matches!(
            err,
            SourceError::RangeBeyondEnd {
                wanted: 500,
                last: 40
            }
        ),
        "{err}"
    );
    // A bounded range inside the recording ends cleanly at its end.
    let mut cfg = config(&rec, &a, 0, KindSet::all());
    cfg.until_seq = Some(12);
    let items = collect(EventSource::open(cfg).unwrap()).unwrap();
    assert_eq!(
        events(&items).iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );

    // The broker's retention runs when it starts: the old records go.
    rec.broker.restart().expect("broker restarts");
    let cfg = config(&rec, &a, 0, KindSet::all());
    let err = match EventSource::open(cfg) {
        Err(e) => e,
        Ok(source) => collect(source).expect_err("the old records are gone"),
    };
    eprintln!("after retention: {err}");
    assert!(matches!(err, SourceError::Retention { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("events missing from Kafka (retention)"),
        "{err}"
    );
    let SourceError::Retention {
        wanted, earliest, ..
    } = err
    else {
        unreachable!()
    };
    assert_eq!(wanted, 0);
    assert!(earliest > 0, "{earliest}");
    // From offsets past the deleted records, the rest still reads.
    let next: Vec<_> = Kind::ALL
        .iter()
        .map(|k| {
            let last_old = old
                .iter()
                .zip(&old_offsets)
                .filter(|(e, _)| Kind::of(&e.payload) == *k)
                .map(|(_, o)| *o)
                .max()
                .unwrap();
            vmr_proto::TopicOffset {
                topic: k.topic().into(),
                partition: p,
                next_offset: last_old + 1,
            }
        })
        .collect();
    let mut cfg = config(&rec, &a, 20, KindSet::all());
    cfg.start = next;
    let items = collect(EventSource::open(cfg).unwrap()).unwrap();
    assert_eq!(
        events(&items).iter().map(|e| e.seq).collect::<Vec<_>>(),
        (21..=40).collect::<Vec<_>>()
    );
}

#[test]
fn bad_configuration_is_refused() {
    let rec = Recording::start();
    let (a, _) = two_instances_sharing_a_partition();
    rec.send(&mixed(&a, 4));
    // A start offset on the wrong partition.
    let mut cfg = config(&rec, &a, 0, KindSet::all());
    for o in &mut cfg.start {
        o.partition = (o.partition + 1) % PARTITIONS;
    }
    let err = EventSource::open(cfg).unwrap_err();
    assert!(
        matches!(err, SourceError::PartitionMismatch { .. }),
        "{err}"
    );
    // No start offset for a wanted topic.
    let mut cfg = config(&rec, &a, 0, KindSet::all());
    cfg.start.retain(|o| o.topic != "vmr.env.v1");
    assert!(matches!(
        EventSource::open(cfg),
        Err(SourceError::MissingStart(t)) if t == "vmr.env.v1"
    ));
    // A topic that does not exist.
    let mut cfg = config(&rec, &a, 0, KindSet::empty().with(Kind::Block));
    cfg.topics.block = "no.such.topic".into();
    cfg.start[0].topic = "no.such.topic".into();
    cfg.fetch_timeout = Duration::from_secs(3);
    let err = EventSource::open(cfg).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::UnknownTopic(_) | SourceError::Kafka { .. }
        ),
        "{err}"
    );
    // Nothing to read.
    assert!(matches!(
        EventSource::open(config(&rec, &a, 0, KindSet::empty())),
        Err(SourceError::Config(_))
    ));
}
