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
//! `seq`.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::GuestAddress;
use vmr_proto::pb;

use super::disk::{Disk, DiskError};
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
}

/// One queue's writer thread and the writes it has in flight.
pub(crate) struct Writer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<u32>,
    thread: Option<JoinHandle<()>>,
    in_flight: VecDeque<InFlight>,
}

impl Writer {
    /// Starts the writer of queue `q` (None: the thread could not start;
    /// the caller then writes synchronously).
    pub(crate) fn start(disk: Arc<Disk>, tee: Tee, metrics: Arc<Metrics>, q: u16) -> Option<Self> {
        // Both channels hold every write in flight, so neither side ever
        // waits for room while the other waits for it.
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(MAX_IN_FLIGHT);
        let (done_tx, done) = mpsc::sync_channel::<u32>(MAX_IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name(format!("blk-writer-{q}"))
            .spawn(move || run(&disk, &tee, &metrics, job_rx, done_tx))
            .map_err(|error| tracing::warn!(%error, "cannot start the image writer; writing synchronously"))
            .ok()?;
        Some(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
        })
    }

    /// Writes in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another write can be handed over now.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// Hands a write over. On failure (the writer is gone) the record is
    /// returned.
    #[allow(clippy::result_large_err)]
    pub(crate) fn submit(
        &mut self,
        pending: PendingWrite,
        off: Option<u64>,
        sector: u64,
        req: InFlight,
    ) -> Result<(), PendingWrite> {
        debug_assert!(self.has_room());
        let Some(jobs) = &self.jobs else {
            return Err(pending);
        };
        match jobs.send(Job {
            pending,
            off,
            sector,
        }) {
            Ok(()) => {
                self.in_flight.push_back(req);
                Ok(())
            }
            Err(mpsc::SendError(job)) => Err(job.pending),
        }
    }

    /// The oldest write in flight once it is done, with its virtio status:
    /// without waiting (`wait` false: None if it is not done yet), or
    /// waiting for it. A writer that is gone completes what it had with
    /// `IOERR`.
    pub(crate) fn complete(&mut self, wait: bool) -> Option<(InFlight, u32)> {
        self.in_flight.front()?;
        let status = if wait {
            loop {
                match self.done.recv_timeout(SLOW_WRITE) {
                    Ok(s) => break s,
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::warn!(
                            in_flight = self.in_flight.len(),
                            "an image write is taking longer than {SLOW_WRITE:?}"
                        );
                    }
                    Err(RecvTimeoutError::Disconnected) => break VIRTIO_BLK_S_IOERR,
                }
            }
        } else {
            match self.done.try_recv() {
                Ok(s) => s,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => VIRTIO_BLK_S_IOERR,
            }
        };
        let req = self.in_flight.pop_front().expect("checked above");
        Some((req, status))
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

fn run(disk: &Disk, tee: &Tee, metrics: &Metrics, jobs: Receiver<Job>, done: SyncSender<u32>) {
    let mut scratch = Vec::new();
    while let Ok(job) = jobs.recv() {
        let len = job.pending.data().len() as u64;
        let r = match job.off {
            Some(off) => disk.write(off, job.pending.data(), &mut scratch),
            None => Err(DiskError::OutOfRange),
        };
        let status = match r {
            Ok(()) => {
                Metrics::add(&metrics.bytes, len);
                VIRTIO_BLK_S_OK
            }
            Err(error) => {
                tracing::debug!(%error, sector = job.sector, "write failed");
                VIRTIO_BLK_S_IOERR
            }
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
