//! `vmr replay ...`: a gRPC client of the replayer (`vmr.v1.Replayer`,
//! proto/proto/vmr/v1/replayer.proto). Clones are created, steered, watched,
//! reported on and debugged through it; every call carries the configured
//! bearer token.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use vmr_proto::pb;
use vmr_proto::pb::replayer_client::ReplayerClient;

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::grpc::{self, Service};
use crate::output::{println_safe, Out, Table};
use crate::util::rfc3339_ns;

/// `vmr replay` subcommands.
// Parsed once per run: the size of `start`'s arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// Create a clone of an instance from a snapshot and start replaying.
    Start(StartArgs),
    /// Follow a replay: progress, lifecycle, divergences, until it ends.
    Watch(WatchArgs),
    /// Pause the replay clock and the clone's guest.
    Pause(CloneArg),
    /// Resume a paused replay.
    Resume(CloneArg),
    /// Replay exactly N more events, then pause.
    Step(StepArgs),
    /// Replay up to and including a seq, then pause.
    RunTo(RunToArgs),
    /// Change the replay speed.
    Speed(SpeedArgs),
    /// End the replay and stop the clone's guest (the clone stays listed).
    Stop(CloneArg),
    /// Remove a clone: its guest, processes, namespace and files.
    Delete(CloneArg),
    /// List the clones this token's tenant can see.
    List,
    /// One clone's state.
    Show(CloneArg),
    /// A clone's state and its divergences from the recording.
    Report(CloneArg),
    /// Where gdb can attach to a clone: print the command, or run it.
    Debug(DebugArgs),
}

/// A clone id.
#[derive(Debug, Args)]
pub struct CloneArg {
    /// The clone's id (from `vmr replay start` or `vmr replay list`).
    pub clone: String,
}

/// Event kinds a replay can deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplayKind {
    Block,
    Net,
    Env,
}

/// `--fault KIND:SEQ[:MS]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultArg {
    pub kind: pb::FaultKind,
    pub seq: u64,
    pub delay_ms: u64,
}

impl std::str::FromStr for FaultArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let kind = match parts[0] {
            "drop" => pb::FaultKind::DropFrame,
            "dup" | "duplicate" => pb::FaultKind::DuplicateFrame,
            "delay" => pb::FaultKind::DelayFrame,
            "ioerr" => pb::FaultKind::BlockIoerr,
            k => return Err(format!("unknown fault {k:?} (drop, dup, delay, ioerr)")),
        };
        let seq = parts
            .get(1)
            .ok_or("a fault needs a seq: KIND:SEQ")?
            .parse()
            .map_err(|_| format!("{s:?}: the seq is not a number"))?;
        let delay_ms = match (kind, parts.get(2)) {
            (pb::FaultKind::DelayFrame, Some(ms)) => ms
                .parse()
                .map_err(|_| format!("{s:?}: the delay is not a number of ms"))?,
            (pb::FaultKind::DelayFrame, None) => return Err("delay needs delay:SEQ:MS".into()),
            (_, Some(_)) => return Err(format!("{s:?}: only delay takes :MS")),
            (_, None) => 0,
        };
        if parts.len() > 3 {
            return Err(format!("{s:?}: expected KIND:SEQ[:MS]"));
        }
        Ok(FaultArg {
            kind,
            seq,
            delay_ms,
        })
    }
}

/// Arguments of `vmr replay start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The recorded instance to clone.
    pub instance: String,
    /// Restore this snapshot (default: the latest).
    #[arg(long, conflicts_with = "at")]
    pub snapshot: Option<String>,
    /// Restore the latest snapshot cut at or before this time (RFC 3339 UTC,
    /// e.g. 2026-01-01T00:00:00.5Z, or ns since the Unix epoch).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Speed: recorded guest time divided by this (0.1 to 100; default 1).
    #[arg(long, conflicts_with = "fast")]
    pub speed: Option<f64>,
    /// Replay as fast as possible.
    #[arg(long)]
    pub fast: bool,
    /// First seq to replay (default: right after the snapshot's cut).
    #[arg(long, group = "window_form")]
    pub from_seq: Option<u64>,
    /// Last seq to replay (default: to the end of the recording).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Replay only this much guest time after the snapshot (`30s`,
    /// `500ms`, `2m`).
    #[arg(
        long,
        value_name = "DURATION",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub duration: Option<String>,
    /// Replay a share of the recording by guest time: `10..40` (percent;
    /// `90..` runs to the end).
    #[arg(
        long,
        value_name = "FROM..TO",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub percent: Option<String>,
    /// Replay guest-time offsets after the snapshot: `2s..5s`, `2s..`.
    #[arg(
        long,
        value_name = "FROM..TO",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub time: Option<String>,
    /// Replay recorded wall-clock times: `FROM..TO` (RFC 3339 UTC or ns
    /// since the Unix epoch; `FROM..` runs to the end).
    #[arg(
        long,
        value_name = "FROM..TO",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub wall_time: Option<String>,
    /// Replay one equal part of the recording: `middle-third`,
    /// `first-half`, `last-quarter`, or `2/3` (part 2 of 3).
    #[arg(
        long,
        value_name = "PART",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub portion: Option<String>,
    /// The window in the replayer's text form (`middle-third`, `30s`,
    /// `10%..40%`, `time:2s..5s`, `seq:100..200`), checked by the server.
    #[arg(
        long,
        value_name = "TEXT",
        group = "window_form",
        conflicts_with = "to_seq"
    )]
    pub window: Option<String>,
    /// Deliver only these kinds (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kind: Vec<ReplayKind>,
    /// Inject a fault: drop:SEQ, dup:SEQ, delay:SEQ:MS (repeatable).
    #[arg(long)]
    pub fault: Vec<FaultArg>,
    /// Seed of the fault injector.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Restore and stay paused (`vmr replay resume` or `step` starts it).
    #[arg(long)]
    pub paused: bool,
    /// Give the clone a gdb stub (see `vmr replay debug`).
    #[arg(long)]
    pub gdb: bool,
    /// Then follow the replay as `vmr replay watch` does.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: append each progress message as a JSON line to FILE
    /// (the input of `vmr timeline --replay-log`).
    #[arg(long, value_name = "FILE", requires = "watch")]
    pub log: Option<PathBuf>,
    /// With --watch: the longest wait for the replay to end, seconds.
    #[arg(long, default_value_t = 3600.0, value_name = "SECS")]
    pub timeout: f64,
}

/// Arguments of `vmr replay watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The clone's id.
    pub clone: String,
    /// Keep following a FINISHED clone (its guest runs on) until the timeout.
    #[arg(long)]
    pub follow: bool,
    /// Copy the clone's console output to stderr.
    #[arg(long)]
    pub console: bool,
    /// Append each progress message as a JSON line to FILE (the input of
    /// `vmr timeline --replay-log`).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Longest wait for the replay to end, seconds.
    #[arg(long, default_value_t = 3600.0, value_name = "SECS")]
    pub timeout: f64,
}

/// Arguments of `vmr replay step`.
#[derive(Debug, Args)]
pub struct StepArgs {
    pub clone: String,
    /// How many events.
    #[arg(default_value_t = 1)]
    pub steps: u64,
}

/// Arguments of `vmr replay run-to`.
#[derive(Debug, Args)]
pub struct RunToArgs {
    pub clone: String,
    /// The last seq to replay before pausing.
    pub seq: u64,
}

/// Arguments of `vmr replay speed`.
#[derive(Debug, Args)]
pub struct SpeedArgs {
    pub clone: String,
    /// Factor (0.1 to 100), or `max` for as fast as possible.
    pub speed: String,
}

/// Arguments of `vmr replay debug`.
#[derive(Debug, Args)]
pub struct DebugArgs {
    pub clone: String,
    /// Run gdb attached to the clone instead of printing the command.
    #[arg(long)]
    pub exec: bool,
    /// Symbol file for gdb (for example the guest kernel's vmlinux).
    #[arg(long, value_name = "FILE")]
    pub symbols: Option<PathBuf>,
    /// The gdb binary.
    #[arg(long, default_value = "gdb")]
    pub gdb: String,
}

/// A state's stable name (`--json`, tables).
pub fn state_name(s: i32) -> &'static str {
    match pb::CloneState::try_from(s).unwrap_or(pb::CloneState::Unspecified) {
        pb::CloneState::Unspecified => "unspecified",
        pb::CloneState::Restoring => "restoring",
        pb::CloneState::Replaying => "replaying",
        pb::CloneState::Paused => "paused",
        pb::CloneState::Finished => "finished",
        pb::CloneState::Failed => "failed",
        pb::CloneState::Crashed => "crashed",
        pb::CloneState::Stopped => "stopped",
        pb::CloneState::Ready => "ready",
        pb::CloneState::Live => "live",
    }
}

fn is_end(state: i32) -> bool {
    matches!(
        pb::CloneState::try_from(state),
        Ok(pb::CloneState::Crashed | pb::CloneState::Failed | pb::CloneState::Stopped)
    )
}

fn speed_json(s: &Option<pb::Speed>) -> Value {
    match s.as_ref().and_then(|s| s.speed.as_ref()) {
        Some(pb::speed::Speed::Factor(f)) => json!({ "factor": f }),
        Some(pb::speed::Speed::AsFastAsPossible(true)) => json!("as_fast_as_possible"),
        _ => json!({ "factor": 1.0 }),
    }
}

fn speed_text(s: &Option<pb::Speed>) -> String {
    match s.as_ref().and_then(|s| s.speed.as_ref()) {
        Some(pb::speed::Speed::Factor(f)) => format!("{f}x"),
        Some(pb::speed::Speed::AsFastAsPossible(true)) => "max".into(),
        _ => "1x".into(),
    }
}

/// A clone as JSON (docs/cli.md).
pub fn clone_json(c: &pb::Clone) -> Value {
    json!({
        "clone_id": c.clone_id,
        "instance_id": c.instance_id,
        "snapshot_id": c.snapshot_id,
        "state": state_name(c.state),
        "replayed_seq": c.replayed_seq,
        "seq_at_cut": c.seq_at_cut,
        "delivered": c.delivered,
        "divergences": c.divergences,
        "speed": speed_json(&c.speed),
        "detail": c.detail,
        "window": c.window.as_ref().map(|w| json!({
            "form": w.form,
            "events": w.events,
            "first_seq": w.first_seq,
            "last_seq": w.last_seq,
            "first_guest_ns": w.first_guest_ns,
            "last_guest_ns": w.last_guest_ns,
            "first_wall_ns": w.first_wall_ns,
            "last_wall_ns": w.last_wall_ns,
        })),
        "frames_acknowledged": c.frames_acknowledged,
        "frames_pending": c.frames_pending,
        "original_time_ns": c.original_time_ns,
        "replay_time_ns": c.replay_time_ns,
        "lag_ns": c.lag_ns,
    })
}

fn divergence_kind(k: i32) -> &'static str {
    match pb::DivergenceKind::try_from(k).unwrap_or(pb::DivergenceKind::Unspecified) {
        pb::DivergenceKind::Unspecified => "other",
        pb::DivergenceKind::BlockWriteData => "block_write_data",
        pb::DivergenceKind::BlockWriteMissing => "block_write_missing",
        pb::DivergenceKind::Crash => "crash",
        pb::DivergenceKind::NetStream => "net_stream",
        pb::DivergenceKind::InjectedFault => "injected_fault",
        pb::DivergenceKind::BlockReadData => "block_read_data",
    }
}

/// A divergence as JSON.
pub fn divergence_json(d: &pb::Divergence) -> Value {
    json!({
        "seq": d.seq,
        "device": d.device,
        "kind": divergence_kind(d.kind),
        "description": d.description,
        "expected_seq": d.expected.as_ref().map(|e| e.seq),
        "observed_seq": d.observed.as_ref().map(|e| e.seq),
    })
}

fn lifecycle_name(l: &pb::CloneLifecycle) -> String {
    l.lifecycle
        .as_ref()
        .map(|x| {
            pb::LifecycleKind::try_from(x.kind)
                .map(|k| {
                    k.as_str_name()
                        .trim_start_matches("LIFECYCLE_KIND_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| format!("kind {}", x.kind))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn lifecycle_json(l: &pb::CloneLifecycle) -> Value {
    json!({
        "kind": lifecycle_name(l),
        "detail": l.lifecycle.as_ref().map(|x| x.detail.clone()).unwrap_or_default(),
        "wall_time_ns": l.wall_time_ns,
        "last_seq_applied": l.last_seq_applied,
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Parses RFC 3339 UTC (`2026-01-01T00:00:00.5Z`) or plain ns.
pub fn parse_time_ns(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?} is not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.frac]Z) nor ns");
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || h.len() != 3 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, m, dd) = (d[0], d[1], d[2]);
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) || h[0] > 23 || h[1] > 59 || h[2] > 60 {
        return Err(bad());
    }
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    if secs < 0 {
        return Err(bad());
    }
    let mut frac_ns: u64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        frac_ns += u64::from(c as u8 - b'0') * 10u64.pow(8 - i as u32);
    }
    Ok(secs as u64 * 1_000_000_000 + frac_ns)
}

/// A connected replayer client and the token.
struct Conn {
    client: ReplayerClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl Conn {
    async fn open(cfg: &Config) -> CliResult<Self> {
        let ch = grpc::connect(Service::Replayer, &cfg.replayer_url).await?;
        Ok(Self {
            client: ReplayerClient::new(ch),
            token: cfg.token.clone(),
        })
    }
    fn req<T>(&self, m: T) -> CliResult<tonic::Request<T>> {
        grpc::request(m, self.token.as_deref())
    }
}

fn err(what: &str) -> impl Fn(tonic::Status) -> CliError + '_ {
    move |s| grpc::status_error(Service::Replayer, what, &s)
}

fn print_clone(out: &Out, c: &pb::Clone) {
    if out.json {
        out.json_doc(&clone_json(c));
        return;
    }
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("clone", c.clone_id.clone()),
        ("instance", c.instance_id.clone()),
        ("snapshot", c.snapshot_id.clone()),
        ("state", state_name(c.state).into()),
        ("seq at cut", c.seq_at_cut.to_string()),
        ("replayed seq", c.replayed_seq.to_string()),
        ("delivered", c.delivered.to_string()),
        ("divergences", c.divergences.to_string()),
        ("speed", speed_text(&c.speed)),
        ("detail", c.detail.clone()),
    ] {
        t.row(vec![k.into(), v]);
    }
    t.print();
}

fn check_clone_id(id: &str) -> CliResult {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(CliError::usage(format!("{id:?} is not a clone id"))
            .hint("take the id from `vmr replay list`"));
    }
    Ok(())
}

/// Parses `1.5s`, `500ms`, `20us`, `100ns`, `2m`, `1h` into ns.
fn parse_duration_ns(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit (ns, us, ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number"))?;
    let scale = match unit.trim() {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        u => return Err(format!("unknown unit {u:?} (ns, us, ms, s, m, h)")),
    };
    let ns = n * scale;
    if !ns.is_finite() || ns < 0.0 || ns > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(ns.round() as u64)
}

/// `A..B` (`B` may be empty) → both sides.
fn split_range(s: &str) -> Result<(&str, Option<&str>), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range FROM..TO"))?;
    let b = b.trim();
    Ok((a.trim(), (!b.is_empty()).then_some(b)))
}

/// `middle-third`, `first-half`, `last-quarter`, `2/3` → (part from 1, parts).
fn parse_portion(s: &str) -> Result<(u32, u32), String> {
    let t = s.trim().to_ascii_lowercase();
    if let Some((i, n)) = t.split_once('/') {
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{v:?} is not a count"))
        };
        let (i, n) = (num(i)?, num(n)?);
        if i == 0 || i > n {
            return Err(format!(
                "part {i} of {n} does not exist (parts count from 1)"
            ));
        }
        return Ok((i, n));
    }
    let bad = || format!("{s:?} is not a portion (middle-third, first-half, last-quarter, 2/3)");
    let (pos, part) = t.split_once('-').ok_or_else(bad)?;
    let parts = match part {
        "half" => 2,
        "third" => 3,
        "quarter" => 4,
        "fifth" => 5,
        "tenth" => 10,
        _ => return Err(bad()),
    };
    let index = match (pos, parts) {
        ("first", _) => 1,
        ("second", _) => 2,
        ("middle", 3) => 2,
        ("third", p) if p >= 3 => 3,
        ("last", p) => p,
        _ => return Err(bad()),
    };
    Ok((index, parts))
}

/// The request's window from the window flags (none: the whole recording).
fn window_request(a: &StartArgs) -> CliResult<Option<pb::ReplayWindow>> {
    use pb::replay_window::Form;
    let usage = |flag: &str, e: String| CliError::usage(format!("--{flag}: {e}"));
    let form = if let Some(d) = &a.duration {
        let ns = parse_duration_ns(d).map_err(|e| usage("duration", e))?;
        if ns == 0 {
            return Err(usage("duration", "must be longer than 0".into()));
        }
        Some(Form::AfterCutNs(ns))
    } else if let Some(p) = &a.percent {
        let (f, t) = split_range(p).map_err(|e| usage("percent", e))?;
        let pct = |v: &str| {
            v.trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| (0.0..=100.0).contains(x))
                .ok_or_else(|| usage("percent", format!("{v:?} is not a percentage 0 to 100")))
        };
        let from = pct(f)?;
        let to = t.map(pct).transpose()?;
        if from >= to.unwrap_or(100.0) {
            return Err(usage("percent", format!("{p:?} is empty")));
        }
        Some(Form::Percent(pb::PercentWindow {
            from_percent: from,
            to_percent: to,
        }))
    } else if let Some(r) = &a.time {
        let (f, t) = split_range(r).map_err(|e| usage("time", e))?;
        let from_ns = parse_duration_ns(f).map_err(|e| usage("time", e))?;
        let to_ns = t
            .map(parse_duration_ns)
            .transpose()
            .map_err(|e| usage("time", e))?;
        if to_ns.is_some_and(|t| t <= from_ns) {
            return Err(usage("time", format!("{r:?} is empty")));
        }
        Some(Form::Time(pb::TimeWindow { from_ns, to_ns }))
    } else if let Some(r) = &a.wall_time {
        let (f, t) = split_range(r).map_err(|e| usage("wall-time", e))?;
        let from_ns = parse_time_ns(f).map_err(|e| usage("wall-time", e))?;
        let to_ns = t
            .map(parse_time_ns)
            .transpose()
            .map_err(|e| usage("wall-time", e))?;
        if to_ns.is_some_and(|t| t < from_ns) {
            return Err(usage("wall-time", format!("{r:?} ends before it starts")));
        }
        Some(Form::WallTime(pb::WallTimeWindow { from_ns, to_ns }))
    } else if let Some(p) = &a.portion {
        let (part, parts) = parse_portion(p).map_err(|e| usage("portion", e))?;
        Some(Form::Portion(pb::PortionWindow { part, parts }))
    } else {
        a.window.as_ref().map(|t| Form::Text(t.clone()))
    };
    if form.is_some() {
        return Ok(Some(pb::ReplayWindow {
            form,
            ..Default::default()
        }));
    }
    if let (Some(f), Some(t)) = (a.from_seq, a.to_seq) {
        if f > t {
            return Err(CliError::usage(format!(
                "--from-seq {f} is after --to-seq {t}"
            )));
        }
    }
    Ok(
        (a.from_seq.is_some() || a.to_seq.is_some()).then(|| pb::ReplayWindow {
            from_seq: a.from_seq.unwrap_or(0),
            to_seq: a.to_seq.unwrap_or(0),
            ..Default::default()
        }),
    )
}

fn start_request(a: &StartArgs) -> CliResult<pb::CreateCloneRequest> {
    vmr_proto::InstanceId::new(a.instance.clone())
        .map_err(|e| CliError::usage(format!("instance {:?}: {e}", a.instance)))?;
    let snapshot = match (&a.snapshot, &a.at) {
        (Some(id), _) => Some(pb::SnapshotSelector {
            pick: Some(pb::snapshot_selector::Pick::SnapshotId(id.clone())),
        }),
        (None, Some(t)) => Some(pb::SnapshotSelector {
            pick: Some(pb::snapshot_selector::Pick::AtOrBeforeNs(
                parse_time_ns(t).map_err(|e| CliError::usage(format!("--at: {e}")))?,
            )),
        }),
        (None, None) => Some(pb::SnapshotSelector {
            pick: Some(pb::snapshot_selector::Pick::Latest(true)),
        }),
    };
    let speed = if a.fast {
        Some(pb::Speed {
            speed: Some(pb::speed::Speed::AsFastAsPossible(true)),
        })
    } else if let Some(f) = a.speed {
        if !(0.1..=100.0).contains(&f) {
            return Err(CliError::usage(format!(
                "--speed {f} is outside 0.1 to 100"
            )));
        }
        Some(pb::Speed {
            speed: Some(pb::speed::Speed::Factor(f)),
        })
    } else {
        Some(pb::Speed {
            speed: Some(pb::speed::Speed::Factor(1.0)),
        })
    };
    let window = window_request(a)?;
    let filter = (!a.kind.is_empty()).then(|| pb::EventFilter {
        include_block: a.kind.contains(&ReplayKind::Block),
        include_net: a.kind.contains(&ReplayKind::Net),
        include_env: a.kind.contains(&ReplayKind::Env),
        ..Default::default()
    });
    let faults = a
        .fault
        .iter()
        .map(|f| pb::FaultSpec {
            kind: f.kind as i32,
            target: None,
            schedule: Some(pb::FaultSchedule {
                probability: 0.0,
                at_seq: vec![f.seq],
                max_count: 0,
                ..Default::default()
            }),
            delay_ms: f.delay_ms,
            ..Default::default()
        })
        .collect();
    Ok(pb::CreateCloneRequest {
        instance_id: a.instance.clone(),
        snapshot,
        window,
        speed,
        filter,
        faults,
        seed: a.seed,
        start_paused: a.paused,
        gdb: a.gdb,
    })
}

/// What a watch ended with.
#[derive(Debug)]
pub struct WatchEnd {
    pub clone: Option<pb::Clone>,
    pub seconds: f64,
}

struct WatchOpts<'a> {
    follow: bool,
    console: bool,
    log: Option<&'a PathBuf>,
    timeout: f64,
}

async fn watch(conn: &mut Conn, id: &str, o: &WatchOpts<'_>, out: &Out) -> CliResult<WatchEnd> {
    if !(o.timeout.is_finite() && o.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    let mut log = match o.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    CliError::precondition(format!("cannot open the log {}: {e}", p.display()))
                        .hint("choose a writable --log path")
                })?,
        ),
        None => None,
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(o.timeout);
    let req = conn.req(pb::WatchRequest {
        clone_id: id.to_string(),
    })?;
    let mut stream = conn
        .client
        .watch(req)
        .await
        .map_err(err("watching the clone"))?
        .into_inner();
    let pb = crate::progress::bar(out, None, false);
    let mut last: Option<pb::Clone> = None;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let msg = match next {
            Err(_) => {
                pb.finish_and_clear();
                return Err(CliError::unavailable(format!(
                    "the replay of {id} did not end within {:.0}s",
                    o.timeout
                ))
                .hint("raise --timeout, or `vmr replay stop` it"));
            }
            Ok(None) => break,
            Ok(Some(Err(s))) => {
                pb.finish_and_clear();
                return Err(err("the watch stream")(s));
            }
            Ok(Some(Ok(m))) => m,
        };
        let at = now_ns();
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let mut v = progress_json(&msg);
            v["received_ns"] = json!(at);
            let _ = writeln!(f, "{v}");
        }
        if out.json {
            let mut v = progress_json(&msg);
            v["received_ns"] = json!(at);
            out.json_line(&v);
        }
        if o.console && !msg.console.is_empty() {
            eprint!("{}", String::from_utf8_lossy(&msg.console));
        }
        if let Some(c) = &msg.clone {
            pb.set_message(format!(
                "{} {}: replayed seq {} ({} events delivered, {} divergences)",
                c.clone_id,
                state_name(c.state),
                c.replayed_seq,
                c.delivered,
                c.divergences
            ));
        }
        if !out.json {
            if let Some(l) = &msg.lifecycle {
                pb.suspend(|| {
                    println_safe(&format!(
                        "{}  clone {}: {} after seq {} {}",
                        rfc3339_ns(l.wall_time_ns),
                        id,
                        lifecycle_name(l),
                        l.last_seq_applied,
                        l.lifecycle
                            .as_ref()
                            .map(|x| x.detail.as_str())
                            .unwrap_or("")
                    ))
                });
            }
            if let Some(d) = &msg.divergence {
                pb.suspend(|| {
                    println_safe(&format!(
                        "divergence at seq {} on {} ({}): {}",
                        d.seq,
                        if d.device.is_empty() { "-" } else { &d.device },
                        divergence_kind(d.kind),
                        d.description
                    ))
                });
            }
        }
        if let Some(c) = msg.clone {
            let state = c.state;
            last = Some(c);
            if is_end(state) || (!o.follow && state == pb::CloneState::Finished as i32) {
                break;
            }
        }
    }
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if !out.json {
        match &last {
            Some(c) => println_safe(&format!(
                "{}: {} at seq {} after {:.1}s ({} events delivered, {} divergences){}",
                c.clone_id,
                state_name(c.state),
                c.replayed_seq,
                seconds,
                c.delivered,
                c.divergences,
                if c.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", c.detail)
                }
            )),
            None => println_safe(&format!("{id}: the stream ended without a state")),
        }
    }
    Ok(WatchEnd {
        clone: last,
        seconds,
    })
}

/// One `ReplayProgress` as a JSON object (the `watch --json` line format).
pub fn progress_json(m: &pb::ReplayProgress) -> Value {
    json!({
        "clone": m.clone.as_ref().map(clone_json),
        "divergence": m.divergence.as_ref().map(divergence_json),
        "lifecycle": m.lifecycle.as_ref().map(lifecycle_json),
        "console": (!m.console.is_empty()).then(|| String::from_utf8_lossy(&m.console).into_owned()),
    })
}

async fn control(conn: &mut Conn, r: pb::ControlRequest, what: &str) -> CliResult<pb::Clone> {
    let req = conn.req(r)?;
    Ok(conn
        .client
        .control(req)
        .await
        .map_err(err(what))?
        .into_inner())
}

fn ctl(id: &str, action: pb::ControlAction) -> pb::ControlRequest {
    pb::ControlRequest {
        clone_id: id.to_string(),
        action: action as i32,
        ..Default::default()
    }
}

async fn run_async(cfg: &Config, c: &ReplayCommand, out: &Out) -> CliResult {
    // Check arguments before connecting, so usage errors need no service.
    let start_req = match c {
        ReplayCommand::Start(a) => Some(start_request(a)?),
        _ => None,
    };
    match c {
        ReplayCommand::Pause(a)
        | ReplayCommand::Resume(a)
        | ReplayCommand::Stop(a)
        | ReplayCommand::Delete(a)
        | ReplayCommand::Show(a)
        | ReplayCommand::Report(a) => check_clone_id(&a.clone)?,
        ReplayCommand::Watch(a) => check_clone_id(&a.clone)?,
        ReplayCommand::Step(a) => {
            check_clone_id(&a.clone)?;
            if a.steps == 0 {
                return Err(CliError::usage("step needs at least 1 event"));
            }
        }
        ReplayCommand::RunTo(a) => check_clone_id(&a.clone)?,
        ReplayCommand::Speed(a) => {
            check_clone_id(&a.clone)?;
            parse_speed(&a.speed)?;
        }
        ReplayCommand::Debug(a) => check_clone_id(&a.clone)?,
        ReplayCommand::Start(_) | ReplayCommand::List => {}
    }
    let mut conn = Conn::open(cfg).await?;
    match c {
        ReplayCommand::Start(a) => {
            let req = conn.req(start_req.expect("built above"))?;
            out.progress(&format!(
                "creating a clone of {} (restoring the snapshot)...",
                a.instance
            ));
            let clone = conn
                .client
                .create_clone(req)
                .await
                .map_err(err("creating the clone"))?
                .into_inner();
            if !a.watch {
                print_clone(out, &clone);
                return Ok(());
            }
            if !out.json {
                println_safe(&format!(
                    "clone {} of {} from snapshot {} (seq at cut {}), {}",
                    clone.clone_id,
                    clone.instance_id,
                    clone.snapshot_id,
                    clone.seq_at_cut,
                    state_name(clone.state)
                ));
            } else {
                out.json_line(&json!({ "created": clone_json(&clone) }));
            }
            let o = WatchOpts {
                follow: false,
                console: false,
                log: a.log.as_ref(),
                timeout: a.timeout,
            };
            watch(&mut conn, &clone.clone_id, &o, out).await?;
            Ok(())
        }
        ReplayCommand::Watch(a) => {
            let o = WatchOpts {
                follow: a.follow,
                console: a.console,
                log: a.log.as_ref(),
                timeout: a.timeout,
            };
            watch(&mut conn, &a.clone, &o, out).await?;
            Ok(())
        }
        ReplayCommand::Pause(a) => {
            let c = control(&mut conn, ctl(&a.clone, pb::ControlAction::Pause), "pause").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Resume(a) => {
            // A clone created with --paused is READY: resume means start.
            let cur = get_clone(&mut conn, &a.clone).await?;
            let action = if cur.state == pb::CloneState::Ready as i32 {
                pb::ControlAction::Start
            } else {
                pb::ControlAction::Resume
            };
            let c = control(&mut conn, ctl(&a.clone, action), "resume").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Step(a) => {
            let mut r = ctl(&a.clone, pb::ControlAction::Step);
            r.steps = a.steps;
            let c = control(&mut conn, r, "step").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::RunTo(a) => {
            let mut r = ctl(&a.clone, pb::ControlAction::RunTo);
            r.run_to_seq = a.seq;
            let c = control(&mut conn, r, "run-to").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Speed(a) => {
            let mut r = ctl(&a.clone, pb::ControlAction::SetSpeed);
            r.speed = Some(parse_speed(&a.speed)?);
            let c = control(&mut conn, r, "set speed").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Stop(a) => {
            let c = control(&mut conn, ctl(&a.clone, pb::ControlAction::Stop), "stop").await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Delete(a) => {
            let req = conn.req(pb::DeleteCloneRequest {
                clone_id: a.clone.clone(),
            })?;
            conn.client
                .delete_clone(req)
                .await
                .map_err(err("deleting the clone"))?;
            if out.json {
                out.json_doc(&json!({ "deleted": a.clone }));
            } else {
                println_safe(&format!("deleted {}", a.clone));
            }
            Ok(())
        }
        ReplayCommand::List => {
            let req = conn.req(pb::ListClonesRequest {})?;
            let list = conn
                .client
                .list_clones(req)
                .await
                .map_err(err("listing clones"))?
                .into_inner();
            if out.json {
                out.json_doc(&json!({
                    "clones": list.clones.iter().map(clone_json).collect::<Vec<_>>()
                }));
            } else {
                let mut t = Table::new(&[
                    "CLONE",
                    "INSTANCE",
                    "SNAPSHOT",
                    "STATE",
                    "SEQ",
                    "DELIVERED",
                    "DIVERGENCES",
                    "SPEED",
                ]);
                for c in &list.clones {
                    t.row(vec![
                        c.clone_id.clone(),
                        c.instance_id.clone(),
                        c.snapshot_id.clone(),
                        state_name(c.state).into(),
                        c.replayed_seq.to_string(),
                        c.delivered.to_string(),
                        c.divergences.to_string(),
                        speed_text(&c.speed),
                    ]);
                }
                t.print();
            }
            Ok(())
        }
        ReplayCommand::Show(a) => {
            let c = get_clone(&mut conn, &a.clone).await?;
            print_clone(out, &c);
            Ok(())
        }
        ReplayCommand::Report(a) => {
            let c = get_clone(&mut conn, &a.clone).await?;
            let req = conn.req(pb::GetDivergencesRequest {
                clone_id: a.clone.clone(),
            })?;
            let d = conn
                .client
                .get_divergences(req)
                .await
                .map_err(err("reading the divergences"))?
                .into_inner();
            if out.json {
                out.json_doc(&json!({
                    "clone": clone_json(&c),
                    "divergences": d.divergences.iter().map(divergence_json).collect::<Vec<_>>(),
                }));
            } else {
                println_safe(&format!(
                    "clone {} of {} from snapshot {}: {} at seq {} (cut {}), {} events delivered{}",
                    c.clone_id,
                    c.instance_id,
                    c.snapshot_id,
                    state_name(c.state),
                    c.replayed_seq,
                    c.seq_at_cut,
                    c.delivered,
                    if c.detail.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", c.detail)
                    }
                ));
                if d.divergences.is_empty() {
                    println_safe("no divergences");
                } else {
                    let mut t = Table::new(&["SEQ", "DEVICE", "KIND", "DESCRIPTION"]);
                    for x in &d.divergences {
                        t.row(vec![
                            x.seq.to_string(),
                            if x.device.is_empty() {
                                "-".into()
                            } else {
                                x.device.clone()
                            },
                            divergence_kind(x.kind).into(),
                            x.description.clone(),
                        ]);
                    }
                    t.print();
                }
            }
            Ok(())
        }
        ReplayCommand::Debug(a) => {
            let req = conn.req(pb::GetDebuggerRequest {
                clone_id: a.clone.clone(),
            })?;
            let d = conn
                .client
                .get_debugger(req)
                .await
                .map_err(err("asking for the debugger"))?
                .into_inner();
            let mut args: Vec<String> = vec!["-q".into()];
            if let Some(s) = &a.symbols {
                if !s.is_file() {
                    return Err(CliError::not_found(format!(
                        "the symbol file {} does not exist",
                        s.display()
                    )));
                }
                args.push(s.display().to_string());
            }
            args.push("-ex".into());
            args.push(format!("target remote {}", d.address));
            if a.exec {
                drop(conn);
                use std::os::unix::process::CommandExt;
                let e = std::process::Command::new(&a.gdb).args(&args).exec();
                return Err(CliError::precondition(format!("cannot run {}: {e}", a.gdb))
                    .hint("install gdb (apt-get install gdb) or pass --gdb PATH"));
            }
            let line = std::iter::once(a.gdb.clone())
                .chain(args.iter().map(|x| shell_quote(x)))
                .collect::<Vec<_>>()
                .join(" ");
            if out.json {
                out.json_doc(&json!({ "address": d.address, "command": line, "argv": std::iter::once(a.gdb.clone()).chain(args).collect::<Vec<_>>() }));
            } else {
                println_safe(&line);
            }
            Ok(())
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn parse_speed(s: &str) -> CliResult<pb::Speed> {
    if s == "max" {
        return Ok(pb::Speed {
            speed: Some(pb::speed::Speed::AsFastAsPossible(true)),
        });
    }
    let f: f64 = s
        .trim_end_matches('x')
        .parse()
        .map_err(|_| CliError::usage(format!("speed {s:?} is not a number or `max`")))?;
    if !(0.1..=100.0).contains(&f) {
        return Err(CliError::usage(format!("speed {f} is outside 0.1 to 100")));
    }
    Ok(pb::Speed {
        speed: Some(pb::speed::Speed::Factor(f)),
    })
}

async fn get_clone(conn: &mut Conn, id: &str) -> CliResult<pb::Clone> {
    let req = conn.req(pb::GetCloneRequest {
        clone_id: id.to_string(),
    })?;
    Ok(conn
        .client
        .get_clone(req)
        .await
        .map_err(err("reading the clone"))?
        .into_inner())
}

/// Runs a `replay` subcommand.
pub fn run(cfg: &Config, c: &ReplayCommand, out: &Out) -> CliResult {
    grpc::block_on(run_async(cfg, c, out))?
}

/// The clone as the replayer reports it (for `vmr timeline --replay`).
pub fn fetch_report(cfg: &Config, id: &str) -> CliResult<pb::Clone> {
    check_clone_id(id)?;
    grpc::block_on(async {
        let mut conn = Conn::open(cfg).await?;
        get_clone(&mut conn, id).await
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_time_ns("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_time_ns("2024-03-01T00:00:00.123Z").unwrap(),
            1_709_251_200_123_000_000
        );
        assert_eq!(parse_time_ns("42").unwrap(), 42);
        assert!(parse_time_ns("2024-13-01T00:00:00Z").is_err());
        assert!(parse_time_ns("yesterday").is_err());
    }

    #[test]
    fn faults_parse() {
        let f: FaultArg = "delay:7:30".parse().unwrap();
        assert_eq!(f.kind, pb::FaultKind::DelayFrame);
        assert_eq!((f.seq, f.delay_ms), (7, 30));
        assert!("drop:x".parse::<FaultArg>().is_err());
        assert!("drop:1:5".parse::<FaultArg>().is_err());
        assert!("burn:1".parse::<FaultArg>().is_err());
    }

    fn start_args(args: &[&str]) -> Result<StartArgs, clap::Error> {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            start: StartArgs,
        }
        let m = <Cmd as clap::CommandFactory>::command()
            .try_get_matches_from(std::iter::once("start").chain(args.iter().copied()))?;
        Ok(Cmd::from_arg_matches(&m)?.start)
    }

    fn form(args: &[&str]) -> Option<pb::replay_window::Form> {
        window_request(&start_args(args).unwrap())
            .unwrap()
            .and_then(|w| w.form)
    }

    #[test]
    fn window_flags_map_to_the_request() {
        use pb::replay_window::Form;
        assert_eq!(
            window_request(&start_args(&["shop-1"]).unwrap()).unwrap(),
            None
        );
        assert_eq!(
            form(&["shop-1", "--duration", "1.5s"]),
            Some(Form::AfterCutNs(1_500_000_000))
        );
        assert_eq!(
            form(&["shop-1", "--percent", "10..40%"]),
            Some(Form::Percent(pb::PercentWindow {
                from_percent: 10.0,
                to_percent: Some(40.0)
            }))
        );
        assert_eq!(
            form(&["shop-1", "--time", "2s.."]),
            Some(Form::Time(pb::TimeWindow {
                from_ns: 2_000_000_000,
                to_ns: None
            }))
        );
        assert_eq!(
            form(&["shop-1", "--wall-time", "1970-01-01T00:00:01Z..5000000000"]),
            Some(Form::WallTime(pb::WallTimeWindow {
                from_ns: 1_000_000_000,
                to_ns: Some(5_000_000_000)
            }))
        );
        assert_eq!(
            form(&["shop-1", "--portion", "middle-third"]),
            Some(Form::Portion(pb::PortionWindow { part: 2, parts: 3 }))
        );
        assert_eq!(
            form(&["shop-1", "--portion", "4/4"]),
            Some(Form::Portion(pb::PortionWindow { part: 4, parts: 4 }))
        );
        assert_eq!(
            form(&["shop-1", "--window", "last-quarter"]),
            Some(Form::Text("last-quarter".into()))
        );
        let seq = window_request(&start_args(&["shop-1", "--from-seq", "5"]).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((seq.from_seq, seq.to_seq, seq.form), (5, 0, None));
        // Two forms at once, and bad values, are usage errors.
        assert!(start_args(&["shop-1", "--duration", "1s", "--percent", "1..2"]).is_err());
        assert!(start_args(&["shop-1", "--from-seq", "5", "--portion", "1/2"]).is_err());
        assert!(start_args(&["shop-1", "--to-seq", "5", "--time", "1s.."]).is_err());
        for bad in [
            ["--duration", "0s"],
            ["--duration", "5 parsecs"],
            ["--percent", "40..10"],
            ["--percent", "10..140"],
            ["--time", "5s..5s"],
            ["--wall-time", "9..3"],
            ["--portion", "0/3"],
            ["--portion", "middle-sixth"],
        ] {
            let a = start_args(&["shop-1", bad[0], bad[1]]).unwrap();
            assert!(window_request(&a).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn speeds_parse() {
        assert!(parse_speed("max").is_ok());
        assert!(parse_speed("2x").is_ok());
        assert!(parse_speed("1000").is_err());
    }
}
