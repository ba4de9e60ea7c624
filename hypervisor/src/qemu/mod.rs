//! The QEMU driver: one QEMU process per instance, driven over QMP.
//!
//! - [`cmdline`]: the command line (q35, shared memfd memory, vhost-user
//!   disks and NICs, console, gdbstub).
//! - [`qmp`]: the QMP client (greeting, capabilities, commands with ids,
//!   events, timeouts).
//! - [`accel`]: `kvm`, `tcg` or `auto` (KVM only where the host runs guest
//!   kernel code at speed).
//! - [`instance`]: lifecycle events, console fan-out, snapshot, exit.
//! - [`migration`]: snapshots as migration streams in a file.
//! - [`persist`]: `qemu.json`, how the machine behind a stream was built.
//!
//! A snapshot is QEMU's own migration stream (`vmstate`), taken with the
//! guest stopped, plus `qemu.json` (machine type, accelerator, CPU model,
//! QEMU version, devices with their PCI slots and MACs, extra devices). A
//! restore starts a new QEMU built from `qemu.json` with `-incoming defer`,
//! on the devices of the spec it is given (matched by name; a spec whose
//! devices differ from the snapshot's is refused), and loads the stream
//! into it. A snapshot taken under KVM restores only on a host whose CPU
//! model (`artifacts.json`'s `host.cpu_model`) is the same, since `-cpu
//! host` hands the host CPU's features to the guest; a TCG snapshot's
//! `-cpu max` does not depend on the host.
//!
//! Every path is made absolute before QEMU starts (QEMU runs in the
//! instance's work directory).

pub mod accel;
pub mod cmdline;
pub mod instance;
pub mod migration;
pub mod persist;
pub mod qmp;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use instance::{QemuInstance, NAME};

use crate::artifacts::{ArtifactKind, HostInfo};
use crate::{Accel, DebugListen, Driver, DriverError, Instance, InstanceSpec, SnapshotArtifacts};
use accel::AccelChoice;
use cmdline::{Layout, Start};
use persist::MachineRecord;

/// How often a launch whose debugger asked for port 0 is retried when the
/// port picked turned out taken by the time QEMU bound it.
pub const DEBUG_PORT_ATTEMPTS: u32 = 3;

/// The QEMU binary looked up on `PATH` when neither the spec nor
/// `$VMR_QEMU` names one.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// The QEMU driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuDriver;

/// The QEMU binary for `spec`: `spec.qemu.binary`, else `$VMR_QEMU`, else
/// `qemu-system-x86_64` on `PATH`.
pub fn binary(spec: &InstanceSpec) -> Result<PathBuf, DriverError> {
    let hint = "install qemu-system-x86 (scripts/setup.sh does), or name the binary in \
                qemu.binary or $VMR_QEMU";
    let explicit = spec
        .qemu
        .binary
        .clone()
        .or_else(|| std::env::var_os("VMR_QEMU").map(PathBuf::from));
    let path = match explicit {
        Some(p) => p,
        None => {
            let found = std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(DEFAULT_BINARY))
                    .find(|p| p.is_file())
            });
            found.ok_or_else(|| DriverError::MissingProgram {
                program: DEFAULT_BINARY.into(),
                path: PathBuf::from("$PATH"),
                hint: hint.into(),
            })?
        }
    };
    if !path.is_file() {
        return Err(DriverError::MissingProgram {
            program: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| DEFAULT_BINARY.into()),
            path,
            hint: hint.into(),
        });
    }
    Ok(path)
}

/// The debugger endpoint with port 0 replaced by a free port, and a stale
/// unix socket removed. The port is free when picked; another process may
/// take it before QEMU binds it, so [`QemuDriver`] retries such a launch
/// (up to [`DEBUG_PORT_ATTEMPTS`] times) with a newly picked port.
fn resolve_debug(d: &DebugListen) -> Result<DebugListen, DriverError> {
    d.validate()?;
    match d {
        DebugListen::Tcp(addr) if addr.port() == 0 => {
            let l = TcpListener::bind(addr).map_err(DriverError::io(format!(
                "finding a free port for the debugger on {}",
                addr.ip()
            )))?;
            let real = l
                .local_addr()
                .map_err(DriverError::io("the debugger's free port"))?;
            Ok(DebugListen::Tcp(real))
        }
        DebugListen::Unix(p) => {
            remove_stale(p)?;
            Ok(d.clone())
        }
        other => Ok(other.clone()),
    }
}

fn remove_stale(p: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::Io {
            what: format!("removing the stale socket {}", p.display()),
            source: e,
        }),
    }
}

/// Whether `e` is QEMU failing to bind a listening socket because the
/// address is taken.
pub fn is_bind_failure(e: &DriverError) -> bool {
    matches!(e, DriverError::Exited { stderr, .. } if stderr.contains("Address already in use"))
}

/// The accelerator a restore uses: the snapshot's, which the spec may
/// leave to `auto` or name, but not contradict.
fn restore_accel(spec: &InstanceSpec, rec: &MachineRecord) -> Result<AccelChoice, DriverError> {
    let accel: &'static str = if rec.accel == "kvm" { "kvm" } else { "tcg" };
    let asked = match spec.qemu.accel {
        Accel::Kvm => Some("kvm"),
        Accel::Tcg => Some("tcg"),
        Accel::Auto => None,
    };
    if let Some(a) = asked.filter(|a| *a != accel) {
        return Err(DriverError::spec(
            "qemu.accel",
            format!("{a}, but the snapshot was taken under {accel} and restores only under it"),
        ));
    }
    if accel == "kvm" && !Path::new("/dev/kvm").exists() {
        return Err(DriverError::Unsupported {
            driver: NAME.into(),
            what: "restoring a KVM snapshot on a host without /dev/kvm".into(),
        });
    }
    Ok(AccelChoice {
        accel,
        reason: format!("restore: the snapshot was taken under {accel}"),
    })
}

impl QemuDriver {
    /// Starts QEMU for `spec` with its vCPUs stopped: a fresh machine, or
    /// the one `restored` (snapshot directory and record) describes.
    fn start(
        &self,
        spec: &InstanceSpec,
        start: Start,
        restored: Option<(String, MachineRecord)>,
    ) -> Result<QemuInstance, DriverError> {
        cmdline::validate(spec)?;
        let spec = &cmdline::absolute_spec(spec)?;
        let bin = binary(spec)?;
        let (accel, machine, restored_from) = match restored {
            None => {
                let accel = accel::choose(spec.qemu.accel);
                let machine = MachineRecord::for_launch(spec, accel.accel);
                (accel, machine, None)
            }
            Some((dir, rec)) => {
                rec.check_spec(spec)?;
                (restore_accel(spec, &rec)?, rec, Some(dir))
            }
        };
        let port0 = matches!(&spec.debug, Some(DebugListen::Tcp(a)) if a.port() == 0);
        let attempts = if port0 { DEBUG_PORT_ATTEMPTS } else { 1 };
        let mut attempt = 1;
        loop {
            let r = self.spawn(spec, &bin, start, &accel, &machine, restored_from.clone());
            match r {
                Err(e) if attempt < attempts && is_bind_failure(&e) => {
                    tracing::warn!(instance = %spec.id, attempt, error = %e,
                        "the debugger port was taken before QEMU bound it; retrying with another");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Starts one QEMU process for the absolute `spec`.
    fn spawn(
        &self,
        spec: &InstanceSpec,
        bin: &Path,
        start: Start,
        accel: &AccelChoice,
        machine: &MachineRecord,
        restored_from: Option<String>,
    ) -> Result<QemuInstance, DriverError> {
        let program = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_BINARY.into());
        let debugger = spec.debug.as_ref().map(resolve_debug).transpose()?;
        let layout = Layout::new(spec);
        remove_stale(&layout.qmp)?;
        remove_stale(&layout.serial)?;
        let args = cmdline::args(spec, &layout, machine, debugger.as_ref(), start);
        let stderr = std::fs::File::create(&layout.stderr)
            .map_err(DriverError::io(layout.stderr.display().to_string()))?;
        let stdout = stderr
            .try_clone()
            .map_err(DriverError::io(layout.stderr.display().to_string()))?;
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .current_dir(&spec.work_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so that stopping it also stops the
            // helpers it starts (exec: migrations).
            .process_group(0);
        tracing::info!(instance = %spec.id, binary = %bin.display(), ?args, "starting QEMU");
        let child = cmd.spawn().map_err(|source| DriverError::Spawn {
            program: bin.display().to_string(),
            source,
        })?;
        QemuInstance::attach(instance::Launch {
            id: spec.id.clone(),
            program,
            layout,
            accel: accel.clone(),
            machine: machine.clone(),
            debugger,
            restored_from,
            child: instance::Proc::Child(child),
        })
    }

    /// Re-attaches to the QEMU of `spec` that an earlier process launched
    /// and that still runs: process `pid`, started at `start_time` (clock
    /// ticks since boot, see [`crate::process`]), with the accelerator
    /// `accel` (`kvm` or `tcg`) and the debugger endpoint `debugger` it was
    /// started with. Connects QMP and the console again and takes the run
    /// state from QEMU. QEMU keeps running if this fails; a pid that is
    /// another process now is refused and never signalled. The instance's
    /// exit status cannot be known (it is no child of this process).
    pub fn reattach(
        &self,
        spec: &InstanceSpec,
        pid: u32,
        start_time: u64,
        accel: &str,
        debugger: Option<DebugListen>,
    ) -> Result<QemuInstance, DriverError> {
        cmdline::validate(spec)?;
        let spec = &cmdline::absolute_spec(spec)?;
        let proc = crate::process::Pidfd::adopt(pid, start_time)
            .map_err(|e| DriverError::Gone(format!("the QEMU of {}: {e}", spec.id)))?;
        let accel: &'static str = if accel == "kvm" { "kvm" } else { "tcg" };
        let program = binary(spec)
            .ok()
            .and_then(|b| b.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| DEFAULT_BINARY.into());
        QemuInstance::attach(instance::Launch {
            id: spec.id.clone(),
            program,
            layout: Layout::new(spec),
            accel: AccelChoice {
                accel,
                reason: format!("re-attached; {accel} as recorded at launch"),
            },
            machine: MachineRecord::for_launch(spec, accel),
            debugger,
            restored_from: None,
            child: instance::Proc::Adopted(proc),
        })
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch(&self, spec: &InstanceSpec) -> Result<Box<dyn Instance>, DriverError> {
        let inst = self.start(spec, Start::Boot, None)?;
        inst.start_guest()?;
        Ok(Box::new(inst))
    }

    fn restore(
        &self,
        spec: &InstanceSpec,
        snapshot_dir: &Path,
    ) -> Result<Box<dyn Instance>, DriverError> {
        let snapshot_dir = &cmdline::absolutize(snapshot_dir)?;
        let arts = SnapshotArtifacts::load(snapshot_dir, NAME)?;
        let a = arts.get(instance::VMSTATE)?;
        if a.kind != ArtifactKind::MigrationStream {
            return Err(DriverError::Artifact {
                artifact: a.name.clone(),
                reason: format!("is a {:?} artifact, not a QEMU migration stream", a.kind),
            });
        }
        if arts.driver_format != instance::DRIVER_FORMAT {
            return Err(DriverError::Artifact {
                artifact: crate::artifacts::ARTIFACTS_FILE.into(),
                reason: format!(
                    "QEMU driver format {} is not supported (this build reads {})",
                    arts.driver_format,
                    instance::DRIVER_FORMAT
                ),
            });
        }
        let m = arts.get(instance::MACHINE)?;
        if m.kind != ArtifactKind::State || m.file != persist::MACHINE_FILE {
            return Err(DriverError::Artifact {
                artifact: m.name.clone(),
                reason: format!(
                    "is a {:?} artifact in {:?}, not the machine record {}",
                    m.kind,
                    m.file,
                    persist::MACHINE_FILE
                ),
            });
        }
        let rec = MachineRecord::load(snapshot_dir)?;
        if rec.accel == "kvm" {
            let here = HostInfo::current();
            if here.cpu_model != arts.host.cpu_model {
                return Err(DriverError::Unsupported {
                    driver: NAME.into(),
                    what: format!(
                        "restoring a KVM snapshot taken on a {:?} CPU on this host's {:?} CPU \
                         (-cpu host gives the guest the host CPU's features; restore it on a \
                         host with the same CPU model)",
                        arts.host.cpu_model, here.cpu_model
                    ),
                });
            }
        }
        let source = snapshot_dir.join(&a.file);
        let inst = self.start(
            spec,
            Start::Incoming,
            Some((snapshot_dir.display().to_string(), rec)),
        )?;
        inst.load_snapshot(&source, instance::MIGRATION_TIMEOUT)?;
        tracing::info!(instance = %spec.id, snapshot = %snapshot_dir.display(), "restored, paused");
        Ok(Box::new(inst))
    }
}
