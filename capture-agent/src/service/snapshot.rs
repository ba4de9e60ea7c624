//! The seam between the gRPC service and the agent's snapshot engine.
//!
//! The service's snapshot RPCs (`TakeSnapshot`, `GetOperation`,
//! `WatchOperation`, `ListSnapshots`, `PinSnapshot`, `DeleteSnapshot`) call
//! a [`SnapshotControl`]. The agent is started with one implementation, or
//! with none, in which case those RPCs answer `UNIMPLEMENTED` with
//! [`NOT_CONFIGURED`].
//!
//! Methods are synchronous. `take` must return as soon as the operation is
//! started (the work runs on the engine's own threads) and publish its
//! progress through the [`tokio::sync::watch`] channel that `watch` hands
//! out; `watch::Sender::send` works from any thread. The other methods may
//! block on I/O (object store, Kafka): the service calls them on a blocking
//! thread, never on the async runtime's workers.

use std::sync::Arc;

use vmr_proto::{pb, InstanceId};

use crate::instance::RecordedInstance;

/// The message of `UNIMPLEMENTED` answers when no engine is configured.
pub const NOT_CONFIGURED: &str =
    "snapshots are not available: this agent runs without a snapshot engine";

/// Errors of a snapshot engine; each maps to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotControlError {
    /// Unknown operation, instance or snapshot (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// A malformed request (`INVALID_ARGUMENT`); `field` names the request
    /// field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The instance or snapshot is in the wrong state, for example
    /// deleting a pinned snapshot (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency is down: object store, broker (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

/// What to snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// Only the memory pages dirtied since the last snapshot.
    pub incremental: bool,
    /// Exempt the snapshot from retention.
    pub pin: bool,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationState {
    /// Accepted, not started.
    Pending,
    /// Running (see [`OperationStatus::stage`]).
    Running,
    /// Finished; the manifest is set.
    Succeeded,
    /// Finished; the error is set.
    Failed,
}

impl OperationState {
    /// Whether the operation finished.
    pub fn is_done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// One snapshot operation at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationStatus {
    /// Unique per agent.
    pub id: String,
    /// The instance being snapshotted.
    pub instance: InstanceId,
    /// Where it stands.
    pub state: OperationState,
    /// The current step (`pausing`, `cut`, `uploading`, `manifest`).
    pub stage: String,
    /// Bytes done in the current step (0 when unknown).
    pub bytes_done: u64,
    /// Bytes in the current step (0 when unknown).
    pub bytes_total: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The manifest written, once it succeeded (the full wire manifest,
    /// as vmr-snapshot publishes it on `vmr.snapshots.v1`).
    pub manifest: Option<pb::SnapshotManifest>,
    /// Start time, ns since the Unix epoch.
    pub started_ns: u64,
    /// End time, ns since the Unix epoch (0 while running).
    pub finished_ns: u64,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotEntry {
    /// Its manifest.
    pub manifest: pb::SnapshotManifest,
    /// Exempt from retention.
    pub pinned: bool,
}

/// The agent's snapshot engine, as the gRPC service uses it.
pub trait SnapshotControl: Send + Sync {
    /// Starts a snapshot of `instance` (running or paused; the service
    /// refuses instances in other states before it calls this) and returns
    /// the new operation at once.
    fn take(
        &self,
        instance: Arc<RecordedInstance>,
        request: SnapshotRequest,
    ) -> Result<OperationStatus, SnapshotControlError>;

    /// The operation `id` now.
    fn operation(&self, id: &str) -> Result<OperationStatus, SnapshotControlError>;

    /// A channel holding the operation's latest status; it is updated on
    /// each change and the last value sent has `state.is_done()`.
    fn watch(
        &self,
        id: &str,
    ) -> Result<tokio::sync::watch::Receiver<OperationStatus>, SnapshotControlError>;

    /// Snapshots of `instance`, newest first (an instance the engine never
    /// saw has none).
    fn list(&self, instance: &InstanceId) -> Result<Vec<SnapshotEntry>, SnapshotControlError>;

    /// Pins (`pinned`) or unpins a snapshot; returns it.
    fn pin(
        &self,
        instance: &InstanceId,
        snapshot_id: &str,
        pinned: bool,
    ) -> Result<SnapshotEntry, SnapshotControlError>;

    /// Deletes a snapshot's objects and manifest.
    fn delete(&self, instance: &InstanceId, snapshot_id: &str) -> Result<(), SnapshotControlError>;

    /// `instance` was launched from `spec`; an engine may start its
    /// scheduled snapshots here. The default does nothing.
    fn launched(&self, _instance: Arc<RecordedInstance>, _spec: &pb::InstanceSpec) {}

    /// The instance named `instance` is about to stop; its scheduled
    /// snapshots end here. The default does nothing.
    fn stopping(&self, _instance: &str) {}
}

impl From<SnapshotControlError> for tonic::Status {
    fn from(e: SnapshotControlError) -> Self {
        let msg = e.to_string();
        match e {
            SnapshotControlError::NotFound(_) => tonic::Status::not_found(msg),
            SnapshotControlError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            SnapshotControlError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapshotControlError::Unavailable(_) => tonic::Status::unavailable(msg),
            SnapshotControlError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<OperationState> for pb::OperationState {
    fn from(s: OperationState) -> Self {
        match s {
            OperationState::Pending => pb::OperationState::Pending,
            OperationState::Running => pb::OperationState::Running,
            OperationState::Succeeded => pb::OperationState::Succeeded,
            OperationState::Failed => pb::OperationState::Failed,
        }
    }
}

impl From<OperationStatus> for pb::Operation {
    fn from(o: OperationStatus) -> Self {
        pb::Operation {
            id: o.id,
            instance_id: o.instance.to_string(),
            state: pb::OperationState::from(o.state) as i32,
            stage: o.stage,
            bytes_done: o.bytes_done,
            bytes_total: o.bytes_total,
            done: o.state.is_done(),
            error: o.error.unwrap_or_default(),
            manifest: o.manifest,
            started_ns: o.started_ns,
            finished_ns: o.finished_ns,
        }
    }
}

impl From<SnapshotEntry> for pb::SnapshotInfo {
    fn from(e: SnapshotEntry) -> Self {
        pb::SnapshotInfo {
            manifest: Some(e.manifest),
            pinned: e.pinned,
        }
    }
}
