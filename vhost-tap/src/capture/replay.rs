//! The replay side of a backend: the replay clock the replayer steers, the
//! live stream of what the clone does ([`Outputs`]), and the comparison of
//! the clone's block requests with the original's records
//! ([`Expectations`]).
//!
//! None of this runs in capture mode.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::Instant;

use serde::Serialize;
use vmr_proto::pb;

/// Scale factors the clock accepts.
pub const MIN_FACTOR: f64 = 0.01;
/// Largest scale factor.
pub const MAX_FACTOR: f64 = 1000.0;

/// Errors steering the clock.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("scale factor must be between {MIN_FACTOR} and {MAX_FACTOR}, got {0}")]
    Factor(f64),
    #[error("the clock must be paused to step it")]
    NotPaused,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    /// Clock reading when `since` was taken.
    base_ns: u64,
    /// Running since then (None: paused).
    since: Option<Instant>,
    factor: f64,
}

/// A point-in-time view of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClockReading {
    /// Replay time, nanoseconds.
    pub ns: u64,
    pub paused: bool,
    pub factor: f64,
}

/// The replay clock: nanoseconds of replay time that advance with the host's
/// monotonic clock times a factor while running, and stand still while
/// paused. It starts paused at 0. Scheduled frames are delivered when it
/// reaches their `at_ns`; faults may wait for it.
#[derive(Debug)]
pub struct ReplayClock {
    state: Mutex<ClockState>,
    /// Threads woken on every change (the schedulers).
    waiters: Mutex<Vec<Thread>>,
}

impl Default for ReplayClock {
    fn default() -> Self {
        Self {
            state: Mutex::new(ClockState {
                base_ns: 0,
                since: None,
                factor: 1.0,
            }),
            waiters: Mutex::new(Vec::new()),
        }
    }
}

fn read(st: &ClockState, now: Instant) -> u64 {
    match st.since {
        None => st.base_ns,
        Some(t) => {
            let run = now.saturating_duration_since(t).as_nanos() as f64 * st.factor;
            st.base_ns.saturating_add(run as u64)
        }
    }
}

impl ReplayClock {
    /// A paused clock at 0, factor 1.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        for t in self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.unpark();
        }
    }

    /// Registers the calling thread to be unparked on every change.
    pub(crate) fn register_waiter(&self) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::thread::current());
    }

    /// Removes a thread from the waiters.
    pub(crate) fn unregister_waiter(&self, id: std::thread::ThreadId) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|t| t.id() != id);
    }

    /// The current replay time.
    pub fn now_ns(&self) -> u64 {
        read(&self.lock(), Instant::now())
    }

    /// Reading, paused flag and factor.
    pub fn reading(&self) -> ClockReading {
        let st = self.lock();
        ClockReading {
            ns: read(&st, Instant::now()),
            paused: st.since.is_none(),
            factor: st.factor,
        }
    }

    /// Host time until the clock reaches `at_ns` (None: paused and not yet
    /// there; zero: already there).
    pub fn until(&self, at_ns: u64) -> Option<std::time::Duration> {
        let st = self.lock();
        let now = read(&st, Instant::now());
        if now >= at_ns {
            return Some(std::time::Duration::ZERO);
        }
        st.since?;
        let host = (at_ns - now) as f64 / st.factor;
        Some(std::time::Duration::from_nanos(host.ceil() as u64))
    }

    /// Stops the clock (idempotent).
    pub fn pause(&self) -> ClockReading {
        {
            let mut st = self.lock();
            let now = Instant::now();
            st.base_ns = read(&st, now);
            st.since = None;
        }
        self.changed();
        self.reading()
    }

    /// Starts the clock (idempotent).
    pub fn resume(&self) -> ClockReading {
        {
            let mut st = self.lock();
            if st.since.is_none() {
                st.since = Some(Instant::now());
            }
        }
        self.changed();
        self.reading()
    }

    /// Sets the speed: replay nanoseconds per host nanosecond.
    pub fn set_factor(&self, factor: f64) -> Result<ClockReading, ClockError> {
        if !(MIN_FACTOR..=MAX_FACTOR).contains(&factor) {
            return Err(ClockError::Factor(factor));
        }
        {
            let mut st = self.lock();
            let now = Instant::now();
            st.base_ns = read(&st, now);
            if st.since.is_some() {
                st.since = Some(now);
            }
            st.factor = factor;
        }
        self.changed();
        Ok(self.reading())
    }

    /// Advances a paused clock by `ns`.
    pub fn step(&self, ns: u64) -> Result<ClockReading, ClockError> {
        {
            let mut st = self.lock();
            if st.since.is_some() {
                return Err(ClockError::NotPaused);
            }
            st.base_ns = st.base_ns.saturating_add(ns);
        }
        self.changed();
        Ok(self.reading())
    }

    /// Sets the reading (running or paused).
    pub fn set(&self, ns: u64) -> ClockReading {
        {
            let mut st = self.lock();
            st.base_ns = ns;
            if st.since.is_some() {
                st.since = Some(Instant::now());
            }
        }
        self.changed();
        self.reading()
    }
}

/// Lowercase hex of bytes, for the stream.
fn hex<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::control::encode_hex(b))
}

fn hex_opt<S: serde::Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => hex(b, s),
        None => s.serialize_none(),
    }
}

/// Name of a block operation on the control socket and the stream.
pub fn op_name(op: pb::BlockOp) -> &'static str {
    match op {
        pb::BlockOp::Read => "read",
        pb::BlockOp::Write => "write",
        pb::BlockOp::Flush => "flush",
        pb::BlockOp::Discard => "discard",
        pb::BlockOp::WriteZeroes => "write-zeroes",
        pb::BlockOp::GetId => "get-id",
        pb::BlockOp::Unspecified => "unspecified",
    }
}

/// Name of a block status on the control socket and the stream.
pub fn status_name(s: pb::BlockStatus) -> &'static str {
    match s {
        pb::BlockStatus::Ok => "ok",
        pb::BlockStatus::Ioerr => "ioerr",
        pb::BlockStatus::Unsupported => "unsupported",
    }
}

/// One line of the live output stream (`subscribe`), serialized as a JSON
/// object with a `type` field.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Output {
    /// A frame reached the guest: it was put in the receive used ring.
    Delivered {
        device: String,
        /// The original's `seq` the frame carried (None: injected without).
        seq: Option<u64>,
        /// When it was scheduled (replay clock; None: at once).
        at_ns: Option<u64>,
        /// Replay clock when it was put in the used ring.
        clock_ns: u64,
        /// Host `CLOCK_MONOTONIC` at that moment.
        mono_ns: u64,
        /// `clock_ns - at_ns` (0 without `at_ns`).
        late_ns: i64,
        /// The clone's own record number for it (None: tee off or dropped).
        clone_seq: Option<u64>,
        len: usize,
    },
    /// The guest transmitted a frame.
    Tx {
        device: String,
        /// The last original `seq` delivered to the guest before it.
        after_seq: Option<u64>,
        clock_ns: u64,
        mono_ns: u64,
        clone_seq: Option<u64>,
        #[serde(serialize_with = "hex")]
        frame: Vec<u8>,
    },
    /// The clone completed a block request.
    Block {
        device: String,
        op: &'static str,
        sector: u64,
        len: u32,
        status: &'static str,
        /// xxh3-128 of the written data or of the data read (None for
        /// other operations).
        #[serde(serialize_with = "hex_opt")]
        hash: Option<Vec<u8>>,
        /// The original record's `seq` this request was matched with.
        answers: Option<u64>,
        /// Whether it matched that record (None: no expectations loaded).
        matched: Option<bool>,
        clock_ns: u64,
        mono_ns: u64,
        clone_seq: Option<u64>,
        /// The written data, for subscribers that asked for it.
        #[serde(serialize_with = "hex_opt", skip_serializing_if = "Option::is_none")]
        data: Option<Vec<u8>>,
    },
    /// A fault rule fired.
    Fault {
        device: String,
        rule: u64,
        kind: &'static str,
        /// `rx`, `tx` or `block`.
        target: &'static str,
        seq: Option<u64>,
        clock_ns: u64,
    },
    /// Lines this subscriber missed because it read too slowly.
    Lagged { lost: u64 },
}

struct Subscriber {
    tx: SyncSender<Arc<Output>>,
    lost: Arc<AtomicU64>,
    data: bool,
}

/// A subscription: the receiving end handed to a control connection.
pub struct Subscription {
    pub rx: Receiver<Arc<Output>>,
    /// Lines dropped because the subscriber's queue was full.
    pub lost: Arc<AtomicU64>,
}

/// The fan-out of the clone's outputs to subscribers. Device threads never
/// wait for a subscriber: a full subscriber queue drops the line and counts
/// it, and the subscriber gets a `lagged` line.
#[derive(Default)]
pub struct Outputs {
    subs: Mutex<Vec<Subscriber>>,
    active: AtomicUsize,
    data_wanted: AtomicUsize,
}

impl Outputs {
    /// No subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether anyone listens (cheap check before building a line).
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Whether a subscriber wants write data.
    pub fn wants_data(&self) -> bool {
        self.data_wanted.load(Ordering::Acquire) > 0
    }

    /// Adds a subscriber with a queue of `capacity` lines.
    pub fn subscribe(&self, capacity: usize, data: bool) -> Subscription {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let lost = Arc::new(AtomicU64::new(0));
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.push(Subscriber {
            tx,
            lost: lost.clone(),
            data,
        });
        self.recount(&subs);
        Subscription { rx, lost }
    }

    fn recount(&self, subs: &[Subscriber]) {
        self.active.store(subs.len(), Ordering::Release);
        self.data_wanted
            .store(subs.iter().filter(|s| s.data).count(), Ordering::Release);
    }

    /// Sends a line to every subscriber (without write data to those that
    /// did not ask for it); drops subscribers that went away.
    pub fn emit(&self, out: Output) {
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let full = Arc::new(out);
        let mut lean: Option<Arc<Output>> = None;
        let before = subs.len();
        subs.retain(|s| {
            let line = match &*full {
                Output::Block { data: Some(_), .. } if !s.data => lean
                    .get_or_insert_with(|| {
                        let mut o = (*full).clone();
                        if let Output::Block { data, .. } = &mut o {
                            *data = None;
                        }
                        Arc::new(o)
                    })
                    .clone(),
                _ => full.clone(),
            };
            match s.tx.try_send(line) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        if subs.len() != before {
            self.recount(&subs);
        }
    }
}

/// One record of the original that the clone's requests are compared with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedIo {
    /// The original record's `seq`.
    pub seq: u64,
    /// `read`, `write`, `flush`, `discard`, `write-zeroes`, `get-id`.
    pub op: String,
    #[serde(default)]
    pub sector: u64,
    #[serde(default)]
    pub len: u32,
    /// xxh3-128 (32 hex digits) of the written data or of the data read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The written data itself (hex); hashed on arrival, an alternative to
    /// `hash` for writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// `ok`, `ioerr` or `unsupported` (not compared if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// Errors loading expectations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpectError {
    #[error("record {seq}: {reason}")]
    Bad { seq: u64, reason: String },
    #[error("too many expected records (limit {0})")]
    TooMany(usize),
}

pub(crate) fn parse_op(op: &str) -> Option<pb::BlockOp> {
    Some(match op {
        "read" => pb::BlockOp::Read,
        "write" => pb::BlockOp::Write,
        "flush" => pb::BlockOp::Flush,
        "discard" => pb::BlockOp::Discard,
        "write-zeroes" => pb::BlockOp::WriteZeroes,
        "get-id" => pb::BlockOp::GetId,
        _ => return None,
    })
}

fn parse_status(s: &str) -> Option<pb::BlockStatus> {
    Some(match s {
        "ok" => pb::BlockStatus::Ok,
        "ioerr" => pb::BlockStatus::Ioerr,
        "unsupported" => pb::BlockStatus::Unsupported,
        _ => return None,
    })
}

type Key = (i32, u64, u32);

#[derive(Debug, Clone)]
struct Want {
    seq: u64,
    hash: Option<[u8; 16]>,
    status: Option<pb::BlockStatus>,
}

/// One side of a comparison, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IoSide {
    pub op: &'static str,
    pub sector: u64,
    pub len: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The first difference found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// `status` (the status differs; the hash may too), `content` (same
    /// status, the hash differs), or `unexpected` (the original has no
    /// record of this request left).
    pub kind: &'static str,
    pub clone: IoSide,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original: Option<IoSide>,
}

/// The comparison so far (the `compare` command).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompareReport {
    /// Records loaded.
    pub loaded: u64,
    /// Clone requests that matched their record.
    pub matched: u64,
    /// Clone requests whose record differs (content or status).
    pub mismatched: u64,
    /// Clone requests with no record left to match.
    pub unexpected: u64,
    /// Records no clone request answered yet.
    pub pending: u64,
    pub first_mismatch: Option<Mismatch>,
}

/// The result for one clone request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The original record matched with.
    pub answers: Option<u64>,
    /// Whether it matched (None: nothing loaded).
    pub matched: Option<bool>,
}

#[derive(Default)]
struct ExpectState {
    by_key: HashMap<Key, VecDeque<Want>>,
    report: CompareReport,
}

/// The original's block records, loaded by the replayer. A clone request is
/// matched with the oldest unanswered record of the same operation, sector
/// and length (not by position: the clone may interleave requests
/// differently), then its content hash and status are compared.
#[derive(Default)]
pub struct Expectations {
    state: Mutex<ExpectState>,
    limit: usize,
}

fn hex16(s: &str) -> Option<[u8; 16]> {
    let v = crate::control::decode_hex(s)?;
    v.try_into().ok()
}

fn side(
    op: pb::BlockOp,
    sector: u64,
    len: u32,
    hash: Option<[u8; 16]>,
    status: Option<pb::BlockStatus>,
    seq: Option<u64>,
) -> IoSide {
    IoSide {
        op: op_name(op),
        sector,
        len,
        hash: hash.map(|h| crate::control::encode_hex(&h)),
        status: status.map(status_name),
        seq,
    }
}

impl Expectations {
    /// Holds at most `limit` unanswered records.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::default(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExpectState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds records (checked first: a bad one rejects the whole call).
    pub fn load(&self, records: &[ExpectedIo]) -> Result<u64, ExpectError> {
        let mut parsed = Vec::with_capacity(records.len());
        for r in records {
            let bad = |reason: &str| ExpectError::Bad {
                seq: r.seq,
                reason: reason.into(),
            };
            let op = parse_op(&r.op).ok_or_else(|| bad("unknown op"))?;
            let hash = match (&r.hash, &r.data) {
                (Some(_), Some(_)) => return Err(bad("give hash or data, not both")),
                (Some(h), None) => {
                    Some(hex16(h).ok_or_else(|| bad("hash must be 32 hex digits (xxh3-128)"))?)
                }
                (None, Some(d)) => {
                    let d = crate::control::decode_hex(d).ok_or_else(|| bad("data is not hex"))?;
                    Some(xxhash_rust::xxh3::xxh3_128(&d).to_be_bytes())
                }
                (None, None) => None,
            };
            let status = r
                .status
                .as_deref()
                .map(|s| parse_status(s).ok_or_else(|| bad("unknown status")))
                .transpose()?;
            parsed.push((
                (op as i32, r.sector, r.len),
                Want {
                    seq: r.seq,
                    hash,
                    status,
                },
            ));
        }
        let mut st = self.lock();
        if st.report.pending as usize + parsed.len() > self.limit {
            return Err(ExpectError::TooMany(self.limit));
        }
        let n = parsed.len() as u64;
        for (k, w) in parsed {
            st.by_key.entry(k).or_default().push_back(w);
        }
        st.report.loaded += n;
        st.report.pending += n;
        Ok(n)
    }

    /// Whether any record was ever loaded.
    pub fn loaded(&self) -> bool {
        self.lock().report.loaded > 0
    }

    /// The record a request with these fields would answer.
    pub fn peek(&self, op: pb::BlockOp, sector: u64, len: u32) -> Option<u64> {
        let st = self.lock();
        st.by_key
            .get(&(op as i32, sector, len))
            .and_then(|q| q.front())
            .map(|w| w.seq)
    }

    /// Matches a completed clone request and compares it.
    pub fn complete(
        &self,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
        hash: Option<[u8; 16]>,
        status: pb::BlockStatus,
    ) -> Outcome {
        let mut st = self.lock();
        if st.report.loaded == 0 {
            return Outcome {
                answers: None,
                matched: None,
            };
        }
        let key = (op as i32, sector, len);
        let want = st.by_key.get_mut(&key).and_then(|q| q.pop_front());
        let clone = || side(op, sector, len, hash, Some(status), None);
        let Some(w) = want else {
            st.report.unexpected += 1;
            if st.report.first_mismatch.is_none() {
                st.report.first_mismatch = Some(Mismatch {
                    kind: "unexpected",
                    clone: clone(),
                    original: None,
                });
            }
            return Outcome {
                answers: None,
                matched: Some(false),
            };
        };
        st.report.pending -= 1;
        let content_ok = match (w.hash, hash) {
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let status_ok = w.status.is_none_or(|s| s == status);
        let ok = content_ok && status_ok;
        if ok {
            st.report.matched += 1;
        } else {
            st.report.mismatched += 1;
            if st.report.first_mismatch.is_none() {
                st.report.first_mismatch = Some(Mismatch {
                    kind: if status_ok { "content" } else { "status" },
                    clone: clone(),
                    original: Some(side(op, sector, len, w.hash, w.status, Some(w.seq))),
                });
            }
        }
        Outcome {
            answers: Some(w.seq),
            matched: Some(ok),
        }
    }

    /// The comparison so far.
    pub fn report(&self) -> CompareReport {
        self.lock().report.clone()
    }

    /// Forgets every record and result.
    pub fn clear(&self) {
        *self.lock() = ExpectState::default();
    }
}

/// xxh3-128 of `data`, big-endian (as in records' `content_hash`).
pub fn hash128(data: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(data).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_pauses_steps_and_scales() {
        let c = ReplayClock::new();
        assert_eq!(c.now_ns(), 0);
        assert!(c.reading().paused);
        assert_eq!(c.until(10), None, "paused and not there");
        c.step(1_000).unwrap();
        assert_eq!(c.now_ns(), 1_000);
        assert_eq!(c.until(500), Some(std::time::Duration::ZERO));
        c.set_factor(10.0).unwrap();
        c.resume();
        assert_eq!(c.step(1), Err(ClockError::NotPaused));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = c.pause();
        assert!(r.ns >= 200_000_000, "10x for 20 ms: {}", r.ns);
        assert!(r.ns < 2_000_000_000, "{}", r.ns);
        let frozen = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(c.now_ns(), frozen);
        assert!(c.set_factor(0.0).is_err());
        assert!(c.set_factor(f64::NAN).is_err());
        assert_eq!(c.set(42).ns, 42);
    }

    #[test]
    fn expectations_match_by_request_not_position() {
        let e = Expectations::new(100);
        let h = |b: u8| crate::control::encode_hex(&hash128(&[b; 512]));
        let rec = |seq, sector, b| ExpectedIo {
            seq,
            op: "write".into(),
            sector,
            len: 512,
            hash: Some(h(b)),
            data: None,
            status: Some("ok".into()),
        };
        e.load(&[rec(10, 0, 1), rec(11, 8, 2), rec(12, 0, 3)])
            .unwrap();
        // The clone writes sector 8 first: matched with seq 11, not 10.
        let o = e.complete(
            pb::BlockOp::Write,
            8,
            512,
            Some(hash128(&[2; 512])),
            pb::BlockStatus::Ok,
        );
        assert_eq!(
            o,
            Outcome {
                answers: Some(11),
                matched: Some(true)
            }
        );
        let o = e.complete(
            pb::BlockOp::Write,
            0,
            512,
            Some(hash128(&[1; 512])),
            pb::BlockStatus::Ok,
        );
        assert_eq!(o.answers, Some(10));
        assert_eq!(e.peek(pb::BlockOp::Write, 0, 512), Some(12));
        let o = e.complete(
            pb::BlockOp::Write,
            0,
            512,
            Some(hash128(&[9; 512])),
            pb::BlockStatus::Ok,
        );
        assert_eq!(
            o,
            Outcome {
                answers: Some(12),
                matched: Some(false)
            }
        );
        let o = e.complete(
            pb::BlockOp::Read,
            0,
            512,
            Some(hash128(&[9; 512])),
            pb::BlockStatus::Ok,
        );
        assert_eq!(
            o,
            Outcome {
                answers: None,
                matched: Some(false)
            }
        );
        let r = e.report();
        assert_eq!(
            (r.loaded, r.matched, r.mismatched, r.unexpected, r.pending),
            (3, 2, 1, 1, 0)
        );
        let m = r.first_mismatch.unwrap();
        assert_eq!(m.kind, "content");
        assert_eq!(m.original.unwrap().seq, Some(12));
        assert!(e
            .load(&[ExpectedIo {
                op: "bogus".into(),
                ..rec(1, 0, 0)
            }])
            .is_err());
        let too_many: Vec<_> = (0..101).map(|i| rec(i, i, 0)).collect();
        assert_eq!(e.load(&too_many), Err(ExpectError::TooMany(100)));
    }

    #[test]
    fn a_slow_subscriber_loses_lines_and_the_emitter_never_waits() {
        let o = Outputs::new();
        assert!(!o.active());
        let sub = o.subscribe(2, false);
        for _ in 0..5 {
            o.emit(Output::Lagged { lost: 0 });
        }
        assert_eq!(sub.lost.load(Ordering::Relaxed), 3);
        assert_eq!(sub.rx.try_iter().count(), 2);
        drop(sub);
        o.emit(Output::Lagged { lost: 0 });
        assert!(!o.active(), "a gone subscriber is removed");
    }
}
