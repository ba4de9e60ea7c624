//! Retention: which snapshots of an instance to keep, and deleting one
//! without breaking the others.
//!
//! A snapshot is kept when it is pinned, among the newest `keep_last`, cut
//! within `keep_within` of now, or the base (transitively) of a kept
//! snapshot with incremental memory (its memory is needed to restore the
//! child). Deleting removes the manifest first (so the snapshot leaves every
//! listing at once), then each of its objects that no remaining snapshot's
//! manifest names: a disk layer taken over by a later snapshot stays.

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
}
