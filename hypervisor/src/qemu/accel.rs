//! Choosing QEMU's accelerator.
//!
//! `kvm` and `tcg` are taken as asked. `auto` uses KVM only where the
//! microVM's probe ([`vmr_vmm::probe::run`]) measured that this host runs
//! guest kernel-mode code at speed; nested, software-assisted KVM (where
//! Linux does not boot in reasonable time) gets TCG. The probe runs at most
//! once per process, and its verdict is cached on disk per host kernel
//! release (`kvm-probe-<release>.json` in [`cache_dir`]), since the answer
//! only changes with the host. A restore does not choose: it uses the
//! accelerator the snapshot was taken under (see [`super::persist`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Accel;

/// How long the probe guest may run.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The accelerator chosen for one instance and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    /// Why.
    pub reason: String,
}

/// A probe verdict as cached on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVerdict {
    /// The host kernel release the probe ran on.
    pub kernel_release: String,
    /// Whether a Linux guest runs at speed under KVM.
    pub linux_bootable: bool,
    /// The probe's explanation.
    pub verdict: String,
}

/// Resolves `accel` for this host.
pub fn choose(accel: Accel) -> AccelChoice {
    match accel {
        Accel::Kvm => AccelChoice {
            accel: "kvm",
            reason: "asked for kvm".into(),
        },
        Accel::Tcg => AccelChoice {
            accel: "tcg",
            reason: "asked for tcg".into(),
        },
        Accel::Auto => {
            let choice = auto();
            tracing::info!(accel = choice.accel, reason = %choice.reason, "accelerator chosen");
            choice
        }
    }
}

fn auto() -> AccelChoice {
    if !Path::new("/dev/kvm").exists() {
        return AccelChoice {
            accel: "tcg",
            reason: "auto: /dev/kvm does not exist".into(),
        };
    }
    match host_verdict() {
        Ok(v) if v.linux_bootable => AccelChoice {
            accel: "kvm",
            reason: format!(
                "auto: the KVM probe says Linux runs at speed ({})",
                v.verdict
            ),
        },
        Ok(v) => AccelChoice {
            accel: "tcg",
            reason: format!(
                "auto: the KVM probe says Linux does not run at speed under KVM here ({})",
                v.verdict
            ),
        },
        Err(e) => AccelChoice {
            accel: "tcg",
            reason: format!("auto: the KVM probe failed ({e})"),
        },
    }
}

/// The probe's verdict for this host: from this process's earlier run, from
/// the on-disk cache, or measured now (once per process).
pub fn host_verdict() -> Result<KvmVerdict, String> {
    static VERDICT: OnceLock<Result<KvmVerdict, String>> = OnceLock::new();
    VERDICT
        .get_or_init(|| {
            let release = kernel_release();
            let cache = cache_file(&release);
            if let Some(v) = cache.as_deref().and_then(read_cache) {
                if v.kernel_release == release {
                    tracing::debug!(file = ?cache, "KVM probe verdict from the cache");
                    return Ok(v);
                }
            }
            let report = vmr_vmm::probe::run(PROBE_TIMEOUT).map_err(|e| e.to_string())?;
            let v = KvmVerdict {
                kernel_release: release,
                linux_bootable: report.linux_bootable,
                verdict: report.verdict,
            };
            if let Some(path) = cache {
                if let Err(e) = write_cache(&path, &v) {
                    tracing::warn!(file = %path.display(), error = %e, "could not cache the KVM probe verdict");
                }
            }
            Ok(v)
        })
        .clone()
}

/// The host kernel release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// vmreplay's cache directory: `$VMR_CACHE`, else `~/.cache/vmreplay`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VMR_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("vmreplay"))
}

fn cache_file(release: &str) -> Option<PathBuf> {
    let safe: String = release
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache_dir().map(|d| d.join(format!("kvm-probe-{safe}.json")))
}

fn read_cache(path: &Path) -> Option<KvmVerdict> {
    let body = std::fs::read(path).ok()?;
    serde_json::from_slice(&body).ok()
}

fn write_cache(path: &Path, v: &KvmVerdict) -> Result<(), crate::DriverError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(crate::DriverError::io(dir.display().to_string()))?;
    }
    let body = serde_json::to_vec_pretty(v).expect("a verdict always serializes");
    crate::artifacts::write_durable(path, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_choices_are_kept_and_the_cache_round_trips() {
        assert_eq!(choose(Accel::Kvm).accel, "kvm");
        assert_eq!(choose(Accel::Tcg).accel, "tcg");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub").join("kvm-probe-x.json");
        let v = KvmVerdict {
            kernel_release: "6.1.0".into(),
            linux_bootable: false,
            verdict: "slow".into(),
        };
        write_cache(&p, &v).unwrap();
        assert_eq!(read_cache(&p), Some(v));
        std::fs::write(&p, b"{").unwrap();
        assert_eq!(read_cache(&p), None);
        assert!(cache_file("6.1.0-1/amd64")
            .unwrap()
            .ends_with("kvm-probe-6.1.0-1_amd64.json"));
    }
}
