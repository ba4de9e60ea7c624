//! TAP devices, optionally opened inside a named network namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Errors opening or using a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot enter network namespace {name}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("TUNSETIFF failed for {name}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bring {name} up")]
    LinkUp {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the namespace thread panicked")]
    Thread,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// An open TAP device (`IFF_TAP | IFF_NO_PI`, non-blocking). Frames are
/// plain Ethernet frames without a virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens or creates the TAP interface `name` (`%d` lets the kernel pick
    /// a number) and sets it up. With `netns`, the interface lives in
    /// `/var/run/netns/<netns>`: a helper thread enters the namespace, opens
    /// the device and exits; the descriptor keeps working from any namespace.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 {
            return Err(TapError::Name(name.into()));
        }
        match netns {
            None => Self::open_here(name),
            Some(ns) => {
                let (name, ns) = (name.to_owned(), ns.to_owned());
                std::thread::spawn(move || {
                    enter_netns(&ns)?;
                    Self::open_here(&name)
                })
                .join()
                .map_err(|_| TapError::Thread)?
            }
        }
    }

    fn open_here(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq we own, on a tun fd.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let end = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        link_up(&name).map_err(|source| TapError::LinkUp {
            name: name.clone(),
            source,
        })?;
        Ok(Self { file, name })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `Ok(None)` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: write from a buffer we own, of its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn enter_netns(ns: &str) -> Result<(), TapError> {
    let err = |source| TapError::Netns {
        name: ns.into(),
        source,
    };
    if ns.contains('/') || ns.is_empty() {
        return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
    }
    let f = File::open(format!("/var/run/netns/{ns}")).map_err(err)?;
    // SAFETY: setns on a namespace fd we opened; only this helper thread
    // changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

fn link_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain datagram socket used only for interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write our ifreq.
    let r = unsafe {
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req);
        if r == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS as _, &mut req);
        }
        r
    };
    let e = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(s) };
    if r < 0 {
        return Err(e);
    }
    Ok(())
}
