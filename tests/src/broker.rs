//! A real Kafka-protocol broker (Tansu 0.6, sqlite storage) on 127.0.0.1.
//!
//! ```no_run
//! let broker = vmr_testkit::broker::Broker::start().unwrap();
//! let bootstrap = broker.bootstrap(); // "127.0.0.1:<port>"
//! # let _ = bootstrap;
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{free_port, wait_until, ChildGuard, HarnessError};

/// Partitions of each event topic in tests.
pub const TEST_EVENT_PARTITIONS: i32 = 4;

/// How long the broker may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the Tansu binary: `$VMR_TANSU`, else
/// `<cache>/tansu-0.6.0/bin/tansu` (installed by scripts/setup.sh).
pub fn tansu_path() -> PathBuf {
    match std::env::var_os("VMR_TANSU") {
        Some(p) => PathBuf::from(p),
        None => crate::cache_dir()
            .join("tansu-0.6.0")
            .join("bin")
            .join("tansu"),
    }
}

/// A running broker with vmreplay's topics created. Killed on drop.
#[derive(Debug)]
pub struct Broker {
    tansu: PathBuf,
    port: u16,
    data: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl Broker {
    /// Starts a broker on a free port with a fresh sqlite database and creates
    /// every topic of [`vmr_proto::topics::topic_specs`] with
    /// [`TEST_EVENT_PARTITIONS`] partitions per event topic.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with_partitions(TEST_EVENT_PARTITIONS)
    }

    /// Like [`Broker::start`] with `event_partitions` partitions per event topic.
    pub fn start_with_partitions(event_partitions: i32) -> Result<Self, HarnessError> {
        let tansu = tansu_path();
        if !tansu.is_file() {
            return Err(HarnessError::Missing {
                what: "the Tansu Kafka broker (tansu 0.6; set $VMR_TANSU to override)".into(),
                path: tansu,
            });
        }
        let data = tempfile::Builder::new()
            .prefix("vmr-tansu-")
            .tempdir()
            .map_err(|e| HarnessError::Failed(format!("creating the broker data dir: {e}")))?;
        let mut broker = Self {
            tansu,
            port: free_port(),
            data,
            child: None,
        };
        broker.launch()?;
        for spec in vmr_proto::topics::topic_specs(event_partitions) {
            broker.create_topic(
                spec.name,
                spec.partitions.unwrap_or(event_partitions),
                &spec.configs,
            )?;
        }
        Ok(broker)
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| HarnessError::Failed(format!("creating the broker log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::Failed(format!("creating the broker log: {e}")))?;
        let mut cmd = Command::new(&self.tansu);
        cmd.arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            // Relative to the working directory, which is the data dir.
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .current_dir(self.data.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut child = ChildGuard::spawn("tansu", &mut cmd)?;
        let addr = format!("127.0.0.1:{}", self.port);
        let ready = wait_until("tansu broker", READY_TIMEOUT, || {
            if let Some(status) = child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            TcpStream::connect(&addr)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = ready {
            return Err(HarnessError::Failed(format!(
                "{e}; broker log:\n{}",
                self.log_tail()
            )));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Creates a topic through Tansu's admin client (CreateTopics).
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, String)],
    ) -> Result<(), HarnessError> {
        let mut cmd = Command::new(&self.tansu);
        cmd.args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--partitions")
            .arg(partitions.to_string());
        for (k, v) in configs {
            cmd.arg("--config").arg(format!("{k}={v}"));
        }
        cmd.arg(name);
        let out = cmd.output().map_err(|source| HarnessError::Spawn {
            what: "tansu topic create".into(),
            source,
        })?;
        if !out.status.success() {
            return Err(HarnessError::Failed(format!(
                "creating topic {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the sqlite database and the broker's log.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join("tansu.log")
    }

    /// The last lines of the broker's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the broker process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the broker (SIGTERM, then SIGKILL); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(5));
        }
    }

    /// Starts the broker again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.launch()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
