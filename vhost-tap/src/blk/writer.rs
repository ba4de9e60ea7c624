//! The image writer of one queue: writes recorded large writes to the disk
//! from their record's buffer on its own thread, so the device thread can
//! copy the next request out of guest memory meanwhile.
//!
//! The device thread copies a write's payload into its capture record
//! ([`Tee::copy_write`]) and hands the record to the writer, which writes
//! the disk from that buffer, numbers and queues the record with the
//! write's status ([`Tee::finish_write`]) and reports the status back. Jobs
//! are handled one at a time in the order they were sent, so a queue's
//! records keep the order of its requests, and a request is made visible
//! to the guest (by the device thread) only after its record has its
//! `seq`. A write whose copy from guest memory failed goes through the
//! writer too, without touching the disk, so its `IOERR` record is
//! numbered in its turn.
//!
//! If the thread dies (a panic), the device thread notices it when it
//! waits for a status or hands over a write: it logs the failure, counts
//! it in the `writer_failures` metric, completes every write the writer
//! held without a status with `IOERR` and records each of them (an `IOERR`
//! record, in request order), and writes the queue's later large writes
//! itself.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::GuestAddress;
use vmr_proto::pb;

use super::disk::{Disk, DiskError};
use super::hooks::Hooks;
use crate::capture::{PendingWrite, Tee};
use crate::metrics::Metrics;

/// Writes of at least this many bytes go through the writer (smaller ones
/// cost less to write at once than to hand over).
pub(crate) const ASYNC_WRITE_MIN: u32 = 64 << 10;
/// Most writes one queue has in flight on its writer.
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// How long a wait for the writer lasts before it is logged (the wait goes
/// on: the write is in the kernel).
const SLOW_WRITE: Duration = Duration::from_secs(10);

/// A write handed to the writer.
struct Job {
    pending: PendingWrite,
    /// Byte offset on the disk (None: the sector is out of range).
    off: Option<u64>,
    sector: u64,
}

/// A write the guest is waiting for.
pub(crate) struct InFlight {
    pub head: u16,
    /// Where the request's status byte goes.
    pub status: GuestAddress,
    pub sector: u64,
    pub len: u32,
}

/// How a write in flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// The writer handled it and queued its record; the virtio status.
    Status(u32),
    /// The writer died holding it: it has no record and no status yet.
    Lost,
}

/// One queue's writer thread and the writes it has in flight.
pub(crate) struct Writer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<u32>,
    thread: Option<JoinHandle<()>>,
    in_flight: VecDeque<InFlight>,
    metrics: Arc<Metrics>,
    q: u16,
    /// The thread has died: every status it sent has been received.
    dead: bool,
}

impl Writer {
    /// Starts the writer of queue `q` (None: the thread could not start;
    /// the caller then writes synchronously).
    pub(crate) fn start(
        disk: Arc<Disk>,
        tee: Tee,
        metrics: Arc<Metrics>,
        hooks: Arc<Hooks>,
        q: u16,
    ) -> Option<Self> {
        // Both channels hold every write in flight, so neither side ever
        // waits for room while the other waits for it.
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(MAX_IN_FLIGHT);
        let (done_tx, done) = mpsc::sync_channel::<u32>(MAX_IN_FLIGHT);
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("blk-writer-{q}"))
            .spawn(move || run(&disk, &tee, &m, &hooks, job_rx, done_tx))
            .map_err(|error| tracing::warn!(%error, "cannot start the image writer; writing synchronously"))
            .ok()?;
        Some(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            metrics,
            q,
            dead: false,
        })
    }

    /// Whether the thread has died. Its writes still in flight then
    /// complete with the statuses it sent before it died, the others as
    /// [`Done::Lost`].
    pub(crate) fn dead(&self) -> bool {
        self.dead
    }

    /// Whether the thread has ended (it only ends by dying while the
    /// writer is in use).
    pub(crate) fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Marks the thread dead (once): reaps it, logs why and counts it.
    /// Called once one end of a channel was found closed, which the thread
    /// only closes by ending.
    fn died(&mut self) {
        if self.dead {
            return;
        }
        self.dead = true;
        self.jobs = None;
        // The thread has dropped its end of a channel, so it is ending (or
        // has ended); the join is short.
        let why = match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned()),
            _ => "it stopped".to_owned(),
        };
        Metrics::add(&self.metrics.writer_failures, 1);
        tracing::error!(
            queue = self.q,
            in_flight = self.in_flight.len(),
            reason = %why,
            "the image writer died; the writes it held fail with IOERR and later writes are written synchronously"
        );
    }

    /// Writes in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another write can be handed over now.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// Hands a write over (`off` None: the sector is out of range). On
    /// failure (the writer has died) the record is returned, still without
    /// a `seq`.
    #[allow(clippy::result_large_err)]
    pub(crate) fn submit(
        &mut self,
        pending: PendingWrite,
        off: Option<u64>,
        req: InFlight,
    ) -> Result<(), PendingWrite> {
        debug_assert!(self.has_room());
        let Some(jobs) = self.jobs.as_ref().filter(|_| !self.dead) else {
            return Err(pending);
        };
        match jobs.send(Job {
            pending,
            off,
            sector: req.sector,
        }) {
            Ok(()) => {
                self.in_flight.push_back(req);
                Ok(())
            }
            Err(mpsc::SendError(job)) => {
                self.died();
                Err(job.pending)
            }
        }
    }

    /// The oldest write in flight once it is done: without waiting (`wait`
    /// false: None if it is not done yet), or waiting for it. The writes
    /// of a writer that died without sending their status are
    /// [`Done::Lost`].
    pub(crate) fn complete(&mut self, wait: bool) -> Option<(InFlight, Done)> {
        self.in_flight.front()?;
        // The thread sends a write's status right after it queued its
        // record, and the channel hands over every status sent before it
        // reports the sender gone (also once the writer is known dead): a
        // write without a status has no record.
        let done = if wait {
            loop {
                match self.done.recv_timeout(SLOW_WRITE) {
                    Ok(s) => break Done::Status(s),
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::warn!(
                            queue = self.q,
                            in_flight = self.in_flight.len(),
                            "an image write is taking longer than {SLOW_WRITE:?}"
                        );
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.died();
                        break Done::Lost;
                    }
                }
            }
        } else {
            match self.done.try_recv() {
                Ok(s) => Done::Status(s),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    self.died();
                    Done::Lost
                }
            }
        };
        let req = self.in_flight.pop_front()?;
        Some((req, done))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the job channel ends the thread once its jobs are done.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("image writer thread panicked");
            }
        }
    }
}

fn run(
    disk: &Disk,
    tee: &Tee,
    metrics: &Metrics,
    hooks: &Hooks,
    jobs: Receiver<Job>,
    done: SyncSender<u32>,
) {
    let mut scratch = Vec::new();
    while let Ok(job) = jobs.recv() {
        let status = if job.pending.copied() {
            hooks.before_write(job.sector);
            write_at(
                disk,
                metrics,
                job.off,
                job.sector,
                job.pending.data(),
                &mut scratch,
            )
        } else {
            // The payload could not be copied from the guest: the disk is
            // not touched, the record is numbered in its turn.
            VIRTIO_BLK_S_IOERR
        };
        let rec_status = if status == VIRTIO_BLK_S_OK {
            pb::BlockStatus::Ok
        } else {
            pb::BlockStatus::Ioerr
        };
        tee.finish_write(job.pending, rec_status);
        if done.send(status).is_err() {
            break;
        }
    }
}

/// Writes `data` at byte offset `off` of the disk (None: the sector is out
/// of range); returns the virtio status, counting the bytes of a
/// successful write.
pub(crate) fn write_at(
    disk: &Disk,
    metrics: &Metrics,
    off: Option<u64>,
    sector: u64,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> u32 {
    let r = match off {
        Some(off) => disk.write(off, data, scratch),
        None => Err(DiskError::OutOfRange),
    };
    match r {
        Ok(()) => {
            Metrics::add(&metrics.bytes, data.len() as u64);
            VIRTIO_BLK_S_OK
        }
        Err(error) => {
            tracing::debug!(%error, sector, "write failed");
            VIRTIO_BLK_S_IOERR
        }
    }
}
