//! A QMP client over a unix socket.
//!
//! [`Qmp::handshake`] reads QEMU's greeting, starts a reader thread and
//! negotiates capabilities (`qmp_capabilities`). Commands carry an `id`; the
//! reader thread routes each reply to the caller waiting for that id and
//! hands every asynchronous event to the event handler given at handshake.
//! Every command waits at most its timeout, and a socket that closes while a
//! command waits fails that command with [`DriverError::Protocol`] at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::DriverError;

/// Longest QMP message accepted (a `query-*` reply is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// One asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name (`STOP`, `RESUME`, `GUEST_PANICKED`, `SHUTDOWN`, ...).
    pub name: String,
    /// The event's `data` (an empty object when it has none).
    pub data: Value,
    /// QEMU's timestamp, microseconds since the Unix epoch.
    pub timestamp_us: Option<u64>,
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

type Reply = Result<Value, DriverError>;

struct Shared {
    /// Commands waiting for a reply: id -> (command name, reply slot).
    pending: HashMap<u64, (String, Sender<Reply>)>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

/// A QMP connection.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Mutex<Shared>>,
    next_id: AtomicU64,
    version: Option<QemuVersion>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .field("closed", &self.shared.lock().closed)
            .finish()
    }
}

impl Qmp {
    /// Reads the greeting from `stream` (waiting at most `timeout`), starts
    /// the reader thread, which passes events to `on_event`, and negotiates
    /// capabilities.
    pub fn handshake(
        stream: UnixStream,
        timeout: Duration,
        on_event: impl Fn(QmpEvent) + Send + 'static,
    ) -> Result<Qmp, DriverError> {
        let proto = |what: &str, e: std::io::Error| DriverError::Protocol(format!("{what}: {e}"));
        let read_half = stream
            .try_clone()
            .map_err(|e| proto("cloning the QMP socket", e))?;
        read_half
            .set_read_timeout(Some(timeout))
            .map_err(|e| proto("setting the QMP read timeout", e))?;
        let mut reader = BufReader::new(read_half);
        let greeting = match read_message(&mut reader) {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(DriverError::Protocol(
                    "the QMP socket closed before the greeting".into(),
                ))
            }
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(DriverError::Timeout {
                    what: "the QMP greeting".into(),
                    after: timeout,
                })
            }
            Err(e) => {
                return Err(DriverError::Protocol(format!(
                    "reading the QMP greeting: {e}"
                )))
            }
        };
        let qmp_obj = greeting.get("QMP").ok_or_else(|| {
            DriverError::Protocol(format!("expected the QMP greeting, got {greeting}"))
        })?;
        let version = qmp_obj.pointer("/version/qemu").and_then(|v| {
            Some(QemuVersion {
                major: v.get("major")?.as_u64()?,
                minor: v.get("minor")?.as_u64()?,
                micro: v.get("micro")?.as_u64()?,
            })
        });
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| proto("clearing the QMP read timeout", e))?;

        let shared = Arc::new(Mutex::new(Shared {
            pending: HashMap::new(),
            closed: None,
        }));
        let shared2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, shared2, on_event))
            .map_err(|e| proto("starting the QMP reader thread", e))?;
        let qmp = Qmp {
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            version,
            reader: Mutex::new(Some(handle)),
        };
        qmp.execute("qmp_capabilities", json!({}), timeout)?;
        Ok(qmp)
    }

    /// The QEMU version named in the greeting.
    pub fn version(&self) -> Option<QemuVersion> {
        self.version
    }

    /// Whether the connection has closed, and why.
    pub fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    /// Runs `command` with `arguments` (an object; empty for none) and
    /// returns its `return` value, waiting at most `timeout`.
    pub fn execute(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        {
            let mut s = self.shared.lock();
            if let Some(why) = &s.closed {
                return Err(DriverError::Protocol(format!(
                    "cannot send {command}: the QMP connection is closed ({why})"
                )));
            }
            s.pending.insert(id, (command.to_string(), tx));
        }
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let written = {
            let mut w = self.writer.lock();
            w.set_write_timeout(Some(timeout))
                .and_then(|_| w.write_all(line.as_bytes()))
        };
        if let Err(e) = written {
            self.shared.lock().pending.remove(&id);
            return Err(DriverError::Protocol(format!("sending {command}: {e}")));
        }
        tracing::trace!(command, id, "QMP command sent");
        match rx.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.lock().pending.remove(&id);
                Err(DriverError::Timeout {
                    what: format!("the QMP reply to {command}"),
                    after: timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(DriverError::Protocol(format!(
                "the QMP connection closed while waiting for the reply to {command}"
            ))),
        }
    }

    /// Closes the connection and joins the reader thread once it has ended
    /// (waiting at most 5 s; a reader still busy in the event handler then
    /// is left to end on its own). Commands waiting for a reply fail with
    /// [`DriverError::Protocol`].
    pub fn close(&self) {
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.lock().take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    TooLong,
    Json(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::TooLong => write!(f, "a message exceeds {MAX_MESSAGE_BYTES} bytes"),
            ReadError::Json(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one JSON message (one line); `None` at end of stream.
fn read_message(r: &mut BufReader<UnixStream>) -> Result<Option<Value>, ReadError> {
    let mut line = Vec::new();
    loop {
        let n = r
            .by_ref()
            .take((MAX_MESSAGE_BYTES + 1 - line.len()) as u64)
            .read_until(b'\n', &mut line)
            .map_err(ReadError::Io)?;
        if n == 0 {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Json(format!(
                    "the stream ended inside a message: {:?}",
                    String::from_utf8_lossy(&line)
                )))
            };
        }
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(ReadError::TooLong);
        }
        if line.ends_with(b"\n") {
            if line.iter().all(u8::is_ascii_whitespace) {
                line.clear();
                continue;
            }
            return serde_json::from_slice(&line).map(Some).map_err(|e| {
                ReadError::Json(format!(
                    "bad JSON {:?}: {e}",
                    String::from_utf8_lossy(&line).trim_end()
                ))
            });
        }
    }
}

fn reader_loop(
    mut reader: BufReader<UnixStream>,
    shared: Arc<Mutex<Shared>>,
    on_event: impl Fn(QmpEvent),
) {
    let why = loop {
        let msg = match read_message(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) => break "QEMU closed the QMP socket".to_string(),
            Err(e) => break format!("reading from the QMP socket: {e}"),
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let timestamp_us = msg.get("timestamp").and_then(|t| {
                Some(t.get("seconds")?.as_u64()? * 1_000_000 + t.get("microseconds")?.as_u64()?)
            });
            let ev = QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or_else(|| json!({})),
                timestamp_us,
            };
            tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
            on_event(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(message = %msg, "QMP message without an id ignored");
            continue;
        };
        let Some((command, tx)) = shared.lock().pending.remove(&id) else {
            tracing::debug!(id, "QMP reply for a command that stopped waiting");
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
            let desc = err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("no description");
            Err(DriverError::Command {
                command,
                reason: format!("{desc} ({class})"),
            })
        } else {
            Err(DriverError::Protocol(format!(
                "reply to {command} has neither return nor error: {msg}"
            )))
        };
        // The caller may have timed out and gone; nothing to do then.
        let _ = tx.send(reply);
    };
    tracing::debug!(reason = %why, "QMP reader ends");
    let mut s = shared.lock();
    for (_, (command, tx)) in s.pending.drain() {
        let _ = tx.send(Err(DriverError::Protocol(format!(
            "{why} while waiting for the reply to {command}"
        ))));
    }
    s.closed = Some(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 3, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A QMP peer on a real unix socket that runs `script` against the
    /// accepted connection.
    fn peer(
        script: impl FnOnce(BufReader<UnixStream>, UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, UnixStream, JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            script(r, s);
        });
        let client = UnixStream::connect(&path).unwrap();
        (dir, client, h)
    }

    fn read_cmd(r: &mut BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn reply(w: &mut UnixStream, v: Value) {
        w.write_all(format!("{v}\n").as_bytes()).unwrap();
    }

    fn negotiate(r: &mut BufReader<UnixStream>, w: &mut UnixStream) {
        w.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
        let c = read_cmd(r);
        assert_eq!(c["execute"], "qmp_capabilities");
        reply(w, json!({"return": {}, "id": c["id"]}));
    }

    #[test]
    fn commands_replies_errors_and_events() {
        let (_d, client, h) = peer(|mut r, mut w| {
            negotiate(&mut r, &mut w);
            let c = read_cmd(&mut r);
            assert_eq!(c["execute"], "query-status");
            // An event between command and reply goes to the handler.
            reply(
                &mut w,
                json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 2, "microseconds": 5}}),
            );
            reply(
                &mut w,
                json!({"return": {"status": "paused"}, "id": c["id"]}),
            );
            let c = read_cmd(&mut r);
            assert_eq!(c["arguments"], json!({"uri": "exec:true"}));
            reply(
                &mut w,
                json!({"error": {"class": "GenericError", "desc": "no"}, "id": c["id"]}),
            );
            // Hold the connection until the client closes it.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let qmp =
            Qmp::handshake(client, Duration::from_secs(5), move |e| tx.send(e).unwrap()).unwrap();
        assert_eq!(
            qmp.version(),
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 3
            })
        );
        let v = qmp
            .execute("query-status", json!({}), Duration::from_secs(5))
            .unwrap();
        assert_eq!(v["status"], "paused");
        let ev = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.timestamp_us, Some(2_000_005));
        let e = qmp
            .execute(
                "migrate",
                json!({"uri": "exec:true"}),
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(
            matches!(&e, DriverError::Command { command, reason } if command == "migrate" && reason.contains("no (GenericError)")),
            "{e}"
        );
        qmp.close();
        h.join().unwrap();
        let e = qmp
            .execute("cont", json!({}), Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }

    #[test]
    fn socket_closing_mid_command_is_a_protocol_error_at_once() {
        let (_d, client, h) = peer(|mut r, mut w| {
            negotiate(&mut r, &mut w);
            let c = read_cmd(&mut r);
            assert_eq!(c["execute"], "query-migrate");
            // Close without answering.
            drop(r);
            drop(w);
        });
        let qmp = Qmp::handshake(client, Duration::from_secs(5), |_| {}).unwrap();
        let start = Instant::now();
        let e = qmp
            .execute("query-migrate", json!({}), Duration::from_secs(30))
            .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "waited for the timeout"
        );
        assert!(matches!(e, DriverError::Protocol(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("closed the QMP socket") && text.contains("query-migrate"),
            "{text}"
        );
        h.join().unwrap();
        assert!(qmp.closed().is_some());
    }

    #[test]
    fn a_silent_peer_times_out_and_a_bad_greeting_is_refused() {
        // No reply to a command: the per-command timeout ends the wait.
        let (_d, client, h) = peer(|mut r, mut w| {
            negotiate(&mut r, &mut w);
            let _ = read_cmd(&mut r);
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let qmp = Qmp::handshake(client, Duration::from_secs(5), |_| {}).unwrap();
        let e = qmp
            .execute("query-status", json!({}), Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, DriverError::Timeout { .. }), "{e:?}");
        qmp.close();
        h.join().unwrap();

        // Something that is not QMP.
        let (_d, client, h) = peer(|_r, mut w| {
            w.write_all(b"SSH-2.0-OpenSSH\n").unwrap();
        });
        let e = Qmp::handshake(client, Duration::from_secs(5), |_| {}).unwrap_err();
        assert!(e.to_string().contains("bad JSON"), "{e}");
        h.join().unwrap();

        // A peer that never greets.
        let (_d, client, h) = peer(|mut r, _w| {
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let e = Qmp::handshake(
            client.try_clone().unwrap(),
            Duration::from_millis(200),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, DriverError::Timeout { .. }), "{e:?}");
        client.shutdown(std::net::Shutdown::Both).unwrap();
        h.join().unwrap();

        // A peer that greets and closes before answering qmp_capabilities.
        let (_d, client, h) = peer(|mut r, mut w| {
            w.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            let _ = read_cmd(&mut r);
        });
        let e = Qmp::handshake(client, Duration::from_secs(5), |_| {}).unwrap_err();
        assert!(
            matches!(&e, DriverError::Protocol(m) if m.contains("qmp_capabilities")),
            "{e:?}"
        );
        h.join().unwrap();
    }
}
