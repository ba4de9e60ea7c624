//! The control socket: one JSON object per line in, one per line out.
//!
//! Requests (`cmd` selects the command):
//!
//! - `{"cmd":"metrics"}` → `{"ok":true,"metrics":{...}}`
//! - `{"cmd":"fault","rule":{"kind":"io-error","op":"read","sector_start":0,"sector_end":8,"count":1}}`
//!   (kinds: `io-error`, `drop`, `delay` with `delay_ms`, `duplicate`; frame
//!   kinds take `"direction":"rx"|"tx"`) → `{"ok":true}`
//! - `{"cmd":"clear-faults"}` → `{"ok":true}`
//! - `{"cmd":"inject","frame":"<hex>"}` (net in replay mode) → `{"ok":true}`
//! - `{"cmd":"set-filter","filter":{"kind":"block","ops":"write,flush"}}` or
//!   `{"cmd":"set-filter","filter":{"kind":"net","directions":"rx","port":80}}`
//!   → `{"ok":true}` (see [`crate::filter::RuntimeFilter`])
//! - `{"cmd":"checkpoint","next_layer":"<path>"}` → `{"ok":true,"seq":..,"frozen_layer":..,"clusters":..}`
//!   (see [`crate::checkpoint`])
//!
//! Errors answer `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::fault::{FaultRule, RuleFaults};
use crate::metrics::Metrics;
use crate::net::ChannelReplaySource;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket i/o")]
    Io(#[from] std::io::Error),
    #[error("bad reply: {0}")]
    Reply(String),
}

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Metrics snapshot.
    Metrics,
    /// Arm a fault rule.
    Fault { rule: FaultRule },
    /// Disarm every rule.
    ClearFaults,
    /// Queue a frame (hex) for the guest.
    Inject { frame: String },
    /// Replace the capture filter (see [`crate::filter::RuntimeFilter`]).
    SetFilter {
        filter: crate::filter::RuntimeFilter,
    },
    /// Drain, sync the capture, read the seq, freeze the disk layer.
    Checkpoint { next_layer: Option<PathBuf> },
}

/// What the control socket acts on.
#[derive(Clone)]
pub struct ControlTargets {
    /// Metrics to report.
    pub metrics: Arc<Metrics>,
    /// Fault rules to arm (None: faults refused).
    pub faults: Option<Arc<RuleFaults>>,
    /// Replay source to inject into (None: inject refused).
    pub source: Option<Arc<ChannelReplaySource>>,
    /// Checkpoints for the snapshot cut (None: refused).
    pub checkpoint: Option<Arc<dyn crate::checkpoint::Checkpoint>>,
}

impl ControlTargets {
    /// Runs one request line; returns the reply object.
    pub fn handle_line(&self, line: &str) -> serde_json::Value {
        let cmd: Command = match serde_json::from_str(line) {
            Ok(c) => c,
            Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        match cmd {
            Command::Metrics => json!({"ok": true, "metrics": self.metrics.snapshot()}),
            Command::SetFilter { filter } => crate::filter::control_set_filter(&filter),
            Command::Fault { rule } => match &self.faults {
                None => json!({"ok": false, "error": "faults are only accepted in replay mode"}),
                Some(f) => match f.add(rule) {
                    Ok(()) => json!({"ok": true}),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                },
            },
            Command::ClearFaults => {
                if let Some(f) = &self.faults {
                    f.clear();
                }
                json!({"ok": true})
            }
            Command::Checkpoint { next_layer } => {
                crate::checkpoint::handle(self.checkpoint.as_deref(), next_layer.as_deref())
            }
            Command::Inject { frame } => match (&self.source, decode_hex(&frame)) {
                (None, _) => json!({"ok": false, "error": "this backend has no replay source"}),
                (_, None) => json!({"ok": false, "error": "frame is not even-length hex"}),
                (Some(_), Some(f)) if f.len() < 14 || f.len() > crate::net::backend::MAX_FRAME => {
                    json!({"ok": false, "error": "frame must be 14 to 65550 bytes"})
                }
                (Some(s), Some(f)) => {
                    s.push(f);
                    json!({"ok": true})
                }
            },
        }
    }
}

/// Decodes lowercase or uppercase hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Encodes bytes as lowercase hex.
pub fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running control socket.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket).
    pub fn spawn(path: &Path, targets: ControlTargets) -> Result<Self, ControlError> {
        let _ = std::fs::remove_file(path);
        let listen_err = |source| ControlError::Listen {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let t = targets.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || serve_conn(conn, &t));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "control accept failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(conn: UnixStream, targets: &ControlTargets) {
    let _ = conn.set_nonblocking(false);
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = targets.handle_line(&line);
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// A client of the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to a control socket.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends a request object; returns the reply (errors if `ok` is false).
    pub fn request(&mut self, req: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        writeln!(self.writer, "{req}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| ControlError::Reply(e.to_string()))?;
        if v["ok"] != json!(true) {
            return Err(ControlError::Reply(v["error"].to_string()));
        }
        Ok(v)
    }

    /// Queues a frame for the guest.
    pub fn inject(&mut self, frame: &[u8]) -> Result<(), ControlError> {
        self.request(&json!({"cmd": "inject", "frame": encode_hex(frame)}))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let source = Arc::new(ChannelReplaySource::new().unwrap());
        let faults = Arc::new(RuleFaults::new());
        let _srv = ControlServer::spawn(
            &path,
            ControlTargets {
                metrics: Arc::default(),
                faults: Some(faults.clone()),
                source: Some(source.clone()),
                checkpoint: None,
            },
        )
        .unwrap();
        let mut c = ControlClient::connect(&path).unwrap();
        c.inject(&[0xab; 60]).unwrap();
        assert_eq!(source.pending(), 1);
        let m = c.request(&json!({"cmd": "metrics"})).unwrap();
        assert_eq!(m["metrics"]["requests"], 0);
        c.request(&json!({"cmd": "fault", "rule": {"kind": "drop", "direction": "tx"}}))
            .unwrap();
        use crate::fault::{FaultHook, FrameFault};
        assert_eq!(
            faults.frame(vmr_proto::pb::Direction::Tx, b""),
            FrameFault::Drop
        );
        assert!(c
            .request(&json!({"cmd": "inject", "frame": "abc"}))
            .is_err());
        assert!(c.request(&json!({"cmd": "bogus"})).is_err());
        assert!(c
            .request(&json!({"cmd": "fault", "rule": {"kind": "drop", "direction": "up"}}))
            .is_err());
    }
}
