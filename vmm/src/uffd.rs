//! A minimal userfaultfd wrapper (x86-64 Linux): create a descriptor,
//! register a range in MISSING mode, read page-fault events, resolve them
//! with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, wake waiters with `UFFDIO_WAKE`.
//!
//! The structures and ioctl numbers are those of `<linux/userfaultfd.h>`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFD_USER_MODE_ONLY`: the flag that lets unprivileged users create a
/// descriptor that only handles faults from user mode.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING faults on shared memory (memfd).
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One message read from a userfaultfd (`struct uffd_msg`, 32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For a page fault: `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// For a page fault: the faulting address.
    pub address: u64,
    /// For a page fault: the thread id, when requested.
    pub ptid: u64,
}

/// Result of resolving a range with [`Uffd::copy`] or [`Uffd::zero`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled (and its waiters woken).
    Done,
    /// The first `n` bytes were filled; the page after them already exists.
    Exists(u64),
    /// The range is no longer registered (unregistered, or unmapped).
    Gone,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Uffd {
    /// Creates a non-blocking, close-on-exec userfaultfd that also handles
    /// faults taken in kernel mode (KVM's, and a backend's system calls into
    /// guest buffers), and enables `features`. Tries the `userfaultfd`
    /// system call, then `/dev/userfaultfd`.
    pub fn new(features: u64) -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the system call takes flags only and returns a new
        // descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let raw = if raw >= 0 {
            raw
        } else {
            let first = last_err();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|e| {
                    std::io::Error::new(
                        first.kind(),
                        format!(
                            "userfaultfd: {first}; /dev/userfaultfd: {e} \
                             (needs root or the vm.unprivileged_userfaultfd sysctl)"
                        ),
                    )
                })?;
            // SAFETY: an ioctl on the device we opened, with the flags as its
            // argument; it returns a new descriptor or -1.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW as _,
                    flags & !UFFD_USER_MODE_ONLY,
                )
            };
            if r < 0 {
                return Err(last_err());
            }
            r
        };
        // SAFETY: `raw` is a new descriptor only we hold.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let u = Uffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        u.ioctl(UFFDIO_API, &mut api)?;
        Ok(u)
    }

    /// Wraps a userfaultfd received from another process (a vhost-user
    /// backend's, from `POSTCOPY_ADVISE`). Its API handshake is done.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Uffd { fd }
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: `arg` is the structure the request reads and writes (the
        // sizes are encoded in `req`), valid for the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            Err(last_err())
        } else {
            Ok(())
        }
    }

    /// Registers `[start, start + len)` for MISSING faults.
    pub fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    /// Unregisters a range (waiters in it are woken and retry the access
    /// without userfaultfd).
    pub fn unregister(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Wakes the threads waiting on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRange { start, len };
        match self.ioctl(UFFDIO_WAKE, &mut r) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Copies `len` bytes from `src` (this process) into the registered,
    /// missing range at `dst`, and wakes its waiters.
    ///
    /// # Safety
    ///
    /// `src..src + len` must be readable memory of this process.
    pub unsafe fn copy(&self, dst: u64, src: u64, len: u64) -> std::io::Result<Fill> {
        loop {
            let mut c = UffdioCopy {
                dst,
                src,
                len,
                mode: 0,
                copy: 0,
            };
            match self.ioctl(UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(Fill::Done),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EEXIST) => return Ok(Fill::Exists(c.copy.max(0) as u64)),
                    Some(libc::EAGAIN) if c.copy > 0 => return Ok(Fill::Exists(c.copy as u64)),
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    Some(libc::ENOENT) | Some(libc::ESRCH) => return Ok(Fill::Gone),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Fills the registered, missing range at `dst` with zeros and wakes its
    /// waiters.
    pub fn zero(&self, dst: u64, len: u64) -> std::io::Result<Fill> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode: 0,
                zeropage: 0,
            };
            match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(Fill::Done),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EEXIST) => return Ok(Fill::Exists(z.zeropage.max(0) as u64)),
                    Some(libc::EAGAIN) if z.zeropage > 0 => {
                        return Ok(Fill::Exists(z.zeropage as u64))
                    }
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    Some(libc::ENOENT) | Some(libc::ESRCH) => return Ok(Fill::Gone),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Reads the next message, or `None` when none is pending.
    pub fn read(&self) -> std::io::Result<Option<UffdMsg>> {
        let mut m = UffdMsg::default();
        let n = std::mem::size_of::<UffdMsg>();
        // SAFETY: reads at most `n` bytes into `m`, a plain 32-byte struct
        // for which any bytes are valid.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), (&mut m as *mut UffdMsg).cast(), n) };
        if r < 0 {
            let e = last_err();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        if r as usize != n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short userfaultfd message ({r} bytes)"),
            ));
        }
        Ok(Some(m))
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    }
}
