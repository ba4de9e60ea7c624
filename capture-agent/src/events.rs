//! Events the agent itself generates for an instance (lifecycle changes,
//! host sensor samples), made durable in the agent's own spool before they
//! are shipped, so they reach Kafka exactly once like the devices' records.
//!
//! Each event takes its `seq` from the instance's shared sequence file (the
//! same leased counter the instance's backends use, see
//! [`vhost_tap::seq::FileSeq`]), so agent events and device records of one
//! instance share one order. Numbering and writing happen under one lock, so
//! the spool holds them in `seq` order; a call that succeeds returns after
//! the event is durable (`fsync`). A refused write becomes a GAP event; a
//! failed `fsync` is returned as an error without one, and the log keeps no
//! restart record, so a number taken by an agent killed before it wrote the
//! event is neither recorded nor covered by a GAP. Ship the spool with a
//! [`crate::shipper::Shipper`] over a [`crate::source::SpoolSource`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost_tap::capture::Record;
use vhost_tap::capture::{CaptureError, CaptureSink, Recycle, SpoolConfig, SpoolSink};
use vhost_tap::seq::SeqSource;
use vmr_proto::{pb, EnvSample, InstanceId, LifecycleKind};

/// Errors recording an agent event.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot open the agent's event spool")]
    Open(#[source] CaptureError),
    #[error("the event with seq {seq} could not be written")]
    Write {
        seq: u64,
        #[source]
        source: CaptureError,
    },
}

/// Settings of an [`EventLog`].
#[derive(Debug, Clone)]
pub struct EventLogConfig {
    /// Spool directory (created if missing).
    pub dir: PathBuf,
    /// Segment size in bytes.
    pub segment_bytes: u64,
    /// Most bytes the spool holds; a full spool refuses events (the shipper
    /// frees room by committing).
    pub capacity_bytes: u64,
}

impl EventLogConfig {
    /// 1 MiB segments, 16 MiB at most, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 1 << 20,
            capacity_bytes: 16 << 20,
        }
    }
}

/// The agent's event log for one instance.
pub struct EventLog {
    instance: InstanceId,
    seq: Arc<dyn SeqSource>,
    sink: SpoolSink,
    order: Mutex<()>,
    counters: EventCounters,
}

/// What an [`EventLog`] recorded.
#[derive(Debug, Default)]
pub struct EventCounters {
    /// Lifecycle events written (GAP events included).
    pub lifecycle: AtomicU64,
    /// GAP events written.
    pub gaps: AtomicU64,
    /// Sensor samples written.
    pub env_samples: AtomicU64,
    /// Events that could not be written (each also becomes a GAP, if the
    /// spool takes it).
    pub write_errors: AtomicU64,
}

/// Wall-clock and monotonic time, nanoseconds.
fn now_ns() -> (u64, u64) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    (wall, mono)
}

impl EventLog {
    /// Opens the log of `instance` in `cfg.dir`, numbering from `seq`.
    pub fn open(
        instance: InstanceId,
        seq: Arc<dyn SeqSource>,
        cfg: EventLogConfig,
    ) -> Result<Self, EventsError> {
        let sink = SpoolSink::open(SpoolConfig {
            dir: cfg.dir,
            segment_bytes: cfg.segment_bytes,
            capacity_bytes: cfg.capacity_bytes,
            recycle: Recycle::Committed,
            instance_id: instance.to_string(),
            epoch: seq.epoch(),
        })
        .map_err(EventsError::Open)?;
        Ok(Self {
            instance,
            seq,
            sink,
            order: Mutex::new(()),
            counters: EventCounters::default(),
        })
    }

    /// What the log recorded so far.
    pub fn counters(&self) -> &EventCounters {
        &self.counters
    }

    /// The instance's sequence counter (shared with its backends).
    pub fn seq(&self) -> &Arc<dyn SeqSource> {
        &self.seq
    }

    /// The instance.
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// Numbers and durably writes events built by `payloads`; returns their
    /// `seq`s.
    fn append(&self, payloads: Vec<pb::event::Payload>) -> Result<Vec<u64>, EventsError> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.seq.next_n(payloads.len() as u64);
        let (wall, mono) = now_ns();
        let records: Vec<Record> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                Record::new(pb::Event {
                    instance_id: self.instance.to_string(),
                    seq: first + i as u64,
                    wall_time_ns: wall,
                    mono_time_ns: mono,
                    epoch: self.seq.epoch(),
                    payload: Some(payload),
                })
            })
            .collect();
        let seqs: Vec<u64> = records.iter().map(|r| r.event().seq).collect();
        let written = match self.sink.submit(&records) {
            Ok(()) => records.len(),
            Err(e) => {
                self.counters
                    .write_errors
                    .fetch_add((records.len() - e.written) as u64, Ordering::Relaxed);
                let lost = seqs[e.written];
                // The numbers not written become a GAP event, as in the
                // backends: no number is silently lost.
                self.write_gap(lost, (records.len() - e.written) as u64, &e.error);
                return Err(EventsError::Write {
                    seq: lost,
                    source: e.error,
                });
            }
        };
        debug_assert_eq!(written, seqs.len());
        self.sink
            .sync()
            .map_err(|source| EventsError::Write { seq: first, source })?;
        for r in &records {
            let c = &self.counters;
            match &r.event().payload {
                Some(pb::event::Payload::Lifecycle(l)) => {
                    c.lifecycle.fetch_add(1, Ordering::Relaxed);
                    if l.kind == pb::LifecycleKind::Gap as i32 {
                        c.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(pb::event::Payload::Env(_)) => {
                    c.env_samples.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        Ok(seqs)
    }

    /// Best effort: a GAP event for numbers that could not be written (a
    /// spool too full for the events may also refuse it; that is logged).
    fn write_gap(&self, first: u64, count: u64, error: &CaptureError) {
        let (wall, mono) = now_ns();
        let reason = format!("agent event log write failed: {error}");
        let rec = Record::new(pb::Event {
            instance_id: self.instance.to_string(),
            seq: self.seq.next(),
            wall_time_ns: wall,
            mono_time_ns: mono,
            epoch: self.seq.epoch(),
            payload: Some(pb::event::Payload::Lifecycle(pb::Lifecycle {
                kind: pb::LifecycleKind::Gap as i32,
                detail: reason.clone(),
                gap: Some(pb::Gap {
                    first_seq: first,
                    count,
                    reason,
                }),
                ..Default::default()
            })),
        });
        match self.sink.submit(std::slice::from_ref(&rec)) {
            Ok(()) => {
                self.counters.lifecycle.fetch_add(1, Ordering::Relaxed);
                self.counters.gaps.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(instance = %self.instance, first, count, error = %e.error, "cannot record a GAP for lost agent events");
            }
        }
        let _ = self.sink.sync();
    }

    /// Records a lifecycle change (boot, pause, resume, crash, shutdown, ...);
    /// returns its `seq`.
    pub fn lifecycle(&self, kind: LifecycleKind, detail: &str) -> Result<u64, EventsError> {
        let l = pb::Lifecycle {
            kind: pb::LifecycleKind::from(kind) as i32,
            detail: detail.to_owned(),
            ..Default::default()
        };
        Ok(self.append(vec![pb::event::Payload::Lifecycle(l)])?[0])
    }

    /// Records a lifecycle change with vCPU registers (crash, fault).
    pub fn lifecycle_with_regs(
        &self,
        kind: LifecycleKind,
        detail: &str,
        regs: Vec<pb::VcpuRegs>,
    ) -> Result<u64, EventsError> {
        let l = pb::Lifecycle {
            kind: pb::LifecycleKind::from(kind) as i32,
            detail: detail.to_owned(),
            regs,
            ..Default::default()
        };
        Ok(self.append(vec![pb::event::Payload::Lifecycle(l)])?[0])
    }

    /// Records that `[first, first + count)` were lost, and why.
    pub fn gap(&self, first: u64, count: u64, reason: &str) -> Result<u64, EventsError> {
        let l = pb::Lifecycle {
            kind: pb::LifecycleKind::Gap as i32,
            detail: reason.to_owned(),
            gap: Some(pb::Gap {
                first_seq: first,
                count,
                reason: reason.to_owned(),
            }),
            ..Default::default()
        };
        Ok(self.append(vec![pb::event::Payload::Lifecycle(l)])?[0])
    }

    /// Records sensor samples (one event each); returns their `seq`s.
    pub fn env(&self, samples: &[EnvSample]) -> Result<Vec<u64>, EventsError> {
        self.append(
            samples
                .iter()
                .map(|s| {
                    pb::event::Payload::Env(pb::EnvSample {
                        sensor: s.sensor.clone(),
                        value: s.value,
                        unit: s.unit.clone(),
                    })
                })
                .collect(),
        )
    }
}
