//! The microVM driver: instances of the built-in KVM microVM (`vmr-vmm`),
//! with their vhost-user disks and NICs attached at launch.
//!
//! Each instance runs in the calling process (the microVM is a library).
//! Besides the devices of its spec it gets the test guest's port device
//! ([`TestPorts`]); guests that do not use those ports never notice it, and
//! the freestanding test guest takes its commands from it ([`MicrovmInstance::ports`]).
//!
//! Snapshots are the microVM's own format (`docs/snapshot-format.md`), full
//! or incremental, plus `devices.json`, which maps the microVM's device ids
//! to the spec's device names so a restore can attach each saved device to
//! the new socket of the same name.

use std::any::Any;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vmr_proto::domain::LifecycleKind;
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::guest_abi::TestPorts;
use vmr_vmm::snapshot::RestoreMemory;
use vmr_vmm::vcpu::VmEvent;
use vmr_vmm::vm::{
    BootSource, PendingSnapshot, RestoreOptions, RunState as VmRunState, Vm, VmConfig,
};

use crate::artifacts::{
    self, Artifact, ArtifactKind, HostInfo, MemoryKind, SnapshotArtifacts, ARTIFACTS_VERSION,
};
use crate::events::{Bus, DriverEvent, Subscription};
use crate::spec::{BootSpec, DebugListen, InstanceSpec};
use crate::{
    Driver, DriverError, EndReason, ExitInfo, Instance, InstanceInfo, RunState, SnapshotOptions,
    StagedSnapshot,
};

/// Driver name.
pub const NAME: &str = "microvm";
/// Version of the files this driver adds to the microVM's snapshot
/// (`devices.json`).
pub const FORMAT: u32 = 1;
const DEVICES_FILE: &str = "devices.json";

/// The microVM driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct MicrovmDriver;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedDevice {
    /// The microVM's id (`virtio-blk0`).
    id: String,
    /// The spec's name (`vda`).
    name: String,
    /// `block` or `net`.
    kind: String,
}

/// Console writer: appends to the console file and fans out to subscribers.
struct ConsoleSink {
    file: std::fs::File,
    bus: Bus<Vec<u8>>,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A console file that cannot be written must not stop the guest;
        // subscribers still get the output.
        if let Err(error) = self.file.write_all(buf) {
            warn!(%error, "console file write failed");
        }
        self.bus.publish(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

struct Shared {
    events: Bus<DriverEvent>,
    console: Bus<Vec<u8>>,
    exit: Mutex<Option<ExitInfo>>,
    exited: Condvar,
    stopping: AtomicBool,
}

impl Shared {
    fn finish(&self, info: ExitInfo) {
        let mut g = self.exit.lock();
        if g.is_none() {
            *g = Some(info);
        }
        self.exited.notify_all();
    }
}

/// A microVM instance.
pub struct MicrovmInstance {
    id: String,
    vm: Mutex<Option<Arc<Vm>>>,
    ports: TestPorts,
    shared: Arc<Shared>,
    devices: Vec<SavedDevice>,
    console_file: PathBuf,
    debug: Option<std::net::SocketAddr>,
    last_snapshot: Mutex<Option<PathBuf>>,
    event_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    debug_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for MicrovmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmInstance")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn check_spec(spec: &InstanceSpec) -> Result<(), DriverError> {
    spec.validate()?;
    if matches!(spec.boot, BootSpec::Disk) {
        return Err(DriverError::Unsupported {
            driver: NAME.into(),
            what: "firmware boot from a disk (give a kernel)".into(),
        });
    }
    if spec.memory_mib > 3 * 1024 {
        return Err(DriverError::spec(
            "memory_mib",
            "the microVM supports at most 3072 MiB",
        ));
    }
    if let Some(DebugListen::Unix(_)) = spec.debug {
        return Err(DriverError::Unsupported {
            driver: NAME.into(),
            what: "a debugger on a unix socket (use 127.0.0.1)".into(),
        });
    }
    Ok(())
}

fn open_console(spec: &InstanceSpec, bus: &Bus<Vec<u8>>) -> Result<ConsoleSink, DriverError> {
    let path = spec.console_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(DriverError::io(path.display().to_string()))?;
    Ok(ConsoleSink {
        file,
        bus: bus.clone(),
    })
}

fn new_shared() -> Arc<Shared> {
    Arc::new(Shared {
        events: Bus::with_history(),
        console: Bus::with_tail(crate::events::CONSOLE_TAIL_CHUNKS),
        exit: Mutex::new(None),
        exited: Condvar::new(),
        stopping: AtomicBool::new(false),
    })
}

/// Republishes the VM's events on the instance's bus, stamped with their
/// time, and records how the guest ended.
fn spawn_event_thread(
    vm: &Vm,
    shared: Arc<Shared>,
) -> Result<std::thread::JoinHandle<()>, DriverError> {
    let rx = vm.events();
    std::thread::Builder::new()
        .name("microvm-events".into())
        .spawn(move || loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(VmEvent::Lifecycle(l)) => {
                    let mut e = DriverEvent::now(l.kind, l.detail.clone());
                    e.lifecycle = l;
                    let terminal = e.is_terminal();
                    let detail = format!("{:?}: {}", e.kind(), e.lifecycle.detail);
                    let reason = if e.kind() == LifecycleKind::Shutdown {
                        EndReason::GuestShutdown
                    } else {
                        EndReason::Crash
                    };
                    shared.events.publish(e);
                    if terminal {
                        shared.finish(ExitInfo {
                            reason,
                            code: None,
                            signal: None,
                            detail,
                        });
                    }
                }
                Ok(VmEvent::Debug(d)) => {
                    let mut e = DriverEvent::now(
                        LifecycleKind::Pause,
                        format!("debugger stop on vCPU {} at {:#x}", d.vcpu, d.pc),
                    );
                    e.lifecycle.regs.clear();
                    shared.events.publish(e);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if shared.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        })
        .map_err(DriverError::io("microVM event thread"))
}

/// Binds the debugger listener (before the guest starts, so a busy port
/// fails the launch before any guest code ran).
fn bind_debugger(listen: &DebugListen) -> Result<(TcpListener, std::net::SocketAddr), DriverError> {
    let DebugListen::Tcp(addr) = listen else {
        return Err(DriverError::spec(
            "debug",
            "the microVM debugger listens on TCP",
        ));
    };
    let what = format!("debugger {addr}");
    let listener = TcpListener::bind(addr).map_err(DriverError::io(what.clone()))?;
    listener
        .set_nonblocking(true)
        .map_err(DriverError::io(what.clone()))?;
    let bound = listener.local_addr().map_err(DriverError::io(what))?;
    Ok((listener, bound))
}

/// Serves one debugger at a time until the instance stops. The thread holds
/// the VM only while a debugger is attached, so stopping the instance is
/// never held up by a waiting listener. A debugger attaches to a paused
/// instance and leaves it paused: its detach resumes vCPU 0 inside the
/// microVM, which is undone here while the VM is paused.
fn spawn_debugger(
    vm: &Arc<Vm>,
    listener: TcpListener,
    shared: &Arc<Shared>,
) -> Result<std::thread::JoinHandle<()>, DriverError> {
    let vm = Arc::downgrade(vm);
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("microvm-gdb".into())
        .spawn(move || loop {
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            let stream = match listener.accept() {
                Ok((stream, peer)) => {
                    info!(%peer, "debugger attached");
                    stream
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(error) => {
                    warn!(%error, "debugger accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if let Err(error) = stream.set_nonblocking(false) {
                warn!(%error, "debugger socket");
                continue;
            }
            let Some(vm) = vm.upgrade() else { return };
            let target = match vmr_vmm::gdb::VmDebugTarget::new(vm.clone()) {
                Ok(t) => t,
                Err(error) => {
                    warn!(%error, "debugger target unavailable");
                    continue;
                }
            };
            match vmr_vmm::gdb::serve_stream(stream, target) {
                Ok(reason) => info!(?reason, "debugger detached"),
                Err(error) => warn!(%error, "debugger session failed"),
            }
            if vm.state() == VmRunState::Paused {
                for v in vm.vcpus() {
                    if let Err(error) = v.pause() {
                        warn!(%error, "cannot pause a vCPU after the debugger detached");
                    }
                }
            }
        })
        .map_err(DriverError::io("microVM debugger thread"))
}

/// What a launched or restored microVM is made of, before it becomes an
/// instance.
struct Parts {
    vm: Vm,
    event_thread: std::thread::JoinHandle<()>,
    debugger: Option<(TcpListener, std::net::SocketAddr)>,
    ports: TestPorts,
    shared: Arc<Shared>,
    devices: Vec<SavedDevice>,
    last_snapshot: Option<PathBuf>,
}

impl MicrovmDriver {
    fn build_instance(spec: &InstanceSpec, parts: Parts) -> Result<MicrovmInstance, DriverError> {
        let Parts {
            vm,
            event_thread,
            debugger,
            ports,
            shared,
            devices,
            last_snapshot,
        } = parts;
        let vm = Arc::new(vm);
        let (debug, debug_thread) = match debugger {
            Some((listener, bound)) => (Some(bound), Some(spawn_debugger(&vm, listener, &shared)?)),
            None => (None, None),
        };
        Ok(MicrovmInstance {
            id: spec.id.clone(),
            vm: Mutex::new(Some(vm)),
            ports,
            shared,
            devices,
            console_file: spec.console_file(),
            debug,
            last_snapshot: Mutex::new(last_snapshot),
            event_thread: Mutex::new(Some(event_thread)),
            debug_thread: Mutex::new(debug_thread),
        })
    }
}

impl Driver for MicrovmDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch(&self, spec: &InstanceSpec) -> Result<Box<dyn Instance>, DriverError> {
        check_spec(spec)?;
        let BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &spec.boot
        else {
            return Err(DriverError::spec("boot", "the microVM boots a kernel"));
        };
        let shared = new_shared();
        let mem_size = u64::from(spec.memory_mib) << 20;
        let mut vm = Vm::new(VmConfig {
            mem_size,
            vcpus: spec.vcpus,
            serial_out: Some(Box::new(open_console(spec, &shared.console)?)),
            dirty_log: true,
            irqchip: true,
        })?;
        let ports = TestPorts::new();
        ports
            .attach(&vm.pio_bus())
            .map_err(|e| DriverError::spec("devices", format!("test ports: {e}")))?;
        let log = Arc::new(
            DirtyLog::new(mem_size)
                .map_err(|e| DriverError::spec("memory_mib", format!("dirty log: {e}")))?,
        );
        let mut saved = Vec::new();
        let attach = |kind: DeviceKind, socket: &Path, mac: [u8; 6]| {
            devices::attach(
                &vm,
                VirtioSpec {
                    kind,
                    socket: socket.to_path_buf(),
                    local_config: kind.local_config(0, mac),
                },
                Some(log.clone()),
            )
        };
        for (i, d) in spec.disks.iter().enumerate() {
            let dev = attach(DeviceKind::Block, &d.socket, [0; 6]).map_err(|e| {
                DriverError::spec(
                    format!("disks[{i}]"),
                    format!("{}: {e}", d.socket.display()),
                )
            })?;
            saved.push(SavedDevice {
                id: vmr_vmm::vm::SnapshotDevice::id(dev.as_ref()),
                name: d.name.clone(),
                kind: "block".into(),
            });
        }
        for (i, n) in spec.nics.iter().enumerate() {
            let dev =
                attach(DeviceKind::Net, &n.socket, n.mac.0).map_err(|e| DriverError::Device {
                    device: format!("nics[{i}] ({})", n.name),
                    reason: format!("{}: {}", n.socket.display(), crate::error::chain(&e)),
                })?;
            saved.push(SavedDevice {
                id: vmr_vmm::vm::SnapshotDevice::id(dev.as_ref()),
                name: n.name.clone(),
                kind: "net".into(),
            });
        }
        vm.load(&BootSource::Auto {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: cmdline.clone(),
        })?;
        let debugger = spec.debug.as_ref().map(bind_debugger).transpose()?;
        // Subscribe before the vCPUs start, so the boot event is seen.
        let event_thread = spawn_event_thread(&vm, shared.clone())?;
        vm.start()?;
        info!(instance = %spec.id, memory_mib = spec.memory_mib, devices = saved.len(), "microVM launched");
        let inst = Self::build_instance(
            spec,
            Parts {
                vm,
                event_thread,
                debugger,
                ports,
                shared,
                devices: saved,
                last_snapshot: None,
            },
        )?;
        Ok(Box::new(inst))
    }

    fn restore(
        &self,
        spec: &InstanceSpec,
        snapshot_dir: &Path,
    ) -> Result<Box<dyn Instance>, DriverError> {
        check_spec(spec)?;
        let arts = SnapshotArtifacts::load(snapshot_dir, NAME)?;
        let dev_art = arts.get("devices")?;
        let devices: Vec<SavedDevice> =
            serde_json::from_slice(&std::fs::read(snapshot_dir.join(&dev_art.file)).map_err(
                |e| DriverError::Artifact {
                    artifact: "devices".into(),
                    reason: e.to_string(),
                },
            )?)
            .map_err(|e| DriverError::Artifact {
                artifact: "devices".into(),
                reason: format!("malformed: {e}"),
            })?;
        let socket_of = |name: &str| -> Option<PathBuf> {
            spec.disks
                .iter()
                .find(|d| d.name == name)
                .map(|d| d.socket.clone())
                .or_else(|| {
                    spec.nics
                        .iter()
                        .find(|n| n.name == name)
                        .map(|n| n.socket.clone())
                })
        };
        for d in &devices {
            if socket_of(&d.name).is_none() {
                return Err(DriverError::spec(
                    "devices",
                    format!(
                        "the snapshot has a {} device {:?}; the spec must attach one of that name",
                        d.kind, d.name
                    ),
                ));
            }
        }
        let shared = new_shared();
        let (vm, states) = Vm::restore(
            snapshot_dir,
            RestoreOptions {
                memory: if devices.is_empty() {
                    RestoreMemory::PrivateLazy
                } else {
                    // Lazy (userfaultfd + vhost-user postcopy); eager copy
                    // with VMR_RESTORE_MEMORY=copy.
                    RestoreMemory::shared_default()
                },
                serial_out: Some(Box::new(open_console(spec, &shared.console)?)),
                dirty_log: true,
            },
        )
        .map_err(|e| match e {
            vmr_vmm::vm::VmError::Snapshot(e) => DriverError::Artifact {
                artifact: "memory/state".into(),
                reason: e.to_string(),
            },
            other => DriverError::Vmm(other),
        })?;
        let ports = TestPorts::new();
        ports
            .attach(&vm.pio_bus())
            .map_err(|e| DriverError::spec("devices", format!("test ports: {e}")))?;
        let log = Arc::new(
            DirtyLog::new(vm.memory().size())
                .map_err(|e| DriverError::spec("memory_mib", format!("dirty log: {e}")))?,
        );
        let by_id = |id: &str| devices.iter().find(|d| d.id == id).map(|d| d.name.clone());
        let restored = devices::restore(
            &vm,
            &states,
            |id, _| {
                by_id(id)
                    .and_then(|n| socket_of(&n))
                    .unwrap_or_else(|| PathBuf::from("/nonexistent"))
            },
            Some(log),
        )
        .map_err(|e| DriverError::Device {
            device: "restored devices".into(),
            reason: crate::error::chain(&e),
        })?;
        info!(instance = %spec.id, snapshot = %snapshot_dir.display(), devices = restored.len(), "microVM restored (paused)");
        let debugger = spec.debug.as_ref().map(bind_debugger).transpose()?;
        let event_thread = spawn_event_thread(&vm, shared.clone())?;
        let inst = Self::build_instance(
            spec,
            Parts {
                vm,
                event_thread,
                debugger,
                ports,
                shared,
                devices,
                last_snapshot: Some(snapshot_dir.to_path_buf()),
            },
        )?;
        Ok(Box::new(inst))
    }
}

impl MicrovmInstance {
    fn vm(&self) -> Result<Arc<Vm>, DriverError> {
        self.vm
            .lock()
            .clone()
            .ok_or_else(|| DriverError::Gone(self.exit_detail()))
    }

    fn exit_detail(&self) -> String {
        self.shared
            .exit
            .lock()
            .as_ref()
            .map(|e| e.detail.clone())
            .unwrap_or_else(|| "stopped".into())
    }

    /// The test guest's port device (command queue, values, done words).
    pub fn ports(&self) -> &TestPorts {
        &self.ports
    }

    /// The microVM, while the instance has not been stopped.
    pub fn vmm(&self) -> Option<Arc<Vm>> {
        self.vm.lock().clone()
    }

    fn run_state(&self) -> RunState {
        let reason = self.shared.exit.lock().as_ref().map(|e| e.reason);
        match (reason, self.vm.lock().is_some()) {
            (Some(EndReason::Crash), true) => return RunState::Crashed,
            (Some(_), _) | (None, false) => return RunState::Exited,
            (None, true) => {}
        }
        match self.vm.lock().as_ref().map(|v| v.state()) {
            None => RunState::Exited,
            Some(VmRunState::Created) => RunState::Created,
            Some(VmRunState::Running) => RunState::Running,
            Some(VmRunState::Paused) => RunState::Paused,
        }
    }

    /// `devices.json`'s artifact entry and body.
    fn devices_artifact(&self) -> Result<(Artifact, Vec<u8>), DriverError> {
        let body = serde_json::to_vec_pretty(&self.devices).map_err(|e| DriverError::Artifact {
            artifact: "devices".into(),
            reason: e.to_string(),
        })?;
        Ok((
            Artifact {
                name: "devices".into(),
                kind: ArtifactKind::State,
                file: DEVICES_FILE.into(),
                size: body.len() as u64,
            },
            body,
        ))
    }
}

/// The files the microVM wrote into a snapshot directory, as artifacts.
fn list_vmm_files(dir: &Path) -> Result<Vec<Artifact>, DriverError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(DriverError::io(dir.display().to_string()))?;
    for entry in rd {
        let entry = entry.map_err(DriverError::io(dir.display().to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == artifacts::ARTIFACTS_FILE || name == DEVICES_FILE || name.ends_with(".tmp") {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(DriverError::io(entry.path().display().to_string()))?;
        if !meta.is_file() {
            continue;
        }
        let kind = if name.starts_with("mem") {
            ArtifactKind::Memory
        } else {
            ArtifactKind::State
        };
        let stem = name.split('.').next().unwrap_or(&name).to_string();
        out.push(Artifact {
            name: stem,
            kind,
            file: name,
            size: meta.len(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The directory `target` named relative to the directory `from`
/// (`../0001` for siblings), so a chain of snapshot directories can move.
fn relative_to(from: &Path, target: &Path) -> String {
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (from, target) = (abs(from), abs(target));
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c.as_os_str());
    }
    rel.display().to_string()
}

/// A microVM snapshot written under staging names, not yet durable.
struct MicrovmStaged<'a> {
    inst: &'a MicrovmInstance,
    vm: Arc<Vm>,
    pending: PendingSnapshot,
    dir: PathBuf,
    memory: MemoryKind,
    parent: Option<PathBuf>,
    pause: Option<Duration>,
    taken_at_ns: u64,
}

impl StagedSnapshot for MicrovmStaged<'_> {
    fn complete(
        self: Box<Self>,
        pause: Option<Duration>,
    ) -> Result<SnapshotArtifacts, DriverError> {
        let MicrovmStaged {
            inst,
            vm,
            pending,
            dir,
            memory,
            parent,
            pause: own_pause,
            taken_at_ns,
        } = *self;
        let started = Instant::now();
        vm.complete_snapshot(pending)?;
        // The microVM's chain moved on: the next incremental snapshot's
        // parent is this one, whether or not the driver's files below are
        // written.
        *inst.last_snapshot.lock() = Some(dir.clone());
        let mut files = list_vmm_files(&dir)?;
        let (devices, devices_body) = inst.devices_artifact()?;
        files.push(devices);
        let pause = pause.or(own_pause);
        let arts = SnapshotArtifacts {
            version: ARTIFACTS_VERSION,
            driver: NAME.into(),
            driver_format: FORMAT,
            instance: inst.id.clone(),
            memory,
            parent: parent.as_deref().map(|p| relative_to(&dir, p)),
            artifacts: files,
            pause: pause.map(|p| Duration::from_micros(p.as_micros() as u64)),
            taken_at_ns,
            host: HostInfo::current(),
        };
        let arts_body = serde_json::to_vec_pretty(&arts).map_err(|e| DriverError::Artifact {
            artifact: artifacts::ARTIFACTS_FILE.into(),
            reason: e.to_string(),
        })?;
        write_durable_pair(
            &dir,
            [
                (DEVICES_FILE, &devices_body[..]),
                (artifacts::ARTIFACTS_FILE, &arts_body[..]),
            ],
        )?;
        info!(
            instance = %inst.id,
            dir = %dir.display(),
            bytes = arts.total_bytes(),
            pause_us = pause.map(|p| p.as_micros() as u64),
            durable_us = started.elapsed().as_micros() as u64,
            "microVM snapshot"
        );
        Ok(arts)
    }
}

/// Writes two small files into `dir` durably: both under temporary names,
/// `fdatasync`'d from two threads, renamed (the second last), then one
/// fsync of `dir`.
fn write_durable_pair(dir: &Path, files: [(&str, &[u8]); 2]) -> Result<(), DriverError> {
    let write = |name: &str, body: &[u8]| -> Result<(), DriverError> {
        use std::io::Write;
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f =
            std::fs::File::create(&tmp).map_err(DriverError::io(tmp.display().to_string()))?;
        f.write_all(body)
            .and_then(|_| f.sync_data())
            .map_err(DriverError::io(tmp.display().to_string()))
    };
    let [(a, ab), (b, bb)] = files;
    std::thread::scope(|s| {
        let h = s.spawn(|| write(a, ab));
        let rb = write(b, bb);
        let ra = h.join().unwrap_or_else(|_| {
            Err(DriverError::Artifact {
                artifact: a.into(),
                reason: "the writing thread panicked".into(),
            })
        });
        ra.and(rb)
    })?;
    for name in [a, b] {
        let (tmp, path) = (dir.join(format!("{name}.tmp")), dir.join(name));
        std::fs::rename(&tmp, &path).map_err(DriverError::io(path.display().to_string()))?;
    }
    artifacts::sync_dir(dir)
}

impl Instance for MicrovmInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn pause(&self) -> Result<(), DriverError> {
        Ok(self.vm()?.pause()?)
    }

    fn resume(&self) -> Result<(), DriverError> {
        Ok(self.vm()?.resume()?)
    }

    fn stop(&self, _grace: Duration) -> Result<ExitInfo, DriverError> {
        // The microVM has no guest power button: stopping ends the vCPU
        // threads (joined when the VM is dropped) and disconnects the
        // devices.
        self.shared.stopping.store(true, Ordering::SeqCst);
        let vm = self.vm.lock().take();
        if let Some(vm) = vm {
            if vm.state() == VmRunState::Running {
                let _ = vm.pause();
            }
            drop(vm);
        }
        if self.shared.exit.lock().is_none() {
            self.shared.events.publish(DriverEvent::now(
                LifecycleKind::Shutdown,
                "stopped by the driver",
            ));
            self.shared.finish(ExitInfo {
                reason: EndReason::Stopped,
                code: None,
                signal: None,
                detail: "stopped by the driver".into(),
            });
        }
        for t in [
            self.event_thread.lock().take(),
            self.debug_thread.lock().take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = t.join();
        }
        Ok(self.shared.exit.lock().clone().unwrap_or(ExitInfo {
            reason: EndReason::Stopped,
            code: None,
            signal: None,
            detail: "stopped".into(),
        }))
    }

    fn wait(&self, timeout: Duration) -> Result<ExitInfo, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.exit.lock();
        while g.is_none() {
            if self.shared.exited.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.clone().ok_or_else(|| DriverError::Timeout {
            what: format!("instance {} to exit", self.id),
            after: timeout,
        })
    }

    fn query(&self) -> Result<InstanceInfo, DriverError> {
        Ok(InstanceInfo {
            id: self.id.clone(),
            driver: NAME,
            state: self.run_state(),
            accel: Some(("kvm".into(), "the microVM always runs on KVM".into())),
            pid: Some(std::process::id()),
            console_file: self.console_file.clone(),
            debugger: self.debugger(),
            exit: self.shared.exit.lock().clone(),
        })
    }

    fn subscribe(&self) -> Subscription<DriverEvent> {
        self.shared.events.subscribe()
    }

    fn console(&self) -> Subscription<Vec<u8>> {
        self.shared.console.subscribe()
    }

    fn snapshot(
        &self,
        dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<SnapshotArtifacts, DriverError> {
        self.snapshot_staged(dir, opts)?.complete(None)
    }

    /// The microVM writes memory and state while paused (copies into the
    /// page cache) and syncs them in [`StagedSnapshot::complete`], so a
    /// running instance is resumed before the flush.
    fn snapshot_staged<'a>(
        &'a self,
        dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<Box<dyn StagedSnapshot + 'a>, DriverError> {
        let vm = self.vm()?;
        let empty = std::fs::read_dir(dir)
            .map_err(DriverError::io(dir.display().to_string()))?
            .next()
            .is_none();
        if !empty {
            return Err(DriverError::spec(
                "snapshot dir",
                format!("{} is not empty", dir.display()),
            ));
        }
        let parent = match opts.memory {
            MemoryKind::Full => None,
            MemoryKind::Incremental => Some(self.last_snapshot.lock().clone().ok_or_else(
                || DriverError::State {
                    operation: "an incremental snapshot".into(),
                    state: "without a previous snapshot".into(),
                    needs: "a full snapshot first".into(),
                },
            )?),
        };
        let was_running = vm.state() == VmRunState::Running;
        let started = Instant::now();
        if was_running {
            vm.pause()?;
        }
        let (taken_at_ns, _) = crate::events::now_ns();
        let kind = match opts.memory {
            MemoryKind::Full => vmr_vmm::snapshot::MemoryKind::Full,
            MemoryKind::Incremental => vmr_vmm::snapshot::MemoryKind::Incremental,
        };
        let result = vm.snapshot_staged(dir, kind);
        let pause = if was_running {
            let resumed = vm.resume();
            let p = started.elapsed();
            resumed?;
            Some(p)
        } else {
            None
        };
        let pending = result?;
        Ok(Box::new(MicrovmStaged {
            inst: self,
            vm,
            pending,
            dir: dir.to_path_buf(),
            memory: opts.memory,
            parent,
            pause,
            taken_at_ns,
        }))
    }

    fn debugger(&self) -> Option<DebugListen> {
        self.debug.map(DebugListen::Tcp)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for MicrovmInstance {
    fn drop(&mut self) {
        let _ = Instance::stop(self, Duration::ZERO);
    }
}
