//! A recorded instance end to end: the demo-linux guest under QEMU (TCG)
//! with its supervised vhost-tap backends, the shippers and a real Tansu
//! broker and registry.
//!
//! Heavy: needs root (network namespace, TAP), qemu-system-x86_64, the
//! demo-linux image (guest/linux/build.sh), the Tansu broker
//! (scripts/setup.sh) and the workspace binaries
//! (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test instance_qemu -- --test-threads=1`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use capture_agent::config::AgentConfig;
use capture_agent::instance::{LaunchOptions, RecordedInstance};
use common::{
    analytics_consumer, check_exactly_once, demo_linux_image_dir, generate_pb2, qemu_binary,
    request, wait_for_records, Got, Stack,
};
use vmr_hypervisor::Accel;
use vmr_proto::{pb, InstanceId};
use vmr_testkit::qemu::NetNs;

const PEER_CIDR: &str = "192.168.77.1/24";
const PEER_MAC: &str = "02:00:00:77:00:01";

fn mine<'a>(got: &'a [Got], inst: &str) -> Vec<&'a Got> {
    got.iter().filter(|g| g.key == inst).collect()
}

fn count_topic(got: &[&Got], topic: &str) -> usize {
    got.iter().filter(|g| g.topic == topic).count()
}

/// The GAP events' ranges.
fn gaps(got: &[&Got]) -> Vec<(u64, u64)> {
    got.iter()
        .filter_map(|g| match &g.event.payload {
            Some(pb::event::Payload::Lifecycle(l)) if l.kind == pb::LifecycleKind::Gap as i32 => {
                l.gap.as_ref().map(|g| (g.first_seq, g.count))
            }
            _ => None,
        })
        .collect()
}

fn lifecycle_kinds(got: &[&Got]) -> Vec<i32> {
    got.iter()
        .filter_map(|g| match &g.event.payload {
            Some(pb::event::Payload::Lifecycle(l)) => Some(l.kind),
            _ => None,
        })
        .collect()
}

/// No record reuses a seq, and every seq from 1 to the last is a record or
/// inside a GAP event's range. Returns the last seq and the GAP-covered
/// numbers that are also records (the backend's unclean-restart GAP spans
/// from its own last number to its restart, across numbers the other
/// devices of the instance used meanwhile).
fn check_covered(got: &[&Got]) -> (u64, Vec<u64>) {
    let mut records: Vec<u64> = got.iter().map(|g| g.event.seq).collect();
    records.sort_unstable();
    let dups: Vec<u64> = records
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        dups.is_empty(),
        "seqs used by two records: {:?}",
        &dups[..dups.len().min(20)]
    );
    let mut covered: std::collections::BTreeSet<u64> = records.iter().copied().collect();
    let mut overlap = Vec::new();
    for (first, count) in gaps(got) {
        for n in first..first + count {
            if !covered.insert(n) {
                overlap.push(n);
            }
        }
    }
    let last = *covered.iter().next_back().expect("some records");
    let missing: Vec<u64> = (1..=last)
        .filter(|n| !covered.contains(n))
        .take(20)
        .collect();
    assert!(
        missing.is_empty(),
        "seqs neither recorded nor in a GAP: {missing:?}"
    );
    (last, overlap)
}

#[test]
fn recorded_demo_linux_ships_gap_free_and_survives_a_backend_kill() {
    let qemu = qemu_binary();
    let image = demo_linux_image_dir();
    let blk_bin = vmr_testkit::workspace_bin("vhost-tap-blk")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    vmr_testkit::workspace_bin("vhost-tap-net")
        .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p vhost-tap --bins`)"));
    let stack = Stack::start();
    let work = tempfile::tempdir().expect("a temp dir");
    let w = work.path();
    let cfg = AgentConfig::load(&stack.config_file(w, "")).expect("the test config parses");
    let ns = NetNs::create().expect("create a network namespace (needs root and iproute2)");
    let inst = "vm-rec-1";

    let mut opts = LaunchOptions::new(
        &image,
        InstanceId::new(inst).unwrap(),
        "qemu",
        w.join("data"),
    );
    opts.netns = Some(ns.name().to_string());
    opts.endpoints = cfg.endpoints.clone();
    opts.shipper = cfg.shipper.clone();
    opts.accel = Accel::Tcg;
    opts.qemu_binary = Some(qemu);
    opts.supervisor.bin_dir = blk_bin.parent().map(Path::to_path_buf);
    opts.drain_timeout = Duration::from_secs(30);
    let rec = RecordedInstance::launch(opts)
        .unwrap_or_else(|e| panic!("{}", capture_agent::shipper::display_chain(&e)));

    ns.wait_for_link("vmrtap0", Duration::from_secs(60))
        .expect("the TAP appears in the namespace");
    ns.ip(&["link", "set", "dev", "vmrtap0", "address", PEER_MAC])
        .expect("set the peer MAC");
    ns.configure("vmrtap0", PEER_CIDR)
        .expect("configure the peer");

    for i in 0..3 {
        let reply = request(&ns, &format!("PUT key{i} value{i}")).unwrap_or_else(|e| panic!("{e}"));
        assert!(reply.starts_with("OK "), "PUT key{i}: {reply:?}");
    }

    // Block writes, received frames and the Boot event reach their topics.
    let bootstrap = stack.broker.bootstrap();
    let end = Instant::now() + Duration::from_secs(90);
    let mut got = loop {
        let got = wait_for_records(&bootstrap, inst, 1, Duration::from_secs(30));
        let m = mine(&got, inst);
        let ok = count_topic(&m, "vmr.block.v1") > 0
            && count_topic(&m, "vmr.net.v1") > 0
            && lifecycle_kinds(&m).contains(&(pb::LifecycleKind::Boot as i32));
        if ok || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let m = mine(&got, inst);
    let blk = count_topic(&m, "vmr.block.v1");
    let net = count_topic(&m, "vmr.net.v1");
    eprintln!(
        "before the kill: {blk} block, {net} net, {} records",
        m.len()
    );
    assert!(blk > 0, "no block records");
    assert!(net > 0, "no net records");
    assert!(
        lifecycle_kinds(&m).contains(&(pb::LifecycleKind::Boot as i32)),
        "no Boot lifecycle event"
    );
    let writes = m
        .iter()
        .filter(|g| matches!(&g.event.payload, Some(pb::event::Payload::Block(b)) if b.op == pb::BlockOp::Write as i32))
        .count();
    assert!(writes > 0, "no block writes among {blk} block records");
    // Each spool (one per backend, and the agent's own events) has its own
    // shipper, so at any instant one can be ahead of another: what landed
    // must become a gap-free 1..=max, each record once, within a bound.
    let settle = Instant::now() + Duration::from_secs(60);
    let max = loop {
        let m = mine(&got, inst);
        let max = m.iter().map(|g| g.event.seq).max().unwrap();
        if m.len() as u64 >= max || Instant::now() > settle {
            break max;
        }
        std::thread::sleep(Duration::from_millis(500));
        got = wait_for_records(&bootstrap, inst, 1, Duration::from_secs(30));
    };
    check_exactly_once(&got, inst, max);
    let m = mine(&got, inst);
    let blk = count_topic(&m, "vmr.block.v1");
    let net = count_topic(&m, "vmr.net.v1");

    // A stock Confluent consumer (examples/analytics_consumer.py) decodes the
    // guest's disk writes and received frames with the registry's schemas.
    let pb2 = tempfile::tempdir().unwrap();
    generate_pb2(pb2.path());
    for (topic, n) in [("vmr.block.v1", blk), ("vmr.net.v1", net)] {
        let lines = analytics_consumer(&stack, topic, n, pb2.path());
        assert_eq!(lines.len(), n, "{topic}: decoded {} of {n}", lines.len());
        let mut seqs: Vec<u64> = lines
            .iter()
            .map(|l| {
                assert_eq!(l["event"]["instance_id"], inst, "{topic}: {l}");
                l["event"]["seq"].as_str().unwrap().parse().unwrap()
            })
            .collect();
        let mut want: Vec<u64> = m
            .iter()
            .filter(|g| g.topic == topic)
            .map(|g| g.event.seq)
            .collect();
        seqs.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            seqs, want,
            "{topic}: the decoded seqs are the recorded ones"
        );
    }
    let vda_max = m
        .iter()
        .filter(
            |g| matches!(&g.event.payload, Some(pb::event::Payload::Block(b)) if b.device == "vda"),
        )
        .map(|g| g.event.seq)
        .max()
        .unwrap();

    // kill -9 the disk backend: the supervisor restarts it.
    let before = rec
        .backends()
        .into_iter()
        .find(|s| s.device == "vda")
        .unwrap();
    let pid = before.pid.expect("vda backend runs");
    // SAFETY: kill(2) on the backend's pid, which the supervisor has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let end = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let s = rec
            .backends()
            .into_iter()
            .find(|s| s.device == "vda")
            .unwrap();
        if s.restarts >= 1 && s.pid.is_some_and(|p| p != pid) {
            break s;
        }
        assert!(Instant::now() < end, "vda backend not restarted: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("restarted: {after:?}");

    // New records after the restart (frames of more requests).
    for i in 3..5 {
        let reply = request(&ns, &format!("PUT key{i} value{i}")).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("PUT key{i} after the restart: {reply:?}");
    }

    let report = rec.stop();
    eprintln!("stop: {:?}", report.exit);
    for (name, m) in &report.shippers {
        eprintln!("{name}: {m:?}");
    }

    let end = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = wait_for_records(&bootstrap, inst, 1, Duration::from_secs(30));
        let m = mine(&got, inst);
        let g = gaps(&m);
        let has_shutdown = lifecycle_kinds(&m).contains(&(pb::LifecycleKind::Shutdown as i32));
        if (!g.is_empty() && has_shutdown) || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let m = mine(&got, inst);
    let g = gaps(&m);
    eprintln!("after the stop: {} records, gaps {g:?}", m.len());
    assert!(!g.is_empty(), "no GAP event after the backend was killed");
    assert!(
        g.iter().all(|&(first, _)| first > vda_max),
        "a GAP covers numbers the disk backend recorded before the kill: {g:?} (its last {vda_max})"
    );
    let (last, overlap) = check_covered(&m);
    eprintln!("GAP numbers that other devices recorded: {overlap:?}");
    assert!(
        last > max,
        "no numbers after the restart (last {last}, before {max})"
    );
    assert!(
        lifecycle_kinds(&m).contains(&(pb::LifecycleKind::Shutdown as i32)),
        "no Shutdown lifecycle event"
    );

    // Nothing left running: the backends' pids are gone.
    for p in [pid, after.pid.unwrap()] {
        let gone = !Path::new(&format!("/proc/{p}")).exists();
        assert!(gone, "backend {p} still running");
    }
    drop(ns);
}
