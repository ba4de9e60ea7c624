//! The `replayer` binary with TLS configured: a client that trusts the
//! server's certificate gets health answers and authorization errors over
//! TLS; a plaintext client gets nothing. Needs `openssl` (to make a
//! self-signed certificate); no broker or VM is involved.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use vmr_proto::pb;
use vmr_testkit::{free_port, ChildGuard};

#[test]
fn grpc_over_tls_when_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let (ca, cert, key) = (d.join("ca.pem"), d.join("cert.pem"), d.join("key.pem"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(d)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("this test needs openssl: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A CA, and a server certificate for localhost signed by it.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
work_dir = "{work}"
[kafka]
bootstrap_servers = "127.0.0.1:1"
[store]
url = "file://{store}"
[tls]
cert = "{cert}"
key = "{key}"
[[tokens]]
token = "a-token-of-tenant-one"
tenant = "one"
[[tenants]]
name = "one"
instance_prefix = "one-"
"#,
        work = d.join("work").display(),
        store = d.join("store").display(),
        cert = cert.display(),
        key = key.display(),
    );
    let config_path = d.join("replayer.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut server = ChildGuard::spawn(
        "replayer",
        Command::new(env!("CARGO_BIN_EXE_replayer"))
            .arg("--config")
            .arg(&config_path),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    replayer::service::install_crypto_provider();
    rt.block_on(async {
        let ca = Certificate::from_pem(std::fs::read(&ca).expect("CA certificate"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("localhost");
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("url")
            .tls_config(tls)
            .expect("tls config")
            .connect_timeout(Duration::from_secs(5));
        let start = Instant::now();
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "no TLS server: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health over TLS")
            .into_inner();
        assert_eq!(
            h.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let mut c = pb::replayer_client::ReplayerClient::new(channel);
        let e = c
            .list_clones(pb::ListClonesRequest {})
            .await
            .expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);

        // Plaintext gets no answer from a TLS server.
        let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if let Ok(ch) = plain.connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            assert!(
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new()
                })
                .await
                .is_err(),
                "a plaintext call was answered"
            );
        }
    });
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replayer did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
