//! The Kafka security settings as librdkafka receives them, and
//! `schema-registry --check-config` on them. No broker is involved: the
//! broker used by the other tests (Tansu) speaks PLAINTEXT only, so what is
//! shown here is that librdkafka (built with OpenSSL) takes every property
//! and loads the PEM files it is given, and that a bad configuration is
//! refused before any client starts.
//!
//! Needs the `openssl` command (to make a CA and a client certificate); a
//! missing one fails the test by name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::producer::BaseProducer;
use schema_registry::log::{check_client_configs, producer_config, LogConfig};
use vmr_proto::config::{KafkaSecurity, KafkaSecuritySettings, SaslMechanism, SecurityProtocol};

/// A self-signed CA, used as the client certificate too, and its key.
fn make_pem(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("ca.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=vmreplay-test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap_or_else(|e| {
            panic!("the openssl command is missing ({e}); apt-get install openssl")
        });
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn log_config(security: KafkaSecurity) -> LogConfig {
    LogConfig {
        // Nothing listens there; no test here waits for a broker.
        bootstrap_servers: "127.0.0.1:1".into(),
        topic: "_schemas".into(),
        timeout: Duration::from_secs(1),
        security,
    }
}

#[test]
fn librdkafka_takes_every_protocol_and_mechanism() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = make_pem(dir.path());
    let pw = dir.path().join("password");
    std::fs::write(&pw, "pw-0123\n").unwrap();
    let env = |_: &str| None;
    for protocol in [
        SecurityProtocol::Plaintext,
        SecurityProtocol::Ssl,
        SecurityProtocol::SaslPlaintext,
        SecurityProtocol::SaslSsl,
    ] {
        let mechanisms: &[Option<SaslMechanism>] = if protocol.is_sasl() {
            &[
                Some(SaslMechanism::Plain),
                Some(SaslMechanism::ScramSha256),
                Some(SaslMechanism::ScramSha512),
            ]
        } else {
            &[None]
        };
        for &mechanism in mechanisms {
            let tls = protocol.is_tls();
            let settings = KafkaSecuritySettings {
                protocol,
                sasl_mechanism: mechanism,
                sasl_username: mechanism.map(|_| "vmr".to_string()),
                sasl_password_file: mechanism.map(|_| pw.clone()),
                ssl_ca_file: tls.then(|| ca.clone()),
                ssl_cert_file: tls.then(|| ca.clone()),
                ssl_key_file: tls.then(|| key.clone()),
            };
            let security = KafkaSecurity::resolve(settings, env).unwrap();
            let config = log_config(security);
            check_client_configs(&config)
                .unwrap_or_else(|e| panic!("librdkafka refused {protocol} {mechanism:?}: {e:?}"));
            // Creating a client loads the CA, the certificate and the key.
            let producer: Result<BaseProducer, _> = producer_config(&config).create();
            if let Err(e) = producer {
                panic!("no producer for {protocol} {mechanism:?}: {e}");
            }
        }
    }
}

#[test]
fn librdkafka_loads_the_ca_file_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-ca.crt");
    std::fs::write(&bad, "this is not PEM\n").unwrap();
    let settings = KafkaSecuritySettings {
        protocol: SecurityProtocol::Ssl,
        ssl_ca_file: Some(bad),
        ..Default::default()
    };
    // The file exists, so the settings pass; librdkafka reads it and refuses.
    let security = KafkaSecurity::resolve(settings, |_| None).unwrap();
    let config = log_config(security);
    let Err(err) = producer_config(&config).create::<BaseProducer>() else {
        panic!("librdkafka must refuse a CA file that is not PEM");
    };
    assert!(err.to_string().contains("ssl.ca.location"), "{err}");
}

fn registry(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_schema-registry"));
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .env_remove("VMR_KAFKA_SASL_USERNAME")
        .env_remove("VMR_KAFKA_SASL_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run schema-registry");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_refuses_a_sasl_ssl_config_whose_ca_file_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = make_pem(dir.path());
    let cfg = dir.path().join("registry.toml");
    let write = |ca: &Path| {
        std::fs::write(
            &cfg,
            format!(
                "bootstrap_servers = \"kafka:9093\"\n[kafka_security]\nprotocol = \"SASL_SSL\"\n\
                 sasl_mechanism = \"SCRAM-SHA-512\"\nssl_ca_file = {:?}\n",
                ca.display().to_string()
            ),
        )
        .unwrap();
    };
    let cfg_s = cfg.display().to_string();
    let env = [
        ("VMR_KAFKA_SASL_USERNAME", "vmr"),
        ("VMR_KAFKA_SASL_PASSWORD", "pw-0123-secret"),
    ];

    write(&ca);
    let (ok, text) = registry(&["serve", "--config", &cfg_s, "--check-config"], &env);
    assert!(ok, "{text}");
    assert!(text.contains("configuration is valid"), "{text}");
    assert!(
        text.contains("kafka_security=SASL_SSL sasl_mechanism=SCRAM-SHA-512 sasl_username=vmr"),
        "{text}"
    );
    assert!(
        !text.contains("pw-0123-secret"),
        "the password was printed: {text}"
    );

    let missing = dir.path().join("missing-ca.crt");
    write(&missing);
    let (ok, text) = registry(&["serve", "--config", &cfg_s, "--check-config"], &env);
    assert!(!ok, "{text}");
    let want = format!(
        "ssl-ca-file {} cannot be read: No such file or directory",
        missing.display()
    );
    assert!(text.contains(&want), "expected {want:?} in:\n{text}");
    assert!(
        !text.contains("panicked") && !text.contains("pw-0123-secret"),
        "{text}"
    );

    // The same with flags over a PLAINTEXT file, and the global flag first.
    let (ok, text) = registry(
        &[
            "--check-config",
            "serve",
            "--bootstrap-servers",
            "kafka:9093",
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-ssl-ca-file",
            &missing.display().to_string(),
        ],
        &env,
    );
    assert!(!ok && text.contains(&want), "{text}");

    // No password anywhere: refused, saying where one comes from.
    write(&ca);
    let (ok, text) = registry(
        &["serve", "--config", &cfg_s, "--check-config"],
        &[("VMR_KAFKA_SASL_USERNAME", "vmr")],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("needs a password (sasl-password-file or VMR_KAFKA_SASL_PASSWORD)"),
        "{text}"
    );
}

#[test]
fn check_config_refuses_bad_values_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registry.toml");
    let cfg_s = cfg.display().to_string();
    for (text, want) in [
        (
            "bootstrap_servers = \"k:9092\"\ntimeout_ms = 0\n",
            "timeout_ms must be positive",
        ),
        (
            "bootstrap_servers = \"k:9092\"\nlisten = \"nowhere\"\n",
            "invalid registry config",
        ),
        (
            "bootstrap_servers = \"k:9092\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        (
            "bootstrap_servers = \"k:9092\"\nmax_body_bytes = 4.194304e+06\n",
            "invalid registry config",
        ),
        (
            "bootstrap_servers = \"k:9092\"\n[kafka_security]\nprotocol = \"TLS\"\n",
            "unknown variant `TLS`",
        ),
        (
            "bootstrap_servers = \"k:9092\"\n[kafka_security]\nsasl_username = \"u\"\n",
            "sasl-username is set but Kafka security protocol PLAINTEXT does not use it",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (ok, out) = registry(&["serve", "--config", &cfg_s, "--check-config"], &[]);
        assert!(
            !ok && out.contains(want) && !out.contains("panicked"),
            "{text}\n-> {out}"
        );
    }
    let (ok, out) = registry(&["serve", "--check-config"], &[]);
    assert!(
        !ok && out.contains("--bootstrap-servers (or a --config file) is required"),
        "{out}"
    );
    let (ok, out) = registry(
        &["register", "--registry", "http://r:8081", "--check-config"],
        &[],
    );
    assert!(ok, "{out}");
}

/// Against the real (PLAINTEXT-only) broker: an explicit PLAINTEXT table
/// reads the topic, and the same client with SASL_PLAINTEXT does not, so the
/// settings reach the live clients rather than only the configuration.
#[tokio::test]
async fn the_settings_reach_the_live_clients() {
    use schema_registry::log::SchemaLog;
    use vmr_testkit::broker::Broker;

    let broker = Broker::start().expect("start the Tansu broker");
    let plaintext: KafkaSecurity = toml::from_str("protocol = \"PLAINTEXT\"").unwrap();
    let mut config = log_config(plaintext);
    config.bootstrap_servers = broker.bootstrap();
    config.timeout = Duration::from_secs(10);
    let log = SchemaLog::start(config.clone()).unwrap();
    log.sync().await.expect("PLAINTEXT reads the schemas topic");
    drop(log);

    let settings = KafkaSecuritySettings {
        protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: Some(SaslMechanism::Plain),
        sasl_username: Some("vmr".into()),
        ..Default::default()
    };
    config.security = KafkaSecurity::resolve(settings, |k| {
        (k == vmr_proto::config::ENV_SASL_PASSWORD).then(|| "pw".to_string())
    })
    .unwrap();
    config.timeout = Duration::from_secs(3);
    let log = SchemaLog::start(config).unwrap();
    let started = std::time::Instant::now();
    let err = log
        .sync()
        .await
        .expect_err("a SASL client must not read from a PLAINTEXT-only broker");
    println!(
        "SASL_PLAINTEXT against Tansu: {err} (after {:?})",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}
