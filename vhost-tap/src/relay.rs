//! A vhost-user message relay between a front-end and our back-end daemon.
//!
//! The relay sits on the control channel only (the data path is the shared
//! guest memory and the kick/call eventfds, which pass through it untouched as
//! attached file descriptors). It exists to tolerate a front-end ordering that
//! the `vhost` crate rejects: QEMU 7.2's virtio-net sends
//! `VHOST_USER_SET_VRING_ENABLE` when the device is created, before
//! `VHOST_USER_SET_FEATURES`, and the crate treats that as a fatal protocol
//! error, dropping the front-end. The relay answers such early messages itself
//! (acknowledging them if the front-end asked for a reply), applies them to the
//! back-end as soon as the front-end acknowledges `PROTOCOL_FEATURES` (QEMU
//! does not send them again), and forwards every other message, with its file
//! descriptors, unchanged.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (all `u32` LE).
const HEADER_LEN: usize = 12;
/// Largest payload we relay; vhost-user messages are far smaller.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one vhost-user message carries.
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors relaying messages.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("i/o error on the {side} side")]
    Io {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("message of {0} bytes from the front-end exceeds the relay limit")]
    Oversized(usize),
}

/// One message read from a socket.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// A message without file descriptors.
    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Self {
            header,
            payload,
            fds: Vec::new(),
        }
    }

    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream.
fn read_message(sock: &mut UnixStream) -> Result<Option<Message>, io::Error> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, which we own mutably and which
    // outlives the call; any bytes may be written into it.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg gave us these descriptors; we are their only owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    sock.read_exact(&mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            RelayError::Oversized(size),
        ));
    }
    let mut payload = vec![0u8; size];
    sock.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn write_message(sock: &mut UnixStream, msg: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut whole = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    whole.extend_from_slice(&msg.header);
    whole.extend_from_slice(&msg.payload);
    let sent = sock
        .send_with_fds(&[whole.as_slice()], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors travel with the first byte; finish any short write.
    sock.write_all(&whole[sent..])
}

/// Relays between `frontend` and `backend` until either side closes.
pub fn run(mut frontend: UnixStream, mut backend: UnixStream) -> Result<(), RelayError> {
    let fe = |source| RelayError::Io {
        side: "front-end",
        source,
    };
    let be = |source| RelayError::Io {
        side: "back-end",
        source,
    };
    let mut protocol_features_acked = false;
    // Ring states the front-end asked for before features were negotiated;
    // applied (in order) right after it acknowledges PROTOCOL_FEATURES, since
    // QEMU does not repeat them.
    let mut early_enables: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut pfds = [
            libc::pollfd {
                fd: frontend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: backend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds we own, for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(fe(e));
        }
        if pfds[0].revents != 0 {
            let Some(msg) = read_message(&mut frontend).map_err(fe)? else {
                return Ok(());
            };
            tracing::trace!(
                request = msg.request(),
                flags = msg.flags(),
                "front-end message"
            );
            match msg.request() {
                REQ_SET_FEATURES if msg.payload.len() >= 8 => {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&msg.payload[..8]);
                    protocol_features_acked =
                        u64::from_le_bytes(v) & VHOST_USER_F_PROTOCOL_FEATURES != 0;
                    write_message(&mut backend, &msg).map_err(be)?;
                    if protocol_features_acked {
                        for payload in early_enables.drain(..) {
                            let replay =
                                Message::new(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, payload);
                            write_message(&mut backend, &replay).map_err(be)?;
                        }
                    }
                    continue;
                }
                REQ_SET_VRING_ENABLE if !protocol_features_acked => {
                    tracing::debug!("deferring an early SET_VRING_ENABLE");
                    early_enables.push(msg.payload.clone());
                    if msg.flags() & FLAG_NEED_REPLY != 0 {
                        let ack = Message::new(
                            REQ_SET_VRING_ENABLE,
                            FLAG_VERSION_1 | FLAG_REPLY,
                            0u64.to_le_bytes().to_vec(),
                        );
                        write_message(&mut frontend, &ack).map_err(fe)?;
                    }
                    continue;
                }
                _ => {}
            }
            write_message(&mut backend, &msg).map_err(be)?;
        }
        if pfds[1].revents != 0 {
            let Some(msg) = read_message(&mut backend).map_err(be)? else {
                return Ok(());
            };
            write_message(&mut frontend, &msg).map_err(fe)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(req: u32, flags: u32, size: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&req.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn early_vring_enable_is_acked_locally_and_the_rest_is_forwarded() {
        let (mut vmm, relay_fe) = UnixStream::pair().unwrap();
        let (relay_be, mut daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || run(relay_fe, relay_be));

        // Early SET_VRING_ENABLE with NEED_REPLY: answered by the relay.
        let mut m = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1 | FLAG_NEED_REPLY, 8);
        m.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0]);
        vmm.write_all(&m).unwrap();
        let mut reply = [0u8; 20];
        vmm.read_exact(&mut reply).unwrap();
        assert_eq!(
            &reply[..12],
            header(18, FLAG_VERSION_1 | FLAG_REPLY, 8).as_slice()
        );
        assert_eq!(&reply[12..], &[0u8; 8]);

        // SET_FEATURES with PROTOCOL_FEATURES, then SET_VRING_ENABLE: forwarded.
        let mut m = header(REQ_SET_FEATURES, FLAG_VERSION_1, 8);
        m.extend_from_slice(&VHOST_USER_F_PROTOCOL_FEATURES.to_le_bytes());
        let mut e = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        e.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0]);
        vmm.write_all(&m).unwrap();
        vmm.write_all(&e).unwrap();
        // The daemon sees SET_FEATURES, the deferred enable (without
        // NEED_REPLY), then the new enable.
        let mut deferred = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        deferred.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0]);
        let mut got = vec![0u8; m.len() + deferred.len() + e.len()];
        daemon.read_exact(&mut got).unwrap();
        assert_eq!(got, [m, deferred, e].concat());

        // A reply from the daemon, with a file descriptor, reaches the VMM.
        let (a, _b) = UnixStream::pair().unwrap();
        let r = header(1, FLAG_VERSION_1 | FLAG_REPLY, 0);
        daemon
            .send_with_fds(&[r.as_slice()], &[a.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; 12];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: 12,
        }];
        // SAFETY: the iovec points at `buf`, owned and writable.
        let (n, nfds) = unsafe { vmm.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (12, 1));
        assert_eq!(buf.as_slice(), r.as_slice());
        // SAFETY: we received this descriptor and own it now.
        drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });

        // Closing the VMM side ends the relay cleanly.
        drop(vmm);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn oversized_messages_end_the_relay_with_an_error() {
        let (mut vmm, relay_fe) = UnixStream::pair().unwrap();
        let (relay_be, _daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || run(relay_fe, relay_be));
        vmm.write_all(&header(5, FLAG_VERSION_1, 1 << 30)).unwrap();
        assert!(t.join().unwrap().is_err());
    }
}
