//! The control socket: one JSON object per line in, one per line out.
//!
//! Requests (`cmd` selects the command; docs/vhost-tap.md describes each):
//!
//! - `{"cmd":"metrics"}` → `{"ok":true,"metrics":{...}}`
//! - `{"cmd":"fault","rule":{"kind":"io-error","op":"read","sector_start":0,"sector_end":8,"count":1}}`
//!   (kinds: `io-error`, `drop`, `delay` with `delay_ms`, `duplicate`; frame
//!   kinds take `"direction":"rx"|"tx"`; optional `device`, `at_seq`,
//!   `at_ns`, `probability` + `seed`) → `{"ok":true,"rule":ID,"seed":S}`
//! - `{"cmd":"faults"}` → the armed rules; `{"cmd":"clear-faults"}` → `{"ok":true}`
//! - `{"cmd":"inject","frame":"<hex>","seq":N,"at_ns":T}` (net in replay
//!   mode; `seq` and `at_ns` optional) → `{"ok":true}`
//! - `{"cmd":"inject-batch","frames":[{"frame":"<hex>","seq":N,"at_ns":T},...]}`
//!   → `{"ok":true,"queued":n}` (all or none)
//! - `{"cmd":"clear-frames"}` → `{"ok":true,"cleared":n}`
//! - `{"cmd":"clock","action":"get|pause|resume|scale|step|set","factor":F,"ns":N}`
//!   → `{"ok":true,"clock":{"ns":..,"paused":..,"factor":..}}`
//! - `{"cmd":"status"}` → `{"ok":true,"mode":..,"pending":..,"clock":..,"faults":n}`
//! - `{"cmd":"expect","records":[{"seq":..,"op":"write","sector":..,"len":..,"hash":"<xxh3-128>"},...]}`
//!   (block in replay mode) → `{"ok":true,"loaded":n}`; `{"cmd":"compare"}`
//!   → `{"ok":true,"compare":{...}}`; `{"cmd":"clear-expect"}`
//! - `{"cmd":"subscribe","data":false}` (replay mode) → `{"ok":true,"subscribed":true}`,
//!   then the connection carries one JSON line per output of the clone
//!   ([`crate::capture::replay::Output`]) until either side closes it
//! - `{"cmd":"set-filter","filter":{"kind":"block","ops":"write,flush"}}` or
//!   `{"cmd":"set-filter","filter":{"kind":"net","directions":"rx","port":80}}`
//!   → `{"ok":true}` (see [`crate::filter::RuntimeFilter`])
//! - `{"cmd":"checkpoint","next_layer":"<path>"}` → `{"ok":true,"seq":..,"frozen_layer":..,"clusters":..}`
//!   (see [`crate::checkpoint`])
//!
//! Errors answer `{"ok":false,"error":"..."}`. A line longer than
//! [`ControlLimits::max_line`] is answered with an error and the connection
//! closed; connections past [`ControlLimits::max_connections`] get an error
//! line and are closed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::capture::replay::{Expectations, ExpectedIo, Outputs, ReplayClock, Subscription};
use crate::fault::{FaultRule, RuleFaults};
use crate::metrics::Metrics;
use crate::net::replay::Injected;
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

/// A frame in an `inject` or `inject-batch` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameSpec {
    /// Ethernet frame, hex.
    pub frame: String,
    /// The original's `seq` of the frame.
    #[serde(default)]
    pub seq: Option<u64>,
    /// Replay-clock time to deliver it at (ns; at once if absent).
    #[serde(default)]
    pub at_ns: Option<u64>,
}

/// What the `clock` command does.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClockAction {
    Get,
    Pause,
    Resume,
    /// Set the speed (`factor`).
    Scale,
    /// Advance a paused clock by `ns`.
    Step,
    /// Set the reading to `ns`.
    Set,
}

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Metrics snapshot.
    Metrics,
    /// Arm a fault rule.
    Fault { rule: FaultRule },
    /// The armed rules.
    Faults,
    /// Disarm every rule.
    ClearFaults,
    /// Queue a frame (hex) for the guest.
    Inject {
        frame: String,
        #[serde(default)]
        seq: Option<u64>,
        #[serde(default)]
        at_ns: Option<u64>,
    },
    /// Queue several frames (all or none).
    InjectBatch { frames: Vec<FrameSpec> },
    /// Drop every waiting frame.
    ClearFrames,
    /// Read or steer the replay clock.
    Clock {
        action: ClockAction,
        #[serde(default)]
        factor: Option<f64>,
        #[serde(default)]
        ns: Option<u64>,
    },
    /// Mode, waiting frames, clock, armed rules.
    Status,
    /// Load records of the original for comparison.
    Expect { records: Vec<ExpectedIo> },
    /// The comparison so far.
    Compare,
    /// Forget the loaded records and results.
    ClearExpect,
    /// Turn the connection into the live output stream.
    Subscribe {
        /// Include written data (hex) in block lines.
        #[serde(default)]
        data: bool,
    },
    /// Replace the capture filter (see [`crate::filter::RuntimeFilter`]).
    SetFilter {
        filter: crate::filter::RuntimeFilter,
    },
    /// Drain, sync the capture, read the seq, freeze the disk layer.
    Checkpoint { next_layer: Option<PathBuf> },
}

/// Bounds of the control socket.
#[derive(Debug, Clone, Copy)]
pub struct ControlLimits {
    /// Longest request line, bytes.
    pub max_line: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// Lines a subscriber may fall behind before it loses some.
    pub subscriber_queue: usize,
}

impl Default for ControlLimits {
    /// 16 MiB lines, 16 connections, 65536 queued lines per subscriber.
    fn default() -> Self {
        Self {
            max_line: 16 << 20,
            max_connections: 16,
            subscriber_queue: 65536,
        }
    }
}

/// What the control socket acts on.
#[derive(Clone, Default)]
pub struct ControlTargets {
    /// Metrics to report.
    pub metrics: Arc<Metrics>,
    /// Fault rules to arm (None: faults refused).
    pub faults: Option<Arc<RuleFaults>>,
    /// Replay source to inject into (None: inject refused).
    pub source: Option<Arc<ChannelReplaySource>>,
    /// Checkpoints for the snapshot cut (None: refused).
    pub checkpoint: Option<Arc<dyn crate::checkpoint::Checkpoint>>,
    /// The replay clock (None: clock commands refused).
    pub clock: Option<Arc<ReplayClock>>,
    /// The live output stream (None: subscribe refused).
    pub outputs: Option<Arc<Outputs>>,
    /// Block comparison (None: expect and compare refused).
    pub expect: Option<Arc<Expectations>>,
    /// Bounds of the socket.
    pub limits: ControlLimits,
}

/// The outcome of one request line.
pub enum Handled {
    /// Answer with this line.
    Reply(serde_json::Value),
    /// Answer with this line, then stream the subscription.
    Subscribe(serde_json::Value, Subscription),
}

fn err(msg: impl std::fmt::Display) -> serde_json::Value {
    json!({"ok": false, "error": msg.to_string()})
}

fn frame_of(hex: &str) -> Result<Vec<u8>, serde_json::Value> {
    let f = decode_hex(hex).ok_or_else(|| err("frame is not even-length hex"))?;
    if f.len() < 14 || f.len() > crate::net::backend::MAX_FRAME {
        return Err(err("frame must be 14 to 65550 bytes"));
    }
    Ok(f)
}

impl ControlTargets {
    /// Runs one request line; returns the reply object (a `subscribe` is
    /// answered but cannot stream from here: use a socket).
    pub fn handle_line(&self, line: &str) -> serde_json::Value {
        match self.handle(line) {
            Handled::Reply(v) | Handled::Subscribe(v, _) => v,
        }
    }

    /// Runs one request line.
    pub fn handle(&self, line: &str) -> Handled {
        let cmd: Command = match serde_json::from_str(line) {
            Ok(c) => c,
            Err(e) => return Handled::Reply(err(format!("bad request: {e}"))),
        };
        Handled::Reply(match cmd {
            Command::Metrics => json!({"ok": true, "metrics": self.metrics.snapshot()}),
            Command::Fault { rule } => match &self.faults {
                None => err("faults are only accepted in replay mode"),
                Some(f) => {
                    let seed = rule.seed;
                    match f.add(rule) {
                        Ok(id) => json!({"ok": true, "rule": id, "seed": seed}),
                        Err(e) => err(e),
                    }
                }
            },
            Command::Faults => match &self.faults {
                None => err("faults are only accepted in replay mode"),
                Some(f) => {
                    let rules: Vec<_> = f
                        .armed()
                        .into_iter()
                        .map(|(id, rule, left)| json!({"rule": id, "left": left, "spec": rule}))
                        .collect();
                    json!({"ok": true, "faults": rules})
                }
            },
            Command::ClearFaults => {
                if let Some(f) = &self.faults {
                    f.clear();
                }
                json!({"ok": true})
            }
            Command::SetFilter { filter } => crate::filter::control_set_filter(&filter),
            Command::Checkpoint { next_layer } => {
                crate::checkpoint::handle(self.checkpoint.as_deref(), next_layer.as_deref())
            }
            Command::Inject { frame, seq, at_ns } => {
                self.inject(vec![FrameSpec { frame, seq, at_ns }], false)
            }
            Command::InjectBatch { frames } => self.inject(frames, true),
            Command::ClearFrames => match &self.source {
                None => err("this backend has no replay source"),
                Some(s) => json!({"ok": true, "cleared": s.clear()}),
            },
            Command::Clock { action, factor, ns } => self.clock(action, factor, ns),
            Command::Status => json!({
                "ok": true,
                "mode": if self.faults.is_some() { "replay" } else { "capture" },
                "pending": self.source.as_ref().map(|s| s.pending()),
                "clock": self.clock.as_ref().map(|c| c.reading()),
                "faults": self.faults.as_ref().map(|f| f.armed().len()),
            }),
            Command::Expect { records } => match &self.expect {
                None => err("expect is only accepted by a block backend in replay mode"),
                Some(e) => match e.load(&records) {
                    Ok(n) => json!({"ok": true, "loaded": n}),
                    Err(e) => err(e),
                },
            },
            Command::Compare => match &self.expect {
                None => err("compare is only accepted by a block backend in replay mode"),
                Some(e) => json!({"ok": true, "compare": e.report()}),
            },
            Command::ClearExpect => match &self.expect {
                None => err("clear-expect is only accepted by a block backend in replay mode"),
                Some(e) => {
                    e.clear();
                    json!({"ok": true})
                }
            },
            Command::Subscribe { data } => match &self.outputs {
                None => err("subscribe is only accepted in replay mode"),
                Some(o) => {
                    let sub = o.subscribe(self.limits.subscriber_queue, data);
                    return Handled::Subscribe(json!({"ok": true, "subscribed": true}), sub);
                }
            },
        })
    }

    fn inject(&self, frames: Vec<FrameSpec>, batch: bool) -> serde_json::Value {
        let Some(s) = &self.source else {
            return err("this backend has no replay source");
        };
        let mut out = Vec::with_capacity(frames.len());
        for (i, f) in frames.into_iter().enumerate() {
            match frame_of(&f.frame) {
                Ok(frame) => out.push(Injected {
                    seq: f.seq,
                    at_ns: f.at_ns,
                    frame,
                }),
                Err(e) if batch => {
                    return err(format!("frame {i}: {}", e["error"].as_str().unwrap_or("")))
                }
                Err(e) => return e,
            }
        }
        let n = out.len();
        match s.push_many(out) {
            Ok(()) if batch => json!({"ok": true, "queued": n}),
            Ok(()) => json!({"ok": true}),
            Err(e) => err(e),
        }
    }

    fn clock(
        &self,
        action: ClockAction,
        factor: Option<f64>,
        ns: Option<u64>,
    ) -> serde_json::Value {
        let Some(c) = &self.clock else {
            return err("the clock is only available in replay mode");
        };
        let r = match (action, factor, ns) {
            (ClockAction::Get, None, None) => Ok(c.reading()),
            (ClockAction::Pause, None, None) => Ok(c.pause()),
            (ClockAction::Resume, None, None) => Ok(c.resume()),
            (ClockAction::Scale, Some(f), None) => c.set_factor(f),
            (ClockAction::Step, None, Some(n)) => c.step(n),
            (ClockAction::Set, None, Some(n)) => Ok(c.set(n)),
            (ClockAction::Scale, _, _) => return err("scale takes factor only"),
            (ClockAction::Step | ClockAction::Set, _, _) => {
                return err("step and set take ns only")
            }
            _ => return err("get, pause and resume take no arguments"),
        };
        match r {
            Ok(r) => json!({"ok": true, "clock": r}),
            Err(e) => err(e),
        }
    }
}

/// Decodes lowercase or uppercase hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// Encodes bytes as lowercase hex.
pub fn encode_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// A running control socket.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often blocked connection threads look at the stop flag.
const POLL: Duration = Duration::from_millis(200);

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
        let open = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let max = targets.limits.max_connections;
                            if open.fetch_add(1, Ordering::AcqRel) >= max {
                                open.fetch_sub(1, Ordering::AcqRel);
                                tracing::warn!(limit = max, "control connection refused");
                                let _ = conn.set_nonblocking(false);
                                let _ = writeln!(
                                    conn,
                                    "{}",
                                    err(format!("too many control connections (limit {max})"))
                                );
                                continue;
                            }
                            let t = targets.clone();
                            let (s2, o2) = (s.clone(), open.clone());
                            let spawned = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || {
                                    serve_conn(conn, &t, &s2);
                                    o2.fetch_sub(1, Ordering::AcqRel);
                                });
                            if spawned.is_err() {
                                open.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
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

/// What [`read_line_bounded`] found.
enum LineRead {
    Line,
    Eof,
    TooLong,
    /// The read timed out (the partial line stays in the buffer).
    Idle,
}

/// Reads up to a newline into `buf` (which may hold a partial line from an
/// idle return), refusing lines longer than `max`.
fn read_line_bounded(
    r: &mut BufReader<UnixStream>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(LineRead::Idle)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max + 1 {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            return Ok(LineRead::Line);
        }
    }
}

fn serve_conn(conn: UnixStream, targets: &ControlTargets, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let max = targets.limits.max_line;
    let mut reader = BufReader::with_capacity(64 << 10, conn);
    let mut buf = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match read_line_bounded(&mut reader, &mut buf, max) {
            Ok(LineRead::Idle) => continue,
            Ok(LineRead::Eof) | Err(_) => return,
            Ok(LineRead::TooLong) => {
                let _ = writeln!(
                    out,
                    "{}",
                    err(format!("request line longer than {max} bytes"))
                );
                return;
            }
            Ok(LineRead::Line) => {}
        }
        let line = std::mem::take(&mut buf);
        let Ok(line) = std::str::from_utf8(&line) else {
            if writeln!(out, "{}", err("request is not UTF-8")).is_err() {
                return;
            }
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match targets.handle(line) {
            Handled::Reply(v) => {
                if writeln!(out, "{v}").is_err() {
                    return;
                }
            }
            Handled::Subscribe(v, sub) => {
                if writeln!(out, "{v}").is_ok() {
                    stream(reader.into_inner(), out, sub, stop);
                }
                return;
            }
        }
    }
}

/// Writes the subscription's lines until the peer closes or the server
/// stops.
fn stream(conn: UnixStream, out: UnixStream, sub: Subscription, stop: &AtomicBool) {
    let mut w = std::io::BufWriter::with_capacity(256 << 10, out);
    let mut reported = 0u64;
    let mut line = Vec::with_capacity(4096);
    while !stop.load(Ordering::Acquire) {
        let first = match sub.rx.recv_timeout(POLL) {
            Ok(o) => Some(o),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(first) = first else {
            if w.flush().is_err() || peer_closed(&conn) {
                return;
            }
            continue;
        };
        for o in std::iter::once(first).chain(sub.rx.try_iter().take(4096)) {
            line.clear();
            if serde_json::to_writer(&mut line, &*o).is_err() {
                continue;
            }
            line.push(b'\n');
            if w.write_all(&line).is_err() {
                return;
            }
        }
        let lost = sub.lost.load(Ordering::Relaxed);
        if lost > reported {
            let l = crate::capture::replay::Output::Lagged {
                lost: lost - reported,
            };
            reported = lost;
            if serde_json::to_writer(&mut w, &l).is_err() || w.write_all(b"\n").is_err() {
                return;
            }
        }
        if w.flush().is_err() {
            return;
        }
    }
}

/// Whether the peer closed its end (checked without consuming input).
fn peer_closed(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: recv into a local one-byte buffer on a socket we own; MSG_PEEK
    // leaves the data in place.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// How long [`ControlClient`] waits for an answer by default.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to a control socket; answers are awaited for at most
    /// [`CLIENT_TIMEOUT`] (see [`ControlClient::set_timeout`]).
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sets how long to wait for an answer or a stream line.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), ControlError> {
        self.writer.set_read_timeout(Some(t))?;
        Ok(())
    }

    fn read_reply(&mut self) -> Result<serde_json::Value, ControlError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ControlError::Reply("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| ControlError::Reply(e.to_string()))
    }

    /// Sends a request object; returns the reply (errors if `ok` is false).
    pub fn request(&mut self, req: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        writeln!(self.writer, "{req}")?;
        let v = self.read_reply()?;
        if v["ok"] != json!(true) {
            return Err(ControlError::Reply(
                v["error"]
                    .as_str()
                    .map_or_else(|| v.to_string(), str::to_owned),
            ));
        }
        Ok(v)
    }

    /// Queues a frame for the guest, delivered at once.
    pub fn inject(&mut self, frame: &[u8]) -> Result<(), ControlError> {
        self.request(&json!({"cmd": "inject", "frame": encode_hex(frame)}))
            .map(|_| ())
    }

    /// Queues a frame carrying the original's `seq`, due at `at_ns` on the
    /// replay clock (at once if None).
    pub fn inject_at(
        &mut self,
        seq: Option<u64>,
        at_ns: Option<u64>,
        frame: &[u8],
    ) -> Result<(), ControlError> {
        self.request(
            &json!({"cmd": "inject", "frame": encode_hex(frame), "seq": seq, "at_ns": at_ns}),
        )
        .map(|_| ())
    }

    /// Queues frames (all or none).
    pub fn inject_batch(&mut self, frames: &[Injected]) -> Result<(), ControlError> {
        let frames: Vec<_> = frames
            .iter()
            .map(|f| json!({"frame": encode_hex(&f.frame), "seq": f.seq, "at_ns": f.at_ns}))
            .collect();
        self.request(&json!({"cmd": "inject-batch", "frames": frames}))
            .map(|_| ())
    }

    /// Runs a clock action (`get`, `pause`, `resume`, `scale` with
    /// `factor`, `step` / `set` with `ns`); returns the clock's reading.
    pub fn clock(
        &mut self,
        action: &str,
        factor: Option<f64>,
        ns: Option<u64>,
    ) -> Result<serde_json::Value, ControlError> {
        let mut req = json!({"cmd": "clock", "action": action});
        if let Some(f) = factor {
            req["factor"] = json!(f);
        }
        if let Some(n) = ns {
            req["ns"] = json!(n);
        }
        Ok(self.request(&req)?["clock"].take())
    }

    /// Arms a fault rule; returns its id.
    pub fn fault(&mut self, rule: &FaultRule) -> Result<u64, ControlError> {
        let v = self.request(&json!({"cmd": "fault", "rule": rule}))?;
        v["rule"]
            .as_u64()
            .ok_or_else(|| ControlError::Reply(v.to_string()))
    }

    /// Loads original block records for comparison; returns how many.
    pub fn expect(&mut self, records: &[ExpectedIo]) -> Result<u64, ControlError> {
        let v = self.request(&json!({"cmd": "expect", "records": records}))?;
        v["loaded"]
            .as_u64()
            .ok_or_else(|| ControlError::Reply(v.to_string()))
    }

    /// The block comparison so far.
    pub fn compare(&mut self) -> Result<serde_json::Value, ControlError> {
        Ok(self.request(&json!({"cmd": "compare"}))?["compare"].take())
    }

    /// Turns this connection into the output stream; read it with
    /// [`ControlClient::next_output`].
    pub fn subscribe(&mut self, data: bool) -> Result<(), ControlError> {
        self.request(&json!({"cmd": "subscribe", "data": data}))
            .map(|_| ())
    }

    /// The next stream line (after [`ControlClient::subscribe`]); an error
    /// when none arrives within the timeout or the stream ended.
    pub fn next_output(&mut self) -> Result<serde_json::Value, ControlError> {
        self.read_reply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultCtx, FaultHook, FaultKind, FrameFault};
    use crate::net::ReplaySource;
    use std::io::Read;

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    fn targets() -> (ControlTargets, Arc<ChannelReplaySource>, Arc<RuleFaults>) {
        let source = Arc::new(ChannelReplaySource::new().unwrap());
        let faults = Arc::new(RuleFaults::new());
        let t = ControlTargets {
            faults: Some(faults.clone()),
            clock: Some(source.clock().clone()),
            source: Some(source.clone()),
            outputs: Some(Arc::new(Outputs::new())),
            ..Default::default()
        };
        (t, source, faults)
    }

    #[test]
    fn commands_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (t, source, faults) = targets();
        let _srv = ControlServer::spawn(&path, t).unwrap();
        let mut c = ControlClient::connect(&path).unwrap();
        c.inject(&[0xab; 60]).unwrap();
        assert_eq!(source.pending(), 1);
        let m = c.request(&json!({"cmd": "metrics"})).unwrap();
        assert_eq!(m["metrics"]["requests"], 0);
        let id = c
            .fault(&FaultRule::frame(FaultKind::Drop, "tx", 1))
            .unwrap();
        assert_eq!(id, 1);
        let f = faults.frame(&FaultCtx::default(), vmr_proto::pb::Direction::Tx, b"");
        assert_eq!((f.fault, f.rule), (FrameFault::Drop, 1));
        assert!(c
            .request(&json!({"cmd": "inject", "frame": "abc"}))
            .is_err());
        assert!(c.request(&json!({"cmd": "bogus"})).is_err());
        let e = c
            .request(
                &json!({"cmd": "fault", "rule": {"kind": "drop", "direction": "rx", "count": 0}}),
            )
            .unwrap_err();
        assert!(e.to_string().contains("count must be at least 1"), "{e}");
        assert!(c
            .request(&json!({"cmd": "fault", "rule": {"kind": "drop", "direction": "up"}}))
            .is_err());
        // Scheduled frames and the clock.
        c.inject_batch(&[Injected {
            seq: Some(7),
            at_ns: Some(5_000),
            frame: vec![1; 60],
        }])
        .unwrap();
        assert_eq!(c.clock("get", None, None).unwrap()["paused"], true);
        c.clock("step", None, Some(5_000)).unwrap();
        assert!(source.pop().is_some_and(|f| f.frame[0] == 0xab));
        assert!(wait_for(|| source.pop().is_some_and(|f| f.seq == Some(7))));
        assert!(c.clock("scale", Some(0.0), None).is_err());
        assert!(c.clock("step", Some(1.0), None).is_err());
        assert_eq!(c.clock("scale", Some(10.0), None).unwrap()["factor"], 10.0);
        let s = c.request(&json!({"cmd": "status"})).unwrap();
        assert_eq!(s["mode"], "replay");
        // Block commands are refused by a net backend.
        assert!(c.request(&json!({"cmd": "compare"})).is_err());
    }

    #[test]
    fn lines_connections_and_queued_frames_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (mut t, _source, _) = targets();
        t.limits = ControlLimits {
            max_line: 1024,
            max_connections: 2,
            subscriber_queue: 16,
        };
        let mut cfg = crate::net::replay::SourceConfig::new("net0");
        cfg.limits = crate::net::replay::QueueLimits {
            frames: 4,
            bytes: 1 << 20,
        };
        t.source = Some(Arc::new(ChannelReplaySource::with_config(cfg).unwrap()));
        let _srv = ControlServer::spawn(&path, t).unwrap();
        // A long line: an error, then the connection is closed.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(&vec![b'x'; 4096]).unwrap();
        let mut got = String::new();
        raw.read_to_string(&mut got).unwrap();
        assert!(got.contains("request line longer than 1024 bytes"), "{got}");
        // Two connections are served; a third is refused.
        let mut a = ControlClient::connect(&path).unwrap();
        let _b = ControlClient::connect(&path).unwrap();
        a.request(&json!({"cmd": "metrics"})).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(
            got.contains("too many control connections (limit 2)"),
            "{got}"
        );
        // Queued frames.
        let f = |n| Injected {
            seq: Some(n),
            at_ns: Some(1 << 50),
            frame: vec![0; 60],
        };
        a.inject_batch(&[f(1), f(2), f(3)]).unwrap();
        let e = a.inject_batch(&[f(4), f(5)]).unwrap_err();
        assert!(e.to_string().contains("replay queue full"), "{e}");
        a.inject_at(Some(4), Some(1 << 50), &[0; 60]).unwrap();
        assert!(a.inject_at(Some(5), None, &[0; 60]).is_err());
        assert_eq!(
            a.request(&json!({"cmd": "clear-frames"})).unwrap()["cleared"],
            4
        );
    }
}
