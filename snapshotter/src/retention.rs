//! Retention: which snapshots of an instance to keep, and deleting one
//! without breaking the others.
//!
//! A snapshot is kept when it is pinned, among the newest `keep_last`, cut
//! within `keep_within` of now, or the base (transitively) of a kept
//! snapshot with incremental memory (its memory is needed to restore the
//! child). Deleting removes the manifest first (so the snapshot leaves every
//! listing at once), then each of its objects that no remaining snapshot's
//! manifest names: a disk layer taken over by a later snapshot stays.
//!
//! [`sweep_unfinished`] removes what interrupted uploads left: a snapshot id
//! with objects but no manifest (an upload killed before its last step) is
//! never listed or restored, and its objects are deleted by the next sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use vmr_hypervisor::MemoryKind;

use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::store::SnapshotStore;

/// Errors deleting a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The store refused or failed.
    #[error("cannot delete {key} from the store")]
    Store {
        /// `<instance>/<key>`.
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// Local files of a `file://` store.
    #[error("cannot remove {what}: {reason}")]
    Local {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// Another snapshot needs this one.
    #[error("snapshot {snapshot} is the memory base of {child}, which is kept")]
    Needed {
        /// The snapshot asked for.
        snapshot: String,
        /// A snapshot that needs it.
        child: String,
    },
}

/// How many snapshots to keep; a snapshot matching either rule is kept.
/// With neither set, everything is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the newest N.
    pub keep_last: Option<usize>,
    /// Keep those cut within this long before now.
    pub keep_within: Option<Duration>,
}

/// The snapshots (ids) `policy` keeps and deletes (newest first), from `manifests` of one
/// instance, `pinned` ids and the time `now_ns` (wall, ns).
pub fn plan(
    manifests: &[Manifest],
    pinned: &BTreeSet<String>,
    policy: &Policy,
    now_ns: u64,
) -> (BTreeSet<String>, Vec<String>) {
    let mut by_time: Vec<&Manifest> = manifests.iter().collect();
    by_time.sort_by_key(|m| std::cmp::Reverse((m.wall_time_ns, m.snapshot_id.clone())));
    let all = policy.keep_last.is_none() && policy.keep_within.is_none();
    let mut keep = BTreeSet::new();
    for (i, m) in by_time.iter().enumerate() {
        let recent = policy
            .keep_within
            .is_some_and(|w| now_ns.saturating_sub(m.wall_time_ns) <= w.as_nanos() as u64);
        let newest = policy.keep_last.is_some_and(|n| i < n);
        if all || recent || newest || pinned.contains(&m.snapshot_id) {
            keep.insert(m.snapshot_id.clone());
        }
    }
    // Memory bases of kept incremental snapshots.
    let by_id: BTreeMap<&str, &Manifest> = manifests
        .iter()
        .map(|m| (m.snapshot_id.as_str(), m))
        .collect();
    let mut todo: Vec<String> = keep.iter().cloned().collect();
    while let Some(id) = todo.pop() {
        let Some(m) = by_id.get(id.as_str()) else {
            continue;
        };
        if m.memory == MemoryKind::Incremental {
            if let Some(b) = &m.base_snapshot_id {
                if keep.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
    }
    // Newest first: a child goes before its base.
    let delete = by_time
        .iter()
        .filter(|m| !keep.contains(&m.snapshot_id))
        .map(|m| m.snapshot_id.clone())
        .collect();
    (keep, delete)
}

/// Deletes snapshot `id` of `instance`, given every manifest of the
/// instance (`all`, including `id`'s). Refused when a remaining snapshot
/// with incremental memory has it as its base. Returns the keys deleted.
pub async fn delete(
    store: &SnapshotStore,
    instance: &str,
    id: &str,
    all: &[Manifest],
) -> Result<Vec<String>, RetentionError> {
    if let Some(child) = all.iter().find(|m| {
        m.snapshot_id != id
            && m.memory == MemoryKind::Incremental
            && m.base_snapshot_id.as_deref() == Some(id)
    }) {
        return Err(RetentionError::Needed {
            snapshot: id.to_string(),
            child: child.snapshot_id.clone(),
        });
    }
    let used: BTreeSet<&str> = all
        .iter()
        .filter(|m| m.snapshot_id != id)
        .flat_map(|m| m.objects.iter().map(|o| o.key.as_str()))
        .collect();
    let del = |key: String| async move {
        let loc = store.location(instance, &key);
        match store.inner.delete(&loc).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(key),
            Err(source) => Err(RetentionError::Store {
                key: format!("{instance}/{key}"),
                source,
            }),
        }
    };
    let mut deleted = vec![del(format!("{id}/{MANIFEST_FILE}")).await?];
    // Whatever else is under the id (objects, leftovers of an interrupted
    // upload) unless another snapshot names it.
    let prefix = store.location(instance, id);
    let mut keys = Vec::new();
    let mut listing = store.inner.list(Some(&prefix));
    let base = store.instance_prefix(instance);
    while let Some(item) = listing.next().await {
        let meta = item.map_err(|source| RetentionError::Store {
            key: format!("{instance}/{id}/"),
            source,
        })?;
        let full = meta.location.as_ref();
        let rel = full
            .strip_prefix(base.as_ref())
            .map(|s| s.trim_start_matches('/'))
            .unwrap_or(full)
            .to_string();
        keys.push(rel);
    }
    drop(listing);
    for k in keys {
        if !used.contains(k.as_str()) && !deleted.contains(&k) {
            deleted.push(del(k).await?);
        }
    }
    Ok(deleted)
}

/// Deletes every snapshot id of `instance` that has no manifest (what an
/// interrupted upload or deletion left), except the ids in `except` (an
/// upload in progress). On a `file://` store the staging files of unfinished
/// writes (`<name>#<n>`) and the emptied directories go too. Returns the ids
/// that had objects or staging files (an empty directory, which a deletion
/// leaves on a `file://` store, is removed without being counted).
///
/// A key that any manifest of the instance names is never deleted: a later
/// snapshot keeps the disk layers it inherits under the id that first
/// stored them, so a deleted snapshot's id may still hold layers in use.
/// When a manifest exists but cannot be read, what it names is unknown and
/// nothing is swept.
///
/// The caller must know that no other upload of the instance is running
/// outside `except`: an upload's objects have no manifest until its end.
/// An S3 multipart upload cut off before completion leaves parts that no
/// listing shows; the bucket's lifecycle rule
/// (`AbortIncompleteMultipartUpload`) removes those.
pub async fn sweep_unfinished(
    store: &SnapshotStore,
    instance: &str,
    except: &[&str],
) -> Result<Vec<String>, RetentionError> {
    let base = store.instance_prefix(instance);
    let listing = store
        .inner
        .list_with_delimiter(Some(&base))
        .await
        .map_err(|source| RetentionError::Store {
            key: format!("{instance}/"),
            source,
        })?;
    let mut unfinished = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for p in listing.common_prefixes {
        let Some(id) = p.filename().map(str::to_string) else {
            continue;
        };
        if except.contains(&id.as_str()) {
            continue;
        }
        let manifest = store.location(instance, &format!("{id}/{MANIFEST_FILE}"));
        match store.inner.head(&manifest).await {
            Ok(_) => match crate::restore::load_manifest(store, instance, &id).await {
                Ok(m) => used.extend(m.objects.into_iter().map(|o| o.key)),
                Err(error) => {
                    tracing::warn!(instance = %instance, snapshot = %id, %error,
                        "a manifest cannot be read, so nothing is swept: what it names is unknown");
                    return Ok(Vec::new());
                }
            },
            Err(object_store::Error::NotFound { .. }) => unfinished.push(id),
            Err(source) => {
                return Err(RetentionError::Store {
                    key: format!("{instance}/{id}/{MANIFEST_FILE}"),
                    source,
                })
            }
        }
    }
    let mut swept = Vec::new();
    for id in unfinished {
        let prefix = store.location(instance, &id);
        let mut keys = Vec::new();
        let mut objects = store.inner.list(Some(&prefix));
        while let Some(item) = objects.next().await {
            let meta = item.map_err(|source| RetentionError::Store {
                key: format!("{instance}/{id}/"),
                source,
            })?;
            let full = meta.location.as_ref();
            let rel = full
                .strip_prefix(base.as_ref())
                .map(|s| s.trim_start_matches('/'))
                .unwrap_or(full);
            if !used.contains(rel) {
                keys.push(meta.location);
            }
        }
        drop(objects);
        let mut found = !keys.is_empty();
        for k in keys {
            match store.inner.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(RetentionError::Store {
                        key: k.to_string(),
                        source,
                    })
                }
            }
        }
        if let Some(root) = store.local_root() {
            let dir = root.join(instance).join(&id);
            found |= count_staged(&dir) > 0;
            crate::upload::remove_staged(&dir).map_err(|e| RetentionError::Local {
                what: format!("the staging files under {}", dir.display()),
                reason: e.to_string(),
            })?;
            remove_empty_dirs(&dir);
        }
        if found {
            swept.push(id);
        }
    }
    Ok(swept)
}

/// How many staging files (`<name>#<n>`) are under `dir`.
fn count_staged(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_staged(&e.path())
            } else {
                usize::from(e.file_name().to_string_lossy().contains('#'))
            }
        })
        .sum()
}

/// Removes `dir` and the directories below it that are empty.
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, t: u64, memory: MemoryKind, base: Option<&str>) -> Manifest {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "manifest_version": 1, "instance": "vm", "snapshot_id": id,
            "base_snapshot_id": base, "driver": "microvm", "driver_format": 1,
            "image": "img", "memory": memory, "seq_at_cut": 1, "wall_time_ns": t,
            "mono_time_ns": 0, "pause_us": 0, "uploaded_at_ns": 0,
            "host": {"cpu_model": "x", "tsc_khz": null}, "objects": [], "offsets": [],
            "digest": ""
        }))
        .unwrap();
        m.snapshot_id = id.into();
        m
    }

    #[test]
    fn keep_last_pins_and_bases() {
        use MemoryKind::*;
        let ms = vec![
            m("a", 1, Full, None),
            m("b", 2, Incremental, Some("a")),
            m("c", 3, Full, None),
            m("d", 4, Full, None),
            m("e", 5, Incremental, Some("d")),
        ];
        let p = Policy {
            keep_last: Some(1),
            keep_within: None,
        };
        let (keep, del) = plan(&ms, &BTreeSet::new(), &p, 10);
        assert_eq!(keep, ["d", "e"].map(String::from).into());
        assert_eq!(del, ["c", "b", "a"]);
        // A pinned incremental keeps its base.
        let (keep, del) = plan(&ms, &["b".to_string()].into(), &p, 10);
        assert_eq!(keep, ["a", "b", "d", "e"].map(String::from).into());
        assert_eq!(del, ["c"]);
        // A time window.
        let p = Policy {
            keep_last: None,
            keep_within: Some(Duration::from_nanos(6)),
        };
        let (_, del) = plan(&ms, &BTreeSet::new(), &p, 10);
        assert_eq!(del, ["c", "b", "a"]);
        // No rule: keep everything.
        let (_, del) = plan(&ms, &BTreeSet::new(), &Policy::default(), 10);
        assert!(del.is_empty());
    }

    /// A sealed manifest of `vm-1` naming `keys` as memory objects.
    fn manifest_json(id: &str, keys: &[&str]) -> Vec<u8> {
        let mut m = m(id, 1, MemoryKind::Full, None);
        m.instance = "vm-1".into();
        m.objects = keys
            .iter()
            .enumerate()
            .map(|(i, k)| crate::manifest::ObjectEntry {
                name: format!("memory{i}.bin"),
                kind: crate::manifest::ObjectKind::Memory,
                key: (*k).into(),
                sha256: "0".repeat(64),
                size: 1,
                disk: None,
            })
            .collect();
        m.seal();
        m.to_json()
    }

    #[test]
    fn sweep_removes_ids_without_a_manifest_only() {
        let root = tempfile::tempdir().unwrap();
        let inst = root.path().join("vm-1");
        let write = |rel: &str| {
            let p = inst.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        };
        // A complete snapshot, an interrupted upload (a stored object, a
        // disk layer, and a write cut off in its staging file), an empty
        // leftover directory, and an upload in progress.
        std::fs::create_dir_all(inst.join("s1")).unwrap();
        std::fs::write(
            inst.join("s1/manifest.json"),
            manifest_json("s1", &["s1/memory.bin"]),
        )
        .unwrap();
        write("s1/memory.bin");
        write("s2/artifacts.json");
        write("s2/disk/vda.0");
        write("s2/memory.bin#17");
        std::fs::create_dir_all(inst.join("s3")).unwrap();
        write("s4/memory.bin#2");
        let store = SnapshotStore::open(&crate::StoreConfig::local(root.path())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let swept = rt
            .block_on(sweep_unfinished(&store, "vm-1", &["s4"]))
            .unwrap();
        assert_eq!(swept, ["s2"]);
        assert!(inst.join("s1/manifest.json").is_file());
        assert!(inst.join("s1/memory.bin").is_file());
        assert!(!inst.join("s2").exists(), "the interrupted upload is gone");
        assert!(!inst.join("s3").exists());
        assert!(inst.join("s4/memory.bin#2").is_file(), "in progress, kept");
        // Nothing left to sweep; an instance never seen has nothing.
        assert!(rt
            .block_on(sweep_unfinished(&store, "vm-1", &[]))
            .unwrap()
            .iter()
            .all(|id| id == "s4"));
        assert!(rt
            .block_on(sweep_unfinished(&store, "vm-2", &[]))
            .unwrap()
            .is_empty());
    }
    #[test]
    fn sweep_keeps_what_a_manifest_still_names_under_a_deleted_id() {
        let root = tempfile::tempdir().unwrap();
        let inst = root.path().join("vm-1");
        let write = |rel: &str, body: &[u8]| {
            let p = inst.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        };
        // s0 was deleted by retention (its manifest is gone), but s1 still
        // names a layer that s0 first stored.
        write("s0/disk/vda.0", b"layer");
        write("s0/memory.bin", b"x");
        write("s1/manifest.json", &manifest_json("s1", &["s0/disk/vda.0"]));
        let store = SnapshotStore::open(&crate::StoreConfig::local(root.path())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let swept = rt.block_on(sweep_unfinished(&store, "vm-1", &[])).unwrap();
        assert_eq!(swept, ["s0"]);
        assert!(inst.join("s0/disk/vda.0").is_file(), "s1 still needs it");
        assert!(!inst.join("s0/memory.bin").exists());
        // Once more: only the kept layer is left, so nothing is swept.
        let swept = rt.block_on(sweep_unfinished(&store, "vm-1", &[])).unwrap();
        assert!(swept.is_empty(), "{swept:?}");
        assert!(inst.join("s0/disk/vda.0").is_file());

        // A manifest that cannot be read: what it names is unknown, so
        // nothing is swept.
        write("s2/manifest.json", b"{damaged");
        write("s3/memory.bin", b"x");
        let swept = rt.block_on(sweep_unfinished(&store, "vm-1", &[])).unwrap();
        assert!(swept.is_empty(), "{swept:?}");
        assert!(inst.join("s3/memory.bin").is_file());
        assert!(inst.join("s0/disk/vda.0").is_file());
    }
}
