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
//!
//! A snapshot is QEMU's own migration stream (`vmstate`), taken with the
//! guest stopped; a restore starts a new QEMU with `-incoming defer` on the
//! devices of the spec it is given and loads the stream into it.

pub mod accel;
pub mod cmdline;
pub mod instance;
pub mod migration;
pub mod qmp;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use instance::{QemuInstance, NAME};

use crate::artifacts::ArtifactKind;
use crate::{DebugListen, Driver, DriverError, Instance, InstanceSpec, SnapshotArtifacts};
use cmdline::{Layout, Start};

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
/// unix socket removed.
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

impl QemuDriver {
    /// Starts QEMU for `spec` with its vCPUs stopped.
    fn start(
        &self,
        spec: &InstanceSpec,
        start: Start,
        restored_from: Option<String>,
    ) -> Result<QemuInstance, DriverError> {
        cmdline::validate(spec)?;
        let bin = binary(spec)?;
        let program = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_BINARY.into());
        let accel = accel::choose(spec.qemu.accel);
        let debugger = spec.debug.as_ref().map(resolve_debug).transpose()?;
        let layout = Layout::new(spec);
        remove_stale(&layout.qmp)?;
        remove_stale(&layout.serial)?;
        let args = cmdline::args(spec, &layout, accel.accel, debugger.as_ref(), start);
        let stderr = std::fs::File::create(&layout.stderr)
            .map_err(DriverError::io(layout.stderr.display().to_string()))?;
        let stdout = stderr
            .try_clone()
            .map_err(DriverError::io(layout.stderr.display().to_string()))?;
        let mut cmd = Command::new(&bin);
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
            accel,
            debugger,
            restored_from,
            child,
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
        let source = snapshot_dir.join(&a.file);
        let inst = self.start(
            spec,
            Start::Incoming,
            Some(snapshot_dir.display().to_string()),
        )?;
        inst.load_snapshot(&source, instance::MIGRATION_TIMEOUT)?;
        tracing::info!(instance = %spec.id, snapshot = %snapshot_dir.display(), "restored, paused");
        Ok(Box::new(inst))
    }
}
