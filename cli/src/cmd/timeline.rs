//! `vmr timeline`: a picture (SVG, and PNG rendered from it with resvg) of
//! one recorded instance and its replay.
//!
//! The top panel's x axis is the recorded wall time. It has one lane per
//! device and direction (block reads, writes and other requests per disk;
//! received and sent frames per NIC; env samples), a lifecycle lane (boot,
//! pause, resume, shutdown, gaps), the snapshots (diamonds at their cut),
//! the original's crash (a red line at its recorded time) and the clone:
//! the span of recorded events it replayed and its crash, placed at the
//! recorded time of the last event applied before it. The bottom panel is
//! the replay's progress over the replay's own wall time (replayed `seq`
//! against seconds since the first progress message), from a
//! `vmr replay watch --log` file.
//!
//! Sources: the instance's partition of the event topics (Kafka), the
//! snapshot store's manifests (when it can be read), the replayer's report
//! of the clone (`--replay`) and the watch log (`--replay-log`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::json;
use vmr_proto::{BlockOp, Direction, Event, LifecycleKind, Payload};

use crate::cmd::events::{read_instance, Kind};
use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::output::{println_safe, Out};

/// Arguments of `vmr timeline`.
#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// The recorded instance.
    #[arg(long, short)]
    pub instance: String,
    /// A clone of it: its state and crash come from the replayer's report.
    #[arg(long, value_name = "CLONE")]
    pub replay: Option<String>,
    /// A `vmr replay watch --log` file: replay progress and the clone's
    /// lifecycle with their times.
    #[arg(long, value_name = "FILE")]
    pub replay_log: Option<PathBuf>,
    /// The SVG to write.
    #[arg(long, short, value_name = "FILE.svg")]
    pub output: PathBuf,
    /// The PNG to write (default: the SVG's path with `.png`).
    #[arg(long, value_name = "FILE.png")]
    pub png: Option<PathBuf>,
    /// Do not write a PNG.
    #[arg(long)]
    pub no_png: bool,
    /// Seconds to wait for the broker.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub timeout: f64,
}

/// A snapshot on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapMark {
    pub id: String,
    pub time_ns: u64,
    pub seq_at_cut: u64,
}

/// A crash on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashMark {
    /// Recorded time it is drawn at.
    pub time_ns: u64,
    /// The crash event's seq (original), or the last input the clone was
    /// given before it crashed (clone).
    pub seq: u64,
    pub detail: String,
}

/// The clone's part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CloneTrack {
    pub clone_id: String,
    pub snapshot_id: String,
    pub state: String,
    pub seq_at_cut: u64,
    pub replayed_seq: u64,
    pub divergences: u64,
    /// The clone's crash: its recorded time is that of `seq`, and
    /// `clone_wall_ns` the clone's own time of it (0 when unknown).
    pub crash: Option<(CrashMark, u64)>,
    /// (seconds since the first progress message, replayed seq).
    pub progress: Vec<(f64, u64)>,
}

/// Everything the picture shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    pub instance: String,
    /// Lane name -> (time, seq) of each event.
    pub lanes: BTreeMap<String, Vec<(u64, u64)>>,
    /// (time, seq, kind, detail) of lifecycle events other than crashes and
    /// snapshots.
    pub lifecycle: Vec<(u64, u64, String, String)>,
    pub snapshots: Vec<SnapMark>,
    pub crash: Option<CrashMark>,
    pub clone: Option<CloneTrack>,
    /// seq -> recorded time of every event.
    pub seq_times: BTreeMap<u64, u64>,
    /// seq -> recorded time of the guest's inputs: block requests and
    /// received frames (not sent frames, env samples or lifecycle events).
    pub input_times: BTreeMap<u64, u64>,
    /// Events per topic.
    pub per_topic: BTreeMap<String, u64>,
}

fn word(s: impl std::fmt::Debug) -> String {
    let s = format!("{s:?}");
    let mut o = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                o.push('_');
            }
            o.push(c.to_ascii_lowercase());
        } else {
            o.push(c);
        }
    }
    o
}

impl Timeline {
    /// Builds the recorded part from `(topic, event)` pairs.
    pub fn from_events(instance: &str, events: &[(String, Event)]) -> Self {
        let mut t = Timeline {
            instance: instance.to_string(),
            ..Default::default()
        };
        for (topic, e) in events {
            *t.per_topic.entry(topic.clone()).or_default() += 1;
            let at = e.wall_time_ns;
            t.seq_times.insert(e.seq, at);
            let lane = match &e.payload {
                Payload::Block(b) => Some(match b.op {
                    BlockOp::Read => format!("{} read", b.device),
                    BlockOp::Write | BlockOp::WriteZeroes | BlockOp::Discard => {
                        format!("{} write", b.device)
                    }
                    _ => format!("{} flush/other", b.device),
                }),
                Payload::Net(n) => Some(match n.direction {
                    Direction::Rx => format!("{} rx (to guest)", n.device),
                    Direction::Tx => format!("{} tx (from guest)", n.device),
                }),
                Payload::Env(_) => Some("env samples (all sensors)".to_string()),
                Payload::Lifecycle(l) => {
                    match l.kind {
                        LifecycleKind::Crash
                        | LifecycleKind::TripleFault
                        | LifecycleKind::InternalError => {
                            if t.crash.as_ref().is_none_or(|c| c.time_ns > at) {
                                t.crash = Some(CrashMark {
                                    time_ns: at,
                                    seq: e.seq,
                                    detail: format!("{} {}", word(l.kind), l.detail)
                                        .trim()
                                        .to_string(),
                                });
                            }
                        }
                        LifecycleKind::Snapshot => {
                            if let Some(id) = &l.snapshot_id {
                                if !t.snapshots.iter().any(|s| &s.id == id) {
                                    t.snapshots.push(SnapMark {
                                        id: id.clone(),
                                        time_ns: at,
                                        seq_at_cut: e.seq,
                                    });
                                }
                            }
                        }
                        _ => t
                            .lifecycle
                            .push((at, e.seq, word(l.kind), l.detail.clone())),
                    }
                    None
                }
            };
            let input = match &e.payload {
                Payload::Block(_) => true,
                Payload::Net(n) => n.direction == Direction::Rx,
                _ => false,
            };
            if input {
                t.input_times.insert(e.seq, at);
            }
            if let Some(l) = lane {
                t.lanes.entry(l).or_default().push((at, e.seq));
            }
        }
        t
    }

    /// Adds (or corrects) snapshots from their manifests.
    pub fn add_snapshot(&mut self, id: &str, time_ns: u64, seq_at_cut: u64) {
        self.snapshots.retain(|s| s.id != id);
        self.snapshots.push(SnapMark {
            id: id.to_string(),
            time_ns,
            seq_at_cut,
        });
        self.snapshots.sort_by_key(|s| s.time_ns);
    }

    /// The recorded time of `seq`, or of the nearest earlier event.
    pub fn time_of_seq(&self, seq: u64) -> Option<u64> {
        self.seq_times.range(..=seq).next_back().map(|(_, &t)| t)
    }

    /// The last input at or before `seq` (its seq and recorded time): where
    /// a clone whose replay had applied up to `seq` got its last input.
    pub fn last_input_at(&self, seq: u64) -> Option<(u64, u64)> {
        self.input_times
            .range(..=seq)
            .next_back()
            .map(|(&s, &t)| (s, t))
    }

    /// The recorded time span (first, last), with crash and snapshots.
    pub fn span(&self) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        let mut see = |t: u64| {
            lo = lo.min(t);
            hi = hi.max(t);
        };
        for &t in self.seq_times.values() {
            see(t);
        }
        for s in &self.snapshots {
            see(s.time_ns);
        }
        if let Some(c) = &self.crash {
            see(c.time_ns);
        }
        if lo == u64::MAX {
            return (0, 1);
        }
        if hi <= lo {
            hi = lo + 1_000_000_000;
        }
        (lo, hi)
    }
}

/// One line of a `vmr replay watch --log` file (fields this command uses).
#[derive(Debug, Deserialize)]
struct LogLine {
    #[serde(default)]
    received_ns: u64,
    clone: Option<LogClone>,
    lifecycle: Option<LogLifecycle>,
}

#[derive(Debug, Deserialize)]
struct LogClone {
    clone_id: String,
    #[serde(default)]
    snapshot_id: String,
    state: String,
    replayed_seq: u64,
    #[serde(default)]
    seq_at_cut: u64,
    #[serde(default)]
    divergences: u64,
}

#[derive(Debug, Deserialize)]
struct LogLifecycle {
    kind: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    wall_time_ns: u64,
    last_seq_applied: u64,
}

fn is_crash_word(k: &str) -> bool {
    matches!(k, "crash" | "triple_fault" | "internal_error")
}

/// Reads a watch log into the clone track.
pub fn read_replay_log(path: &Path, t: &mut Timeline) -> CliResult {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::not_found(format!(
            "cannot read the replay log {}: {e}",
            path.display()
        ))
        .hint("write one with `vmr replay watch CLONE --log FILE`")
    })?;
    let mut track = t.clone.take().unwrap_or_default();
    let mut first: Option<u64> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: LogLine = serde_json::from_str(line).map_err(|e| {
            CliError::usage(format!(
                "{} line {}: not a replay watch log line: {e}",
                path.display(),
                i + 1
            ))
        })?;
        let f = *first.get_or_insert(l.received_ns);
        if let Some(c) = &l.clone {
            track.clone_id = c.clone_id.clone();
            if !c.snapshot_id.is_empty() {
                track.snapshot_id = c.snapshot_id.clone();
            }
            track.state = c.state.clone();
            track.replayed_seq = c.replayed_seq;
            track.seq_at_cut = c.seq_at_cut;
            track.divergences = c.divergences;
            let secs = l.received_ns.saturating_sub(f) as f64 / 1e9;
            track.progress.push((secs, c.replayed_seq));
        }
        if let Some(lc) = &l.lifecycle {
            if is_crash_word(&lc.kind) && track.crash.is_none() {
                let (seq, at) = t
                    .last_input_at(lc.last_seq_applied)
                    .unwrap_or((lc.last_seq_applied, 0));
                track.crash = Some((
                    CrashMark {
                        time_ns: at,
                        seq,
                        detail: format!("{} {}", lc.kind, lc.detail).trim().to_string(),
                    },
                    lc.wall_time_ns,
                ));
            }
        }
    }
    t.clone = Some(track);
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Geometry of the top panel, as written into the SVG's `data-*`
/// attributes (so a reader can map times to x).
#[derive(Debug, Clone, Copy)]
pub struct Axis {
    pub t0: u64,
    pub t1: u64,
    pub left: f64,
    pub width: f64,
}

impl Axis {
    /// The x of recorded time `t`.
    pub fn x(&self, t: u64) -> f64 {
        let f = (t.saturating_sub(self.t0)) as f64 / (self.t1 - self.t0).max(1) as f64;
        self.left + f.clamp(0.0, 1.0) * self.width
    }
}

const W: f64 = 1200.0;
const LEFT: f64 = 190.0;
const RIGHT: f64 = 30.0;
const LANE_H: f64 = 26.0;

/// The SVG document.
pub fn render_svg(t: &Timeline) -> String {
    let (t0, t1) = t.span();
    let pad = (t1 - t0) / 40;
    let axis = Axis {
        t0: t0.saturating_sub(pad),
        t1: t1 + pad,
        left: LEFT,
        width: W - LEFT - RIGHT,
    };
    // Disks first, then NICs, then the host's env samples.
    let rank = |name: &str| {
        if name.starts_with("env ") {
            2
        } else if name.contains(" rx ") || name.contains(" tx ") {
            1
        } else {
            0
        }
    };
    let mut lanes: Vec<(&String, &Vec<(u64, u64)>)> = t.lanes.iter().collect();
    lanes.sort_by_key(|(n, _)| (rank(n), n.as_str()));
    let top = 60.0;
    let n_rows = lanes.len() + 2; // + lifecycle + clone
    let panel_bottom = top + n_rows as f64 * LANE_H;
    let has_progress = t.clone.as_ref().is_some_and(|c| c.progress.len() > 1);
    let prog_top = panel_bottom + 70.0;
    let prog_h = 160.0;
    let h = if has_progress {
        prog_top + prog_h + 50.0
    } else {
        panel_bottom + 50.0
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, sans-serif" font-size="12" data-t0-ns="{}" data-t1-ns="{}" data-plot-left="{}" data-plot-width="{}">"#,
        axis.t0, axis.t1, axis.left, axis.width
    );
    let _ = write!(
        s,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="12" y="24" font-size="16" font-weight="bold">vmreplay timeline: {}</text>"##,
        esc(&t.instance)
    );
    let secs = (axis.t1 - axis.t0) as f64 / 1e9;
    let _ = write!(
        s,
        r##"<text x="12" y="44" fill="#555">recorded wall time, {:.1} s shown; {} events</text>"##,
        secs,
        t.seq_times.len()
    );
    // Time grid.
    let step = nice_step(secs);
    let mut k = 0.0;
    while k <= secs {
        let tt = axis.t0 + (k * 1e9) as u64;
        let x = axis.x(tt);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{panel_bottom}" stroke="#eeeeee"/><text x="{x:.1}" y="{:.1}" fill="#777" text-anchor="middle" font-size="10">+{k:.1}s</text>"##,
            panel_bottom + 14.0
        );
        k += step;
    }
    let colour = |name: &str| -> &'static str {
        if name.contains("read") {
            "#2b7bb9"
        } else if name.contains("write") {
            "#e08a00"
        } else if name.contains(" rx") {
            "#2e9e4f"
        } else if name.contains(" tx") {
            "#8a4fc7"
        } else {
            "#666666"
        }
    };
    for (i, (name, ticks)) in lanes.iter().enumerate() {
        let y = top + i as f64 * LANE_H;
        let _ = write!(
            s,
            r##"<g class="lane" data-lane="{}" data-events="{}"><text x="12" y="{:.1}">{} ({})</text><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#dddddd"/>"##,
            esc(name),
            ticks.len(),
            y + 17.0,
            esc(name),
            ticks.len(),
            y + LANE_H / 2.0,
            W - RIGHT,
            y + LANE_H / 2.0
        );
        let c = colour(name);
        for &(tt, seq) in ticks.iter() {
            let x = axis.x(tt);
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{c}" stroke-width="1.2" data-seq="{seq}"/>"#,
                y + 5.0,
                y + LANE_H - 5.0
            );
        }
        s.push_str("</g>");
    }
    // Lifecycle lane: events and snapshots.
    let ly = top + lanes.len() as f64 * LANE_H;
    let _ = write!(
        s,
        r##"<text x="12" y="{:.1}">lifecycle, snapshots</text><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#dddddd"/>"##,
        ly + 17.0,
        ly + LANE_H / 2.0,
        W - RIGHT,
        ly + LANE_H / 2.0
    );
    for (tt, seq, kind, detail) in &t.lifecycle {
        let x = axis.x(*tt);
        let _ = write!(
            s,
            r##"<g class="lifecycle" data-kind="{}" data-seq="{seq}" data-time-ns="{tt}"><circle cx="{x:.1}" cy="{:.1}" r="4" fill="#444444"/><text x="{:.1}" y="{:.1}" font-size="9" fill="#444">{}</text><title>{} {}</title></g>"##,
            esc(kind),
            ly + LANE_H / 2.0,
            x + 5.0,
            ly + 9.0,
            esc(kind),
            esc(kind),
            esc(detail)
        );
    }
    for sn in &t.snapshots {
        let x = axis.x(sn.time_ns);
        let cy = ly + LANE_H / 2.0;
        let _ = write!(
            s,
            r##"<g class="snapshot" data-snapshot="{}" data-time-ns="{}" data-seq-at-cut="{}" data-x="{x:.2}"><polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="#1f5fbf"/><line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{panel_bottom}" stroke="#1f5fbf" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" font-size="9" fill="#1f5fbf">snapshot {} (seq {})</text></g>"##,
            esc(&sn.id),
            sn.time_ns,
            sn.seq_at_cut,
            x,
            cy - 7.0,
            x + 7.0,
            cy,
            x,
            cy + 7.0,
            x - 7.0,
            cy,
            x + 8.0,
            cy + 11.0,
            esc(&sn.id),
            sn.seq_at_cut
        );
    }
    // Clone lane.
    let cy = ly + LANE_H;
    let _ = write!(
        s,
        r##"<text x="12" y="{:.1}">clone (replayed span)</text>"##,
        cy + 17.0
    );
    if let Some(c) = &t.clone {
        let from = t.time_of_seq(c.seq_at_cut).unwrap_or(axis.t0);
        let to = t.time_of_seq(c.replayed_seq).unwrap_or(from);
        let (x0, x1) = (axis.x(from), axis.x(to));
        let _ = write!(
            s,
            r##"<g class="clone" data-clone="{}" data-state="{}" data-replayed-seq="{}"><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#9fd39f" stroke="#2e7d32"/><text x="{:.1}" y="{:.1}" font-size="9">{} {} (seq {}..{}, {} divergences)</text></g>"##,
            esc(&c.clone_id),
            esc(&c.state),
            c.replayed_seq,
            cy + 6.0,
            (x1 - x0).max(1.0),
            LANE_H - 12.0,
            x0 + 3.0,
            cy + 16.0,
            esc(&c.clone_id),
            esc(&c.state),
            c.seq_at_cut,
            c.replayed_seq,
            c.divergences
        );
    }
    // Crash markers.
    if let Some(c) = &t.crash {
        let x = axis.x(c.time_ns);
        let _ = write!(
            s,
            r##"<g id="crash-original" class="crash" data-time-ns="{}" data-seq="{}" data-x="{x:.2}"><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#d00000" stroke-width="2.5"/><text x="{:.1}" y="{:.1}" fill="#d00000" font-weight="bold" text-anchor="{}">original crashed (seq {})</text><title>{}</title></g>"##,
            c.time_ns,
            c.seq,
            top - 8.0,
            ly + LANE_H,
            if x > W / 2.0 { x + 4.0 } else { x - 4.0 },
            top - 12.0,
            if x > W / 2.0 { "end" } else { "start" },
            c.seq,
            esc(&c.detail)
        );
    }
    if let Some((c, wall)) = t.clone.as_ref().and_then(|c| c.crash.as_ref()) {
        let x = axis.x(c.time_ns);
        let _ = write!(
            s,
            r##"<g id="crash-clone" class="crash" data-time-ns="{}" data-seq="{}" data-clone-wall-ns="{wall}" data-x="{x:.2}"><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ff5a00" stroke-width="2.5" stroke-dasharray="5,3"/><text x="{:.1}" y="{:.1}" fill="#ff5a00" font-weight="bold" text-anchor="{}">clone crashed after input seq {}</text><title>{}</title></g>"##,
            c.time_ns,
            c.seq,
            ly + LANE_H,
            ly + 2.0 * LANE_H + 18.0,
            if x > W / 2.0 { x - 6.0 } else { x + 6.0 },
            ly + 2.0 * LANE_H + 30.0,
            if x > W / 2.0 { "end" } else { "start" },
            c.seq,
            esc(&c.detail)
        );
    }
    // Progress panel.
    if let Some(c) = t.clone.as_ref().filter(|_| has_progress) {
        let tmax = c
            .progress
            .iter()
            .map(|p| p.0)
            .fold(0.0f64, f64::max)
            .max(0.001);
        let smin = c
            .progress
            .iter()
            .map(|p| p.1)
            .min()
            .unwrap_or(0)
            .min(c.seq_at_cut);
        let smax = c
            .progress
            .iter()
            .map(|p| p.1)
            .max()
            .unwrap_or(1)
            .max(smin + 1);
        let px = |sec: f64| LEFT + sec / tmax * (W - LEFT - RIGHT);
        let py = |seq: u64| prog_top + prog_h - (seq - smin) as f64 / (smax - smin) as f64 * prog_h;
        let _ = write!(
            s,
            r##"<g class="progress" data-points="{}" data-seconds="{tmax:.3}"><text x="12" y="{:.1}" font-weight="bold">replay progress</text><text x="12" y="{:.1}" fill="#555" font-size="10">replayed seq over replay time</text><rect x="{LEFT}" y="{prog_top}" width="{:.1}" height="{prog_h}" fill="none" stroke="#cccccc"/><text x="{LEFT}" y="{:.1}" font-size="10" fill="#777">0 s</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#777" text-anchor="end">{tmax:.1} s</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#777" text-anchor="end">seq {smax}</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#777" text-anchor="end">seq {smin}</text>"##,
            c.progress.len(),
            prog_top + 12.0,
            prog_top + 28.0,
            W - LEFT - RIGHT,
            prog_top + prog_h + 14.0,
            W - RIGHT,
            prog_top + prog_h + 14.0,
            LEFT - 4.0,
            prog_top + 10.0,
            LEFT - 4.0,
            prog_top + prog_h
        );
        let mut pts = String::new();
        for &(sec, seq) in &c.progress {
            let _ = write!(pts, "{:.1},{:.1} ", px(sec), py(seq));
        }
        let _ = write!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#2e7d32" stroke-width="2"/>"##,
            pts.trim_end()
        );
        if let Some((cr, _)) = &c.crash {
            if let Some(&(sec, _)) = c.progress.last() {
                let _ = write!(
                    s,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="#ff5a00"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#ff5a00" text-anchor="end">crash after seq {}</text>"##,
                    px(sec),
                    py(cr.seq.max(smin).min(smax)),
                    px(sec) - 8.0,
                    py(cr.seq.max(smin).min(smax)) - 6.0,
                    cr.seq
                );
            }
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>\n");
    s
}

fn nice_step(secs: f64) -> f64 {
    for st in [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ] {
        if secs / st <= 12.0 {
            return st;
        }
    }
    3600.0
}

/// Renders the SVG text to PNG bytes.
pub fn render_png(svg: &str) -> CliResult<Vec<u8>> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &opt)
        .map_err(|e| CliError::other(format!("the timeline SVG does not parse: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| CliError::other("the timeline has no size"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| CliError::other(format!("encoding the PNG: {e}")))
}

/// Builds the timeline from the configured services.
pub fn build(cfg: &Config, a: &TimelineArgs, out: &Out) -> CliResult<Timeline> {
    vmr_proto::InstanceId::new(a.instance.clone())
        .map_err(|e| CliError::usage(format!("--instance {:?}: {e}", a.instance)))?;
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    let (events, skipped) = read_instance(
        cfg,
        &a.instance,
        &[Kind::Block, Kind::Net, Kind::Env, Kind::Lifecycle],
        Duration::from_secs_f64(a.timeout),
    )?;
    if skipped > 0 {
        out.warn(&format!(
            "{skipped} records of the instance's partitions did not decode"
        ));
    }
    if events.is_empty() {
        return Err(CliError::not_found(format!(
            "no recorded events of instance {} on the broker at {}",
            a.instance, cfg.endpoints.bootstrap_servers
        ))
        .hint("check the instance id with `vmr events tail`"));
    }
    let mut t = Timeline::from_events(&a.instance, &events);
    // Snapshot manifests from the store, when it can be read.
    match crate::cmd::snapshot::list_store(cfg, &a.instance) {
        Ok(ms) => {
            for m in ms {
                t.add_snapshot(&m.snapshot_id, m.wall_time_ns, m.seq_at_cut);
            }
        }
        Err(e) => out.warn(&format!(
            "snapshots from the lifecycle topic only: {}",
            e.message
        )),
    }
    if let Some(id) = &a.replay {
        let c = crate::cmd::replay::fetch_report(cfg, id)?;
        let mut track = t.clone.take().unwrap_or_default();
        track.clone_id = c.clone_id.clone();
        track.snapshot_id = c.snapshot_id.clone();
        track.state = crate::cmd::replay::state_name(c.state).into();
        track.seq_at_cut = c.seq_at_cut;
        track.replayed_seq = c.replayed_seq;
        track.divergences = u64::from(c.divergences);
        if track.state == "crashed" {
            let (seq, at) = t
                .last_input_at(c.replayed_seq)
                .unwrap_or((c.replayed_seq, 0));
            track.crash = Some((
                CrashMark {
                    time_ns: at,
                    seq,
                    detail: c.detail.clone(),
                },
                0,
            ));
        }
        t.clone = Some(track);
    }
    if let Some(p) = &a.replay_log {
        read_replay_log(p, &mut t)?;
    }
    Ok(t)
}

fn write_file(p: &Path, bytes: &[u8]) -> CliResult {
    std::fs::write(p, bytes).map_err(|e| {
        CliError::precondition(format!("cannot write {}: {e}", p.display()))
            .hint("choose a writable output path")
    })
}

/// Runs `vmr timeline`.
pub fn run(cfg: &Config, a: &TimelineArgs, out: &Out) -> CliResult {
    let t = build(cfg, a, out)?;
    let svg = render_svg(&t);
    write_file(&a.output, svg.as_bytes())?;
    let png_path = if a.no_png {
        None
    } else {
        Some(
            a.png
                .clone()
                .unwrap_or_else(|| a.output.with_extension("png")),
        )
    };
    if let Some(p) = &png_path {
        let png = render_png(&svg)?;
        write_file(p, &png)?;
    }
    let crash_clone = t.clone.as_ref().and_then(|c| c.crash.as_ref());
    if out.json {
        out.json_doc(&json!({
            "instance": t.instance,
            "svg": a.output,
            "png": png_path,
            "events": t.seq_times.len(),
            "events_per_topic": t.per_topic,
            "lanes": t.lanes.iter().map(|(k, v)| json!({"lane": k, "events": v.len()})).collect::<Vec<_>>(),
            "snapshots": t.snapshots.iter().map(|s| json!({"id": s.id, "time_ns": s.time_ns, "seq_at_cut": s.seq_at_cut})).collect::<Vec<_>>(),
            "crash_original": t.crash.as_ref().map(|c| json!({"time_ns": c.time_ns, "seq": c.seq, "detail": c.detail, "after_input_seq": t.last_input_at(c.seq.saturating_sub(1)).map(|x| x.0)})),
            "crash_clone": crash_clone.map(|(c, w)| json!({"recorded_time_ns": c.time_ns, "seq": c.seq, "clone_wall_ns": w, "detail": c.detail})),
            "clone": t.clone.as_ref().map(|c| json!({"clone_id": c.clone_id, "state": c.state, "replayed_seq": c.replayed_seq, "progress_points": c.progress.len()})),
        }));
    } else {
        println_safe(&format!(
            "wrote {}{} ({} events, {} lanes, {} snapshots, original crash: {}, clone crash: {})",
            a.output.display(),
            png_path
                .as_ref()
                .map(|p| format!(" and {}", p.display()))
                .unwrap_or_default(),
            t.seq_times.len(),
            t.lanes.len(),
            t.snapshots.len(),
            t.crash
                .as_ref()
                .map_or("none".into(), |c| format!("seq {}", c.seq)),
            crash_clone.map_or("none".into(), |(c, _)| format!("after seq {}", c.seq)),
        ));
    }
    Ok(())
}
