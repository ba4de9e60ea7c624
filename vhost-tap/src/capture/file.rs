//! [`FileSink`]: records appended to one capture file, and the frame writer
//! it shares with the spool.
//!
//! A new file gets a [`vmr_proto::framing::FileHeader`]; an existing one is
//! checked (it must be a format 2 capture) and appended to: a restarted
//! backend never truncates an earlier capture. If the earlier writer died in
//! the middle of a frame, that torn frame stays where it is, and readers
//! report and skip it before they reach the new records.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use vmr_proto::framing::FileHeader;
use vmr_proto::pb;

use super::{encode_record, CaptureError, CaptureSink, Record, SinkError, PENDING_WRITE_BYTES};
use crate::iov::IoVecs;

/// Writes frames at the end of one file: small ones batched into one write,
/// large block payloads straight from their record's buffer (`pwritev` of
/// the frame head and the payload).
pub(crate) struct FrameWriter {
    pub(crate) file: File,
    /// End of the data (where the next frame goes).
    pub(crate) size: u64,
    /// The header's salt, mixed into every frame's CRC.
    pub(crate) salt: u64,
    /// End of older bytes in a reused file (0: none): while the data is
    /// shorter, an end marker follows it.
    pub(crate) stale_end: u64,
    /// Bytes of the file kept allocated from its start (0: none), so frames
    /// up to there never need new space from the filesystem.
    pub(crate) reserve: u64,
    pending: Vec<u8>,
    head: Vec<u8>,
    scratch: pb::Event,
    iov: IoVecs,
}

impl FrameWriter {
    pub(crate) fn new(file: File, size: u64) -> Self {
        Self {
            file,
            size,
            salt: 0,
            stale_end: 0,
            reserve: 0,
            pending: Vec::new(),
            head: Vec::new(),
            scratch: pb::Event::default(),
            iov: IoVecs::default(),
        }
    }

    /// Bytes written plus bytes buffered.
    pub(crate) fn len(&self) -> u64 {
        self.size + self.pending.len() as u64
    }

    /// Writes the header of a new file.
    pub(crate) fn write_header(&mut self, header: &FileHeader) -> io::Result<()> {
        let mut buf = Vec::new();
        header.encode(&mut buf)?;
        self.file.write_all_at(&buf, self.size)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Encodes `rec`. A small frame waits in the buffer (written once it
    /// holds [`PENDING_WRITE_BYTES`] or by [`FrameWriter::write_out`]); a
    /// large payload is written at once, after the buffer (written first,
    /// on its own). Returns whether everything buffered so far reached the
    /// file; on failure, whether the records before `rec` did.
    pub(crate) fn push(&mut self, rec: &Record) -> Result<bool, (bool, io::Error)> {
        let at = self.pending.len();
        let payload = match encode_record(
            rec,
            self.salt,
            &mut self.pending,
            &mut self.head,
            &mut self.scratch,
        ) {
            Ok(p) => p,
            Err(e) => {
                self.pending.truncate(at);
                return Err((at == 0, e));
            }
        };
        match payload {
            Some(data) => {
                // The earlier frames first, so a payload that fails (no
                // space left) fails alone.
                if at > 0 {
                    self.write(None).map_err(|e| (false, e))?;
                }
                self.write(Some(data)).map_err(|e| (true, e))?;
                Ok(true)
            }
            None if self.pending.len() >= PENDING_WRITE_BYTES => {
                self.write(None).map_err(|e| (false, e))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Writes the buffered frames.
    pub(crate) fn write_out(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write(None)
    }

    /// Writes the buffer (then `head` and `data`, if given) at the end of
    /// the data in one `pwritev`. On failure nothing counts as written: the
    /// next write goes to the same place.
    fn write(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        self.iov.0.clear();
        let mut total = self.pending.len() as u64;
        self.iov.0.push(libc::iovec {
            iov_base: self.pending.as_mut_ptr().cast(),
            iov_len: self.pending.len(),
        });
        if let Some(d) = data {
            self.iov.0.push(libc::iovec {
                iov_base: self.head.as_mut_ptr().cast(),
                iov_len: self.head.len(),
            });
            self.iov.0.push(libc::iovec {
                iov_base: d.as_ptr().cast_mut().cast(),
                iov_len: d.len(),
            });
            total += (self.head.len() + d.len()) as u64;
        }
        let marker = vmr_proto::framing::END_MARKER;
        if self.reserve > 0 && self.size + total > self.reserve {
            // Past the reserved space: claim the space first, so a
            // filesystem without room fails the write before any byte of
            // it is written (a reader following the file never sees part
            // of a frame that is then written over).
            if let Err(e) = reserve_range(&self.file, self.size, total) {
                self.pending.clear();
                return Err(e);
            }
        }
        if self.size + total < self.stale_end {
            self.iov.0.push(libc::iovec {
                iov_base: marker.as_ptr().cast_mut().cast(),
                iov_len: marker.len(),
            });
        }
        // SAFETY: the entries point into our own buffers, the record's
        // payload and the local marker, all alive and unchanged for the
        // duration of the call (pwritev only reads them).
        let r = unsafe {
            crate::iov::write_all(self.file.as_raw_fd(), &mut self.iov.0, Some(self.size))
        };
        self.pending.clear();
        if let Err(e) = r {
            // A write cut short (no space left) may have left part of a
            // frame past the data: it counts as older bytes, behind an end
            // marker, and is cut when the segment closes.
            if let Ok(m) = self.file.metadata() {
                self.stale_end = self.stale_end.max(m.len());
            }
            if self.stale_end > self.size {
                // Mark the end of the good data again.
                let _ = self.file.write_all_at(&marker, self.size);
            }
            return Err(e);
        }
        self.size += total;
        Ok(())
    }

    /// Cuts older bytes a reused file still holds after the data, keeping
    /// the file's reserved space allocated (past its new end).
    pub(crate) fn cut_stale(&mut self) -> io::Result<()> {
        if self.stale_end > self.size {
            self.file.set_len(self.size)?;
            if let Err(error) = reserve(&self.file, self.reserve) {
                tracing::warn!(%error, "cannot keep a capture segment's space reserved");
            }
        }
        self.stale_end = 0;
        Ok(())
    }

    /// Writes the buffer and makes the file's data durable.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.sync_data()
    }
}

/// Allocates the first `len` bytes of `file` without changing its size
/// (`fallocate` with `FALLOC_FL_KEEP_SIZE`), so writes there never fail for
/// lack of space. A filesystem without `fallocate` is left as it is.
pub(crate) fn reserve(file: &File, len: u64) -> io::Result<()> {
    reserve_range(file, 0, len)
}

/// Allocates `len` bytes of `file` from `at` on, without changing its
/// size (see [`reserve`]).
fn reserve_range(file: &File, at: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off =
        |v: u64| libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (at, len) = (off(at)?, off(len)?);
    // SAFETY: fallocate only reads its scalar arguments; the descriptor is
    // ours and open.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, at, len) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

/// Writes a batch through `w`; on failure, reports how many records at the
/// front reached the file.
pub(crate) fn submit_to(w: &mut FrameWriter, batch: &[Record]) -> Result<(), SinkError> {
    // Records from index `buffered_from` on sit in the buffer, unwritten.
    let mut buffered_from = 0;
    for (i, r) in batch.iter().enumerate() {
        match w.push(r) {
            Ok(true) => buffered_from = i + 1,
            Ok(false) => {}
            Err((before, e)) => {
                return Err(SinkError {
                    written: if before { i } else { buffered_from },
                    error: e.into(),
                })
            }
        }
    }
    w.write_out().map_err(|e| SinkError {
        written: buffered_from,
        error: e.into(),
    })
}

/// One capture file, appended to.
pub struct FileSink {
    inner: Mutex<FrameWriter>,
}

impl FileSink {
    /// Opens the capture file at `path` for appending, creating it with a
    /// header for `instance_id` and `epoch` if it does not exist or is
    /// empty. A file that is not a format 2 capture is refused (and left
    /// alone).
    pub fn open(path: &Path, instance_id: &str, epoch: u64) -> Result<Self, CaptureError> {
        let open_err = |source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let mut w = FrameWriter::new(file, len);
        if len == 0 {
            w.write_header(&FileHeader {
                epoch,
                first_seq: 0,
                instance_id: instance_id.to_owned(),
            })
            .map_err(open_err)?;
            w.file.sync_all().map_err(open_err)?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(open_err)?;
            }
        } else {
            check_header(&w.file, path)?;
        }
        Ok(Self {
            inner: Mutex::new(w),
        })
    }

    /// [`FileSink::open`] with instance id `local` and epoch 0.
    pub fn create(path: &Path) -> Result<Self, CaptureError> {
        Self::open(path, "local", 0)
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the file holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks that an existing capture file starts with a format 2 header.
pub(crate) fn check_header(file: &File, path: &Path) -> Result<FileHeader, CaptureError> {
    let mut buf = vec![0u8; 256];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|source| CaptureError::Open {
            path: path.display().to_string(),
            source,
        })?;
    let foreign = |source| CaptureError::Foreign {
        path: path.display().to_string(),
        source,
    };
    match vmr_proto::framing::FileHeader::decode(&buf[..n]) {
        Ok(Some((h, _))) => Ok(h),
        Ok(None) => Err(foreign(vmr_proto::framing::FramingError::BadHeader(
            "file ends inside the header",
        ))),
        Err(e) => Err(foreign(e)),
    }
}

impl CaptureSink for FileSink {
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        submit_to(&mut w, batch)
    }

    fn flush(&self) -> Result<(), CaptureError> {
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        w.write_out()?;
        Ok(())
    }

    fn sync(&self) -> Result<(), CaptureError> {
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        w.sync()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_event(seq: u64, len: usize) -> Record {
        Record::new(pb::Event {
            instance_id: "vm-1".into(),
            seq,
            epoch: 1,
            payload: Some(pb::event::Payload::Block(pb::BlockIo {
                device: "vda".into(),
                op: pb::BlockOp::Write as i32,
                len: len as u32,
                data: vec![seq as u8; len],
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    fn seqs(path: &Path) -> (Vec<u64>, usize) {
        let mut errors = 0;
        let mut out = Vec::new();
        for r in vmr_proto::framing::open_capture(path).unwrap() {
            match r {
                Ok(e) => out.push(e.seq),
                Err(_) => errors += 1,
            }
        }
        (out, errors)
    }

    #[test]
    fn a_restarted_writer_appends_after_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = FileSink::open(&path, "vm-1", 1).unwrap();
        // Small and large (split) frames.
        sink.submit(&[frame_event(1, 100), frame_event(2, 100 << 10)])
            .unwrap();
        sink.submit(&[frame_event(3, 10)]).unwrap();
        sink.sync().unwrap();
        drop(sink);
        // The earlier writer died inside frame 4.
        let earlier = std::fs::read(&path).unwrap();
        let before = earlier.len() as u64;
        let mut torn = Vec::new();
        vmr_proto::framing::encode_frame(frame_event(4, 500).event(), &mut torn).unwrap();
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &f, &torn[..200]).unwrap();
        let torn_len = before + 200;

        let sink = FileSink::open(&path, "vm-1", 2).unwrap();
        sink.submit(&[frame_event(5, 10), frame_event(6, 64 << 10)])
            .unwrap();
        sink.sync().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > torn_len, "appended, nothing truncated");
        let now = std::fs::read(&path).unwrap();
        assert_eq!(
            &now[..earlier.len()],
            &earlier[..],
            "earlier bytes untouched"
        );
        let (got, errors) = seqs(&path);
        assert_eq!(got, [1, 2, 3, 5, 6]);
        assert_eq!(errors, 1, "the torn frame is reported once");
    }

    #[test]
    fn a_foreign_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, b"important notes, not a capture").unwrap();
        assert!(matches!(
            FileSink::open(&path, "vm-1", 1),
            Err(CaptureError::Foreign { .. })
        ));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"important notes, not a capture"
        );
    }

    #[test]
    fn a_failed_write_reports_what_reached_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.events");
        let sink = FileSink::open(&path, "vm-1", 1).unwrap();
        // A read-only descriptor makes every write fail.
        let ro = File::open(&path).unwrap();
        let mut w = FrameWriter::new(ro, 0);
        let err = submit_to(&mut w, &[frame_event(1, 10), frame_event(2, 10)]).unwrap_err();
        assert_eq!(err.written, 0);
        drop(sink);
    }
}
