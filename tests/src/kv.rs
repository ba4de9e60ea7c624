//! A client of demo-linux's key-value service (`vmr-kv`, one request line
//! and one reply line per TCP connection) that connects from inside a
//! network namespace, as the recorded peer does.
//!
//! `PUT <key> <value>` answers `OK <record>`; `GET <record>` answers
//! `VAL <record> <key> <value>`; a key over 200 bytes is the packet of
//! death that panics the guest's kernel.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The service's address inside the guest's network.
pub const SERVICE: &str = "192.168.77.2:7000";

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("cannot open the network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {path}")]
    Setns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} within {limit:?}")]
    Connect {
        addr: String,
        limit: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("the request to {addr} failed")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the request thread panicked")]
    Panicked,
}

/// Enters the network namespace at `path` (`/run/netns/<name>`) on the
/// calling thread.
pub fn enter_netns(path: &Path) -> Result<(), KvError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|source| KvError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: setns(2) on a valid namespace fd held open by `f`; it changes
    // only the calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(KvError::Setns {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// One request line to [`SERVICE`] from inside the namespace at `ns`, on a
/// new connection (retried for up to `connect_within`); the reply line
/// (empty if the service closed without one) and the local port used.
/// Reads wait at most 60 s.
pub fn request(ns: &Path, line: &str, connect_within: Duration) -> Result<(String, u16), KvError> {
    let ns = ns.to_path_buf();
    let line = line.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        let addr: SocketAddr = SERVICE.parse().expect("SERVICE is a valid address");
        let deadline = Instant::now() + connect_within;
        let s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(source) if Instant::now() > deadline => {
                    return Err(KvError::Connect {
                        addr: SERVICE.into(),
                        limit: connect_within,
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        let io = |source| KvError::Io {
            addr: SERVICE.into(),
            source,
        };
        let port = s.local_addr().map_err(io)?.port();
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        (&s).write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        let mut reply = String::new();
        // A guest that panics on the request closes nothing: the read times
        // out and the reply stays empty.
        let _ = BufReader::new(&s).read_line(&mut reply);
        Ok((reply.trim_end().to_string(), port))
    })
    .join()
    .map_err(|_| KvError::Panicked)?
}

/// `PUT key value` from inside `ns`; the reply and the local port used.
pub fn put(ns: &Path, key: &str, value: &str) -> Result<(String, u16), KvError> {
    request(ns, &format!("PUT {key} {value}"), Duration::from_secs(60))
}
