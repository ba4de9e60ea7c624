//! The capture path in one run, one table:
//!
//! 1. capture throughput (events/s, MB/s of payload) of 4 KiB block writes
//!    and 1500-byte frames through the vhost-tap tee into a rolling spool,
//!    spool only, and through the broker (a shipper shipping the spool into
//!    Tansu while it is written; timed until the last record is
//!    acknowledged);
//! 2. guest I/O latency (p50/p99) of queue-depth-1 4 KiB writes from a
//!    synthetic vhost-user frontend (`vmr-bench`'s, standing in for the
//!    guest's driver) against `vhost-tap-blk` with the capture off and on
//!    (tee into a spool), in interleaved rounds (off, on, on, off, ...:
//!    `VMR_BENCH_ROUNDS` of each, same workload), so load on the machine
//!    falls on both; every round is also printed on its own;
//! 3. the cost of FLUSH durability as the guest sees it: in the same
//!    rounds, on the same backends, queue-depth-1 pairs of a 4 KiB write
//!    and a guest FLUSH; the FLUSH's latency with the capture off (the
//!    image's fsync only) and on (the spool's fsync first, then the
//!    image's);
//! 4. the FLUSH barrier in the tee alone: 4 KiB writes through the tee
//!    with `Tee::sync` (which fsyncs the spool) after every write, after
//!    every 32nd, and never.
//!
//! ```sh
//! cargo build --release -p vhost-tap -p schema-registry --bins
//! cargo bench -p capture-agent --bench capture
//! VMR_BENCH_RECORDS=50000 VMR_BENCH_SECONDS=5 VMR_BENCH_ROUNDS=4 cargo bench -p capture-agent --bench capture
//! ```
//!
//! `VMR_BENCH_SECONDS` is the length of one write phase of one round (the
//! FLUSH phase after it runs for the same time).
//!
//! Needs the Tansu broker (scripts/setup.sh) and the release binaries
//! above. The spools live in `$VMR_BENCH_DIR` (default `/var/tmp`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::ShipperConfig;
use capture_agent::metrics::ShipperMetrics;
use capture_agent::shipper::{Shipper, ShipperHandle, ShipperOptions};
use capture_agent::source::SpoolSource;
use schema_registry::client::RegistryClient;
use vhost_tap::capture::{Policy, Recycle, SpoolConfig, SpoolSink, Tee, TeeConfig};
use vhost_tap::seq::AtomicSeq;
use vmr_bench::frontend::{BlkDevice, Op};
use vmr_proto::config::Endpoints;
use vmr_proto::{pb, InstanceId};

fn bench_dir() -> PathBuf {
    std::env::var_os("VMR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

fn tee(dir: &Path, capacity: u64, recycle: Recycle, instance: &str) -> Tee {
    let sink = Arc::new(
        SpoolSink::open(SpoolConfig {
            dir: dir.to_owned(),
            segment_bytes: 16 << 20,
            capacity_bytes: capacity,
            recycle,
            instance_id: instance.into(),
            epoch: 1,
        })
        .expect("open the spool"),
    );
    let mut cfg = TeeConfig::new(instance);
    cfg.policy = Policy::Block;
    Tee::start(
        cfg,
        sink,
        Arc::new(AtomicSeq::new(1)),
        Arc::new(vhost_tap::metrics::Metrics::default()),
    )
    .expect("start the tee")
}

fn record(t: &Tee, block: bool, n: u64, data: &[u8]) {
    if block {
        t.record_block(
            "vda",
            0,
            pb::BlockOp::Write,
            n * 8,
            4096,
            Some(data),
            None,
            pb::BlockStatus::Ok,
        );
    } else {
        t.record_frame("net0", 0, pb::Direction::Rx, &data[..1500]);
    }
}

fn payload() -> Vec<u8> {
    // Not all-zero: compressible the way real data roughly is.
    (0..4096u32).map(|i| ((i * 7) % 251) as u8).collect()
}

struct Row {
    case: String,
    mode: String,
    events: u64,
    bytes: u64,
    secs: f64,
}

/// Spool only: as fast as the tee takes them, until durable.
fn spool_only(block: bool, n: u64) -> Row {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let t = tee(
        &dir.path().join("spool"),
        256 << 20,
        Recycle::Oldest,
        "vm-bench-s",
    );
    let data = payload();
    let start = Instant::now();
    for i in 0..n {
        record(&t, block, i, &data);
    }
    t.sync().expect("durable");
    let secs = start.elapsed().as_secs_f64();
    t.shutdown();
    Row {
        case: if block {
            "4 KiB block writes"
        } else {
            "1500-byte frames"
        }
        .into(),
        mode: "spool only".into(),
        events: n,
        bytes: n * if block { 4096 } else { 1500 },
        secs,
    }
}

/// Through the broker: the tee writes while a shipper ships; until the
/// broker acknowledged the last record.
fn through_broker(block: bool, n: u64, endpoints: &Endpoints, tag: &str) -> Row {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let spool = dir.path().join(if block { "vda" } else { "net0" });
    let instance = format!("vm-bench-{tag}");
    let t = tee(&spool, 256 << 20, Recycle::Committed, &instance);
    let opts = ShipperOptions::for_spool(
        &spool,
        InstanceId::new(instance.clone()).unwrap(),
        endpoints.clone(),
        ShipperConfig::default(),
    );
    let metrics = Arc::new(ShipperMetrics::default());
    let shipper =
        Shipper::new(opts, SpoolSource::open(&spool).unwrap(), metrics.clone()).expect("a shipper");
    let handle = ShipperHandle::spawn(shipper).unwrap();
    // Connected before the clock starts.
    let ready = Instant::now() + Duration::from_secs(60);
    while metrics.snapshot().up == 0 {
        assert!(Instant::now() < ready, "the shipper did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    let data = payload();
    let start = Instant::now();
    for i in 0..n {
        record(&t, block, i, &data);
    }
    t.sync().expect("durable");
    let deadline = Instant::now() + Duration::from_secs(600);
    while metrics.snapshot().records_acked < n {
        assert!(
            Instant::now() < deadline,
            "not shipped: {:?}",
            metrics.snapshot()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = start.elapsed().as_secs_f64();
    handle.stop();
    t.shutdown();
    Row {
        case: if block {
            "4 KiB block writes"
        } else {
            "1500-byte frames"
        }
        .into(),
        mode: "through the broker".into(),
        events: n,
        bytes: n * if block { 4096 } else { 1500 },
        secs,
    }
}

struct Backend {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backend(dir: &Path, image: &Path, capture: bool, tag: &str) -> Backend {
    let bin = vmr_testkit::workspace_bin("vhost-tap-blk").unwrap_or_else(|e| {
        panic!("{e} (build it with `cargo build --release -p vhost-tap --bins`)")
    });
    let socket = dir.join(format!("{tag}.sock"));
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .args(["--instance-id", "vm-bench-lat", "--device", "vda"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if capture {
        cmd.arg("--capture")
            .arg(dir.join(format!("{tag}.spool")))
            .args([
                "--capture-retain-mib",
                "256",
                "--capture-segment-mib",
                "16",
                "--capture-recycle",
                "oldest",
            ]);
    }
    let child = cmd.spawn().expect("start vhost-tap-blk");
    let end = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < end, "vhost-tap-blk does not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Backend { child, socket }
}

/// Queue-depth-1 4 KiB random writes for `secs`; every latency in µs.
fn latencies(b: &Backend, secs: f64, disk_sectors: u64) -> Vec<f64> {
    let mut dev = BlkDevice::connect(&b.socket).expect("connect the frontend");
    let mut out = Vec::new();
    let mut done = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    dev.buffer_mut(0)[..4096].copy_from_slice(&payload());
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % (disk_sectors / 8)) * 8;
        let t = Instant::now();
        dev.submit(0, Op::Write, sector, 4096).unwrap();
        dev.publish().unwrap();
        dev.wait_completions(&mut done).unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

/// Queue-depth-1 pairs of a 4 KiB write and a FLUSH for `secs`; every
/// FLUSH's latency in µs.
fn flush_latencies(b: &Backend, secs: f64, disk_sectors: u64) -> Vec<f64> {
    let mut dev = BlkDevice::connect(&b.socket).expect("connect the frontend");
    let mut out = Vec::new();
    let mut done = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    dev.buffer_mut(0)[..4096].copy_from_slice(&payload());
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % (disk_sectors / 8)) * 8;
        dev.submit(0, Op::Write, sector, 4096).unwrap();
        dev.publish().unwrap();
        dev.wait_completions(&mut done).unwrap();
        let t = Instant::now();
        dev.submit(0, Op::Flush, 0, 0).unwrap();
        dev.publish().unwrap();
        dev.wait_completions(&mut done).unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// FLUSH every `every` writes (0: never); returns events/s and the mean
/// barrier time in µs.
fn flush_cost(n: u64, every: u64) -> (f64, f64) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let t = tee(
        &dir.path().join("spool"),
        256 << 20,
        Recycle::Oldest,
        "vm-bench-f",
    );
    let data = payload();
    let (mut syncs, mut sync_time) = (0u64, 0f64);
    let start = Instant::now();
    for i in 0..n {
        record(&t, true, i, &data);
        if every > 0 && i % every == every - 1 {
            let s = Instant::now();
            t.sync().expect("durable");
            sync_time += s.elapsed().as_secs_f64();
            syncs += 1;
        }
    }
    t.sync().expect("durable");
    let secs = start.elapsed().as_secs_f64();
    t.shutdown();
    (
        n as f64 / secs,
        if syncs > 0 {
            sync_time / syncs as f64 * 1e6
        } else {
            0.0
        },
    )
}

fn main() {
    let n: u64 = std::env::var("VMR_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let secs: f64 = std::env::var("VMR_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let broker = vmr_testkit::broker::Broker::start().expect("start the Tansu broker");
    let registry =
        vmr_testkit::registry::Registry::start(&broker.bootstrap()).expect("start schema-registry");
    let client = RegistryClient::new(&registry.url()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.register_vmr_schemas())
        .expect("register the schemas");
    let endpoints = Endpoints {
        bootstrap_servers: broker.bootstrap(),
        registry_url: registry.url(),
        ..Endpoints::default()
    };

    let mut rows = Vec::new();
    for block in [true, false] {
        rows.push(spool_only(block, n));
        rows.push(through_broker(
            block,
            n,
            &endpoints,
            if block { "blk" } else { "net" },
        ));
    }

    // Latency: off and on interleaved (off, on, on, off, ...), the same
    // workload in every round; each round's backend runs the write phase
    // and then the write+FLUSH phase.
    let rounds: usize = std::env::var("VMR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(4);
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let image = dir.path().join("disk.img");
    let disk_bytes: u64 = 256 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(disk_bytes)
        .unwrap();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut fl_off, mut fl_on) = (Vec::new(), Vec::new());
    // (round, capture, p50, p99 of writes, p50, p99 of FLUSHes)
    let mut per_round = Vec::new();
    for round in 0..rounds {
        for capture in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let tag = format!("r{round}-{}", if capture { "on" } else { "off" });
            let b = backend(dir.path(), &image, capture, &tag);
            let mut v = latencies(&b, secs, disk_bytes / 512);
            let mut f = flush_latencies(&b, secs, disk_bytes / 512);
            drop(b);
            let _ = std::fs::remove_dir_all(dir.path().join(format!("{tag}.spool")));
            per_round.push((
                round,
                capture,
                v.len(),
                pct(&mut v, 0.5),
                pct(&mut v, 0.99),
                f.len(),
                pct(&mut f, 0.5),
                pct(&mut f, 0.99),
            ));
            if capture {
                on.extend(v);
                fl_on.extend(f);
            } else {
                off.extend(v);
                fl_off.extend(f);
            }
        }
    }
    let flush: Vec<(u64, (f64, f64))> = [1u64, 32, 0]
        .into_iter()
        .map(|e| (e, flush_cost(n.min(20_000), e)))
        .collect();

    println!(
        "capture path, one run (Tansu 0.6 sqlite on 127.0.0.1, spools in {})\n",
        bench_dir().display()
    );
    println!("| measure | case | events | seconds | events/s | MB/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| capture, {} | {} | {} | {:.2} | {:.0} | {:.1} |",
            r.mode,
            r.case,
            r.events,
            r.secs,
            r.events as f64 / r.secs,
            r.bytes as f64 / 1e6 / r.secs
        );
    }
    let (p50_off, p99_off) = (pct(&mut off, 0.5), pct(&mut off, 0.99));
    let (p50_on, p99_on) = (pct(&mut on, 0.5), pct(&mut on, 0.99));
    let ratio = p99_on / p99_off;
    println!(
        "\n| guest I/O latency, qd1 4 KiB writes, {rounds} interleaved rounds of {secs} s each | requests | p50 µs | p99 µs |\n| --- | --- | --- | --- |"
    );
    println!(
        "| capture off | {} | {p50_off:.0} | {p99_off:.0} |",
        off.len()
    );
    println!("| capture on | {} | {p50_on:.0} | {p99_on:.0} |", on.len());
    println!(
        "| on/off | | {:.2} | {ratio:.2} ({}, target <= 1.20) |",
        p50_on / p50_off,
        if ratio <= 1.2 { "ok" } else { "MISS" }
    );
    let (f50_off, f99_off) = (pct(&mut fl_off, 0.5), pct(&mut fl_off, 0.99));
    let (f50_on, f99_on) = (pct(&mut fl_on, 0.5), pct(&mut fl_on, 0.99));
    println!(
        "\n| guest FLUSH latency, qd1, a FLUSH after each 4 KiB write | FLUSHes | p50 µs | p99 µs |\n| --- | --- | --- | --- |"
    );
    println!(
        "| capture off (image fsync) | {} | {f50_off:.0} | {f99_off:.0} |",
        fl_off.len()
    );
    println!(
        "| capture on (spool fsync, then image fsync) | {} | {f50_on:.0} | {f99_on:.0} |",
        fl_on.len()
    );
    println!(
        "| on/off | | {:.2} | {:.2} |",
        f50_on / f50_off,
        f99_on / f99_off
    );
    println!(
        "\n| round | capture | writes | write p50 µs | write p99 µs | FLUSHes | FLUSH p50 µs | FLUSH p99 µs |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (round, capture, n, p50, p99, fnum, f50, f99) in &per_round {
        println!(
            "| {round} | {} | {n} | {p50:.0} | {p99:.0} | {fnum} | {f50:.0} | {f99:.0} |",
            if *capture { "on" } else { "off" }
        );
    }
    println!("\n| FLUSH barrier in the tee alone (`Tee::sync`), 4 KiB writes | events/s | mean FLUSH barrier µs |\n| --- | --- | --- |");
    for (every, (eps, us)) in flush {
        let what = match every {
            0 => "no FLUSH".to_string(),
            1 => "FLUSH after every write".to_string(),
            e => format!("FLUSH after every {e}th write"),
        };
        println!("| {what} | {eps:.0} | {us:.0} |");
    }
}
