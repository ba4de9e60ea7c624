//! vmreplay's snapshot library: a driver's snapshot directory to an object
//! store and back, with a manifest that names every object with its sha256
//! and size.
//!
//! The capture agent runs the upload side, the replayer the restore side;
//! neither depends on the other.
//!
//! - [`store`]: open a store by URL: `file:///path` (the default kind,
//!   fsync'd) or `s3://bucket/prefix` (endpoint, region and credentials
//!   from [`StoreConfig`] or the environment).
//! - [`upload`]: stream a snapshot's objects into the store with a sha256
//!   and size each, with progress reports, then write `manifest.json` last.
//! - [`manifest`]: the manifest, its JSON and protobuf forms and its digest.
//! - [`publish`]: publish a manifest to the compacted `vmr.snapshots.v1`.
//! - [`restore`]: list and select snapshots (by id, latest, latest at or
//!   before a time), check the host, verify and materialise a snapshot and
//!   its base chain into a directory for `Driver::restore`.
//! - [`retention`]: which snapshots a keep-N / time-window policy with
//!   pins keeps, and deleting one without removing objects others use.
//!
//! Layout and formats: `docs/snapshots.md`.

pub mod image;
pub mod manifest;
pub mod publish;
pub mod restore;
pub mod retention;
pub mod store;
pub mod upload;

pub use manifest::{
    DiskLayer, Manifest, ManifestError, ObjectEntry, ObjectKind, PartitionOffset, MANIFEST_FILE,
    MANIFEST_VERSION,
};
pub use publish::{decode_value, encode_value, publish, PublishError, Published};
pub use restore::{
    check_host, list, load_manifest, materialize, select, LayerPath, Materialized, RestoreError,
    RestoreOptions, Selector,
};
pub use retention::{sweep_unfinished, Policy, RetentionError};
pub use store::{S3Config, SnapshotStore, StoreConfig, StoreError};
pub use upload::{
    no_progress, progress_watch, upload, DiskLayerFile, Progress, UploadError, UploadRequest,
};
