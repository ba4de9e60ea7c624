//! confluent-kafka (Python) against our registry and our wire format.
//!
//! Heavy: needs the Tansu broker, the schema-registry binary, `protoc`, and
//! `pip install 'confluent-kafka[protobuf]' requests protobuf`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_proto::pb;
use vmr_proto::topics::{partition_for, NET};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::registry::Registry;

const PIP: &str = "pip install 'confluent-kafka[protobuf]' requests protobuf";

fn require_python() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import confluent_kafka.schema_registry.protobuf, google.protobuf, requests",
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3 is required ({e})"));
    assert!(
        out.status.success(),
        "Python packages missing; run: {PIP}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates `vmr/v1/event_pb2.py` under `dir` from the proto crate's sources.
fn generate_pb2(dir: &Path) {
    let proto_root = vmr_testkit::workspace_root().join("proto").join("proto");
    let out = Command::new("protoc")
        .arg("-I")
        .arg(&proto_root)
        .arg(format!("--python_out={}", dir.display()))
        .arg("vmr/v1/event.proto")
        .output()
        .unwrap_or_else(|e| panic!("protoc is required (apt-get install protobuf-compiler): {e}"));
    assert!(
        out.status.success(),
        "protoc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 {:?} failed ({}):\nstdout: {}\nstderr: {}",
        args.first(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("python prints UTF-8")
}

const SR_SCRIPT: &str = r#"
import json, sys
from confluent_kafka.schema_registry import SchemaRegistryClient, Schema
url, text = sys.argv[1], sys.argv[2]
client = SchemaRegistryClient({"url": url})
schema = Schema(text, "PROTOBUF")
sid = client.register_schema("py-demo-value", schema)
again = client.register_schema("py-demo-value", schema)
fetched = client.get_schema(sid)
latest = client.get_latest_version("py-demo-value")
looked = client.lookup_schema("py-demo-value", schema)
print(json.dumps({
    "id": sid, "again": again,
    "fetched_type": fetched.schema_type, "fetched_text": fetched.schema_str,
    "latest_id": latest.schema_id, "latest_version": latest.version,
    "lookup_id": looked.schema_id, "subjects": client.get_subjects(),
}))
"#;

#[tokio::test]
// Heavy: needs Tansu, protoc and pip confluent-kafka[protobuf].
async fn confluent_python_client_registers_and_decodes_our_events() {
    require_python();
    let broker = Broker::start().expect("start the Tansu broker");
    let registry = Registry::start(&broker.bootstrap()).expect("start schema-registry");
    let client = RegistryClient::new(&registry.url()).unwrap();

    // (a) confluent-kafka's SchemaRegistryClient registers and fetches.
    let text =
        "syntax = \"proto3\";\npackage demo;\nmessage Ping { string who = 1; uint64 at = 2; }";
    let out = python(&["-c", SR_SCRIPT, &registry.url(), text]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("script prints JSON");
    let id = v["id"].as_i64().expect("an id") as i32;
    assert_eq!(v["again"], v["id"]);
    assert_eq!(v["lookup_id"], v["id"]);
    assert_eq!(v["latest_id"], v["id"]);
    assert_eq!(v["latest_version"], 1);
    assert_eq!(v["fetched_type"], "PROTOBUF");
    assert_eq!(v["fetched_text"], text);
    assert_eq!(client.schema_by_id(id).await.unwrap().schema, text);

    // (b) Events framed by our codec and produced by our code, decoded by
    // confluent-kafka's ProtobufDeserializer through the example consumer.
    let registered = client
        .register_vmr_schemas()
        .await
        .expect("register vmr schemas");
    let net = registered
        .iter()
        .find(|t| t.topic == NET)
        .expect("the net topic has a schema");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("create producer");
    let instances = ["vm-0001", "vm-0002", "vm-0003"];
    let mut sent = Vec::new();
    let mut buf = Vec::new();
    for (seq, instance) in instances.iter().cycle().take(6).enumerate() {
        let event = pb::Event {
            instance_id: instance.to_string(),
            seq: seq as u64 + 1,
            wall_time_ns: 1_700_000_000_000_000_000 + seq as u64,
            mono_time_ns: 5_000 + seq as u64,
            epoch: 0,
            payload: Some(pb::event::Payload::Net(pb::NetFrame {
                device: "eth0".into(),
                queue: 0,
                direction: pb::Direction::Rx as i32,
                frame: vec![0xff, 0x00, seq as u8, 0x42],
            })),
        };
        buf.clear();
        codec::encode_message(net.id as u32, &net.message_indexes, &event, &mut buf);
        // Our own decoder agrees before Python sees it.
        let framed = codec::decode(&buf).unwrap();
        assert_eq!(pb::Event::decode(framed.payload).unwrap(), event);
        let partition = partition_for(instance, TEST_EVENT_PARTITIONS);
        let delivery = producer
            .send(
                FutureRecord::to(NET)
                    .key(instance.as_bytes())
                    .partition(partition)
                    .payload(&buf),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce an event");
        assert_eq!(delivery.partition, partition);
        sent.push(event);
    }

    let pb2 = tempfile::tempdir().unwrap();
    generate_pb2(pb2.path());
    let consumer = vmr_testkit::workspace_root()
        .join("examples")
        .join("analytics_consumer.py");
    let out = python(&[
        consumer.to_str().expect("UTF-8 path"),
        "--bootstrap",
        &broker.bootstrap(),
        "--registry",
        &registry.url(),
        "--topic",
        NET,
        "--from-beginning",
        "--max-messages",
        &sent.len().to_string(),
        "--timeout",
        "60",
        "--pb2-dir",
        pb2.path().to_str().expect("UTF-8 path"),
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), sent.len(), "{out}");
    for event in &sent {
        // 64-bit integers are strings in protobuf's JSON mapping.
        let seq = event.seq.to_string();
        let line = lines
            .iter()
            .find(|l| l["event"]["seq"].as_str() == Some(seq.as_str()))
            .unwrap_or_else(|| panic!("seq {} not decoded: {out}", event.seq));
        assert_eq!(line["key"], event.instance_id.as_str());
        assert_eq!(line["event"]["instance_id"], event.instance_id.as_str());
        assert_eq!(line["schema_id"], net.id);
        assert_eq!(
            line["partition"],
            partition_for(&event.instance_id, TEST_EVENT_PARTITIONS)
        );
        let Some(pb::event::Payload::Net(frame)) = &event.payload else {
            unreachable!("every event sent is a net frame")
        };
        assert_eq!(line["event"]["net"]["device"], "eth0");
        assert_eq!(line["event"]["net"]["direction"], "DIRECTION_RX");
        assert_eq!(
            line["event"]["net"]["frame"],
            schema_registry::schema::base64_encode(&frame.frame)
        );
    }
}
