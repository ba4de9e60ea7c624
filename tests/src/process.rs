//! Child processes that are killed when their guard drops, and helpers to find
//! binaries and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Errors starting or talking to a harnessed process.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} not found at {path}; run scripts/setup.sh first")]
    Missing { what: String, path: PathBuf },
    #[error("could not start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs} s: {detail}")]
    NotReady {
        what: String,
        secs: u64,
        detail: String,
    },
    #[error("{0}")]
    Failed(String),
}

/// A child process that is killed (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd`, placing it in its own process group so that its children
    /// are stopped with it.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Result<Self, HarnessError> {
        use std::os::unix::process::CommandExt;
        let name = name.into();
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: name.clone(),
            source,
        })?;
        Ok(Self {
            name,
            child: Some(child),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited; returns its status if so.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM to the process group, waits up to `grace`, then SIGKILLs.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pgid = child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group we
        // created in `spawn`; it has no memory-safety requirements.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // SAFETY: as above; reaps any stragglers left in the group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return Some(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 always succeeds");
    l.local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// Path of one of the workspace's binaries (built by `cargo build --workspace
/// --bins`, which `scripts/test.sh` runs first). `$VMR_BIN_DIR` overrides the
/// directory; otherwise it is the profile directory the test binary runs from.
pub fn workspace_bin(name: &str) -> Result<PathBuf, HarnessError> {
    let dir = match std::env::var_os("VMR_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().map_err(|e| HarnessError::Failed(e.to_string()))?;
            // target/<profile>/deps/<test-binary>
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| HarnessError::Failed("test binary has no profile dir".into()))?
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Missing {
            what: format!("binary {name} (build it with `cargo build --workspace --bins`)"),
            path,
        })
    }
}

/// Polls `probe` every 50 ms until it returns `Ok`, for at most `timeout`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, HarnessError> {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(detail) if start.elapsed() >= timeout => {
                return Err(HarnessError::NotReady {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    detail,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
