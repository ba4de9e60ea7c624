//! Shipping throughput through a real broker: a spool of 4 KiB block writes
//! and one of 1500-byte frames, written beforehand with the vhost-tap spool
//! sink, shipped by the library's shipper into a Tansu broker started by
//! vmr-testkit, timed from start until the last record is acknowledged.
//!
//! ```sh
//! cargo bench -p capture-agent --bench ship            # 20000 records each
//! VMR_BENCH_RECORDS=50000 cargo bench -p capture-agent --bench ship
//! ```
//!
//! Needs the Tansu broker (scripts/setup.sh) and the schema-registry binary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_agent::config::{Compression, ShipperConfig};
use capture_agent::metrics::ShipperMetrics;
use capture_agent::shipper::{Shipper, ShipperHandle, ShipperOptions};
use capture_agent::source::SpoolSource;
use schema_registry::client::RegistryClient;
use vhost_tap::capture::{CaptureSink, Record, Recycle, SpoolConfig, SpoolSink};
use vmr_proto::config::Endpoints;
use vmr_proto::{pb, InstanceId};

fn write_spool(dir: &std::path::Path, n: u64, block: bool) -> u64 {
    let sink = SpoolSink::open(SpoolConfig {
        dir: dir.to_owned(),
        segment_bytes: 16 << 20,
        // Room for every record twice over (the spool preallocates it).
        capacity_bytes: n * if block { 4300 } else { 1700 } * 2,
        recycle: Recycle::Committed,
        instance_id: "vm-bench".into(),
        epoch: 1,
    })
    .expect("open the spool");
    let mut batch = Vec::new();
    for seq in 1..=n {
        let payload = if block {
            pb::event::Payload::Block(pb::BlockIo {
                device: "vda".into(),
                op: pb::BlockOp::Write as i32,
                sector: seq * 8,
                len: 4096,
                // Not all-zero: compressible like real data is, roughly.
                data: (0..4096u32)
                    .map(|i| ((i * 7 + seq as u32) % 251) as u8)
                    .collect(),
                ..Default::default()
            })
        } else {
            pb::event::Payload::Net(pb::NetFrame {
                device: "net0".into(),
                direction: pb::Direction::Rx as i32,
                frame: (0..1500u32)
                    .map(|i| ((i * 13 + seq as u32) % 253) as u8)
                    .collect(),
                ..Default::default()
            })
        };
        batch.push(Record::new(pb::Event {
            instance_id: "vm-bench".into(),
            seq,
            wall_time_ns: 1,
            mono_time_ns: 1,
            epoch: 1,
            payload: Some(payload),
        }));
        if batch.len() == 256 {
            sink.submit(&batch).expect("write");
            batch.clear();
        }
    }
    sink.submit(&batch).expect("write");
    sink.sync().expect("sync");
    vhost_tap::capture::spool::list_segments(dir)
        .unwrap()
        .iter()
        .map(|s| std::fs::metadata(dir.join(s)).unwrap().len())
        .sum()
}

fn main() {
    let n: u64 = std::env::var("VMR_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
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
    println!("shipping {n} records per case through Tansu 0.6 (sqlite) on 127.0.0.1\n");
    println!(
        "| case | compression | records | spool MB | seconds | events/s | MB/s (spool bytes) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, block) in [("4 KiB block writes", true), ("1500-byte frames", false)] {
        for compression in [Compression::Lz4, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let spool = dir.path().join(if block { "vda" } else { "net0" });
            let bytes = write_spool(&spool, n, block);
            let mut opts = ShipperOptions::for_spool(
                &spool,
                InstanceId::new("vm-bench").unwrap(),
                endpoints.clone(),
                ShipperConfig {
                    compression,
                    ..ShipperConfig::default()
                },
            );
            // A fresh source name per case: nothing of it is in Kafka yet.
            opts.source_name = format!(
                "bench-{}-{}",
                if block { "blk" } else { "net" },
                compression.as_librdkafka()
            );
            let metrics = Arc::new(ShipperMetrics::default());
            let shipper = Shipper::new(opts, SpoolSource::open(&spool).unwrap(), metrics.clone())
                .expect("a shipper");
            let start = Instant::now();
            let handle = ShipperHandle::spawn(shipper).unwrap();
            let deadline = start + Duration::from_secs(600);
            while metrics.snapshot().records_acked < n {
                assert!(
                    Instant::now() < deadline,
                    "not shipped in 600 s: {:?}",
                    metrics.snapshot()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let secs = start.elapsed().as_secs_f64();
            handle.stop();
            let m = metrics.snapshot();
            assert_eq!(m.delivery_errors, 0, "{m:?}");
            println!(
                "| {name} | {} | {n} | {:.1} | {secs:.2} | {:.0} | {:.1} |",
                compression.as_librdkafka(),
                bytes as f64 / 1e6,
                n as f64 / secs,
                bytes as f64 / 1e6 / secs
            );
        }
    }
    println!("\n(seconds include connecting and the registry lookups)");
}
