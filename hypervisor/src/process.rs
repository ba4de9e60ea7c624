//! Processes this process did not start (or no longer parents): identity
//! by pid and start time, and a pidfd to watch and signal them.
//!
//! A process started by an earlier agent is no child of a restarted one, so
//! it cannot be reaped or waited for with `waitpid`. A [`Pidfd`] is opened
//! for its pid and checked against the start time recorded at launch
//! (`/proc/<pid>/stat`, field 22): a pid that was reused by another process
//! has another start time and is never adopted, so it is never signalled.
//! Signals go through `pidfd_send_signal`, so they reach the process the
//! pidfd was opened for even if its pid is reused later.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The start time of process `pid` in clock ticks since boot
/// (`/proc/<pid>/stat` field 22), if it exists and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A process watched through a pidfd.
#[derive(Debug)]
pub struct Pidfd {
    pid: u32,
    start_time: u64,
    fd: OwnedFd,
}

/// Why a recorded process cannot be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    /// No such process (it exited).
    #[error("process {0} is gone")]
    Gone(u32),
    /// The pid belongs to another process now.
    #[error("pid {pid} is another process now (start time {found}, recorded {recorded})")]
    Reused { pid: u32, recorded: u64, found: u64 },
    /// `pidfd_open` failed otherwise.
    #[error("pidfd_open({pid}): {reason}")]
    Open { pid: u32, reason: String },
}

impl Pidfd {
    /// Opens a pidfd for `pid` if it is still the process that started at
    /// `start_time` (clock ticks since boot).
    pub fn adopt(pid: u32, start_time: u64) -> Result<Self, AdoptError> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd
        // or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => AdoptError::Gone(pid),
                _ => AdoptError::Open {
                    pid,
                    reason: e.to_string(),
                },
            });
        }
        // SAFETY: `fd` is a new descriptor this process owns exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the open: if the start time matches now, the pidfd
        // refers to the recorded process.
        match self::start_time(pid) {
            None => Err(AdoptError::Gone(pid)),
            Some(found) if found != start_time => Err(AdoptError::Reused {
                pid,
                recorded: start_time,
                found,
            }),
            Some(_) => Ok(Self {
                pid,
                start_time,
                fd,
            }),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The start time it was adopted with.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Whether the process has exited (a zombie counts as exited).
    pub fn exited(&self) -> bool {
        self.wait(Duration::ZERO)
    }

    /// Waits at most `timeout` for the process to exit; returns whether it
    /// has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll(2) on one valid pollfd that lives for the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r > 0 {
                return true;
            }
            if r == 0 {
                return false;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted || Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Sends `signal` to the process (not to a later holder of its pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number,
        // no siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Sends `signal` to the process group the process leads, while the
    /// process (the group's leader, so the group id is still its) has not
    /// exited.
    pub fn signal_group(&self, signal: i32) {
        if self.exited() {
            return;
        }
        // SAFETY: kill(2) with a negative pid signals the group the process
        // leads; it has not exited (checked above), so its pid and group id
        // are still its own.
        unsafe { libc::kill(-(self.pid as libc::pid_t), signal) };
        let _ = self.signal(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopts_a_live_process_and_sees_it_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let st = start_time(pid).expect("a start time");
        assert!(matches!(
            Pidfd::adopt(pid, st + 1),
            Err(AdoptError::Reused { .. })
        ));
        let p = Pidfd::adopt(pid, st).unwrap();
        assert!(!p.exited());
        p.signal(libc::SIGKILL).unwrap();
        assert!(p.wait(Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(start_time(pid).is_none());
        assert!(matches!(Pidfd::adopt(pid, st), Err(AdoptError::Gone(_))));
    }
}
