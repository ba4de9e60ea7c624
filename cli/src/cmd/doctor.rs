//! `vmr doctor`: checks the host and the configured services and says what
//! to fix.
//!
//! Checks, in order: `kvm` (present, and whether it runs guest kernel code at
//! speed, from the microVM's probe, cached per kernel release like the QEMU
//! driver caches it), `qemu`, `broker`, `registry`, `object-store`, `disk`.
//! Each ends `ok`, `warn` (works, with a limit) or `fail`. The command exits 5
//! when a required check fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::output::{Out, Table};
use crate::util;

/// Arguments of `vmr doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Seconds to wait for each service.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub timeout: u64,
}

/// Free space below which the disk check fails.
pub const DISK_FAIL_BYTES: u64 = 1 << 30;
/// Free space below which the disk check warns.
pub const DISK_WARN_BYTES: u64 = 5 << 30;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix,
    }
}

/// What the KVM check found.
#[derive(Debug, Clone)]
struct Kvm {
    present: bool,
    usable: bool,
    linux_at_speed: Option<bool>,
    verdict: Option<String>,
    probe_source: Option<&'static str>,
    accelerator: &'static str,
}

fn kvm_check() -> (Check, Kvm) {
    let dev = Path::new("/dev/kvm");
    let mut k = Kvm {
        present: dev.exists(),
        usable: false,
        linux_at_speed: None,
        verdict: None,
        probe_source: None,
        accelerator: "tcg",
    };
    if !k.present {
        let c = check(
            "kvm",
            Status::Warn,
            "/dev/kvm does not exist: QEMU/TCG will be used, and the microVM driver cannot run",
            Some("enable KVM (load kvm_intel or kvm_amd, or enable nested virtualisation) for hardware speed".into()),
        );
        return (c, k);
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        let c = check(
            "kvm",
            Status::Warn,
            format!("/dev/kvm exists but cannot be opened ({e}): QEMU/TCG will be used"),
            Some("add yourself to the kvm group or run as root".into()),
        );
        return (c, k);
    }
    k.usable = true;
    let cached = cache_file_exists();
    match vmr_hypervisor::qemu::accel::host_verdict() {
        Ok(v) => {
            k.linux_at_speed = Some(v.linux_bootable);
            k.verdict = Some(v.verdict.clone());
            k.probe_source = Some(if cached { "cache" } else { "probe" });
            if v.linux_bootable {
                k.accelerator = "kvm";
                (
                    check(
                        "kvm",
                        Status::Ok,
                        format!("KVM is present and runs guest kernel code at speed ({}): QEMU will use KVM", v.verdict),
                        None,
                    ),
                    k,
                )
            } else {
                (
                    check(
                        "kvm",
                        Status::Warn,
                        format!(
                            "KVM is present but cannot run Linux at speed ({}): QEMU/TCG will be used for Linux guests; \
                             the microVM runs only small freestanding guests here",
                            v.verdict
                        ),
                        Some("for KVM speed use a host with hardware-assisted (non-nested or properly nested) KVM".into()),
                    ),
                    k,
                )
            }
        }
        Err(e) => (
            check(
                "kvm",
                Status::Warn,
                format!("KVM is present but the probe failed ({e}): QEMU/TCG will be used"),
                Some("run `vmm probe --json` to see why the probe guest does not run".into()),
            ),
            k,
        ),
    }
}

/// Whether the QEMU driver's probe cache
/// (`<cache>/kvm-probe-<kernel release>.json`) already holds a verdict.
fn cache_file_exists() -> bool {
    let release: String = vmr_hypervisor::qemu::accel::kernel_release()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    vmr_hypervisor::qemu::accel::cache_dir()
        .map(|d| d.join(format!("kvm-probe-{release}.json")).is_file())
        .unwrap_or(false)
}

fn qemu_check(timeout: Duration) -> (Check, Option<String>) {
    let bin = std::env::var("VMR_QEMU")
        .unwrap_or_else(|_| vmr_hypervisor::qemu::DEFAULT_BINARY.to_string());
    let fix = Some("install QEMU (apt-get install qemu-system-x86) or set $VMR_QEMU".to_string());
    match util::run_bounded(Command::new(&bin).arg("--version"), timeout) {
        Ok(c) if c.success => {
            let first = c.stdout.lines().next().unwrap_or("").trim().to_string();
            (
                check("qemu", Status::Ok, format!("{bin}: {first}"), None),
                Some(first),
            )
        }
        Ok(c) => (
            check(
                "qemu",
                Status::Fail,
                format!("{bin} --version exited {}: {}", c.status, c.stderr.trim()),
                fix,
            ),
            None,
        ),
        Err(e) => (
            check("qemu", Status::Fail, format!("cannot run {bin}: {e}"), fix),
            None,
        ),
    }
}

fn broker_check(cfg: &Config, timeout: Duration) -> Check {
    let bs = &cfg.endpoints.bootstrap_servers;
    let consumer = match crate::kafka::consumer(bs, &cfg.endpoints.kafka_security) {
        Ok(c) => c,
        Err(e) => return check("broker", Status::Fail, e.message, e.hint),
    };
    let topics = match crate::kafka::topics(&consumer, bs, timeout) {
        Ok(t) => t,
        Err(e) => return check("broker", Status::Fail, e.message, e.hint),
    };
    let want = cfg.endpoints.event_partitions;
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for spec in vmr_proto::topics::topic_specs(want) {
        match topics.get(spec.name) {
            None => missing.push(spec.name),
            Some(&n) => {
                let expect = spec.partitions.unwrap_or(want);
                if n != expect {
                    wrong.push(format!(
                        "{} has {n} partitions, expected {expect}",
                        spec.name
                    ));
                }
            }
        }
    }
    if !missing.is_empty() {
        return check(
            "broker",
            Status::Fail,
            format!(
                "broker {bs} answers but lacks topics: {}",
                missing.join(", ")
            ),
            Some(
                "create them with `vmr stack up` (local stack) or as listed in docs/kafka.md"
                    .into(),
            ),
        );
    }
    if !wrong.is_empty() {
        return check(
            "broker",
            Status::Fail,
            format!("broker {bs}: {}", wrong.join("; ")),
            Some(
                "set event-partitions (VMR_EVENT_PARTITIONS) to the cluster's partition count"
                    .into(),
            ),
        );
    }
    check(
        "broker",
        Status::Ok,
        format!("broker {bs} answers; every vmr topic exists ({want} partitions per event topic)"),
        None,
    )
}

fn registry_check(cfg: &Config, timeout: Duration) -> Check {
    let url = &cfg.endpoints.registry_url;
    let fix = Some(
        "start the local stack with `vmr stack up`, or point --registry-url / VMR_REGISTRY_URL at a running registry"
            .to_string(),
    );
    match util::http_get(url, "/subjects", timeout) {
        Ok((200, body)) => match serde_json::from_str::<Vec<String>>(&body) {
            Ok(subjects) => {
                let missing: Vec<_> = vmr_proto::topics::EVENT_TOPICS
                    .iter()
                    .map(|t| format!("{t}-value"))
                    .filter(|s| !subjects.contains(s))
                    .collect();
                if missing.is_empty() {
                    check(
                        "registry",
                        Status::Ok,
                        format!("registry {url} answers; the event schemas are registered"),
                        None,
                    )
                } else {
                    check(
                        "registry",
                        Status::Warn,
                        format!(
                            "registry {url} answers but lacks subjects: {} (producers register them on first use)",
                            missing.join(", ")
                        ),
                        Some(format!("register them: schema-registry register --registry {url}")),
                    )
                }
            }
            Err(e) => check(
                "registry",
                Status::Fail,
                format!("registry {url}: GET /subjects is not a list of subjects: {e}"),
                fix,
            ),
        },
        Ok((code, body)) => check(
            "registry",
            Status::Fail,
            format!(
                "registry {url}: GET /subjects answered HTTP {code}: {}",
                body.trim()
            ),
            fix,
        ),
        Err(e) => check(
            "registry",
            Status::Fail,
            format!("registry {url}: {e}"),
            fix,
        ),
    }
}

fn object_store_check(cfg: &Config, timeout: Duration) -> Check {
    let url = &cfg.endpoints.object_store_url;
    if let Some(path) = url.strip_prefix("file://") {
        let dir = PathBuf::from(path);
        let fix = Some(format!(
            "create {} writable by you, or set VMR_OBJECT_STORE_URL (for example file://$HOME/.local/share/vmreplay/objects)",
            dir.display()
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return check(
                "object-store",
                Status::Fail,
                format!("{url}: cannot create {}: {e}", dir.display()),
                fix,
            );
        }
        let probe = dir.join(format!(".vmr-doctor-{}", std::process::id()));
        return match std::fs::write(&probe, b"vmr doctor") {
            Ok(()) => {
                let _ = std::fs::remove_file(&probe);
                check(
                    "object-store",
                    Status::Ok,
                    format!("{url} is writable"),
                    None,
                )
            }
            Err(e) => check(
                "object-store",
                Status::Fail,
                format!("{url}: cannot write in {}: {e}", dir.display()),
                fix,
            ),
        };
    }
    // s3://bucket/prefix: the endpoint comes from the environment, as the
    // snapshot library reads it.
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .ok();
    let Some(ep) = endpoint else {
        return check(
            "object-store",
            Status::Warn,
            format!(
                "{url}: no AWS_ENDPOINT / AWS_ENDPOINT_URL set, so reachability was not checked"
            ),
            Some("set AWS_ENDPOINT for an S3-compatible server to have it checked".into()),
        );
    };
    let hostport = ep
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let hostport = if hostport.contains(':') {
        hostport
    } else if ep.starts_with("http://") {
        format!("{hostport}:80")
    } else {
        format!("{hostport}:443")
    };
    match util::connect(&hostport, timeout) {
        Ok(_) => check(
            "object-store",
            Status::Ok,
            format!("{url}: endpoint {ep} accepts connections (credentials not checked)"),
            None,
        ),
        Err(e) => check(
            "object-store",
            Status::Fail,
            format!("{url}: endpoint {ep}: {e}"),
            Some("start the S3 server or fix AWS_ENDPOINT".into()),
        ),
    }
}

fn disk_check(cfg: &Config) -> (Check, Option<(u64, u64, PathBuf)>) {
    match util::disk_space(&cfg.data_dir) {
        Ok((free, total, at)) => {
            let detail = format!(
                "{} free of {} under {} (data directory {})",
                util::human_bytes(free),
                util::human_bytes(total),
                at.display(),
                cfg.data_dir.display()
            );
            let fix = Some(
                "free disk space or move the data directory (--data-dir, VMR_DATA_DIR)".to_string(),
            );
            let status = if free < DISK_FAIL_BYTES {
                Status::Fail
            } else if free < DISK_WARN_BYTES {
                Status::Warn
            } else {
                Status::Ok
            };
            let fix = if status == Status::Ok { None } else { fix };
            (check("disk", status, detail, fix), Some((free, total, at)))
        }
        Err(e) => (check("disk", Status::Fail, e, None), None),
    }
}

/// Runs every check and prints the report.
pub fn run(cfg: &Config, a: &DoctorArgs, out: &Out) -> CliResult {
    let timeout = Duration::from_secs(a.timeout.max(1));
    out.progress("checking KVM (the probe may take a few seconds on first use)...");
    let (kvm, k) = kvm_check();
    let (qemu, qemu_version) = qemu_check(timeout);
    out.progress("checking the services...");
    let broker = broker_check(cfg, timeout);
    let registry = registry_check(cfg, timeout);
    let store = object_store_check(cfg, timeout);
    let (disk, space) = disk_check(cfg);
    let checks = [kvm, qemu, broker, registry, store, disk];
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name)
        .collect();
    let accelerator = if k.accelerator == "kvm" { "kvm" } else { "tcg" };
    let verdict = if k.linux_at_speed == Some(true) {
        "KVM runs Linux at speed: QEMU will use KVM".to_string()
    } else if k.present {
        "KVM is present but cannot run Linux at speed: QEMU/TCG will be used".to_string()
    } else {
        "KVM is not present: QEMU/TCG will be used".to_string()
    };
    if out.json {
        let checks_json: Vec<Value> = checks
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "status": c.status.as_str(),
                    "detail": c.detail,
                    "fix": c.fix,
                })
            })
            .collect();
        out.json_doc(&json!({
            "ok": failed.is_empty(),
            "verdict": verdict,
            "kvm": {
                "present": k.present,
                "usable": k.usable,
                "linux_at_speed": k.linux_at_speed,
                "probe_verdict": k.verdict,
                "probe_source": k.probe_source,
            },
            "accelerator": accelerator,
            "qemu_version": qemu_version,
            "disk": space.map(|(free, total, at)| json!({
                "path": at, "free_bytes": free, "total_bytes": total
            })),
            "checks": checks_json,
            "failed": failed,
        }));
    } else {
        let mut t = Table::new(&["CHECK", "STATUS", "DETAIL"]);
        for c in &checks {
            t.row(vec![
                c.name.into(),
                c.status.as_str().into(),
                c.detail.clone(),
            ]);
        }
        t.print();
        let fixes: Vec<_> = checks
            .iter()
            .filter_map(|c| c.fix.as_ref().map(|f| format!("  {}: {f}", c.name)))
            .collect();
        if !fixes.is_empty() {
            crate::output::println_safe("\nto fix:");
            for f in fixes {
                crate::output::println_safe(&f);
            }
        }
        crate::output::println_safe(&format!("\nverdict: {verdict}"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(
            CliError::precondition(format!("required checks failed: {}", failed.join(", ")))
                .hint("see the fixes above"),
        )
    }
}
