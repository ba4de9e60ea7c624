//! Replay mode end to end over real sockets: an in-process vhost-user
//! front-end drives the backends, and the replayer's side is the control
//! socket (`ControlClient`): scheduled delivery on a clock that is paused,
//! stepped and scaled, delivery acknowledgements with the original `seq`,
//! the live output stream, block comparison, and seeded, scheduled and
//! targeted faults that never stall the device thread.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_tap::blk::{BlockBackend, BlockConfig, BlockError, Disk};
use vhost_tap::capture::replay::{hash128, Expectations, ExpectedIo, Outputs, ReplayClock};
use vhost_tap::capture::{MemorySink, Tee, TeeConfig};
use vhost_tap::control::{encode_hex, ControlClient, ControlServer, ControlTargets};
use vhost_tap::fault::{FaultHook, FaultKind, FaultRule, RuleFaults};
use vhost_tap::metrics::Metrics;
use vhost_tap::net::replay::{Injected, SourceConfig};
use vhost_tap::net::{ChannelReplaySource, NetBackend, NetConfig, ReplaySource};
use vhost_tap::seq::AtomicSeq;
use vhost_tap::server::Server;
use vhost_tap::testing::{BlkRequestBuilder as Rb, DriverQueue, GuestRam, TestFrontend};
use vhost_tap::Mode;
use virtio_bindings::virtio_blk::*;
use vmr_proto::pb;

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

struct NetRig {
    _dir: tempfile::TempDir,
    ctl: std::path::PathBuf,
    server: Option<Server>,
    _control: ControlServer,
    tee: Tee,
    sink: Arc<MemorySink>,
    ram: GuestRam,
    fe: TestFrontend,
    rx: DriverQueue,
    tx: DriverQueue,
    rxbufs: Vec<u64>,
}

impl Drop for NetRig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
        self.tee.shutdown();
    }
}

fn net_rig(rx_buffers: usize) -> NetRig {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ctl = dir.path().join("net.ctl");
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(MemorySink::new());
    let tee = Tee::start(
        TeeConfig::new("clone-1"),
        sink.clone(),
        Arc::new(AtomicSeq::default()),
        metrics.clone(),
    )
    .unwrap();
    let faults = Arc::new(RuleFaults::new());
    let outputs = Arc::new(Outputs::new());
    let mut sc = SourceConfig::new("net0");
    sc.faults = Some(faults.clone() as Arc<dyn FaultHook>);
    sc.outputs = Some(outputs.clone());
    sc.metrics = metrics.clone();
    let source = Arc::new(ChannelReplaySource::with_config(sc).unwrap());
    let mut cfg = NetConfig::new("net0");
    cfg.mode = Mode::Replay;
    cfg.outputs = Some(outputs.clone());
    let backend = NetBackend::new(
        cfg,
        None,
        Some(source.clone() as Arc<dyn ReplaySource>),
        Some(tee.clone()),
        Some(faults.clone()),
        metrics.clone(),
    )
    .unwrap();
    let server = Server::spawn("net", backend, &sock, false).unwrap();
    let control = ControlServer::spawn(
        &ctl,
        ControlTargets {
            metrics,
            faults: Some(faults),
            clock: Some(source.clock().clone()),
            source: Some(source),
            outputs: Some(outputs),
            ..Default::default()
        },
    )
    .unwrap();
    let mut ram = GuestRam::new(32 << 20).unwrap();
    let mut fe = TestFrontend::connect(&sock, 2).unwrap();
    let mut rx = DriverQueue::new(&ram, 0x1_0000, 256);
    let tx = DriverQueue::new(&ram, 0x2_0000, 256);
    fe.setup(&ram, &[&rx, &tx], 0).unwrap();
    let mut rxbufs = vec![0; 256];
    for _ in 0..rx_buffers {
        let b = ram.alloc(2048).unwrap();
        let h = rx.add_chain(&ram, &[(b, 2048, true)]);
        rx.publish(&ram, h);
        rxbufs[h as usize] = b;
    }
    fe.kick(0).unwrap();
    NetRig {
        _dir: dir,
        ctl,
        server: Some(server),
        _control: control,
        tee,
        sink,
        ram,
        fe,
        rx,
        tx,
        rxbufs,
    }
}

impl NetRig {
    fn client(&self) -> ControlClient {
        ControlClient::connect(&self.ctl).unwrap()
    }

    fn subscriber(&self) -> ControlClient {
        let mut c = self.client();
        c.set_timeout(Duration::from_secs(10)).unwrap();
        c.subscribe(false).unwrap();
        c
    }

    /// Sends a frame from the guest.
    fn transmit(&mut self, f: &[u8]) {
        let mut pkt = vec![0u8; 12];
        pkt.extend_from_slice(f);
        let b = self.ram.alloc(pkt.len() as u64).unwrap();
        self.ram.write(b, &pkt);
        let h = self
            .tx
            .add_chain(&self.ram, &[(b, pkt.len() as u32, false)]);
        self.tx.publish(&self.ram, h);
        self.fe.kick(1).unwrap();
    }

    /// Frames the guest received so far (without the virtio header).
    fn received(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used(&self.ram) {
            let mut f = vec![0u8; len as usize];
            self.ram.read(self.rxbufs[head as usize], &mut f);
            out.push(f.split_off(12));
        }
        out
    }
}

/// The next stream line of `kind`, skipping others.
fn next_of(c: &mut ControlClient, kind: &str) -> Value {
    loop {
        let v = c.next_output().unwrap();
        if v["type"] == kind {
            return v;
        }
    }
}

#[test]
fn scheduled_frames_follow_the_clock_and_are_acknowledged_with_their_seq() {
    let mut rig = net_rig(64);
    let mut c = rig.client();
    let mut sub = rig.subscriber();
    // Three frames at 10, 20 and 30 ms of replay time; the clock is paused.
    let frames: Vec<Injected> = (1..=3)
        .map(|i| Injected {
            seq: Some(100 + i),
            at_ns: Some(i * 10_000_000),
            frame: frame(i as u8, 60 + i as usize),
        })
        .collect();
    c.inject_batch(&frames).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.rx.used_idx(&rig.ram), 0, "paused: nothing delivered");
    let status = c.request(&json!({"cmd": "status"})).unwrap();
    assert_eq!(status["pending"], 3);

    // Step to 10 ms: exactly the first frame.
    c.clock("step", None, Some(10_000_000)).unwrap();
    let d = next_of(&mut sub, "delivered");
    assert_eq!(d["seq"], 101);
    assert_eq!(d["at_ns"], 10_000_000);
    assert_eq!(d["clock_ns"], 10_000_000, "a paused clock does not move");
    assert_eq!(d["late_ns"], 0);
    assert_eq!(d["len"], 61);
    assert!(d["clone_seq"].as_u64().is_some());
    assert_eq!(rig.received(), vec![frames[0].frame.clone()]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rig.rx.used_idx(&rig.ram), 1);

    // Run at 0.5x: 20 ms of replay time take about 40 ms.
    c.clock("scale", Some(0.5), None).unwrap();
    let t = Instant::now();
    c.clock("resume", None, None).unwrap();
    let d2 = next_of(&mut sub, "delivered");
    let d3 = next_of(&mut sub, "delivered");
    let took = t.elapsed();
    assert_eq!(
        (d2["seq"].as_u64(), d3["seq"].as_u64()),
        (Some(102), Some(103))
    );
    assert!(took >= Duration::from_millis(38), "0.5x: {took:?}");
    assert!(d3["clock_ns"].as_u64().unwrap() >= 30_000_000);
    assert!(d3["late_ns"].as_i64().unwrap() >= 0);

    // The guest answers: its frame names the last seq it had received.
    rig.transmit(&frame(9, 80));
    let tx = next_of(&mut sub, "tx");
    assert_eq!(tx["after_seq"], 103);
    assert_eq!(tx["frame"], encode_hex(&frame(9, 80)));
    assert_eq!(
        rig.received(),
        vec![frames[1].frame.clone(), frames[2].frame.clone()]
    );

    // An unscheduled inject (the older form) is delivered at once, without seq.
    c.clock("pause", None, None).unwrap();
    c.inject(&frame(7, 64)).unwrap();
    let d = next_of(&mut sub, "delivered");
    assert_eq!(d["seq"], Value::Null);
    assert_eq!(rig.received(), vec![frame(7, 64)]);
}

#[test]
fn faults_are_seeded_targeted_and_never_stall_the_device_thread() {
    let mut rig = net_rig(128);
    let mut c = rig.client();
    let mut sub = rig.subscriber();
    c.clock("resume", None, None).unwrap();
    // Delay one received frame by 300 ms of replay time.
    c.fault(&FaultRule {
        delay_ms: Some(300),
        ..FaultRule::frame(FaultKind::Delay, "rx", 1)
    })
    .unwrap();
    let t = Instant::now();
    c.inject_at(Some(1), None, &frame(1, 60)).unwrap();
    let f = next_of(&mut sub, "fault");
    assert_eq!(
        (f["kind"].as_str(), f["seq"].as_u64()),
        (Some("delay"), Some(1))
    );
    // While it waits, the device thread serves the guest: a transmitted
    // frame and another received frame go through at once.
    rig.transmit(&frame(2, 60));
    let tx = next_of(&mut sub, "tx");
    assert_eq!(tx["after_seq"], Value::Null, "nothing delivered yet");
    c.inject_at(Some(2), None, &frame(3, 60)).unwrap();
    let d = next_of(&mut sub, "delivered");
    assert_eq!(d["seq"], 2);
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    let d = next_of(&mut sub, "delivered");
    assert_eq!(d["seq"], 1);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );

    // A seeded probabilistic drop from seq 1000 on: the same seed drops the
    // same frames.
    let dropped = |rig: &mut NetRig, c: &mut ControlClient, sub: &mut ControlClient, seed| {
        c.request(&json!({"cmd": "clear-faults"})).unwrap();
        let id = c
            .fault(&FaultRule {
                at_seq: Some(1000),
                probability: Some(0.5),
                seed,
                count: 1000,
                device: Some("net0".into()),
                ..FaultRule::frame(FaultKind::Drop, "rx", 1)
            })
            .unwrap();
        let frames: Vec<Injected> = (990..1030)
            .map(|s| Injected {
                seq: Some(s),
                at_ns: None,
                frame: frame((s % 200) as u8, 60),
            })
            .collect();
        c.inject_batch(&frames).unwrap();
        let mut seen = Vec::new();
        let mut drops = Vec::new();
        while seen.len() + drops.len() < frames.len() {
            let v = sub.next_output().unwrap();
            match v["type"].as_str() {
                Some("delivered") => seen.push(v["seq"].as_u64().unwrap()),
                Some("fault") => {
                    assert_eq!(v["rule"].as_u64(), Some(id));
                    drops.push(v["seq"].as_u64().unwrap())
                }
                _ => {}
            }
        }
        assert!(seen.iter().all(|&s| s < 1000 || !drops.contains(&s)));
        assert!(drops.iter().all(|&s| s >= 1000), "{drops:?}");
        // Give the guest its buffers back.
        for (head, _) in std::iter::from_fn(|| rig.rx.pop_used(&rig.ram)).collect::<Vec<_>>() {
            rig.rx.publish(&rig.ram, head);
        }
        rig.fe.kick(0).unwrap();
        drops
    };
    let a = dropped(&mut rig, &mut c, &mut sub, 11);
    let b = dropped(&mut rig, &mut c, &mut sub, 11);
    let other = dropped(&mut rig, &mut c, &mut sub, 12);
    assert_eq!(a, b, "same seed, same drops");
    assert_ne!(a, other);
    assert!(!a.is_empty() && a.len() < 30, "{a:?}");

    // A fault at a replay time fires only once the clock is there.
    c.request(&json!({"cmd": "clear-faults"})).unwrap();
    c.clock("pause", None, None).unwrap();
    c.clock("set", None, Some(1_000_000_000)).unwrap();
    c.request(&json!({"cmd": "fault", "rule": {"kind": "duplicate", "direction": "tx", "at_ns": 2_000_000_000u64}}))
        .unwrap();
    rig.transmit(&frame(20, 60));
    let tx = next_of(&mut sub, "tx");
    assert_eq!(tx["frame"], encode_hex(&frame(20, 60)));
    c.clock("step", None, Some(1_000_000_000)).unwrap();
    rig.transmit(&frame(21, 60));
    let f = next_of(&mut sub, "fault");
    assert_eq!(
        (f["kind"].as_str(), f["target"].as_str()),
        (Some("duplicate"), Some("tx"))
    );
    let t1 = next_of(&mut sub, "tx");
    let t2 = next_of(&mut sub, "tx");
    assert_eq!(t1["frame"], t2["frame"]);
    // The clone's own capture holds the duplicated frame twice.
    rig.tee.sync().unwrap();
    let recorded = rig
        .sink
        .take()
        .into_iter()
        .filter(|e| match &e.payload {
            Some(pb::event::Payload::Net(n)) => {
                n.direction == pb::Direction::Tx as i32 && n.frame == frame(21, 60)
            }
            _ => false,
        })
        .count();
    assert_eq!(recorded, 2);
}

#[test]
fn injection_timing_at_1x() {
    let rig = net_rig(200);
    let mut c = rig.client();
    let mut sub = rig.subscriber();
    let n = 100u64;
    let frames: Vec<Injected> = (0..n)
        .map(|i| Injected {
            seq: Some(i + 1),
            at_ns: Some(20_000_000 + i * 2_000_000),
            frame: frame(i as u8, 60),
        })
        .collect();
    c.inject_batch(&frames).unwrap();
    c.clock("resume", None, None).unwrap();
    let mut late: Vec<i64> = (0..n)
        .map(|_| next_of(&mut sub, "delivered")["late_ns"].as_i64().unwrap())
        .collect();
    late.sort_unstable();
    let p50 = late[late.len() / 2];
    let p99 = late[late.len() * 99 / 100];
    println!("injection timing at 1x over {n} frames: p50 {p50} ns, p99 {p99} ns");
    assert!(late[0] >= 0, "never early");
    assert!(p99 < 20_000_000, "p99 {p99} ns on a loaded 2-core machine");
}

// ---------------------------------------------------------------- block

const DISK: usize = 1 << 20;

struct BlkRig {
    _dir: tempfile::TempDir,
    ctl: std::path::PathBuf,
    server: Option<Server>,
    _control: ControlServer,
    ram: GuestRam,
    fe: TestFrontend,
    q: DriverQueue,
    done: u16,
}

impl Drop for BlkRig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
    }
}

fn blk_rig(dir: tempfile::TempDir) -> BlkRig {
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0x5au8; DISK]).unwrap();
    let ov = dir.path().join("disk.overlay");
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("blk.ctl");
    let disk = Disk::open(&image, Some(&ov), false).unwrap();
    let metrics = Arc::new(Metrics::default());
    let faults = Arc::new(RuleFaults::new());
    let outputs = Arc::new(Outputs::new());
    let expect = Arc::new(Expectations::new(1000));
    let clock = Arc::new(ReplayClock::new());
    let mut cfg = BlockConfig::new("vda");
    cfg.mode = Mode::Replay;
    cfg.outputs = Some(outputs.clone());
    cfg.expect = Some(expect.clone());
    cfg.clock = Some(clock.clone());
    let backend =
        BlockBackend::new(cfg, disk, None, Some(faults.clone()), metrics.clone()).unwrap();
    let server = Server::spawn("blk", backend, &sock, false).unwrap();
    let control = ControlServer::spawn(
        &ctl,
        ControlTargets {
            metrics,
            faults: Some(faults),
            clock: Some(clock),
            outputs: Some(outputs),
            expect: Some(expect),
            ..Default::default()
        },
    )
    .unwrap();
    let ram = GuestRam::new(16 << 20).unwrap();
    let mut fe = TestFrontend::connect(&sock, 1).unwrap();
    let q = DriverQueue::new(&ram, 0x1_0000, 256);
    fe.setup(&ram, &[&q], 0).unwrap();
    BlkRig {
        _dir: dir,
        ctl,
        server: Some(server),
        _control: control,
        ram,
        fe,
        q,
        done: 0,
    }
}

impl BlkRig {
    /// Runs one request; returns its status and the data read.
    fn io(&mut self, t: u32, sector: u64, data: &[u8]) -> (u8, Vec<u8>) {
        let (hdr, status) = Rb::header(&mut self.ram, t, sector).unwrap();
        let buf = self.ram.alloc(data.len().max(1) as u64).unwrap();
        let read = t == VIRTIO_BLK_T_IN;
        if !read {
            self.ram.write(buf, data);
        }
        let mut chain = vec![(hdr, 16, false)];
        if !data.is_empty() {
            chain.push((buf, data.len() as u32, read));
        }
        chain.push((status, 1, true));
        let head = self.q.add_chain(&self.ram, &chain);
        self.q.publish(&self.ram, head);
        self.fe.kick(0).unwrap();
        self.done += 1;
        let want = self.done;
        assert!(TestFrontend::wait_for(10, || self.q.used_idx(&self.ram) == want));
        let mut out = vec![0u8; data.len()];
        if read {
            self.ram.read(buf, &mut out);
        }
        (Rb::status(&self.ram, status), out)
    }
}

fn rec(seq: u64, op: &str, sector: u64, data: &[u8]) -> ExpectedIo {
    ExpectedIo {
        seq,
        op: op.into(),
        sector,
        len: data.len() as u32,
        hash: (!data.is_empty()).then(|| encode_hex(&hash128(data))),
        data: None,
        status: Some("ok".into()),
    }
}

#[test]
fn block_requests_are_compared_with_the_original_records() {
    let mut rig = blk_rig(tempfile::tempdir().unwrap());
    let mut c = ControlClient::connect(&rig.ctl).unwrap();
    let mut sub = ControlClient::connect(&rig.ctl).unwrap();
    sub.set_timeout(Duration::from_secs(10)).unwrap();
    sub.subscribe(true).unwrap();
    let a = vec![1u8; 4096];
    let b = vec![2u8; 4096];
    // The original: write A at 0, write B at 8, read back 0 (A), flush.
    let loaded = c
        .expect(&[
            rec(10, "write", 0, &a),
            rec(11, "write", 8, &b),
            rec(12, "read", 0, &a),
            ExpectedIo {
                data: None,
                hash: None,
                ..rec(13, "flush", 0, &[])
            },
        ])
        .unwrap();
    assert_eq!(loaded, 4);
    // The clone writes B at 8 first (another order), then A at 0.
    assert_eq!(rig.io(VIRTIO_BLK_T_OUT, 8, &b).0, VIRTIO_BLK_S_OK as u8);
    let l = next_of(&mut sub, "block");
    assert_eq!(
        (
            l["op"].as_str(),
            l["answers"].as_u64(),
            l["matched"].as_bool()
        ),
        (Some("write"), Some(11), Some(true))
    );
    assert_eq!(l["data"], encode_hex(&b), "subscribed with data");
    assert_eq!(l["hash"], encode_hex(&hash128(&b)));
    rig.io(VIRTIO_BLK_T_OUT, 0, &a);
    assert_eq!(next_of(&mut sub, "block")["answers"], 10);
    // The read returns A: it matches seq 12.
    let (st, got) = rig.io(VIRTIO_BLK_T_IN, 0, &[0; 4096]);
    assert_eq!((st, got), (VIRTIO_BLK_S_OK as u8, a.clone()));
    let l = next_of(&mut sub, "block");
    assert_eq!(
        (l["answers"].as_u64(), l["matched"].as_bool()),
        (Some(12), Some(true))
    );
    assert_eq!(l["hash"], encode_hex(&hash128(&a)));
    let report = c.compare().unwrap();
    assert_eq!(report["matched"], 3);
    assert_eq!(report["pending"], 1);
    assert_eq!(report["first_mismatch"], Value::Null);
    // A divergent write and an extra read: the first mismatch names both sides.
    c.expect(&[rec(20, "write", 16, &a)]).unwrap();
    rig.io(VIRTIO_BLK_T_OUT, 16, &b);
    let l = next_of(&mut sub, "block");
    assert_eq!(
        (l["answers"].as_u64(), l["matched"].as_bool()),
        (Some(20), Some(false))
    );
    rig.io(VIRTIO_BLK_T_IN, 100, &[0; 512]);
    rig.io(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let report = c.compare().unwrap();
    assert_eq!(
        (
            &report["matched"],
            &report["mismatched"],
            &report["unexpected"],
            &report["pending"]
        ),
        (&json!(4), &json!(1), &json!(1), &json!(0))
    );
    let m = &report["first_mismatch"];
    assert_eq!(m["kind"], "content");
    assert_eq!(m["original"]["seq"], 20);
    assert_eq!(m["original"]["hash"], encode_hex(&hash128(&a)));
    assert_eq!(m["clone"]["hash"], encode_hex(&hash128(&b)));
    // Bad records are refused whole, with the record named.
    let e = c
        .request(&json!({"cmd": "expect", "records": [{"seq": 5, "op": "write", "hash": "zz"}]}))
        .unwrap_err();
    assert!(e.to_string().contains("record 5"), "{e}");
    // Net-only commands are refused by a block backend.
    assert!(c.inject(&frame(1, 60)).is_err());
}

#[test]
fn block_faults_target_sectors_sequence_and_time() {
    let mut rig = blk_rig(tempfile::tempdir().unwrap());
    let mut c = ControlClient::connect(&rig.ctl).unwrap();
    let d = vec![3u8; 512];
    c.expect(&[rec(50, "write", 0, &d), rec(60, "write", 0, &d)])
        .unwrap();
    // Fails writes to sectors 0..8 answering seq >= 60 only.
    c.request(&json!({"cmd": "fault", "rule": {"kind": "io-error", "op": "write", "sector_end": 8, "at_seq": 60}}))
        .unwrap();
    assert_eq!(
        rig.io(VIRTIO_BLK_T_OUT, 0, &d).0,
        VIRTIO_BLK_S_OK as u8,
        "answers 50"
    );
    assert_eq!(
        rig.io(VIRTIO_BLK_T_OUT, 0, &d).0,
        VIRTIO_BLK_S_IOERR as u8,
        "answers 60"
    );
    assert_eq!(
        rig.io(VIRTIO_BLK_T_OUT, 0, &d).0,
        VIRTIO_BLK_S_OK as u8,
        "count 1"
    );
    // At a replay time.
    c.request(&json!({"cmd": "fault", "rule": {"kind": "io-error", "at_ns": 1_000_000}}))
        .unwrap();
    assert_eq!(
        rig.io(VIRTIO_BLK_T_IN, 0, &[0; 512]).0,
        VIRTIO_BLK_S_OK as u8
    );
    c.clock("step", None, Some(1_000_000)).unwrap();
    assert_eq!(
        rig.io(VIRTIO_BLK_T_IN, 0, &[0; 512]).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    let report = c.compare().unwrap();
    assert_eq!(report["first_mismatch"]["kind"], "status");
    // count 0 is refused, not armed.
    let e = c
        .request(&json!({"cmd": "fault", "rule": {"kind": "io-error", "count": 0}}))
        .unwrap_err();
    assert!(e.to_string().contains("count must be at least 1"), "{e}");
    assert_eq!(
        c.request(&json!({"cmd": "faults"})).unwrap()["faults"],
        json!([])
    );
}

#[test]
fn replay_mode_is_read_and_never_writes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; DISK]).unwrap();
    let disk = Disk::open(&image, None, false).unwrap();
    let mut cfg = BlockConfig::new("vda");
    cfg.mode = Mode::Replay;
    let r = BlockBackend::new(cfg, disk, None, None, Arc::default());
    assert!(matches!(r, Err(BlockError::ReplayNeedsOverlay)));
    // With an overlay, the clone's writes leave the image as it was.
    let mut rig = blk_rig(dir);
    rig.io(VIRTIO_BLK_T_OUT, 0, &[9u8; 4096]);
    assert_eq!(rig.io(VIRTIO_BLK_T_IN, 0, &[0; 4096]).1, vec![9u8; 4096]);
    let image = rig._dir.path().join("disk.raw");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x5a));
    // A capture-mode control socket refuses replay commands.
    let ctl = rig._dir.path().join("capture.ctl");
    let _srv = ControlServer::spawn(&ctl, ControlTargets::default()).unwrap();
    let mut c = ControlClient::connect(Path::new(&ctl)).unwrap();
    for cmd in [
        json!({"cmd": "subscribe"}),
        json!({"cmd": "clock", "action": "get"}),
        json!({"cmd": "fault", "rule": {"kind": "io-error"}}),
        json!({"cmd": "compare"}),
    ] {
        let e = c.request(&cmd).unwrap_err().to_string();
        assert!(e.contains("replay mode"), "{cmd}: {e}");
    }
}
