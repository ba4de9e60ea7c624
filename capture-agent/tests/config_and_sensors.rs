//! The example configuration, `--check-config`, and the sensor readers
//! against directory trees with the kernel's file layout and against the
//! real host.

use std::path::Path;
use std::process::Command;

use capture_agent::config::{AgentConfig, Compression, SensorKind, SensorsConfig};
use capture_agent::sensors::Sensors;

fn example() -> std::path::PathBuf {
    vmr_testkit::workspace_root().join("config/capture-agent.example.toml")
}

#[test]
fn the_example_config_parses_and_check_config_accepts_it() {
    let cfg = AgentConfig::load(&example()).expect("the example parses");
    assert_eq!(cfg.shipper.compression, Compression::Zstd);
    assert_eq!(cfg.shipper.max_message_bytes, 8 << 20);
    assert!(!cfg.shipper.register_schemas);
    assert_eq!(cfg.sensors.kinds, SensorKind::ALL.to_vec());
    assert_eq!(cfg.sensors.triggers.len(), 2);
    assert_eq!(cfg.endpoints.bootstrap_servers, "127.0.0.1:19092");
    assert_eq!(cfg.agent.listen.to_string(), "127.0.0.1:50061");
    assert_eq!(cfg.agent.metrics_listen.to_string(), "127.0.0.1:9464");
    assert_eq!(cfg.agent.image_dirs.len(), 1);
    assert_eq!(
        cfg.capture.spool_full,
        capture_agent::config::SpoolFull::Block
    );
    assert_eq!(cfg.capture.block_bound_ms, 5000);
    assert_eq!(cfg.agent, capture_agent::config::ServiceConfig::default());
    assert_eq!(cfg.capture, capture_agent::config::CaptureConfig::default());
    let bin = env!("CARGO_BIN_EXE_capture-agent");
    let out = Command::new(bin)
        .arg("--check-config")
        .arg(example())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[shipper]\nlinger = 5\n").unwrap();
    let out = Command::new(bin)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("linger"),
        "{err}"
    );
    let out = Command::new(bin).output().unwrap();
    assert!(!out.status.success(), "no command is an error");
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A sysfs and procfs tree shaped like a laptop's.
fn tree(root: &Path) {
    let s = root.join("sys");
    for (n, chip) in [(0, "coretemp"), (1, "coretemp"), (2, "nct6775")] {
        write(
            &s,
            &format!("class/hwmon/hwmon{n}/name"),
            &format!("{chip}\n"),
        );
    }
    write(&s, "class/hwmon/hwmon0/temp1_input", "51000\n");
    write(&s, "class/hwmon/hwmon0/temp1_label", "Package id 0\n");
    write(&s, "class/hwmon/hwmon1/temp1_input", "49500\n");
    write(&s, "class/hwmon/hwmon1/temp1_label", "Package id 0\n");
    write(&s, "class/hwmon/hwmon2/fan2_input", "1210\n");
    write(&s, "class/hwmon/hwmon2/in0_input", "1104\n");
    write(&s, "class/hwmon/hwmon2/power1_input", "35500000\n");
    // An attribute that does not read as a number gives no sample.
    write(&s, "class/hwmon/hwmon2/temp3_input", "N/A\n");
    write(&s, "class/hwmon/hwmon2/temp1_max", "90000\n");
    write(&s, "class/thermal/thermal_zone0/type", "acpitz\n");
    write(&s, "class/thermal/thermal_zone0/temp", "27800\n");
    write(&s, "class/thermal/thermal_zone1/type", "x86_pkg_temp\n");
    write(&s, "class/thermal/thermal_zone1/temp", "52000\n");
    write(&s, "class/thermal/cooling_device0/type", "Processor\n");
    write(&s, "class/power_supply/BAT0/capacity", "87\n");
    write(&s, "class/power_supply/BAT0/voltage_now", "12345000\n");
    write(&s, "class/power_supply/BAT0/status", "Discharging\n");
    write(&s, "class/power_supply/AC/online", "0\n");
    let p = root.join("proc");
    write(&p, "pressure/cpu", "some avg10=2.50 avg60=1.00 avg300=0.25 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n");
    write(&p, "pressure/memory", "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=3\n");
}

#[test]
fn sensors_are_read_from_the_kernel_layout_with_units_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let cfg = SensorsConfig {
        sys_root: dir.path().join("sys"),
        proc_root: dir.path().join("proc"),
        ..SensorsConfig::default()
    };
    let sensors = Sensors::probe(&cfg);
    let got: Vec<(String, f64, String)> = sensors
        .read()
        .into_iter()
        .map(|s| (s.sensor, (s.value * 1e6).round() / 1e6, s.unit))
        .collect();
    let want: Vec<(&str, f64, &str)> = vec![
        ("hwmon.coretemp.package_id_0@hwmon0", 51.0, "celsius"),
        ("hwmon.coretemp.package_id_0@hwmon1", 49.5, "celsius"),
        ("hwmon.nct6775.fan2", 1210.0, "rpm"),
        ("hwmon.nct6775.in0", 1.104, "volts"),
        ("hwmon.nct6775.power1", 35.5, "watts"),
        ("thermal.acpitz", 27.8, "celsius"),
        ("thermal.x86_pkg_temp", 52.0, "celsius"),
        ("power_supply.ac.online", 0.0, "boolean"),
        ("power_supply.bat0.capacity", 87.0, "percent"),
        ("power_supply.bat0.voltage_now", 12.345, "volts"),
    ];
    let (hw, rest): (Vec<_>, Vec<_>) = got.iter().partition(|g| !g.0.starts_with("pressure."));
    let hw: Vec<(&str, f64, &str)> = hw
        .iter()
        .map(|(a, b, c)| (a.as_str(), *b, c.as_str()))
        .collect();
    assert_eq!(hw, want);
    // Pressure: cpu and memory (no io file here), some and full, 4 values each.
    assert_eq!(rest.len(), 16, "{rest:?}");
    assert!(rest.contains(&&(
        "pressure.cpu.some.avg10".to_string(),
        2.5,
        "percent".to_string()
    )));
    assert!(rest.contains(&&(
        "pressure.memory.full.total".to_string(),
        3.0,
        "microseconds".to_string()
    )));
    let inv = sensors.describe();
    assert_eq!(inv.kinds.len(), 4);
    assert!(inv
        .kinds
        .iter()
        .all(|k| k.none.is_none() && !k.sensors.is_empty()));
}

#[test]
fn kinds_the_host_lacks_are_reported_not_invented() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "sys/class/hwmon/hwmon0/name", "acpitz\n");
    let cfg = SensorsConfig {
        sys_root: dir.path().join("sys"),
        proc_root: dir.path().join("proc"),
        ..SensorsConfig::default()
    };
    let sensors = Sensors::probe(&cfg);
    assert!(sensors.read().is_empty());
    for k in &sensors.describe().kinds {
        assert!(k.sensors.is_empty());
        let why = k
            .none
            .as_deref()
            .expect("a reason for each kind without sensors");
        match k.kind {
            SensorKind::Hwmon => assert!(why.contains("exposes no readable hwmon sensor"), "{why}"),
            _ => assert!(why.contains("does not exist"), "{why}"),
        }
    }
}

#[test]
fn the_real_host_is_read_once() {
    let sensors = Sensors::probe(&SensorsConfig::default());
    let inv = sensors.describe();
    eprintln!("{}", serde_json::to_string_pretty(inv).unwrap());
    let readings = sensors.read();
    for k in &inv.kinds {
        assert!(k.sensors.is_empty() != k.none.is_none(), "{k:?}");
    }
    for r in &readings {
        assert!(r.value.is_finite(), "{r:?}");
        // Readings of one moment may differ from the probe's only by
        // sensors that appeared in between.
        let kind = r.sensor.split('.').next().unwrap();
        assert!(
            ["hwmon", "thermal", "power_supply", "pressure"].contains(&kind),
            "{r:?}"
        );
    }
    if Path::new("/proc/pressure/cpu").exists() {
        assert!(readings
            .iter()
            .any(|r| r.sensor == "pressure.cpu.some.avg10"));
    }
    // The binary prints the same inventory as JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_capture-agent"))
        .arg("sensors")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["inventory"]["kinds"].as_array().unwrap().len(), 4);
}

#[test]
fn the_sensor_loop_records_samples_in_the_agent_event_log() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use capture_agent::events::{EventLog, EventLogConfig};
    use capture_agent::sensors::{Schedule, SensorLoop};
    use vhost_tap::capture::{SpoolItem, SpoolReader};
    use vhost_tap::seq::{FileSeq, SeqSource};

    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let cfg = SensorsConfig {
        sys_root: dir.path().join("sys"),
        proc_root: dir.path().join("proc"),
        kinds: vec![SensorKind::Thermal],
        interval_secs: 3600,
        poll_ms: 50,
        triggers: vec![capture_agent::config::TriggerConfig {
            sensor: "thermal.acpitz".into(),
            change: None,
            above: Some(60.0),
            below: None,
        }],
        ..SensorsConfig::default()
    };
    let seq: Arc<dyn SeqSource> = Arc::new(FileSeq::open(&dir.path().join("vm.seq")).unwrap());
    let spool = dir.path().join("agent");
    let log = Arc::new(
        EventLog::open(
            "vm-s-1".parse().unwrap(),
            seq.clone(),
            EventLogConfig::new(&spool),
        )
        .unwrap(),
    );
    let boot = log
        .lifecycle(vmr_proto::LifecycleKind::Boot, "booted")
        .unwrap();
    assert_eq!(boot, 1);
    let sensors = Sensors::probe(&cfg);
    let lp = SensorLoop::spawn(
        Schedule::new(sensors, &cfg),
        log.clone(),
        Duration::from_millis(50),
    )
    .unwrap();
    // The periodic round (2 zones), then the zone crossing 60 °C.
    let read_all = || {
        let mut r = SpoolReader::from_position(&spool, None);
        let mut out = Vec::new();
        while let Some(SpoolItem::Event { event, .. }) = r.next_item().unwrap() {
            out.push(event);
        }
        out
    };
    let end = Instant::now() + Duration::from_secs(10);
    while read_all().len() < 3 {
        assert!(
            Instant::now() < end,
            "the periodic samples were not recorded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    write(
        dir.path(),
        "sys/class/thermal/thermal_zone0/temp",
        "61500\n",
    );
    while read_all().len() < 4 {
        assert!(
            Instant::now() < end,
            "the threshold did not trigger a sample"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lp.stop();
    let events = read_all();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4],
        "one gap-free order from the instance's counter"
    );
    let Some(vmr_proto::pb::event::Payload::Env(s)) = &events[3].payload else {
        panic!("an env sample: {:?}", events[3])
    };
    assert_eq!((s.sensor.as_str(), s.value), ("thermal.acpitz", 61.5));
    assert!(events
        .iter()
        .all(|e| e.epoch == seq.epoch() && e.instance_id == "vm-s-1"));
}
