//! The measured workloads and the loop that drives them through a
//! [`BlkDevice`] at a fixed queue depth.

use std::time::{Duration, Instant};

use crate::frontend::{BlkDevice, Completion, FrontendError, Op, MAX_IO, MAX_SLOTS};

/// Errors running a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("workload {0} does not fit the driver (block size or depth too large)")]
    TooLarge(&'static str),
    #[error("read-back after write returned different data")]
    Mismatch,
}

/// One access pattern.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub op: Op,
    /// Request size in bytes.
    pub block: usize,
    /// Requests kept in flight.
    pub depth: usize,
    /// Random offsets (else sequential, wrapping at the end of the disk).
    pub random: bool,
}

/// The workloads the benchmark measures.
pub const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4k randwrite qd32",
        op: Op::Write,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "4k randread qd32",
        op: Op::Read,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "1m seqwrite qd8",
        op: Op::Write,
        block: 1 << 20,
        depth: 8,
        random: false,
    },
];

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Stop submitting after this long.
    Elapsed(Duration),
    /// Stop submitting after this many requests.
    Requests(u64),
}

/// Requests, bytes and time of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `w` over a disk of `disk_bytes` until `until`, then waits for the
/// requests in flight.
pub fn run(
    dev: &mut BlkDevice,
    w: Workload,
    disk_bytes: u64,
    until: Until,
    seed: u64,
) -> Result<Tally, WorkloadError> {
    if w.depth > MAX_SLOTS || w.block > MAX_IO || w.depth == 0 {
        return Err(WorkloadError::TooLarge(w.name));
    }
    let mut rng = Rng(seed | 1);
    let blocks = (disk_bytes / w.block as u64).max(1);
    let mut seq = 0u64;
    let mut next_sector = |rng: &mut Rng| {
        let b = if w.random {
            rng.next() % blocks
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        b * w.block as u64 / 512
    };
    if w.op == Op::Write {
        for slot in 0..w.depth {
            let buf = dev.buffer_mut(slot);
            for (i, b) in buf[..w.block].iter_mut().enumerate() {
                *b = (i as u64 ^ seed ^ slot as u64).wrapping_mul(0x9e37_79b9) as u8;
            }
        }
    }
    let start = Instant::now();
    let deadline = match until {
        Until::Elapsed(d) => Some(start + d),
        Until::Requests(_) => None,
    };
    let limit = match until {
        Until::Requests(n) => n,
        Until::Elapsed(_) => u64::MAX,
    };
    let mut submitted = 0u64;
    let mut inflight = 0usize;
    for slot in 0..w.depth {
        if submitted == limit {
            break;
        }
        dev.submit(slot, w.op, next_sector(&mut rng), w.block)?;
        submitted += 1;
        inflight += 1;
    }
    dev.publish()?;
    let mut done: Vec<Completion> = Vec::with_capacity(MAX_SLOTS);
    let mut tally = Tally::default();
    let mut open = true;
    while inflight > 0 {
        dev.wait_completions(&mut done)?;
        if open && deadline.is_some_and(|d| Instant::now() >= d) {
            open = false;
        }
        for c in &done {
            tally.ops += 1;
            tally.bytes += w.block as u64;
            if open && submitted < limit {
                dev.submit(c.slot, w.op, next_sector(&mut rng), w.block)?;
                submitted += 1;
            } else {
                inflight -= 1;
            }
        }
        dev.publish()?;
    }
    tally.secs = start.elapsed().as_secs_f64();
    Ok(tally)
}

/// Writes a pattern through the backend, reads it back and compares, so a
/// backend that drops data cannot post good numbers.
pub fn verify(dev: &mut BlkDevice, disk_bytes: u64) -> Result<(), WorkloadError> {
    let sector = (disk_bytes / 2) / 512;
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    dev.buffer_mut(0)[..pattern.len()].copy_from_slice(&pattern);
    let mut done = Vec::new();
    dev.submit(0, Op::Write, sector, pattern.len())?;
    dev.publish()?;
    dev.wait_completions(&mut done)?;
    dev.buffer_mut(1)[..pattern.len()].fill(0);
    dev.submit(1, Op::Read, sector, pattern.len())?;
    dev.publish()?;
    dev.wait_completions(&mut done)?;
    if dev.buffer_mut(1)[..pattern.len()] != pattern[..] {
        return Err(WorkloadError::Mismatch);
    }
    Ok(())
}
