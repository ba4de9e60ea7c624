//! Scatter-gather writes from raw host buffers (guest memory).

use std::io;
use std::os::fd::RawFd;

/// Host buffers of one request, reused across requests.
#[derive(Default)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers are only dereferenced (by `pwritev`/`writev`) while the
// owner of the buffers they describe keeps them mapped: within the request
// they were filled for, by the worker that filled them or by the capture sink
// that holds the guest memory mapping alive. Between requests they are stale
// values that are never used.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Total bytes described.
    pub fn total_len(&self) -> usize {
        self.0.iter().map(|v| v.iov_len).sum()
    }
}

/// Writes every buffer of `iov`, in order, to `fd` (at `off` with `pwritev`,
/// or at the file position with `writev`), retrying short writes and `EINTR`.
/// `iov` is consumed: its entries are advanced past what was written.
///
/// # Safety
/// Every entry of `iov` must describe memory that is mapped and readable for
/// the duration of the call, and `fd` must be an open file descriptor.
pub unsafe fn write_all(
    fd: RawFd,
    iov: &mut [libc::iovec],
    mut off: Option<u64>,
) -> io::Result<()> {
    let mut first = 0usize;
    while first < iov.len() && iov[first].iov_len == 0 {
        first += 1;
    }
    while first < iov.len() {
        let rest = &iov[first..];
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller guarantees the iovecs describe readable, mapped
        // memory and that `fd` is open.
        let n = unsafe {
            match off {
                Some(at) => libc::pwritev(fd, rest.as_ptr(), cnt, at as libc::off_t),
                None => libc::writev(fd, rest.as_ptr(), cnt),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        if let Some(at) = &mut off {
            *at += n as u64;
        }
        // Skip what was written, trimming a partially written entry.
        let mut n = n as usize;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}
