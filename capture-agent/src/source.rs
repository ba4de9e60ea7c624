//! Where the shipper reads records from: a [`RecordSource`], read in
//! batches and told how far the broker has acknowledged.
//!
//! [`SpoolSource`] reads a vhost-tap rolling spool with the spool's own
//! reader and commits through its commit file, so the spool recycles a
//! segment only after the shipper committed past it.

use std::path::{Path, PathBuf};

use vhost_tap::capture::spool::{self, SpoolError};
use vhost_tap::capture::{SpoolItem, SpoolReader};
use vmr_proto::pb;

pub use vhost_tap::capture::SpoolPosition as Position;

/// Errors of a record source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("spool directory {0} does not exist")]
    Missing(String),
}

/// One item read from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// An event and the position just after it.
    Event {
        event: pb::Event,
        position: Position,
    },
    /// Damaged bytes the framing layer skipped.
    Corrupt {
        segment: String,
        offset: u64,
        len: u64,
        reason: String,
    },
}

/// A durable, ordered source of events with a commit position.
pub trait RecordSource: Send {
    /// Appends up to `max` items to `out`; appends nothing when the reader
    /// has caught up with the writer (call again later).
    fn read_batch(&mut self, max: usize, out: &mut Vec<SourceItem>) -> Result<(), SourceError>;
    /// Reads from just after `position` on (`None`: from the oldest record).
    fn seek(&mut self, position: Option<&Position>) -> Result<(), SourceError>;
    /// The position committed last (`None`: nothing yet).
    fn committed(&self) -> Result<Option<Position>, SourceError>;
    /// Durably records that everything up to `position` is delivered; the
    /// source may then drop it.
    fn commit(&mut self, position: &Position) -> Result<(), SourceError>;
}

/// Whether `a` lies at or before `b` in the spool.
pub fn at_or_before(a: &Position, b: &Position) -> bool {
    (a.segment.as_str(), a.offset) <= (b.segment.as_str(), b.offset)
}

/// The later of two positions.
pub fn later(a: Option<Position>, b: Option<Position>) -> Option<Position> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if at_or_before(&a, &b) { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A vhost-tap rolling spool directory.
pub struct SpoolSource {
    dir: PathBuf,
    reader: SpoolReader,
}

impl SpoolSource {
    /// Opens the spool in `dir` at its committed position.
    pub fn open(dir: &Path) -> Result<Self, SourceError> {
        if !dir.is_dir() {
            return Err(SourceError::Missing(dir.display().to_string()));
        }
        Ok(Self {
            dir: dir.to_owned(),
            reader: SpoolReader::open(dir)?,
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl RecordSource for SpoolSource {
    fn read_batch(&mut self, max: usize, out: &mut Vec<SourceItem>) -> Result<(), SourceError> {
        for _ in 0..max {
            match self.reader.next_item()? {
                None => break,
                Some(SpoolItem::Event { event, position }) => {
                    out.push(SourceItem::Event { event, position })
                }
                Some(SpoolItem::Skipped {
                    segment,
                    offset,
                    len,
                    reason,
                }) => out.push(SourceItem::Corrupt {
                    segment,
                    offset,
                    len,
                    reason,
                }),
            }
        }
        Ok(())
    }

    fn seek(&mut self, position: Option<&Position>) -> Result<(), SourceError> {
        self.reader = SpoolReader::from_position(&self.dir, position);
        Ok(())
    }

    fn committed(&self) -> Result<Option<Position>, SourceError> {
        Ok(spool::read_committed(&self.dir)?)
    }

    fn commit(&mut self, position: &Position) -> Result<(), SourceError> {
        Ok(spool::commit(&self.dir, position)?)
    }
}
