//! One QEMU process: its lifecycle, events, console, snapshots and exit.
//!
//! Three threads serve an instance: the QMP reader (see [`super::qmp`]),
//! whose events update the run state and become [`DriverEvent`]s; a console
//! reader on the serial socket, which fans the output out to console
//! subscribers (QEMU itself appends it to the console file); and a monitor
//! that notices when the process exits and records how.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};
use vmr_proto::domain::LifecycleKind;

use super::accel::AccelChoice;
use super::cmdline::Layout;
use super::migration;
use super::qmp::{Qmp, QmpEvent};
use crate::artifacts::{self, Artifact, ArtifactKind, HostInfo, ARTIFACTS_VERSION};
use crate::events::now_ns;
use crate::{
    Bus, DebugListen, DriverError, DriverEvent, EndReason, ExitInfo, Instance, InstanceInfo,
    MemoryKind, RunState, SnapshotArtifacts, SnapshotOptions, Subscription,
};

/// The driver's name.
pub const NAME: &str = "qemu";
/// Version of the QEMU driver's snapshot files.
pub const DRIVER_FORMAT: u32 = 1;
/// The snapshot artifact holding QEMU's migration stream.
pub const VMSTATE: &str = "vmstate";
/// Bound on one ordinary QMP command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on writing or loading a migration stream.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of QEMU's stderr an error or event quotes.
pub const STDERR_TAIL: usize = 4000;
const CONSOLE_TAIL: usize = 8192;
const POLL: Duration = Duration::from_millis(20);

/// What the event handler and the monitor know about the instance.
#[derive(Debug)]
struct Track {
    run: RunState,
    /// Guest code has run (the first RESUME was seen).
    started: bool,
    /// The snapshot this instance was restored from.
    restored_from: Option<String>,
    /// The reason of QEMU's SHUTDOWN event.
    shutdown: Option<String>,
    /// Why the driver is ending the process, when it is.
    ending: Option<String>,
    /// Details for the next STOP / RESUME events (why the driver paused).
    pause_why: Option<String>,
    resume_why: Option<String>,
}

pub(crate) struct Inner {
    id: String,
    program: String,
    layout: Layout,
    pid: u32,
    accel: AccelChoice,
    debugger: Option<DebugListen>,
    events: Bus<DriverEvent>,
    console: Bus<Vec<u8>>,
    console_tail: Mutex<VecDeque<u8>>,
    track: Mutex<Track>,
    qmp: OnceLock<Qmp>,
    child: Mutex<Option<Child>>,
    exit: Mutex<Option<ExitInfo>>,
    exited: Condvar,
    closing: AtomicBool,
    console_stream: Mutex<Option<UnixStream>>,
    /// Serialises pause, resume, snapshot and stop.
    op: Mutex<()>,
}

/// A QEMU instance. Dropping it stops QEMU (quit, then SIGKILL) and reaps it.
pub struct QemuInstance {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("id", &self.inner.id)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

/// The last `max` bytes of a file as text.
pub fn file_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).trim_end().to_string()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn status_parts(s: &ExitStatus) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    (s.code(), s.signal())
}

/// Kills the process group of `child` and reaps it, waiting at most 10 s.
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals the process group the
    // driver created for this QEMU (it was spawned with process_group(0) and
    // has not been reaped yet, so the group id is still ours); no memory is
    // involved.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

impl Inner {
    fn publish(&self, kind: LifecycleKind, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(instance = %self.id, kind = ?kind, %detail, "lifecycle");
        self.events.publish(DriverEvent::now(kind, detail));
    }

    fn publish_at(&self, kind: LifecycleKind, detail: String, qemu_us: Option<u64>) {
        let mut ev = DriverEvent::now(kind, detail.clone());
        if let Some(us) = qemu_us {
            // QEMU stamps events with wall time; move the monotonic stamp by
            // the same distance.
            let wall = us * 1000;
            let delta = ev.wall_time_ns as i128 - wall as i128;
            if delta >= 0 {
                ev.mono_time_ns = (ev.mono_time_ns as i128 - delta).max(0) as u64;
                ev.wall_time_ns = wall;
            }
        }
        tracing::info!(instance = %self.id, kind = ?kind, %detail, "lifecycle");
        self.events.publish(ev);
    }

    fn console_line(&self, needle: &str) -> Option<String> {
        let tail = self.console_tail.lock();
        let (a, b) = tail.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        text.lines()
            .rev()
            .find(|l| l.contains(needle))
            .map(|l| l.trim().to_string())
    }

    /// Handles one QMP event (called on the QMP reader thread).
    fn on_event(&self, ev: QmpEvent) {
        let mut t = self.track.lock();
        match ev.name.as_str() {
            "RESUME" => {
                t.run = RunState::Running;
                let why = t.resume_why.take();
                let (kind, detail) = if !t.started {
                    t.started = true;
                    match &t.restored_from {
                        Some(dir) => (
                            LifecycleKind::Resume,
                            format!("guest code runs, restored from snapshot {dir}"),
                        ),
                        None => (
                            LifecycleKind::Boot,
                            format!("guest code runs (accel {})", self.accel.accel),
                        ),
                    }
                } else {
                    (
                        LifecycleKind::Resume,
                        why.unwrap_or_else(|| "resumed".to_string()),
                    )
                };
                drop(t);
                self.publish_at(kind, detail, ev.timestamp_us);
            }
            "STOP" => {
                let why = t.pause_why.take();
                if t.run == RunState::Crashed {
                    // GUEST_PANICKED already said the guest is held.
                    return;
                }
                t.run = RunState::Paused;
                drop(t);
                self.publish_at(
                    LifecycleKind::Pause,
                    why.unwrap_or_else(|| "paused".to_string()),
                    ev.timestamp_us,
                );
            }
            "GUEST_PANICKED" => {
                t.run = RunState::Crashed;
                drop(t);
                let action = ev.data.get("action").and_then(Value::as_str).unwrap_or("?");
                let mut detail = format!(
                    "guest kernel panicked (GUEST_PANICKED, action {action}); the guest is held"
                );
                if let Some(info) = ev.data.get("info") {
                    detail.push_str(&format!("; info {info}"));
                }
                if let Some(line) = self
                    .console_line("Kernel panic")
                    .or_else(|| self.console_line("VMR-OVERFLOW"))
                {
                    detail.push_str(&format!("; console: {line}"));
                }
                self.publish_at(LifecycleKind::Crash, detail, ev.timestamp_us);
            }
            "SHUTDOWN" => {
                let reason = ev
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string();
                let guest = ev
                    .data
                    .get("guest")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                t.shutdown = Some(reason.clone());
                drop(t);
                let detail = if guest {
                    format!("the guest shut down ({reason})")
                } else {
                    format!("QEMU shut down ({reason})")
                };
                self.publish_at(LifecycleKind::Shutdown, detail, ev.timestamp_us);
            }
            _ => {}
        }
    }

    /// Records the exit of the process (called once, by whoever reaped it).
    fn finish(&self, status: Option<ExitStatus>) {
        let (code, signal) = status.as_ref().map(status_parts).unwrap_or((None, None));
        let shown = status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "status unknown".to_string());
        let (shutdown, ending) = {
            let mut t = self.track.lock();
            t.run = RunState::Exited;
            (t.shutdown.clone(), t.ending.clone())
        };
        let clean = code == Some(0);
        let detail = match (&shutdown, &ending) {
            (Some(r), Some(why)) if clean => format!("{why}; QEMU exited after shutdown ({r})"),
            (Some(r), None) if clean => format!("QEMU exited after shutdown ({r})"),
            (_, Some(why)) => format!("{why} ({shown})"),
            _ => format!(
                "QEMU exited unexpectedly ({shown}); stderr: {}",
                file_tail(&self.layout.stderr, STDERR_TAIL)
            ),
        };
        if (shutdown.is_none() || !clean) && ending.is_none() {
            self.publish(LifecycleKind::InternalError, detail.clone());
        } else if shutdown.is_none() {
            self.publish(LifecycleKind::Shutdown, detail.clone());
        }
        let reason = if ending.is_some() {
            EndReason::Stopped
        } else if shutdown.is_some() && clean {
            EndReason::GuestShutdown
        } else {
            EndReason::Failed
        };
        *self.exit.lock() = Some(ExitInfo {
            reason,
            code,
            signal,
            detail,
        });
        self.exited.notify_all();
    }

    /// Reaps the process if it has exited. Returns whether it has.
    fn poll_exit(&self) -> bool {
        let mut guard = self.child.lock();
        let Some(child) = guard.as_mut() else {
            return true;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                *guard = None;
                drop(guard);
                self.finish(Some(status));
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(instance = %self.id, error = %e, "cannot poll QEMU");
                false
            }
        }
    }

    /// Kills and reaps the process, recording `why`.
    fn kill(&self, why: &str) {
        let mut guard = self.child.lock();
        let Some(mut child) = guard.take() else {
            return;
        };
        self.track.lock().ending = Some(why.to_string());
        let status = kill_and_reap(&mut child);
        drop(guard);
        self.finish(status);
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.lock().clone()
    }

    /// Waits at most `timeout` for the process to exit.
    fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.exit.lock();
        while exit.is_none() {
            if self.exited.wait_until(&mut exit, deadline).timed_out() {
                break;
            }
        }
        exit.clone()
    }

    /// An [`DriverError::Exited`] for a process that has exited.
    fn exited_error(&self, while_doing: &str, exit: &ExitInfo) -> DriverError {
        let status = match (exit.code, exit.signal) {
            (Some(c), _) => format!("exit status {c}"),
            (_, Some(s)) => format!("killed by signal {s}"),
            _ => "status unknown".into(),
        };
        DriverError::Exited {
            program: self.program.clone(),
            status,
            while_doing: while_doing.to_string(),
            stderr: file_tail(&self.layout.stderr, STDERR_TAIL),
        }
    }

    /// `err`, or the process's exit if it has died (a broken QMP connection
    /// is usually QEMU exiting).
    fn explain(&self, err: DriverError, while_doing: &str) -> DriverError {
        if matches!(err, DriverError::Protocol(_) | DriverError::Timeout { .. }) {
            if let Some(exit) = self.wait_exit(Duration::from_secs(2)) {
                return self.exited_error(while_doing, &exit);
            }
        }
        err
    }

    fn qmp(&self) -> Result<&Qmp, DriverError> {
        self.qmp
            .get()
            .ok_or_else(|| DriverError::Protocol("QMP is not connected yet".into()))
    }

    /// Runs a QMP command, explaining a failure by QEMU's exit.
    pub(crate) fn execute(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        if let Some(exit) = self.exit_info() {
            return Err(DriverError::Gone(exit.detail));
        }
        self.qmp()?
            .execute(command, args, timeout)
            .map_err(|e| self.explain(e, &format!("running {command}")))
    }

    fn query_status(&self) -> Result<String, DriverError> {
        let v = self.execute("query-status", json!({}), COMMAND_TIMEOUT)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| DriverError::Protocol(format!("query-status returned {v}")))
    }
}

fn monitor_loop(inner: Arc<Inner>) {
    while !inner.closing.load(Ordering::Relaxed) {
        if inner.poll_exit() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console_loop(inner: Arc<Inner>, mut stream: UnixStream) {
    let mut buf = vec![0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = buf[..n].to_vec();
                {
                    let mut tail = inner.console_tail.lock();
                    tail.extend(&chunk);
                    let excess = tail.len().saturating_sub(CONSOLE_TAIL);
                    tail.drain(..excess);
                }
                inner.console.publish(chunk);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// What [`QemuInstance::spawn`] needs.
pub(crate) struct Launch {
    pub id: String,
    pub program: String,
    pub layout: Layout,
    pub accel: AccelChoice,
    pub debugger: Option<DebugListen>,
    pub restored_from: Option<String>,
    pub child: Child,
}

/// How long QEMU may take to open its QMP socket.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl QemuInstance {
    /// Takes ownership of a started QEMU: watches it, connects QMP and the
    /// console, and sets it up. The vCPUs are still stopped when this
    /// returns. Any error stops the process.
    pub(crate) fn attach(l: Launch) -> Result<QemuInstance, DriverError> {
        let pid = l.child.id();
        let inner = Arc::new(Inner {
            id: l.id,
            program: l.program,
            layout: l.layout,
            pid,
            accel: l.accel,
            debugger: l.debugger,
            events: Bus::with_history(),
            console: Bus::live(),
            console_tail: Mutex::new(VecDeque::new()),
            track: Mutex::new(Track {
                run: RunState::Created,
                started: false,
                restored_from: l.restored_from,
                shutdown: None,
                ending: None,
                pause_why: None,
                resume_why: None,
            }),
            qmp: OnceLock::new(),
            child: Mutex::new(Some(l.child)),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            closing: AtomicBool::new(false),
            console_stream: Mutex::new(None),
            op: Mutex::new(()),
        });
        let inst = QemuInstance {
            inner: inner.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let i2 = inner.clone();
        inst.spawn_thread("qemu-monitor", move || monitor_loop(i2))?;

        // QMP.
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        let stream = loop {
            if let Some(exit) = inner.exit_info() {
                return Err(inner.exited_error("starting (before QMP was up)", &exit));
            }
            match UnixStream::connect(&inner.layout.qmp) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Err(e) => {
                    return Err(DriverError::Timeout {
                        what: format!(
                            "QEMU's QMP socket {} ({e}); stderr: {}",
                            inner.layout.qmp.display(),
                            file_tail(&inner.layout.stderr, STDERR_TAIL)
                        ),
                        after: QMP_CONNECT_TIMEOUT,
                    })
                }
            }
        };
        let weak = Arc::downgrade(&inner);
        let qmp = Qmp::handshake(stream, COMMAND_TIMEOUT, move |ev| {
            if let Some(inner) = weak.upgrade() {
                inner.on_event(ev);
            }
        })
        .map_err(|e| inner.explain(e, "negotiating QMP"))?;
        if let Some(v) = qmp.version() {
            tracing::debug!(instance = %inner.id, version = %v, "QMP connected");
        }
        let _ = inner.qmp.set(qmp);

        // A guest panic pauses the guest (and arrives as GUEST_PANICKED).
        match inner.execute("set-action", json!({"panic": "pause"}), COMMAND_TIMEOUT) {
            Ok(_) => {}
            Err(DriverError::Command { reason, .. }) if reason.contains("CommandNotFound") => {
                tracing::info!(instance = %inner.id, "QEMU has no set-action; its default panic action pauses");
            }
            Err(e) => return Err(e),
        }
        // Snapshots of a paused guest should go at disk speed, not at the
        // live-migration default of 32 MiB/s.
        inner.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 64u64 << 30}),
            COMMAND_TIMEOUT,
        )?;
        // Console: QEMU created the serial socket before it opened QMP.
        let console =
            UnixStream::connect(&inner.layout.serial).map_err(DriverError::io(format!(
                "the serial console socket {}",
                inner.layout.serial.display()
            )))?;
        let reader = console
            .try_clone()
            .map_err(DriverError::io("the serial console socket"))?;
        *inner.console_stream.lock() = Some(console);
        let i2 = inner.clone();
        inst.spawn_thread("qemu-console", move || console_loop(i2, reader))?;

        tracing::info!(
            instance = %inner.id, pid, accel = inst.inner.accel.accel,
            reason = %inst.inner.accel.reason, "QEMU started"
        );
        Ok(inst)
    }

    fn spawn_thread(
        &self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), DriverError> {
        let h = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(f)
            .map_err(DriverError::io(format!("starting the {name} thread")))?;
        self.threads.lock().push(h);
        Ok(())
    }

    /// Runs the stopped vCPUs for the first time and waits for the
    /// lifecycle event that says so.
    pub(crate) fn start_guest(&self) -> Result<(), DriverError> {
        let events = self.inner.events.subscribe();
        self.inner.execute("cont", json!({}), COMMAND_TIMEOUT)?;
        events
            .wait_for(Duration::from_secs(10), |e| {
                matches!(e.kind(), LifecycleKind::Boot | LifecycleKind::Resume) || e.is_terminal()
            })
            .map_err(|_| DriverError::Timeout {
                what: "the RESUME event after cont".into(),
                after: Duration::from_secs(10),
            })
            .map(drop)
    }

    /// Loads the migration stream at `source` into this (incoming) QEMU and
    /// checks that the guest is paused with the loaded state.
    pub(crate) fn load_snapshot(
        &self,
        source: &Path,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let inner = &self.inner;
        let uri = migration::incoming(inner.qmp()?.version(), source);
        inner.execute("migrate-incoming", json!({ "uri": uri }), COMMAND_TIMEOUT)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = inner.wait_exit(Duration::ZERO) {
                return Err(inner
                    .exited_error(&format!("loading the snapshot {}", source.display()), &exit));
            }
            let status = match inner.query_status() {
                Ok(s) => s,
                Err(e) => {
                    return Err(match inner.wait_exit(Duration::from_secs(2)) {
                        Some(exit) => inner.exited_error(
                            &format!("loading the snapshot {}", source.display()),
                            &exit,
                        ),
                        None => e,
                    })
                }
            };
            match status.as_str() {
                "inmigrate" => {}
                "paused" | "prelaunch" | "postmigrate" => break,
                other => {
                    return Err(DriverError::Command {
                        command: "migrate-incoming".into(),
                        reason: format!("the restored guest is in state {other}, not paused"),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: format!("loading the snapshot {}", source.display()),
                    after: timeout,
                });
            }
            std::thread::sleep(POLL);
        }
        let m = inner.execute("query-migrate", json!({}), COMMAND_TIMEOUT)?;
        match m.get("status").and_then(Value::as_str) {
            None | Some("completed") => Ok(()),
            Some(other) => Err(DriverError::Command {
                command: "migrate-incoming".into(),
                reason: format!(
                    "migration status {other}: {}",
                    m.get("error-desc").and_then(Value::as_str).unwrap_or("")
                ),
            }),
        }
    }

    /// Writes the migration stream into `target`, waiting at most `timeout`.
    fn migrate_to(&self, target: &Path, timeout: Duration) -> Result<bool, DriverError> {
        let inner = &self.inner;
        let out = migration::outgoing(inner.qmp()?.version(), target);
        inner.execute("migrate", json!({ "uri": out.uri }), COMMAND_TIMEOUT)?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = inner.execute("query-migrate", json!({}), COMMAND_TIMEOUT)?;
            match m.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(out.renamed_after),
                Some("failed") | Some("cancelled") => {
                    return Err(DriverError::Command {
                        command: "migrate".into(),
                        reason: m
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed without a description")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = inner.execute("migrate_cancel", json!({}), COMMAND_TIMEOUT);
                return Err(DriverError::Timeout {
                    what: format!("the migration stream to {}", target.display()),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id of QEMU.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The file QEMU's stdout and stderr go to.
    pub fn stderr_file(&self) -> &Path {
        &self.inner.layout.stderr
    }

    /// The accelerator in use and why it was chosen.
    pub fn accel(&self) -> &AccelChoice {
        &self.inner.accel
    }

    /// Runs a QMP command on this instance's QEMU (for diagnostics and
    /// QEMU-specific tooling).
    pub fn qmp_execute(&self, command: &str, args: Value) -> Result<Value, DriverError> {
        self.inner.execute(command, args, COMMAND_TIMEOUT)
    }

    fn check_alive(&self) -> Result<(), DriverError> {
        match self.inner.exit_info() {
            Some(e) => Err(DriverError::Gone(e.detail)),
            None => Ok(()),
        }
    }
}

fn wait_for_file(path: &Path, timeout: Duration) -> Result<(), DriverError> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                what: format!("{} to be written", path.display()),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn dir_is_empty(dir: &Path) -> Result<bool, DriverError> {
    let mut it = std::fs::read_dir(dir).map_err(DriverError::io(dir.display().to_string()))?;
    Ok(it.next().is_none())
}

impl Instance for QemuInstance {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn pause(&self) -> Result<(), DriverError> {
        let _op = self.inner.op.lock();
        self.check_alive()?;
        if self.inner.track.lock().run == RunState::Crashed {
            return Err(DriverError::State {
                operation: "pause".into(),
                state: RunState::Crashed.to_string(),
                needs: "running".into(),
            });
        }
        self.inner.track.lock().pause_why = Some("paused by the driver".into());
        let r = self.inner.execute("stop", json!({}), COMMAND_TIMEOUT);
        // QEMU sends the event before its reply; a guest already in that
        // state sends none, so the detail must not stay for a later event.
        self.inner.track.lock().pause_why = None;
        r.map(drop)
    }

    fn resume(&self) -> Result<(), DriverError> {
        let _op = self.inner.op.lock();
        self.check_alive()?;
        let run = self.inner.track.lock().run;
        if run == RunState::Crashed {
            return Err(DriverError::State {
                operation: "resume".into(),
                state: run.to_string(),
                needs: "paused (a crashed guest is held; stop it or snapshot it)".into(),
            });
        }
        if run == RunState::Created {
            return self.start_guest();
        }
        self.inner.track.lock().resume_why = Some("resumed by the driver".into());
        let r = self.inner.execute("cont", json!({}), COMMAND_TIMEOUT);
        // QEMU sends the event before its reply; a guest already in that
        // state sends none, so the detail must not stay for a later event.
        self.inner.track.lock().resume_why = None;
        r.map(drop)
    }

    fn stop(&self, grace: Duration) -> Result<ExitInfo, DriverError> {
        let _op = self.inner.op.lock();
        let inner = &self.inner;
        if let Some(e) = inner.exit_info() {
            return Ok(e);
        }
        let run = inner.track.lock().run;
        if run == RunState::Running {
            inner.track.lock().ending = Some(format!(
                "stopped by the driver (powerdown, grace {grace:?})"
            ));
            match inner.execute("system_powerdown", json!({}), COMMAND_TIMEOUT) {
                Ok(_) => {
                    if let Some(e) = inner.wait_exit(grace) {
                        return Ok(e);
                    }
                }
                Err(e) => tracing::debug!(instance = %inner.id, error = %e, "system_powerdown"),
            }
        }
        inner.track.lock().ending = Some(format!(
            "stopped by the driver (quit after the guest did not power off within {grace:?})"
        ));
        if inner
            .execute("quit", json!({}), Duration::from_secs(5))
            .is_ok()
        {
            if let Some(e) = inner.wait_exit(Duration::from_secs(5)) {
                return Ok(e);
            }
        }
        inner.kill("killed by the driver (SIGKILL) after quit did not end QEMU");
        inner
            .exit_info()
            .ok_or_else(|| DriverError::Gone("QEMU could not be reaped".into()))
    }

    fn wait(&self, timeout: Duration) -> Result<ExitInfo, DriverError> {
        self.inner
            .wait_exit(timeout)
            .ok_or_else(|| DriverError::Timeout {
                what: format!("instance {} to exit", self.inner.id),
                after: timeout,
            })
    }

    fn query(&self) -> Result<InstanceInfo, DriverError> {
        let inner = &self.inner;
        let exit = inner.exit_info();
        let state = if exit.is_some() {
            RunState::Exited
        } else {
            inner.track.lock().run
        };
        Ok(InstanceInfo {
            id: inner.id.clone(),
            driver: NAME,
            state,
            accel: Some((inner.accel.accel.to_string(), inner.accel.reason.clone())),
            pid: Some(inner.pid),
            console_file: inner.layout.console.clone(),
            debugger: inner.debugger.clone(),
            exit,
        })
    }

    fn subscribe(&self) -> Subscription<DriverEvent> {
        self.inner.events.subscribe()
    }

    fn console(&self) -> Subscription<Vec<u8>> {
        self.inner.console.subscribe()
    }

    fn snapshot(
        &self,
        dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<SnapshotArtifacts, DriverError> {
        if opts.memory == MemoryKind::Incremental {
            return Err(DriverError::Unsupported {
                driver: NAME.into(),
                what: "incremental memory snapshots".into(),
            });
        }
        if !dir.is_dir() || !dir_is_empty(dir)? {
            return Err(DriverError::spec(
                "snapshot directory",
                format!("{} must be an existing, empty directory", dir.display()),
            ));
        }
        let _op = self.inner.op.lock();
        self.check_alive()?;
        let inner = &self.inner;
        let was_running = inner.query_status()? == "running";
        let target = dir.join(VMSTATE);
        let (taken_at_ns, _) = now_ns();
        let t0 = Instant::now();
        if was_running {
            inner.track.lock().pause_why = Some(format!("paused for snapshot {}", dir.display()));
            inner.execute("stop", json!({}), COMMAND_TIMEOUT)?;
        }
        let migrated = self.migrate_to(&target, MIGRATION_TIMEOUT);
        let resumed = if was_running {
            inner.track.lock().resume_why =
                Some(format!("resumed after snapshot {}", dir.display()));
            inner.execute("cont", json!({}), COMMAND_TIMEOUT).map(drop)
        } else {
            Ok(())
        };
        // Whole microseconds, as artifacts.json records it.
        let pause = was_running.then(|| Duration::from_micros(t0.elapsed().as_micros() as u64));
        let renamed_after = migrated?;
        resumed?;
        if renamed_after {
            wait_for_file(&target, Duration::from_secs(60))?;
        }
        artifacts::sync_file(&target)?;
        artifacts::sync_dir(dir)?;
        let size = std::fs::metadata(&target)
            .map_err(DriverError::io(target.display().to_string()))?
            .len();
        let arts = SnapshotArtifacts {
            version: ARTIFACTS_VERSION,
            driver: NAME.into(),
            driver_format: DRIVER_FORMAT,
            instance: inner.id.clone(),
            memory: MemoryKind::Full,
            parent: None,
            artifacts: vec![Artifact {
                name: VMSTATE.into(),
                kind: ArtifactKind::MigrationStream,
                file: VMSTATE.into(),
                size,
            }],
            pause,
            taken_at_ns,
            host: HostInfo::current(),
        };
        arts.store(dir)?;
        let mut ev = DriverEvent::now(
            LifecycleKind::Snapshot,
            format!(
                "snapshot {} ({size} bytes, paused {})",
                dir.display(),
                pause.map_or("not: it was not running".to_string(), |p| format!("{p:?}"))
            ),
        );
        ev.lifecycle.snapshot_id = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        inner.events.publish(ev);
        tracing::info!(instance = %inner.id, dir = %dir.display(), size, ?pause, "snapshot written");
        Ok(arts)
    }

    fn debugger(&self) -> Option<DebugListen> {
        self.inner.debugger.clone()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for QemuInstance {
    fn drop(&mut self) {
        let inner = &self.inner;
        if inner.exit_info().is_none() {
            {
                let mut t = inner.track.lock();
                if t.ending.is_none() {
                    t.ending = Some("stopped because the instance was dropped".into());
                }
            }
            if inner.qmp.get().is_some_and(|q| q.closed().is_none())
                && inner
                    .execute("quit", json!({}), Duration::from_secs(2))
                    .is_ok()
            {
                inner.wait_exit(Duration::from_secs(3));
            }
            inner.kill("killed because the instance was dropped");
        }
        inner.closing.store(true, Ordering::Relaxed);
        if let Some(q) = inner.qmp.get() {
            q.close();
        }
        if let Some(s) = inner.console_stream.lock().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }
}
