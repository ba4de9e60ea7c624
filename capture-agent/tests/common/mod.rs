//! Shared rig of the shipper tests: a real Tansu broker and our registry
//! (vmr-testkit), capture spools written by the vhost-tap library, the
//! `capture-agent` binary as a real process, and a consumer that reads back
//! what landed in Kafka.
//!
//! Heavy: needs the Tansu broker (scripts/setup.sh) and the schema-registry
//! binary (`cargo build --workspace --bins`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::metrics::MetricsSnapshot;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use schema_registry::client::RegistryClient;
use vhost_tap::capture::{Policy, Recycle, SpoolConfig, SpoolSink, Tee, TeeConfig};
use vhost_tap::seq::{FileSeq, SeqSource};
use vmr_proto::pb;
use vmr_testkit::broker::Broker;
use vmr_testkit::qemu::NetNs;
use vmr_testkit::registry::Registry;
use vmr_testkit::ChildGuard;

/// A broker and a registry with vmreplay's schemas registered (what
/// scripts/stack.sh does).
pub struct Stack {
    pub broker: Broker,
    pub registry: Registry,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

impl Stack {
    pub fn start() -> Self {
        let broker = Broker::start().expect("start the Tansu broker");
        let registry = Registry::start(&broker.bootstrap()).expect("start schema-registry");
        let client = RegistryClient::new(&registry.url()).unwrap();
        runtime()
            .block_on(client.register_vmr_schemas())
            .expect("register the vmreplay schemas");
        Self { broker, registry }
    }

    /// A config file for the agent pointing at this stack.
    pub fn config_file(&self, dir: &Path, extra: &str) -> PathBuf {
        write_config(dir, &self.broker.bootstrap(), &self.registry.url(), extra)
    }
}

pub fn write_config(dir: &Path, bootstrap: &str, registry: &str, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let mut shipper = String::new();
    for (k, v) in [
        ("retry-initial-ms", "200"),
        ("retry-max-ms", "2000"),
        ("request-timeout-secs", "10"),
        ("commit-interval-ms", "100"),
    ] {
        if !extra.lines().any(|l| l.trim_start().starts_with(k)) {
            shipper.push_str(&format!("{k} = {v}\n"));
        }
    }
    std::fs::write(
        &path,
        format!(
            "[endpoints]\nbootstrap-servers = \"{bootstrap}\"\nregistry-url = \"{registry}\"\n\
             event-partitions = 4\n\n[shipper]\n{shipper}{extra}\n"
        ),
    )
    .unwrap();
    path
}

/// A device of an instance writing into its spool through the real tee.
pub struct Device {
    pub tee: Tee,
    pub name: String,
    pub spool: PathBuf,
}

pub fn spool_config(dir: &Path, instance: &str, epoch: u64) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_owned(),
        segment_bytes: 256 << 10,
        capacity_bytes: 256 << 20,
        recycle: Recycle::Committed,
        instance_id: instance.to_owned(),
        epoch,
    }
}

impl Device {
    /// Opens `spool` with the instance's shared sequence file `seq`.
    pub fn open(instance: &str, name: &str, spool: &Path, seq: &Path) -> Self {
        Self::open_with_capacity(instance, name, spool, seq, 256 << 20)
    }

    /// Like [`Device::open`] with a spool of at most `capacity` bytes.
    pub fn open_with_capacity(
        instance: &str,
        name: &str,
        spool: &Path,
        seq: &Path,
        capacity: u64,
    ) -> Self {
        let seq = Arc::new(FileSeq::open(seq).expect("open the sequence file"));
        let mut sc = spool_config(spool, instance, seq.epoch());
        sc.capacity_bytes = capacity;
        let sink = Arc::new(SpoolSink::open(sc).unwrap());
        let mut cfg = TeeConfig::new(instance);
        cfg.policy = Policy::Block;
        cfg.state = Some(spool.join("device.state"));
        let tee = Tee::start(
            cfg,
            sink,
            seq,
            Arc::new(vhost_tap::metrics::Metrics::default()),
        )
        .expect("start the tee");
        Self {
            tee,
            name: name.to_owned(),
            spool: spool.to_owned(),
        }
    }

    /// Like [`Device::open_with_capacity`], with policy `block` bounded:
    /// past `bound` of a full spool, records are dropped with a GAP.
    pub fn open_bounded(
        instance: &str,
        name: &str,
        spool: &Path,
        seq: &Path,
        capacity: u64,
        bound: Duration,
    ) -> Self {
        let seq = Arc::new(FileSeq::open(seq).expect("open the sequence file"));
        let mut sc = spool_config(spool, instance, seq.epoch());
        sc.capacity_bytes = capacity;
        let sink = Arc::new(SpoolSink::open(sc).unwrap());
        let mut cfg = TeeConfig::new(instance);
        cfg.policy = Policy::Block;
        cfg.block_bound = Some(bound);
        cfg.state = Some(spool.join("device.state"));
        let tee = Tee::start(
            cfg,
            sink,
            seq,
            Arc::new(vhost_tap::metrics::Metrics::default()),
        )
        .expect("start the tee");
        Self {
            tee,
            name: name.to_owned(),
            spool: spool.to_owned(),
        }
    }

    /// A 4 KiB block write.
    pub fn block_write(&self, n: u64) {
        let data = vec![(n % 251) as u8; 4096];
        self.tee.record_block(
            &self.name,
            0,
            pb::BlockOp::Write,
            n * 8,
            4096,
            Some(&data),
            None,
            pb::BlockStatus::Ok,
        );
    }

    /// A 1500-byte frame.
    pub fn frame(&self, n: u64) {
        let frame = vec![(n % 253) as u8; 1500];
        self.tee
            .record_frame(&self.name, 0, pb::Direction::Rx, &frame);
    }

    pub fn sync(&self) {
        self.tee.sync().expect("the capture becomes durable");
    }

    pub fn shutdown(self) {
        self.tee.shutdown();
    }
}

/// A writer thread recording into devices until stopped; returns how many
/// records it wrote.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<Device>>>,
}

impl Writer {
    /// Alternates block writes on `devices[0]` and frames on `devices[1]`
    /// (if any), `per_sec` records a second.
    pub fn start(devices: Vec<Device>, per_sec: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::Acquire) {
                let due = start.elapsed().as_secs_f64() * per_sec as f64;
                if (n as f64) >= due {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let d = &devices[(n as usize) % devices.len()];
                if d.name.starts_with("vd") {
                    d.block_write(n);
                } else {
                    d.frame(n);
                }
                n += 1;
                w.store(n, Ordering::Release);
            }
            for d in &devices {
                d.sync();
            }
            devices
        });
        Self {
            stop,
            written,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Stops writing, makes everything durable, shuts the tees down.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let devices = self.thread.take().unwrap().join().expect("writer thread");
        for d in devices {
            d.shutdown();
        }
        self.count()
    }
}

/// The capture-agent binary running `ship` for one spool.
pub struct ShipProcess {
    pub child: ChildGuard,
    pub metrics: PathBuf,
    pub log: PathBuf,
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_capture-agent"))
}

impl ShipProcess {
    pub fn start(config: &Path, spool: &Path, instance: &str, work: &Path, tag: &str) -> Self {
        let metrics = work.join(format!("{tag}.metrics.json"));
        let log = work.join(format!("{tag}.log"));
        let _ = std::fs::remove_file(&metrics);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("ship")
            .arg("--config")
            .arg(config)
            .arg("--spool")
            .arg(spool)
            .arg("--instance")
            .arg(instance)
            .arg("--metrics-file")
            .arg(&metrics)
            .arg("--metrics-interval-ms")
            .arg("100")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let child = ChildGuard::spawn(format!("capture-agent {tag}"), &mut cmd).unwrap();
        Self {
            child,
            metrics,
            log,
        }
    }

    pub fn metrics(&self) -> Option<MetricsSnapshot> {
        let text = std::fs::read_to_string(&self.metrics).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until `pred` holds for the metrics, or panics after `timeout`.
    pub fn wait_metrics(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&MetricsSnapshot) -> bool,
    ) -> MetricsSnapshot {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "capture-agent exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if let Some(m) = self.metrics() {
                if pred(&m) {
                    return m;
                }
                if Instant::now() >= end {
                    panic!(
                        "{what}: not reached within {timeout:?}; metrics {m:?}; log:\n{}",
                        self.log_tail()
                    );
                }
            } else if Instant::now() >= end {
                panic!(
                    "{what}: no metrics within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM and wait (the shipper commits and exits).
    pub fn stop(mut self) -> Option<MetricsSnapshot> {
        let status = self.child.stop(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "capture-agent did not exit cleanly ({status:?}); log:\n{}",
            self.log_tail()
        );
        self.metrics()
    }

    /// SIGKILL, no chance to commit.
    pub fn kill9(mut self) {
        let pid = self.child.pid() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child we own.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().is_none() {
            assert!(Instant::now() < end, "capture-agent survived SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub headers: BTreeMap<String, String>,
    pub schema_id: u32,
    pub event: pb::Event,
}

/// Every record of `topic`'s partitions (all of them), in offset order.
pub fn read_topic(bootstrap: &str, topic: &str, partitions: i32) -> Vec<Got> {
    try_read_topic(bootstrap, topic, partitions).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`read_topic`]; broker errors come back as `Err`.
pub fn try_read_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<Vec<Got>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "capture-agent-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.message.max.bytes", (16 << 20).to_string())
        .create()
        .unwrap();
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if Instant::now() >= end {
                return Err(format!("reading {topic}/{p} timed out"));
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
                Err(e) => return Err(format!("reading {topic}/{p}: {e}")),
            };
            let framed = schema_registry::codec::decode(m.payload().expect("a value"))
                .expect("a Confluent-framed value");
            let event = pb::Event::decode(framed.payload).expect("an Event");
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for h in h.iter() {
                    headers.insert(
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Got {
                topic: topic.to_owned(),
                partition: p,
                offset: m.offset(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                headers,
                schema_id: framed.schema_id,
                event,
            });
            if m.offset() >= high - 1 {
                break;
            }
        }
    }
    Ok(out)
}

/// Checks that the records of `instance` across `got` carry every seq in
/// `1..=n` exactly once, in the instance's partition, with matching headers,
/// and in increasing order per topic (offset order). Returns the seqs per
/// topic.
pub fn check_exactly_once(got: &[Got], instance: &str, n: u64) -> BTreeMap<String, usize> {
    let partition = vmr_proto::topics::partition_for(instance, 4);
    let mine: Vec<&Got> = got.iter().filter(|g| g.key == instance).collect();
    let mut seqs: Vec<u64> = mine.iter().map(|g| g.event.seq).collect();
    seqs.sort_unstable();
    let dups: Vec<u64> = seqs
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        dups.is_empty(),
        "{instance}: seqs delivered twice: {:?}",
        &dups[..dups.len().min(20)]
    );
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected {
        let missing: Vec<u64> = (1..=n)
            .filter(|s| seqs.binary_search(s).is_err())
            .take(20)
            .collect();
        panic!(
            "{instance}: {} records, expected seqs 1..={n}; first missing {missing:?}; max {:?}",
            seqs.len(),
            seqs.last()
        );
    }
    let mut per_topic = BTreeMap::new();
    for g in &mine {
        assert_eq!(
            g.partition, partition,
            "{instance} seq {} in the wrong partition",
            g.event.seq
        );
        assert_eq!(g.event.instance_id, instance);
        assert_eq!(g.headers["vmr.seq"], g.event.seq.to_string());
        assert_eq!(g.headers["vmr.epoch"], g.event.epoch.to_string());
        *per_topic.entry(g.topic.clone()).or_insert(0) += 1;
    }
    // In order per topic: offsets increase with seq.
    let mut by_topic: BTreeMap<&str, Vec<&Got>> = BTreeMap::new();
    for g in &mine {
        by_topic.entry(g.topic.as_str()).or_default().push(g);
    }
    for (topic, mut v) in by_topic {
        v.sort_by_key(|g| g.offset);
        let s: Vec<u64> = v.iter().map(|g| g.event.seq).collect();
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "{topic}: seqs out of order in the partition"
        );
    }
    per_topic
}

/// Reads the event topics until `instance` has `n` records (bounded).
pub fn wait_for_records(bootstrap: &str, instance: &str, n: usize, timeout: Duration) -> Vec<Got> {
    let end = Instant::now() + timeout;
    loop {
        let mut all = Vec::new();
        for t in vmr_proto::topics::EVENT_TOPICS {
            match try_read_topic(bootstrap, t, 4) {
                Ok(v) => all.extend(v),
                Err(e) if Instant::now() < end => {
                    eprintln!("retrying the read-back: {e}");
                    all.clear();
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mine = all.iter().filter(|g| g.key == instance).count();
        if mine >= n || Instant::now() >= end {
            return all;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Generates `vmr/v1/event_pb2.py` under `dir`.
pub fn generate_pb2(dir: &Path) {
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

/// Runs examples/analytics_consumer.py on `topic`; returns the JSON lines.
pub fn analytics_consumer(
    stack: &Stack,
    topic: &str,
    n: usize,
    pb2: &Path,
) -> Vec<serde_json::Value> {
    let script = vmr_testkit::workspace_root()
        .join("examples")
        .join("analytics_consumer.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "--bootstrap",
            &stack.broker.bootstrap(),
            "--registry",
            &stack.registry.url(),
        ])
        .args([
            "--topic",
            topic,
            "--from-beginning",
            "--max-messages",
            &n.to_string(),
        ])
        .args(["--timeout", "90", "--pb2-dir"])
        .arg(pb2)
        .output()
        .unwrap_or_else(|e| panic!("python3 is required: {e}"));
    assert!(
        out.status.success(),
        "analytics_consumer.py failed ({}); pip install 'confluent-kafka[protobuf]' requests protobuf\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The demo-linux guest's service address.
pub const SERVICE: &str = "192.168.77.2:7000";

/// The demo-linux machine image (`$VMR_GUEST_LINUX` or the cache).
pub fn demo_linux_image_dir() -> PathBuf {
    let dir = std::env::var_os("VMR_GUEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmr_testkit::cache_dir().join("demo-linux"));
    assert!(
        dir.join("image.toml").is_file(),
        "the demo-linux machine image ({}/image.toml) is missing: build it with guest/linux/build.sh",
        dir.display()
    );
    dir
}

pub fn qemu_binary() -> PathBuf {
    let p = std::env::var_os("VMR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    assert!(
        p.is_file(),
        "QEMU not found at {}: install qemu-system-x86 (scripts/setup.sh) or set $VMR_QEMU",
        p.display()
    );
    p
}

pub fn enter_netns(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: setns(2) on a valid namespace fd held open by `f`; it changes
    // only this (test-owned) thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sends one request line to the guest's service from inside `ns`.
pub fn request(ns: &NetNs, line: &str) -> Result<String, String> {
    let path = ns.path();
    let line = line.to_string();
    let addr: SocketAddr = SERVICE.parse().expect("a valid address");
    std::thread::spawn(move || -> Result<String, String> {
        enter_netns(&path)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        (&stream)
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        let _ = BufReader::new(&stream).read_line(&mut reply);
        Ok(reply.trim_end().to_string())
    })
    .join()
    .map_err(|_| "request thread panicked".to_string())?
}
