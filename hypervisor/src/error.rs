//! The driver layer's error type.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong driving an instance.
///
/// Every variant names its cause; callers map them to service status codes
/// with [`DriverError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No driver of that name.
    #[error("unknown driver {0:?} (known: qemu, microvm)")]
    UnknownDriver(String),
    /// The machine image manifest or a file it names is bad.
    #[error("image {image}: {field}: {reason}")]
    Image {
        /// Image directory.
        image: PathBuf,
        /// The offending field (`boot.kernel`, `nics[0].mac`, ...).
        field: String,
        /// Why it is bad.
        reason: String,
    },
    /// The instance spec is inconsistent or asks for what the driver cannot do.
    #[error("invalid instance spec: {field}: {reason}")]
    Spec {
        /// The offending field.
        field: String,
        /// Why it is bad.
        reason: String,
    },
    /// A program the driver needs is missing.
    #[error("{program} not found at {path}: {hint}")]
    MissingProgram {
        /// Program name.
        program: String,
        /// Where it was looked for.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// The hypervisor process could not be started.
    #[error("starting {program}")]
    Spawn {
        /// Program name.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor process exited while the driver waited for it.
    #[error("{program} exited ({status}) while {while_doing}; stderr: {stderr}")]
    Exited {
        /// Program name.
        program: String,
        /// Exit status as text.
        status: String,
        /// What the driver was doing.
        while_doing: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The control channel (QMP) broke or spoke nonsense.
    #[error("control channel: {0}")]
    Protocol(String),
    /// The hypervisor refused a command.
    #[error("command {command} failed: {reason}")]
    Command {
        /// The command.
        command: String,
        /// The hypervisor's reason.
        reason: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What the driver waited for.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// The operation needs another run state.
    #[error("instance is {state}; {operation} needs it {needs}")]
    State {
        /// The operation.
        operation: String,
        /// Current state.
        state: String,
        /// Required state.
        needs: String,
    },
    /// The instance has exited.
    #[error("instance has exited: {0}")]
    Gone(String),
    /// A snapshot artifact is missing, truncated or does not match.
    #[error("snapshot artifact {artifact}: {reason}")]
    Artifact {
        /// Artifact name.
        artifact: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The driver does not support the operation.
    #[error("the {driver} driver does not support {what}")]
    Unsupported {
        /// Driver name.
        driver: String,
        /// The operation.
        what: String,
    },
    /// A device's backend could not be reached or failed.
    #[error("device {device}: {reason}")]
    Device {
        /// The device (`disks[0] (vda)`).
        device: String,
        /// What went wrong.
        reason: String,
    },
    /// The microVM failed.
    #[error("microVM")]
    Vmm(#[source] vmr_vmm::vm::VmError),
    /// I/O on a named path or object.
    #[error("i/o on {what}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Coarse classes of [`DriverError`], for mapping to service status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was bad (spec, image, unknown driver).
    InvalidArgument,
    /// The host lacks a program or capability.
    FailedPrecondition,
    /// The hypervisor went away or did not answer in time.
    Unavailable,
    /// Stored state is corrupt or missing.
    DataLoss,
    /// Anything else.
    Internal,
}

impl DriverError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DriverError::UnknownDriver(_)
            | DriverError::Image { .. }
            | DriverError::Spec { .. } => ErrorKind::InvalidArgument,
            DriverError::MissingProgram { .. }
            | DriverError::State { .. }
            | DriverError::Unsupported { .. } => ErrorKind::FailedPrecondition,
            DriverError::Exited { .. }
            | DriverError::Device { .. }
            | DriverError::Protocol(_)
            | DriverError::Timeout { .. }
            | DriverError::Gone(_) => ErrorKind::Unavailable,
            DriverError::Artifact { .. } => ErrorKind::DataLoss,
            DriverError::Vmm(
                vmr_vmm::vm::VmError::NoKvm(_)
                | vmr_vmm::vm::VmError::MissingCap(_)
                | vmr_vmm::vm::VmError::State { .. }
                | vmr_vmm::vm::VmError::Config(_),
            ) => ErrorKind::FailedPrecondition,
            DriverError::Spawn { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                ErrorKind::FailedPrecondition
            }
            DriverError::Spawn { .. }
            | DriverError::Command { .. }
            | DriverError::Vmm(_)
            | DriverError::Io { .. } => ErrorKind::Internal,
        }
    }

    /// A closure that wraps an `io::Error` with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let what = what.into();
        move |source| DriverError::Io { what, source }
    }

    /// A spec error.
    pub fn spec(field: impl Into<String>, reason: impl Into<String>) -> DriverError {
        DriverError::Spec {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<vmr_vmm::vm::VmError> for DriverError {
    fn from(e: vmr_vmm::vm::VmError) -> Self {
        DriverError::Vmm(e)
    }
}

/// `e` and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
