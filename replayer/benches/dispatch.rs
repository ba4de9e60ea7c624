//! Dispatch benchmark, one run, one set of tables:
//!
//! - As fast as possible: the replay loop (timeline, window, filter, clock,
//!   delivery callback) over events already read, so Kafka and the guest
//!   are not measured: events/s for a block-heavy and a net-heavy mix, with
//!   the default filter and with a filter that parses every frame.
//! - Injection timing error at 1x, 10x and 0.1x (short), with the default
//!   scheduling policy and with real-time priority, side by side. The
//!   frames go through a real vhost-tap net backend in replay mode (its
//!   control socket, scheduler and device thread) into a receive queue that
//!   an in-process vhost-user front-end keeps supplied with buffers; the
//!   time a frame reached the guest is the backend's `delivered` line. See
//!   [`TIMING_DEFINITION`].
//! - For comparison, the event source's read rate from a real broker
//!   (Tansu with sqlite storage, from vmr-testkit; needs
//!   `~/.cache/vmreplay/tansu-0.6.0/bin/tansu`).
//!
//! Run with `cargo bench -p replayer --bench dispatch`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replayer::filter::{Filter, NetMatch};
use replayer::replay::{self, BeforeWindow};
use replayer::schedule::{
    mono_now_ns, prepare_dispatch_thread, set_thread_fair_slice, set_thread_realtime_priority,
    sleep_until_mono_ns, RealtimeOptions, ReplayClock, Speed, ThreadSetup, Timeline,
};
use replayer::source::{RecordPos, SourceItem, SourcedEvent};
use replayer::window::Window;
use replayer::Kind;
use vhost_tap::capture::replay::Outputs;
use vhost_tap::control::{ControlClient, ControlServer, ControlTargets};
use vhost_tap::metrics::Metrics;
use vhost_tap::net::replay::SourceConfig as NetSourceConfig;
use vhost_tap::net::{ChannelReplaySource, NetBackend, NetConfig, ReplaySource};
use vhost_tap::server::Server;
use vhost_tap::testing::{DriverQueue, GuestRam, TestFrontend};
use vhost_tap::Mode;
use vmr_proto::{
    BlockIo, BlockOp, BlockStatus, Direction, EnvSample, Event, InstanceId, Lifecycle,
    LifecycleKind, NetFrame, Payload,
};

/// What the timing table measures, printed with it.
const TIMING_DEFINITION: &str = "\
Timing error of a frame = the host CLOCK_MONOTONIC time at which vhost-tap put it in the
guest's receive used ring (its `delivered` line: `mono_ns`, or `late_ns` on its replay
clock) minus the time it was scheduled for (the replay's start plus the frame's original
guest-time offset divided by the speed). Nothing is delivered early, so it is never
negative. Paths:
  host wake-up    no replayer: a thread sleeps with clock_nanosleep(TIMER_ABSTIME) to each
                  due time; error = wake-up time minus due time (what the host gives any
                  timed thread, as cyclictest measures it)
  clock only      the replayer's clock alone: release time minus due time (no frame sent)
  inject at due   the replayer releases each frame at its due time and sends it with
                  `inject` (no at_ns) on the control socket; error = delivered mono_ns
                  minus the due time on the replayer's clock
  send ahead      the replayer releases each frame 20 ms (host time) early and sends it
                  with `at_ns` = its guest offset; vhost-tap's replay clock (started with
                  the replay, factor = speed) delivers it; error = late_ns / speed
Schedule: 1514-byte frames; one in five follows its predecessor by 20 us (a burst), the
others by a gap drawn uniformly (fixed seed) around the nominal gap, so that the mean
gap is the nominal one.
Columns, by what the timing threads get (the replayer's dispatch thread; the backend's
device thread vring_worker, scheduler replay-sched and control connection control-conn):
  default         nothing: the default policy, as the threads were made
  unprivileged    what needs no privilege: dispatch thread timer slack 1 ns; every timing
                  thread a 100 us fair-scheduler slice (sched_setattr sched_runtime, EEVDF)
  real-time       dispatch thread SCHED_FIFO 10, mlockall, timer slack 1 ns; the backend's
                  timing threads SCHED_FIFO 10
steal: CPU time the hypervisor took from this VM during the cell (/proc/stat), summed
over its vCPUs.";

fn udp_frame(seq: u64, len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(4000 + (seq % 16) as u16, 53);
    let mut out = Vec::with_capacity(len);
    b.write(&mut out, &vec![0x5a; len.saturating_sub(42)])
        .expect("writing to a Vec cannot fail");
    out
}

/// `n` events 10 µs apart; `block_share` percent block, the rest mostly
/// net, some env, and a pause/resume pair every 10 000 events.
fn mix(n: u64, block_share: u64) -> Vec<SourceItem> {
    let instance = InstanceId::new("bench-vm").expect("valid id");
    (1..=n)
        .map(|seq| {
            let payload = if seq % 10_000 == 5000 {
                Payload::Lifecycle(Lifecycle {
                    kind: LifecycleKind::Pause,
                    detail: String::new(),
                    regs: vec![],
                    gap: None,
                    snapshot_id: None,
                })
            } else if seq % 10_000 == 5001 {
                Payload::Lifecycle(Lifecycle {
                    kind: LifecycleKind::Resume,
                    detail: String::new(),
                    regs: vec![],
                    gap: None,
                    snapshot_id: None,
                })
            } else if seq % 100 < block_share {
                let write = seq % 3 != 0;
                Payload::Block(BlockIo {
                    device: "vda".into(),
                    queue: 0,
                    op: if write { BlockOp::Write } else { BlockOp::Read },
                    sector: seq * 8,
                    len: 4096,
                    data: if write { vec![7; 4096] } else { vec![] },
                    content_hash: None,
                    status: BlockStatus::Ok,
                })
            } else if seq % 100 < 95 {
                Payload::Net(NetFrame {
                    device: "eth0".into(),
                    queue: 0,
                    direction: if seq % 2 == 0 {
                        Direction::Rx
                    } else {
                        Direction::Tx
                    },
                    frame: udp_frame(seq, 1514),
                })
            } else {
                Payload::Env(EnvSample {
                    sensor: "host.load1".into(),
                    value: 0.5,
                    unit: String::new(),
                })
            };
            let kind = Kind::of(&payload);
            SourceItem::Event(SourcedEvent {
                event: Event {
                    instance: instance.clone(),
                    seq,
                    wall_time_ns: seq * 10_000,
                    mono_time_ns: seq * 10_000,
                    epoch: 1,
                    payload,
                },
                pos: RecordPos {
                    kind,
                    partition: 0,
                    offset: seq as i64,
                },
            })
        })
        .collect()
}

fn afap(items: Vec<SourceItem>, filter: Filter) -> (u64, u64, Duration) {
    let n = items.len() as u64;
    let mut timeline = Timeline::new(0, false);
    let mut clock = ReplayClock::new(Speed::AsFastAsPossible);
    let bounds = Window::All.resolve(None).expect("all resolves");
    let mut bytes = 0u64;
    let start = Instant::now();
    let report = replay::run(
        items.into_iter().map(Ok),
        &mut timeline,
        &bounds,
        BeforeWindow::Skip,
        &filter,
        &mut clock,
        |e, d| {
            bytes += match &e.event.payload {
                Payload::Block(b) => b.data.len() as u64,
                Payload::Net(f) => f.frame.len() as u64,
                _ => 0,
            };
            black_box(d);
            Ok::<_, std::io::Error>(())
        },
    )
    .expect("in-memory replay cannot fail");
    let took = start.elapsed();
    black_box(bytes);
    assert_eq!(report.delivered + report.filter.removed_total(), n);
    (n, report.delivered, took)
}

/// Produces `items` to a fresh Tansu broker and times reading them back
/// through the event source.
fn from_kafka(items: &[SourceItem]) -> (u64, Duration) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use replayer::source::{EventSource, SourceConfig};
    use replayer::KindSet;
    use vmr_proto::topics::partition_for;
    use vmr_proto::TopicOffset;

    let broker = vmr_testkit::broker::Broker::start()
        .unwrap_or_else(|e| panic!("the Kafka row needs the Tansu broker: {e}"));
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .expect("create producer");
    let parts = vmr_testkit::broker::TEST_EVENT_PARTITIONS;
    let mut buf = Vec::new();
    for item in items {
        let SourceItem::Event(e) = item else { continue };
        buf.clear();
        // Schema id 1: the source decodes the framing without the registry.
        schema_registry::codec::encode_message(
            1,
            &[0],
            &vmr_proto::pb::Event::from(e.event.clone()),
            &mut buf,
        );
        let key = e.event.instance.as_str();
        let mut record = BaseRecord::to(e.event.topic())
            .key(key)
            .partition(partition_for(key, parts))
            .payload(&buf);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    // The queue is full: let the producer's thread drain it.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .expect("all records delivered");
    let instance = InstanceId::new("bench-vm").expect("valid id");
    let start_offsets = Kind::ALL
        .iter()
        .map(|k| TopicOffset {
            topic: k.topic().into(),
            partition: instance.partition(parts),
            next_offset: 0,
        })
        .collect();
    let config = SourceConfig {
        bootstrap_servers: broker.bootstrap(),
        instance,
        seq_at_cut: 0,
        start: start_offsets,
        kinds: KindSet::all(),
        until_seq: None,
        topics: Default::default(),
        window: Default::default(),
        fetch_timeout: Duration::from_secs(30),
        security: Default::default(),
    };
    let start = Instant::now();
    let mut n = 0;
    for item in EventSource::open(config).expect("open the source") {
        if let SourceItem::Event(e) = item.expect("read") {
            black_box(&e);
            n += 1;
        }
    }
    (n, start.elapsed())
}

fn main() {
    const N: u64 = 200_000;
    println!(
        "As fast as possible (timeline + window + filter + clock + delivery; no Kafka, no guest)"
    );
    println!(
        "{:<12} {:<22} {:>9} {:>10} {:>10} {:>12}",
        "mix", "filter", "events", "delivered", "seconds", "events/s"
    );
    let port_filter = || Filter {
        exclude_net: NetMatch {
            ports: vec![4001],
            ..NetMatch::default()
        },
        ..Filter::default()
    };
    for (name, block_share) in [("block-heavy", 80), ("net-heavy", 10)] {
        for (fname, filter) in [
            ("none", Filter::default()),
            ("exclude udp port 4001", port_filter()),
        ] {
            let items = mix(N, block_share);
            let (n, delivered, took) = afap(items, filter);
            println!(
                "{:<12} {:<22} {:>9} {:>10} {:>10.3} {:>12.0}",
                name,
                fname,
                n,
                delivered,
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64()
            );
        }
    }

    println!();
    println!(
        "Injection timing (load average at start: {})",
        load_average()
    );
    timing_table();
    println!("load average at end: {}", load_average());

    println!();
    println!("Event source reading from Kafka (Tansu 0.6, sqlite storage, one instance)");
    println!(
        "{:<12} {:>9} {:>10} {:>12}",
        "mix", "events", "seconds", "events/s"
    );
    for (name, block_share) in [("block-heavy", 80), ("net-heavy", 10)] {
        let items = mix(20_000, block_share);
        let (n, took) = from_kafka(&items);
        assert_eq!(n, 20_000, "every event read back");
        println!(
            "{:<12} {:>9} {:>10.3} {:>12.0}",
            name,
            n,
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------
// Injection timing through a vhost-tap net backend

/// A vhost-tap net backend in replay mode with its control socket, and a
/// front-end thread that plays the guest driver: it keeps every receive
/// buffer posted, taking used ones back when the backend signals.
struct NetRig {
    _dir: tempfile::TempDir,
    ctl: PathBuf,
    server: Option<Server>,
    _control: ControlServer,
    guest_stop: Arc<AtomicBool>,
    guest: Option<JoinHandle<Result<u64, String>>>,
}

impl NetRig {
    fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let sock = dir.path().join("net.sock");
        let ctl = dir.path().join("net.ctl");
        let metrics = Arc::new(Metrics::default());
        let outputs = Arc::new(Outputs::new());
        let mut sc = NetSourceConfig::new("net0");
        sc.outputs = Some(outputs.clone());
        sc.metrics = metrics.clone();
        let source = Arc::new(
            ChannelReplaySource::with_config(sc).map_err(|e| format!("replay source: {e}"))?,
        );
        let mut cfg = NetConfig::new("net0");
        cfg.mode = Mode::Replay;
        cfg.outputs = Some(outputs.clone());
        let backend = NetBackend::new(
            cfg,
            None,
            Some(source.clone() as Arc<dyn ReplaySource>),
            None,
            None,
            metrics.clone(),
        )
        .map_err(|e| format!("net backend: {e}"))?;
        let server =
            Server::spawn("net", backend, &sock, false).map_err(|e| format!("server: {e}"))?;
        let control = ControlServer::spawn(
            &ctl,
            ControlTargets {
                metrics,
                clock: Some(source.clock().clone()),
                source: Some(source),
                outputs: Some(outputs),
                ..Default::default()
            },
        )
        .map_err(|e| format!("control socket: {e}"))?;
        let guest_stop = Arc::new(AtomicBool::new(false));
        let stop = guest_stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let guest = std::thread::Builder::new()
            .name("bench-guest".into())
            .spawn(move || guest_driver(&sock, &stop, &ready_tx))
            .map_err(|e| format!("guest thread: {e}"))?;
        let mut rig = Self {
            _dir: dir,
            ctl,
            server: Some(server),
            _control: control,
            guest_stop,
            guest: Some(guest),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(rig),
            Err(_) => Err(match rig.stop_guest() {
                Err(e) => e,
                Ok(_) => "the front-end did not set the backend up within 10 s".into(),
            }),
        }
    }

    fn client(&self) -> Result<ControlClient, String> {
        ControlClient::connect(&self.ctl).map_err(|e| format!("control socket: {e}"))
    }

    /// Stops the front-end; returns how many frames the guest took.
    fn stop_guest(&mut self) -> Result<u64, String> {
        self.guest_stop.store(true, Ordering::SeqCst);
        match self.guest.take() {
            Some(h) => h
                .join()
                .map_err(|_| "the front-end thread panicked".to_string())?,
            None => Ok(0),
        }
    }
}

impl Drop for NetRig {
    fn drop(&mut self) {
        let _ = self.stop_guest();
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
    }
}

/// The guest driver: sets the device up with 256 receive buffers, then
/// re-posts each buffer the backend used, waiting on the queue's call
/// eventfd (the guest's interrupt) for at most 1 ms at a time.
fn guest_driver(
    sock: &std::path::Path,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<()>,
) -> Result<u64, String> {
    use std::os::fd::AsRawFd;
    let e = |what: &'static str| {
        move |err: vhost_tap::testing::TestingError| format!("front-end {what}: {err}")
    };
    let mut ram = GuestRam::new(8 << 20).map_err(e("memory"))?;
    let mut fe = TestFrontend::connect(sock, 2).map_err(e("connect"))?;
    let mut rx = DriverQueue::new(&ram, 0x1_0000, 256);
    let tx = DriverQueue::new(&ram, 0x2_0000, 256);
    fe.setup(&ram, &[&rx, &tx], 0).map_err(e("setup"))?;
    let mut addr = vec![0u64; 256];
    for _ in 0..256 {
        let b = ram.alloc(2048).map_err(e("buffer"))?;
        let h = rx.add_chain(&ram, &[(b, 2048, true)]);
        addr[h as usize] = b;
        rx.publish(&ram, h);
    }
    fe.kick(0).map_err(e("kick"))?;
    let _ = ready.send(());
    let call = fe.calls[0].as_raw_fd();
    let mut taken = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: call,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call, for at
        // most 1 ms.
        unsafe { libc::poll(&mut pfd, 1, 1) };
        let _ = fe.calls[0].read();
        let mut reposted = false;
        while let Some((head, _len)) = rx.pop_used(&ram) {
            let b = addr[head as usize];
            let h = rx.add_chain(&ram, &[(b, 2048, true)]);
            addr[h as usize] = b;
            rx.publish(&ram, h);
            reposted = true;
            taken += 1;
        }
        if reposted {
            fe.kick(0).map_err(e("kick"))?;
        }
    }
    Ok(taken)
}

/// The threads of this process named `name` (kernel thread names are cut
/// at 15 bytes).
fn threads_named(name: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|d| {
        let d = d.ok()?;
        let comm = std::fs::read_to_string(d.path().join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        d.file_name().to_str()?.parse().ok()
    })
    .collect()
}

/// What the timing threads get in a column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aids {
    Default,
    Unprivileged,
    Realtime,
}

impl Aids {
    const ALL: [Aids; 3] = [Aids::Default, Aids::Unprivileged, Aids::Realtime];

    fn name(self) -> &'static str {
        match self {
            Aids::Default => "default",
            Aids::Unprivileged => "unprivileged",
            Aids::Realtime => "real-time",
        }
    }

    fn dispatch_options(self) -> RealtimeOptions {
        match self {
            Aids::Default => RealtimeOptions::NONE,
            Aids::Unprivileged => RealtimeOptions::UNPRIVILEGED,
            Aids::Realtime => RealtimeOptions::realtime(10),
        }
    }
}

/// Gives the backend's timing threads what `aids` says; the refusals.
fn prepare_backend_threads(aids: Aids) -> Vec<String> {
    let mut refused = Vec::new();
    if aids == Aids::Default {
        return refused;
    }
    for name in ["vring_worker", "replay-sched", "control-conn"] {
        let tids = threads_named(name);
        if tids.is_empty() {
            refused.push(format!("no {name} thread found"));
        }
        for tid in tids {
            let r = match aids {
                Aids::Realtime => set_thread_realtime_priority(tid, 10),
                _ => set_thread_fair_slice(tid, 100_000),
            };
            if let Err(e) = r {
                refused.push(format!("{name} ({tid}) refused: {e}"));
            }
        }
    }
    refused
}

/// CPU time stolen by the hypervisor so far, summed over the vCPUs
/// (`/proc/stat`, in clock ticks).
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            line.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
}

fn ticks_to_ms(t: u64) -> f64 {
    // SAFETY: sysconf takes an integer.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    t as f64 * 1000.0 / hz
}

/// Burst gap: one frame in five follows the one before this closely.
const BURST_GAP: Duration = Duration::from_micros(20);

/// A deterministic schedule of `n` guest-time offsets with a mean gap of
/// `gap`: every fifth gap is [`BURST_GAP`], the others are drawn uniformly
/// from 0.25 to 1.75 times the mean that keeps the overall mean at `gap`.
fn schedule(n: u64, gap: Duration) -> Vec<Duration> {
    let others = (gap * 5).saturating_sub(BURST_GAP) / 4;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut t = Duration::ZERO;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            t += if i % 5 == 4 {
                BURST_GAP
            } else {
                others.mul_f64(0.25 + 1.5 * u)
            };
            t
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Wakeup,
    ClockOnly,
    InjectAtDue,
    SendAhead,
}

impl Path {
    const ALL: [Path; 4] = [
        Path::Wakeup,
        Path::ClockOnly,
        Path::InjectAtDue,
        Path::SendAhead,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Wakeup => "host wake-up",
            Path::ClockOnly => "clock only",
            Path::InjectAtDue => "inject at due",
            Path::SendAhead => "send ahead (at_ns)",
        }
    }
}

/// How far ahead the send-ahead path releases frames (host time).
const LEAD: Duration = Duration::from_millis(20);

/// Percentiles of timing errors (nanoseconds of host time).
#[derive(Debug, Clone)]
struct Errors {
    n: usize,
    expected: usize,
    p50: i64,
    p99: i64,
    max: i64,
    setup: String,
    steal_ms: f64,
}

fn percentiles(mut v: Vec<i64>, expected: usize, setup: String) -> Errors {
    v.sort_unstable();
    let at = |q: f64| {
        if v.is_empty() {
            0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Errors {
        n: v.len(),
        expected,
        p50: at(0.5),
        p99: at(0.99),
        max: v.last().copied().unwrap_or(0),
        setup,
        steal_ms: 0.0,
    }
}

fn fmt_ns(ns: i64) -> String {
    let a = ns.unsigned_abs() as f64;
    let sign = if ns < 0 { "-" } else { "" };
    if a >= 1e6 {
        format!("{sign}{:.2} ms", a / 1e6)
    } else if a >= 1e3 {
        format!("{sign}{:.1} us", a / 1e3)
    } else {
        format!("{sign}{a:.0} ns")
    }
}

type Sent = Result<(Vec<u64>, ThreadSetup), String>;

/// One timing run (see [`timing_run_inner`]) and the steal time during it.
fn timing_run(path: Path, speed: f64, offsets: &[Duration], aids: Aids) -> Result<Errors, String> {
    let before = steal_ticks();
    let mut r = timing_run_inner(path, speed, offsets, aids)?;
    r.steal_ms = ticks_to_ms(steal_ticks().saturating_sub(before));
    Ok(r)
}

/// One timing run: `offsets` (guest time) at `speed` along `path`, with
/// the timing threads prepared as `aids` says.
fn timing_run_inner(
    path: Path,
    speed: f64,
    offsets: &[Duration],
    aids: Aids,
) -> Result<Errors, String> {
    let n = offsets.len();
    let opts = aids.dispatch_options();
    let speed_v = Speed::factor(speed).map_err(|e| e.to_string())?;
    let offsets_v = offsets.to_vec();
    if path == Path::Wakeup {
        let h = std::thread::spawn(move || -> Result<(Vec<i64>, ThreadSetup), String> {
            let setup = prepare_dispatch_thread(&opts);
            let start = mono_now_ns() + 1_000_000;
            let mut errs = Vec::with_capacity(offsets_v.len());
            for o in &offsets_v {
                let due = start + (o.as_nanos() as f64 / speed) as u64;
                sleep_until_mono_ns(due);
                errs.push(mono_now_ns() as i64 - due as i64);
            }
            Ok((errs, setup))
        });
        let (errs, setup) = h
            .join()
            .map_err(|_| "the wake-up thread panicked".to_string())??;
        return Ok(percentiles(errs, n, setup.to_string()));
    }
    if path == Path::ClockOnly {
        let h = std::thread::spawn(move || -> Result<(Vec<i64>, ThreadSetup), String> {
            let setup = prepare_dispatch_thread(&opts);
            let mut clock = ReplayClock::new(speed_v);
            let mut errs = Vec::with_capacity(offsets_v.len());
            for (i, o) in offsets_v.iter().enumerate() {
                let d = clock.wait(i as u64 + 1, *o).map_err(|e| e.to_string())?;
                errs.push(d.dispatched.as_nanos() as i64 - d.due.as_nanos() as i64);
            }
            Ok((errs, setup))
        });
        let (errs, setup) = h
            .join()
            .map_err(|_| "the dispatch thread panicked".to_string())??;
        return Ok(percentiles(errs, n, setup.to_string()));
    }
    let mut rig = NetRig::start()?;
    let mut c = rig.client()?;
    let mut sub = rig.client()?;
    sub.set_timeout(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    sub.subscribe(false)
        .map_err(|e| format!("subscribe: {e}"))?;
    // The backend's replay clock: paused at 0, at the replay's speed.
    for (action, factor, ns) in [
        ("pause", None, None),
        ("set", None, Some(0)),
        ("scale", Some(speed), None),
    ] {
        c.clock(action, factor, ns)
            .map_err(|e| format!("clock {action}: {e}"))?;
    }
    // The connection's thread exists now.
    let refused = prepare_backend_threads(aids);
    let collector = std::thread::spawn(move || {
        let mut got: Vec<(u64, u64, i64)> = Vec::with_capacity(n);
        while got.len() < n {
            match sub.next_output() {
                Ok(v) if v["type"] == "delivered" => got.push((
                    v["seq"].as_u64().unwrap_or(0),
                    v["mono_ns"].as_u64().unwrap_or(0),
                    v["late_ns"].as_i64().unwrap_or(0),
                )),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        got
    });
    let frame = udp_frame(1, 1514);
    let sender = std::thread::spawn(move || -> Sent {
        let setup = prepare_dispatch_thread(&opts);
        let mut clock = ReplayClock::new(speed_v);
        if path == Path::SendAhead {
            clock.set_lead(LEAD);
        }
        let mut due_mono = Vec::with_capacity(offsets_v.len());
        c.clock("resume", None, None)
            .map_err(|e| format!("clock resume: {e}"))?;
        for (i, o) in offsets_v.iter().enumerate() {
            let seq = i as u64 + 1;
            let d = clock.wait(seq, *o).map_err(|e| e.to_string())?;
            let at = (path == Path::SendAhead).then_some(d.guest_offset.as_nanos() as u64);
            c.inject_at(Some(seq), at, &frame)
                .map_err(|e| format!("inject {seq}: {e}"))?;
            due_mono.push(clock.mono_ns_at(d.due));
        }
        Ok((due_mono, setup))
    });
    let sent = sender
        .join()
        .map_err(|_| "the dispatch thread panicked".to_string())?;
    let got = collector
        .join()
        .map_err(|_| "the collector thread panicked".to_string())?;
    let taken = rig.stop_guest()?;
    let (due_mono, setup) = sent?;
    let errs: Vec<i64> = got
        .iter()
        .filter(|(seq, _, _)| *seq >= 1 && *seq as usize <= n)
        .map(|&(seq, mono, late)| match path {
            Path::SendAhead => (late as f64 / speed) as i64,
            _ => mono as i64 - due_mono[seq as usize - 1] as i64,
        })
        .collect();
    let mut setup_text = setup.to_string();
    match (aids, refused.is_empty()) {
        (Aids::Default, _) => {}
        (Aids::Unprivileged, true) => setup_text.push_str("; backend threads fair slice 100 us"),
        (Aids::Realtime, true) => setup_text.push_str("; backend threads SCHED_FIFO 10"),
        (_, false) => setup_text.push_str(&format!("; backend: {}", refused.join(", "))),
    }
    if taken < errs.len() as u64 {
        setup_text.push_str(&format!(
            "; the guest took {taken} of {} frames",
            errs.len()
        ));
    }
    Ok(percentiles(errs, n, setup_text))
}

/// The timing table: every speed and path in each column, one column after
/// the other (the real-time one last: `mlockall` lasts for the process).
fn timing_table() {
    println!("{TIMING_DEFINITION}");
    println!();
    let runs: [(&str, f64, u64, Duration); 3] = [
        ("1x", 1.0, 2000, Duration::from_millis(1)),
        ("10x", 10.0, 2000, Duration::from_millis(10)),
        ("0.1x (short)", 0.1, 300, Duration::from_millis(1)),
    ];
    let mut cells = Vec::new();
    for aids in Aids::ALL {
        for &(label, speed, n, gap) in &runs {
            let offsets = schedule(n, gap);
            for path in Path::ALL {
                let r = timing_run(path, speed, &offsets, aids);
                cells.push(((label, path, aids), r));
            }
        }
    }
    let mut header = "| speed | frames | host s | path |".to_string();
    let mut rule = "| --- | ---: | ---: | --- |".to_string();
    for aids in Aids::ALL {
        header.push_str(&format!(" {} p50 | p99 | max | steal ms |", aids.name()));
        rule.push_str(" ---: | ---: | ---: | ---: |");
    }
    println!("{header}");
    println!("{rule}");
    let mut notes: Vec<String> = Vec::new();
    for &(label, speed, n, gap) in &runs {
        let host = schedule(n, gap)
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            / speed;
        for path in Path::ALL {
            let mut row = format!("| {label} | {n} | {host:.1} | {} |", path.name());
            for aids in Aids::ALL {
                let cell = cells
                    .iter()
                    .find(|((l, p, a), _)| *l == label && *p == path && *a == aids)
                    .map(|(_, r)| r)
                    .expect("every cell was run");
                match cell {
                    Ok(e) => {
                        let short = if e.n < e.expected {
                            format!(" ({} of {} delivered)", e.n, e.expected)
                        } else {
                            String::new()
                        };
                        row.push_str(&format!(
                            " {}{short} | {} | {} | {:.0} |",
                            fmt_ns(e.p50),
                            fmt_ns(e.p99),
                            fmt_ns(e.max),
                            e.steal_ms
                        ));
                        let note = if e.setup.contains("backend:") {
                            format!("{} ({label}, {}): {}", aids.name(), path.name(), e.setup)
                        } else {
                            format!("{}: {}", aids.name(), e.setup)
                        };
                        if !notes.contains(&note) {
                            notes.push(note);
                        }
                    }
                    Err(err) => row.push_str(&format!(" not measured: {err} | | | |")),
                }
            }
            println!("{row}");
        }
    }
    println!();
    println!("Thread setup as applied:");
    for n in notes {
        println!("  {n}");
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
