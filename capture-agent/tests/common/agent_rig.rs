//! Shared rig of the tests that run `capture-agent serve` as a real
//! process: its config file, start (waiting until it listens), SIGTERM and
//! SIGKILL, restart on the same config, a gRPC client, /metrics, an image
//! directory with the freestanding test guest, and the manifests on
//! `vmr.snapshots.v1`.
//!
//! A test crate includes it next to the shared module:
//!
//! ```ignore
//! mod common;
//! #[path = "common/agent_rig.rs"]
//! mod agent_rig;
//! ```

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;
use vmr_testkit::ChildGuard;

/// A gRPC client of the agent.
pub type Client = CaptureAgentClient<tonic::transport::Channel>;

pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

/// The directory of the workspace's vhost-tap binaries.
pub fn backend_dir() -> PathBuf {
    let b = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    b.parent().unwrap().to_path_buf()
}

/// `<root>/images` with the test guest (microVM, `memory_mib` of memory,
/// one 1 MiB disk); returns the directory.
pub fn test_guest_images(root: &Path, memory_mib: u32) -> PathBuf {
    let dir = root.join("images");
    let tg = dir.join("test-guest");
    std::fs::create_dir_all(&tg).unwrap();
    let elf = vmr_vmm::guest_abi::build_test_guest(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"),
    )
    .unwrap_or_else(|e| panic!("cannot build the test guest: {e}"));
    std::fs::copy(&elf, tg.join("test-guest.elf")).unwrap();
    std::fs::write(
        tg.join("image.toml"),
        format!(
            "format_version = 1\nname = \"test-guest\"\ndrivers = [\"microvm\"]\n\
             [boot]\nkernel = \"test-guest.elf\"\n[machine]\nmemory_mib = {memory_mib}\nvcpus = 1\n\
             [[disks]]\nname = \"vda\"\nsize_mib = 1\n"
        ),
    )
    .unwrap();
    dir
}

/// What the agent's config file holds.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    /// Where the config, the data directory (`data/`) and the logs go.
    pub dir: PathBuf,
    pub bootstrap: String,
    pub registry: String,
    /// The image directory.
    pub images: PathBuf,
    /// More lines of the `[agent]` table (`qemu-binary = "..."`).
    pub agent_extra: String,
    /// More tables (`[sensors]`, `[shipper]`, `[snapshots]`, ...).
    pub tables: String,
}

impl AgentSetup {
    pub fn new(dir: &Path, bootstrap: &str, registry: &str, images: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        AgentSetup {
            dir: dir.to_path_buf(),
            bootstrap: bootstrap.into(),
            registry: registry.into(),
            images: images.to_path_buf(),
            agent_extra: String::new(),
            tables: String::new(),
        }
    }

    /// For the snapshot tests: sensors off, schemas registered, and
    /// `snapshots` as the `[snapshots]` table's lines.
    pub fn snapshots(dir: &Path, stack: &super::common::Stack, snapshots: &str) -> Self {
        let mut s = Self::new(
            dir,
            &stack.broker.bootstrap(),
            &stack.registry.url(),
            &dir.join("images"),
        );
        s.tables = format!(
            "[sensors]\nenabled = false\n\n[shipper]\nregister-schemas = true\n\n\
             [snapshots]\n{snapshots}\n"
        );
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn text(&self, grpc: SocketAddr, metrics: SocketAddr) -> String {
        format!(
            "[endpoints]\nbootstrap-servers = \"{}\"\nregistry-url = \"{}\"\n\
             event-partitions = 4\n\n[agent]\nlisten = \"{grpc}\"\nmetrics-listen = \"{metrics}\"\n\
             data-dir = \"{}\"\nimage-dirs = [\"{}\"]\nbackend-dir = \"{}\"\n\
             stop-grace-secs = 5\ndrain-timeout-secs = 20\n{}\n\n{}\n",
            self.bootstrap,
            self.registry,
            self.data_dir().display(),
            self.images.display(),
            backend_dir().display(),
            self.agent_extra,
            self.tables,
        )
    }
}

/// `capture-agent serve` as a child process (its own process group);
/// SIGTERM on drop, then the group goes.
pub struct Agent {
    pub child: ChildGuard,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub setup: AgentSetup,
    starts: u32,
}

fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", vmr_testkit::free_port())
        .parse()
        .unwrap()
}

impl Agent {
    /// Writes `<dir>/agent.toml` and starts the agent on it.
    pub fn start(setup: AgentSetup) -> Agent {
        let grpc = free_addr();
        let metrics = free_addr();
        let config = setup.dir.join("agent.toml");
        std::fs::write(&config, setup.text(grpc, metrics)).unwrap();
        let log = setup.dir.join("agent.log");
        let child = Self::spawn(&config, &log, "capture-agent serve");
        let mut a = Agent {
            child,
            grpc,
            metrics,
            config,
            log,
            setup,
            starts: 1,
        };
        a.wait_listening();
        a
    }

    fn spawn(config: &Path, log: &Path, name: &str) -> ChildGuard {
        let mut cmd = Command::new(super::common::agent_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        ChildGuard::spawn(name.to_string(), &mut cmd).unwrap()
    }

    fn wait_listening(&mut self) {
        let end = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.grpc).is_err() {
            if let Some(s) = self.child.try_wait() {
                panic!("capture-agent serve exited ({s}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < end,
                "the agent does not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the agent again on the same config file (same addresses),
    /// logging to `agent.<n>.log`; the previous process must have exited.
    pub fn restart(&mut self) {
        assert!(
            self.child.try_wait().is_some(),
            "restart: the previous agent still runs"
        );
        self.starts += 1;
        self.log = self.setup.dir.join(format!("agent.{}.log", self.starts));
        self.child = Self::spawn(&self.config, &self.log, "capture-agent serve (restarted)");
        self.wait_listening();
    }

    pub async fn client(&self) -> CaptureAgentClient<tonic::transport::Channel> {
        CaptureAgentClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the agent")
    }

    /// The current process's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics; the body.
    pub fn scrape(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// SIGTERM to the agent alone (not its process group): it stops its
    /// instances and exits; returns its exit status (`None`: still running
    /// after 90 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(s) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on the pid of the child we own, not yet reaped.
        unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(90);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM; it must exit cleanly.
    pub fn stop_cleanly(&mut self) {
        let st = self.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "the agent did not exit cleanly ({st:?}):\n{}",
            self.log_text()
        );
    }

    /// SIGKILL to the agent process alone and waits for it (its backends
    /// survive, by design).
    pub fn kill9(&mut self) {
        // SAFETY: kill(2) on the pid of the child we own, not yet reaped.
        let r = unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(r, 0, "kill -9 of the agent");
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().is_none() {
            assert!(Instant::now() < end, "the killed agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to what a killed agent left running under its data
    /// directory (backends), found by their command lines, and waits until
    /// they are gone.
    pub fn kill_leftovers(&self) {
        let data = self.setup.data_dir().display().to_string();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = pids_mentioning(&data);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) on a process that the agent this test
                // started launched (its command line names our data dir).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            assert!(
                Instant::now() < end,
                "the killed agent's processes did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Processes (other than this one) whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Every file under `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Every manifest record on `vmr.snapshots.v1`: its key and manifest.
pub fn published_manifests(bootstrap: &str) -> Vec<(String, vmr_snapshot::Manifest)> {
    let topic = vmr_proto::topics::SNAPSHOTS;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "capture-agent-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    assert!(partitions > 0, "{topic} has no partitions");
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < end, "reading {topic}/{p} timed out");
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
                Err(e) => panic!("reading {topic}/{p}: {e}"),
            };
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let (_, manifest) = vmr_snapshot::decode_value(m.payload().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{topic}/{p}@{}: {e}", m.offset()));
            out.push((key, manifest));
            if m.offset() >= high - 1 {
                break;
            }
        }
    }
    out
}
