//! The capture path: device threads turn requests into [`pb::Event`] records
//! and hand them to the [`Tee`]; its sink thread writes them to a
//! [`CaptureSink`].
//!
//! - [`tee`]: the bounded queue, numbering, policies, GAP events, the FLUSH
//!   barrier ([`Tee::sync`]) and the restart record of a device.
//! - [`file`]: [`FileSink`], one capture file that a restarted backend
//!   appends to.
//! - [`replay`]: the replay clock, the live output stream of a clone and
//!   the comparison of its block requests with the original's records.
//! - [`spool`]: [`SpoolSink`], a rolling spool of segment files that
//!   recycles a segment only after the shipper committed past it, and the
//!   API the shipper uses ([`SpoolReader`], [`spool::commit`]).
//!
//! Both file formats are [`vmr_proto::framing`]: a file header, then
//! checksummed frames.

use std::sync::Mutex;

use vmr_proto::pb;

pub mod file;
pub mod replay;
pub mod spool;
pub mod tee;

pub use file::FileSink;
pub use spool::{Recycle, SpoolConfig, SpoolItem, SpoolPosition, SpoolReader, SpoolSink};
pub use tee::{DeviceState, PendingWrite, Tee, TeeConfig, DEFAULT_MAX_BYTES};

/// Errors of sinks and of the tee.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open capture {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("capture {path} is not a vmreplay capture (format 2); it is left untouched")]
    Foreign {
        path: String,
        #[source]
        source: vmr_proto::framing::FramingError,
    },
    #[error("sink write failed")]
    Io(#[from] std::io::Error),
    #[error("the spool is full: the shipper has not committed past its oldest segment")]
    Full,
    #[error("sink refused the batch: {0}")]
    Refused(String),
    #[error("cannot start the sink thread")]
    Spawn(#[source] std::io::Error),
    #[error("capture queue capacity must be positive")]
    ZeroCapacity,
    #[error("the capture did not become durable within {0:?}")]
    SyncTimeout(std::time::Duration),
    #[error("the capture could not be made durable")]
    SyncFailed,
}

impl CaptureError {
    /// Whether the error is the filesystem running out of space (ENOSPC,
    /// or EDQUOT for a quota).
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            Self::Io(e) => e,
            Self::Open { source, .. } => source,
            _ => return false,
        };
        matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}

/// A batch the sink did not write completely: the first `written` records
/// were written, the others not.
#[derive(Debug)]
pub struct SinkError {
    pub written: usize,
    pub error: CaptureError,
}

impl SinkError {
    /// Nothing of the batch was written.
    pub fn none(error: impl Into<CaptureError>) -> Self {
        Self {
            written: 0,
            error: error.into(),
        }
    }
}

/// Where records go. One sink thread calls it; implementations that are
/// shared between several tees must synchronise internally.
pub trait CaptureSink: Send + Sync {
    /// Writes a batch of records, in order. On error, reports how many
    /// records at the front were written; the tee turns the others into a
    /// GAP event.
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError>;
    /// Hands written records to the operating system (called when the queue
    /// runs empty).
    fn flush(&self) -> Result<(), CaptureError> {
        Ok(())
    }
    /// Makes every record written so far durable (`fsync`): called for a
    /// guest FLUSH and at shutdown.
    fn sync(&self) -> Result<(), CaptureError> {
        self.flush()
    }
}

/// One entry of the capture queue.
pub struct Record {
    pub(crate) event: pb::Event,
    /// Written even past the spool's size limit (small GAP events).
    pub(crate) force: bool,
    /// CRC-32 of a block payload, computed on the device thread chunk by
    /// chunk while it was copied (None: the sink computes it).
    pub(crate) data_crc: Option<u32>,
}

impl Record {
    /// A record holding `event`.
    pub fn new(event: pb::Event) -> Self {
        Self {
            event,
            force: false,
            data_crc: None,
        }
    }

    /// The event.
    pub fn event(&self) -> &pb::Event {
        &self.event
    }

    /// Whether a full spool still takes it (GAP events).
    pub fn force(&self) -> bool {
        self.force
    }
}

/// Keeps records in memory (for in-process replay comparison and tests).
#[derive(Default)]
pub struct MemorySink {
    events: Mutex<Vec<pb::Event>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }
    /// Takes the records accepted so far.
    pub fn take(&self) -> Vec<pb::Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// Number of records held.
    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CaptureSink for MemorySink {
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch.iter().map(|r| r.event.clone()));
        Ok(())
    }
}

/// What to do when the sink falls behind (the queue is full) or the spool is
/// full because shipping stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The device thread waits for room (the guest waits).
    Block,
    /// The record is dropped and a GAP event written later.
    Drop,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(Self::Block),
            "drop" => Ok(Self::Drop),
            other => Err(format!("unknown capture policy {other:?} (block|drop)")),
        }
    }
}

/// Hash used for the content of reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentHashKind {
    /// xxh3-128 (fast, default).
    #[default]
    Xxh3_128,
    /// SHA-256.
    Sha256,
}

/// Hashes `data` with `kind` into `out` (replacing its contents).
pub fn content_hash(kind: ContentHashKind, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match kind {
        ContentHashKind::Xxh3_128 => {
            out.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_be_bytes())
        }
        ContentHashKind::Sha256 => {
            use sha2::Digest;
            out.extend_from_slice(&sha2::Sha256::digest(data));
        }
    }
}

/// Frames waiting in memory before one write (small records are batched).
pub(crate) const PENDING_WRITE_BYTES: usize = 256 << 10;
/// Block payloads at least this large are written from the record's buffer
/// with `pwritev` instead of being copied into the pending frames.
pub(crate) const SPLIT_FRAME_MIN: usize = 32 << 10;

/// Appends `rec` as a frame: small records into `pending`; for a large
/// block payload, a frame head into `head` (replacing its contents), and the
/// payload, returned, which the caller writes right after `head`. `scratch`
/// is a reusable event for the head.
pub(crate) fn encode_record<'a>(
    rec: &'a Record,
    salt: u64,
    pending: &mut Vec<u8>,
    head: &mut Vec<u8>,
    scratch: &mut pb::Event,
) -> std::io::Result<Option<&'a [u8]>> {
    use vmr_proto::framing::{
        encode_block_frame_head_salted, encode_block_frame_head_with_crc, encode_frame_salted,
    };
    let ev = &rec.event;
    let Some(pb::event::Payload::Block(b)) = &ev.payload else {
        encode_frame_salted(ev, salt, pending)?;
        return Ok(None);
    };
    if b.data.len() < SPLIT_FRAME_MIN {
        encode_frame_salted(ev, salt, pending)?;
        return Ok(None);
    }
    // The head: every field but the payload, copied into reused buffers.
    scratch.instance_id.clear();
    scratch.instance_id.push_str(&ev.instance_id);
    scratch.seq = ev.seq;
    scratch.wall_time_ns = ev.wall_time_ns;
    scratch.mono_time_ns = ev.mono_time_ns;
    scratch.epoch = ev.epoch;
    let mut io = match scratch.payload.take() {
        Some(pb::event::Payload::Block(io)) => io,
        _ => pb::BlockIo::default(),
    };
    io.device.clear();
    io.device.push_str(&b.device);
    io.queue = b.queue;
    io.op = b.op;
    io.sector = b.sector;
    io.len = b.len;
    io.data.clear();
    io.content_hash.clear();
    io.content_hash.extend_from_slice(&b.content_hash);
    io.hash_algorithm = b.hash_algorithm;
    io.status = b.status;
    scratch.payload = Some(pb::event::Payload::Block(io));
    match rec.data_crc {
        // The payload was checksummed while it was copied: combined with
        // the head's CRC, without reading the payload again.
        Some(crc) => encode_block_frame_head_with_crc(scratch, b.data.len(), crc, salt, head)?,
        None => encode_block_frame_head_salted(scratch, &b.data, salt, head)?,
    }
    Ok(Some(&b.data))
}
