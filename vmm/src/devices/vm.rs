//! Virtio devices in a [`Vm`]: attach a vhost-user-backed device (window and
//! GSI from the VM's allocator, mapped on its MMIO bus, registered for pause,
//! resume and snapshots) and bring saved devices back in a restored VM.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::info;

use super::dirty_log::DirtyLog;
use super::mmio::{
    DeviceKind, MmioDeviceConfig, MmioDeviceState, MmioError, VirtioMmioDevice, VmResources,
};
use super::vhost_user::SharedRegion;
use crate::bus::BusError;
use crate::snapshot::DeviceState;
use crate::vm::{SnapshotDevice, Vm};

/// Prefix of the snapshot ids of virtio devices.
pub const ID_PREFIX: &str = "virtio-";

/// Errors attaching or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioVmError {
    /// The device failed.
    #[error("virtio device {id}")]
    Device {
        /// Device id.
        id: String,
        /// Cause.
        #[source]
        source: MmioError,
    },
    /// The device could not be mapped.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Guest memory is a private mapping a backend cannot share.
    #[error("guest memory is not shareable; create the VM with shared memory (restore with RestoreMemory::SharedLazy or SharedCopy)")]
    MemoryNotShared,
    /// A saved state could not be decoded.
    #[error("saved state of {id} is not a virtio-mmio state")]
    BadState {
        /// Device id.
        id: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What to attach.
#[derive(Debug, Clone)]
pub struct VirtioSpec {
    /// Device kind.
    pub kind: DeviceKind,
    /// Backend socket.
    pub socket: PathBuf,
    /// Config space to serve when the backend does not serve `GET_CONFIG`
    /// (see [`DeviceKind::local_config`]).
    pub local_config: Vec<u8>,
}

/// The VM-facing side of one device: its id and the hooks the VM calls
/// around snapshots.
pub struct VirtioSnapshotDevice {
    id: String,
    dev: Arc<Mutex<VirtioMmioDevice>>,
    log: Option<Arc<DirtyLog>>,
}

impl std::fmt::Debug for VirtioSnapshotDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSnapshotDevice")
            .field("id", &self.id)
            .finish()
    }
}

impl VirtioSnapshotDevice {
    /// The device.
    pub fn device(&self) -> &Arc<Mutex<VirtioMmioDevice>> {
        &self.dev
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VirtioMmioDevice> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SnapshotDevice for VirtioSnapshotDevice {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn pause(&self) -> Result<(), String> {
        self.lock().pause().map_err(|e| e.to_string())
    }

    fn resume(&self) -> Result<(), String> {
        self.lock().resume().map_err(|e| e.to_string())
    }

    fn save_state(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.lock().save()).map_err(|e| e.to_string())
    }

    fn take_dirty(&self) -> Option<Vec<u64>> {
        let dev = self.lock();
        if !dev.is_activated() {
            // A device that never ran has not written guest memory.
            return Some(Vec::new());
        }
        match (&self.log, dev.is_logging()) {
            (Some(log), true) => Some(log.drain()),
            _ => None,
        }
    }
}

/// The resources a device gets from `vm`.
pub fn vm_resources(vm: &Vm, log: Option<Arc<DirtyLog>>) -> Result<VmResources, VirtioVmError> {
    let regions = vm
        .memory()
        .shared_regions()
        .ok_or(VirtioVmError::MemoryNotShared)?
        .into_iter()
        .map(SharedRegion::from)
        .collect();
    Ok(VmResources {
        vm: Some(vm.vm_fd()),
        irqchip: vm.has_irqchip(),
        regions,
        dirty_log: log,
        lazy: vm.memory().lazy().cloned(),
    })
}

fn id_for(kind: DeviceKind, slot: u64) -> String {
    let k = match kind {
        DeviceKind::Block => "blk",
        DeviceKind::Net => "net",
    };
    format!("{ID_PREFIX}{k}{slot}")
}

fn register(
    vm: &Vm,
    id: String,
    dev: VirtioMmioDevice,
    log: Option<Arc<DirtyLog>>,
) -> Result<Arc<VirtioSnapshotDevice>, VirtioVmError> {
    let base = dev.mmio_base();
    let dev = Arc::new(Mutex::new(dev));
    vm.mmio_bus()
        .insert(base, super::VIRTIO_MMIO_SIZE, dev.clone())?;
    let handle = Arc::new(VirtioSnapshotDevice { id, dev, log });
    vm.add_snapshot_device(handle.clone());
    Ok(handle)
}

/// Attaches a device to `vm` (before it starts): takes the next window and
/// GSI, connects to the backend, maps the device and registers it for
/// snapshots. With `log`, backends that support it record the pages they
/// write there, so incremental snapshots include them.
pub fn attach(
    vm: &Vm,
    spec: VirtioSpec,
    log: Option<Arc<DirtyLog>>,
) -> Result<Arc<VirtioSnapshotDevice>, VirtioVmError> {
    let res = vm_resources(vm, log.clone())?;
    let info = vm.allocate_device(match spec.kind {
        DeviceKind::Block => "virtio-blk",
        DeviceKind::Net => "virtio-net",
    });
    let slot = (info.mmio_base - super::VIRTIO_MMIO_BASE) / super::VIRTIO_MMIO_SIZE;
    let id = id_for(spec.kind, slot);
    let dev = VirtioMmioDevice::new(
        MmioDeviceConfig {
            kind: spec.kind,
            socket: spec.socket,
            mmio_base: info.mmio_base,
            gsi: info.gsi,
            local_config: spec.local_config,
        },
        res,
    )
    .map_err(|source| VirtioVmError::Device {
        id: id.clone(),
        source,
    })?;
    info!(%id, base = format_args!("{:#x}", info.mmio_base), gsi = info.gsi, "virtio device attached");
    register(vm, id, dev, log)
}

/// Restores the virtio devices among `states` (those with an id starting
/// with [`ID_PREFIX`]) into the restored, still paused `vm`, each connected
/// to the backend `socket_for(id, kind)` names. Other states are ignored.
pub fn restore(
    vm: &Vm,
    states: &[DeviceState],
    socket_for: impl Fn(&str, DeviceKind) -> PathBuf,
    log: Option<Arc<DirtyLog>>,
) -> Result<Vec<Arc<VirtioSnapshotDevice>>, VirtioVmError> {
    let mut todo = Vec::new();
    for s in states.iter().filter(|s| s.id.starts_with(ID_PREFIX)) {
        let state: MmioDeviceState =
            serde_json::from_slice(&s.state).map_err(|source| VirtioVmError::BadState {
                id: s.id.clone(),
                source,
            })?;
        let socket = socket_for(&s.id, state.kind);
        let res = vm_resources(vm, log.clone())?;
        todo.push((s.id.clone(), state, socket, res));
    }
    // Each device's vhost-user handshake is a series of round trips with its
    // own backend process: the devices reconnect side by side, so restoring
    // a clone waits for the slowest backend, not for all of them in turn.
    let restored: Vec<Result<(String, VirtioMmioDevice), VirtioVmError>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> =
                todo.into_iter()
                    .map(|(id, state, socket, res)| {
                        scope.spawn(move || {
                            let dev = VirtioMmioDevice::restore(&socket, res, &state).map_err(
                                |source| VirtioVmError::Device {
                                    id: id.clone(),
                                    source,
                                },
                            )?;
                            info!(id = %id, socket = %socket.display(), "virtio device restored");
                            Ok((id, dev))
                        })
                    })
                    .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    let mut out = Vec::new();
    for r in restored {
        let (id, dev) = r?;
        out.push(register(vm, id, dev, log.clone())?);
    }
    Ok(out)
}
