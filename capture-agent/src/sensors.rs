//! Host sensors: readings from sysfs and procfs that a guest can observe
//! (temperatures, fans, power, pressure stalls), as `EnvSample`s.
//!
//! | kind | files | sensor names |
//! | --- | --- | --- |
//! | hwmon | `<sys>/class/hwmon/hwmon*/{name, <type><n>_input, <type><n>_label}` | `hwmon.<chip>.<label>` |
//! | thermal | `<sys>/class/thermal/thermal_zone*/{type, temp}` | `thermal.<type>` |
//! | power_supply | `<sys>/class/power_supply/<supply>/{capacity, online, voltage_now, ...}` | `power_supply.<supply>.<attribute>` |
//! | pressure | `<proc>/pressure/{cpu, memory, io, irq}` | `pressure.<resource>.<some/full>.<avg10/avg60/avg300/total>` |
//!
//! Values are converted from the kernel's fixed-point units (millidegrees,
//! microvolts, ...) to the unit named in the sample. Only what the host
//! exposes is reported: a file that does not exist or cannot be read gives
//! no sample, never a made-up one. A name used by two devices (two chips
//! called `coretemp`) gets `@<directory>` appended. Where a kind has no
//! sensor at all, [`Sensors::describe`] says so and the probe logs it once.
//!
//! The roots are configurable so that tests can point them at a directory
//! tree with the kernel's file layout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmr_proto::EnvSample;

use crate::config::{SensorKind, SensorsConfig, TriggerConfig};
use crate::events::EventLog;

/// What the probe found for one kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KindReport {
    pub kind: SensorKind,
    /// Directory read.
    pub root: PathBuf,
    /// Sensor names found.
    pub sensors: Vec<String>,
    /// Why there is none, when there is none.
    pub none: Option<String>,
}

/// What the host exposes, per configured kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Inventory {
    pub kinds: Vec<KindReport>,
}

/// Reads the configured sensor kinds.
#[derive(Debug, Clone)]
pub struct Sensors {
    sys: PathBuf,
    proc_: PathBuf,
    kinds: Vec<SensorKind>,
    inventory: Inventory,
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_num(p: &Path) -> Option<f64> {
    read_trim(p)?.parse::<f64>().ok()
}

/// Entries of `dir` whose names start with `prefix`, sorted by name.
fn entries(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.starts_with(prefix).then(|| (name, e.path()))
        })
        .collect();
    v.sort_by_key(|a| natural(&a.0));
    v
}

/// Sort key that orders `hwmon2` before `hwmon10`.
fn natural(s: &str) -> (String, u64) {
    let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, tail) = s.split_at(s.len() - digits);
    (head.to_owned(), tail.parse().unwrap_or(0))
}

/// A label as a name component: lower case, `[a-z0-9_-]`.
fn component(s: &str) -> String {
    let out: String = s
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        "unnamed".into()
    } else {
        out
    }
}

/// hwmon attribute types: file prefix, scale to the unit, unit.
const HWMON_TYPES: [(&str, f64, &str); 7] = [
    ("temp", 1e-3, "celsius"),
    ("fan", 1.0, "rpm"),
    ("in", 1e-3, "volts"),
    ("curr", 1e-3, "amperes"),
    ("power", 1e-6, "watts"),
    ("energy", 1e-6, "joules"),
    ("humidity", 1e-3, "percent"),
];

/// power_supply attributes: file, scale, unit.
const SUPPLY_ATTRS: [(&str, f64, &str); 10] = [
    ("capacity", 1.0, "percent"),
    ("online", 1.0, "boolean"),
    ("present", 1.0, "boolean"),
    ("voltage_now", 1e-6, "volts"),
    ("current_now", 1e-6, "amperes"),
    ("power_now", 1e-6, "watts"),
    ("energy_now", 1e-6, "watt_hours"),
    ("charge_now", 1e-6, "amp_hours"),
    ("temp", 0.1, "celsius"),
    ("cycle_count", 1.0, "count"),
];

/// Pressure resources.
const PRESSURE: [&str; 4] = ["cpu", "memory", "io", "irq"];

/// Names used twice get `@<dir>` appended (the first keeps its name only if
/// it is unique).
fn disambiguate(items: Vec<(String, String, EnvSample)>) -> Vec<EnvSample> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, name, _) in &items {
        *count.entry(name.clone()).or_default() += 1;
    }
    items
        .into_iter()
        .map(|(dir, name, mut s)| {
            if count[&name] > 1 {
                s.sensor = format!("{}@{dir}", s.sensor);
            }
            s
        })
        .collect()
}

fn sample(sensor: String, value: f64, unit: &str) -> EnvSample {
    EnvSample {
        sensor,
        value,
        unit: unit.to_owned(),
    }
}

impl Sensors {
    /// Probes the host once: which kinds have sensors. Logs each kind that
    /// has none, once.
    pub fn probe(cfg: &SensorsConfig) -> Self {
        let mut s = Self {
            sys: cfg.sys_root.clone(),
            proc_: cfg.proc_root.clone(),
            kinds: cfg.kinds.clone(),
            inventory: Inventory { kinds: Vec::new() },
        };
        let mut reports = Vec::new();
        for &kind in &s.kinds {
            let root = s.root(kind);
            let found = s.read_kind(kind);
            let mut sensors: Vec<String> = found.into_iter().map(|x| x.sensor).collect();
            sensors.sort();
            let none = sensors.is_empty().then(|| {
                let why = if root.is_dir() {
                    format!(
                        "{} exposes no readable {} sensor",
                        root.display(),
                        kind.name()
                    )
                } else {
                    format!("{} does not exist", root.display())
                };
                tracing::info!(
                    kind = kind.name(),
                    "this host has no {} sensors: {why}",
                    kind.name()
                );
                why
            });
            reports.push(KindReport {
                kind,
                root,
                sensors,
                none,
            });
        }
        s.inventory = Inventory { kinds: reports };
        s
    }

    /// What the probe found (and, for kinds without sensors, why not).
    pub fn describe(&self) -> &Inventory {
        &self.inventory
    }

    fn root(&self, kind: SensorKind) -> PathBuf {
        match kind {
            SensorKind::Hwmon => self.sys.join("class/hwmon"),
            SensorKind::Thermal => self.sys.join("class/thermal"),
            SensorKind::PowerSupply => self.sys.join("class/power_supply"),
            SensorKind::Pressure => self.proc_.join("pressure"),
        }
    }

    /// Every reading of every configured kind, now.
    pub fn read(&self) -> Vec<EnvSample> {
        self.kinds.iter().flat_map(|&k| self.read_kind(k)).collect()
    }

    fn read_kind(&self, kind: SensorKind) -> Vec<EnvSample> {
        let root = self.root(kind);
        match kind {
            SensorKind::Hwmon => read_hwmon(&root),
            SensorKind::Thermal => read_thermal(&root),
            SensorKind::PowerSupply => read_power_supply(&root),
            SensorKind::Pressure => read_pressure(&root),
        }
    }
}

fn read_hwmon(root: &Path) -> Vec<EnvSample> {
    let mut items = Vec::new();
    for (dir, path) in entries(root, "hwmon") {
        let chip = read_trim(&path.join("name")).map_or_else(|| dir.clone(), |n| component(&n));
        let files = entries(&path, "");
        for (file, fpath) in &files {
            let Some(stem) = file.strip_suffix("_input") else {
                continue;
            };
            let Some(&(_, scale, unit)) = HWMON_TYPES.iter().find(|(p, _, _)| {
                stem.strip_prefix(p)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            }) else {
                continue;
            };
            let Some(raw) = read_num(fpath) else { continue };
            let label = read_trim(&path.join(format!("{stem}_label")))
                .filter(|l| !l.is_empty())
                .map_or_else(|| stem.to_owned(), |l| component(&l));
            let name = format!("hwmon.{chip}.{label}");
            items.push((dir.clone(), name.clone(), sample(name, raw * scale, unit)));
        }
    }
    disambiguate(items)
}

fn read_thermal(root: &Path) -> Vec<EnvSample> {
    let mut items = Vec::new();
    for (dir, path) in entries(root, "thermal_zone") {
        let Some(raw) = read_num(&path.join("temp")) else {
            continue;
        };
        let kind = read_trim(&path.join("type")).map_or_else(|| dir.clone(), |t| component(&t));
        let name = format!("thermal.{kind}");
        items.push((dir, name.clone(), sample(name, raw * 1e-3, "celsius")));
    }
    disambiguate(items)
}

fn read_power_supply(root: &Path) -> Vec<EnvSample> {
    let mut out = Vec::new();
    for (dir, path) in entries(root, "") {
        let supply = component(&dir);
        for (attr, scale, unit) in SUPPLY_ATTRS {
            if let Some(raw) = read_num(&path.join(attr)) {
                out.push(sample(
                    format!("power_supply.{supply}.{attr}"),
                    raw * scale,
                    unit,
                ));
            }
        }
    }
    out
}

/// Parses one pressure file (`some avg10=0.00 avg60=0.00 avg300=0.00
/// total=0`, then a `full` line).
pub fn parse_pressure(resource: &str, text: &str) -> Vec<EnvSample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(scope @ ("some" | "full")) = words.next() else {
            continue;
        };
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<f64>() else { continue };
            let unit = match k {
                "avg10" | "avg60" | "avg300" => "percent",
                "total" => "microseconds",
                _ => continue,
            };
            out.push(sample(format!("pressure.{resource}.{scope}.{k}"), v, unit));
        }
    }
    out
}

fn read_pressure(root: &Path) -> Vec<EnvSample> {
    PRESSURE
        .iter()
        .filter_map(|r| Some((r, std::fs::read_to_string(root.join(r)).ok()?)))
        .flat_map(|(r, text)| parse_pressure(r, &text))
        .collect()
}

/// Whether `rule` names `sensor` (exactly, or by a prefix ending in `*`).
fn matches(rule: &TriggerConfig, sensor: &str) -> bool {
    match rule.sensor.strip_suffix('*') {
        Some(prefix) => sensor.starts_with(prefix),
        None => rule.sensor == sensor,
    }
}

/// Decides which readings to emit: all of them every `interval`, and in
/// between those a trigger fires for.
#[derive(Debug)]
pub struct Schedule {
    sensors: Sensors,
    interval: Duration,
    triggers: Vec<TriggerConfig>,
    last: BTreeMap<String, f64>,
    last_periodic: Option<Instant>,
}

impl Schedule {
    /// A schedule over `sensors` with the configuration's interval and
    /// triggers.
    pub fn new(sensors: Sensors, cfg: &SensorsConfig) -> Self {
        Self {
            sensors,
            interval: Duration::from_secs(cfg.interval_secs),
            triggers: cfg.triggers.clone(),
            last: BTreeMap::new(),
            last_periodic: None,
        }
    }

    /// The sensors read.
    pub fn sensors(&self) -> &Sensors {
        &self.sensors
    }

    /// Reads the sensors; returns what is due at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<EnvSample> {
        let readings = self.sensors.read();
        self.select(now, readings)
    }

    /// Chooses among `readings` what is due at `now`.
    pub fn select(&mut self, now: Instant, readings: Vec<EnvSample>) -> Vec<EnvSample> {
        let periodic = self
            .last_periodic
            .is_none_or(|t| now.duration_since(t) >= self.interval);
        if periodic {
            self.last_periodic = Some(now);
        }
        let mut out = Vec::new();
        for r in readings {
            let prev = self.last.get(&r.sensor).copied();
            let fire = periodic
                || prev.is_some_and(|p| {
                    self.triggers
                        .iter()
                        .filter(|t| matches(t, &r.sensor))
                        .any(|t| {
                            t.change.is_some_and(|c| (r.value - p).abs() >= c)
                                || t.above.is_some_and(|a| r.value >= a && p < a)
                                || t.below.is_some_and(|b| r.value <= b && p > b)
                        })
                });
            if fire {
                self.last.insert(r.sensor.clone(), r.value);
                out.push(r);
            }
        }
        out
    }
}

/// A thread that polls a [`Schedule`] and records what is due in an
/// [`EventLog`].
pub struct SensorLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SensorLoop {
    /// Starts polling every `poll`.
    pub fn spawn(
        mut schedule: Schedule,
        log: Arc<EventLog>,
        poll: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sensors".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let due = schedule.tick(Instant::now());
                    if !due.is_empty() {
                        if let Err(error) = log.env(&due) {
                            tracing::warn!(instance = %log.instance(), error = %crate::shipper::display_chain(&error), "cannot record sensor samples");
                        }
                    }
                    let end = Instant::now() + poll;
                    while !s.load(Ordering::Acquire) && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(20).min(poll));
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SensorLoop {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_lines_parse() {
        let s = parse_pressure(
            "io",
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=99\n",
        );
        assert_eq!(s.len(), 8);
        assert_eq!(s[0].sensor, "pressure.io.some.avg10");
        assert_eq!(s[0].value, 1.5);
        assert_eq!(s[3].unit, "microseconds");
        assert_eq!(s[7].value, 99.0);
        assert!(parse_pressure("cpu", "garbage\nsome avg10=x\n").is_empty());
    }

    #[test]
    fn triggers_fire_between_periods() {
        let cfg = SensorsConfig {
            interval_secs: 60,
            triggers: vec![TriggerConfig {
                sensor: "thermal.*".into(),
                change: Some(2.0),
                above: Some(80.0),
                below: None,
            }],
            ..SensorsConfig::default()
        };
        let sensors = Sensors::probe(&SensorsConfig {
            kinds: vec![],
            ..cfg.clone()
        });
        let mut s = Schedule::new(sensors, &cfg);
        let t0 = Instant::now();
        let r = |v: f64| {
            vec![
                sample("thermal.cpu".into(), v, "celsius"),
                sample("pressure.x".into(), v, "percent"),
            ]
        };
        assert_eq!(s.select(t0, r(50.0)).len(), 2, "the first tick is periodic");
        assert!(s.select(t0 + Duration::from_secs(1), r(51.0)).is_empty());
        let got = s.select(t0 + Duration::from_secs(2), r(52.5));
        assert_eq!(got.len(), 1, "moved 2.5 since last emitted: {got:?}");
        assert_eq!(got[0].sensor, "thermal.cpu");
        assert!(s.select(t0 + Duration::from_secs(3), r(53.0)).is_empty());
        assert_eq!(s.select(t0 + Duration::from_secs(61), r(53.0)).len(), 2);
    }
}
