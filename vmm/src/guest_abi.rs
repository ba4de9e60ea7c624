//! The port-I/O interface of the freestanding test guest
//! (`guest/test-guest`), and [`TestPorts`], the device that serves it.
//!
//! | port | dir | meaning |
//! | --- | --- | --- |
//! | `0x99` | out (byte) | boot marker: the guest's first instruction |
//! | `0x500` | out (u32) | a value of the running workload (counting) |
//! | `0x502` | in (u32) | next command word from the host (0: none) |
//! | `0x503` | out (u32) | a command finished (value: command-specific) |
//! | `0xf4` | out | stop the VM ("guest exit code N", see [`crate::vm::DEBUG_EXIT_PORT`]) |
//!
//! Commands (low byte = command, the rest = argument):
//!
//! - [`CMD_COUNT`] `n`: run the counting workload for `n` steps (0 =
//!   forever). Each step advances a 64-bit LCG, stores it in arena page
//!   `step % 64`, and writes its high half to `0x500`; every 16 steps a
//!   line `tick <step> <value>` goes to the serial port.
//! - [`CMD_DIRTY`]: then reads arena page numbers from `0x502` until
//!   [`END_OF_LIST`], writes a pattern (see [`dirty_pattern`]) into the first
//!   8 bytes of each, and reports the number of pages on `0x503`. It touches
//!   no other memory (no calls, no stack), so the pages it dirties are
//!   exactly the ones listed.
//! - [`CMD_EXIT`] `code`: writes `code` to the debug-exit port.
//! - [`CMD_DIRTY_SPAN`] (the guest's `workload.c`), then three words
//!   `first`, `count`, `stride` (see [`dirty_span_command`]): writes
//!   [`dirty_pattern`]`(page, round)` (with a round counter of its own) at
//!   the start of guest pages `first + i * stride`, `i < count`, skipping
//!   pages below [`SPAN_FIRST_PAGE`], and reports how many it wrote. Meant
//!   for dirtying a chosen share of a large guest between snapshots; the
//!   pages must lie inside guest memory.
//! - [`CMD_BLK_FILL`] (`workload.c`), then four words `first`, `runs`,
//!   `run_len`, `stride` in 4 KiB blocks (see [`blk_fill_command`]): brings
//!   the virtio block device up if it is not, writes `run_len` consecutive
//!   blocks at `first + r * stride` for `r < runs` (each: its block number
//!   and the fill's round as u32 LE, then `0xa5` bytes) and reports the
//!   number of blocks (or a negative error).
//!
//! Other command numbers are passed to the guest's `extra_workload` hook.
//! A read of `0xffff_ffff` (nothing serves the port, as under a plain
//! `vmm run`) makes the guest print `no command port: exiting` and stop the
//! VM with exit code 0.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::MmioDevice;

/// Boot marker port.
pub const BOOT_MARKER_PORT: u16 = 0x99;
/// Value port.
pub const VALUE_PORT: u16 = 0x500;
/// Command port.
pub const CMD_PORT: u16 = 0x502;
/// Done port.
pub const DONE_PORT: u16 = 0x503;
/// Counting workload.
pub const CMD_COUNT: u32 = 1;
/// Dirtying workload.
pub const CMD_DIRTY: u32 = 2;
/// Exit.
pub const CMD_EXIT: u32 = 3;
/// Ends a page list.
pub const END_OF_LIST: u32 = 0xffff_ffff;
/// Guest physical address of the arena the workloads write.
pub const ARENA_GPA: u64 = 0x40_0000;
/// Arena size in pages.
pub const ARENA_PAGES: u64 = 1024;
/// Dirty a span of guest pages (`workload.c`).
pub const CMD_DIRTY_SPAN: u32 = 0x14;
/// Write blocks of the virtio disk (`workload.c`).
pub const CMD_BLK_FILL: u32 = 0x15;
/// The first page [`CMD_DIRTY_SPAN`] writes (the end of the arena, 8 MiB).
pub const SPAN_FIRST_PAGE: u64 = 0x800;

/// The command words of [`CMD_DIRTY_SPAN`].
pub fn dirty_span_command(first: u32, count: u32, stride: u32) -> Vec<u32> {
    vec![CMD_DIRTY_SPAN, first, count, stride]
}

/// The command words of [`CMD_BLK_FILL`] (all in 4 KiB blocks).
pub fn blk_fill_command(first: u32, runs: u32, run_len: u32, stride: u32) -> Vec<u32> {
    vec![CMD_BLK_FILL, first, runs, run_len, stride]
}

/// The 8 bytes the dirty workload writes at the start of arena page `page`
/// on its `round`-th dirty command (rounds count from 1).
pub fn dirty_pattern(page: u32, round: u32) -> u64 {
    (u64::from(page) << 32) | u64::from(round) | 0x8000_0000
}

/// What the guest did, as seen on the ports.
#[derive(Debug, Default)]
pub struct PortsState {
    /// When the boot marker was written.
    pub boot_at: Option<Instant>,
    /// When the guest first read the command port.
    pub first_read_at: Option<Instant>,
    /// Values written to [`VALUE_PORT`], in order.
    pub values: Vec<u32>,
    /// Values written to [`DONE_PORT`], in order.
    pub done: Vec<u32>,
    /// Command words not yet read by the guest.
    pub commands: VecDeque<u32>,
}

/// The test ports device; clone it to keep a handle while the bus owns one.
#[derive(Debug, Clone, Default)]
pub struct TestPorts(Arc<(Mutex<PortsState>, Condvar)>);

impl TestPorts {
    /// A device with an empty command queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps the device's ports on `bus`.
    pub fn attach(&self, bus: &crate::bus::Bus) -> Result<(), crate::bus::BusError> {
        let dev = Arc::new(Mutex::new(self.clone()));
        bus.insert(u64::from(BOOT_MARKER_PORT), 1, dev.clone())?;
        bus.insert(u64::from(VALUE_PORT), 4, dev)?;
        Ok(())
    }

    /// Queues command words.
    pub fn push_commands(&self, words: &[u32]) {
        let mut g = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        g.commands.extend(words.iter().copied());
    }

    /// Runs `f` on the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut PortsState) -> R) -> R {
        f(&mut self.0 .0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until `pred` holds, up to `timeout`; returns whether it did.
    pub fn wait(&self, timeout: Duration, mut pred: impl FnMut(&PortsState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if pred(&g) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            g = self
                .0
                 .1
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl MmioDevice for TestPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Offsets are relative to the range: 0x500 + 2 = CMD_PORT.
        let mut g = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        let v = if offset == u64::from(CMD_PORT - VALUE_PORT) {
            g.first_read_at.get_or_insert_with(Instant::now);
            g.commands.pop_front().unwrap_or(0)
        } else {
            0
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (lock, cv) = &*self.0;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        // The boot marker range has length 1 so its offset is 0 as well;
        // tell them apart by width: the marker is a byte write.
        match (offset, data.len()) {
            (0, 1) => {
                g.boot_at.get_or_insert_with(Instant::now);
            }
            (0, _) => g.values.push(le_u32(data)),
            (3, _) => g.done.push(le_u32(data)),
            _ => {}
        }
        cv.notify_all();
    }
}

/// Errors building the test guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    /// make could not run.
    #[error("cannot run make for the test guest (is build-essential installed?)")]
    Spawn(#[source] std::io::Error),
    /// The output directory or its lock file cannot be used.
    #[error("cannot prepare the test guest's output directory")]
    OutDir(#[source] std::io::Error),
    /// make failed.
    #[error("building the test guest failed:\n{0}")]
    Failed(String),
}

/// The test guest's source directory.
pub fn test_guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/test-guest")
}

/// Builds the test guest with `make` into `out_dir` (incremental: make
/// rebuilds only when sources changed); returns the ELF's path.
///
/// Concurrent callers (test threads, test binaries) are serialized with a
/// lock file in `out_dir`.
pub fn build_test_guest(out_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    std::fs::create_dir_all(out_dir).map_err(GuestBuildError::OutDir)?;
    let lock =
        std::fs::File::create(out_dir.join(".build-lock")).map_err(GuestBuildError::OutDir)?;
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(GuestBuildError::OutDir(std::io::Error::last_os_error()));
    }
    let out = std::process::Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(test_guest_dir())
        .arg(format!("OUT={}", out_dir.display()))
        .output()
        .map_err(GuestBuildError::Spawn)?;
    if !out.status.success() {
        return Err(GuestBuildError::Failed(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out_dir.join("test-guest.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    #[test]
    fn ports_record_and_serve_commands() {
        let p = TestPorts::new();
        let bus = Bus::new("pio");
        p.attach(&bus).expect("free ports");
        p.push_commands(&[CMD_DIRTY, 7, END_OF_LIST]);
        assert!(bus.write(u64::from(BOOT_MARKER_PORT), &[1]));
        assert!(bus.write(u64::from(VALUE_PORT), &42u32.to_le_bytes()));
        let mut d = [0u8; 4];
        for want in [CMD_DIRTY, 7, END_OF_LIST, 0] {
            assert!(bus.read(u64::from(CMD_PORT), &mut d));
            assert_eq!(u32::from_le_bytes(d), want);
        }
        assert!(bus.write(u64::from(DONE_PORT), &1u32.to_le_bytes()));
        assert!(p.wait(Duration::from_millis(10), |s| s.done == vec![1]));
        p.with(|s| {
            assert!(s.boot_at.is_some());
            assert_eq!(s.values, vec![42]);
        });
    }
}
