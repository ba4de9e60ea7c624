//! One clone: a snapshot restored onto new replay-mode backends inside a
//! private network namespace, and the replay task that feeds it the
//! recorded events.
//!
//! [`build`] does the blocking work (namespace, backend processes, driver
//! restore, opening the event source); the returned [`CloneRuntime`] owns
//! every process and the namespace and tears them down on
//! [`CloneRuntime::teardown`] or drop.
//!
//! Before any process starts, [`build`] resolves the window against the
//! recording and reads the window's recorded net frames and block requests
//! once (see [`Prepared`]). Recorded received frames go through a
//! [`TcpPeer`] per NIC (built from the window's recorded net frames, both
//! directions, at most [`MAX_PEER_FRAMES`]) and are injected, with their
//! recorded `seq`, through the net backend's control socket when their
//! recorded event is due on the replay clock; the peer may hold a frame
//! until the clone has sent its part. Every backend's live output stream
//! (`subscribe`, [`crate::outputs`]) is read by a thread: a NIC's
//! `delivered` lines acknowledge injected frames (a frame counts as applied,
//! and its lag is measured, when it reached the guest), its `tx` lines feed
//! the clone's frames to the peer (which answers ARP and ACKs), and a
//! disk's `block` lines carry the backend's comparison of each clone
//! request with the original's records, which [`build`] loaded into the
//! backend (`expect`) before the guest ran. Frames other than TCP pass
//! unchanged. The peer's per-connection divergences are reported as
//! `NET_STREAM`. Seeded faults ([`faults`]) are applied to recorded
//! received frames just before injection; the guest's lifecycle comes from
//! the driver's events.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmr_hypervisor::{
    BootSpec, DebugListen, DiskSpec, DriverEvent, Instance, InstanceSpec, MacAddr, NicSpec,
    RunState,
};
use vmr_proto::{
    framing::EventReader, pb, BlockIo, BlockOp, BlockStatus, ContentHash, Direction, Event,
    LifecycleKind, Payload,
};

use crate::filter::Filter;
use crate::net::{Action, Next, PeerConfig, RecordedFrame, TcpPeer};
use crate::outputs::{Output, Read, Subscription};
use crate::replay::{self, BeforeWindow, ReplayError};
use crate::schedule::{
    ClockControl, ClockMode, RealtimeOptions, ReplayClock, RunTo, Speed, Timeline,
};
use crate::source::{EventSource, SourceConfig, SourceError};
use crate::window::{Bounds, Span, Window, WindowError};
use crate::{Kind, KindSet};

/// Longest wait for a backend's sockets to appear.
const BACKEND_WAIT: Duration = Duration::from_secs(20);
/// Grace for a process or guest to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest wait for one control-socket answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Most recorded net frames (both directions, all NICs) a window may hold:
/// the TCP peer needs the window's whole recording up front.
pub const MAX_PEER_FRAMES: usize = 500_000;
/// Most bytes of recorded net frames a window may hold.
pub const MAX_PEER_BYTES: usize = 512 << 20;
/// Most timing samples a replay keeps for its report.
const TIMING_SAMPLES: usize = 1 << 20;

/// `what p50 X p99 Y max Z (n N)` of lateness samples.
fn timing_text(what: &str, l: &mut [Duration]) -> Option<String> {
    if l.is_empty() {
        return None;
    }
    l.sort_unstable();
    let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
    Some(format!(
        "{what} lateness p50 {:?} p99 {:?} max {:?} over {}",
        at(0.5),
        at(0.99),
        l[l.len() - 1],
        l.len()
    ))
}

/// A stream that gave nothing for this long has caught up.
const STREAM_QUIET: Duration = Duration::from_millis(150);
/// Longest wait for the output streams to catch up.
const STREAM_DRAIN: Duration = Duration::from_millis(1500);
/// Longest wait, when the window's events are all dispatched, for the
/// acknowledgements of the frames still pending.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// Expected block records per `expect` request.
const EXPECT_BATCH: usize = 8192;

/// Errors building or driving a clone.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("invalid clone request: {0}")]
    Invalid(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Precondition(String),
    #[error("the snapshot cannot be used: {0}")]
    Snapshot(String),
    #[error("the recorded events cannot be read")]
    Source(#[from] SourceError),
    #[error("cannot set up the clone's {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("the driver refused: {0}")]
    Driver(#[from] vmr_hypervisor::DriverError),
    #[error("{0}")]
    State(String),
    /// Going live failed at one NIC. `replay_kept`: the NICs already
    /// changed were put back and the replay goes on as before; otherwise
    /// the replay had stopped and the clone is failed.
    #[error("cannot go live: NIC {nic} (namespace interface {interface}): {reason}")]
    GoLive {
        nic: String,
        interface: String,
        reason: String,
        replay_kept: bool,
    },
}

/// A NIC of the machine.
#[derive(Debug, Clone)]
pub struct NicPlan {
    pub name: String,
    pub mac: [u8; 6],
}

/// Everything needed to build one clone.
#[derive(Debug, Clone)]
pub struct ClonePlan {
    pub clone_id: String,
    /// The clone's private directory (created; removed on teardown).
    pub work_dir: PathBuf,
    /// The materialised snapshot directory for `Driver::restore`.
    pub snapshot_dir: PathBuf,
    /// The snapshot's manifest.
    pub manifest: vmr_proto::SnapshotManifest,
    /// Disk device name → the snapshot's disk (a raw image the clone's
    /// private overlay lies on, or the base image under `disk_layers`).
    pub disks: Vec<(String, PathBuf)>,
    /// Disk device name → the snapshot's frozen layers, bottom first
    /// (packed layers of a disk chain; empty for a raw disk at the cut).
    pub disk_layers: HashMap<String, Vec<PathBuf>>,
    pub nics: Vec<NicPlan>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// Extra QEMU `-device` entries.
    pub qemu_devices: Vec<String>,
    pub blk_bin: PathBuf,
    pub net_bin: PathBuf,
    pub bootstrap_servers: String,
    pub kafka_security: vmr_proto::config::KafkaSecurity,
    pub fetch_timeout: Duration,
    pub kinds: KindSet,
    /// Which events to deliver (its kinds are `kinds`).
    pub filter: Filter,
    pub window: Window,
    pub speed: Speed,
    pub start_paused: bool,
    pub gdb: bool,
    /// Faults to inject into received frames ([`faults`]).
    pub faults: Vec<faults::FaultRule>,
    /// Seed of the fault decisions.
    pub seed: u64,
    /// How often this clone was switched to another cut before.
    pub switches: u32,
    /// How the operator reaches the guest.
    pub access: AccessPlan,
    /// A directory of the clone's (the materialised snapshot) removed on
    /// teardown besides `work_dir`.
    pub owned_dir: Option<PathBuf>,
}

/// The guest's addresses, for a live clone.
#[derive(Debug, Clone, Default)]
pub struct AccessPlan {
    /// Per NIC, in the order of [`ClonePlan::nics`].
    pub nics: Vec<NicAddrs>,
    pub service_port: Option<u16>,
}

/// The addresses of one NIC's network.
#[derive(Debug, Clone, Default)]
pub struct NicAddrs {
    /// `192.168.77.2` (without the prefix).
    pub guest_ip: Option<String>,
    /// The prefix length of the guest's network.
    pub prefix: u8,
    /// The recorded peer's address, which a live namespace interface takes.
    pub peer_ip: Option<String>,
}

/// The name of the namespace interface (a TAP) towards NIC number `i`.
fn live_tap(i: usize) -> String {
    format!("vmrlive{i}")
}

/// State of a clone as the service reports it.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: pb::CloneState,
    pub replayed_seq: u64,
    /// The last recorded input (block, net or env event) delivered. A
    /// recorded lifecycle event (the original's pause, snapshot or crash)
    /// is not an input, so a crash is reported after this seq.
    pub last_input_seq: u64,
    pub delivered: u64,
    pub detail: String,
    pub speed: Speed,
    pub divergences: Vec<pb::Divergence>,
    /// Recorded events of the window the filter kept back.
    pub filtered_out: u64,
    /// Received frames acknowledged by the NICs.
    pub frames_acknowledged: u64,
    /// Recorded guest time of the last event applied.
    pub original_time_ns: u64,
    /// Host time from the first dispatch to the last event applied.
    pub replay_time_ns: u64,
    /// Lateness of the last acknowledged frame.
    pub lag_ns: u64,
    /// Lines the output streams lost (the clone's output is incomplete).
    pub stream_lost: u64,
}

/// A frame injected with its recorded `seq`, waiting for the NIC's
/// acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Awaiting {
    /// Host monotonic time its recorded event was due (None: untimed).
    due_mono: Option<u64>,
    guest_ns: u64,
}

type Listener = Box<dyn Fn(pb::ReplayProgress) + Send + Sync>;

struct Shared {
    id: String,
    instance_id: String,
    snapshot_id: String,
    seq_at_cut: u64,
    status: Mutex<Status>,
    listener: Listener,
    clock: ClockControl,
    started: AtomicBool,
    ended: AtomicBool,
    /// Every fault injected, in order.
    faults_log: Mutex<Vec<pb::InjectedFault>>,
    seed: u64,
    switches: u32,
    access: Mutex<pb::CloneAccess>,
    /// The guest's crash, once it happened (for watchers that come later).
    crash: Mutex<Option<pb::CloneLifecycle>>,
    /// The window as applied.
    window: pb::AppliedWindow,
    /// Injected frames by recorded `seq`, until acknowledged.
    awaiting: Mutex<HashMap<u64, Awaiting>>,
    /// Host monotonic time of the first dispatch.
    started_mono: Mutex<Option<u64>>,
    /// Lateness of acknowledged frames (timed replays).
    ack_late: Mutex<Vec<Duration>>,
    /// When each output stream last gave a line.
    stream_seen: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    fn clone_msg(&self, s: &Status) -> pb::Clone {
        pb::Clone {
            clone_id: self.id.clone(),
            instance_id: self.instance_id.clone(),
            snapshot_id: self.snapshot_id.clone(),
            state: s.state as i32,
            replayed_seq: s.replayed_seq,
            speed: Some(speed_msg(s.speed)),
            detail: s.detail.clone(),
            delivered: s.delivered,
            seq_at_cut: self.seq_at_cut,
            divergences: s.divergences.len() as u32,
            access: Some(self.access.lock().expect("access lock").clone()),
            filtered: s.filtered_out > 0,
            filtered_out: s.filtered_out,
            seed: self.seed,
            faults_injected: self.faults_log.lock().expect("faults log lock").len() as u32,
            switches: self.switches,
            window: Some(self.window.clone()),
            frames_acknowledged: s.frames_acknowledged,
            frames_pending: self.awaiting.lock().expect("awaiting lock").len() as u64,
            original_time_ns: s.original_time_ns,
            replay_time_ns: s.replay_time_ns,
            lag_ns: s.lag_ns,
        }
    }

    /// Counts recorded event `seq` (at recorded guest time `guest_ns`) as
    /// applied at host monotonic time `mono`.
    fn apply(&self, seq: u64, guest_ns: u64, input: bool, mono: u64, ack_lag: Option<u64>) {
        let started = self
            .started_mono
            .lock()
            .expect("start lock")
            .unwrap_or(mono);
        self.update(|s| {
            s.delivered += 1;
            s.replayed_seq = s.replayed_seq.max(seq);
            if input {
                s.last_input_seq = s.last_input_seq.max(seq);
            }
            s.original_time_ns = s.original_time_ns.max(guest_ns);
            s.replay_time_ns = mono.saturating_sub(started);
            if let Some(l) = ack_lag {
                s.frames_acknowledged += 1;
                s.lag_ns = l;
            }
        });
    }

    /// A NIC acknowledged the frame injected with recorded `seq` at host
    /// monotonic time `mono`; duplicates and unknown frames are ignored.
    fn acknowledge(&self, seq: u64, mono: u64) {
        let Some(a) = self.awaiting.lock().expect("awaiting lock").remove(&seq) else {
            return;
        };
        let lag = a.due_mono.map_or(0, |d| mono.saturating_sub(d));
        if a.due_mono.is_some() {
            let mut l = self.ack_late.lock().expect("ack lock");
            if l.len() < TIMING_SAMPLES {
                l.push(Duration::from_nanos(lag));
            }
        }
        self.apply(seq, a.guest_ns, true, mono, Some(lag));
    }

    /// Notes that the output stream `name` gave a line.
    fn seen(&self, name: &str) {
        self.stream_seen
            .lock()
            .expect("stream lock")
            .insert(name.to_string(), Instant::now());
    }

    /// Waits (at most [`STREAM_DRAIN`]) until every output stream was
    /// quiet for [`STREAM_QUIET`], so lines emitted before now are handled.
    fn drain_streams(&self) {
        let end = Instant::now() + STREAM_DRAIN;
        std::thread::sleep(STREAM_QUIET);
        while Instant::now() < end {
            let busy = self
                .stream_seen
                .lock()
                .expect("stream lock")
                .values()
                .any(|t| t.elapsed() < STREAM_QUIET);
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The state, with a live replay's state taken from its clock.
    fn snapshot(&self) -> pb::Clone {
        let mut s = self.status.lock().expect("status lock").clone();
        if s.state == pb::CloneState::Replaying || s.state == pb::CloneState::Paused {
            let c = self.clock.status();
            s.state = match c.mode {
                ClockMode::Paused => pb::CloneState::Paused,
                _ => pb::CloneState::Replaying,
            };
            s.speed = c.speed;
        }
        self.clone_msg(&s)
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        {
            let mut s = self.status.lock().expect("status lock");
            f(&mut s);
        }
        self.emit(pb::ReplayProgress {
            clone: Some(self.snapshot()),
            ..Default::default()
        });
    }

    fn emit(&self, mut p: pb::ReplayProgress) {
        if p.clone.is_none() {
            p.clone = Some(self.snapshot());
        }
        (self.listener)(p);
    }

    /// Reports an injected fault: in the list that repeats the run and as
    /// a divergence of kind `INJECTED_FAULT`.
    fn report_fault(&self, fault: &faults::Injected, seed: u64) {
        let description = format!("injected fault: {fault} (seed {seed})");
        self.faults_log
            .lock()
            .expect("faults log lock")
            .push(pb::InjectedFault {
                seq: fault.seq,
                device: fault.device.clone(),
                kind: fault.action.kind() as i32,
                description: description.clone(),
                seed,
                guest_time_ns: fault.guest_ns,
            });
        self.add_divergence(pb::Divergence {
            seq: fault.seq,
            device: fault.device.clone(),
            description,
            expected: None,
            observed: None,
            kind: pb::DivergenceKind::InjectedFault as i32,
        });
    }

    fn add_divergence(&self, d: pb::Divergence) {
        self.status
            .lock()
            .expect("status lock")
            .divergences
            .push(d.clone());
        self.emit(pb::ReplayProgress {
            divergence: Some(d),
            ..Default::default()
        });
    }
}

/// The wire form of a speed.
pub fn speed_msg(s: Speed) -> pb::Speed {
    pb::Speed {
        speed: Some(match s {
            Speed::Factor(f) => pb::speed::Speed::Factor(f),
            Speed::AsFastAsPossible => pb::speed::Speed::AsFastAsPossible(true),
        }),
    }
}

/// A built clone: its processes, namespace, guest and replay task.
pub struct CloneRuntime {
    shared: Arc<Shared>,
    plan: ClonePlan,
    netns: String,
    procs: Mutex<Vec<(String, Child)>>,
    instance: Mutex<Option<Arc<dyn Instance>>>,
    source: Mutex<Option<EventSource>>,
    control_sockets: HashMap<String, PathBuf>,
    /// Disk name → its backend's control socket (fault rules).
    blk_controls: Vec<(String, PathBuf)>,
    /// NIC name → the recorded peer's MAC (a live namespace interface
    /// takes it).
    peer_macs: HashMap<String, [u8; 6]>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    clock_slot: Mutex<Option<ReplayClock>>,
    /// The window, resolved.
    bounds: Bounds,
    /// The recorded block requests loaded into the disks' backends, by seq.
    expected: HashMap<u64, ExpectedIo>,
    /// Of those, the ones a clone request answered.
    answered: Mutex<HashSet<u64>>,
    /// The highest recorded block request the replay passed.
    block_passed: std::sync::atomic::AtomicU64,
    /// Output streams subscribed before the guest ran, until their reader
    /// threads take them.
    subscriptions: Mutex<Vec<(String, StreamOf, Subscription)>>,
    /// Whether the clone's frames go to the recorded peers (while
    /// replaying).
    peer_active: Arc<AtomicBool>,
    /// NIC name → its recorded peer.
    peers: HashMap<String, Arc<NicPeer>>,
    faults: Mutex<faults::FaultInjector>,
    stop: Arc<AtomicBool>,
    torn_down: AtomicBool,
    debugger: Option<String>,
    /// The replay clock is paused because a debugger stopped the guest.
    debugger_held: AtomicBool,
    /// Held while going live (one attempt at a time).
    going_live: Mutex<()>,
}

impl std::fmt::Debug for CloneRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneRuntime")
            .field("id", &self.shared.id)
            .finish()
    }
}

fn setup(what: &str, reason: impl std::fmt::Display) -> CloneError {
    CloneError::Setup {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run_ip(args: &[&str]) -> Result<(), CloneError> {
    ip_output(args).map(drop)
}

/// Runs `ip` with `args` and returns what it printed.
fn ip_output(args: &[&str]) -> Result<String, CloneError> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        setup(
            "network namespace",
            format!("cannot run ip (iproute2): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(setup(
            "network namespace",
            format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The MAC address of interface `dev` in namespace `netns`.
fn link_mac(netns: &str, dev: &str) -> Result<String, CloneError> {
    let out = ip_output(&["-n", netns, "-o", "link", "show", "dev", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| {
            setup(
                "network namespace",
                format!("{dev} has no Ethernet address"),
            )
        })
}

/// An error and its sources, as one line.
fn error_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Builds the clone `plan` describes and leaves it restored and paused (or
/// replaying, unless `plan.start_paused`). `listener` gets every progress
/// message.
pub fn build(plan: ClonePlan, listener: Listener) -> Result<Arc<CloneRuntime>, CloneError> {
    // Read the window first: a window past the retained data is refused
    // before any process starts.
    let prepared = prepare(&plan)?;
    let mut cfg = source_config(&plan);
    cfg.until_seq = prepared.until_seq;
    let source = EventSource::open(cfg)?;
    let recorded = prepared.frames;

    let peer_macs = peer_macs(&plan, &recorded);
    let clock = if plan.start_paused {
        ReplayClock::paused(plan.speed)
    } else {
        ReplayClock::new(plan.speed)
    };
    let shared = Arc::new(Shared {
        id: plan.clone_id.clone(),
        instance_id: plan.manifest.instance.as_str().to_string(),
        snapshot_id: plan.manifest.snapshot_id.clone(),
        seq_at_cut: plan.manifest.seq_at_cut,
        status: Mutex::new(Status {
            state: pb::CloneState::Restoring,
            replayed_seq: plan.manifest.seq_at_cut,
            last_input_seq: plan.manifest.seq_at_cut,
            delivered: 0,
            detail: String::new(),
            speed: plan.speed,
            divergences: Vec::new(),
            filtered_out: 0,
            frames_acknowledged: 0,
            original_time_ns: 0,
            replay_time_ns: 0,
            lag_ns: 0,
            stream_lost: 0,
        }),
        listener,
        clock: clock.control(),
        started: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        faults_log: Mutex::new(Vec::new()),
        seed: plan.seed,
        switches: plan.switches,
        access: Mutex::new(access_msg(&plan, &peer_macs)),
        crash: Mutex::new(None),
        window: prepared.window,
        awaiting: Mutex::new(HashMap::new()),
        started_mono: Mutex::new(None),
        ack_late: Mutex::new(Vec::new()),
        stream_seen: Mutex::new(HashMap::new()),
    });
    std::fs::create_dir_all(&plan.work_dir).map_err(|e| setup("work directory", e))?;
    let netns = format!("vmr-{}", plan.clone_id);
    let mut rt = CloneRuntime {
        shared,
        netns: netns.clone(),
        procs: Mutex::new(Vec::new()),
        instance: Mutex::new(None),
        source: Mutex::new(Some(source)),
        control_sockets: HashMap::new(),
        blk_controls: Vec::new(),
        peer_macs,
        threads: Mutex::new(Vec::new()),
        clock_slot: Mutex::new(Some(clock)),
        bounds: prepared.bounds,
        expected: prepared
            .expected
            .iter()
            .map(|e| (e.seq, e.clone()))
            .collect(),
        answered: Mutex::new(HashSet::new()),
        block_passed: std::sync::atomic::AtomicU64::new(0),
        subscriptions: Mutex::new(Vec::new()),
        peer_active: Arc::new(AtomicBool::new(false)),
        peers: HashMap::new(),
        faults: Mutex::new(faults::FaultInjector::new(plan.seed, plan.faults.clone())),
        stop: Arc::new(AtomicBool::new(false)),
        torn_down: AtomicBool::new(false),
        debugger: None,
        debugger_held: AtomicBool::new(false),
        going_live: Mutex::new(()),
        plan,
    };
    // From here on, a failure tears down what was started (drop).
    run_ip(&["netns", "add", &netns])?;
    run_ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    // The namespace's own stack stays silent towards the clone (no IPv6
    // autoconfiguration on its interfaces) until the operator goes live.
    for key in ["all", "default"] {
        run_ip(&[
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
        ])?;
    }

    let work = rt.plan.work_dir.clone();
    let mut sockets = Vec::new();
    let mut spec = InstanceSpec::new(
        rt.plan.clone_id.as_str(),
        work.join("vm"),
        BootSpec::Kernel {
            kernel: rt.plan.kernel.clone(),
            initrd: rt.plan.initrd.clone(),
            cmdline: rt.plan.cmdline.clone(),
        },
    );
    std::fs::create_dir_all(work.join("vm")).map_err(|e| setup("work directory", e))?;
    spec.memory_mib = rt.plan.memory_mib;
    spec.vcpus = rt.plan.vcpus;
    spec.qemu.devices = rt.plan.qemu_devices.clone();
    for (dev, image) in rt.plan.disks.clone() {
        let sock = work.join(format!("{dev}.blk.sock"));
        let capture = work.join(format!("{dev}.blk.events"));
        let blk_ctl = work.join(format!("{dev}.blk.ctl"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .arg(&rt.plan.blk_bin)
            .arg("--socket")
            .arg(&sock)
            .arg("--image")
            .arg(&image);
        for l in rt.plan.disk_layers.get(&dev).into_iter().flatten() {
            cmd.arg("--layer").arg(l);
        }
        cmd.arg("--overlay")
            .arg(work.join(format!("{dev}.overlay")))
            .args([
                "--mode",
                "replay",
                "--instance-id",
                &rt.plan.clone_id,
                "--device",
                &dev,
            ])
            .arg("--capture")
            .arg(&capture)
            .arg("--control")
            .arg(&blk_ctl);
        rt.spawn(
            &format!("vhost-tap-blk {dev}"),
            &mut cmd,
            &work.join(format!("{dev}.blk.log")),
        )?;
        sockets.push(sock.clone());
        sockets.push(blk_ctl.clone());
        rt.blk_controls.push((dev.clone(), blk_ctl));
        spec.disks.push(DiskSpec {
            name: dev,
            socket: sock,
        });
    }
    for (nic_index, nic) in rt.plan.nics.clone().into_iter().enumerate() {
        let sock = work.join(format!("{}.net.sock", nic.name));
        let ctl = work.join(format!("{}.net.ctl", nic.name));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .arg(&rt.plan.net_bin)
            .arg("--socket")
            .arg(&sock)
            .args([
                "--mode",
                "replay",
                "--instance-id",
                &rt.plan.clone_id,
                "--device",
                &nic.name,
            ])
            .args(["--mac", &mac_str(&nic.mac)])
            .arg("--capture")
            .arg(work.join(format!("{}.net.events", nic.name)))
            .arg("--control")
            .arg(&ctl)
            // A TAP inside the clone's namespace, silent until the clone
            // goes live (no address, no IPv6): nothing the clone sends
            // leaves the namespace.
            .arg("--forward")
            .args(["--tap", &live_tap(nic_index)]);
        rt.spawn(
            &format!("vhost-tap-net {}", nic.name),
            &mut cmd,
            &work.join(format!("{}.net.log", nic.name)),
        )?;
        sockets.push(sock.clone());
        sockets.push(ctl.clone());
        // A single NIC gets every recorded frame, whatever its device name
        // (as the injection did before the peer).
        let frames = if rt.plan.nics.len() == 1 {
            let mut all: Vec<RecordedFrame> = recorded.values().flatten().cloned().collect();
            all.sort_by_key(|f| f.seq);
            all
        } else {
            recorded.get(&nic.name).cloned().unwrap_or_default()
        };
        let peer = TcpPeer::new(PeerConfig::new(nic.mac), frames)
            .map_err(|e| CloneError::Invalid(format!("recorded frames of {}: {e}", nic.name)))?;
        rt.peers.insert(
            nic.name.clone(),
            Arc::new(NicPeer {
                device: nic.name.clone(),
                peer: Mutex::new(peer),
                injector: Mutex::new(None),
                control: ctl.clone(),
                pending: Mutex::new(None),
                reported: Mutex::new(Vec::new()),
                changed: std::sync::Condvar::new(),
            }),
        );
        rt.control_sockets.insert(nic.name.clone(), ctl);
        spec.nics.push(NicSpec {
            name: nic.name,
            socket: sock,
            mac: MacAddr(nic.mac),
        });
    }
    let deadline = Instant::now() + BACKEND_WAIT;
    for s in &sockets {
        while !s.exists() {
            rt.check_procs()?;
            if Instant::now() > deadline {
                return Err(setup(
                    "backends",
                    format!("{} did not appear within {BACKEND_WAIT:?}", s.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The original's block records go to each disk's backend, and every
    // backend's output stream is subscribed, before the guest runs.
    for (dev, ctl) in &rt.blk_controls {
        let records: Vec<&ExpectedIo> = prepared
            .expected
            .iter()
            .filter(|e| &e.device == dev)
            .collect();
        for batch in records.chunks(EXPECT_BATCH) {
            let lines: Vec<String> = batch.iter().map(|e| e.json()).collect();
            control_request(
                ctl,
                &format!("{{\"cmd\":\"expect\",\"records\":[{}]}}", lines.join(",")),
            )
            .map_err(|e| setup(&format!("block comparison of {dev}"), e))?;
        }
        let sub = Subscription::open(ctl, CONTROL_TIMEOUT)
            .map_err(|e| setup(&format!("output stream of {dev}"), e))?;
        rt.subscriptions.lock().expect("subscriptions lock").push((
            dev.clone(),
            StreamOf::Disk,
            sub,
        ));
    }
    for (nic, ctl) in &rt.control_sockets {
        let sub = Subscription::open(ctl, CONTROL_TIMEOUT)
            .map_err(|e| setup(&format!("output stream of {nic}"), e))?;
        rt.subscriptions.lock().expect("subscriptions lock").push((
            nic.clone(),
            StreamOf::Nic,
            sub,
        ));
    }
    if rt.plan.gdb {
        spec.debug = Some(DebugListen::Tcp(
            "127.0.0.1:0".parse().expect("a valid address"),
        ));
    }
    let driver = vmr_hypervisor::driver(&rt.plan.manifest.driver)?;
    let inst: Arc<dyn Instance> = Arc::from(driver.restore(&spec, &rt.plan.snapshot_dir)?);
    rt.debugger = inst.debugger().map(|d| match d {
        DebugListen::Tcp(a) => a.to_string(),
        other => format!("{other:?}"),
    });
    *rt.instance.lock().expect("instance lock") = Some(inst.clone());
    let rt = Arc::new(rt);
    rt.spawn_watchers(inst);
    if rt.plan.start_paused {
        rt.shared.update(|s| s.state = pb::CloneState::Ready);
    } else {
        rt.start(None)?;
    }
    Ok(rt)
}

impl CloneRuntime {
    fn spawn(&self, name: &str, cmd: &mut Command, log: &Path) -> Result<(), CloneError> {
        let log = std::fs::File::create(log).map_err(|e| setup("log file", e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| setup(name, format!("cannot start it: {e}")))?;
        self.procs
            .lock()
            .expect("procs lock")
            .push((name.to_string(), child));
        Ok(())
    }

    fn check_procs(&self) -> Result<(), CloneError> {
        for (name, child) in self.procs.lock().expect("procs lock").iter_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(setup(
                    name,
                    format!(
                        "exited early ({st}); see its log in {}",
                        self.plan.work_dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The clone's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The recorded instance.
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    /// The clone's state now.
    pub fn info(&self) -> pb::Clone {
        self.shared.snapshot()
    }

    /// The guest's crash (with the last `seq` applied), once it happened.
    pub fn crash(&self) -> Option<pb::CloneLifecycle> {
        self.shared.crash.lock().expect("crash lock").clone()
    }

    /// Divergences found so far.
    pub fn divergences(&self) -> Vec<pb::Divergence> {
        self.shared
            .status
            .lock()
            .expect("status lock")
            .divergences
            .clone()
    }

    /// Where gdb can attach, when the clone was created with one.
    pub fn debugger(&self) -> Option<String> {
        self.debugger.clone()
    }

    /// Whether the replay has ended (crash, failure, stop).
    pub fn is_over(&self) -> bool {
        matches!(
            self.shared.status.lock().expect("status lock").state,
            pb::CloneState::Crashed | pb::CloneState::Failed | pb::CloneState::Stopped
        )
    }

    fn instance(&self) -> Option<Arc<dyn Instance>> {
        self.instance.lock().expect("instance lock").clone()
    }

    fn spawn_watchers(self: &Arc<Self>, inst: Arc<dyn Instance>) {
        let events = inst.subscribe();
        let console = inst.console();
        let me = Arc::downgrade(self);
        let stop = self.stop.clone();
        let lifecycle = std::thread::Builder::new()
            .name("clone-lifecycle".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Some(ev) = events.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Some(rt) = me.upgrade() else { return };
                    rt.on_lifecycle(ev);
                }
            })
            .expect("spawning a thread");
        let me = Arc::downgrade(self);
        let stop = self.stop.clone();
        let console = std::thread::Builder::new()
            .name("clone-console".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Some(chunk) = console.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Some(rt) = me.upgrade() else { return };
                    rt.shared.emit(pb::ReplayProgress {
                        console: chunk,
                        ..Default::default()
                    });
                }
            })
            .expect("spawning a thread");
        self.threads
            .lock()
            .expect("threads lock")
            .extend([lifecycle, console]);
        let subs: Vec<_> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .drain(..)
            .collect();
        for (device, of, sub) in subs {
            let me = Arc::downgrade(self);
            let stop = self.stop.clone();
            let h = std::thread::Builder::new()
                .name(format!("clone-out-{device}"))
                .spawn(move || read_stream(me, stop, device, of, sub))
                .expect("spawning a thread");
            self.threads.lock().expect("threads lock").push(h);
        }
    }

    /// Handles one line of a backend's output stream.
    fn on_output(&self, device: &str, of: StreamOf, out: Output) {
        match out {
            Output::Delivered {
                seq: Some(seq),
                mono_ns,
                ..
            } => {
                self.shared.acknowledge(seq, mono_ns);
            }
            Output::Delivered { seq: None, .. } | Output::Fault { .. } => {}
            Output::Tx { frame, .. } => {
                if !self.peer_active.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(nic) = self.peers.get(device) {
                    if let Err(e) = nic.on_clone_frame(&frame, &self.shared) {
                        tracing::warn!(clone = %self.shared.id, device, error = %e, "injecting a peer frame failed");
                    }
                }
            }
            Output::Block {
                sector,
                len,
                status,
                hash,
                answers: Some(seq),
                matched: Some(matched),
                ..
            } => {
                self.answered.lock().expect("answered lock").insert(seq);
                if !matched {
                    self.block_mismatch(device, seq, sector, len, &status, hash);
                }
            }
            Output::Block { .. } => {}
            Output::Lagged { lost } => {
                tracing::warn!(clone = %self.shared.id, device, lost, ?of, "an output stream lost lines");
                self.shared.update(|s| s.stream_lost += lost);
            }
        }
    }

    /// Reports a clone block request whose data differs from the original
    /// record `seq` it answers.
    fn block_mismatch(
        &self,
        device: &str,
        seq: u64,
        sector: u64,
        len: u32,
        status: &str,
        hash: Option<String>,
    ) {
        let Some(exp) = self.expected.get(&seq) else {
            return;
        };
        let read = exp.op == BlockOp::Read;
        let (kind, description) = match (read, status) {
            (false, "ok") => (
                pb::DivergenceKind::BlockWriteData,
                format!("the clone wrote other data at sector {sector} ({len} bytes) than the original"),
            ),
            (true, "ok") => (
                pb::DivergenceKind::BlockReadData,
                format!("the clone read other data at sector {sector} ({len} bytes) than the original"),
            ),
            (false, st) => (
                pb::DivergenceKind::BlockWriteData,
                format!("the clone's write at sector {sector} ({len} bytes) completed with {st}; the original's did not"),
            ),
            (true, st) => (
                pb::DivergenceKind::BlockReadData,
                format!("the clone's read at sector {sector} ({len} bytes) completed with {st}; the original's did not"),
            ),
        };
        let observed = Event {
            seq: 0,
            payload: Payload::Block(BlockIo {
                device: device.to_string(),
                queue: 0,
                op: exp.op,
                sector,
                len,
                data: Vec::new(),
                content_hash: hash
                    .as_deref()
                    .and_then(crate::outputs::decode_hex)
                    .and_then(|h| h.try_into().ok())
                    .map(ContentHash::Xxh3_128),
                status: match status {
                    "ok" => BlockStatus::Ok,
                    "unsupported" => BlockStatus::Unsupported,
                    _ => BlockStatus::IoErr,
                },
            }),
            ..exp.event.clone()
        };
        tracing::info!(clone = %self.shared.id, seq, device, %description, "block divergence");
        self.shared.add_divergence(pb::Divergence {
            seq,
            device: device.to_string(),
            description,
            expected: Some(exp.event.clone().into()),
            observed: Some(observed.into()),
            kind: kind as i32,
        });
    }

    fn on_lifecycle(&self, ev: DriverEvent) {
        let crashed = matches!(
            ev.kind(),
            LifecycleKind::Crash | LifecycleKind::TripleFault | LifecycleKind::InternalError
        );
        if crashed {
            // The NICs' acknowledgements of the last frames come on their
            // own streams: let them arrive before the last seq is read.
            self.shared.drain_streams();
        }
        let last = self
            .shared
            .status
            .lock()
            .expect("status lock")
            .last_input_seq;
        let lifecycle = pb::ReplayProgress {
            lifecycle: Some(pb::CloneLifecycle {
                lifecycle: Some(ev.lifecycle.clone().into()),
                wall_time_ns: ev.wall_time_ns,
                last_seq_applied: last,
            }),
            ..Default::default()
        };
        if !crashed {
            self.debugger_hold(&ev);
            self.shared.emit(lifecycle);
            return;
        }
        tracing::warn!(clone = %self.shared.id, kind = ?ev.kind(), last_seq = last, "the clone crashed");
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared.clock.stop();
        *self.shared.crash.lock().expect("crash lock") = lifecycle.lifecycle.clone();
        self.shared.emit(lifecycle);
        self.check_block();
        let kind = ev.kind();
        self.shared.update(|st| {
            st.state = pb::CloneState::Crashed;
            st.detail = format!("the guest crashed ({kind:?}) after seq {last}");
        });
    }

    /// A debugger attached to the running guest stops it outside the
    /// driver: the replay clock pauses with it, and resumes when the
    /// debugger lets the guest run again (unless the operator paused).
    fn debugger_hold(&self, ev: &DriverEvent) {
        if !self.plan.gdb || self.shared.ended.load(Ordering::SeqCst) {
            return;
        }
        let detail = &ev.lifecycle.detail;
        match ev.kind() {
            LifecycleKind::Pause
                if detail.contains("outside the driver")
                    && self.shared.clock.status().mode != ClockMode::Paused =>
            {
                self.debugger_held.store(true, Ordering::SeqCst);
                self.shared.clock.pause();
                tracing::info!(clone = %self.shared.id, "a debugger holds the guest; the replay pauses");
                self.shared.update(|s| {
                    s.detail = "paused: a debugger holds the guest".into();
                });
            }
            LifecycleKind::Resume
                if !detail.contains("pausing again")
                    && self.debugger_held.swap(false, Ordering::SeqCst) =>
            {
                self.shared.clock.resume();
                tracing::info!(clone = %self.shared.id, "the debugger let the guest run; the replay resumes");
                self.shared.update(|s| {
                    s.detail = "the debugger let the guest run; replaying".into();
                });
            }
            _ => {}
        }
    }

    /// Starts the replay: running, or with `step` events then paused, or
    /// up to `run_to` then paused.
    pub fn start(self: &Arc<Self>, step: Option<u64>) -> Result<(), CloneError> {
        self.start_with(step, None)
    }

    fn start_with(
        self: &Arc<Self>,
        step: Option<u64>,
        run_to: Option<u64>,
    ) -> Result<(), CloneError> {
        // A clone stopped or made live before its replay began has no
        // replay left to start.
        self.not_over()?;
        if self.shared.started.swap(true, Ordering::SeqCst) {
            return Err(CloneError::State(
                "the replay has already been started".into(),
            ));
        }
        let inst = self
            .instance()
            .ok_or_else(|| CloneError::State("the clone has no guest".into()))?;
        inst.resume()?;
        let source = self
            .source
            .lock()
            .expect("source lock")
            .take()
            .ok_or_else(|| CloneError::State("the replay has already been started".into()))?;
        self.shared.update(|s| s.state = pb::CloneState::Replaying);
        if let Some(n) = step {
            self.shared.clock.step(n);
        } else if let Some(seq) = run_to {
            self.shared.clock.run_to(RunTo::Seq(seq));
        } else if self.plan.start_paused {
            self.shared.clock.resume();
        }
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name("clone-replay".into())
            .spawn(move || me.replay(source))
            .map_err(|e| setup("replay thread", e))?;
        self.threads.lock().expect("threads lock").push(h);
        Ok(())
    }

    fn replay(self: Arc<Self>, source: EventSource) {
        let manifest = &self.plan.manifest;
        let mut timeline = Timeline::from_manifest(manifest);
        let bounds = self.bounds;
        let filter = self.plan.filter.clone();
        // The clock whose control the service holds.
        let mut clock = self.take_clock();
        // The clone's frames go to the recorded peers while replaying.
        self.peer_active.store(true, Ordering::SeqCst);
        // Timing of the paced dispatches against their due times (the
        // frames' acknowledgements are timed as they arrive).
        let mut dispatch_late: Vec<Duration> = Vec::new();
        let timed = !matches!(self.plan.speed, Speed::AsFastAsPossible);
        if timed {
            // A paced replay sleeps to each due time: real-time priority (where
            // the host grants it) makes its wake-ups prompt on a busy host. An
            // as-fast-as-possible replay never sleeps, so it keeps the default
            // policy rather than hold a core.
            let setup = crate::schedule::prepare_dispatch_thread(&RealtimeOptions {
                lock_memory: false,
                ..RealtimeOptions::realtime(10)
            });
            for r in &setup.refused {
                tracing::info!(clone = %self.id(), "replay thread: {r}");
            }
        }
        let result = replay::run(
            source,
            &mut timeline,
            &bounds,
            BeforeWindow::Skip,
            &filter,
            &mut clock,
            |e, d| {
                let (_, mono) = vmr_hypervisor::events::now_ns();
                self.shared
                    .started_mono
                    .lock()
                    .expect("start lock")
                    .get_or_insert(mono);
                if let Some(d) = d.filter(|_| timed && dispatch_late.len() < TIMING_SAMPLES) {
                    dispatch_late.push(d.lateness());
                }
                // When the event was due, on the host's monotonic clock.
                let due_mono = d
                    .filter(|_| timed)
                    .map(|d| mono.saturating_sub(d.lateness().as_nanos() as u64));
                if self.stop.load(Ordering::SeqCst) {
                    return Err(DeliverError("the clone is being removed".into()));
                }
                let guest_ns = d.map_or(0, |d| d.guest_offset.as_nanos() as u64);
                self.event_faults(&e.event, guest_ns)?;
                let seq = e.event.seq;
                if let Payload::Net(n) = &e.event.payload {
                    if n.direction == Direction::Rx {
                        let nic = self
                            .peers
                            .get(&n.device)
                            // One NIC takes a frame of any device; with more,
                            // a frame goes only to its own device's peer.
                            .or_else(|| {
                                self.peers.values().next().filter(|_| self.peers.len() == 1)
                            })
                            .ok_or_else(|| {
                                DeliverError(format!("no NIC for device {}", n.device))
                            })?;
                        let awaited = nic.deliver_due(
                            seq,
                            Awaiting { due_mono, guest_ns },
                            &self.stop,
                            &self.faults,
                            &self.shared,
                        )?;
                        if !awaited {
                            // Dropped by a fault, or skipped by the peer:
                            // applied without a delivery.
                            self.shared.apply(seq, guest_ns, true, mono, None);
                        }
                        return Ok(());
                    }
                }
                if let Payload::Block(_) = &e.event.payload {
                    self.block_passed.fetch_max(seq, Ordering::SeqCst);
                }
                let input = !matches!(e.event.payload, Payload::Lifecycle(_));
                self.shared.apply(seq, guest_ns, input, mono, None);
                Ok(())
            },
        );
        if result.is_ok() {
            // The acknowledgements of the last frames.
            let end = Instant::now() + ACK_WAIT;
            while Instant::now() < end
                && !self
                    .shared
                    .awaiting
                    .lock()
                    .expect("awaiting lock")
                    .is_empty()
                && !self.stop.load(Ordering::SeqCst)
                && !self.shared.ended.load(Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The clone's last frames, then the peers' reports.
        self.shared.drain_streams();
        self.peer_active.store(false, Ordering::SeqCst);
        for nic in self.peers.values() {
            nic.report_divergences(&self.shared);
        }
        match result {
            Ok(report) => {
                self.shared.update(|s| {
                    s.filtered_out = report.filter.removed_total();
                    if s.state != pb::CloneState::Crashed && s.state != pb::CloneState::Live {
                        s.state = pb::CloneState::Finished;
                        s.detail = format!(
                            "{} events applied ({} received frames acknowledged by the NIC), {} gaps, {} undecodable records",
                            s.delivered,
                            s.frames_acknowledged,
                            report.gaps.len(),
                            report.poison.len()
                        );
                        let pending = self.shared.awaiting.lock().expect("awaiting lock").len();
                        if pending > 0 {
                            s.detail.push_str(&format!(
                                "; {pending} injected frames not acknowledged (the guest took no receive buffer)"
                            ));
                        }
                        if s.stream_lost > 0 {
                            s.detail.push_str(&format!(
                                "; the output streams lost {} lines, so the comparison is incomplete",
                                s.stream_lost
                            ));
                        }
                        if report.filter.is_filtered() {
                            let f = &report.filter;
                            s.detail.push_str(&format!(
                                "; the stream was filtered: {} recorded events not delivered (block {}, net {}, env {}, lifecycle {})",
                                f.removed_total(),
                                f.removed_of(Kind::Block),
                                f.removed_of(Kind::Net),
                                f.removed_of(Kind::Env),
                                f.removed_of(Kind::Lifecycle)
                            ));
                        }
                        if let Some(t) = timing_text("dispatch", &mut dispatch_late) {
                            s.detail.push_str(&format!("; timing: {t}"));
                            let mut acked = self.shared.ack_late.lock().expect("ack lock").clone();
                            if let Some(i) = timing_text("frame delivery (acknowledged)", &mut acked) {
                                s.detail.push_str(&format!(", {i}"));
                            }
                        }
                        let f = self.faults.lock().expect("faults lock");
                        if !f.is_empty() {
                            s.detail.push_str(&format!(
                                ", {} faults injected (seed {})",
                                f.injected().len(),
                                f.seed()
                            ));
                        }
                    }
                });
                self.check_block();
            }
            Err(ReplayError::Stopped) => {}
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                self.fail(msg);
            }
        }
    }

    fn take_clock(&self) -> ReplayClock {
        self.clock_slot
            .lock()
            .expect("clock lock")
            .take()
            .unwrap_or_else(|| ReplayClock::new(self.plan.speed))
    }

    /// Marks the replay failed (for example after a switch that could not
    /// build the new guest).
    pub fn fail_with(&self, detail: String) {
        self.shared.ended.store(true, Ordering::SeqCst);
        self.fail(detail);
    }

    fn fail(&self, detail: String) {
        tracing::warn!(clone = %self.shared.id, %detail, "replay failed");
        self.shared.update(|s| {
            if s.state != pb::CloneState::Crashed {
                s.state = pb::CloneState::Failed;
                s.detail = detail;
            }
        });
    }

    /// Reports the recorded block writes the replay passed that no clone
    /// request answered (on the disks' output streams), each once. Data
    /// differences are reported as their `block` lines arrive.
    fn check_block(&self) {
        let passed = self.block_passed.load(Ordering::SeqCst);
        let answered = self.answered.lock().expect("answered lock").clone();
        let mut missing: Vec<&ExpectedIo> = self
            .expected
            .values()
            .filter(|e| e.op == BlockOp::Write && e.seq <= passed && !answered.contains(&e.seq))
            .collect();
        missing.sort_by_key(|e| e.seq);
        let known: Vec<(u64, i32)> = self.divergences().iter().map(|d| (d.seq, d.kind)).collect();
        for e in missing {
            let kind = pb::DivergenceKind::BlockWriteMissing as i32;
            if known.contains(&(e.seq, kind)) {
                continue;
            }
            self.shared.add_divergence(pb::Divergence {
                seq: e.seq,
                device: e.device.clone(),
                description: format!(
                    "the original wrote {} bytes at sector {}; the clone did not",
                    e.len, e.sector
                ),
                expected: Some(e.event.clone().into()),
                observed: None,
                kind,
            });
        }
    }

    /// Decides the event faults (I/O errors, synthetic frames) for a
    /// delivered recorded event and applies them: an I/O error rule is
    /// armed in the disk's block backend (which fails the clone's next
    /// matching requests), a synthetic frame is injected into the NIC.
    fn event_faults(&self, e: &Event, guest_ns: u64) -> Result<(), DeliverError> {
        let (fault, seed) = {
            let mut f = self.faults.lock().expect("faults lock");
            if !f.has_event_rules() {
                return Ok(());
            }
            let dev = match &e.payload {
                Payload::Block(b) => Some(b.device.as_str()),
                _ => None,
            };
            (f.apply_event(e.seq, dev, guest_ns), f.seed())
        };
        let Some(fault) = fault else { return Ok(()) };
        match &fault.action {
            faults::FaultAction::IoError {
                op,
                sector_start,
                sector_end,
                count,
            } => {
                let rule = format!(
                    "{{\"kind\":\"io-error\",{}\"sector_start\":{sector_start},\"sector_end\":{sector_end},\"count\":{count}}}",
                    op.map(|o| format!("\"op\":\"{}\",", faults::op_name(o)))
                        .unwrap_or_default()
                );
                let ctl = self
                    .blk_controls
                    .iter()
                    .find(|(d, _)| *d == fault.device)
                    .or_else(|| self.blk_controls.first())
                    .ok_or_else(|| DeliverError("the clone has no disk for an I/O error".into()))?;
                control_request(&ctl.1, &format!("{{\"cmd\":\"fault\",\"rule\":{rule}}}"))?;
            }
            faults::FaultAction::Synthetic(frame) => {
                let nic = self
                    .peers
                    .get(&fault.device)
                    .or_else(|| self.peers.values().next())
                    .ok_or_else(|| {
                        DeliverError("the clone has no NIC for a synthetic frame".into())
                    })?;
                nic.inject(frame, None)?;
            }
            _ => return Ok(()),
        }
        tracing::info!(clone = %self.shared.id, fault = %fault, "fault injected");
        self.shared.report_fault(&fault, seed);
        Ok(())
    }

    /// Every fault injected so far, in order.
    pub fn injected_faults(&self) -> Vec<pb::InjectedFault> {
        self.shared
            .faults_log
            .lock()
            .expect("faults log lock")
            .clone()
    }

    /// The fault seed.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Stops replaying and keeps the guest running for interactive use:
    /// the namespace's interface towards each NIC takes the recorded
    /// peer's MAC and address and comes up, so the guest's service is
    /// reachable from inside the namespace (see [`pb::CloneAccess`]).
    ///
    /// All or nothing: the MACs change first, while the replay goes on (the
    /// namespace's stack has no address yet, so the clone sees nothing of
    /// it); a NIC that fails there puts the NICs already changed back and
    /// the clone replays on as before ([`CloneError::GoLive`] with
    /// `replay_kept`). Then the replay stops and the interfaces take their
    /// addresses and come up; a failure there puts every NIC back and fails
    /// the clone, with the NIC in its detail.
    pub fn go_live(&self) -> Result<(), CloneError> {
        let _one = self.going_live.lock().expect("go-live lock");
        if self.shared.ended.load(Ordering::SeqCst) || self.is_over() {
            return Err(CloneError::State(format!(
                "the replay has ended ({}); only a replaying, paused or finished clone can go live",
                self.shared.status.lock().expect("status lock").detail
            )));
        }
        // Each interface's own MAC, to put back.
        let mut changed: Vec<(String, String)> = Vec::new();
        for (i, nic) in self.plan.nics.iter().enumerate() {
            let tap = live_tap(i);
            let step = link_mac(&self.netns, &tap).and_then(|own| {
                if let Some(mac) = self.peer_macs.get(&nic.name) {
                    run_ip(&[
                        "-n",
                        &self.netns,
                        "link",
                        "set",
                        "dev",
                        &tap,
                        "address",
                        &mac_str(mac),
                    ])?;
                }
                Ok(own)
            });
            match step {
                Ok(own) => changed.push((tap, own)),
                Err(e) => {
                    self.undo_live(&changed);
                    let e = CloneError::GoLive {
                        nic: nic.name.clone(),
                        interface: tap,
                        reason: error_line(&e),
                        replay_kept: true,
                    };
                    tracing::warn!(clone = %self.shared.id, error = %e, "going live failed; the replay goes on");
                    return Err(e);
                }
            }
        }
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared.clock.stop();
        // The replay thread ends at the stopped clock; the peers stop
        // answering the clone.
        self.peer_active.store(false, Ordering::SeqCst);
        for (i, nic) in self.plan.nics.iter().enumerate() {
            let tap = live_tap(i);
            let a = self.plan.access.nics.get(i).cloned().unwrap_or_default();
            let step = a
                .peer_ip
                .as_ref()
                .map_or(Ok(()), |peer| {
                    run_ip(&[
                        "-n",
                        &self.netns,
                        "addr",
                        "replace",
                        &format!("{peer}/{}", a.prefix),
                        "dev",
                        &tap,
                    ])
                })
                .and_then(|()| run_ip(&["-n", &self.netns, "link", "set", "dev", &tap, "up"]));
            if let Err(e) = step {
                self.undo_live(&changed);
                let e = CloneError::GoLive {
                    nic: nic.name.clone(),
                    interface: tap,
                    reason: error_line(&e),
                    replay_kept: false,
                };
                self.fail(format!(
                    "{e}; the replay had stopped, so the clone can neither replay nor go live: delete it"
                ));
                return Err(e);
            }
        }
        if let Some(i) = self.instance() {
            let resumed = i.query().and_then(|q| {
                if q.state == RunState::Paused || q.state == RunState::Created {
                    i.resume()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = resumed {
                self.fail(format!(
                    "going live failed: the guest cannot run: {}",
                    error_line(&e)
                ));
                return Err(e.into());
            }
        }
        let first = self.plan.access.nics.first().cloned().unwrap_or_default();
        let tap = live_tap(0);
        let hint = match (&first.guest_ip, self.plan.access.service_port) {
            (Some(ip), Some(port)) => format!("ip netns exec {} nc {ip} {port}", self.netns),
            (Some(ip), None) => format!("ip netns exec {} ping {ip}", self.netns),
            _ => format!("ip netns exec {} ip link show {tap}", self.netns),
        };
        {
            let mut acc = self.shared.access.lock().expect("access lock");
            if !self.plan.nics.is_empty() {
                acc.interface = tap.clone();
            }
            for (i, n) in acc.nics.iter_mut().enumerate() {
                n.interface = live_tap(i);
            }
            acc.hint = hint.clone();
        }
        self.shared.update(|s| {
            s.state = pb::CloneState::Live;
            s.detail = format!(
                "live after seq {}: reach the guest with `{hint}`",
                s.replayed_seq
            );
        });
        Ok(())
    }

    /// Puts namespace interfaces (name, own MAC) back as they were before
    /// going live: no address, their own MAC.
    fn undo_live(&self, changed: &[(String, String)]) {
        for (tap, mac) in changed {
            for args in [
                vec!["-n", &self.netns, "addr", "flush", "dev", tap],
                vec!["-n", &self.netns, "link", "set", "dev", tap, "address", mac],
            ] {
                if let Err(error) = run_ip(&args) {
                    tracing::warn!(clone = %self.shared.id, interface = %tap, %error, "putting a namespace interface back failed");
                }
            }
        }
    }

    /// Pauses the replay and the guest.
    pub fn pause(&self) -> Result<(), CloneError> {
        self.live()?;
        self.debugger_held.store(false, Ordering::SeqCst);
        self.shared.clock.pause();
        self.guest(RunState::Running, |i| i.pause())?;
        self.shared.update(|_| {});
        Ok(())
    }

    /// Resumes the guest and the replay.
    pub fn resume(&self) -> Result<(), CloneError> {
        self.live()?;
        self.guest(RunState::Paused, |i| i.resume())?;
        self.shared.clock.resume();
        self.shared.update(|_| {});
        Ok(())
    }

    /// Delivers `n` more events, then pauses the replay (the guest runs).
    pub fn step(self: &Arc<Self>, n: u64) -> Result<(), CloneError> {
        if !self.shared.started.load(Ordering::SeqCst) {
            return self.start(Some(n));
        }
        self.live()?;
        self.guest(RunState::Paused, |i| i.resume())?;
        self.shared.clock.step(n);
        self.shared.update(|_| {});
        Ok(())
    }

    /// Replays up to and including `seq`, then pauses the replay.
    pub fn run_to(self: &Arc<Self>, seq: u64) -> Result<(), CloneError> {
        if seq <= self.shared.seq_at_cut {
            return Err(CloneError::Invalid(format!(
                "seq {seq} is not after the snapshot's cut at seq {}",
                self.shared.seq_at_cut
            )));
        }
        if !self.shared.started.load(Ordering::SeqCst) {
            return self.start_with(None, Some(seq));
        }
        self.live()?;
        self.guest(RunState::Paused, |i| i.resume())?;
        self.shared.clock.run_to(RunTo::Seq(seq));
        self.shared.update(|_| {});
        Ok(())
    }

    /// Changes the replay speed.
    pub fn set_speed(&self, speed: Speed) -> Result<(), CloneError> {
        self.shared.clock.set_speed(speed);
        self.shared.update(|s| s.speed = speed);
        Ok(())
    }

    /// Ends the replay and stops the guest.
    pub fn stop_replay(&self) -> Result<(), CloneError> {
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared.clock.stop();
        if let Some(i) = self.instance() {
            let _ = i.stop(STOP_GRACE);
        }
        self.shared.update(|s| {
            if s.state != pb::CloneState::Crashed {
                s.state = pb::CloneState::Stopped;
                s.detail = "stopped by the operator".into();
            }
        });
        Ok(())
    }

    /// Applies `f` to the guest when it is in state `when`.
    fn guest(
        &self,
        when: RunState,
        f: impl FnOnce(&dyn Instance) -> Result<(), vmr_hypervisor::DriverError>,
    ) -> Result<(), CloneError> {
        if let Some(i) = self.instance() {
            if i.query()?.state == when {
                f(i.as_ref())?;
            }
        }
        Ok(())
    }

    fn not_over(&self) -> Result<(), CloneError> {
        if self.shared.ended.load(Ordering::SeqCst) || self.is_over() {
            return Err(CloneError::State(format!(
                "the replay has ended ({})",
                self.shared.status.lock().expect("status lock").detail
            )));
        }
        Ok(())
    }

    fn live(&self) -> Result<(), CloneError> {
        self.not_over()?;
        if !self.shared.started.load(Ordering::SeqCst) {
            return Err(CloneError::State(
                "the replay has not been started (CONTROL_ACTION_START)".into(),
            ));
        }
        Ok(())
    }

    /// Stops the guest, the backends and the replay and removes the
    /// namespace and the clone's directory. Idempotent; every wait is
    /// bounded. It runs once only, so it goes on past locks a panic
    /// poisoned rather than stop half way.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        self.shared.clock.stop();
        if let Some(i) = self
            .instance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            if let Err(error) = i.stop(STOP_GRACE) {
                tracing::warn!(clone = %self.shared.id, %error, "stopping the guest failed");
            }
        }
        for (name, mut child) in self
            .procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            stop_child(&name, &mut child);
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        if let Err(error) = run_ip(&["netns", "del", &self.netns]) {
            tracing::warn!(clone = %self.shared.id, %error, "removing the namespace failed");
        }
        let _ = std::fs::remove_dir_all(&self.plan.work_dir);
        if let Some(d) = &self.plan.owned_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for CloneRuntime {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn stop_child(name: &str, child: &mut Child) {
    // SAFETY: kill(2) on the pid of a child this process started and has
    // not yet reaped; it touches no memory.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(process = name, "did not stop on SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DeliverError(String);

/// One request on a backend's control socket; an error unless it answers
/// `"ok":true`.
fn control_request(path: &Path, line: &str) -> Result<String, DeliverError> {
    let s = UnixStream::connect(path)
        .map_err(|e| DeliverError(format!("control socket {}: {e}", path.display())))?;
    s.set_read_timeout(Some(CONTROL_TIMEOUT))
        .map_err(|e| DeliverError(e.to_string()))?;
    s.set_write_timeout(Some(CONTROL_TIMEOUT))
        .map_err(|e| DeliverError(e.to_string()))?;
    let mut r = BufReader::new(s);
    writeln!(r.get_mut(), "{line}")
        .map_err(|e| DeliverError(format!("control socket write: {e}")))?;
    let mut answer = String::new();
    r.read_line(&mut answer)
        .map_err(|e| DeliverError(format!("control socket read: {e}")))?;
    if !answer.contains("\"ok\":true") {
        return Err(DeliverError(format!(
            "the backend refused {line}: {}",
            answer.trim()
        )));
    }
    Ok(answer)
}

struct Injector {
    stream: BufReader<UnixStream>,
}

impl Injector {
    fn connect(path: &Path) -> Result<Self, DeliverError> {
        let s = UnixStream::connect(path)
            .map_err(|e| DeliverError(format!("control socket {}: {e}", path.display())))?;
        s.set_read_timeout(Some(CONTROL_TIMEOUT))
            .map_err(|e| DeliverError(e.to_string()))?;
        s.set_write_timeout(Some(CONTROL_TIMEOUT))
            .map_err(|e| DeliverError(e.to_string()))?;
        Ok(Self {
            stream: BufReader::new(s),
        })
    }

    fn inject(&mut self, frame: &[u8], seq: Option<u64>) -> Result<(), DeliverError> {
        let hex = crate::outputs::encode_hex(frame);
        let seq = seq.map(|s| format!(",\"seq\":{s}")).unwrap_or_default();
        writeln!(
            self.stream.get_mut(),
            "{{\"cmd\":\"inject\",\"frame\":\"{hex}\"{seq}}}"
        )
        .map_err(|e| DeliverError(format!("control socket write: {e}")))?;
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .map_err(|e| DeliverError(format!("control socket read: {e}")))?;
        if !line.contains("\"ok\":true") {
            return Err(DeliverError(format!(
                "the NIC refused the frame: {}",
                line.trim()
            )));
        }
        Ok(())
    }
}

/// The event source of a plan, from the manifest's offsets.
fn source_config(plan: &ClonePlan) -> SourceConfig {
    let mut cfg =
        SourceConfig::from_manifest(plan.bootstrap_servers.clone(), &plan.manifest, plan.kinds);
    cfg.fetch_timeout = plan.fetch_timeout;
    cfg.security = plan.kafka_security.clone();
    cfg
}

/// Which backend an output stream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamOf {
    Nic,
    Disk,
}

/// A recorded block request a disk's backend compares the clone's
/// requests with (`expect`): a write with the hash of its data, or a read
/// with the hash of the data it returned (xxh3-128).
#[derive(Debug, Clone)]
pub struct ExpectedIo {
    pub seq: u64,
    pub device: String,
    pub op: BlockOp,
    pub sector: u64,
    pub len: u32,
    pub hash: [u8; 16],
    /// The record without its data (for the divergence report).
    pub event: Event,
}

impl ExpectedIo {
    /// The record of a recorded block event, if it can be compared: a
    /// write, or a read whose recorded hash is xxh3-128.
    pub fn of(e: &Event) -> Option<Self> {
        let Payload::Block(b) = &e.payload else {
            return None;
        };
        let hash: [u8; 16] = match b.op {
            BlockOp::Write => xxhash_rust::xxh3::xxh3_128(&b.data).to_be_bytes(),
            BlockOp::Read => match &b.content_hash {
                Some(ContentHash::Xxh3_128(h)) => *h,
                _ => return None,
            },
            _ => return None,
        };
        let mut event = e.clone();
        if let Payload::Block(b) = &mut event.payload {
            b.data.clear();
            b.content_hash = Some(ContentHash::Xxh3_128(hash));
        }
        Some(Self {
            seq: e.seq,
            device: b.device.clone(),
            op: b.op,
            sector: b.sector,
            len: b.len,
            hash,
            event,
        })
    }

    /// The record in the backend's `expect` form.
    fn json(&self) -> String {
        format!(
            "{{\"seq\":{},\"op\":\"{}\",\"sector\":{},\"len\":{},\"hash\":\"{}\"}}",
            self.seq,
            faults::op_name(self.op),
            self.sector,
            self.len,
            crate::outputs::encode_hex(&self.hash)
        )
    }
}

/// What [`prepare`] read of the recording before the clone is built.
#[derive(Debug)]
pub struct Prepared {
    /// The window, resolved.
    pub bounds: Bounds,
    /// The window as reported.
    pub window: pb::AppliedWindow,
    /// The window's recorded net frames (both directions) by NIC name.
    pub frames: HashMap<String, Vec<RecordedFrame>>,
    /// The window's recorded block requests to compare.
    pub expected: Vec<ExpectedIo>,
    /// The last `seq` the replay needs (None: to the end).
    pub until_seq: Option<u64>,
}

/// Resolves the plan's window against the recording (a percentage or a
/// portion first measures the recording after the cut, a full pass) and
/// reads the window once, as the replay will deliver it (the request's
/// kinds and filter): its extent, its net frames for the TCP peers (at
/// most [`MAX_PEER_FRAMES`] or [`MAX_PEER_BYTES`]) and its block requests
/// for the comparison. A window past the recorded events is
/// [`CloneError::OutOfRange`]; one ending at or before the cut, or holding
/// no recorded event, [`CloneError::Precondition`].
pub fn prepare(plan: &ClonePlan) -> Result<Prepared, CloneError> {
    let m = &plan.manifest;
    let cfg = source_config(plan);
    let w = &plan.window;
    let span = if w.needs_span() {
        let s = Span::measure(EventSource::open(cfg.clone())?, Timeline::from_manifest(m))?;
        Some(s.ok_or_else(|| {
            CloneError::OutOfRange(format!(
                "window {w}: the recording has no event after the snapshot's cut at seq {}",
                m.seq_at_cut
            ))
        })?)
    } else {
        None
    };
    let bounds = w.resolve(span.as_ref()).map_err(|e| match e {
        WindowError::PastEnd(_) => CloneError::OutOfRange(format!(
            "window {w}: it starts after the recorded events end ({e})"
        )),
        _ => CloneError::Invalid(format!("window {w}: {e}")),
    })?;
    if let Some(t) = bounds.seq_to.filter(|t| *t <= m.seq_at_cut) {
        return Err(CloneError::Precondition(format!(
            "the window ends at seq {t}, at or before the snapshot's cut at seq {}",
            m.seq_at_cut
        )));
    }
    if let Some(t) = bounds.wall_to_ns.filter(|t| *t < m.wall_time_ns) {
        return Err(CloneError::Precondition(format!(
            "the window ends at wall time {t} ns, before the snapshot's cut at {} ns",
            m.wall_time_ns
        )));
    }
    let mut pre = cfg;
    pre.until_seq = bounds.seq_to;
    let source = EventSource::open(pre)?;
    let mut timeline = Timeline::from_manifest(m);
    let mut clock = ReplayClock::new(Speed::AsFastAsPossible);
    let mut window = pb::AppliedWindow {
        form: w.to_string(),
        ..Default::default()
    };
    let mut frames: HashMap<String, Vec<RecordedFrame>> = HashMap::new();
    let mut expected = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    let r = replay::run(
        source,
        &mut timeline,
        &bounds,
        BeforeWindow::Skip,
        &plan.filter,
        &mut clock,
        |e, d| {
            let ev = &e.event;
            let guest = d.map_or(0, |d| d.guest_offset.as_nanos() as u64);
            if window.events == 0 {
                window.first_seq = ev.seq;
                window.first_guest_ns = guest;
                window.first_wall_ns = ev.wall_time_ns;
            }
            window.events += 1;
            window.last_seq = ev.seq;
            window.last_guest_ns = guest;
            window.last_wall_ns = ev.wall_time_ns;
            match &ev.payload {
                Payload::Net(n) => {
                    count += 1;
                    bytes += n.frame.len();
                    if count > MAX_PEER_FRAMES || bytes > MAX_PEER_BYTES {
                        return Err(DeliverError(format!(
                            "the window holds more than {MAX_PEER_FRAMES} net frames or {MAX_PEER_BYTES} bytes of them; replay a smaller window"
                        )));
                    }
                    if let Some(f) = RecordedFrame::from_event(ev) {
                        frames.entry(n.device.clone()).or_default().push(f);
                    }
                }
                Payload::Block(_) => expected.extend(ExpectedIo::of(ev)),
                _ => {}
            }
            Ok(())
        },
    );
    let report = match r {
        Ok(r) => r,
        Err(ReplayError::Deliver { source, .. }) => return Err(CloneError::Invalid(source.0)),
        Err(ReplayError::Source(e)) => return Err(CloneError::Source(e)),
        Err(e) => {
            return Err(CloneError::State(format!(
                "reading the window's events: {e}"
            )))
        }
    };
    let inside = window.events + report.filter.removed_total();
    if inside == 0 && *w != Window::All {
        let last = report.last_seq.unwrap_or(m.seq_at_cut);
        return Err(if report.reached_window_end {
            CloneError::Precondition(format!(
                "window {w}: no recorded event after the snapshot's cut lies inside it"
            ))
        } else {
            CloneError::OutOfRange(format!(
                "window {w}: it starts after the recorded events end (the last after the cut at seq {} is seq {last})",
                m.seq_at_cut
            ))
        });
    }
    let has_end =
        bounds.seq_to.is_some() || bounds.guest_to.is_some() || bounds.wall_to_ns.is_some();
    let until_seq = bounds
        .seq_to
        .or((has_end && window.events > 0).then_some(window.last_seq));
    Ok(Prepared {
        bounds,
        window,
        frames,
        expected,
        until_seq,
    })
}

/// NIC name → the recorded peer's MAC: the source MAC of the NIC's first
/// recorded received frame (with a single NIC, of any recorded frame).
fn peer_macs(
    plan: &ClonePlan,
    recorded: &HashMap<String, Vec<RecordedFrame>>,
) -> HashMap<String, [u8; 6]> {
    let first_src = |frames: &mut dyn Iterator<Item = &RecordedFrame>| {
        frames
            .filter(|f| f.direction == crate::net::Direction::ToGuest && f.data.len() >= 12)
            .min_by_key(|f| f.seq)
            .map(|f| {
                let mut m = [0u8; 6];
                m.copy_from_slice(&f.data[6..12]);
                m
            })
    };
    let mut out = HashMap::new();
    for nic in &plan.nics {
        let mac = if plan.nics.len() == 1 {
            first_src(&mut recorded.values().flatten())
        } else {
            first_src(&mut recorded.get(&nic.name).into_iter().flatten())
        };
        if let Some(m) = mac {
            out.insert(nic.name.clone(), m);
        }
    }
    out
}

/// How the operator reaches the clone, before it is live.
fn access_msg(plan: &ClonePlan, peer_macs: &HashMap<String, [u8; 6]>) -> pb::CloneAccess {
    let first = plan.access.nics.first().cloned().unwrap_or_default();
    pb::CloneAccess {
        netns: format!("vmr-{}", plan.clone_id),
        guest_ip: first.guest_ip.unwrap_or_default(),
        peer_ip: first.peer_ip.unwrap_or_default(),
        service_port: plan.access.service_port.map_or(0, u32::from),
        nics: plan
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let a = plan.access.nics.get(i).cloned().unwrap_or_default();
                pb::NicAccess {
                    device: n.name.clone(),
                    interface: String::new(),
                    guest_ip: a.guest_ip.unwrap_or_default(),
                    peer_ip: a.peer_ip.unwrap_or_default(),
                    peer_mac: peer_macs.get(&n.name).map(mac_str).unwrap_or_default(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Reads a backend's output stream until the clone goes or the stream
/// ends.
fn read_stream(
    rt: std::sync::Weak<CloneRuntime>,
    stop: Arc<AtomicBool>,
    device: String,
    of: StreamOf,
    mut sub: Subscription,
) {
    while !stop.load(Ordering::SeqCst) {
        let r = sub.read();
        let Some(rt) = rt.upgrade() else { return };
        match r {
            Ok(Read::Output(o)) => {
                rt.shared.seen(&device);
                rt.on_output(&device, of, o);
            }
            Ok(Read::Unknown(line)) => {
                rt.shared.seen(&device);
                tracing::debug!(clone = %rt.shared.id, %device, %line, "an output line not understood");
            }
            Ok(Read::Idle) => {}
            Ok(Read::End) => return,
            Err(error) => {
                if !stop.load(Ordering::SeqCst) {
                    tracing::warn!(clone = %rt.shared.id, %device, %error, "the output stream failed");
                }
                return;
            }
        }
    }
}

/// A NIC's recorded TCP peer and its way into the clone.
struct NicPeer {
    device: String,
    peer: Mutex<TcpPeer>,
    injector: Mutex<Option<Injector>>,
    control: PathBuf,
    /// A frame the peer handed out before its recorded time.
    pending: Mutex<Option<(u64, Vec<u8>)>>,
    /// Divergences already reported (flow, text).
    reported: Mutex<Vec<(usize, String)>>,
    /// Signalled when the clone sent frames.
    changed: std::sync::Condvar,
}

impl NicPeer {
    /// Injects a frame, with the recorded `seq` it carries (the NIC
    /// acknowledges its delivery with it).
    fn inject(&self, frame: &[u8], seq: Option<u64>) -> Result<(), DeliverError> {
        let mut inj = self.injector.lock().expect("injector lock");
        if inj.is_none() {
            *inj = Some(Injector::connect(&self.control)?);
        }
        inj.as_mut().expect("connected above").inject(frame, seq)
    }

    /// Delivers every inbound frame the peer has up to recorded `seq` (the
    /// event now due), waiting for the clone where the peer says so.
    /// Returns whether frame `seq` was injected (and awaits its
    /// acknowledgement), rather than dropped by a fault or skipped by the
    /// peer.
    fn deliver_due(
        &self,
        seq: u64,
        timing: Awaiting,
        stop: &AtomicBool,
        faults: &Mutex<faults::FaultInjector>,
        shared: &Shared,
    ) -> Result<bool, DeliverError> {
        {
            let mut p = self.pending.lock().expect("pending lock");
            match p.take() {
                Some((s, f)) if s <= seq => {
                    drop(p);
                    let awaited = self.inject_recorded(s, timing, f, stop, faults, shared)?;
                    if s == seq {
                        return Ok(awaited);
                    }
                }
                Some(held) => {
                    *p = Some(held);
                    return Ok(false);
                }
                None => {}
            }
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(DeliverError("the clone is being removed".into()));
            }
            let mut peer = self.peer.lock().expect("peer lock");
            match peer.next_inbound(Instant::now()) {
                Next::Inject {
                    frame,
                    original_seq,
                } => {
                    drop(peer);
                    if original_seq > seq {
                        *self.pending.lock().expect("pending lock") = Some((original_seq, frame));
                        return Ok(false);
                    }
                    let awaited =
                        self.inject_recorded(original_seq, timing, frame, stop, faults, shared)?;
                    if original_seq == seq {
                        return Ok(awaited);
                    }
                }
                Next::Ack { frame, .. } => {
                    drop(peer);
                    self.inject(&frame, None)?;
                }
                Next::WaitForClone { until, .. } => {
                    let wait = until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(20));
                    let _ = self.changed.wait_timeout(peer, wait).expect("peer lock");
                }
                Next::Done => return Ok(false),
            }
        }
    }

    /// Injects recorded frame `seq` with its `seq`, awaiting its
    /// acknowledgement, and with the fault the injector decides for it
    /// (reported as it happens). Returns whether it was injected.
    fn inject_recorded(
        &self,
        seq: u64,
        timing: Awaiting,
        mut frame: Vec<u8>,
        stop: &AtomicBool,
        faults: &Mutex<faults::FaultInjector>,
        shared: &Shared,
    ) -> Result<bool, DeliverError> {
        let guest_ns = timing.guest_ns;
        let (fault, seed) = {
            let mut f = faults.lock().expect("faults lock");
            if !f.has_frame_rules() {
                (None, 0)
            } else {
                (
                    f.apply_at(seq, &self.device, guest_ns, &mut frame),
                    f.seed(),
                )
            }
        };
        let awaited = |frame: &[u8]| -> Result<bool, DeliverError> {
            // Awaited before it goes: the acknowledgement may come at once.
            shared
                .awaiting
                .lock()
                .expect("awaiting lock")
                .insert(seq, timing);
            self.inject(frame, Some(seq)).inspect_err(|_| {
                shared.awaiting.lock().expect("awaiting lock").remove(&seq);
            })?;
            Ok(true)
        };
        let Some(fault) = fault else {
            return awaited(&frame);
        };
        tracing::info!(clone = %shared.id, fault = %fault, "fault injected");
        shared.report_fault(&fault, seed);
        match fault.action {
            faults::FaultAction::Drop => Ok(false),
            faults::FaultAction::Duplicate => {
                awaited(&frame)?;
                self.inject(&frame, Some(seq))?;
                Ok(true)
            }
            faults::FaultAction::Corrupt
            | faults::FaultAction::IoError { .. }
            | faults::FaultAction::Synthetic(_) => awaited(&frame),
            faults::FaultAction::Delay(d) => {
                let end = Instant::now() + d;
                while Instant::now() < end {
                    if stop.load(Ordering::SeqCst) {
                        return Err(DeliverError("the clone is being removed".into()));
                    }
                    std::thread::sleep(
                        end.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(20)),
                    );
                }
                awaited(&frame)
            }
        }
    }

    /// Feeds a frame the clone transmitted (from the NIC's output stream)
    /// to the peer and injects what it answers; reports its divergences.
    fn on_clone_frame(&self, frame: &[u8], shared: &Shared) -> Result<(), DeliverError> {
        {
            let actions = self.peer.lock().expect("peer lock").on_clone_output(frame);
            self.changed.notify_all();
            for a in actions {
                match a {
                    Action::Inject { frame, .. } => self.inject(&frame, None)?,
                    Action::Diverged { flow, divergence } => {
                        let text = divergence.to_string();
                        let key = (flow.0, text.clone());
                        let mut rep = self.reported.lock().expect("reported lock");
                        if !rep.contains(&key) {
                            rep.push(key);
                            drop(rep);
                            shared.add_divergence(self.net_divergence(
                                0,
                                format!("connection {flow}: {text}"),
                            ));
                        }
                    }
                    Action::Unexpected {
                        guest,
                        peer,
                        connect,
                    } => shared.add_divergence(self.net_divergence(
                        0,
                        format!(
                            "the clone {} {guest} -> {peer}, a connection the recording does not have",
                            if connect { "connected" } else { "sent on" }
                        ),
                    )),
                }
            }
        }
        Ok(())
    }

    /// Reports the divergences of the peer's final report not reported yet.
    fn report_divergences(&self, shared: &Shared) {
        let report = self.peer.lock().expect("peer lock").report();
        for (f, d) in report.divergences() {
            let text = d.to_string();
            let key = (f.flow.0, text.clone());
            let mut rep = self.reported.lock().expect("reported lock");
            if rep.contains(&key) {
                continue;
            }
            rep.push(key);
            drop(rep);
            shared.add_divergence(self.net_divergence(
                0,
                format!("connection {} ({} -> {}): {text}", f.flow, f.guest, f.peer),
            ));
        }
    }

    fn net_divergence(&self, seq: u64, description: String) -> pb::Divergence {
        pb::Divergence {
            seq,
            device: self.device.clone(),
            description,
            expected: None,
            observed: None,
            kind: pb::DivergenceKind::NetStream as i32,
        }
    }
}

/// The events of a capture file (a missing or partly written file gives
/// what can be read).
pub fn read_capture(path: &Path) -> Vec<Event> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut r = EventReader::new(BufReader::new(f));
    let mut out = Vec::new();
    while let Ok(Some(e)) = r.next_event() {
        if let Ok(e) = Event::try_from(e) {
            out.push(e);
        }
    }
    out
}

/// Seeded fault injection on the frames the replayer delivers to a clone.
///
/// Faults are decided here, in the replay thread, before a frame goes to
/// the NIC's control socket (not on the backend's device thread). Every
/// decision draws from one SplitMix64 stream seeded by the request, in the
/// order the recorded frames are delivered, so a replay of the same window
/// with the same seed and rules injects the same faults on the same `seq`s.
pub mod faults {
    use std::time::Duration;

    use vmr_proto::pb;

    /// What a fault does: to one received frame (drop, delay, duplicate,
    /// corrupt), or alongside the recorded events (I/O errors armed in the
    /// clone's block backend, a synthetic frame injected).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum FaultAction {
        /// The frame is not delivered.
        Drop,
        /// The frame is delivered after this long (the replay waits).
        Delay(Duration),
        /// The frame is delivered twice.
        Duplicate,
        /// One byte after the Ethernet header is inverted before delivery.
        Corrupt,
        /// The next `count` block requests of `op` (any when `None`) that
        /// touch `[sector_start, sector_end)` complete with an I/O error.
        IoError {
            op: Option<vmr_proto::BlockOp>,
            sector_start: u64,
            sector_end: u64,
            count: u32,
        },
        /// This Ethernet frame is injected into the NIC.
        Synthetic(Vec<u8>),
    }

    impl FaultAction {
        /// Whether the action is decided on recorded received frames
        /// (rather than on every recorded event).
        pub fn on_frames(&self) -> bool {
            matches!(
                self,
                FaultAction::Drop
                    | FaultAction::Delay(_)
                    | FaultAction::Duplicate
                    | FaultAction::Corrupt
            )
        }

        /// The wire kind.
        pub fn kind(&self) -> pb::FaultKind {
            match self {
                FaultAction::Drop => pb::FaultKind::DropFrame,
                FaultAction::Delay(_) => pb::FaultKind::DelayFrame,
                FaultAction::Duplicate => pb::FaultKind::DuplicateFrame,
                FaultAction::Corrupt => pb::FaultKind::CorruptFrame,
                FaultAction::IoError { .. } => pb::FaultKind::BlockIoerr,
                FaultAction::Synthetic(_) => pb::FaultKind::SyntheticFrame,
            }
        }
    }

    /// The kebab-case op name the block backend's fault rules use.
    pub fn op_name(op: vmr_proto::BlockOp) -> &'static str {
        use vmr_proto::BlockOp as O;
        match op {
            O::Read => "read",
            O::Write => "write",
            O::Flush => "flush",
            O::Discard => "discard",
            O::WriteZeroes => "write-zeroes",
            O::GetId => "get-id",
        }
    }

    /// One fault rule.
    #[derive(Debug, Clone, PartialEq)]
    pub struct FaultRule {
        pub action: FaultAction,
        /// Only frames of this NIC (`None`: every NIC).
        pub device: Option<String>,
        /// Only recorded `seq`s in `[from_seq, to_seq]` (0: unbounded).
        pub from_seq: u64,
        pub to_seq: u64,
        /// Chance of firing on each eligible frame.
        pub probability: f64,
        /// Fires on exactly these `seq`s (besides `probability`).
        pub at_seq: Vec<u64>,
        /// Fires on the first eligible event at or after each of these
        /// guest times after the cut (ns).
        pub at_time_ns: Vec<u64>,
        /// At most this many times (0: no limit).
        pub max_count: u32,
    }

    /// Errors in a fault request.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum FaultError {
        #[error("fault {index}: {reason}")]
        Invalid { index: usize, reason: String },
        #[error("fault {index}: {reason}")]
        Unsupported { index: usize, reason: String },
    }

    /// A fault that was injected.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Injected {
        /// The recorded `seq` of the frame.
        pub seq: u64,
        pub device: String,
        pub action: FaultAction,
        /// For [`FaultAction::Corrupt`]: the offset of the inverted byte.
        pub offset: Option<usize>,
        /// Guest time after the cut of the event it was decided on (ns).
        pub guest_ns: u64,
    }

    impl std::fmt::Display for Injected {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match &self.action {
                FaultAction::Drop => write!(f, "dropped received frame seq {}", self.seq),
                FaultAction::Delay(d) => write!(
                    f,
                    "delayed received frame seq {} by {} ms",
                    self.seq,
                    d.as_millis()
                ),
                FaultAction::Duplicate => {
                    write!(f, "duplicated received frame seq {}", self.seq)
                }
                FaultAction::Corrupt => write!(
                    f,
                    "corrupted received frame seq {} at byte {}",
                    self.seq,
                    self.offset.unwrap_or(0)
                ),
                FaultAction::IoError {
                    op,
                    sector_start,
                    sector_end,
                    count,
                } => {
                    write!(f, "armed {count} I/O error(s)")?;
                    if let Some(op) = op {
                        write!(f, " for {}", op_name(*op))?;
                    }
                    if *sector_end != u64::MAX || *sector_start != 0 {
                        write!(f, " in sectors [{sector_start}, {sector_end})")?;
                    }
                    write!(f, " at seq {}", self.seq)
                }
                FaultAction::Synthetic(frame) => write!(
                    f,
                    "injected a synthetic frame of {} bytes at seq {}",
                    frame.len(),
                    self.seq
                ),
            }?;
            write!(f, " on {}", self.device)
        }
    }

    /// Converts the request's fault specs.
    pub fn rules_from_specs(specs: &[pb::FaultSpec]) -> Result<Vec<FaultRule>, FaultError> {
        let mut out = Vec::new();
        for (index, s) in specs.iter().enumerate() {
            let invalid = |reason: &str| FaultError::Invalid {
                index,
                reason: reason.to_string(),
            };
            let action = match pb::FaultKind::try_from(s.kind) {
                Ok(pb::FaultKind::DropFrame) => FaultAction::Drop,
                Ok(pb::FaultKind::DuplicateFrame) => FaultAction::Duplicate,
                Ok(pb::FaultKind::DelayFrame) => {
                    if s.delay_ms == 0 || s.delay_ms > 60_000 {
                        return Err(invalid("delay_ms must be in 1..=60000"));
                    }
                    FaultAction::Delay(Duration::from_millis(s.delay_ms))
                }
                Ok(pb::FaultKind::CorruptFrame) => FaultAction::Corrupt,
                Ok(pb::FaultKind::BlockIoerr) => {
                    let t = s.target.clone().unwrap_or_default();
                    let op = match t.op {
                        0 => None,
                        v => Some(
                            vmr_proto::BlockOp::try_from(v)
                                .map_err(|_| invalid("target.op is not a block op"))?,
                        ),
                    };
                    let (start, end) = match (t.sector_start, t.sector_end) {
                        (0, 0) => (0, u64::MAX),
                        (a, b) if b > a => (a, b),
                        _ => {
                            return Err(invalid(
                                "target.sector_end must be after target.sector_start",
                            ))
                        }
                    };
                    if s.count > 1_000_000 {
                        return Err(invalid("count must be at most 1000000"));
                    }
                    FaultAction::IoError {
                        op,
                        sector_start: start,
                        sector_end: end,
                        count: s.count.max(1),
                    }
                }
                Ok(pb::FaultKind::SyntheticFrame) => {
                    if s.frame.len() < 14 || s.frame.len() > 65_550 {
                        return Err(invalid(
                            "frame must be an Ethernet frame of 14 to 65550 bytes",
                        ));
                    }
                    FaultAction::Synthetic(s.frame.clone())
                }
                _ => return Err(invalid("kind must be set")),
            };
            if !matches!(action, FaultAction::IoError { .. })
                && s.target
                    .as_ref()
                    .is_some_and(|t| t.op != 0 || t.sector_start != 0 || t.sector_end != 0)
            {
                return Err(invalid(
                    "target.op and the sector range apply to block I/O errors only",
                ));
            }
            let t = s.target.clone().unwrap_or_default();
            let sch = s.schedule.clone().unwrap_or_default();
            if !(0.0..=1.0).contains(&sch.probability) {
                return Err(invalid("schedule.probability must be in [0, 1]"));
            }
            if sch.probability == 0.0 && sch.at_seq.is_empty() && sch.at_time_ns.is_empty() {
                return Err(invalid(
                    "schedule needs a probability above 0, at_seq or at_time_ns values",
                ));
            }
            if t.to_seq != 0 && t.from_seq > t.to_seq {
                return Err(invalid("target.from_seq is after target.to_seq"));
            }
            out.push(FaultRule {
                action,
                device: (!t.device.is_empty()).then_some(t.device),
                from_seq: t.from_seq,
                to_seq: t.to_seq,
                probability: sch.probability,
                at_seq: sch.at_seq,
                at_time_ns: sch.at_time_ns,
                max_count: sch.max_count,
            });
        }
        Ok(out)
    }

    /// Decides and applies faults, and keeps every fault it injected.
    #[derive(Debug, Clone)]
    pub struct FaultInjector {
        seed: u64,
        state: u64,
        rules: Vec<FaultRule>,
        fired: Vec<u32>,
        /// Per rule, how many of its `at_time_ns` have been used.
        times_used: Vec<usize>,
        injected: Vec<Injected>,
    }

    impl FaultInjector {
        pub fn new(seed: u64, rules: Vec<FaultRule>) -> Self {
            let fired = vec![0; rules.len()];
            let mut rules = rules;
            for r in &mut rules {
                r.at_time_ns.sort_unstable();
            }
            Self {
                seed,
                state: seed,
                times_used: vec![0; rules.len()],
                rules,
                fired,
                injected: Vec::new(),
            }
        }

        pub fn seed(&self) -> u64 {
            self.seed
        }

        pub fn is_empty(&self) -> bool {
            self.rules.is_empty()
        }

        /// Whether some rule acts on received frames.
        pub fn has_frame_rules(&self) -> bool {
            self.rules.iter().any(|r| r.action.on_frames())
        }

        /// Whether some rule acts alongside the events (I/O errors,
        /// synthetic frames).
        pub fn has_event_rules(&self) -> bool {
            self.rules.iter().any(|r| !r.action.on_frames())
        }

        /// Every fault injected so far, in order.
        pub fn injected(&self) -> &[Injected] {
            &self.injected
        }

        fn next_u64(&mut self) -> u64 {
            // SplitMix64.
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// The fault (if any) for recorded received frame `seq` of
        /// `device` at guest time `guest_ns`; a corruption is applied to
        /// `frame`. The first rule that fires wins; each eligible
        /// probabilistic rule draws once per frame.
        pub fn apply(&mut self, seq: u64, device: &str, frame: &mut [u8]) -> Option<Injected> {
            self.apply_at(seq, device, 0, frame)
        }

        /// [`Self::apply`] with the frame's guest time.
        pub fn apply_at(
            &mut self,
            seq: u64,
            device: &str,
            guest_ns: u64,
            frame: &mut [u8],
        ) -> Option<Injected> {
            let i = self.decide(seq, device, guest_ns, true, true)?;
            self.fire(i, seq, device, guest_ns, frame)
        }

        /// The event faults (I/O errors, synthetic frames) for recorded
        /// event `seq` of `kind` on `device` (empty for events without a
        /// device) at guest time `guest_ns`: an I/O error rule is eligible on
        /// block events of its device (any disk without one), a synthetic
        /// frame on any event.
        pub fn apply_event(
            &mut self,
            seq: u64,
            block_device: Option<&str>,
            guest_ns: u64,
        ) -> Option<Injected> {
            let i = self.decide(
                seq,
                block_device.unwrap_or(""),
                guest_ns,
                false,
                block_device.is_some(),
            )?;
            let mut none = [];
            self.fire(i, seq, block_device.unwrap_or(""), guest_ns, &mut none)
        }

        fn decide(
            &mut self,
            seq: u64,
            device: &str,
            guest_ns: u64,
            frames: bool,
            is_block: bool,
        ) -> Option<usize> {
            let mut hit = None;
            for i in 0..self.rules.len() {
                let r = &self.rules[i];
                if r.action.on_frames() != frames {
                    continue;
                }
                let on_block = matches!(r.action, FaultAction::IoError { .. });
                if on_block && !is_block {
                    continue;
                }
                // A synthetic frame's device is the NIC it goes to, not a
                // condition on the event.
                let device_ok = matches!(r.action, FaultAction::Synthetic(_))
                    || r.device.as_deref().is_none_or(|d| d == device);
                let eligible = device_ok
                    && seq >= r.from_seq
                    && (r.to_seq == 0 || seq <= r.to_seq)
                    && (r.max_count == 0 || self.fired[i] < r.max_count);
                if !eligible {
                    continue;
                }
                let exact = r.at_seq.contains(&seq);
                let timed = r
                    .at_time_ns
                    .get(self.times_used[i])
                    .is_some_and(|t| guest_ns >= *t);
                let p = r.probability;
                let drawn = p > 0.0 && self.unit() < p;
                if (exact || drawn || timed) && hit.is_none() {
                    if timed {
                        // Every time passed is used up by this firing.
                        let times = &self.rules[i].at_time_ns;
                        while self.times_used[i] < times.len()
                            && guest_ns >= times[self.times_used[i]]
                        {
                            self.times_used[i] += 1;
                        }
                    }
                    hit = Some(i);
                }
            }
            hit
        }

        fn fire(
            &mut self,
            i: usize,
            seq: u64,
            device: &str,
            guest_ns: u64,
            frame: &mut [u8],
        ) -> Option<Injected> {
            self.fired[i] += 1;
            let action = self.rules[i].action.clone();
            let mut offset = None;
            if action == FaultAction::Corrupt {
                // Past the Ethernet header when there is a payload.
                let start = if frame.len() > 14 { 14 } else { 0 };
                if frame.len() > start {
                    let o = start + (self.next_u64() % (frame.len() - start) as u64) as usize;
                    frame[o] ^= 0xff;
                    offset = Some(o);
                }
            }
            let device = match &action {
                FaultAction::Synthetic(_) => self.rules[i].device.clone().unwrap_or_default(),
                _ => device.to_string(),
            };
            let inj = Injected {
                seq,
                device,
                action,
                offset,
                guest_ns,
            };
            self.injected.push(inj.clone());
            Some(inj)
        }
    }
}
