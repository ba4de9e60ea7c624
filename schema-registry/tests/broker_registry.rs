//! The registry against a real broker (Tansu) through its REST API.
//!
//! Heavy: needs the Tansu binary (scripts/setup.sh) and the workspace's
//! binaries built (`cargo build --workspace --bins`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use schema_registry::api::{ErrorBody, SchemaRequest};
use schema_registry::client::{ClientError, RegistryClient};
use vmr_testkit::broker::Broker;
use vmr_testkit::registry::Registry;

const V1: &str = r#"syntax = "proto3";
package demo;
message Reading {
  string sensor = 1;
  double value = 2;
}
"#;

/// Adds a field: BACKWARD compatible.
const V2: &str = r#"syntax = "proto3";
package demo;
message Reading {
  string sensor = 1;
  double value = 2;
  uint64 at_ns = 3;
}
"#;

/// Changes a field's type: BACKWARD incompatible.
const V3_BAD: &str = r#"syntax = "proto3";
package demo;
message Reading {
  int64 sensor = 1;
  double value = 2;
}
"#;

fn start() -> (Broker, Registry, RegistryClient) {
    let broker = Broker::start().expect("start the Tansu broker");
    let registry = Registry::start(&broker.bootstrap()).expect("start schema-registry");
    let client = RegistryClient::new(&registry.url()).expect("registry URL is http");
    (broker, registry, client)
}

fn api_code(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, i32) {
    match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Raw request, for content types and bodies the client never sends.
async fn raw(method: &str, url: &str, content_type: &str, body: Vec<u8>) -> (u16, ErrorBody) {
    let http = reqwest::Client::new();
    let resp = http
        .request(method.parse().expect("valid method"), url)
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .expect("request completes");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body is text");
    let body: ErrorBody = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {text}"));
    (status, body)
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn register_lookup_and_reject_incompatible_change() {
    let (_broker, _registry, client) = start();
    let subject = "demo.readings-value";

    let id1 = client
        .register(subject, &SchemaRequest::protobuf(V1))
        .await
        .expect("register v1");
    // The same schema again: same id, no new version.
    let again = client
        .register(subject, &SchemaRequest::protobuf(V1))
        .await
        .unwrap();
    assert_eq!(again, id1);
    assert_eq!(client.versions(subject).await.unwrap(), [1]);

    let by_id = client.schema_by_id(id1).await.unwrap();
    assert_eq!(by_id.schema, V1.trim());
    assert_eq!(by_id.schema_type.as_deref(), Some("PROTOBUF"));

    let found = client
        .lookup(subject, &SchemaRequest::protobuf(V1))
        .await
        .unwrap();
    assert_eq!((found.id, found.version), (id1, 1));

    let id2 = client
        .register(subject, &SchemaRequest::protobuf(V2))
        .await
        .expect("a compatible v2");
    assert_ne!(id2, id1);
    let latest = client.version(subject, "latest").await.unwrap();
    assert_eq!((latest.version, latest.id), (2, id2));
    assert_eq!(client.subjects().await.unwrap(), [subject]);

    // The compatibility endpoint explains, registration refuses with 409.
    let check = client
        .check_compatibility(subject, "latest", &SchemaRequest::protobuf(V3_BAD))
        .await
        .unwrap();
    assert!(!check.is_compatible);
    assert!(
        check.messages.iter().any(|m| m.contains("sensor")),
        "{:?}",
        check.messages
    );
    let (status, body) = raw(
        "POST",
        &format!("{}/subjects/{subject}/versions", client.base_url()),
        "application/vnd.schemaregistry.v1+json",
        serde_json::to_vec(&SchemaRequest::protobuf(V3_BAD)).unwrap(),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body.error_code, 409);
    assert!(body.message.contains("incompatible"), "{}", body.message);
    assert_eq!(client.versions(subject).await.unwrap(), [1, 2]);

    // With NONE the same change goes through.
    assert_eq!(client.config(None).await.unwrap(), "BACKWARD");
    client.set_config(Some(subject), "NONE").await.unwrap();
    assert_eq!(client.config(Some(subject)).await.unwrap(), "NONE");
    let id3 = client
        .register(subject, &SchemaRequest::protobuf(V3_BAD))
        .await
        .expect("NONE allows any change");
    assert!(id3 > id2);

    // Soft delete hides the subject; ids stay resolvable.
    assert_eq!(
        client.delete_subject(subject, false).await.unwrap(),
        [1, 2, 3]
    );
    assert!(client.subjects().await.unwrap().is_empty());
    assert_eq!(client.schema_by_id(id1).await.unwrap().schema, V1.trim());
    assert_eq!(api_code(client.versions(subject).await), (404, 40401));
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn a_new_instance_rebuilds_the_same_state_from_the_topic() {
    let (broker, mut registry, client) = start();
    let mut ids = Vec::new();
    for (i, subject) in ["a-value", "b-value", "c-value"].iter().enumerate() {
        let text = format!("syntax = \"proto3\"; message M{i} {{ string s = 1; }}");
        ids.push(
            client
                .register(subject, &SchemaRequest::protobuf(text))
                .await
                .unwrap(),
        );
    }
    client.set_config(None, "FULL").await.unwrap();
    registry.stop();

    let registry2 = Registry::start(&broker.bootstrap()).expect("second registry");
    let client2 = RegistryClient::new(&registry2.url()).unwrap();
    assert_eq!(
        client2.subjects().await.unwrap(),
        ["a-value", "b-value", "c-value"]
    );
    for (i, subject) in ["a-value", "b-value", "c-value"].iter().enumerate() {
        let v = client2.version(subject, "1").await.unwrap();
        assert_eq!(v.id, ids[i]);
        assert!(v.schema.contains(&format!("message M{i} ")));
    }
    assert_eq!(client2.config(None).await.unwrap(), "FULL");
    // The next id follows the highest one seen.
    let next = client2
        .register(
            "d-value",
            &SchemaRequest::protobuf("syntax = \"proto3\"; message D {}"),
        )
        .await
        .unwrap();
    assert_eq!(next, ids.iter().max().unwrap() + 1);
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn two_instances_agree_and_never_reuse_ids() {
    let broker = Broker::start().expect("start the Tansu broker");
    let ra = Registry::start(&broker.bootstrap()).expect("registry A");
    let rb = Registry::start(&broker.bootstrap()).expect("registry B");
    let a = RegistryClient::new(&ra.url()).unwrap();
    let b = RegistryClient::new(&rb.url()).unwrap();

    // Written on A, read on B.
    let id = a
        .register("shared-value", &SchemaRequest::protobuf(V1))
        .await
        .unwrap();
    assert_eq!(b.schema_by_id(id).await.unwrap().schema, V1.trim());
    assert_eq!(b.version("shared-value", "latest").await.unwrap().id, id);

    // Concurrent registrations of different subjects on both instances.
    const N: usize = 8;
    let reg = |client: RegistryClient, tag: &'static str| async move {
        let mut out = Vec::new();
        for i in 0..N {
            let subject = format!("{tag}{i}-value");
            let text = format!("syntax = \"proto3\"; message {tag}{i} {{ int32 x = 1; }}");
            let id = client
                .register(&subject, &SchemaRequest::protobuf(text))
                .await
                .unwrap_or_else(|e| panic!("register {subject}: {e}"));
            out.push((subject, id));
        }
        out
    };
    let (from_a, from_b) = tokio::join!(reg(a.clone(), "A"), reg(b.clone(), "B"));
    let all: Vec<_> = from_a.iter().chain(&from_b).cloned().collect();
    let unique: BTreeSet<i32> = all.iter().map(|(_, id)| *id).collect();
    assert_eq!(unique.len(), all.len(), "ids collide: {all:?}");
    assert!(!unique.contains(&id));

    // Both instances see every subject with the same id.
    for (subject, id) in &all {
        for client in [&a, &b] {
            let v = client.version(subject, "latest").await.unwrap();
            assert_eq!(v.id, *id, "{subject} on {}", client.base_url());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (sa, sb) = (a.subjects().await.unwrap(), b.subjects().await.unwrap());
        if sa == sb && sa.len() == 2 * N + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "A {sa:?} vs B {sb:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn bad_input_gets_confluent_errors() {
    let (_broker, _registry, client) = start();
    let base = client.base_url().to_string();
    let json = "application/vnd.schemaregistry.v1+json";

    // Malformed protobuf text.
    let (status, body) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        json,
        serde_json::to_vec(&SchemaRequest::protobuf("message { nope")).unwrap(),
    )
    .await;
    assert_eq!((status, body.error_code), (422, 42201), "{}", body.message);
    // AVRO (the default type) is refused the same way.
    let (status, body) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        "application/json",
        br#"{"schema":"{\"type\":\"string\"}"}"#.to_vec(),
    )
    .await;
    assert_eq!((status, body.error_code), (422, 42201), "{}", body.message);
    // A reference to nothing.
    let (status, body) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        json,
        br#"{"schemaType":"PROTOBUF","schema":"syntax = \"proto3\"; import \"dep.proto\"; message A { Dep d = 1; }","references":[{"name":"dep.proto","subject":"dep","version":1}]}"#.to_vec(),
    )
    .await;
    assert_eq!((status, body.error_code), (422, 42201), "{}", body.message);
    // Not JSON at all.
    let (status, _) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        json,
        b"{".to_vec(),
    )
    .await;
    assert_eq!(status, 422);
    // Wrong media type.
    let (status, body) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        "text/plain",
        serde_json::to_vec(&SchemaRequest::protobuf(V1)).unwrap(),
    )
    .await;
    assert_eq!((status, body.error_code), (415, 415));
    // Too large (4 MiB cap).
    let huge = SchemaRequest::protobuf(format!("// {}\n{V1}", "x".repeat(5 << 20)));
    let (status, body) = raw(
        "POST",
        &format!("{base}/subjects/x-value/versions"),
        json,
        serde_json::to_vec(&huge).unwrap(),
    )
    .await;
    assert_eq!((status, body.error_code), (413, 413));
    // Bad compatibility level.
    assert_eq!(
        api_code(client.set_config(None, "SIDEWAYS").await),
        (422, 42203)
    );

    // Unknown things.
    assert_eq!(api_code(client.versions("nope-value").await), (404, 40401));
    assert_eq!(api_code(client.schema_by_id(4242).await), (404, 40403));
    client
        .register("x-value", &SchemaRequest::protobuf(V1))
        .await
        .unwrap();
    assert_eq!(api_code(client.version("x-value", "7").await), (404, 40402));
    assert_eq!(
        api_code(client.version("x-value", "zero").await),
        (422, 42202)
    );
    assert_eq!(
        api_code(client.lookup("x-value", &SchemaRequest::protobuf(V2)).await),
        (404, 40403)
    );
    assert_eq!(
        api_code(
            client
                .lookup("nope-value", &SchemaRequest::protobuf(V1))
                .await
        ),
        (404, 40401)
    );
    // Permanent delete needs a soft delete first.
    assert_eq!(
        api_code(client.delete_subject("x-value", true).await),
        (404, 40405)
    );
    client.delete_subject("x-value", false).await.unwrap();
    assert_eq!(client.delete_subject("x-value", true).await.unwrap(), [1]);
}

/// A raw GET: status and JSON body.
async fn raw_get(url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(url).await.expect("request completes");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body is text");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

fn assert_unavailable(what: &str, status: u16, body: &serde_json::Value) {
    assert_eq!(status, 503, "{what}: {body}");
    let code = body["error_code"].as_i64().unwrap_or_default();
    assert!((50001..=50003).contains(&code), "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn broker_outage_gives_json_503_and_the_registry_recovers() {
    let (mut broker, registry, client) = start();
    let base = client.base_url().to_string();
    let id = client
        .register("before-value", &SchemaRequest::protobuf(V1))
        .await
        .unwrap();

    broker.stop();
    let started = Instant::now();
    let err = client
        .register("during-value", &SchemaRequest::protobuf(V2))
        .await
        .expect_err("no broker, no write");
    match &err {
        ClientError::Api { status, code, .. } => {
            assert_eq!(*status, 503, "{err}");
            assert!((50001..=50003).contains(code), "{err}");
        }
        other => panic!("expected a JSON 503, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    // Reads of what is known answer from memory.
    assert_eq!(client.subjects().await.unwrap(), ["before-value"]);
    assert_eq!(client.schema_by_id(id).await.unwrap().schema, V1.trim());
    let (status, body) = raw_get(&format!("{base}/schemas/ids/{id}?format=serialized")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.version("before-value", "1").await.unwrap().id, id);
    let found = client
        .lookup("before-value", &SchemaRequest::protobuf(V1))
        .await
        .unwrap();
    assert_eq!(found.id, id);
    // Anything that needs the broker: 503 with Confluent's error body.
    let (status, body) = raw_get(&format!("{base}/schemas/ids/{}", id + 100)).await;
    assert_unavailable("unknown id", status, &body);
    let (status, body) = raw_get(&format!("{base}/subjects/before-value/versions/9")).await;
    assert_unavailable("unknown version", status, &body);
    let (status, body) = raw(
        "PUT",
        &format!("{base}/mode/before-value"),
        "application/json",
        br#"{"mode":"READONLY"}"#.to_vec(),
    )
    .await;
    assert_unavailable("mode change", status, &serde_json::to_value(&body).unwrap());
    let (status, body) = raw(
        "DELETE",
        &format!("{base}/subjects/before-value/versions/1"),
        "application/json",
        Vec::new(),
    )
    .await;
    assert_unavailable(
        "version delete",
        status,
        &serde_json::to_value(&body).unwrap(),
    );

    broker.restart().expect("broker comes back");
    let deadline = Instant::now() + Duration::from_secs(60);
    let id2 = loop {
        match client
            .register("after-value", &SchemaRequest::protobuf(V2))
            .await
        {
            Ok(id) => break id,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("registry did not recover: {e}\n{}", registry.log_tail()),
        }
    };
    assert!(id2 > id);
    let subjects = client.subjects().await.unwrap();
    assert!(
        subjects.contains(&"after-value".to_string()),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&"before-value".to_string()),
        "{subjects:?}"
    );
    // The unknown id is now a plain 404, and writes of every kind work.
    let (status, body) = raw_get(&format!("{base}/schemas/ids/{}", id + 100)).await;
    assert_eq!((status, body["error_code"].as_i64()), (404, Some(40403)));
    let (status, body) = raw_get(&format!("{base}/subjects/before-value/versions/9")).await;
    assert_eq!((status, body["error_code"].as_i64()), (404, Some(40402)));
    assert_eq!(
        client
            .set_mode(Some("before-value"), "READONLY", false)
            .await
            .unwrap(),
        "READONLY"
    );
}

#[tokio::test]
// Heavy: needs the Tansu broker and the schema-registry binary.
async fn register_command_registers_every_topic_schema() {
    let (_broker, registry, client) = start();
    let bin = vmr_testkit::workspace_bin("schema-registry").unwrap();
    let out = std::process::Command::new(bin)
        .args(["register", "--registry", &registry.url()])
        .output()
        .expect("run schema-registry register");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let specs = vmr_proto::schemas::topic_value_schemas();
    assert_eq!(stdout.lines().count(), specs.len(), "{stdout}");
    for (topic, source, index) in specs {
        let subject = vmr_proto::schemas::value_subject(topic);
        let v = client.version(&subject, "latest").await.unwrap();
        assert_eq!(v.schema, source.trim());
        assert!(
            stdout.contains(&format!("{subject}\tid={}", v.id)),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("message_indexes=[{index}]")));
    }
    // Event topics share one schema, hence one id.
    let ids: BTreeSet<i32> = client
        .register_vmr_schemas()
        .await
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids.len(), 2);
}

#[tokio::test]
// Heavy: needs the Tansu broker.
async fn conflicting_records_are_rejected_alike_by_every_instance() {
    use schema_registry::log::{LogConfig, SchemaLog};
    use schema_registry::registry::Registry as Service;
    use schema_registry::state::{schema_record, Applied, SchemaValue};

    let broker = Broker::start().expect("start the Tansu broker");
    let config = LogConfig {
        bootstrap_servers: broker.bootstrap(),
        topic: vmr_proto::topics::SCHEMAS.to_string(),
        timeout: Duration::from_secs(10),
        security: Default::default(),
    };
    let value = |subject: &str, id: i32, schema: &str| SchemaValue {
        subject: subject.to_string(),
        version: 1,
        id,
        schema_type: Some("PROTOBUF".into()),
        references: vec![],
        schema: schema.to_string(),
        deleted: false,
    };
    // Two writers that both picked id 1: the first record in the log wins.
    let a = SchemaLog::start(config.clone()).unwrap();
    a.sync().await.unwrap();
    let (k, v) = schema_record(&value("first-value", 1, V1));
    assert_eq!(a.append(&k, Some(&v)).await.unwrap(), Applied::Accepted);
    let (k, v) = schema_record(&value("second-value", 1, V2));
    assert!(matches!(
        a.append(&k, Some(&v)).await.unwrap(),
        Applied::Rejected(_)
    ));

    // Another instance replays the log to the same verdicts.
    let b = SchemaLog::start(config).unwrap();
    b.sync().await.unwrap();
    for log in [&a, &b] {
        log.read(|s| {
            assert_eq!(s.schema(1).unwrap().schema, V1.trim());
            assert_eq!(s.subjects(false), ["first-value"]);
            assert_eq!(s.max_id(), 1);
        });
    }
    // The loser's retry gets the next id.
    let service = Service::new(b);
    let id = service
        .register("second-value", &SchemaRequest::protobuf(V2), false)
        .await
        .unwrap();
    assert_eq!(id, 2);
}
