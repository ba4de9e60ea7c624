//! The shipper under failure, as a real process against a real Tansu broker
//! and our registry: a 35 s broker outage while records keep arriving (and
//! a guest on a full spool under policy `block` waits no longer than the
//! block bound, then its records are dropped with GAP events),
//! `kill -9` mid-stream, an unreachable broker or registry at start, a
//! registry that refuses, a damaged spool frame.
//!
//! Heavy: needs Tansu (scripts/setup.sh) and the schema-registry binary
//! (`cargo build --workspace --bins`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use schema_registry::client::RegistryClient;
use vhost_tap::capture::{SpoolItem, SpoolReader};
use vmr_proto::topics::{BLOCK, NET};

/// Bytes held by the segment files of a spool.
fn spool_bytes(dir: &std::path::Path) -> u64 {
    vhost_tap::capture::spool::list_segments(dir)
        .unwrap()
        .iter()
        .map(|s| std::fs::metadata(dir.join(s)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// The block bound of the small-spool instance in the outage test.
const BOUND: Duration = Duration::from_secs(2);

/// A guest's disk on a small spool under policy `block` with [`BOUND`]:
/// 4 KiB writes, a FLUSH (tee sync) after every 8th, each "request" timed
/// as the guest would see it (the time its record call, or its FLUSH,
/// took). Returns the longest, and when it happened.
struct BoundedGuest {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Device, Latencies)>>,
}

/// When each request started, and how long it took.
type Latencies = Vec<(Instant, Duration)>;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

impl BoundedGuest {
    fn start(dev: Device, per_sec: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::Acquire) {
                let due = start.elapsed().as_secs_f64() * per_sec as f64;
                if (n as f64) >= due {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let t = Instant::now();
                dev.block_write(n);
                if n % 8 == 7 {
                    // A FLUSH completes once the writes before it are
                    // durable or covered by a GAP.
                    let _ = dev.tee.sync();
                }
                lat.push((t, t.elapsed()));
                n += 1;
            }
            (dev, lat)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (Device, Latencies) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("guest thread")
    }
}

#[test]
// Heavy: needs Tansu and schema-registry.
fn a_35_s_broker_outage_loses_and_repeats_nothing() {
    let mut stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let inst = "vm-outage-1";
    let seq = w.join("vm.seq");
    let blk = Device::open(inst, "vda", &w.join("vda"), &seq);
    let net = Device::open(inst, "net0", &w.join("net0"), &seq);
    let writer = Writer::start(vec![blk, net], 100);
    let config = stack.config_file(w, "");
    let mut vda = ShipProcess::start(&config, &w.join("vda"), inst, w, "vda");
    let mut net0 = ShipProcess::start(&config, &w.join("net0"), inst, w, "net0");
    vda.wait_metrics("first records shipped", Duration::from_secs(60), |m| {
        m.records_acked >= 100
    });
    net0.wait_metrics("first records shipped", Duration::from_secs(60), |m| {
        m.records_acked >= 100
    });

    stack.broker.stop();
    let before = (
        writer.count(),
        vda.metrics().unwrap(),
        net0.metrics().unwrap(),
    );
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(35));
    let during = (writer.count(), vda.metrics().unwrap());
    assert!(
        during.0 >= before.0 + 2000,
        "records kept arriving in the spools during the outage ({} -> {})",
        before.0,
        during.0
    );
    // Acknowledgements stop once the broker is gone; the spool buffers.
    assert!(
        during.1.records_acked <= before.1.records_acked + before.1.in_flight + 200,
        "{:?} vs {:?}",
        before.1,
        during.1
    );
    assert!(
        during.1.broker_errors + during.1.metadata_errors >= 1 && during.1.up == 0,
        "the outage is counted: {:?}",
        during.1
    );
    stack.broker.restart().expect("restart the broker");
    let outage_secs = outage.elapsed().as_secs();
    assert!(outage_secs >= 30);
    std::thread::sleep(Duration::from_secs(5));
    let n = writer.stop();

    let got = wait_for_records(
        &stack.broker.bootstrap(),
        inst,
        n as usize,
        Duration::from_secs(180),
    );
    let per_topic = check_exactly_once(&got, inst, n);
    assert_eq!(per_topic[BLOCK] + per_topic[NET], n as usize);
    let m = vda.wait_metrics("all acked", Duration::from_secs(60), |m| {
        m.in_flight == 0 && m.records_acked + m.records_already_shipped >= per_topic[BLOCK] as u64
    });
    // A delivery the outage failed ended a session (counted in
    // delivery_errors); the next one found in the partition tail what had
    // landed, and the exactly-once check above holds.
    let _ = net0.wait_metrics("all acked", Duration::from_secs(60), |m| m.in_flight == 0);
    let log = vda.log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shipping stopped"))
        .collect();
    eprintln!(
        "outage {outage_secs} s, {n} records, vda metrics {m:?}\nsession ends:\n{}",
        errors.join("\n")
    );
    vda.stop();
    net0.stop();
}

#[test]
// Heavy: needs Tansu and schema-registry.
fn a_full_spool_under_block_stalls_the_guest_no_longer_than_the_bound() {
    let mut stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let config = stack.config_file(w, "");
    // A disk on a 512 KiB spool, written at a rate the broker keeps up
    // with: it fills within seconds of the outage.
    let binst = "vm-outage-bound";
    let bspool = w.join("bound-vda");
    let bdev = Device::open_bounded(
        binst,
        "vda",
        &bspool,
        &w.join("bound.seq"),
        512 << 10,
        BOUND,
    );
    let guest = BoundedGuest::start(bdev, 50);
    let mut bship = ShipProcess::start(&config, &bspool, binst, w, "bound-vda");
    bship.wait_metrics("first records shipped", Duration::from_secs(60), |m| {
        m.records_acked >= 100
    });
    stack.broker.stop();
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(35));
    let outage_end = Instant::now();
    stack.broker.restart().expect("restart the broker");
    assert!(outage.elapsed().as_secs() >= 30);
    std::thread::sleep(Duration::from_secs(5));
    let (bdev, lat) = guest.stop();
    bdev.sync();
    bdev.shutdown();
    // The bounded instance: its guest never waited longer than the bound
    // (plus scheduling slack) while the broker was away, and what the full
    // spool could not take is covered by GAP events, nothing twice.
    let during: Vec<Duration> = lat
        .iter()
        .filter(|(t, _)| *t >= outage && *t <= outage_end)
        .map(|(_, d)| *d)
        .collect();
    let longest = during.iter().max().copied().unwrap_or_default();
    let mut sorted = during.clone();
    sorted.sort_unstable();
    let p99 = sorted
        .get(sorted.len() * 99 / 100)
        .copied()
        .unwrap_or_default();
    eprintln!(
        "bounded guest: {} requests during the outage, longest {longest:?}, p99 {p99:?}, bound {BOUND:?}",
        during.len()
    );
    assert!(
        during.len() > 500,
        "the guest kept writing during the outage ({} requests)",
        during.len()
    );
    assert!(
        longest <= BOUND + Duration::from_millis(750),
        "the guest stalled {longest:?}, longer than the bound {BOUND:?}"
    );
    wait_for_records(&stack.broker.bootstrap(), binst, 1, Duration::from_secs(60));
    let end = Instant::now() + Duration::from_secs(120);
    let mut last = 0;
    let got = loop {
        let m = bship.metrics().unwrap();
        if (m.in_flight == 0 && m.acked_seq == last && last > 0) || Instant::now() > end {
            break read_all(&stack.broker.bootstrap(), binst);
        }
        last = m.acked_seq;
        std::thread::sleep(Duration::from_secs(2));
    };
    let mut records: Vec<u64> = got.iter().map(|g| g.event.seq).collect();
    records.sort_unstable();
    assert!(
        records.windows(2).all(|w| w[0] < w[1]),
        "no seq twice in Kafka"
    );
    let gaps: Vec<(u64, u64, String)> = got
        .iter()
        .filter_map(|g| match &g.event.payload {
            Some(vmr_proto::pb::event::Payload::Lifecycle(l)) => l
                .gap
                .as_ref()
                .map(|x| (x.first_seq, x.count, x.reason.clone())),
            _ => None,
        })
        .collect();
    assert!(
        gaps.iter().any(|g| g.2.contains("past the block bound")),
        "a GAP names the bound: {gaps:?}"
    );
    let mut covered: std::collections::BTreeSet<u64> = records.iter().copied().collect();
    for (first, count, _) in &gaps {
        for n in *first..first + count {
            assert!(covered.insert(n), "seq {n} is both a record and in a GAP");
        }
    }
    let max = *covered.iter().next_back().unwrap();
    let missing: Vec<u64> = (1..=max)
        .filter(|n| !covered.contains(n))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "seqs neither shipped nor in a GAP: {missing:?}"
    );
    eprintln!(
        "bounded instance: {} records, {} GAP events covering {} numbers",
        records.len(),
        gaps.len(),
        gaps.iter().map(|g| g.1).sum::<u64>()
    );
    bship.stop();
}

/// Every record of `instance` on the event topics.
fn read_all(bootstrap: &str, instance: &str) -> Vec<Got> {
    let mut v = Vec::new();
    for t in vmr_proto::topics::EVENT_TOPICS {
        v.extend(
            read_topic(bootstrap, t, 4)
                .into_iter()
                .filter(|g| g.key == instance),
        );
    }
    v
}

#[test]
// Heavy: needs Tansu and schema-registry.
fn kill_9_mid_stream_then_restart_ships_every_seq_once() {
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let inst = "vm-kill-1";
    let seq = w.join("vm.seq");
    // Small spools: the writer can only go on when the shipper commits and
    // the spool recycles.
    let cap = 2 << 20;
    let blk = Device::open_with_capacity(inst, "vda", &w.join("vda"), &seq, cap);
    let net = Device::open_with_capacity(inst, "net0", &w.join("net0"), &seq, cap);
    let writer = Writer::start(vec![blk, net], 400);
    // Commits far apart: a kill lands between acknowledgement and commit.
    let config = stack.config_file(w, "commit-interval-ms = 3000\nrequest-timeout-secs = 30");
    let mut net0 = ShipProcess::start(&config, &w.join("net0"), inst, w, "net0");
    let mut vda = ShipProcess::start(&config, &w.join("vda"), inst, w, "vda-1");
    let mut already = 0;
    for round in 2..=3 {
        vda.wait_metrics("shipping", Duration::from_secs(60), |m| {
            m.records_acked >= 500 && m.commits >= 1
        });
        std::thread::sleep(Duration::from_millis(1500));
        vda.kill9();
        net0.wait_metrics("net keeps shipping", Duration::from_secs(30), |m| {
            m.records_acked > 0
        });
        std::thread::sleep(Duration::from_secs(1));
        vda = ShipProcess::start(&config, &w.join("vda"), inst, w, &format!("vda-{round}"));
        let m = vda.wait_metrics("resumed", Duration::from_secs(60), |m| {
            m.records_read > 0 && m.up == 1
        });
        already += m.records_already_shipped;
    }
    std::thread::sleep(Duration::from_secs(3));
    let n = writer.stop();
    let got = wait_for_records(
        &stack.broker.bootstrap(),
        inst,
        n as usize,
        Duration::from_secs(180),
    );
    let per_topic = check_exactly_once(&got, inst, n);
    let m = vda.wait_metrics("all acked", Duration::from_secs(60), |m| m.in_flight == 0);
    already = already.max(m.records_already_shipped);
    assert!(
        already > 0,
        "a kill between acknowledgement and commit leaves records in Kafka that the restart recognises"
    );
    let written = per_topic[BLOCK] as u64 * 4096;
    assert!(
        written > 3 * cap,
        "{written} bytes of writes went through a {cap}-byte spool"
    );
    assert!(spool_bytes(&w.join("vda")) <= cap + (256 << 10) + (64 << 10));
    eprintln!("{n} records, {already} recognised as shipped after kill -9");
    vda.stop();
    net0.stop();
}

#[test]
// Heavy: needs Tansu and schema-registry.
fn bad_input_is_reported_counted_and_retried() {
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let inst = "vm-bad-1";
    let seq = w.join("vm.seq");
    let net = Device::open(inst, "net0", &w.join("net0"), &seq);
    for n in 0..200 {
        net.frame(n);
    }
    net.sync();
    net.shutdown();
    let committed = |dir: &str| vhost_tap::capture::spool::read_committed(&w.join(dir)).unwrap();

    // (a) An unreachable broker at start: a clear error, retries, counted.
    let dead = vmr_testkit::free_port();
    let dir = w.join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write_config(
        &dir,
        &format!("127.0.0.1:{dead}"),
        &stack.registry.url(),
        "request-timeout-secs = 2",
    );
    let mut p = ShipProcess::start(&cfg, &w.join("net0"), inst, &dir, "a");
    let m = p.wait_metrics("retries", Duration::from_secs(60), |m| {
        m.sessions >= 3 && m.metadata_errors >= 2
    });
    assert_eq!((m.up, m.records_acked), (0, 0), "{m:?}");
    assert!(m.broker_errors >= 1, "{m:?}");
    let log = p.log_text();
    assert!(
        log.contains(&format!("metadata of vmr.block.v1 from 127.0.0.1:{dead}")),
        "{log}"
    );
    assert!(log.contains("retrying"), "{log}");
    p.stop();
    assert_eq!(
        committed("net0"),
        None,
        "nothing is committed that was not shipped"
    );

    // (b) An unreachable registry.
    let dir = w.join("b");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write_config(
        &dir,
        &stack.broker.bootstrap(),
        &format!("http://127.0.0.1:{dead}"),
        "request-timeout-secs = 2",
    );
    let mut p = ShipProcess::start(&cfg, &w.join("net0"), inst, &dir, "b");
    let m = p.wait_metrics("retries", Duration::from_secs(60), |m| {
        m.sessions >= 3 && m.registry_errors >= 2
    });
    assert_eq!(m.records_sent, 0, "{m:?}");
    let log = p.log_text();
    assert!(
        log.contains(&format!("schema registry at http://127.0.0.1:{dead}")),
        "{log}"
    );
    p.stop();

    // (c) A registry that refuses: a subject in read-only mode refuses the
    // registration; a deleted subject has no id to look up.
    let client = RegistryClient::new(&stack.registry.url()).unwrap();
    let rt = runtime();
    rt.block_on(client.set_mode(Some("vmr.block.v1-value"), "READONLY", false))
        .unwrap();
    let dir = w.join("c");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = stack.config_file(&dir, "register-schemas = true");
    let mut p = ShipProcess::start(&cfg, &w.join("net0"), inst, &dir, "c");
    let m = p.wait_metrics("refused", Duration::from_secs(60), |m| {
        m.registry_errors >= 2
    });
    assert_eq!(m.records_sent, 0);
    let log = p.log_text();
    assert!(
        log.contains("registering subject vmr.block.v1-value") && log.contains("read-only"),
        "{log}"
    );
    p.stop();
    rt.block_on(client.set_mode(Some("vmr.block.v1-value"), "READWRITE", false))
        .unwrap();
    rt.block_on(client.delete_subject("vmr.env.v1-value", false))
        .unwrap();
    let dir = w.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = stack.config_file(&dir, "");
    let mut p = ShipProcess::start(&cfg, &w.join("net0"), inst, &dir, "d");
    p.wait_metrics("refused", Duration::from_secs(60), |m| {
        m.registry_errors >= 2
    });
    let log = p.log_text();
    assert!(
        log.contains("looking up subject vmr.env.v1-value")
            && log.contains("register the schemas first"),
        "{log}"
    );
    p.stop();
    assert_eq!(committed("net0"), None);
    // Registered again, the same spool ships.
    rt.block_on(client.register_vmr_schemas()).unwrap();

    // (d) A damaged frame: reported, skipped, counted; everything else
    // ships once.
    let mut r = SpoolReader::from_position(&w.join("net0"), None);
    let mut ends = Vec::new();
    while let Some(item) = r.next_item().unwrap() {
        let SpoolItem::Event { event, position } = item else {
            panic!("a clean spool")
        };
        ends.push((event.seq, position));
    }
    assert_eq!(ends.len(), 200);
    let (lost_seq, _) = ends[50].clone();
    let start = &ends[49].1;
    let path = w.join("net0").join(&start.segment);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start.offset as usize + 40] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let dir = w.join("e");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = stack.config_file(&dir, "");
    let mut p = ShipProcess::start(&cfg, &w.join("net0"), inst, &dir, "e");
    let m = p.wait_metrics("shipped", Duration::from_secs(60), |m| {
        m.records_acked == 199 && m.in_flight == 0
    });
    assert_eq!(m.corrupt_frames, 1, "{m:?}");
    assert!(m.corrupt_bytes > 0);
    assert!(p.log_text().contains("damaged spool frame skipped"));
    p.stop();
    let got = read_topic(&stack.broker.bootstrap(), NET, 4);
    let mut seqs: Vec<u64> = got
        .iter()
        .filter(|g| g.key == inst)
        .map(|g| g.event.seq)
        .collect();
    seqs.sort_unstable();
    let want: Vec<u64> = (1..=200).filter(|s| *s != lost_seq).collect();
    assert_eq!(
        seqs, want,
        "only the damaged frame is missing, nothing twice"
    );
    assert_eq!(committed("net0").unwrap().seq, 200);
}
