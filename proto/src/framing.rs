//! Capture files: a file header, then checksummed event frames.
//!
//! A capture file (and each segment of a rolling spool) starts with a
//! [`FileHeader`] and continues with frames, each one protobuf
//! [`crate::pb::Event`]. All integers are little endian.
//!
//! File header (`29 + n + 4` bytes):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `VMRSPOOL` |
//! | 8 | 2 | format version ([`FORMAT_VERSION`], 2) |
//! | 10 | 2 | header length in bytes, CRC included |
//! | 12 | 8 | epoch of the writer |
//! | 20 | 8 | salt: the first `seq` the writer meant to put in the file (0 in a capture file) |
//! | 28 | 1 | `n`, length of the instance id (at most 128) |
//! | 29 | n | instance id (ASCII) |
//! | 29 + n | 4 | CRC-32 (IEEE) of the bytes before it |
//!
//! Frame (`12 + len` bytes):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `VMRF` |
//! | 4 | 4 | `len`, payload length, 1 to [`MAX_FRAME_LEN`] |
//! | 8 | 4 | CRC-32 (IEEE) of the header's salt (8 bytes), the `len` field and the payload |
//! | 12 | len | the payload: one encoded `Event` |
//!
//! End marker: the 4 bytes `VMRE` where a frame would start end the data
//! written so far. A spool writer that reuses a segment file puts it after
//! its newest frame while older bytes follow; those older frames carry
//! another salt, so they fail the CRC even without the marker.
//!
//! A reader checks the magic, the length and the CRC before it decodes a
//! payload. A frame that fails a check (a torn write, a flipped bit) is
//! reported with its offset and skipped: the reader looks for the next frame
//! magic after it and resumes there, so a damaged region costs only the
//! frames inside it and is never decoded as an event. A frame cut short by
//! the end of the file is reported as [`FramingError::Truncated`] (a torn
//! tail, or a frame a live writer is still appending).

use std::io::{self, Read, Write};

use prost::Message;

use crate::pb;

/// Largest frame payload accepted (the block topic's record limit).
pub const MAX_FRAME_LEN: usize = crate::topics::BLOCK_MAX_MESSAGE_BYTES;
/// First bytes of every capture file.
pub const FILE_MAGIC: [u8; 8] = *b"VMRSPOOL";
/// Version of the file and frame layout described above.
pub const FORMAT_VERSION: u16 = 2;
/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"VMRF";
/// Marks the end of the data written so far.
pub const END_MARKER: [u8; 4] = *b"VMRE";
/// Bytes before a frame's payload.
pub const FRAME_HEAD_LEN: usize = 12;
/// Longest instance id a header holds.
pub const MAX_INSTANCE_LEN: usize = 128;
const HEADER_FIXED: usize = 29;

/// Errors reading a capture.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("i/o error")]
    Io(#[from] io::Error),
    #[error("not a capture file (bad magic)")]
    NotACapture,
    #[error("capture format version {0} is not supported (expected {FORMAT_VERSION})")]
    Version(u16),
    #[error("capture file header is damaged: {0}")]
    BadHeader(&'static str),
    #[error("skipped {len} damaged bytes at offset {offset}: {reason}")]
    Corrupt {
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("stream ends inside a frame at offset {offset} ({len} bytes left)")]
    Truncated { offset: u64, len: u64 },
}

/// The header at the start of every capture file and spool segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// Epoch of the process that created the file.
    pub epoch: u64,
    /// First `seq` the writer meant to put in the file (0: unknown).
    pub first_seq: u64,
    /// Instance recorded.
    pub instance_id: String,
}

impl FileHeader {
    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> io::Result<()> {
        let id = self.instance_id.as_bytes();
        if id.len() > MAX_INSTANCE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "instance id longer than 128 bytes",
            ));
        }
        let start = out.len();
        let total = HEADER_FIXED + id.len() + 4;
        out.extend_from_slice(&FILE_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(total as u16).to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.first_seq.to_le_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Decodes a header from the start of `buf`; returns it and its length.
    /// `Ok(None)`: `buf` is too short to tell yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, FramingError> {
        if buf.len() < 12 {
            return if FILE_MAGIC.starts_with(buf) {
                Ok(None)
            } else {
                Err(FramingError::NotACapture)
            };
        }
        if buf[..8] != FILE_MAGIC {
            return Err(FramingError::NotACapture);
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(FramingError::Version(version));
        }
        let total = usize::from(u16::from_le_bytes([buf[10], buf[11]]));
        if !(HEADER_FIXED + 4..=HEADER_FIXED + MAX_INSTANCE_LEN + 4).contains(&total) {
            return Err(FramingError::BadHeader("header length out of range"));
        }
        if buf.len() < total {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(buf[total - 4..total].try_into().expect("4 bytes"));
        if crc32fast::hash(&buf[..total - 4]) != crc {
            return Err(FramingError::BadHeader("checksum mismatch"));
        }
        let n = usize::from(buf[28]);
        if HEADER_FIXED + n + 4 != total {
            return Err(FramingError::BadHeader("instance id length mismatch"));
        }
        let instance_id = std::str::from_utf8(&buf[HEADER_FIXED..HEADER_FIXED + n])
            .map_err(|_| FramingError::BadHeader("instance id is not UTF-8"))?
            .to_owned();
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        Ok(Some((
            FileHeader {
                epoch: u64_at(12),
                first_seq: u64_at(20),
                instance_id,
            },
            total,
        )))
    }
}

/// Writes the 12-byte frame head for a payload that is `prefix` followed by
/// `rest`, into `out` (replacing its contents).
fn frame_head(
    salt: u64,
    prefix: &[u8],
    rest: &[u8],
    out: &mut [u8; FRAME_HEAD_LEN],
) -> io::Result<()> {
    let len = prefix.len() + rest.len();
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an event must not encode to nothing",
        ));
    }
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("event of {len} bytes exceeds the frame limit"),
        ));
    }
    let len_le = (len as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&len_le);
    h.update(prefix);
    h.update(rest);
    out[0..4].copy_from_slice(&FRAME_MAGIC);
    out[4..8].copy_from_slice(&len_le);
    out[8..12].copy_from_slice(&h.finalize().to_le_bytes());
    Ok(())
}

/// Appends one event as a frame (salt 0) to `out`; returns its length.
pub fn encode_frame(event: &pb::Event, out: &mut Vec<u8>) -> io::Result<usize> {
    encode_frame_salted(event, 0, out)
}

/// Appends one event as a frame for a file with header salt `salt`.
pub fn encode_frame_salted(event: &pb::Event, salt: u64, out: &mut Vec<u8>) -> io::Result<usize> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD_LEN]);
    event
        .encode(out)
        .expect("encoding into a Vec cannot run out of space");
    let mut head = [0u8; FRAME_HEAD_LEN];
    if let Err(e) = frame_head(salt, &out[start + FRAME_HEAD_LEN..], &[], &mut head) {
        out.truncate(start);
        return Err(e);
    }
    out[start..start + FRAME_HEAD_LEN].copy_from_slice(&head);
    Ok(out.len() - start)
}

/// Writes one event as a frame; returns the number of bytes written.
pub fn write_event<W: Write>(w: &mut W, event: &pb::Event, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let n = encode_frame(event, buf)?;
    w.write_all(buf)?;
    Ok(n)
}

/// Encodes the start of a frame for `event`, a block record whose payload
/// `data` is kept out of the event (its `data` field empty), so the caller
/// can write the returned head and then `data` from where it lies without
/// copying it into one buffer first. The CRC covers `data`.
///
/// `out` receives the frame head, the event's fields and the block message
/// with every field but `data`, then `data`'s key and length; the payload
/// comes last, which protobuf decoders accept in any field order.
pub fn encode_block_frame_head(
    event: &pb::Event,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    encode_block_frame_head_salted(event, data, 0, out)
}

/// Writes a zeroed frame head, the event's fields and the block message
/// without `data`, then `data`'s key and length (`data_len`).
fn encode_block_frame_head_fields(
    event: &pb::Event,
    data_len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let Some(pb::event::Payload::Block(block)) = &event.payload else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a split frame needs a block event",
        ));
    };
    if !block.data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a split frame's block event must not hold data itself",
        ));
    }
    const DATA_TAG: u32 = 6;
    const BLOCK_TAG: u32 = 10;
    let block_len = block.encoded_len()
        + prost::encoding::key_len(DATA_TAG)
        + encoded_len_varint(data_len as u64)
        + data_len;
    out.clear();
    out.extend_from_slice(&[0; FRAME_HEAD_LEN]);
    if !event.instance_id.is_empty() {
        prost::encoding::string::encode(1, &event.instance_id, out);
    }
    for (tag, v) in [
        (2, event.seq),
        (3, event.wall_time_ns),
        (4, event.mono_time_ns),
        (5, event.epoch),
    ] {
        if v != 0 {
            prost::encoding::uint64::encode(tag, &v, out);
        }
    }
    encode_key(BLOCK_TAG, WireType::LengthDelimited, out);
    encode_varint(block_len as u64, out);
    block
        .encode(out)
        .expect("encoding into a Vec cannot run out of space");
    encode_key(DATA_TAG, WireType::LengthDelimited, out);
    encode_varint(data_len as u64, out);
    Ok(())
}

/// [`encode_block_frame_head`] for a file with header salt `salt`.
pub fn encode_block_frame_head_salted(
    event: &pb::Event,
    data: &[u8],
    salt: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    encode_block_frame_head_fields(event, data.len(), out)?;
    let mut head = [0u8; FRAME_HEAD_LEN];
    frame_head(salt, &out[FRAME_HEAD_LEN..], data, &mut head)?;
    out[..FRAME_HEAD_LEN].copy_from_slice(&head);
    Ok(())
}

/// [`encode_block_frame_head_salted`] for a payload of `data_len` bytes
/// whose CRC-32 (`crc32fast`, over the payload alone) the caller already
/// computed, e.g. while copying it: the payload is not read again. The frame
/// CRC is the CRC of the head's bytes combined with `data_crc`, so a reader
/// checks exactly what [`encode_block_frame_head_salted`] would have
/// written. A wrong `data_crc` yields a frame that readers reject.
pub fn encode_block_frame_head_with_crc(
    event: &pb::Event,
    data_len: usize,
    data_crc: u32,
    salt: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    // The head depends on the payload's length only, not on its bytes.
    encode_block_frame_head_fields(event, data_len, out)?;
    let prefix_len = out.len() - FRAME_HEAD_LEN;
    let len = prefix_len + data_len;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("event of {len} bytes exceeds the frame limit"),
        ));
    }
    let len_le = (len as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&len_le);
    h.update(&out[FRAME_HEAD_LEN..]);
    h.combine(&crc32fast::Hasher::new_with_initial_len(
        data_crc,
        data_len as u64,
    ));
    out[0..4].copy_from_slice(&FRAME_MAGIC);
    out[4..8].copy_from_slice(&len_le);
    out[8..12].copy_from_slice(&h.finalize().to_le_bytes());
    Ok(())
}

/// What [`parse_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole, checked frame: its payload is `buf[12..len]`.
    Frame { len: usize },
    /// The buffer ends inside the frame (or its head).
    NeedMore,
    /// Not a valid frame.
    Bad(&'static str),
    /// The end marker: no data follows yet.
    End,
}

/// Checks the frame at the start of `buf` (magic, length, CRC with salt 0).
pub fn parse_frame(buf: &[u8]) -> Parsed {
    parse_frame_salted(buf, 0)
}

/// Checks the frame at the start of `buf` in a file with header salt `salt`.
pub fn parse_frame_salted(buf: &[u8], salt: u64) -> Parsed {
    let magic_len = buf.len().min(4);
    if buf[..magic_len] != FRAME_MAGIC[..magic_len] {
        if buf[..magic_len] == END_MARKER[..magic_len] {
            return if magic_len == 4 {
                Parsed::End
            } else {
                Parsed::NeedMore
            };
        }
        return Parsed::Bad("bad frame magic");
    }
    if buf.len() < FRAME_HEAD_LEN {
        return Parsed::NeedMore;
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Parsed::Bad("frame length out of range");
    }
    if buf.len() < FRAME_HEAD_LEN + len {
        return Parsed::NeedMore;
    }
    let want = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&buf[4..8]);
    h.update(&buf[FRAME_HEAD_LEN..FRAME_HEAD_LEN + len]);
    if h.finalize() != want {
        return Parsed::Bad("frame checksum mismatch");
    }
    Parsed::Frame {
        len: FRAME_HEAD_LEN + len,
    }
}

/// Offset of the next possible frame start in `buf` after its first byte
/// (`None`: no frame magic starts in `buf[1..]`; a partial magic at the very
/// end counts as a possible start).
pub fn resync(buf: &[u8]) -> Option<usize> {
    (1..buf.len()).find(|&i| {
        let n = (buf.len() - i).min(4);
        buf[i..i + n] == FRAME_MAGIC[..n]
    })
}

/// One step of a [`FrameScanner`].
#[derive(Debug)]
pub enum Scanned {
    /// A checked frame; its payload decoded as `event`. `offset` is where
    /// the frame starts, `end` where the next one starts.
    Event {
        event: pb::Event,
        offset: u64,
        end: u64,
    },
    /// Damaged bytes that were skipped.
    Skipped {
        offset: u64,
        len: u64,
        reason: &'static str,
    },
}

/// Scans frames out of a byte buffer that grows at its end (a file being
/// read, possibly while it is written): feed it bytes, take items out.
#[derive(Debug, Default)]
pub struct FrameScanner {
    buf: Vec<u8>,
    /// Read position in `buf`.
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
    /// The file header's salt.
    salt: u64,
    /// The scanner stands at an end marker.
    at_end: bool,
}

impl FrameScanner {
    /// A scanner whose first byte is at file offset `offset`.
    pub fn at(offset: u64) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            base: offset,
            salt: 0,
            at_end: false,
        }
    }

    /// Sets the salt of the file's frames (its header's `first_seq`).
    pub fn set_salt(&mut self, salt: u64) {
        self.salt = salt;
    }

    /// Whether the last [`FrameScanner::next_item`] stopped at an end
    /// marker (the data written so far ends there).
    pub fn at_end_marker(&self) -> bool {
        self.at_end
    }

    /// File offset of the next unread byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Bytes fed but not consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Appends bytes that follow the ones fed so far.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Reads from `r` until it is exhausted (or `max` bytes were read).
    pub fn fill_from<R: Read>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        let mut chunk = [0u8; 64 << 10];
        let mut got = 0;
        while got < max {
            let want = chunk.len().min(max - got);
            match r.read(&mut chunk[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    self.feed(&chunk[..n]);
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// The next item, or `None` when the bytes fed so far end before a
    /// whole frame (more may come, see [`FrameScanner::pending`]).
    pub fn next_item(&mut self) -> Option<Scanned> {
        self.at_end = false;
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let offset = self.offset();
        let reason = match parse_frame_salted(rest, self.salt) {
            Parsed::NeedMore => return None,
            Parsed::End => {
                self.at_end = true;
                return None;
            }
            Parsed::Frame { len } => {
                match pb::Event::decode(&rest[FRAME_HEAD_LEN..len]) {
                    Ok(event) => {
                        self.pos += len;
                        return Some(Scanned::Event {
                            event,
                            offset,
                            end: offset + len as u64,
                        });
                    }
                    // A checked frame that is not an event: skip it whole.
                    Err(_) => {
                        self.pos += len;
                        return Some(Scanned::Skipped {
                            offset,
                            len: len as u64,
                            reason: "frame does not decode as an event",
                        });
                    }
                }
            }
            Parsed::Bad(reason) => reason,
        };
        let skip = resync(rest).unwrap_or(rest.len());
        self.pos += skip;
        Some(Scanned::Skipped {
            offset,
            len: skip as u64,
            reason,
        })
    }

    /// At the end of the input: reports the bytes left as a torn frame.
    pub fn finish(&mut self) -> Option<FramingError> {
        let left = self.pending();
        if left == 0 {
            return None;
        }
        let offset = self.offset();
        self.pos = self.buf.len();
        Some(FramingError::Truncated {
            offset,
            len: left as u64,
        })
    }
}

/// Reads the events of one capture stream: a file header (if the stream
/// starts with one), then frames. Damaged frames come out as
/// [`FramingError::Corrupt`] and reading goes on after them; a torn tail
/// ends the stream with [`FramingError::Truncated`].
pub struct EventReader<R> {
    inner: R,
    scanner: FrameScanner,
    header: Option<FileHeader>,
    started: bool,
    eof: bool,
    failed: bool,
}

impl<R: Read> EventReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            scanner: FrameScanner::default(),
            header: None,
            started: false,
            eof: false,
            failed: false,
        }
    }

    /// The file header, once read (`None` for a stream of bare frames).
    pub fn header(&self) -> Option<&FileHeader> {
        self.header.as_ref()
    }

    fn fill(&mut self) -> Result<bool, FramingError> {
        if self.eof {
            return Ok(false);
        }
        let n = self.scanner.fill_from(&mut self.inner, 256 << 10)?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    fn start(&mut self) -> Result<(), FramingError> {
        self.started = true;
        loop {
            let rest = &self.scanner.buf[self.scanner.pos..];
            if rest.len() >= FILE_MAGIC.len() || self.eof {
                if !rest.starts_with(&FILE_MAGIC) {
                    return Ok(());
                }
                match FileHeader::decode(rest)? {
                    Some((h, n)) => {
                        self.scanner.set_salt(h.first_seq);
                        self.header = Some(h);
                        self.scanner.pos += n;
                        return Ok(());
                    }
                    None if self.eof => {
                        return Err(FramingError::BadHeader("file ends inside the header"))
                    }
                    None => {}
                }
            }
            self.fill()?;
        }
    }

    /// The next event, `Ok(None)` at the end of the stream.
    pub fn next_event(&mut self) -> Result<Option<pb::Event>, FramingError> {
        if self.failed {
            return Ok(None);
        }
        if !self.started {
            if let Err(e) = self.start() {
                self.failed = true;
                return Err(e);
            }
        }
        loop {
            match self.scanner.next_item() {
                Some(Scanned::Event { event, .. }) => return Ok(Some(event)),
                Some(Scanned::Skipped {
                    offset,
                    len,
                    reason,
                }) => {
                    return Err(FramingError::Corrupt {
                        offset,
                        len,
                        reason,
                    })
                }
                // What follows an end marker is older data, never events.
                None if self.scanner.at_end_marker() => return Ok(None),
                None => {
                    if !self.fill()? {
                        return match self.scanner.finish() {
                            Some(e) => Err(e),
                            None => Ok(None),
                        };
                    }
                }
            }
        }
    }
}

impl<R: Read> Iterator for EventReader<R> {
    type Item = Result<pb::Event, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// Extension of capture segment files in a spool directory.
pub const SEGMENT_EXTENSION: &str = "events";

/// Reads a capture: one file, or a directory of segment files (`*.events`,
/// read in name order, which is the order of their first `seq`).
pub fn open_capture(path: &std::path::Path) -> io::Result<CaptureReader> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == SEGMENT_EXTENSION) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    files.reverse();
    Ok(CaptureReader {
        rest: files,
        current: None,
    })
}

/// The events of a capture's files, one file after the other. Damaged
/// frames come out as errors and reading goes on after them.
pub struct CaptureReader {
    /// Still to read, last first.
    rest: Vec<std::path::PathBuf>,
    current: Option<EventReader<std::fs::File>>,
}

impl Iterator for CaptureReader {
    type Item = Result<pb::Event, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = &mut self.current {
                match r.next_event() {
                    Ok(None) => self.current = None,
                    other => return other.transpose(),
                }
            }
            let path = self.rest.pop()?;
            match std::fs::File::open(&path) {
                Ok(f) => self.current = Some(EventReader::new(f)),
                // A live spool recycled the segment since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> pb::Event {
        pb::Event {
            instance_id: "vm-1".into(),
            seq,
            wall_time_ns: 1,
            mono_time_ns: 2,
            epoch: 4,
            payload: Some(pb::event::Payload::Net(pb::NetFrame {
                device: "net0".into(),
                queue: 0,
                direction: pb::Direction::Rx as i32,
                frame: vec![0xab; 60],
            })),
        }
    }

    fn header() -> Vec<u8> {
        let mut out = Vec::new();
        FileHeader {
            epoch: 9,
            first_seq: 0,
            instance_id: "vm-1".into(),
        }
        .encode(&mut out)
        .unwrap();
        out
    }

    #[test]
    fn round_trip_with_and_without_header() {
        let mut out = header();
        let mut buf = Vec::new();
        for seq in 1..=3 {
            write_event(&mut out, &event(seq), &mut buf).unwrap();
        }
        let mut r = EventReader::new(out.as_slice());
        let got: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![event(1), event(2), event(3)]);
        assert_eq!(r.header().unwrap().epoch, 9);
        let bare = &out[header().len()..];
        let got: Vec<_> = EventReader::new(bare).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn header_checks() {
        let h = header();
        let (got, n) = FileHeader::decode(&h).unwrap().unwrap();
        assert_eq!((got.epoch, got.first_seq, n), (9, 0, h.len()));
        assert!(FileHeader::decode(&h[..h.len() - 1]).unwrap().is_none());
        let mut bad = h.clone();
        bad[14] ^= 1;
        assert!(matches!(
            FileHeader::decode(&bad),
            Err(FramingError::BadHeader(_))
        ));
        let mut v = h.clone();
        v[8] = 1;
        assert!(matches!(
            FileHeader::decode(&v),
            Err(FramingError::Version(1))
        ));
        assert!(matches!(
            FileHeader::decode(b"hello world, not a capture"),
            Err(FramingError::NotACapture)
        ));
    }

    #[test]
    fn a_split_block_frame_decodes_like_a_whole_one() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let whole = pb::Event {
            instance_id: "vm-7".into(),
            seq: 42,
            wall_time_ns: 1_700_000_000_000_000_000,
            mono_time_ns: 5,
            epoch: 2,
            payload: Some(pb::event::Payload::Block(pb::BlockIo {
                device: "vda".into(),
                queue: 1,
                op: pb::BlockOp::Write as i32,
                sector: 2048,
                len: data.len() as u32,
                data: data.clone(),
                status: pb::BlockStatus::Ok as i32,
                ..Default::default()
            })),
        };
        let mut head_only = whole.clone();
        if let Some(pb::event::Payload::Block(b)) = &mut head_only.payload {
            b.data.clear();
        }
        let mut frame = Vec::new();
        encode_block_frame_head(&head_only, &data, &mut frame).unwrap();
        frame.extend_from_slice(&data);
        let got: Vec<_> = EventReader::new(frame.as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, vec![whole.clone()]);
        // Refused: data already inside, or not a block event.
        assert!(encode_block_frame_head(&whole, &[1], &mut frame).is_err());
        assert!(encode_block_frame_head(&event(1), &[1], &mut frame).is_err());
        assert!(encode_block_frame_head(&head_only, &vec![0; MAX_FRAME_LEN], &mut frame).is_err());
        // A payload CRC computed beforehand, in chunks, gives the same head;
        // a wrong one gives a frame the reader rejects.
        let mut salted = Vec::new();
        encode_block_frame_head_salted(&head_only, &data, 77, &mut salted).unwrap();
        let mut h = crc32fast::Hasher::new();
        for chunk in data.chunks(1000) {
            h.update(chunk);
        }
        let mut with_crc = Vec::new();
        encode_block_frame_head_with_crc(&head_only, data.len(), h.finalize(), 77, &mut with_crc)
            .unwrap();
        assert_eq!(with_crc, salted);
        let bad_crc = crc32fast::hash(&data) ^ 1;
        encode_block_frame_head_with_crc(&head_only, data.len(), bad_crc, 0, &mut frame).unwrap();
        frame.extend_from_slice(&data);
        assert!(EventReader::new(frame.as_slice()).next().unwrap().is_err());
    }

    #[test]
    fn a_corrupt_frame_is_reported_and_skipped() {
        let mut out = header();
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=4 {
            starts.push(out.len());
            write_event(&mut out, &event(seq), &mut buf).unwrap();
        }
        // Flip a payload bit of frame 2 and smash the magic of frame 3.
        out[starts[1] + 20] ^= 0x10;
        out[starts[2]] = b'X';
        let items: Vec<_> = EventReader::new(out.as_slice()).collect();
        let seqs: Vec<u64> = items
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, [1, 4], "damaged frames are never decoded");
        let skipped: Vec<(u64, u64)> = items
            .iter()
            .filter_map(|r| match r {
                Err(FramingError::Corrupt { offset, len, .. }) => Some((*offset, *len)),
                _ => None,
            })
            .collect();
        // Both damaged frames are covered by the skipped ranges.
        let total: u64 = skipped.iter().map(|s| s.1).sum();
        assert_eq!(skipped[0].0, starts[1] as u64);
        assert_eq!(total, (starts[3] - starts[1]) as u64);
    }

    #[test]
    fn a_torn_tail_is_reported() {
        let mut out = header();
        write_event(&mut out, &event(1), &mut Vec::new()).unwrap();
        let full = out.len();
        write_event(&mut out, &event(2), &mut Vec::new()).unwrap();
        out.truncate(full + 30);
        let items: Vec<_> = EventReader::new(out.as_slice()).collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap().seq, 1);
        assert!(matches!(
            items[1],
            Err(FramingError::Truncated { offset, len: 30 }) if offset == full as u64
        ));
    }

    #[test]
    fn frames_of_another_salt_and_data_after_an_end_marker_are_never_events() {
        // A reused segment: a new header (salt 40), one new frame, the end
        // marker, then the frames of the file's earlier life (salt 7).
        let mut out = Vec::new();
        FileHeader {
            epoch: 2,
            first_seq: 40,
            instance_id: "vm-1".into(),
        }
        .encode(&mut out)
        .unwrap();
        encode_frame_salted(&event(40), 40, &mut out).unwrap();
        let end = out.len();
        let mut stale = Vec::new();
        for seq in 7..10 {
            encode_frame_salted(&event(seq), 7, &mut stale).unwrap();
        }
        out.extend_from_slice(&stale);
        // Without the marker the stale frames fail their CRC.
        let items: Vec<_> = EventReader::new(out.as_slice()).collect();
        assert_eq!(items[0].as_ref().unwrap().seq, 40);
        assert!(items[1..].iter().all(|r| r.is_err()), "{items:?}");
        // With it, reading stops there.
        out[end..end + 4].copy_from_slice(&END_MARKER);
        let got: Vec<_> = EventReader::new(out.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(got, vec![event(40)]);
    }

    #[test]
    fn oversized_and_garbage_are_skipped() {
        let mut huge = FRAME_MAGIC.to_vec();
        huge.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            EventReader::new(&huge[..]).next_event(),
            Err(FramingError::Corrupt { offset: 0, .. })
        ));
        // A checked frame whose payload is not an event.
        let mut frame = Vec::new();
        let payload = [0xffu8, 0xff, 0xff];
        let mut head = [0u8; FRAME_HEAD_LEN];
        frame_head(0, &payload, &[], &mut head).unwrap();
        frame.extend_from_slice(&head);
        frame.extend_from_slice(&payload);
        assert!(matches!(
            EventReader::new(&frame[..]).next_event(),
            Err(FramingError::Corrupt { .. })
        ));
    }
}
