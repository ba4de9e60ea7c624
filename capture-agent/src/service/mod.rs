//! The agent's gRPC service (`vmr.v1.CaptureAgent`) and what it needs.
//!
//! - [`snapshot`]: the [`SnapshotControl`] trait the snapshot engine
//!   implements for the snapshot RPCs.

pub mod snapshot;

pub use snapshot::{
    OperationState, OperationStatus, SnapshotControl, SnapshotControlError, SnapshotEntry,
    SnapshotRequest,
};
