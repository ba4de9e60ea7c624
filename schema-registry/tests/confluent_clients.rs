//! confluent-kafka's Python client, at its default settings, against our
//! registry: the protobuf serde round trip through a real broker, every
//! endpoint of `SchemaRegistryClient`, and a restarted and a second instance
//! agreeing on everything registered that way.
//!
//! Heavy: needs the Tansu broker (scripts/setup.sh), the schema-registry
//! binary (`cargo build --workspace --bins`) and
//! `pip install 'confluent-kafka[protobuf,schemaregistry]==2.16.1'`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use schema_registry::api::SchemaRequest;
use schema_registry::client::RegistryClient;
use schema_registry::schema::ParsedSchema;
use serde_json::Value;
use vmr_testkit::broker::Broker;
use vmr_testkit::registry::Registry;
use vmr_testkit::ChildGuard;

const PIP: &str = "pip install 'confluent-kafka[protobuf,schemaregistry]==2.16.1'";
const CONFLUENT_KAFKA_VERSION: &str = "2.16.1";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn require_python() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata, confluent_kafka.schema_registry.protobuf, \
             google.protobuf; print(importlib.metadata.version('confluent-kafka'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3 is required ({e}); then run: {PIP}"));
    assert!(
        out.status.success(),
        "Python packages missing; run: {PIP}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        version, CONFLUENT_KAFKA_VERSION,
        "confluent-kafka {version} is installed; these tests pin {CONFLUENT_KAFKA_VERSION}: {PIP}"
    );
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
        .join(name)
}

/// Runs a Python test script (at most [`SCRIPT_TIMEOUT`]), asserts that it
/// exited 0 and returns the JSON summary on its last stdout line.
fn run_script(name: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let mut cmd = Command::new("python3");
    cmd.arg(script(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let mut child = ChildGuard::spawn(name, &mut cmd).expect("start python3");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait() {
            break status;
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            child.stop(Duration::from_secs(5));
            panic!(
                "{name} did not finish within {SCRIPT_TIMEOUT:?}:\n{}\n{}",
                std::fs::read_to_string(&stdout_path).unwrap_or_default(),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "{name} failed ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let summary: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{name} printed no JSON summary ({e}): {stdout}\n{stderr}"));
    assert_eq!(summary["ok"], true, "{summary}");
    summary
}

fn checks(summary: &Value) -> BTreeSet<String> {
    summary["checks"]
        .as_array()
        .expect("a list of checks")
        .iter()
        .map(|c| c.as_str().expect("check names are strings").to_string())
        .collect()
}

fn count(summary: &Value) -> usize {
    summary["checks"].as_array().map_or(0, Vec::len)
}

fn id(summary: &Value, name: &str) -> i32 {
    summary["ids"][name]
        .as_i64()
        .unwrap_or_else(|| panic!("no id {name} in {summary}")) as i32
}

fn enc(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Everything a registry answers about its subjects, versions, ids, modes
/// and configs (errors as their codes), keyed by request path.
async fn snapshot(c: &RegistryClient) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    async fn get(c: &RegistryClient, out: &mut BTreeMap<String, Value>, path: String) -> Value {
        let v = match c.get_json(&path).await {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": e.code() }),
        };
        out.insert(path, v.clone());
        v
    }
    for path in [
        "/subjects",
        "/subjects?deletedOnly=true",
        "/mode",
        "/config",
        "/contexts",
    ] {
        get(c, &mut out, path.to_string()).await;
    }
    let subjects = get(c, &mut out, "/subjects?deleted=true".into()).await;
    let mut ids = BTreeSet::new();
    for s in subjects.as_array().expect("subjects are a list") {
        let s = enc(s.as_str().expect("subject names are strings"));
        let versions = get(c, &mut out, format!("/subjects/{s}/versions?deleted=true")).await;
        for v in versions.as_array().expect("versions are a list") {
            let sv = get(
                c,
                &mut out,
                format!("/subjects/{s}/versions/{v}?deleted=true"),
            )
            .await;
            ids.insert(sv["id"].as_i64().expect("a version has an id"));
            get(
                c,
                &mut out,
                format!("/subjects/{s}/versions/{v}?deleted=true&format=serialized"),
            )
            .await;
            get(
                c,
                &mut out,
                format!("/subjects/{s}/versions/{v}/referencedby"),
            )
            .await;
        }
        get(c, &mut out, format!("/mode/{s}?defaultToGlobal=true")).await;
        get(c, &mut out, format!("/config/{s}?defaultToGlobal=true")).await;
    }
    for id in ids {
        get(c, &mut out, format!("/schemas/ids/{id}")).await;
        get(c, &mut out, format!("/schemas/ids/{id}?format=serialized")).await;
        get(
            c,
            &mut out,
            format!("/schemas/ids/{id}/versions?deleted=true"),
        )
        .await;
    }
    out
}

fn assert_same(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>, what: &str) {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        assert_eq!(a.get(k), b.get(k), "{what} disagree on {k}");
    }
}

#[tokio::test]
// Heavy: needs Tansu, the schema-registry binary and pip confluent-kafka 2.16.1.
async fn confluent_python_clients_at_default_settings() {
    require_python();
    let broker = Broker::start().expect("start the Tansu broker");
    let (topic, wkt_topic) = ("py.readings", "py.readings.wkt");
    for t in [topic, wkt_topic] {
        broker.create_topic(t, 1, &[]).expect("create topic");
    }
    let mut a = Registry::start(&broker.bootstrap()).expect("start schema-registry");
    let url = a.url();
    let client = RegistryClient::new(&url).unwrap();

    // ProtobufSerializer / Producer / Consumer / ProtobufDeserializer.
    let serde = run_script(
        "serde_roundtrip.py",
        &[
            "--registry",
            &url,
            "--bootstrap",
            &broker.bootstrap(),
            "--topic",
            topic,
            "--wkt-topic",
            wkt_topic,
        ],
    );
    let done = checks(&serde);
    for must in [
        "producer delivered every record",
        "ProtobufDeserializer returns what was sent",
        "registering the client's serialized form gives the same id",
        "text then serialized: one id",
        "records framed with the registered well-known import decode",
    ] {
        assert!(done.contains(must), "missing check {must:?}: {done:?}");
    }
    assert!(count(&serde) >= 25, "{done:?}");
    assert_eq!(serde["records"], 5);
    let reading = id(&serde, "reading");
    assert_eq!(id(&serde, "text_form"), reading);
    assert_eq!(id(&serde, "serialized_form"), reading);
    assert_ne!(id(&serde, "reading_wkt"), reading);
    // Our own client sees the same.
    let latest = client
        .version(&format!("{topic}-value"), "latest")
        .await
        .unwrap();
    assert_eq!(latest.id, reading);
    assert!(
        latest.schema.contains("message Reading"),
        "{}",
        latest.schema
    );
    assert_eq!(latest.references.len(), 1);
    assert_eq!(latest.references[0].name, "demo/common.proto");

    // The same schema as text and as a serialized descriptor (compiled here
    // with protox): one id, one version.
    let text = "syntax = \"proto3\";\npackage rs;\nmessage Pong {\n  string who = 1;\n  map<string, int64> seen = 2;\n}";
    let text_id = client
        .register("rs-text-value", &SchemaRequest::protobuf(text))
        .await
        .unwrap();
    let serialized = ParsedSchema::parse(text, &BTreeMap::new())
        .unwrap()
        .serialized_base64();
    let serialized_id = client
        .register(
            "rs-text-value",
            &SchemaRequest::protobuf(serialized.clone()),
        )
        .await
        .unwrap();
    assert_eq!(serialized_id, text_id);
    assert_eq!(client.versions("rs-text-value").await.unwrap(), [1]);
    assert_eq!(
        client
            .register("rs-serialized-value", &SchemaRequest::protobuf(serialized))
            .await
            .unwrap(),
        text_id
    );
    assert_eq!(client.schema_by_id(text_id).await.unwrap().schema, text);

    // SchemaRegistryClient over every endpoint.
    let endpoints = run_script("client_endpoints.py", &["--registry", &url]);
    let done = checks(&endpoints);
    for must in [
        "referencedby lists the referring id",
        "normalized lookup",
        "soft delete of version 1",
        "permanent delete of version 1",
        "deleted_only versions",
        "a referenced subject cannot be deleted",
        "permanent delete of a subject",
        "READONLY refuses registration",
        "IMPORT registers with the given id",
        "new ids follow imported ones",
        "contexts",
    ] {
        assert!(done.contains(must), "missing check {must:?}: {done:?}");
    }
    assert!(
        count(&endpoints) >= 70,
        "{} checks: {done:?}",
        count(&endpoints)
    );
    let imported = client.version("ep-import-value", "7").await.unwrap();
    assert_eq!(imported.id, 5000);
    assert_eq!(id(&endpoints, "after_import"), 5001);
    assert_eq!(
        client.mode(Some("ep-import-value")).await.unwrap(),
        "READWRITE"
    );

    // A second instance, and then a restarted first one, answer the same.
    let before = snapshot(&client).await;
    assert!(before.len() > 100, "{} answers", before.len());
    assert_eq!(
        before["/schemas/ids/5000"]["schema"],
        "syntax = \"proto3\";\npackage imp;\nmessage Imported {\n  string a = 1;\n}"
    );
    let b = Registry::start(&broker.bootstrap()).expect("second registry");
    let client_b = RegistryClient::new(&b.url()).unwrap();
    assert_same(
        &before,
        &snapshot(&client_b).await,
        "first and second instance",
    );
    a.stop();
    let a2 = Registry::start(&broker.bootstrap()).expect("restarted registry");
    let client_a2 = RegistryClient::new(&a2.url()).unwrap();
    assert_same(
        &before,
        &snapshot(&client_a2).await,
        "before and after a restart",
    );
    // Writes on one are seen by the other.
    let id_b = client_b
        .register(
            "late-value",
            &SchemaRequest::protobuf("syntax = \"proto3\"; message Late {}"),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client_a2.version("late-value", "1").await {
            Ok(v) => {
                assert_eq!(v.id, id_b);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
