//! Shared by the console's browser tests: the prerequisites, a producer that
//! writes events as the agent's shipper does, the replayer process, the
//! console process and the selenium driver with its line protocol.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_proto::pb::replayer_client::ReplayerClient;
use vmr_proto::topics::partition_for;
use vmr_proto::{pb, Direction, EnvSample, Event, InstanceId, NetFrame, Payload};
use vmr_testkit::broker::{Broker, TEST_EVENT_PARTITIONS};
use vmr_testkit::registry::Registry;
use vmr_testkit::{workspace_bin, ChildGuard};

/// Fails, naming it, when chromium, chromedriver or selenium is missing.
pub fn require_browser() {
    for (bin, pkg) in [
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "this test needs {bin} (Debian package {pkg}: apt-get install {pkg})"
        );
    }
    let sel = Command::new("python3")
        .args(["-c", "import selenium"])
        .status();
    assert!(
        sel.is_ok_and(|s| s.success()),
        "this test needs python3 with selenium (pip install selenium)"
    );
}

/// Fails unless the test runs as root.
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root ({why})");
}

pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// A broker, a registry and a producer that writes events as the agent's
/// shipper does (key = instance id, explicit murmur2 partition,
/// Confluent-framed `vmr.v1.Event`, `vmr.seq` / `vmr.epoch` headers).
pub struct Kafka {
    pub broker: Broker,
    pub registry: Registry,
    rt: tokio::runtime::Runtime,
    producer: FutureProducer,
    schema_ids: HashMap<String, (u32, Vec<i32>)>,
}

impl Kafka {
    pub fn start() -> Self {
        let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
        let registry = Registry::start(&broker.bootstrap())
            .unwrap_or_else(|e| panic!("starting the schema registry: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = RegistryClient::new(&registry.url()).expect("registry client");
        let schema_ids = rt
            .block_on(client.register_vmr_schemas())
            .expect("register the vmr schemas")
            .into_iter()
            .map(|r| (r.topic.to_string(), (r.id as u32, r.message_indexes)))
            .collect();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", "10000000")
            .set("linger.ms", "5")
            .create()
            .expect("create producer");
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

    /// Produces `events` in order; each one's offset.
    pub fn send(&self, events: &[Event]) -> Vec<i64> {
        let mut pending = Vec::new();
        for e in events {
            let (id, idx) = &self.schema_ids[e.topic()];
            let mut value = Vec::new();
            codec::encode_message(*id, idx, &pb::Event::from(e.clone()), &mut value);
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
            let record = FutureRecord::to(e.topic())
                .key(key.as_bytes())
                .partition(partition_for(&key, TEST_EVENT_PARTITIONS))
                .payload(&value)
                .headers(headers);
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("enqueue a record"),
            );
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
}

/// `n` synthetic events of `instance` (frames and a sensor) from `seq` 1,
/// 20 ms apart, ending now; each frame's payload is `frame(seq)`.
pub fn synthetic(instance: &str, n: u64, frame: impl Fn(u64) -> Vec<u8>) -> Vec<Event> {
    let end = now_ns();
    (1..=n)
        .map(|seq| {
            let t = end - (n - seq) * 20_000_000;
            let payload = if seq % 3 == 0 {
                Payload::Env(EnvSample {
                    sensor: "host.load1".into(),
                    value: (seq % 7) as f64 / 2.0,
                    unit: String::new(),
                })
            } else {
                Payload::Net(NetFrame {
                    device: "net0".into(),
                    queue: 0,
                    direction: if seq % 2 == 0 {
                        Direction::Tx
                    } else {
                        Direction::Rx
                    },
                    frame: frame(seq),
                })
            };
            Event {
                instance: InstanceId::new(instance).expect("valid id"),
                seq,
                wall_time_ns: t,
                mono_time_ns: t,
                epoch: 1,
                payload,
            }
        })
        .collect()
}

/// The replayer process and how to start it again.
pub struct Replayer {
    pub config: PathBuf,
    pub addr: String,
    pub log: PathBuf,
    guard: Option<ChildGuard>,
}

impl Replayer {
    pub fn new(config: PathBuf, addr: String, log: PathBuf) -> Self {
        Self {
            config,
            addr,
            log,
            guard: None,
        }
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(workspace_bin("replayer").unwrap_or_else(|e| panic!("{e}")));
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--listen", &self.addr]);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("replayer log");
        cmd.stdout(Stdio::null()).stderr(log);
        self.guard =
            Some(ChildGuard::spawn("replayer", &mut cmd).unwrap_or_else(|e| panic!("{e}")));
        wait_for("the replayer to listen", Duration::from_secs(60), || {
            std::net::TcpStream::connect(&self.addr).ok()
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            // SIGTERM: the replayer tears every clone down before it exits.
            g.stop(Duration::from_secs(30));
        }
    }
}

/// The replayer's answer to `GetClone` with `token`, as one JSON line:
/// the state's enum name, `replayed_seq`, `delivered`, `seq_at_cut`,
/// `snapshot_id`, `switches`, `access` (the live clone's namespace), or
/// `{"error": ..., "code": ...}`.
pub fn get_clone(rt: &tokio::runtime::Runtime, addr: &str, token: &str, id: &str) -> String {
    rt.block_on(async {
        let mut c = match connect(addr).await {
            Ok(c) => c,
            Err(e) => return serde_json::json!({ "error": e }).to_string(),
        };
        match c
            .get_clone(authed(
                token,
                pb::GetCloneRequest {
                    clone_id: id.into(),
                },
            ))
            .await
        {
            Ok(c) => {
                let c = c.into_inner();
                let state = pb::CloneState::try_from(c.state)
                    .map(|s| s.as_str_name().to_string())
                    .unwrap_or_default();
                serde_json::json!({
                    "state": state,
                    "replayed_seq": c.replayed_seq,
                    "delivered": c.delivered,
                    "seq_at_cut": c.seq_at_cut,
                    "snapshot_id": c.snapshot_id,
                    "switches": c.switches,
                    "netns": c.access.map(|a| a.netns).unwrap_or_default(),
                })
                .to_string()
            }
            Err(s) => serde_json::json!({
                "error": s.message(),
                "code": format!("{:?}", s.code()),
            })
            .to_string(),
        }
    })
}

pub async fn connect(addr: &str) -> Result<ReplayerClient<tonic::transport::Channel>, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map(ReplayerClient::new)
        .map_err(|e| e.to_string())
}

pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// Starts `vmr-console` on `config` after `--check-config` accepted it;
/// waits until it listens on `addr`.
pub fn start_console(config: &Path, addr: &str, log: &Path) -> ChildGuard {
    let check = Command::new(env!("CARGO_BIN_EXE_vmr-console"))
        .arg("--config")
        .arg(config)
        .arg("--check-config")
        .output()
        .expect("run vmr-console --check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let g = ChildGuard::spawn(
        "vmr-console",
        Command::new(env!("CARGO_BIN_EXE_vmr-console"))
            .arg("--config")
            .arg(config)
            .stderr(std::fs::File::create(log).expect("log file")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for("the console to listen", Duration::from_secs(60), || {
        std::net::TcpStream::connect(addr).ok()
    });
    g
}

/// The driver process (in its own process group, with chromedriver and
/// chromium under it); the group is killed when it drops.
pub struct Driver(std::process::Child);

impl Driver {
    fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Self(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start python3 (needed for the browser driver): {e}")
        }))
    }

    /// Waits up to 30 s for the driver to end, then kills its group.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match self.0.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break None,
            }
        };
        // SAFETY: kill(2) with a negative pid signals the process group
        // created in `spawn`; it has no memory-safety requirements.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
        status
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// How a browser session ended.
#[derive(Debug)]
pub struct Session {
    /// The `PASS` lines, in order.
    pub passed: Vec<String>,
    /// `Ok` after `DONE`, the `FAIL` line, or why the driver gave no verdict.
    pub verdict: Result<(), String>,
}

/// Runs the selenium script `script` (a path under `console/tests/`) with
/// `env`, answering each `ACTION <words>` line with `act(words)`, for at
/// most `limit`.
pub fn run_driver(
    script: &str,
    env: &[(&str, String)],
    limit: Duration,
    mut act: impl FnMut(&[&str]) -> String,
) -> Session {
    let driver = vmr_testkit::workspace_root()
        .join("console/tests")
        .join(script);
    let mut py = Command::new("python3");
    py.arg(&driver)
        .env(
            "PYTHONPATH",
            vmr_testkit::workspace_root().join("console/tests"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        py.env(k, v);
    }
    let mut child = Driver::spawn(&mut py);
    let mut stdin = child.0.stdin.take().expect("piped stdin");
    let lines = BufReader::new(child.0.stdout.take().expect("piped stdout")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut passed = Vec::new();
    let mut verdict = None;
    while verdict.is_none() {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            verdict = Some(Err(format!(
                "the browser session took longer than {limit:?}"
            )));
            break;
        }
        let line = match rx.recv_timeout(left) {
            Ok(Ok(l)) => l,
            _ => break,
        };
        eprintln!("{script}: {line}");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ACTION") => {
                let words: Vec<&str> = words.collect();
                let answer = act(&words);
                writeln!(stdin, "{answer}").expect("answer the driver");
                stdin.flush().expect("answer the driver");
            }
            Some("PASS") => passed.push(line.clone()),
            Some("DONE") => verdict = Some(Ok(())),
            Some("FAIL") => verdict = Some(Err(line.clone())),
            _ => {}
        }
    }
    let status = child.stop();
    Session {
        passed,
        verdict: verdict
            .unwrap_or_else(|| Err(format!("the driver ended without a verdict ({status:?})"))),
    }
}

pub fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned()
}
