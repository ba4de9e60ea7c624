//! The rolling spool: the durable hand-off between a backend and the
//! shipper that sends its records to Kafka.
//!
//! # Directory layout
//!
//! ```text
//! <dir>/<first seq, 20 digits>.events   segments: a file header, then frames
//! <dir>/committed                       the shipper's durable position (JSON)
//! <dir>/committed.tmp                   transient, while a commit is written
//! ```
//!
//! The writer ([`SpoolSink`]) starts a segment when the current one reaches
//! the segment size, naming it after the `seq` of its first record, and
//! writes the finished segment out completely *before* it creates the next
//! one: a reader that sees a newer segment knows the older ones are
//! complete. [`CaptureSink::sync`] (a guest FLUSH, shutdown) makes every
//! segment written since the last sync durable, and the directory. A
//! restarted writer starts a new segment and never writes into an earlier
//! one.
//!
//! # Hand-off
//!
//! The shipper reads with [`SpoolReader`] and, once the broker acknowledged
//! everything up to an event, calls [`commit`] with that event's
//! [`SpoolPosition`]: the file `committed` is replaced atomically (written to
//! `committed.tmp`, `fsync`, `rename`, `fsync` of the directory). A restarted
//! shipper resumes from [`read_committed`]. The position files are padded
//! to a fixed size and the replaced file is kept as the next
//! `committed.tmp`, so after the first commit a commit needs no new space
//! on the filesystem; [`SpoolSink::open`] leaves two spare ones
//! (`committed.spare`, `committed.spare2`) for the first two.
//!
//! The spool holds at most its capacity. When the writer needs a new segment
//! and the spool is full, it deletes the oldest segments that the committed
//! position has passed (with [`Recycle::Committed`]), or the oldest ones
//! whatever was committed (with [`Recycle::Oldest`], a flight recorder
//! without a shipper). If that frees too little, the batch fails with
//! [`CaptureError::Full`] and the tee applies its policy: `block` (the guest
//! waits until the shipper commits) or `drop` (a GAP event).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vmr_proto::framing::{FileHeader, FrameScanner, FramingError, Scanned, SEGMENT_EXTENSION};
use vmr_proto::pb;

use super::file::FrameWriter;
use super::{CaptureError, CaptureSink, Record, SinkError};

/// Name of the shipper's position file in a spool directory.
pub const COMMITTED_FILE: &str = "committed";
const COMMITTED_TMP: &str = "committed.tmp";
/// The replaced position file while a commit keeps it for the next one.
const COMMITTED_PREV: &str = "committed.prev";
/// Position files made by the writer for the shipper's first two commits
/// (after them, `committed` and `committed.tmp` take turns).
const COMMITTED_SPARES: [&str; 2] = ["committed.spare", "committed.spare2"];
/// Size of a position file: its JSON text padded with spaces.
const COMMITTED_LEN: usize = 512;

/// Errors of the shipper's side of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool i/o error on {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("committed position in {path} is unreadable: {reason}")]
    BadCommit { path: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which segments the writer may delete to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recycle {
    /// Only segments the committed position has passed.
    Committed,
    /// The oldest segments, committed or not (no shipper).
    Oldest,
}

impl std::str::FromStr for Recycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "committed" => Ok(Self::Committed),
            "oldest" => Ok(Self::Oldest),
            other => Err(format!("unknown recycle rule {other:?} (committed|oldest)")),
        }
    }
}

/// A place in the spool: just after the event with `seq`, which ends at
/// byte `offset` of `segment` (a file name in the spool directory).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolPosition {
    pub segment: String,
    pub offset: u64,
    pub seq: u64,
}

/// Reads the shipper's committed position (`None`: nothing committed yet).
pub fn read_committed(dir: &Path) -> Result<Option<SpoolPosition>, SpoolError> {
    let path = dir.join(COMMITTED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SpoolError::BadCommit {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// Durably records that everything up to `pos` has been shipped.
///
/// The text is padded with spaces to a fixed size and written over an
/// existing `committed.tmp` (the file the previous commit replaced, or the
/// writer's spare), so a commit on a full filesystem still succeeds.
pub fn commit(dir: &Path, pos: &SpoolPosition) -> Result<(), SpoolError> {
    let tmp = dir.join(COMMITTED_TMP);
    let path = dir.join(COMMITTED_FILE);
    let prev = dir.join(COMMITTED_PREV);
    let mut text = serde_json::to_string(pos).expect("a position always serialises");
    text.push('\n');
    while text.len() < COMMITTED_LEN {
        text.push(' ');
    }
    if !tmp.exists() {
        // A spare of the writer's (complete: it is renamed into place
        // whole).
        for spare in COMMITTED_SPARES {
            if std::fs::rename(dir.join(spare), &tmp).is_ok() {
                break;
            }
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all_at(text.as_bytes(), 0).map_err(io_err(&tmp))?;
    f.set_len(text.len() as u64).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    // Keep the file being replaced (its space) for the next commit.
    let _ = std::fs::remove_file(&prev);
    let kept = std::fs::hard_link(&path, &prev).is_ok();
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    if kept {
        let _ = std::fs::rename(&prev, &tmp);
    }
    Ok(())
}

/// Leaves position files for the shipper's first commits (each made under
/// a temporary name and renamed whole), unless `committed` and
/// `committed.tmp` are both there.
fn prepare_commit_spares(dir: &Path) -> io::Result<()> {
    if dir.join(COMMITTED_FILE).exists() && dir.join(COMMITTED_TMP).exists() {
        return Ok(());
    }
    for spare in COMMITTED_SPARES {
        let path = dir.join(spare);
        if path.exists() {
            continue;
        }
        let new = dir.join(format!("{spare}.new"));
        let f = File::create(&new)?;
        f.write_all_at(&[b' '; COMMITTED_LEN], 0)?;
        f.sync_all()?;
        std::fs::rename(&new, &path)?;
    }
    Ok(())
}

/// Segment file names in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if Path::new(name)
            .extension()
            .is_some_and(|e| e == SEGMENT_EXTENSION)
        {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Settings of a [`SpoolSink`].
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The spool directory (created if missing).
    pub dir: PathBuf,
    /// A new segment starts once the current one holds this many bytes.
    pub segment_bytes: u64,
    /// The spool never grows past this many bytes with new segments (a
    /// GAP event may still be appended to a full one).
    pub capacity_bytes: u64,
    /// Which segments may be deleted to make room.
    pub recycle: Recycle,
    /// Written into every segment header.
    pub instance_id: String,
    /// Written into every segment header.
    pub epoch: u64,
}

struct SpoolState {
    cfg: SpoolConfig,
    /// Finished segments, oldest first, with their sizes.
    closed: VecDeque<(String, u64)>,
    current: Option<(String, FrameWriter)>,
    /// The current segment was started past the capacity (for a GAP event):
    /// other records still need room.
    over: bool,
    /// Finished segments not yet made durable (dropped when deleted, so
    /// their pages go with them).
    unsynced: Vec<(String, File)>,
    /// Segments were created or deleted since the directory was synced.
    dir_dirty: bool,
    /// A recycled segment kept to be overwritten as the next one (its
    /// pages are usually still cached, which makes writing it cheap).
    free: Option<String>,
    /// Zero-filled spare files made at start, used before new files.
    spares: Vec<String>,
}

/// Extension of the zero-filled spare files a spool makes at start.
pub const SPARE_EXTENSION: &str = "spare";

/// Space a segment file keeps allocated past the segment size, for the
/// frame that crosses it (the largest block request, 4 MiB by default, and
/// its frame head), but at most the segment size again. Frames inside the
/// reserved space never need new space from the filesystem, so a
/// filesystem that fills up under a running spool does not fail them; a
/// frame past it (a record larger than the slack) can, and then gets the
/// tee's policy (wait, or drop with a GAP).
pub const SEGMENT_SLACK: u64 = (4 << 20) + (64 << 10);

/// Bytes each segment file keeps allocated.
fn reserved(cfg: &SpoolConfig) -> u64 {
    cfg.segment_bytes + SEGMENT_SLACK.min(cfg.segment_bytes)
}

/// Makes sure the spool directory holds enough segment-sized files for its
/// capacity (segments plus zero-filled spares), so capture overwrites files
/// that exist instead of growing new ones, and the space is reserved before
/// capture starts.
fn prepare_spares(cfg: &SpoolConfig, segments: usize) -> io::Result<Vec<String>> {
    let mut spares = Vec::new();
    for entry in std::fs::read_dir(&cfg.dir)? {
        let name = entry?.file_name();
        if let Some(n) = name.to_str() {
            if Path::new(n)
                .extension()
                .is_some_and(|e| e == SPARE_EXTENSION)
            {
                spares.push(n.to_owned());
            }
        }
    }
    spares.sort();
    for name in &spares {
        let f = OpenOptions::new().write(true).open(cfg.dir.join(name))?;
        super::file::reserve(&f, reserved(cfg))?;
    }
    let want = cfg.capacity_bytes.div_ceil(cfg.segment_bytes) as usize + 1;
    let have = segments + spares.len();
    if have >= want {
        return Ok(spares);
    }
    let zeros = vec![0u8; cfg.segment_bytes.min(1 << 20) as usize];
    let start = std::time::Instant::now();
    for i in have..want {
        let name = format!("{i:08}.{SPARE_EXTENSION}");
        let file = File::create(cfg.dir.join(&name))?;
        let mut at = 0;
        while at < cfg.segment_bytes {
            let n = (cfg.segment_bytes - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        super::file::reserve(&file, reserved(cfg))?;
        spares.push(name);
    }
    tracing::info!(
        files = want - have,
        mib = ((want - have) as u64 * cfg.segment_bytes) >> 20,
        ms = start.elapsed().as_millis() as u64,
        dir = %cfg.dir.display(),
        "preallocated capture segments"
    );
    Ok(spares)
}

/// The writing side of a rolling spool (see the module documentation).
pub struct SpoolSink {
    inner: Mutex<SpoolState>,
}

impl SpoolSink {
    /// Opens the spool in `cfg.dir`; segments already there count towards
    /// the capacity and are never written again.
    pub fn open(mut cfg: SpoolConfig) -> Result<Self, CaptureError> {
        let open_err = |source| CaptureError::Open {
            path: cfg.dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&cfg.dir).map_err(open_err)?;
        cfg.segment_bytes = cfg.segment_bytes.max(1);
        cfg.capacity_bytes = cfg.capacity_bytes.max(cfg.segment_bytes);
        let mut closed = VecDeque::new();
        for name in list_segments(&cfg.dir).map_err(open_err)? {
            let size = std::fs::metadata(cfg.dir.join(&name))
                .map_err(open_err)?
                .len();
            closed.push_back((name, size));
        }
        let spares = prepare_spares(&cfg, closed.len()).map_err(open_err)?;
        prepare_commit_spares(&cfg.dir).map_err(open_err)?;
        Ok(Self {
            inner: Mutex::new(SpoolState {
                cfg,
                closed,
                current: None,
                over: false,
                unsynced: Vec::new(),
                dir_dirty: false,
                free: None,
                spares,
            }),
        })
    }

    /// Bytes held by all segments.
    pub fn total_bytes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total()
    }
}

impl SpoolState {
    fn total(&self) -> u64 {
        self.closed.iter().map(|(_, n)| n).sum::<u64>()
            + self.current.as_ref().map_or(0, |(_, w)| w.len())
    }

    /// Whether `name` (of `size` bytes) lies before the committed position.
    fn shipped(committed: Option<&SpoolPosition>, name: &str, size: u64) -> bool {
        committed
            .is_some_and(|c| c.segment.as_str() > name || (c.segment == name && c.offset >= size))
    }

    /// Deletes the oldest segments that may go until `need` more bytes fit.
    fn recycle(&mut self, need: u64) {
        let committed = match self.cfg.recycle {
            Recycle::Oldest => None,
            Recycle::Committed => match read_committed(&self.cfg.dir) {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the committed position; nothing recycled");
                    return;
                }
            },
        };
        while self.total() + need > self.cfg.capacity_bytes {
            let Some((name, size)) = self.closed.front() else {
                break;
            };
            if self.cfg.recycle == Recycle::Committed
                && !Self::shipped(committed.as_ref(), name, *size)
            {
                break;
            }
            if self.free.is_some() {
                let path = self.cfg.dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "cannot delete a capture segment");
                        break;
                    }
                }
            }
            let (name, _) = self.closed.pop_front().expect("checked above");
            if self.free.is_none() {
                self.free = Some(name.clone());
            }
            self.unsynced.retain(|(n, _)| *n != name);
            self.dir_dirty = true;
        }
    }

    /// Makes sure a segment can take the record `seq`; returns whether the
    /// previous segment was finished (its frames are then all written).
    fn ensure_room(&mut self, seq: u64, force: bool) -> Result<bool, CaptureError> {
        if let Some((_, w)) = &self.current {
            if force || (w.len() < self.cfg.segment_bytes && !self.over) {
                return Ok(false);
            }
        }
        let seg = self.cfg.segment_bytes;
        // The current segment becomes a closed one of its present size.
        self.recycle(seg);
        let over = self.total() + seg > self.cfg.capacity_bytes;
        if over && !(force && self.current.is_none()) {
            return Err(CaptureError::Full);
        }
        let rolled = self.current.is_some();
        if let Some((name, mut w)) = self.current.take() {
            if let Err(e) = w.write_out() {
                self.current = Some((name, w));
                return Err(e.into());
            }
            if let Err(e) = w.cut_stale() {
                self.current = Some((name, w));
                return Err(e.into());
            }
            let size = w.len();
            self.unsynced.push((name.clone(), w.file));
            self.closed.push_back((name, size));
        }
        let name = format!("{seq:020}.{SEGMENT_EXTENSION}");
        let path = self.cfg.dir.join(&name);
        let header = FileHeader {
            epoch: self.cfg.epoch,
            first_seq: seq,
            instance_id: self.cfg.instance_id.clone(),
        };
        self.dir_dirty = true;
        let reserve = reserved(&self.cfg);
        let mut w = match self.free.take().or_else(|| self.spares.pop()) {
            Some(old) => match Self::reuse(&self.cfg.dir.join(&old), &path, &header) {
                Ok(w) => w,
                Err(error) => {
                    tracing::warn!(%error, segment = %old, "cannot reuse a capture segment; creating one");
                    let _ = std::fs::remove_file(self.cfg.dir.join(&old));
                    Self::create(&path, &header, reserve)?
                }
            },
            None => Self::create(&path, &header, reserve)?,
        };
        w.reserve = reserve;
        self.current = Some((name, w));
        self.over = over;
        Ok(rolled)
    }
}

impl SpoolState {
    /// A new segment file at `path`.
    fn create(path: &Path, header: &FileHeader, reserve: u64) -> Result<FrameWriter, CaptureError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| CaptureError::Open {
                path: path.display().to_string(),
                source,
            })?;
        if let Err(error) = super::file::reserve(&file, reserve) {
            // Frames may then fail for lack of space; the tee applies its
            // policy to them.
            tracing::warn!(%error, path = %path.display(), "cannot reserve space for a new capture segment");
        }
        let mut w = FrameWriter::new(file, 0);
        w.salt = header.first_seq;
        if let Err(e) = w.write_header(header) {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
        Ok(w)
    }

    /// Turns the recycled segment `old` into the new segment `path`: the new
    /// header and an end marker are written over its start *before* it gets
    /// its new name, so no reader ever sees its older frames under that
    /// name (and they fail the CRC under the new salt anyway).
    fn reuse(old: &Path, path: &Path, header: &FileHeader) -> io::Result<FrameWriter> {
        let file = OpenOptions::new().read(true).write(true).open(old)?;
        let stale = file.metadata()?.len();
        let mut w = FrameWriter::new(file, 0);
        w.salt = header.first_seq;
        w.stale_end = stale;
        w.write_header(header)?;
        if w.size < stale {
            w.file
                .write_all_at(&vmr_proto::framing::END_MARKER, w.size)?;
        }
        std::fs::rename(old, path)?;
        Ok(w)
    }
}

impl CaptureSink for SpoolSink {
    fn submit(&self, batch: &[Record]) -> Result<(), SinkError> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut written = 0;
        for (i, r) in batch.iter().enumerate() {
            match st.ensure_room(r.event.seq, r.force) {
                Ok(true) => written = i,
                Ok(false) => {}
                Err(error) => {
                    // Frames buffered in the current segment still go out.
                    if let Some((_, w)) = &mut st.current {
                        if w.write_out().is_ok() {
                            written = i;
                        }
                    }
                    return Err(SinkError { written, error });
                }
            }
            let (_, w) = st.current.as_mut().expect("ensure_room opened a segment");
            match w.push(r) {
                Ok(true) => written = i + 1,
                Ok(false) => {}
                Err((before, e)) => {
                    return Err(SinkError {
                        written: if before { i } else { written },
                        error: e.into(),
                    })
                }
            }
        }
        if let Some((_, w)) = &mut st.current {
            w.write_out().map_err(|e| SinkError {
                written,
                error: e.into(),
            })?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), CaptureError> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, w)) = &mut st.current {
            w.write_out()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), CaptureError> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((_, f)) = st.unsynced.last() {
            f.sync_data()?;
            st.unsynced.pop();
        }
        if let Some((_, w)) = &mut st.current {
            w.sync()?;
        }
        if st.dir_dirty {
            File::open(&st.cfg.dir)?.sync_all()?;
            st.dir_dirty = false;
        }
        Ok(())
    }
}

/// What a [`SpoolReader`] found next.
#[derive(Debug)]
pub enum SpoolItem {
    /// An event; commit `position` once it is shipped.
    Event {
        event: pb::Event,
        position: SpoolPosition,
    },
    /// Damaged bytes that were skipped (never decoded as events).
    Skipped {
        segment: String,
        offset: u64,
        len: u64,
        reason: String,
    },
}

enum Resume {
    /// At byte `offset` of `segment` (0: its start).
    At(String, u64),
    /// At the start of the first segment after this one.
    After(String),
    /// At the oldest segment.
    Oldest,
}

struct Cur {
    name: String,
    file: File,
    scanner: FrameScanner,
    read_at: u64,
    salt: u64,
}

impl Cur {
    /// Forgets what was read from `offset` on: it will be read again.
    fn rewind(&mut self, offset: u64) {
        self.scanner = FrameScanner::at(offset);
        self.scanner.set_salt(self.salt);
        self.read_at = offset;
    }
}

/// The shipper's reader: every event of the spool, in order, from a
/// position on; it follows a live writer.
pub struct SpoolReader {
    dir: PathBuf,
    resume: Resume,
    cur: Option<Cur>,
    chunk: Vec<u8>,
}

impl SpoolReader {
    /// A reader from the committed position (or the oldest segment).
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        let pos = read_committed(dir)?;
        Ok(Self::from_position(dir, pos.as_ref()))
    }

    /// A reader from `pos` (`None`: the oldest segment).
    pub fn from_position(dir: &Path, pos: Option<&SpoolPosition>) -> Self {
        Self {
            dir: dir.to_owned(),
            resume: match pos {
                Some(p) => Resume::At(p.segment.clone(), p.offset),
                None => Resume::Oldest,
            },
            cur: None,
            chunk: vec![0; 256 << 10],
        }
    }

    /// Opens the segment to read next; `Ok(None)`: there is none yet.
    fn open_next(&mut self) -> Result<Option<SpoolItem>, SpoolError> {
        let segs = list_segments(&self.dir).map_err(io_err(&self.dir))?;
        let (name, offset) = match &self.resume {
            Resume::Oldest => match segs.first() {
                Some(s) => (s.clone(), 0),
                None => return Ok(None),
            },
            Resume::At(seg, off) => match segs.iter().find(|s| *s >= seg) {
                Some(s) if s == seg => (s.clone(), *off),
                Some(s) => (s.clone(), 0),
                None => return Ok(None),
            },
            Resume::After(seg) => match segs.iter().find(|s| *s > seg) {
                Some(s) => (s.clone(), 0),
                None => return Ok(None),
            },
        };
        let newer = segs.iter().any(|s| *s > name);
        let path = self.dir.join(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.resume = Resume::After(name);
                return self.open_next();
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut head = [0u8; 256];
        let n = file.read_at(&mut head, 0).map_err(io_err(&path))?;
        let skip_all = |reason: String| -> Result<Option<SpoolItem>, SpoolError> {
            let len = file.metadata().map_err(io_err(&path))?.len();
            Ok(Some(SpoolItem::Skipped {
                segment: name.clone(),
                offset: 0,
                len,
                reason,
            }))
        };
        let salt;
        let start = match FileHeader::decode(&head[..n]) {
            Ok(Some((h, hlen))) => {
                salt = h.first_seq;
                offset.max(hlen as u64)
            }
            Ok(None) if !newer => return Ok(None),
            Ok(None) => {
                let item = skip_all("segment ends inside its header".into());
                self.resume = Resume::After(name);
                return item;
            }
            Err(e) => {
                let item = skip_all(e.to_string());
                self.resume = Resume::After(name);
                return item;
            }
        };
        let mut cur = Cur {
            name,
            file,
            scanner: FrameScanner::at(0),
            read_at: 0,
            salt,
        };
        cur.rewind(start);
        self.cur = Some(cur);
        Ok(None)
    }

    /// Reads more of the current segment; returns the bytes read.
    fn read_more(&mut self) -> Result<usize, SpoolError> {
        let cur = self.cur.as_mut().expect("a segment is open");
        let n = cur
            .file
            .read_at(&mut self.chunk, cur.read_at)
            .map_err(io_err(&self.dir.join(&cur.name)))?;
        cur.scanner.feed(&self.chunk[..n]);
        cur.read_at += n as u64;
        Ok(n)
    }

    /// The next item; `Ok(None)` when the reader has caught up with the
    /// writer (call again later).
    pub fn next_item(&mut self) -> Result<Option<SpoolItem>, SpoolError> {
        let mut at_eof_checked = false;
        let mut damage_checked = false;
        loop {
            if self.cur.is_none() {
                if let Some(item) = self.open_next()? {
                    return Ok(Some(item));
                }
                if self.cur.is_none() {
                    return Ok(None);
                }
            }
            let cur = self.cur.as_mut().expect("opened above");
            match cur.scanner.next_item() {
                Some(Scanned::Event { event, end, .. }) => {
                    let position = SpoolPosition {
                        segment: cur.name.clone(),
                        offset: end,
                        seq: event.seq,
                    };
                    self.resume = Resume::At(cur.name.clone(), end);
                    return Ok(Some(SpoolItem::Event { event, position }));
                }
                Some(Scanned::Skipped {
                    offset,
                    len,
                    reason,
                }) => {
                    let name = cur.name.clone();
                    let segs = list_segments(&self.dir).map_err(io_err(&self.dir))?;
                    let cur = self.cur.as_mut().expect("open");
                    if !segs.iter().any(|s| *s > name) {
                        // The live segment: the writer may be in the middle
                        // of this frame. Read it again later; it is reported
                        // once the segment is finished if it stays damaged.
                        cur.rewind(offset);
                        return Ok(None);
                    }
                    if !damage_checked {
                        // The writer may have finished the frame and the
                        // segment between the read and the listing: read it
                        // once more, now that the segment is complete.
                        damage_checked = true;
                        cur.rewind(offset);
                        continue;
                    }
                    self.resume = Resume::At(cur.name.clone(), offset + len);
                    return Ok(Some(SpoolItem::Skipped {
                        segment: cur.name.clone(),
                        offset,
                        len,
                        reason: reason.into(),
                    }));
                }
                None => {}
            }
            let at_marker = cur.scanner.at_end_marker();
            if at_marker {
                // The data written so far ends here; what follows is older.
                let offset = cur.scanner.offset();
                cur.rewind(offset);
            } else if self.read_more()? > 0 {
                continue;
            }
            // At the end of the file: a newer segment means this one is
            // complete (the writer finishes a segment before it starts the
            // next), so read once more and then move on.
            let name = self.cur.as_ref().expect("open").name.clone();
            let segs = list_segments(&self.dir).map_err(io_err(&self.dir))?;
            if !segs.iter().any(|s| *s > name) {
                return Ok(None);
            }
            if !at_eof_checked {
                at_eof_checked = true;
                continue;
            }
            let cur = self.cur.take().expect("open");
            let mut scanner = cur.scanner;
            self.resume = Resume::After(name.clone());
            if at_marker {
                at_eof_checked = false;
                continue;
            }
            if let Some(FramingError::Truncated { offset, len }) = scanner.finish() {
                return Ok(Some(SpoolItem::Skipped {
                    segment: name,
                    offset,
                    len,
                    reason: "torn frame at the end of a segment".into(),
                }));
            }
            at_eof_checked = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn rec(seq: u64, len: usize) -> Record {
        Record::new(pb::Event {
            instance_id: "vm-1".into(),
            seq,
            epoch: 1,
            payload: Some(pb::event::Payload::Net(pb::NetFrame {
                device: "net0".into(),
                frame: vec![seq as u8; len],
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    fn config(dir: &Path, segment: u64, capacity: u64, recycle: Recycle) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            segment_bytes: segment,
            capacity_bytes: capacity,
            recycle,
            instance_id: "vm-1".into(),
            epoch: 1,
        }
    }

    /// Reads everything available: the seqs and the number of skip reports.
    fn drain(r: &mut SpoolReader) -> (Vec<u64>, Vec<SpoolItem>, Option<SpoolPosition>) {
        let mut seqs = Vec::new();
        let mut skipped = Vec::new();
        let mut last = None;
        while let Some(item) = r.next_item().unwrap() {
            match item {
                SpoolItem::Event { event, position } => {
                    seqs.push(event.seq);
                    last = Some(position);
                }
                s @ SpoolItem::Skipped { .. } => skipped.push(s),
            }
        }
        (seqs, skipped, last)
    }

    #[test]
    fn recycling_waits_for_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of about 4 records, room for 3 segments.
        let sink =
            SpoolSink::open(config(dir.path(), 4 * 120, 3 * 4 * 120, Recycle::Committed)).unwrap();
        let mut seq = 1;
        let mut full_at = None;
        while seq < 100 {
            match sink.submit(&[rec(seq, 100)]) {
                Ok(()) => seq += 1,
                Err(e) => {
                    assert!(matches!(e.error, CaptureError::Full), "{:?}", e.error);
                    assert_eq!(e.written, 0);
                    full_at = Some(seq);
                    break;
                }
            }
        }
        let full_at = full_at.expect("an unshipped spool fills up");
        assert!(sink.total_bytes() <= 3 * 4 * 120 + 200);
        // The reader ships the first segment only.
        let mut r = SpoolReader::open(dir.path()).unwrap();
        let (seqs, skipped, _) = drain(&mut r);
        assert!(skipped.is_empty());
        assert_eq!(seqs, (1..full_at).collect::<Vec<_>>());
        let first = list_segments(dir.path()).unwrap()[0].clone();
        let mut r = SpoolReader::open(dir.path()).unwrap();
        let mut last_in_first = None;
        while let Some(SpoolItem::Event { position, .. }) = r.next_item().unwrap() {
            if position.segment != first {
                break;
            }
            last_in_first = Some(position);
        }
        let pos = last_in_first.unwrap();
        commit(dir.path(), &pos).unwrap();
        assert_eq!(read_committed(dir.path()).unwrap().as_ref(), Some(&pos));
        // Now there is room, and only the shipped segment went.
        sink.submit(&[rec(full_at, 100)]).unwrap();
        let names = list_segments(dir.path()).unwrap();
        assert!(!names.contains(&first), "{names:?}");
        let mut r = SpoolReader::open(dir.path()).unwrap();
        let (seqs, _, _) = drain(&mut r);
        assert_eq!(seqs, (pos.seq + 1..=full_at).collect::<Vec<_>>());
    }

    #[test]
    fn oldest_recycling_needs_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let sink =
            SpoolSink::open(config(dir.path(), 4 * 120, 3 * 4 * 120, Recycle::Oldest)).unwrap();
        for seq in 1..=200 {
            sink.submit(&[rec(seq, 100)]).unwrap();
        }
        assert!(list_segments(dir.path()).unwrap().len() <= 3);
        let (seqs, skipped, _) = drain(&mut SpoolReader::open(dir.path()).unwrap());
        assert!(skipped.is_empty());
        assert_eq!(*seqs.last().unwrap(), 200);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn a_crashed_writer_leaves_a_torn_segment_that_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20, 16 << 20, Recycle::Committed);
        let sink = SpoolSink::open(cfg.clone()).unwrap();
        for seq in 1..=10 {
            sink.submit(&[rec(seq, 100)]).unwrap();
        }
        drop(sink);
        // The crash cut the last frame short.
        let (_, _, last) = drain(&mut SpoolReader::open(dir.path()).unwrap());
        let end = last.unwrap().offset;
        let seg = dir.path().join(&list_segments(dir.path()).unwrap()[0]);
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(end - 30)
            .unwrap();
        let before = std::fs::read(&seg).unwrap();
        // The restarted writer starts a new segment and leaves the old one.
        let sink = SpoolSink::open(SpoolConfig { epoch: 2, ..cfg }).unwrap();
        for seq in 11..=12 {
            sink.submit(&[rec(seq, 100)]).unwrap();
        }
        sink.sync().unwrap();
        assert_eq!(std::fs::read(&seg).unwrap(), before, "never rewritten");
        assert_eq!(list_segments(dir.path()).unwrap().len(), 2);
        let (seqs, skipped, _) = drain(&mut SpoolReader::open(dir.path()).unwrap());
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        let SpoolItem::Skipped { len, reason, .. } = &skipped[0] else {
            unreachable!()
        };
        assert!(reason.contains("torn"), "{reason}");
        assert!(*len > 0);
        // A flipped bit inside a frame is caught by its CRC.
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();
        let (seqs, skipped, _) = drain(&mut SpoolReader::open(dir.path()).unwrap());
        assert_eq!(seqs.len(), 10, "one damaged frame lost: {seqs:?}");
        assert_eq!(skipped.len(), 2);
    }

    #[test]
    fn a_reader_follows_a_live_writer_and_commits_let_it_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let sink = std::sync::Arc::new(
            SpoolSink::open(config(dir.path(), 8 << 10, 64 << 10, Recycle::Committed)).unwrap(),
        );
        const N: u64 = 3000;
        let full_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let sink = sink.clone();
            let full_seen = full_seen.clone();
            std::thread::spawn(move || {
                let mut full = 0u32;
                let mut seq = 1;
                let deadline = Instant::now() + Duration::from_secs(60);
                while seq <= N {
                    assert!(Instant::now() < deadline, "writer stuck at {seq}");
                    match sink.submit(&[rec(seq, 50 + (seq % 200) as usize)]) {
                        Ok(()) => seq += 1,
                        Err(SinkError {
                            error: CaptureError::Full,
                            ..
                        }) => {
                            full += 1;
                            full_seen.store(true, std::sync::atomic::Ordering::Release);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("{:?}", e.error),
                    }
                }
                full
            })
        };
        // The shipper starts late: the writer fills the spool and waits.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !full_seen.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the spool never filled up");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut r = SpoolReader::open(dir.path()).unwrap();
        let mut got = Vec::new();
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < N as usize {
            assert!(Instant::now() < deadline, "reader stuck at {}", got.len());
            match r.next_item().unwrap() {
                Some(SpoolItem::Event { event, position }) => {
                    got.push(event.seq);
                    if event.seq % 50 == 0 {
                        commit(dir.path(), &position).unwrap();
                    }
                    last = Some(position);
                }
                Some(s) => panic!("a live spool reads clean: {s:?}"),
                None => {
                    // Caught up: commit what was read, as a shipper would
                    // after the broker's acknowledgement.
                    if let Some(p) = last.take() {
                        commit(dir.path(), &p).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let full = writer.join().unwrap();
        assert_eq!(
            got,
            (1..=N).collect::<Vec<_>>(),
            "every record, in order, once"
        );
        assert!(full > 0, "the writer had to wait for commits");
        assert!(sink.total_bytes() <= (64 << 10) + (8 << 10));
    }
}
