//! One QEMU process: its lifecycle, events, console, snapshots and exit.
//!
//! Three threads serve an instance: the QMP reader (see [`super::qmp`]),
//! whose events update the run state and become [`DriverEvent`]s; a console
//! reader on the serial socket, which fans the output out to console
//! subscribers (QEMU itself appends it to the console file) and keeps the
//! last [`events::CONSOLE_TAIL_CHUNKS`](crate::events::CONSOLE_TAIL_CHUNKS)
//! chunks for new subscribers; and a monitor that notices when the process
//! exits and records how.
//!
//! The driver remembers whether it wants the guest paused. QEMU's gdbstub
//! stops the guest when a debugger attaches and continues it when the
//! debugger detaches; a RESUME that arrives while the driver wants the
//! guest paused (and did not ask for it) makes a short-lived thread stop the
//! guest again, so a detach does not leave a paused instance running. The
//! guest may run for the few milliseconds that takes.
//!
//! QEMU runs with `-no-reboot` and the panic action `pause`: a kernel panic
//! (pvpanic) holds the guest (state [`RunState::Crashed`]), and a guest
//! reset (a triple fault or a reboot) ends QEMU with a SHUTDOWN event of
//! reason `guest-reset`, which the driver reports as a crash.

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
use super::persist::{MachineRecord, MACHINE_ALIAS, MACHINE_FILE};
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
pub const DRIVER_FORMAT: u32 = 2;
/// The snapshot artifact holding QEMU's migration stream.
pub const VMSTATE: &str = "vmstate";
/// The snapshot artifact holding the machine record (`qemu.json`).
pub const MACHINE: &str = "machine";
/// The detail of a guest reset, which `-no-reboot` turns into an exit.
pub const GUEST_RESET: &str = "guest reset (triple fault or reboot)";
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
    /// The driver wants the guest paused (it paused it, or restored it and
    /// has not resumed it).
    want_paused: bool,
}

pub(crate) struct Inner {
    id: String,
    program: String,
    layout: Layout,
    pid: u32,
    accel: AccelChoice,
    /// How the machine is built (the machine type resolved once QMP is up).
    machine: Mutex<MachineRecord>,
    debugger: Option<DebugListen>,
    events: Bus<DriverEvent>,
    console: Bus<Vec<u8>>,
    console_tail: Mutex<VecDeque<u8>>,
    track: Mutex<Track>,
    qmp: OnceLock<Qmp>,
    child: Mutex<Option<Proc>>,
    /// Set while re-attaching to a QEMU started by an earlier process:
    /// dropping the instance then leaves QEMU running.
    detach_on_drop: AtomicBool,
    exit: Mutex<Option<ExitInfo>>,
    /// The crash of a guest QEMU holds (set before `exited` is notified).
    crash: Mutex<Option<ExitInfo>>,
    /// Notified (with `exit` locked) on exit and on a crash.
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

/// Whether a SHUTDOWN reason means the guest crashed: a reset (which
/// `-no-reboot` turns into an exit) or a panic.
fn is_guest_crash(reason: &str) -> bool {
    matches!(reason, "guest-reset" | "guest-panic")
}

fn crash_detail(reason: &str) -> String {
    if reason == "guest-panic" {
        "guest kernel panicked".into()
    } else {
        GUEST_RESET.into()
    }
}

fn status_parts(s: &ExitStatus) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    (s.code(), s.signal())
}

/// The QEMU process: a child of this process, or one started by an
/// earlier process and re-attached ([`super::QemuDriver::reattach`]),
/// watched through a pidfd since it cannot be reaped here.
pub(crate) enum Proc {
    Child(Child),
    Adopted(crate::process::Pidfd),
}

impl Proc {
    fn id(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => p.pid(),
        }
    }
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

    /// The console line that says the kernel panicked, else the last
    /// non-empty console line (from the output read so far).
    fn panic_line(&self) -> Option<String> {
        let tail = self.console_tail.lock();
        let (a, b) = tail.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        lines
            .clone()
            .rev()
            .find(|l| l.contains("Kernel panic"))
            .or_else(|| lines.next_back())
            .map(str::to_string)
    }

    /// Records that the guest crashed and is held, and wakes waiters.
    fn set_crashed(&self, detail: String) {
        *self.crash.lock() = Some(ExitInfo {
            reason: EndReason::Crash,
            code: None,
            signal: None,
            detail,
        });
        let _exit = self.exit.lock();
        self.exited.notify_all();
    }

    /// Stops a guest that QEMU resumed while the driver wants it paused
    /// (a debugger detached). Runs on its own thread.
    fn repause(&self) {
        let _op = self.op.lock();
        {
            let mut t = self.track.lock();
            if !t.want_paused || t.run != RunState::Running {
                return;
            }
            t.pause_why = Some(
                "paused again: QEMU resumed the guest (a debugger detached) while the driver \
                 held it paused"
                    .into(),
            );
        }
        let r = self.execute("stop", json!({}), COMMAND_TIMEOUT);
        self.track.lock().pause_why = None;
        if let Err(e) = r {
            tracing::warn!(instance = %self.id, error = %e, "could not pause the guest again");
        }
    }

    /// Handles one QMP event (called on the QMP reader thread). Returns
    /// whether the guest must be paused again ([`Inner::repause`], which
    /// cannot run on the reader thread).
    fn on_event(&self, ev: QmpEvent) -> bool {
        let mut t = self.track.lock();
        match ev.name.as_str() {
            "RESUME" if t.want_paused => {
                t.run = RunState::Running;
                drop(t);
                self.publish_at(
                    LifecycleKind::Resume,
                    "resumed by QEMU, not the driver (a debugger detached); pausing again".into(),
                    ev.timestamp_us,
                );
                return true;
            }
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
                    return false;
                }
                t.run = RunState::Paused;
                drop(t);
                self.publish_at(
                    LifecycleKind::Pause,
                    why.unwrap_or_else(|| {
                        "paused outside the driver (a debugger attached, or a monitor command)"
                            .to_string()
                    }),
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
                if let Some(line) = self.panic_line() {
                    detail.push_str(&format!("; console: {line}"));
                }
                self.set_crashed(detail.clone());
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
                if is_guest_crash(&reason) {
                    self.publish_at(
                        LifecycleKind::Crash,
                        format!(
                            "{}; QEMU ends (-no-reboot, SHUTDOWN reason {reason})",
                            crash_detail(&reason)
                        ),
                        ev.timestamp_us,
                    );
                    return false;
                }
                let detail = if guest {
                    format!("the guest shut down ({reason})")
                } else {
                    format!("QEMU shut down ({reason})")
                };
                self.publish_at(LifecycleKind::Shutdown, detail, ev.timestamp_us);
            }
            _ => {}
        }
        false
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
        let crashed = ending.is_none() && shutdown.as_deref().is_some_and(is_guest_crash);
        let detail = match (&shutdown, &ending) {
            (Some(r), None) if crashed => {
                format!("{}; QEMU exited ({shown}, -no-reboot)", crash_detail(r))
            }
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
        } else if crashed {
            EndReason::Crash
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
        let child = match guard.as_mut() {
            None => return true,
            Some(Proc::Adopted(p)) => {
                if !p.exited() {
                    return false;
                }
                *guard = None;
                drop(guard);
                self.finish(None);
                return true;
            }
            Some(Proc::Child(c)) => c,
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
        let Some(proc) = guard.take() else {
            return;
        };
        self.track.lock().ending = Some(why.to_string());
        let status = match proc {
            Proc::Child(mut child) => kill_and_reap(&mut child),
            Proc::Adopted(p) => {
                // Not a child: it cannot be reaped here, only seen to exit.
                p.signal_group(libc::SIGKILL);
                p.wait(Duration::from_secs(10));
                None
            }
        };
        drop(guard);
        self.finish(status);
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.lock().clone()
    }

    /// Waits at most `timeout` for the process to exit or the guest to
    /// crash (and be held).
    fn wait_end(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.exit.lock();
        loop {
            if let Some(e) = exit.clone().or_else(|| self.crash.lock().clone()) {
                return Some(e);
            }
            if self.exited.wait_until(&mut exit, deadline).timed_out() {
                return exit.clone().or_else(|| self.crash.lock().clone());
            }
        }
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

    /// The instance's work directory (where QEMU's control files are).
    fn scratch(&self) -> &Path {
        self.layout.qmp.parent().unwrap_or(Path::new("/"))
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

    /// Records the QEMU version and, when QEMU was started with the
    /// machine alias, the concrete machine type it stands for.
    fn resolve_machine(&self, version: Option<super::qmp::QemuVersion>) -> Result<(), DriverError> {
        let mut m = self.machine.lock().clone();
        if let Some(recorded) = &m.qemu_version {
            if version.map(|v| v.to_string()).as_ref() != Some(recorded) {
                tracing::warn!(instance = %self.id, recorded, ?version,
                    "restoring a snapshot written by another QEMU version");
            }
        } else {
            m.qemu_version = version.map(|v| v.to_string());
        }
        if m.machine == MACHINE_ALIAS {
            let list = self.execute("query-machines", json!({}), COMMAND_TIMEOUT)?;
            let concrete = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e.get("alias").and_then(Value::as_str) == Some(MACHINE_ALIAS))
                .and_then(|e| e.get("name").and_then(Value::as_str))
                .ok_or_else(|| {
                    DriverError::Protocol(format!(
                        "query-machines names no machine type for the alias {MACHINE_ALIAS}"
                    ))
                })?;
            m.machine = concrete.to_string();
        }
        *self.machine.lock() = m;
        Ok(())
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

/// What [`QemuInstance::attach`] needs.
pub(crate) struct Launch {
    pub id: String,
    pub program: String,
    pub layout: Layout,
    pub accel: AccelChoice,
    pub machine: MachineRecord,
    pub debugger: Option<DebugListen>,
    pub restored_from: Option<String>,
    pub child: Proc,
}

/// How long QEMU may take to open its QMP socket.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl QemuInstance {
    /// Takes ownership of a started QEMU: watches it, connects QMP and the
    /// console, and sets it up. The vCPUs are still stopped when this
    /// returns. Any error stops the process.
    pub(crate) fn attach(l: Launch) -> Result<QemuInstance, DriverError> {
        let pid = l.child.id();
        let adopted = matches!(l.child, Proc::Adopted(_));
        let inner = Arc::new(Inner {
            id: l.id,
            program: l.program,
            layout: l.layout,
            pid,
            accel: l.accel,
            machine: Mutex::new(l.machine),
            debugger: l.debugger,
            events: Bus::with_history(),
            console: Bus::with_tail(crate::events::CONSOLE_TAIL_CHUNKS),
            console_tail: Mutex::new(VecDeque::new()),
            track: Mutex::new(Track {
                run: RunState::Created,
                started: false,
                restored_from: l.restored_from,
                shutdown: None,
                ending: None,
                pause_why: None,
                resume_why: None,
                want_paused: false,
            }),
            qmp: OnceLock::new(),
            child: Mutex::new(Some(l.child)),
            detach_on_drop: AtomicBool::new(adopted),
            exit: Mutex::new(None),
            crash: Mutex::new(None),
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
                if inner.on_event(ev) {
                    let i = inner.clone();
                    let spawned = std::thread::Builder::new()
                        .name("qemu-repause".into())
                        .spawn(move || i.repause());
                    if let Err(e) = spawned {
                        tracing::warn!(instance = %inner.id, error = %e, "cannot start the repause thread");
                    }
                }
            }
        })
        .map_err(|e| inner.explain(e, "negotiating QMP"))?;
        let version = qmp.version();
        if let Some(v) = version {
            tracing::debug!(instance = %inner.id, version = %v, "QMP connected");
        }
        let _ = inner.qmp.set(qmp);

        // A guest panic holds the guest (and arrives as GUEST_PANICKED).
        // Without set-action (QEMU before 6.0) QEMU would shut a panicked
        // guest down, so such a QEMU is refused.
        match inner.execute("set-action", json!({"panic": "pause"}), COMMAND_TIMEOUT) {
            Ok(_) => {}
            Err(DriverError::Command { reason, .. }) if reason.contains("CommandNotFound") => {
                return Err(DriverError::Unsupported {
                    driver: NAME.into(),
                    what: "a QEMU without set-action (older than 6.0): the driver needs it to \
                           hold a panicked guest"
                        .into(),
                });
            }
            Err(e) => return Err(e),
        }
        inner.resolve_machine(version)?;
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

        if adopted {
            // The guest ran before: take its state from QEMU.
            let status = inner.query_status()?;
            let mut t = inner.track.lock();
            t.started = true;
            match status.as_str() {
                "running" => t.run = RunState::Running,
                "guest-panicked" => {
                    t.run = RunState::Crashed;
                    drop(t);
                    inner.set_crashed("the guest kernel panicked and is held".into());
                }
                _ => {
                    t.run = RunState::Paused;
                    t.want_paused = true;
                }
            }
            inner.detach_on_drop.store(false, Ordering::Release);
            tracing::info!(instance = %inner.id, pid, %status, "re-attached to a running QEMU");
            return Ok(inst);
        }

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
        self.inner.track.lock().want_paused = false;
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
    /// checks that the guest is paused with the loaded state, or held after
    /// a panic (a snapshot of a crashed guest; the state is then
    /// [`RunState::Crashed`]).
    pub(crate) fn load_snapshot(
        &self,
        source: &Path,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let inner = &self.inner;
        let uri = migration::incoming(inner.qmp()?.version(), source);
        inner.execute("migrate-incoming", json!({ "uri": uri }), COMMAND_TIMEOUT)?;
        let deadline = Instant::now() + timeout;
        let panicked = loop {
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
                "paused" | "prelaunch" | "postmigrate" => break false,
                "guest-panicked" => break true,
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
        };
        let m = inner.execute("query-migrate", json!({}), COMMAND_TIMEOUT)?;
        match m.get("status").and_then(Value::as_str) {
            None | Some("completed") => {
                if panicked {
                    inner.track.lock().run = RunState::Crashed;
                    inner.set_crashed(format!(
                        "restored a snapshot of a crashed guest ({}); the guest is held",
                        source.display()
                    ));
                } else {
                    let mut t = inner.track.lock();
                    t.run = RunState::Paused;
                    t.want_paused = true;
                }
                Ok(())
            }
            Some(other) => Err(DriverError::Command {
                command: "migrate-incoming".into(),
                reason: format!(
                    "migration status {other}: {}",
                    m.get("error-desc").and_then(Value::as_str).unwrap_or("")
                ),
            }),
        }
    }

    /// Writes the migration stream into `target`, waiting at most `timeout`
    /// for QEMU. Returns whether the file appears under its name only
    /// after QEMU completes (see [`finish_stream`]). A migration QEMU
    /// reports failed removes what it wrote at once.
    fn migrate_to(&self, target: &Path, timeout: Duration) -> Result<bool, DriverError> {
        let inner = &self.inner;
        let scratch = inner.scratch();
        let out = migration::outgoing(inner.qmp()?.version(), target, scratch);
        inner.execute("migrate", json!({ "uri": out.uri }), COMMAND_TIMEOUT)?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = inner.execute("query-migrate", json!({}), COMMAND_TIMEOUT)?;
            match m.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(out.renamed_after),
                Some("failed") | Some("cancelled") => {
                    let qemu = m
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("migration failed without a description")
                        .to_string();
                    let written = if out.renamed_after {
                        finish_stream(target, scratch, STREAM_SETTLE).err()
                    } else {
                        None
                    };
                    remove_stream(target, scratch);
                    let reason = match written {
                        Some(DriverError::Command { reason, .. }) => format!("{qemu}; {reason}"),
                        _ => qemu,
                    };
                    return Err(DriverError::Command {
                        command: "migrate".into(),
                        reason,
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = inner.execute("migrate_cancel", json!({}), COMMAND_TIMEOUT);
                if out.renamed_after {
                    let _ = finish_stream(target, scratch, STREAM_SETTLE);
                }
                remove_stream(target, scratch);
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

/// How long the `exec:` command may take to finish writing (or fail)
/// after QEMU is done with the stream.
const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the `exec:` command gets to settle after QEMU failed.
const STREAM_SETTLE: Duration = Duration::from_secs(5);

/// Waits at most `timeout` for the `exec:` command writing `target` to end:
/// `target` under its final name, or the `.failed` file holding the write
/// error (which is removed and returned as the error).
fn finish_stream(target: &Path, scratch: &Path, timeout: Duration) -> Result<(), DriverError> {
    let failed = migration::failed_path(target, scratch);
    let deadline = Instant::now() + timeout;
    loop {
        if failed.exists() {
            let why = std::fs::read_to_string(&failed).unwrap_or_default();
            let _ = std::fs::remove_file(&failed);
            let why = why.trim();
            return Err(DriverError::Command {
                command: "migrate".into(),
                reason: format!(
                    "writing the stream to {} failed: {}",
                    target.display(),
                    if why.is_empty() {
                        "no error text (is the disk full?)"
                    } else {
                        why
                    }
                ),
            });
        }
        if target.exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                what: format!("{} to be written", target.display()),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Removes an incomplete stream at `target` and whatever its writer left.
fn remove_stream(target: &Path, scratch: &Path) {
    for p in std::iter::once(target.to_path_buf()).chain(migration::leftovers(target, scratch)) {
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a failed snapshot file");
            }
        }
    }
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
        let was = {
            let mut t = self.inner.track.lock();
            t.pause_why = Some("paused by the driver".into());
            std::mem::replace(&mut t.want_paused, true)
        };
        let r = self.inner.execute("stop", json!({}), COMMAND_TIMEOUT);
        // QEMU sends the event before its reply; a guest already in that
        // state sends none, so the detail must not stay for a later event.
        let mut t = self.inner.track.lock();
        t.pause_why = None;
        if r.is_err() {
            t.want_paused = was;
        }
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
        let was = {
            let mut t = self.inner.track.lock();
            t.resume_why = Some("resumed by the driver".into());
            std::mem::replace(&mut t.want_paused, false)
        };
        let r = self.inner.execute("cont", json!({}), COMMAND_TIMEOUT);
        // QEMU sends the event before its reply; a guest already in that
        // state sends none, so the detail must not stay for a later event.
        let mut t = self.inner.track.lock();
        t.resume_why = None;
        if r.is_err() {
            t.want_paused = was;
        }
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
            .wait_end(timeout)
            .ok_or_else(|| DriverError::Timeout {
                what: format!("instance {} to exit or crash", self.inner.id),
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
        let dir = &super::cmdline::absolutize(dir)?;
        let _op = self.inner.op.lock();
        self.check_alive()?;
        let inner = &self.inner;
        let was_running = inner.query_status()? == "running";
        let target = dir.join(VMSTATE);
        let (taken_at_ns, _) = now_ns();
        let t0 = Instant::now();
        if was_running {
            {
                let mut t = inner.track.lock();
                t.pause_why = Some(format!("paused for snapshot {}", dir.display()));
                t.want_paused = true;
            }
            let stopped = inner.execute("stop", json!({}), COMMAND_TIMEOUT);
            let mut t = inner.track.lock();
            t.pause_why = None;
            if stopped.is_err() {
                t.want_paused = false;
            }
            drop(t);
            stopped?;
        }
        let migrated = self.migrate_to(&target, MIGRATION_TIMEOUT);
        let resumed = if was_running {
            {
                let mut t = inner.track.lock();
                t.resume_why = Some(format!("resumed after snapshot {}", dir.display()));
                t.want_paused = false;
            }
            let r = inner.execute("cont", json!({}), COMMAND_TIMEOUT).map(drop);
            inner.track.lock().resume_why = None;
            r
        } else {
            Ok(())
        };
        // Whole microseconds, as artifacts.json records it.
        let pause = was_running.then(|| Duration::from_micros(t0.elapsed().as_micros() as u64));
        let renamed_after = migrated?;
        resumed?;
        if renamed_after {
            if let Err(e) = finish_stream(&target, inner.scratch(), STREAM_WRITE_TIMEOUT) {
                remove_stream(&target, inner.scratch());
                return Err(e);
            }
        }
        artifacts::sync_file(&target)?;
        let machine = inner.machine.lock().clone();
        let machine_size = machine.store(dir)?;
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
            artifacts: vec![
                Artifact {
                    name: VMSTATE.into(),
                    kind: ArtifactKind::MigrationStream,
                    file: VMSTATE.into(),
                    size,
                },
                Artifact {
                    name: MACHINE.into(),
                    kind: ArtifactKind::State,
                    file: MACHINE_FILE.into(),
                    size: machine_size,
                },
            ],
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
        if inner.exit_info().is_none() && !inner.detach_on_drop.load(Ordering::Acquire) {
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
