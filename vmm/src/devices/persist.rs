//! Snapshot state of the virtio-mmio transport through the VMM's
//! [`Persist`] trait (`save` → serde state → `restore` into a new VM).

use std::path::PathBuf;

use super::mmio::{MmioDeviceState, MmioError, VirtioMmioDevice, VmResources};
pub use crate::snapshot::Persist;

/// What a virtio-mmio device needs to come back in a new VM.
#[derive(Debug, Clone)]
pub struct MmioConstructorArgs {
    /// Socket of the (new) backend.
    pub socket: PathBuf,
    /// The new VM's resources.
    pub res: VmResources,
}

impl Persist for VirtioMmioDevice {
    type State = MmioDeviceState;
    type ConstructorArgs = MmioConstructorArgs;
    type Error = MmioError;

    fn save(&self) -> MmioDeviceState {
        VirtioMmioDevice::save(self)
    }

    fn restore(args: MmioConstructorArgs, state: &MmioDeviceState) -> Result<Self, MmioError> {
        VirtioMmioDevice::restore(&args.socket, args.res, state)
    }
}
