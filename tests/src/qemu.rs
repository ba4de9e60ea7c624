//! QEMU harness: command line, QMP client, serial console, migration to a file,
//! and network namespaces with a peer for the guest NIC.
//!
//! Guests run with TCG (`/dev/kvm` on these machines is too slow for Linux),
//! guest memory is a shared memfd (vhost-user needs it), disks and NICs are
//! vhost-user devices whose sockets the caller's backends listen on, and the
//! serial console goes to a socket chardev whose log file the harness polls for
//! markers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::process::{ChildGuard, HarnessError};

/// Errors driving QEMU, QMP or a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{0}")]
    Harness(#[from] HarnessError),
    #[error("qemu-system-x86_64 not found at {0}; install qemu-system-x86 (scripts/setup.sh)")]
    MissingQemu(PathBuf),
    #[error("i/o error on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {error}")]
    Qmp { command: String, error: String },
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    #[error("QEMU exited ({status}) while {waiting}; stderr: {stderr}")]
    Exited {
        status: String,
        waiting: String,
        stderr: String,
    },
    #[error("timed out after {secs} s waiting for {what}; serial tail:\n{tail}")]
    Timeout {
        what: String,
        secs: u64,
        tail: String,
    },
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("command `{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// The QEMU binary (`$VMR_QEMU`, else `/usr/bin/qemu-system-x86_64`).
pub fn qemu_binary() -> Result<PathBuf, QemuError> {
    let path = std::env::var_os("VMR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(QemuError::MissingQemu(path))
    }
}

/// A vhost-user NIC: the backend's socket and the guest MAC.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub socket: PathBuf,
    pub mac: String,
}

/// Everything that shapes one QEMU process.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Directory for the QMP socket, serial socket and logs (must exist).
    pub work_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    /// `tcg` (default) or `kvm`.
    pub accel: String,
    /// vhost-user-blk backend sockets, in device order (`vda`, `vdb`, ...).
    pub blk_sockets: Vec<PathBuf>,
    /// vhost-user-net backends.
    pub nets: Vec<NetDevice>,
    /// `-incoming` URI (e.g. `exec:cat /path/state`).
    pub incoming: Option<String>,
    /// Run QEMU inside this network namespace (`ip netns exec`), for
    /// QEMU-side network backends such as `-netdev tap`.
    pub netns: Option<String>,
    /// Further arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl QemuConfig {
    /// A TCG config with 256 MiB of memory and no devices.
    pub fn new(work_dir: &Path, kernel: &Path, initrd: &Path, append: &str) -> Self {
        Self {
            work_dir: work_dir.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
            memory_mib: 256,
            accel: "tcg".into(),
            blk_sockets: Vec::new(),
            nets: Vec::new(),
            incoming: None,
            netns: None,
            extra_args: Vec::new(),
        }
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.work_dir.join("qmp.sock")
    }

    pub fn serial_socket(&self) -> PathBuf {
        self.work_dir.join("serial.sock")
    }

    pub fn serial_log(&self) -> PathBuf {
        self.work_dir.join("serial.log")
    }

    pub fn stderr_log(&self) -> PathBuf {
        self.work_dir.join("qemu.stderr")
    }

    /// The arguments after the binary name.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let mem = format!("{}M", self.memory_mib);
        push(&["-accel", &self.accel]);
        push(&["-machine", "q35,memory-backend=mem"]);
        push(&["-cpu", "max"]);
        push(&["-smp", "1", "-m", &mem]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
        push(&["-nographic", "-no-reboot", "-nodefaults"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
                self.serial_socket().display(),
                self.serial_log().display()
            ),
        ]);
        push(&["-serial", "chardev:ser0"]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
        ]);
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        push(&["-initrd", &self.initrd.to_string_lossy()]);
        push(&["-append", &self.append]);
        for (i, sock) in self.blk_sockets.iter().enumerate() {
            push(&[
                "-chardev",
                &format!("socket,id=blk{i},path={}", sock.display()),
            ]);
            push(&[
                "-device",
                &format!("vhost-user-blk-pci,id=vblk{i},chardev=blk{i},num-queues=1"),
            ]);
        }
        for (i, net) in self.nets.iter().enumerate() {
            push(&[
                "-chardev",
                &format!("socket,id=net{i},path={}", net.socket.display()),
            ]);
            push(&["-netdev", &format!("vhost-user,id=hn{i},chardev=net{i}")]);
            push(&[
                "-device",
                &format!(
                    "virtio-net-pci,id=vnet{i},netdev=hn{i},mac={},vectors=0",
                    net.mac
                ),
            ]);
        }
        if let Some(uri) = &self.incoming {
            push(&["-incoming", uri]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running QEMU with its QMP connection.
#[derive(Debug)]
pub struct Qemu {
    config: QemuConfig,
    guard: ChildGuard,
    qmp: Qmp,
}

impl Qemu {
    /// Starts QEMU and connects to its QMP socket.
    pub fn start(name: &str, config: QemuConfig) -> Result<Self, QemuError> {
        let bin = qemu_binary()?;
        for p in [config.qmp_socket(), config.serial_socket()] {
            let _ = std::fs::remove_file(p);
        }
        let stderr =
            std::fs::File::create(config.stderr_log()).map_err(io_err("QEMU stderr log"))?;
        let stdout = stderr.try_clone().map_err(io_err("QEMU stderr log"))?;
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(config.args())
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        tracing::info!(name, args = ?config.args(), "starting QEMU");
        let mut guard = ChildGuard::spawn(name, &mut cmd)?;
        let qmp_path = config.qmp_socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Some(status) = guard.try_wait() {
                return Err(QemuError::Exited {
                    status: status.to_string(),
                    waiting: "starting".into(),
                    stderr: read_tail(&config.stderr_log(), 4000),
                });
            }
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(io_err("QMP socket")(e)),
            }
        };
        let qmp = Qmp::handshake(stream)?;
        Ok(Self { config, guard, qmp })
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Everything the guest printed so far.
    pub fn serial(&self) -> String {
        std::fs::read(self.config.serial_log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn check_alive(&mut self, waiting: &str) -> Result<(), QemuError> {
        match self.guard.try_wait() {
            Some(status) => Err(QemuError::Exited {
                status: status.to_string(),
                waiting: waiting.to_string(),
                stderr: read_tail(&self.config.stderr_log(), 4000),
            }),
            None => Ok(()),
        }
    }

    /// Waits until a serial line contains `marker` and returns that line (from
    /// the marker on). Fails early if QEMU exits.
    pub fn wait_for_serial(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let start = Instant::now();
        loop {
            let serial = self.serial();
            if let Some(line) = serial.lines().find_map(|l| l.find(marker).map(|i| &l[i..])) {
                return Ok(line.trim_end().to_string());
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::Timeout {
                    what: format!("serial marker {marker:?}"),
                    secs: timeout.as_secs(),
                    tail: tail_str(&serial, 3000),
                });
            }
            if let Err(e) = self.check_alive(&format!("waiting for {marker:?}")) {
                // The log may have grown between the read and the exit.
                let serial = self.serial();
                if let Some(line) = serial.lines().find_map(|l| l.find(marker).map(|i| &l[i..])) {
                    return Ok(line.trim_end().to_string());
                }
                return Err(match e {
                    QemuError::Exited {
                        status, waiting, ..
                    } => QemuError::Exited {
                        status,
                        waiting,
                        stderr: format!(
                            "{}\nserial tail:\n{}",
                            read_tail(&self.config.stderr_log(), 2000),
                            tail_str(&serial, 2000)
                        ),
                    },
                    other => other,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `line` and a newline on the guest's serial console.
    pub fn send_serial(&mut self, line: &str) -> Result<(), QemuError> {
        let mut s =
            UnixStream::connect(self.config.serial_socket()).map_err(io_err("serial socket"))?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(io_err("serial socket"))?;
        // Give QEMU a moment to move the bytes into the UART before closing.
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("stop", json!({})).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("cont", json!({})).map(drop)
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String, QemuError> {
        let v = self.qmp.execute("query-status", json!({}))?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QemuError::QmpProtocol(format!("query-status returned {v}")))
    }

    /// Stops the VM and writes its migration stream to `path`, waiting until
    /// the migration completes.
    pub fn migrate_to_file(&mut self, path: &Path, timeout: Duration) -> Result<(), QemuError> {
        self.stop()?;
        let uri = format!("exec:cat > {}", shell_quote(&path.to_string_lossy()));
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        let start = Instant::now();
        loop {
            let v = self.qmp.execute("query-migrate", json!({}))?;
            match v.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let desc = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no error description")
                        .to_string();
                    return Err(QemuError::Migration(desc));
                }
                _ => {}
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::Migration(format!(
                    "not completed after {} s: {v}",
                    timeout.as_secs()
                )));
            }
            self.check_alive("migrating")?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until an incoming migration has been loaded (the state leaves
    /// `inmigrate`), then resumes the VM if it is paused.
    pub fn finish_incoming(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let start = Instant::now();
        loop {
            self.check_alive("loading the incoming migration")?;
            let status = self.status()?;
            match status.as_str() {
                "inmigrate" | "prelaunch" => {}
                "running" => return Ok(()),
                "paused" | "postmigrate" | "finish-migrate" => return self.cont(),
                other => {
                    return Err(QemuError::Migration(format!(
                        "destination is in state {other}"
                    )))
                }
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::Migration(format!(
                    "incoming migration not loaded after {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks QEMU to quit and waits for it (killing it after `timeout`).
    pub fn quit(mut self, timeout: Duration) -> Result<(), QemuError> {
        let _ = self.qmp.execute("quit", json!({}));
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.guard.try_wait().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.guard.stop(Duration::from_secs(2));
        Ok(())
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, QemuError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.guard.try_wait() {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::Timeout {
                    what: "QEMU to exit".into(),
                    secs: timeout.as_secs(),
                    tail: tail_str(&self.serial(), 2000),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn tail_str(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

fn read_tail(path: &Path, max: usize) -> String {
    std::fs::read(path)
        .map(|b| tail_str(&String::from_utf8_lossy(&b), max))
        .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

/// A QMP connection (commands are answered in order; events are skipped).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities.
    pub fn handshake(stream: UnixStream) -> Result<Self, QemuError> {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io_err("QMP socket"))?;
        let writer = stream.try_clone().map_err(io_err("QMP socket"))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io_err("QMP socket"))?;
        if n == 0 {
            return Err(QemuError::QmpProtocol("QMP connection closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QemuError::QmpProtocol(format!("bad JSON {line:?}: {e}")))
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(io_err("QMP socket"))?;
        loop {
            let v = self.read_message()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(QemuError::Qmp {
                    command: command.to_string(),
                    error: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            return Err(QemuError::QmpProtocol(format!("unexpected message {v}")));
        }
    }
}

/// Runs a command to completion, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, QemuError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(shown.clone()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(QemuError::Command {
            cmd: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// A network namespace created for one test and deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `vmr-test-<pid>-<n>` (needs root and iproute2).
    pub fn create() -> Result<Self, QemuError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("vmr-test-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name])).map_err(|e| QemuError::Command {
            cmd: format!("ip netns add {name}"),
            detail: format!("{e} (network namespaces need root and iproute2)"),
        })?;
        let ns = Self { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args...>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, QemuError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Waits until interface `dev` exists in the namespace.
    pub fn wait_for_link(&self, dev: &str, timeout: Duration) -> Result<(), QemuError> {
        let start = Instant::now();
        loop {
            match self.ip(&["link", "show", "dev", dev]) {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() >= timeout => {
                    return Err(QemuError::Timeout {
                        what: format!("interface {dev} in {}", self.name),
                        secs: timeout.as_secs(),
                        tail: e.to_string(),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Assigns `cidr` to `dev` and brings it up.
    pub fn configure(&self, dev: &str, cidr: &str) -> Result<(), QemuError> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// A command run inside the namespace (`ip netns exec <ns> program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<(), QemuError> {
        enter_netns(&self.path())
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<(), QemuError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(io_err("netns handle"))?;
    // SAFETY: setns(2) takes a valid open namespace fd (held by `f` for the
    // duration of the call) and only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io_err("setns")(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

/// The guest's TCP peer: a line echo service inside a network namespace that
/// answers each line `L` with `vmr-echo:L` and closes the connection.
#[derive(Debug)]
pub struct EchoPeer {
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl EchoPeer {
    /// Listens on `0.0.0.0:port` inside `ns`.
    pub fn start(ns: &NetNs, port: u16) -> Result<Self, QemuError> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = ns.path();
        let (stop2, received2) = (stop.clone(), received.clone());
        let handle = std::thread::Builder::new()
            .name("echo-peer".into())
            .spawn(move || {
                let entered = enter_netns(&ns_path);
                let listener = entered.and_then(|()| {
                    let l = std::net::TcpListener::bind(("0.0.0.0", port))
                        .map_err(io_err("echo peer listener"))?;
                    l.set_nonblocking(true)
                        .map_err(io_err("echo peer listener"))?;
                    Ok(l)
                });
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut line = Vec::new();
                            let mut byte = [0u8; 1];
                            while let Ok(1) = conn.read(&mut byte) {
                                if byte[0] == b'\n' {
                                    break;
                                }
                                line.push(byte[0]);
                            }
                            let line = String::from_utf8_lossy(&line).into_owned();
                            let reply = format!("{}\n", crate::guest::echo_reply(&line));
                            let _ = conn.write_all(reply.as_bytes());
                            if let Ok(mut r) = received2.lock() {
                                r.push(line);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(io_err("echo peer thread"))?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| QemuError::QmpProtocol("echo peer did not start".into()))??;
        Ok(Self {
            stop,
            received,
            handle: Some(handle),
        })
    }

    /// Lines received so far.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_the_vhost_user_devices() {
        let mut c = QemuConfig::new(
            Path::new("/w"),
            Path::new("/k"),
            Path::new("/i"),
            "console=ttyS0",
        );
        c.blk_sockets.push("/w/blk.sock".into());
        c.nets.push(NetDevice {
            socket: "/w/net.sock".into(),
            mac: "52:54:00:00:00:01".into(),
        });
        c.incoming = Some("exec:cat /w/state".into());
        let a = c.args().join(" ");
        assert!(a.contains("-accel tcg"));
        assert!(a.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(a.contains("socket,id=blk0,path=/w/blk.sock"));
        assert!(a.contains("vhost-user-blk-pci,id=vblk0,chardev=blk0"));
        assert!(a.contains("vhost-user,id=hn0,chardev=net0"));
        assert!(a.contains("netdev=hn0,mac=52:54:00:00:00:01,vectors=0"));
        assert!(a.contains("-incoming exec:cat /w/state"));
        assert!(a.contains("-append console=ttyS0"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail_str("héllo", 4), "llo");
        assert_eq!(tail_str("abc", 10), "abc");
    }
}
