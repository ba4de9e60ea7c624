//! Spools written by the vhost-tap library, shipped by the `capture-agent`
//! binary into a real Tansu broker, read back with rdkafka and with the
//! Python analytics consumer.
//!
//! Heavy: needs Tansu (scripts/setup.sh), the schema-registry binary
//! (`cargo build --workspace --bins`), `protoc` and
//! `pip install 'confluent-kafka[protobuf]' requests protobuf`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use capture_agent::config::SensorsConfig;
use capture_agent::events::{EventLog, EventLogConfig};
use capture_agent::sensors::Sensors;
use common::*;
use vhost_tap::seq::{FileSeq, SeqSource};
use vmr_proto::topics::{partition_for, BLOCK, ENV, LIFECYCLE, NET};
use vmr_proto::{InstanceId, LifecycleKind};

/// A sysfs tree with one thermal zone.
fn thermal_tree(root: &std::path::Path) {
    let z = root.join("class/thermal/thermal_zone0");
    std::fs::create_dir_all(&z).unwrap();
    std::fs::write(z.join("type"), "x86_pkg_temp\n").unwrap();
    std::fs::write(z.join("temp"), "47000\n").unwrap();
}

#[test]
// Heavy: needs Tansu, schema-registry, protoc and pip confluent-kafka[protobuf].
fn device_and_agent_spools_land_gap_free_in_their_topics_and_partition() {
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let inst = "vm-ship-1";
    let seq = w.join("vm.seq");
    let blk = Device::open(inst, "vda", &w.join("vda"), &seq);
    let net = Device::open(inst, "net0", &w.join("net0"), &seq);
    let agent_seq: Arc<dyn SeqSource> = Arc::new(FileSeq::open(&seq).unwrap());
    let log = EventLog::open(
        InstanceId::new(inst).unwrap(),
        agent_seq.clone(),
        EventLogConfig::new(w.join("agent")),
    )
    .unwrap();
    log.lifecycle(LifecycleKind::Boot, "test boot").unwrap();
    const N: u64 = 500;
    for n in 0..N {
        blk.block_write(n);
        net.frame(n);
    }
    let sys = w.join("sys");
    thermal_tree(&sys);
    let sensors = Sensors::probe(&SensorsConfig {
        sys_root: sys,
        proc_root: w.join("no-proc"),
        ..SensorsConfig::default()
    });
    let samples = sensors.read();
    assert_eq!(samples.len(), 1, "{samples:?}");
    log.env(&samples).unwrap();
    log.lifecycle(LifecycleKind::Shutdown, "test shutdown")
        .unwrap();
    blk.sync();
    net.sync();
    blk.shutdown();
    net.shutdown();
    let total = agent_seq.peek() - 1;
    assert_eq!(total, 2 * N + 3);

    let config = stack.config_file(w, "");
    let mut procs: Vec<_> = ["vda", "net0", "agent"]
        .iter()
        .map(|d| ShipProcess::start(&config, &w.join(d), inst, w, d))
        .collect();
    let got = wait_for_records(
        &stack.broker.bootstrap(),
        inst,
        total as usize,
        Duration::from_secs(120),
    );
    let per_topic = check_exactly_once(&got, inst, total);
    assert_eq!(per_topic[BLOCK], N as usize);
    assert_eq!(per_topic[NET], N as usize);
    assert_eq!(per_topic[LIFECYCLE], 2);
    assert_eq!(per_topic[ENV], 1);
    let env = got.iter().find(|g| g.topic == ENV).unwrap();
    let Some(vmr_proto::pb::event::Payload::Env(s)) = &env.event.payload else {
        panic!("an env sample on {ENV}")
    };
    assert_eq!(
        (s.sensor.as_str(), s.value, s.unit.as_str()),
        ("thermal.x86_pkg_temp", 47.0, "celsius")
    );
    // Every process commits its last position, then stops cleanly.
    for (p, (dir, n)) in procs
        .iter_mut()
        .zip([("vda", N), ("net0", N), ("agent", 3)])
    {
        let m = p.wait_metrics("commit of the last record", Duration::from_secs(30), |m| {
            m.records_acked == n && m.in_flight == 0 && m.commits > 0
        });
        assert_eq!(m.records_sent, n, "{dir}: {m:?}");
        assert_eq!(
            m.delivery_errors + m.corrupt_frames + m.invalid_records,
            0,
            "{dir}: {m:?}"
        );
        let committed = vhost_tap::capture::spool::read_committed(&w.join(dir))
            .unwrap()
            .unwrap();
        assert_eq!(committed.seq, m.committed_seq);
        assert_eq!(m.committed_seq, m.acked_seq);
    }
    for p in procs {
        p.stop();
    }

    // The Python analytics consumer decodes them (confluent-kafka with our
    // registry).
    let pb2 = tempfile::tempdir().unwrap();
    generate_pb2(pb2.path());
    for (topic, n) in [(BLOCK, N as usize), (NET, N as usize), (LIFECYCLE, 2)] {
        let lines = analytics_consumer(&stack, topic, n, pb2.path());
        assert_eq!(lines.len(), n);
        let mut seqs: Vec<u64> = Vec::new();
        for l in &lines {
            assert_eq!(l["key"], inst);
            assert_eq!(l["partition"], partition_for(inst, 4));
            assert_eq!(l["event"]["instance_id"], inst);
            seqs.push(l["event"]["seq"].as_str().unwrap().parse().unwrap());
        }
        let mut want: Vec<u64> = got
            .iter()
            .filter(|g| g.topic == topic)
            .map(|g| g.event.seq)
            .collect();
        want.sort_unstable();
        seqs.sort_unstable();
        assert_eq!(seqs, want, "{topic}");
    }
    let lines = analytics_consumer(&stack, LIFECYCLE, 2, pb2.path());
    assert!(
        lines
            .iter()
            .any(|l| l["event"]["lifecycle"]["kind"] == "LIFECYCLE_KIND_BOOT"),
        "{lines:?}"
    );
}

#[test]
// Heavy: needs Tansu and schema-registry.
fn two_instances_land_in_their_own_partitions_and_never_mix() {
    // Two ids that hash to different partitions of 4.
    let a = "vm-a-1";
    let b = (0..100)
        .map(|i| format!("vm-b-{i}"))
        .find(|b| partition_for(b, 4) != partition_for(a, 4))
        .unwrap();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    const N: u64 = 300;
    let mut procs = Vec::new();
    for inst in [a, b.as_str()] {
        let dir = w.join(inst);
        std::fs::create_dir_all(&dir).unwrap();
        let d = Device::open(inst, "net0", &dir.join("net0"), &dir.join("seq"));
        for n in 0..N {
            d.frame(n);
        }
        d.sync();
        d.shutdown();
        let cfg_dir = dir.join("cfg");
        std::fs::create_dir_all(&cfg_dir).unwrap();
        let config = stack.config_file(&cfg_dir, "");
        procs.push(ShipProcess::start(
            &config,
            &dir.join("net0"),
            inst,
            w,
            inst,
        ));
    }
    for p in &mut procs {
        p.wait_metrics("all acked", Duration::from_secs(60), |m| {
            m.records_acked == N
        });
    }
    let got = read_topic(&stack.broker.bootstrap(), NET, 4);
    for inst in [a, b.as_str()] {
        check_exactly_once(&got, inst, N);
        let p = partition_for(inst, 4);
        let in_p: Vec<_> = got.iter().filter(|g| g.partition == p).collect();
        assert!(
            in_p.iter()
                .all(|g| g.key == inst && g.event.instance_id == inst),
            "{inst}'s partition {p} holds another instance's records"
        );
        assert_eq!(in_p.len(), N as usize);
    }
    for p in procs {
        p.stop();
    }
}
