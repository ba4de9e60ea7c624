//! The restore side: list and select an instance's snapshots, then verify
//! and materialise one into a local directory laid out the way the driver's
//! `restore` expects.
//!
//! Materialising `<dest>` for snapshot `S` of a chain `B0 <- B1 <- S`:
//!
//! ```text
//! <dest>/B0/...          base links (incremental memory), so "../B0" resolves
//! <dest>/B1/...
//! <dest>/S/...           the snapshot directory to give Driver::restore
//! <dest>/disks/<device>/<device>.<n>   disk layers, position 0 first
//! ```
//!
//! Every object is downloaded to a `.partial` file, its size and sha256
//! checked against the manifest, and only then renamed into place; a
//! mismatch is an error that names the object.

use std::path::{Path as FsPath, PathBuf};

use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::warn;
use vmr_hypervisor::artifacts::{HostInfo, SnapshotArtifacts};
use vmr_hypervisor::{DriverError, MemoryKind};

use crate::manifest::{
    hex, is_segment, Manifest, ManifestError, ObjectEntry, ObjectKind, MANIFEST_FILE, MAX_CHAIN,
};
use crate::store::SnapshotStore;

/// Directory of the disk layers inside a materialised snapshot.
pub const DISKS_DIR: &str = "disks";

/// Errors selecting or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No such snapshot (or no manifest for it: an upload never finished).
    #[error("no snapshot {what} of instance {instance} in the store")]
    NotFound {
        /// The instance.
        instance: String,
        /// The snapshot asked for.
        what: String,
    },
    /// The manifest is unreadable, damaged or invalid.
    #[error("snapshot {snapshot}: {source}")]
    Manifest {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// An object is missing, damaged or of the wrong size.
    #[error("object {object} ({kind}) {reason}")]
    Object {
        /// `<instance>/<key>`.
        object: String,
        /// What it holds.
        kind: ObjectKind,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot was taken on a host this one may not be compatible with.
    #[error("snapshot {snapshot} was taken on a host with {theirs}; this host has {ours}. A guest restored onto another CPU model or TSC frequency may fail or misbehave; set RestoreOptions::allow_host_mismatch to restore anyway")]
    HostMismatch {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// The recording host.
        theirs: String,
        /// This host.
        ours: String,
    },
    /// The chain of base snapshots is inconsistent.
    #[error("snapshot {snapshot}: {reason}")]
    Chain {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// What is wrong.
        reason: String,
    },
    /// The destination directory cannot be used.
    #[error("cannot use {path}: {reason}")]
    Dest {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error("reading {what} from the store failed")]
    Store {
        /// What was read.
        what: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// The materialised directory does not satisfy the driver's layout.
    #[error("materialised snapshot {snapshot} is not what the driver expects")]
    Layout {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// The driver layer's complaint.
        #[source]
        source: DriverError,
    },
}

/// Which snapshot of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The snapshot with this id.
    Id(String),
    /// The one with the latest cut.
    Latest,
    /// The latest whose cut is at or before this wall-clock time (ns since
    /// the Unix epoch).
    AtOrBefore(u64),
}

/// Options for [`materialize`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore even when the recording host's CPU model or TSC frequency
    /// differs from this host's.
    pub allow_host_mismatch: bool,
    /// The host to check against; `None` means this host
    /// ([`HostInfo::current`]).
    pub host: Option<HostInfo>,
}

/// A materialised disk layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPath {
    /// Disk device name.
    pub device: String,
    /// Position in its chain (0 lies on the machine image).
    pub position: u32,
    /// The local file.
    pub path: PathBuf,
}

/// A snapshot verified and materialised into a local directory.
#[derive(Debug, Clone)]
pub struct Materialized {
    /// The directory to pass to `Driver::restore`.
    pub snapshot_dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The ids of the snapshots materialised, the oldest base first and
    /// this one last.
    pub chain: Vec<String>,
    /// The disk layers, by device, position 0 first.
    pub disk_layers: Vec<LayerPath>,
    /// Bytes downloaded and verified.
    pub bytes: u64,
}

/// Reads and checks `<instance>/<snapshot_id>/manifest.json`.
pub async fn load_manifest(
    store: &SnapshotStore,
    instance: &str,
    snapshot_id: &str,
) -> Result<Manifest, RestoreError> {
    let snapshot = format!("{instance}/{snapshot_id}");
    if !is_segment(instance) || !is_segment(snapshot_id) {
        return Err(RestoreError::NotFound {
            instance: instance.into(),
            what: format!("{snapshot_id:?} (not a valid id)"),
        });
    }
    let loc = store.location(instance, &format!("{snapshot_id}/{MANIFEST_FILE}"));
    let body = match store.inner.get(&loc).await {
        Ok(r) => r.bytes().await,
        Err(e) => Err(e),
    };
    let body = match body {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(RestoreError::NotFound {
                instance: instance.into(),
                what: snapshot_id.into(),
            })
        }
        Err(source) => {
            return Err(RestoreError::Store {
                what: format!("{snapshot}/{MANIFEST_FILE}"),
                source,
            })
        }
    };
    let m =
        Manifest::from_json(&format!("{snapshot}/{MANIFEST_FILE}"), &body).map_err(|source| {
            RestoreError::Manifest {
                snapshot: snapshot.clone(),
                source,
            }
        })?;
    if m.instance != instance || m.snapshot_id != snapshot_id {
        return Err(RestoreError::Manifest {
            snapshot: snapshot.clone(),
            source: ManifestError::Invalid {
                what: format!("{snapshot}/{MANIFEST_FILE}"),
                reason: format!("it describes {} instead", m.key()),
            },
        });
    }
    Ok(m)
}

/// The instance's complete snapshots (those with a valid manifest), oldest
/// cut first. A damaged manifest is logged and left out.
pub async fn list(store: &SnapshotStore, instance: &str) -> Result<Vec<Manifest>, RestoreError> {
    if !is_segment(instance) {
        return Err(RestoreError::NotFound {
            instance: instance.into(),
            what: "(the instance id is not valid)".into(),
        });
    }
    let prefix = store.instance_prefix(instance);
    let listing = store
        .inner
        .list_with_delimiter(Some(&prefix))
        .await
        .map_err(|source| RestoreError::Store {
            what: format!("the listing of {instance}/"),
            source,
        })?;
    let mut out = Vec::new();
    for p in listing.common_prefixes {
        let Some(id) = p.filename() else { continue };
        match load_manifest(store, instance, id).await {
            Ok(m) => out.push(m),
            Err(RestoreError::NotFound { .. }) => {}
            Err(error) => {
                warn!(instance = %instance, snapshot = %id, %error, "snapshot left out of the listing")
            }
        }
    }
    out.sort_by(|a, b| (a.wall_time_ns, &a.snapshot_id).cmp(&(b.wall_time_ns, &b.snapshot_id)));
    Ok(out)
}

/// The manifest `sel` picks.
pub async fn select(
    store: &SnapshotStore,
    instance: &str,
    sel: &Selector,
) -> Result<Manifest, RestoreError> {
    match sel {
        Selector::Id(id) => load_manifest(store, instance, id).await,
        Selector::Latest => {
            list(store, instance)
                .await?
                .pop()
                .ok_or_else(|| RestoreError::NotFound {
                    instance: instance.into(),
                    what: "(none at all)".into(),
                })
        }
        Selector::AtOrBefore(t) => list(store, instance)
            .await?
            .into_iter()
            .rev()
            .find(|m| m.wall_time_ns <= *t)
            .ok_or_else(|| RestoreError::NotFound {
                instance: instance.into(),
                what: format!("at or before {t} ns"),
            }),
    }
}

fn describe(h: &HostInfo) -> String {
    format!(
        "CPU {:?} and TSC {}",
        h.cpu_model,
        h.tsc_khz
            .map(|k| format!("{k} kHz"))
            .unwrap_or_else(|| "frequency unknown".into())
    )
}

/// Refuses `m` when it was taken on a host with another CPU model or TSC
/// frequency than `host` (an unknown TSC frequency on either side is not
/// a mismatch).
pub fn check_host(m: &Manifest, host: &HostInfo) -> Result<(), RestoreError> {
    let tsc_differs = matches!((m.host.tsc_khz, host.tsc_khz), (Some(a), Some(b)) if a != b);
    if m.host.cpu_model != host.cpu_model || tsc_differs {
        return Err(RestoreError::HostMismatch {
            snapshot: m.key(),
            theirs: describe(&m.host),
            ours: describe(host),
        });
    }
    Ok(())
}

/// Selects a snapshot, checks the host, downloads every object it needs
/// (the base chain's too, for incremental memory) into `dest` (which must
/// be missing or empty), verifying each one's size and sha256, and returns
/// where the snapshot directory and disk layers are.
pub async fn materialize(
    store: &SnapshotStore,
    instance: &str,
    sel: &Selector,
    dest: &FsPath,
    opts: &RestoreOptions,
) -> Result<Materialized, RestoreError> {
    let head = select(store, instance, sel).await?;
    let host = opts.host.clone().unwrap_or_else(HostInfo::current);
    if !opts.allow_host_mismatch {
        check_host(&head, &host)?;
    } else if let Err(error) = check_host(&head, &host) {
        warn!(snapshot = %head.key(), %error, "restoring onto a different host as asked");
    }

    // The chain of driver artifacts: head, then its bases while its memory
    // is incremental.
    let mut chain = vec![head.clone()];
    while chain.last().map(|m| m.memory) == Some(MemoryKind::Incremental) {
        let last = chain.last().expect("chain is never empty");
        if chain.len() > MAX_CHAIN {
            return Err(RestoreError::Chain {
                snapshot: head.key(),
                reason: format!("its base chain is longer than {MAX_CHAIN} (or loops)"),
            });
        }
        let base_id = last
            .base_snapshot_id
            .clone()
            .expect("a checked incremental manifest names its base");
        let base = load_manifest(store, instance, &base_id)
            .await
            .map_err(|e| match e {
                RestoreError::NotFound { .. } => RestoreError::Chain {
                    snapshot: last.key(),
                    reason: format!("its base snapshot {base_id} is not in the store"),
                },
                e => e,
            })?;
        if base.driver != head.driver {
            return Err(RestoreError::Chain {
                snapshot: last.key(),
                reason: format!(
                    "its base {base_id} was written by the {} driver",
                    base.driver
                ),
            });
        }
        chain.push(base);
    }
    chain.reverse();

    prepare_dest(dest)?;
    let mut bytes = 0;
    for m in &chain {
        let dir = dest.join(&m.snapshot_id);
        mkdir(&dir)?;
        for o in m.objects.iter().filter(|o| o.kind != ObjectKind::DiskLayer) {
            bytes += fetch_verified(store, instance, o, &dir.join(&o.name)).await?;
        }
        SnapshotArtifacts::load(&dir, &m.driver).map_err(|source| RestoreError::Layout {
            snapshot: m.key(),
            source,
        })?;
    }
    let mut disk_layers = Vec::new();
    for o in head.disk_layers() {
        let d = o
            .disk
            .as_ref()
            .expect("disk_layers() returns disk layers only");
        let dir = dest.join(DISKS_DIR).join(&d.device);
        mkdir(&dir)?;
        let path = dir.join(&o.name);
        bytes += fetch_verified(store, instance, o, &path).await?;
        disk_layers.push(LayerPath {
            device: d.device.clone(),
            position: d.position,
            path,
        });
    }
    Ok(Materialized {
        snapshot_dir: dest.join(&head.snapshot_id),
        chain: chain.iter().map(|m| m.snapshot_id.clone()).collect(),
        manifest: head,
        disk_layers,
        bytes,
    })
}

fn prepare_dest(dest: &FsPath) -> Result<(), RestoreError> {
    match std::fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(RestoreError::Dest {
                    path: dest.into(),
                    reason: "the directory is not empty".into(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => mkdir(dest),
        Err(e) => Err(RestoreError::Dest {
            path: dest.into(),
            reason: e.to_string(),
        }),
    }
}

fn mkdir(dir: &FsPath) -> Result<(), RestoreError> {
    std::fs::create_dir_all(dir).map_err(|e| RestoreError::Dest {
        path: dir.into(),
        reason: e.to_string(),
    })
}

/// Downloads `o` to `path` through `<path>.partial`, checking its size and
/// sha256 before it is renamed into place.
async fn fetch_verified(
    store: &SnapshotStore,
    instance: &str,
    o: &ObjectEntry,
    path: &FsPath,
) -> Result<u64, RestoreError> {
    let object = format!("{instance}/{}", o.key);
    let bad = |reason: String| RestoreError::Object {
        object: object.clone(),
        kind: o.kind,
        reason,
    };
    let dest_err = |p: &FsPath, e: std::io::Error| RestoreError::Dest {
        path: p.into(),
        reason: e.to_string(),
    };
    let loc = store.location(instance, &o.key);
    let got = match store.inner.get(&loc).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(bad("is missing from the store".into()))
        }
        Err(source) => {
            return Err(RestoreError::Store {
                what: object.clone(),
                source,
            })
        }
    };
    if got.meta.size != o.size {
        return Err(bad(format!(
            "is {} bytes in the store, the manifest records {} (truncated or replaced)",
            got.meta.size, o.size
        )));
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut f = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| dest_err(&partial, e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(source) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(RestoreError::Store {
                    what: object.clone(),
                    source,
                });
            }
        };
        size += chunk.len() as u64;
        if size > o.size {
            break;
        }
        hasher.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| dest_err(&partial, e))?;
    }
    f.flush().await.map_err(|e| dest_err(&partial, e))?;
    drop(f);
    let sha = hex(&hasher.finalize());
    if size != o.size {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(bad(format!(
            "read back {size} bytes, the manifest records {} (truncated or replaced)",
            o.size
        )));
    }
    if sha != o.sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(bad(format!(
            "has sha256 {sha}, the manifest records {} (damaged or replaced)",
            o.sha256
        )));
    }
    tokio::fs::rename(&partial, path)
        .await
        .map_err(|e| dest_err(path, e))?;
    Ok(size)
}
