//! Helpers of the agent-restart tests: `capture-agent serve` as a process
//! that can be killed with SIGKILL alone (its instances' processes live
//! on), the instance records it keeps, and the processes named in them.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmr_proto::pb::capture_agent_client::CaptureAgentClient;

/// `capture-agent serve` with a given configuration file. Unlike the
/// harness's `ChildGuard` it is not in a process group of its own that is
/// killed as a whole: [`Serve::kill9`] kills the agent process only.
pub struct Serve {
    pub child: Option<Child>,
    pub grpc: SocketAddr,
    pub log: PathBuf,
}

impl Serve {
    /// Starts `serve --config cfg`, appending its log to `log`, and waits
    /// (30 s) until it listens on `grpc`.
    pub fn start(bin: &Path, cfg: &Path, grpc: SocketAddr, log: &Path) -> Serve {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start capture-agent serve");
        let mut s = Serve {
            child: Some(child),
            grpc,
            log: log.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(grpc).is_err() {
            if let Some(st) = s.try_wait() {
                panic!("capture-agent serve exited ({st}):\n{}", s.log_text());
            }
            assert!(
                Instant::now() < end,
                "the agent does not listen:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> CaptureAgentClient<tonic::transport::Channel> {
        CaptureAgentClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the agent")
    }

    /// SIGKILL to the agent process alone; reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the agent");
            c.wait().expect("reap the agent");
        }
    }

    /// SIGTERM to the agent alone, waiting up to 120 s for it to stop its
    /// instances and exit; then SIGKILL.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on the pid of the child we own, not yet reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Makes this test process the reaper of orphaned descendants (the
/// instances' processes once the agent is killed), so they can be reaped
/// and waited for here.
pub fn become_subreaper() {
    // SAFETY: prctl(2) PR_SET_CHILD_SUBREAPER takes an integer flag.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// The start time of `pid` (`/proc/<pid>/stat` field 22), if it runs (a
/// zombie does not).
pub fn start_time(pid: u32) -> Option<u64> {
    vmr_hypervisor::process::start_time(pid)
}

/// Reaps `pid` if it is a zombie child of this (subreaper) process.
pub fn reap(pid: u32) {
    let mut st = 0;
    // SAFETY: waitpid(2) on one pid, non-blocking; `st` outlives the call.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut st, libc::WNOHANG) };
}

/// Waits up to `timeout` for `pid` (started at `start`) to end, reaping it.
pub fn wait_gone(pid: u32, start: u64, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        reap(pid);
        if start_time(pid) != Some(start) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The instance record the agent keeps, as JSON (`None`: there is none).
pub fn record(data: &Path, instance: &str) -> Option<serde_json::Value> {
    let p = data.join(instance).join("instance.json");
    let text = std::fs::read_to_string(p).ok()?;
    Some(serde_json::from_str(&text).expect("a JSON record"))
}

/// `(pid, start_time)` of a process entry of a record.
pub fn proc_of(v: &serde_json::Value) -> Option<(u32, u64)> {
    Some((v["pid"].as_u64()? as u32, v["start_time"].as_u64()?))
}
