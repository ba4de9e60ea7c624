//! Counts heap allocations per request on vhost-tap-blk's hot path: runs the
//! vhost-tap library's block backend in this process (through its
//! `server::Server`, the same code the binary runs), drives it with the
//! synthetic frontend, and counts allocations with a counting global allocator
//! over a steady-state window. The frontend's own loop allocates nothing, so
//! the count is the backend's (device thread and, with the tee on, the capture
//! sink thread).
//!
//! Prints one line per workload: `alloc <workload> tee=<on|off> per_request=<f>`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use vhost_tap::blk::disk::Disk;
use vhost_tap::blk::{BlockBackend, BlockConfig};
use vhost_tap::capture::{FileSink, Tee, TeeConfig};
use vhost_tap::metrics::Metrics;
use vhost_tap::seq::AtomicSeq;
use vhost_tap::server::Server;
use vmr_bench::frontend::BlkDevice;
use vmr_bench::workload::{self, Until, WORKLOADS};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every operation to the system allocator unchanged; the
// counter is a relaxed atomic that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "heap allocations per request of vhost-tap-blk, in-process")]
struct Args {
    /// Raw image to serve (pre-filled).
    #[arg(long)]
    image: PathBuf,
    /// Directory for the socket and the capture file.
    #[arg(long)]
    dir: PathBuf,
    /// Record requests to a capture file.
    #[arg(long)]
    tee: bool,
    /// Measured requests per workload (after a warm-up of the same size).
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let disk = Disk::open(&args.image, None, false).context("opening the image")?;
    let size = disk.size();
    let metrics = Arc::new(Metrics::default());
    let capture = args.dir.join("alloc-capture");
    let tee = if args.tee {
        // The same sink as the benchmark's tee-on backend: a rolling capture
        // keeping the newest 1 GiB in 64 MiB segments.
        let sink = Arc::new(FileSink::create(&args.dir.join("x.events"))?);
        Some(Tee::start(
            TeeConfig::new("bench"),
            sink,
            Arc::new(AtomicSeq::new(1)),
            metrics.clone(),
        )?)
    } else {
        None
    };
    let backend = BlockBackend::new(BlockConfig::new("vda"), disk, tee.clone(), None, metrics)?;
    let socket = args.dir.join("alloc.sock");
    let server = Server::spawn("bench-blk", backend, &socket, true)?;
    let mut dev = BlkDevice::connect(&socket).context("connecting to the in-process backend")?;
    workload::verify(&mut dev, size)?;
    for w in WORKLOADS {
        // Large requests move more data each: scale their count down (to at
        // least 500) so every workload moves a similar volume.
        let n = (args.requests * 4096 / w.block as u64)
            .max(500)
            .min(args.requests);
        // Warm up: buffers and queues reach their steady-state capacity.
        workload::run(&mut dev, w, size, Until::Requests(n), 1)?;
        let before = ALLOCS.load(Ordering::Relaxed);
        let t = workload::run(&mut dev, w, size, Until::Requests(n), 2)?;
        let after = ALLOCS.load(Ordering::Relaxed);
        println!(
            "alloc {} tee={} per_request={:.3}",
            w.name,
            if args.tee { "on" } else { "off" },
            (after - before) as f64 / t.ops as f64
        );
    }
    drop(dev);
    server.stop()?;
    if let Some(tee) = tee {
        tee.shutdown();
    }
    let _ = std::fs::remove_dir_all(&capture);
    Ok(())
}
