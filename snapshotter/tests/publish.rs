//! Manifests published to `vmr.snapshots.v1` on a real broker (Tansu) with
//! the schema id a real Schema Registry assigned: keyed
//! `<instance>/<snapshot-id>`, on the instance's partition, framed in the
//! Confluent wire format, and read back equal. A stopped broker is an error
//! within the timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use schema_registry::client::RegistryClient;
use vmr_hypervisor::MemoryKind;
use vmr_proto::topics;
use vmr_snapshot::{
    decode_value, no_progress, publish, upload, Manifest, PublishError, SnapshotStore, StoreConfig,
    UploadRequest,
};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::registry::Registry;

fn request(dir: &std::path::Path, seq: u64) -> UploadRequest {
    UploadRequest {
        dir: dir.to_path_buf(),
        snapshot_id: dir.file_name().unwrap().to_string_lossy().into_owned(),
        image: "test-guest".into(),
        seq_at_cut: seq,
        mono_time_ns: 0,
        offsets: vec![vmr_snapshot::PartitionOffset {
            topic: topics::BLOCK.into(),
            partition: topics::partition_for("vm-pub", TEST_EVENT_PARTITIONS),
            next_offset: 12,
        }],
        disk_layers: vec![],
        base_snapshot_id: None,
    }
}

#[test]
// Heavy: needs /dev/kvm, the Tansu broker and the schema-registry binary.
fn manifests_are_published_keyed_on_the_instance_partition() {
    require_kvm();
    let mut broker = Broker::start().unwrap_or_else(|e| panic!("{e}"));
    let registry = Registry::start(&broker.bootstrap()).unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    let client = RegistryClient::new(&registry.url()).unwrap();
    let schemas = rt
        .block_on(client.register_vmr_schemas())
        .expect("register the vmreplay schemas");
    let reg = schemas
        .iter()
        .find(|s| s.topic == topics::SNAPSHOTS)
        .expect("the snapshots topic has a schema");
    assert_eq!(
        reg.message_indexes,
        [vmr_snapshot::publish::MANIFEST_MESSAGE_INDEX]
    );
    let schema_id = reg.id as u32;

    // Two real snapshots of one instance.
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, "vm-pub", &elf, 32);
    let m = microvm(inst.as_ref());
    dirty(m, &[1]);
    let (d1, _) = snapshot(inst.as_ref(), &dir.join("snaps"), "0001", MemoryKind::Full);
    dirty(m, &[2]);
    let (d2, _) = snapshot(
        inst.as_ref(),
        &dir.join("snaps"),
        "0002",
        MemoryKind::Incremental,
    );
    inst.stop(Duration::from_secs(5)).expect("stop");
    let store = SnapshotStore::open(&StoreConfig::local(&dir.join("store"))).unwrap();
    let m1 = rt
        .block_on(upload(&store, &request(&d1, 7), &no_progress))
        .unwrap();
    let m2 = rt
        .block_on(upload(&store, &request(&d2, 9), &no_progress))
        .unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    let want_partition = topics::partition_for("vm-pub", TEST_EVENT_PARTITIONS);
    let mut offsets = Vec::new();
    for m in [&m1, &m2] {
        let p = rt
            .block_on(publish(&producer, schema_id, m, Duration::from_secs(10)))
            .expect("publish");
        assert_eq!(p.partition, want_partition);
        offsets.push(p.offset);
    }
    assert!(offsets[1] > offsets[0], "{offsets:?}");

    // Read the partition back from the start.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "vmr-snapshot-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topics::SNAPSHOTS, want_partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).expect("assign");
    let mut got: Vec<(String, Manifest)> = Vec::new();
    let start = Instant::now();
    while got.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} manifests read back in 30 s",
            got.len()
        );
        if let Some(r) = consumer.poll(Duration::from_millis(500)) {
            let msg = r.expect("consume");
            let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
            let (id, m) = decode_value(msg.payload().unwrap()).expect("a framed manifest");
            assert_eq!(id, schema_id);
            got.push((key, m));
        }
    }
    assert_eq!(got[0], ("vm-pub/0001".to_string(), m1.clone()));
    assert_eq!(got[1], ("vm-pub/0002".to_string(), m2.clone()));
    assert_eq!(got[1].1.base_snapshot_id.as_deref(), Some("0001"));

    // Values that are not framed manifests are refused.
    let e = decode_value(b"\x01garbage").unwrap_err();
    assert!(matches!(e, PublishError::Framing(_)), "{e}");
    let mut edited = vmr_snapshot::encode_value(schema_id, &m1);
    let last = edited.len() - 1;
    edited[last] ^= 1;
    assert!(decode_value(&edited).is_err(), "an edited value is refused");

    // With the broker down, publishing fails within its timeout.
    broker.stop();
    let start = Instant::now();
    let e = rt
        .block_on(publish(&producer, schema_id, &m2, Duration::from_secs(3)))
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(e, PublishError::Metadata { .. } | PublishError::Send { .. }),
        "{e}"
    );
    drop(registry);
}
