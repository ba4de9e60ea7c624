//! Upload: a driver's snapshot directory (and any disk layers frozen for
//! it) into a [`SnapshotStore`], then its manifest.
//!
//! Objects are streamed from disk: each is read in 1 MiB blocks, hashed as
//! it goes, and sent in one request when it fits in a part or as a
//! multipart upload with at most `concurrency` parts in flight otherwise,
//! so memory stays bounded whatever the snapshot's size. The manifest is
//! written only after every object is stored (on a `file://` store with
//! fsync, after each object and its directory are fsync'd), so an
//! interrupted upload never leaves a manifest that points at a partial
//! snapshot; the objects it left behind are overwritten by the next upload
//! of the same snapshot id.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::info;
use vmr_hypervisor::artifacts::{ArtifactKind, SnapshotArtifacts, ARTIFACTS_FILE};
use vmr_hypervisor::{DriverError, MemoryKind};

use crate::manifest::{
    hex, is_segment, DiskLayer, Manifest, ManifestError, ObjectEntry, ObjectKind, PartitionOffset,
    MANIFEST_FILE, MANIFEST_VERSION,
};
use crate::restore::{self, RestoreError};
use crate::store::SnapshotStore;

/// Size of one read from a snapshot file.
const READ_BLOCK: usize = 1024 * 1024;

/// Errors uploading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The directory is not a readable driver snapshot.
    #[error("{dir} is not a usable snapshot directory")]
    Artifacts {
        /// The directory.
        dir: PathBuf,
        /// The driver layer's complaint.
        #[source]
        source: DriverError,
    },
    /// The request is inconsistent.
    #[error("snapshot {snapshot}: {reason}")]
    Invalid {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// What is wrong.
        reason: String,
    },
    /// The base snapshot cannot be used.
    #[error("snapshot {snapshot}: base snapshot {base} cannot be used")]
    Base {
        /// `<instance>/<snapshot-id>`.
        snapshot: String,
        /// The base's id.
        base: String,
        /// Why.
        #[source]
        source: Box<RestoreError>,
    },
    /// A manifest already exists for this snapshot id (snapshots are
    /// immutable once published).
    #[error("snapshot {0} already has a manifest in the store")]
    Exists(String),
    /// A local file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store refused an object.
    #[error("storing object {object} failed")]
    Store {
        /// The object's key.
        object: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// A file changed size while it was uploaded.
    #[error("object {object}: {reason}")]
    Changed {
        /// The object's key.
        object: String,
        /// What changed.
        reason: String,
    },
    /// The manifest built is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// A disk layer frozen for this snapshot.
#[derive(Debug, Clone)]
pub struct DiskLayerFile {
    /// Disk device name (`vda`).
    pub device: String,
    /// Position in the disk's chain (0 lies on the machine image).
    pub position: u32,
    /// The layer's file.
    pub path: PathBuf,
}

/// What to upload.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    /// The snapshot directory a driver wrote (`artifacts.json` and its
    /// files).
    pub dir: PathBuf,
    /// The snapshot's id. For microVM chains it must be the directory's
    /// name, which is how children name their parent (`../<id>`).
    pub snapshot_id: String,
    /// Machine image the instance booted from.
    pub image: String,
    /// The instance's `seq` at the cut.
    pub seq_at_cut: u64,
    /// Host monotonic time of the cut, ns (0 when unknown).
    pub mono_time_ns: u64,
    /// Per topic partition, the earliest offset that can hold a `seq` after
    /// the cut.
    pub offsets: Vec<PartitionOffset>,
    /// Disk layers frozen for this snapshot. Each disk's layers below the
    /// lowest position given here are taken over from the base snapshot's
    /// manifest (they were uploaded with it).
    pub disk_layers: Vec<DiskLayerFile>,
    /// For a full-memory snapshot, a base to take disk layers over from.
    /// An incremental snapshot's base is its driver parent and need not be
    /// given (if given, it must match).
    pub base_snapshot_id: Option<String>,
}

/// How far an upload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read and handed to the store so far (an object's last parts
    /// are acknowledged by the time its `objects_done` is counted).
    pub bytes_done: u64,
    /// Bytes of every object of the snapshot.
    pub bytes_total: u64,
    /// Objects completely stored.
    pub objects_done: usize,
    /// Objects of the snapshot (the manifest not counted).
    pub objects_total: usize,
    /// The key of the object being stored (empty once all are).
    pub object: String,
}

/// A progress callback that ignores reports.
pub fn no_progress(_: &Progress) {}

/// A progress callback that publishes each report on a watch channel, for a
/// caller that exposes the upload as an operation (the receiver always holds
/// the latest report).
pub fn progress_watch() -> (
    impl Fn(&Progress) + Send + Sync,
    tokio::sync::watch::Receiver<Progress>,
) {
    let (tx, rx) = tokio::sync::watch::channel(Progress {
        bytes_done: 0,
        bytes_total: 0,
        objects_done: 0,
        objects_total: 0,
        object: String::new(),
    });
    let report = move |p: &Progress| {
        tx.send_replace(p.clone());
    };
    (report, rx)
}

struct Source {
    entry: ObjectEntry,
    path: PathBuf,
    expect_size: u64,
}

/// Uploads the snapshot `req` describes and returns its manifest, written
/// last as `<instance>/<snapshot-id>/manifest.json`. `progress` is called
/// after each block stored and after each object.
pub async fn upload(
    store: &SnapshotStore,
    req: &UploadRequest,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Manifest, UploadError> {
    let arts = read_artifacts(&req.dir)?;
    let instance = arts.instance.clone();
    let snapshot = format!("{instance}/{}", req.snapshot_id);
    let invalid = |reason: String| UploadError::Invalid {
        snapshot: snapshot.clone(),
        reason,
    };
    if !is_segment(&instance) {
        return Err(invalid(format!(
            "instance id {instance:?} is not a valid id"
        )));
    }
    if !is_segment(&req.snapshot_id) {
        return Err(invalid(format!(
            "snapshot id {:?} is not a valid id (letters, digits, '.', '_', '-')",
            req.snapshot_id
        )));
    }

    // The base: the driver's parent for incremental memory.
    let parent = match (&arts.parent, arts.memory) {
        (Some(p), MemoryKind::Incremental) => {
            let id = p
                .strip_prefix("../")
                .filter(|id| is_segment(id))
                .ok_or_else(|| {
                    invalid(format!(
                        "its parent {p:?} is not a sibling directory (../<id>), so the chain cannot move"
                    ))
                })?;
            Some(id.to_string())
        }
        (None, MemoryKind::Incremental) => {
            return Err(invalid("incremental memory without a parent".into()))
        }
        _ => None,
    };
    let base_id = match (parent, &req.base_snapshot_id) {
        (Some(p), Some(b)) if p != *b => {
            return Err(invalid(format!(
                "the driver's parent is {p} but base {b} was asked for"
            )))
        }
        (Some(p), _) => Some(p),
        (None, b) => b.clone(),
    };
    let base = match &base_id {
        Some(b) => {
            let m = restore::load_manifest(store, &instance, b)
                .await
                .map_err(|source| UploadError::Base {
                    snapshot: snapshot.clone(),
                    base: b.clone(),
                    source: Box::new(source),
                })?;
            if m.driver != arts.driver {
                return Err(invalid(format!(
                    "base {b} was written by the {} driver, this one by {}",
                    m.driver, arts.driver
                )));
            }
            Some(m)
        }
        None => None,
    };

    let manifest_loc = store.location(&instance, &format!("{}/{MANIFEST_FILE}", req.snapshot_id));
    match store.inner.head(&manifest_loc).await {
        Ok(_) => return Err(UploadError::Exists(snapshot)),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(source) => {
            return Err(UploadError::Store {
                object: format!("{snapshot}/{MANIFEST_FILE}"),
                source,
            })
        }
    }

    clear_leftovers(store, &instance, &req.snapshot_id).await?;

    // What to store: the driver's files, artifacts.json, new disk layers.
    let mut sources = Vec::new();
    let own_key = |name: &str| format!("{}/{name}", req.snapshot_id);
    for a in &arts.artifacts {
        if !is_segment(&a.file) {
            return Err(invalid(format!(
                "artifact file {:?} is not a plain file name",
                a.file
            )));
        }
        let kind = match a.kind {
            ArtifactKind::Memory => ObjectKind::Memory,
            ArtifactKind::MigrationStream => ObjectKind::MigrationStream,
            ArtifactKind::State if a.name == "devices" => ObjectKind::Devices,
            ArtifactKind::State => ObjectKind::State,
        };
        sources.push(Source {
            entry: entry(&a.file, kind, own_key(&a.file), None),
            path: req.dir.join(&a.file),
            expect_size: a.size,
        });
    }
    let arts_path = req.dir.join(ARTIFACTS_FILE);
    let arts_size = std::fs::metadata(&arts_path)
        .map_err(|source| UploadError::Read {
            path: arts_path.clone(),
            source,
        })?
        .len();
    sources.push(Source {
        entry: entry(
            ARTIFACTS_FILE,
            ObjectKind::Artifacts,
            own_key(ARTIFACTS_FILE),
            None,
        ),
        path: arts_path,
        expect_size: arts_size,
    });
    let (new_layers, inherited) = plan_disk_layers(req, base.as_ref(), &arts.instance)?;
    for l in new_layers {
        let size = std::fs::metadata(&l.path)
            .map_err(|source| UploadError::Read {
                path: l.path.clone(),
                source,
            })?
            .len();
        let name = format!("{}.{}", l.device, l.position);
        sources.push(Source {
            entry: entry(
                &name,
                ObjectKind::DiskLayer,
                own_key(&format!("disk/{name}")),
                Some(DiskLayer {
                    device: l.device.clone(),
                    position: l.position,
                    base: String::new(),
                }),
            ),
            path: l.path.clone(),
            expect_size: size,
        });
    }

    let pace = Pace::new(store.max_bytes_per_sec);
    let mut p = Progress {
        bytes_done: 0,
        bytes_total: sources.iter().map(|s| s.expect_size).sum(),
        objects_done: 0,
        objects_total: sources.len(),
        object: String::new(),
    };
    let mut objects = Vec::with_capacity(sources.len() + inherited.len());
    for mut s in sources {
        p.object = format!("{instance}/{}", s.entry.key);
        progress(&p);
        let loc = store.location(&instance, &s.entry.key);
        let (sha, size) = put_file(
            store,
            &loc,
            &s.path,
            &p.object.clone(),
            &mut p,
            progress,
            &pace,
        )
        .await?;
        if size != s.expect_size {
            return Err(UploadError::Changed {
                object: p.object.clone(),
                reason: format!(
                    "{} was {} bytes when listed and {size} when read",
                    s.path.display(),
                    s.expect_size
                ),
            });
        }
        s.entry.sha256 = sha;
        s.entry.size = size;
        objects.push(s.entry);
        p.objects_done += 1;
    }
    p.object.clear();
    progress(&p);
    objects.extend(inherited);
    // Each disk layer lies on the one below it, position 0 on the image.
    objects.sort_by(|a, b| {
        let ka = a.disk.as_ref().map(|d| (d.device.clone(), d.position));
        let kb = b.disk.as_ref().map(|d| (d.device.clone(), d.position));
        ka.cmp(&kb)
    });
    let mut below: Option<(String, String)> = None;
    for o in objects.iter_mut() {
        if let Some(d) = o.disk.as_mut() {
            d.base = match &below {
                Some((dev, key)) if *dev == d.device => key.clone(),
                _ => format!("image:{}", req.image),
            };
            below = Some((d.device.clone(), o.key.clone()));
        }
    }

    let mut m = Manifest {
        manifest_version: MANIFEST_VERSION,
        instance: instance.clone(),
        snapshot_id: req.snapshot_id.clone(),
        base_snapshot_id: base_id,
        driver: arts.driver.clone(),
        driver_format: arts.driver_format,
        image: req.image.clone(),
        memory: arts.memory,
        seq_at_cut: req.seq_at_cut,
        wall_time_ns: arts.taken_at_ns,
        mono_time_ns: req.mono_time_ns,
        pause_us: arts.pause.map(|d| d.as_micros() as u64).unwrap_or(0),
        uploaded_at_ns: now_ns(),
        host: arts.host.clone(),
        objects,
        offsets: req.offsets.clone(),
        digest: String::new(),
    };
    m.seal();
    m.check()?;
    store
        .inner
        .put(&manifest_loc, PutPayload::from(m.to_json()))
        .await
        .map_err(|source| UploadError::Store {
            object: format!("{snapshot}/{MANIFEST_FILE}"),
            source,
        })?;
    info!(instance = %instance, snapshot = %req.snapshot_id, store = %store.url(), bytes = p.bytes_done, objects = p.objects_done, "snapshot uploaded");
    Ok(m)
}

/// Removes what an interrupted upload of this snapshot id left (it has no
/// manifest, so nothing refers to it): its objects, and on a `file://`
/// store the staging files of unfinished writes (`<name>#<n>`).
async fn clear_leftovers(
    store: &SnapshotStore,
    instance: &str,
    snapshot_id: &str,
) -> Result<(), UploadError> {
    use futures::TryStreamExt;
    let prefix = store.location(instance, snapshot_id);
    let what = format!("{instance}/{snapshot_id}/");
    let old: Vec<_> = store
        .inner
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| UploadError::Store {
            object: what.clone(),
            source,
        })?;
    for o in old {
        match store.inner.delete(&o.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(UploadError::Store {
                    object: o.location.to_string(),
                    source,
                })
            }
        }
    }
    if let Some(root) = store.local_root() {
        remove_staged(&root.join(instance).join(snapshot_id))?;
    }
    Ok(())
}

pub(crate) fn remove_staged(dir: &FsPath) -> Result<(), UploadError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(UploadError::Read {
                path: dir.into(),
                source,
            })
        }
    };
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            remove_staged(&path)?;
        } else if name
            .split_once('#')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            std::fs::remove_file(&path).map_err(|source| UploadError::Read { path, source })?;
        }
    }
    Ok(())
}

fn entry(name: &str, kind: ObjectKind, key: String, disk: Option<DiskLayer>) -> ObjectEntry {
    ObjectEntry {
        name: name.into(),
        kind,
        key,
        sha256: String::new(),
        size: 0,
        disk,
    }
}

fn read_artifacts(dir: &FsPath) -> Result<SnapshotArtifacts, UploadError> {
    let err = |source| UploadError::Artifacts {
        dir: dir.to_path_buf(),
        source,
    };
    let path = dir.join(ARTIFACTS_FILE);
    let body = std::fs::read(&path).map_err(|e| {
        err(DriverError::Artifact {
            artifact: ARTIFACTS_FILE.into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })
    })?;
    let a: SnapshotArtifacts = serde_json::from_slice(&body).map_err(|e| {
        err(DriverError::Artifact {
            artifact: ARTIFACTS_FILE.into(),
            reason: format!("malformed: {e}"),
        })
    })?;
    // Checks the version and that every file is there with its size.
    SnapshotArtifacts::load(dir, &a.driver).map_err(err)
}

/// The disk layers to upload and those taken over from the base.
fn plan_disk_layers<'a>(
    req: &'a UploadRequest,
    base: Option<&Manifest>,
    instance: &str,
) -> Result<(Vec<&'a DiskLayerFile>, Vec<ObjectEntry>), UploadError> {
    let invalid = |reason: String| UploadError::Invalid {
        snapshot: format!("{instance}/{}", req.snapshot_id),
        reason,
    };
    let mut by_dev: BTreeMap<&str, Vec<&DiskLayerFile>> = BTreeMap::new();
    for l in &req.disk_layers {
        if !is_segment(&l.device) {
            return Err(invalid(format!(
                "disk device name {:?} is not valid",
                l.device
            )));
        }
        by_dev.entry(&l.device).or_default().push(l);
    }
    let base_layers: Vec<&ObjectEntry> = base.map(|b| b.disk_layers()).unwrap_or_default();
    let mut inherited = Vec::new();
    let mut new = Vec::new();
    for (dev, mut layers) in by_dev {
        layers.sort_by_key(|l| l.position);
        let first = layers[0].position;
        for (i, l) in layers.iter().enumerate() {
            if l.position != first + i as u32 {
                return Err(invalid(format!(
                    "disk {dev} layers must have consecutive positions, got {:?}",
                    layers.iter().map(|l| l.position).collect::<Vec<_>>()
                )));
            }
        }
        let below: Vec<&ObjectEntry> = base_layers
            .iter()
            .copied()
            .filter(|o| {
                o.disk
                    .as_ref()
                    .is_some_and(|d| d.device == dev && d.position < first)
            })
            .collect();
        if below.len() != first as usize {
            return Err(invalid(format!(
                "disk {dev} layer {first} needs layers 0..{first} below it, and the base snapshot has {}",
                below.len()
            )));
        }
        inherited.extend(below.into_iter().cloned());
        new.extend(layers);
    }
    // Disks with no new layer keep the base's chain.
    for o in base_layers {
        let dev = o.disk.as_ref().map(|d| d.device.as_str()).unwrap_or("");
        if !req.disk_layers.iter().any(|l| l.device == dev) {
            inherited.push(o.clone());
        }
    }
    Ok((new, inherited))
}

async fn read_block(f: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Streams `path` to `loc`; returns its sha256 and size.
async fn put_file(
    store: &SnapshotStore,
    loc: &Path,
    path: &FsPath,
    object: &str,
    p: &mut Progress,
    progress: &(dyn Fn(&Progress) + Send + Sync),
    pace: &Pace,
) -> Result<(String, u64), UploadError> {
    let read_err = |source| UploadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let store_err = |source| UploadError::Store {
        object: object.to_string(),
        source,
    };
    let mut f = tokio::fs::File::open(path).await.map_err(read_err)?;
    let len = f.metadata().await.map_err(read_err)?.len();
    let mut hasher = Sha256::new();
    if len <= store.part_size as u64 {
        let mut body = Vec::with_capacity(len as usize);
        f.read_to_end(&mut body).await.map_err(read_err)?;
        hasher.update(&body);
        let size = body.len() as u64;
        pace.wait(p.bytes_done + size).await;
        store
            .inner
            .put(loc, PutPayload::from(body))
            .await
            .map_err(store_err)?;
        p.bytes_done += size;
        progress(p);
        return Ok((hex(&hasher.finalize()), size));
    }
    let up = store.inner.put_multipart(loc).await.map_err(store_err)?;
    let mut w = WriteMultipart::new_with_chunk_size(up, store.part_size);
    let mut buf = vec![0u8; READ_BLOCK];
    let mut size = 0u64;
    loop {
        let n = match read_block(&mut f, &mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = w.abort().await;
                return Err(read_err(e));
            }
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pace.wait(p.bytes_done + n as u64).await;
        if let Err(e) = w.wait_for_capacity(store.concurrency).await {
            let _ = w.abort().await;
            return Err(store_err(e));
        }
        w.write(&buf[..n]);
        size += n as u64;
        p.bytes_done += n as u64;
        progress(p);
    }
    w.finish().await.map_err(store_err)?;
    Ok((hex(&hasher.finalize()), size))
}

/// Holds an upload to a byte rate.
struct Pace {
    rate: Option<u64>,
    start: tokio::time::Instant,
}

impl Pace {
    fn new(rate: Option<u64>) -> Self {
        Pace {
            rate,
            start: tokio::time::Instant::now(),
        }
    }

    /// Waits until sending up to `bytes` keeps within the rate.
    async fn wait(&self, bytes: u64) {
        if let Some(rate) = self.rate {
            let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
            tokio::time::sleep_until(self.start + due).await;
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(layers: &[(&str, u32)]) -> UploadRequest {
        UploadRequest {
            dir: PathBuf::from("/nonexistent"),
            snapshot_id: "0002".into(),
            image: "img".into(),
            seq_at_cut: 0,
            mono_time_ns: 0,
            offsets: vec![],
            disk_layers: layers
                .iter()
                .map(|&(d, p)| DiskLayerFile {
                    device: d.into(),
                    position: p,
                    path: PathBuf::from(format!("/layers/{d}.{p}")),
                })
                .collect(),
            base_snapshot_id: None,
        }
    }

    fn base_with(layers: &[(&str, u32)]) -> Manifest {
        let mut m = Manifest {
            manifest_version: MANIFEST_VERSION,
            instance: "vm".into(),
            snapshot_id: "0001".into(),
            base_snapshot_id: None,
            driver: "microvm".into(),
            driver_format: 1,
            image: "img".into(),
            memory: MemoryKind::Full,
            seq_at_cut: 0,
            wall_time_ns: 0,
            mono_time_ns: 0,
            pause_us: 0,
            uploaded_at_ns: 0,
            host: Default::default(),
            objects: vec![],
            offsets: vec![],
            digest: String::new(),
        };
        for &(d, p) in layers {
            m.objects.push(ObjectEntry {
                name: format!("{d}.{p}"),
                kind: ObjectKind::DiskLayer,
                key: format!("0001/disk/{d}.{p}"),
                sha256: "00".repeat(32),
                size: 1,
                disk: Some(DiskLayer {
                    device: d.into(),
                    position: p,
                    base: String::new(),
                }),
            });
        }
        m
    }

    #[test]
    fn disk_layers_below_the_new_ones_come_from_the_base() {
        let base = base_with(&[("vda", 0), ("vda", 1), ("vdb", 0)]);
        let r = req(&[("vda", 2), ("vda", 3)]);
        let (new, inherited) = plan_disk_layers(&r, Some(&base), "vm").unwrap();
        assert_eq!(new.iter().map(|l| l.position).collect::<Vec<_>>(), [2, 3]);
        let mut keys: Vec<&str> = inherited.iter().map(|o| o.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["0001/disk/vda.0", "0001/disk/vda.1", "0001/disk/vdb.0"]
        );

        // A new chain from position 0 replaces the base's.
        let (_, inherited) = plan_disk_layers(&req(&[("vda", 0)]), Some(&base), "vm").unwrap();
        assert_eq!(inherited.len(), 1, "only vdb is taken over");
    }

    #[test]
    fn gaps_in_disk_chains_are_refused() {
        let e = plan_disk_layers(&req(&[("vda", 1)]), None, "vm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs layers 0..1 below it"), "{e}");
        let e = plan_disk_layers(&req(&[("vda", 0), ("vda", 2)]), None, "vm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("consecutive positions"), "{e}");
        let base = base_with(&[("vda", 0)]);
        let e = plan_disk_layers(&req(&[("vda", 3)]), Some(&base), "vm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the base snapshot has 1"), "{e}");
        let e = plan_disk_layers(&req(&[("../x", 0)]), None, "vm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("device name"), "{e}");
    }
}
