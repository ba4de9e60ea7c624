//! Our Schema Registry binary, started against a broker.
//!
//! ```no_run
//! let broker = vmr_testkit::broker::Broker::start().unwrap();
//! let registry = vmr_testkit::registry::Registry::start(&broker.bootstrap()).unwrap();
//! let url = registry.url(); // "http://127.0.0.1:<port>"
//! # let _ = url;
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{free_port, wait_until, workspace_bin, ChildGuard, HarnessError};

/// How long the registry may take to read `_schemas` and start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `schema-registry serve`. Killed on drop.
#[derive(Debug)]
pub struct Registry {
    port: u16,
    log: PathBuf,
    _logdir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

/// Sends `GET path` over HTTP/1.0 and returns the status code and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

impl Registry {
    /// Starts the registry against `bootstrap` on a free port and waits until
    /// it has read `_schemas` and answers `GET /subjects`.
    pub fn start(bootstrap: &str) -> Result<Self, HarnessError> {
        let bin = workspace_bin("schema-registry")?;
        let port = free_port();
        let logdir = tempfile::Builder::new()
            .prefix("vmr-registry-")
            .tempdir()
            .map_err(|e| HarnessError::Failed(format!("creating the registry log dir: {e}")))?;
        let log = logdir.path().join("registry.log");
        let file = std::fs::File::create(&log)
            .map_err(|e| HarnessError::Failed(format!("creating the registry log: {e}")))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--bootstrap-servers")
            .arg(bootstrap)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let mut child = ChildGuard::spawn("schema-registry", &mut cmd)?;
        let ready = wait_until("schema-registry", READY_TIMEOUT, || {
            if let Some(status) = child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            match http_get(port, "/subjects")? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("HTTP {code}: {body}")),
            }
        });
        let registry = Self {
            port,
            log,
            _logdir: logdir,
            child: Some(child),
        };
        if let Err(e) = ready {
            return Err(HarnessError::Failed(format!(
                "{e}; registry log:\n{}",
                registry.log_tail()
            )));
        }
        Ok(registry)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The REST port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of the registry's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Stops the registry.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
