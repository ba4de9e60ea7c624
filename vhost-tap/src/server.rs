//! Serving a backend on a unix socket, one front-end after another.
//!
//! [`Server::spawn`] listens on the socket and runs each front-end connection
//! with a fresh [`VhostUserDaemon`] (fresh vrings and worker threads) over the
//! same backend. When a front-end disconnects, the next one that connects gets
//! a reset device: this is how a VMM reconnects after a restart.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::GuestMemAtomic;

/// Errors of the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("backend refused the connection")]
    Attach(#[source] io::Error),
    #[error("cannot start the server thread")]
    Spawn(#[source] io::Error),
    #[error("server thread panicked")]
    Panicked,
}

/// A backend the server can run: a vhost-user backend with hooks around each
/// front-end connection.
pub trait Serve:
    VhostUserBackend<
        Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion,
        Vring = VringRwLock<GuestMemAtomic>,
    > + Clone
    + 'static
{
    /// Called with the new connection's epoll handlers before it is served
    /// (register extra file descriptors here).
    fn on_connect(&self, _handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        Ok(())
    }
    /// Called after a front-end disconnected.
    fn on_disconnect(&self) {}
}

/// A running accept loop.
pub struct Server {
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    path: PathBuf,
}

impl Server {
    /// Listens on `socket` (replacing a stale file) and serves front-ends in a
    /// background thread until [`Server::stop`], or until the first front-end
    /// leaves if `once`.
    pub fn spawn<B: Serve>(
        name: &str,
        backend: B,
        socket: &Path,
        once: bool,
    ) -> Result<Self, ServerError> {
        let listener = Listener::new(socket, true).map_err(|source| ServerError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Listen {
                path: socket.to_owned(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (s, c, n) = (stop.clone(), conn.clone(), name.to_owned());
        let sock = socket.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(&n, backend, listener, &s, &c, once, &sock))
            .map_err(ServerError::Spawn)?;
        Ok(Self {
            stop,
            conn,
            thread: Some(thread),
            path: socket.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the accept loop has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the accept loop to end (with `once`, after the first
    /// front-end leaves).
    pub fn join(mut self) -> Result<(), ServerError> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), ServerError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ServerError::Panicked)?,
            None => Ok(()),
        }
    }

    /// Disconnects the current front-end and ends the loop.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ServerError> {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h.shutdown();
        }
        self.join_inner()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_inner();
        }
    }
}

/// Waits until the listener is readable or `stop` is set; true if readable.
fn wait_readable(listener: &Listener, stop: &AtomicBool) -> bool {
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, with a timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r > 0 {
            return true;
        }
    }
    false
}

fn accept_loop<B: Serve>(
    name: &str,
    backend: B,
    listener: Listener,
    stop: &AtomicBool,
    conn: &Mutex<Option<ShutdownHandle>>,
    once: bool,
    socket: &Path,
) -> Result<(), ServerError> {
    // The daemon serves a private socket; each front-end is relayed to it (see
    // `crate::relay` for why).
    let inner_path = inner_socket_path(socket);
    let mut inner = Listener::new(&inner_path, true).map_err(|source| ServerError::Listen {
        path: inner_path.clone(),
        source,
    })?;
    loop {
        if !wait_readable(&listener, stop) {
            return Ok(());
        }
        let frontend = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "accepting a front-end failed");
                continue;
            }
        };
        if let Err(error) = frontend.set_nonblocking(false) {
            tracing::warn!(%error, "configuring a front-end socket failed");
            continue;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), mem)
            .map_err(|e| ServerError::Daemon(e.to_string()))?;
        backend
            .on_connect(&daemon.get_epoll_handlers())
            .map_err(ServerError::Attach)?;
        let to_daemon = match UnixStream::connect(&inner_path) {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "connecting the relay to the daemon failed");
                continue;
            }
        };
        if let Err(error) = daemon.start(&mut inner) {
            tracing::warn!(%error, "starting the daemon for a front-end failed");
            continue;
        }
        let relay = std::thread::Builder::new()
            .name(format!("{name}-relay"))
            .spawn(move || crate::relay::run(frontend, to_daemon))
            .map_err(ServerError::Spawn)?;
        tracing::info!(backend = name, "front-end connected");
        *conn.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        let result = daemon.wait();
        *conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match result {
            Ok(()) => tracing::info!(backend = name, "front-end disconnected"),
            Err(error) => tracing::info!(backend = name, %error, "front-end connection ended"),
        }
        match relay.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::info!(backend = name, %error, "relay ended"),
            Err(_) => tracing::warn!(backend = name, "relay thread panicked"),
        }
        drop(daemon);
        backend.on_disconnect();
        if once || stop.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}

/// The private socket the daemon listens on, next to the public one.
fn inner_socket_path(socket: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(
        socket
            .file_name()
            .unwrap_or_else(|| "vhost-tap.sock".as_ref()),
    );
    name.push(".backend");
    socket.with_file_name(name)
}
