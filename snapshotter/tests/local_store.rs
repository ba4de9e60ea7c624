//! Snapshots written by the real microVM driver, uploaded to a file://
//! store, moved, then selected, verified, materialised and restored through
//! the driver; and every way of damaging a stored snapshot refused with an
//! error that names what is damaged.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use vmr_hypervisor::artifacts::HostInfo;
use vmr_hypervisor::MemoryKind;
use vmr_snapshot::{
    list, materialize, no_progress, select, upload, DiskLayerFile, Manifest, ObjectKind,
    PartitionOffset, Progress, RestoreError, RestoreOptions, Selector, SnapshotStore, StoreConfig,
    UploadError, UploadRequest,
};

const INSTANCE: &str = "vm-chain";

fn request(dir: &Path, seq: u64, layers: Vec<DiskLayerFile>) -> UploadRequest {
    UploadRequest {
        dir: dir.to_path_buf(),
        snapshot_id: dir.file_name().unwrap().to_string_lossy().into_owned(),
        image: "test-guest".into(),
        seq_at_cut: seq,
        mono_time_ns: 0,
        offsets: vec![
            PartitionOffset {
                topic: vmr_proto::topics::BLOCK.into(),
                partition: 1,
                next_offset: seq as i64,
            },
            PartitionOffset {
                topic: vmr_proto::topics::NET.into(),
                partition: 1,
                next_offset: 3,
            },
        ],
        disk_layers: layers,
        base_snapshot_id: None,
    }
}

fn layer_file(dir: &Path, name: &str, len: usize, seed: u8) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    let body: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

fn layer(device: &str, position: u32, path: std::path::PathBuf) -> DiskLayerFile {
    DiskLayerFile {
        device: device.into(),
        position,
        path,
    }
}

#[test]
// Heavy: needs /dev/kvm.
fn microvm_chain_of_three_round_trips_through_a_moved_file_store() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, INSTANCE, &elf, 32);
    let chain = chain_of_three(inst.as_ref(), dir);
    inst.stop(Duration::from_secs(5)).expect("stop");

    let layers = dir.join("layers");
    let vda0 = layer_file(&layers, "vda-base", 3 * 1024 * 1024 + 17, 1);
    let vda1 = layer_file(&layers, "vda-top", 64 * 1024, 2);
    let rt = runtime();
    let store_a = dir.join("store-a");
    let store = SnapshotStore::open(&StoreConfig::local(&store_a)).unwrap();

    let reports = Mutex::new(Vec::<Progress>::new());
    let record = |p: &Progress| reports.lock().unwrap().push(p.clone());
    let reqs = [
        request(&chain.dirs[0], 10, vec![layer("vda", 0, vda0.clone())]),
        request(&chain.dirs[1], 20, vec![]),
        request(&chain.dirs[2], 30, vec![layer("vda", 1, vda1.clone())]),
    ];
    let mut manifests: Vec<Manifest> = Vec::new();
    for r in &reqs {
        reports.lock().unwrap().clear();
        let m = rt.block_on(upload(&store, r, &record)).expect("upload");
        let reps = reports.lock().unwrap().clone();
        assert!(reps.len() > 2, "progress was reported: {reps:?}");
        assert!(
            reps.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
            "progress only grows"
        );
        let last = reps.last().unwrap();
        assert_eq!(last.bytes_done, last.bytes_total);
        assert_eq!(last.objects_done, last.objects_total);
        let own: u64 = m
            .objects
            .iter()
            .filter(|o| o.key.starts_with(&format!("{}/", m.snapshot_id)))
            .map(|o| o.size)
            .sum();
        assert_eq!(last.bytes_total, own, "every own object was counted");
        manifests.push(m);
    }
    let (m1, m2, m3) = (&manifests[0], &manifests[1], &manifests[2]);
    assert_eq!((m1.memory, &m1.base_snapshot_id), (MemoryKind::Full, &None));
    assert_eq!(m2.base_snapshot_id.as_deref(), Some("0001"));
    assert_eq!(m3.base_snapshot_id.as_deref(), Some("0002"));
    assert_eq!(m3.memory, MemoryKind::Incremental);
    assert_eq!(m3.seq_at_cut, 30);
    assert_eq!(m3.driver, "microvm");
    assert_eq!(m3.host, HostInfo::current());
    assert_eq!(m3.offsets, reqs[2].offsets);
    // The disk chain: layer 0 from the first snapshot, layer 1 new.
    let dl: Vec<(String, String)> = m3
        .disk_layers()
        .iter()
        .map(|o| (o.key.clone(), o.disk.as_ref().unwrap().base.clone()))
        .collect();
    assert_eq!(
        dl,
        vec![
            (
                "0001/disk/vda.0".to_string(),
                "image:test-guest".to_string()
            ),
            ("0003/disk/vda.1".to_string(), "0001/disk/vda.0".to_string()),
        ]
    );
    assert_eq!(
        m2.disk_layers().len(),
        1,
        "the middle snapshot keeps layer 0"
    );
    for m in &manifests {
        for o in &m.objects {
            assert!(
                !o.key.starts_with('/') && !o.key.contains(".."),
                "{}",
                o.key
            );
        }
    }
    // A snapshot id is published once.
    let e = rt
        .block_on(upload(&store, &reqs[1], &no_progress))
        .unwrap_err();
    assert!(matches!(e, UploadError::Exists(_)), "{e}");

    // Move the whole store (another bucket or host), then select.
    let store_b = dir.join("elsewhere").join("store-b");
    std::fs::create_dir_all(store_b.parent().unwrap()).unwrap();
    std::fs::rename(&store_a, &store_b).unwrap();
    let store = SnapshotStore::open(&StoreConfig::local(&store_b)).unwrap();
    let ids: Vec<String> = rt
        .block_on(list(&store, INSTANCE))
        .unwrap()
        .into_iter()
        .map(|m| m.snapshot_id)
        .collect();
    assert_eq!(ids, ["0001", "0002", "0003"]);
    let at = |t| rt.block_on(select(&store, INSTANCE, &Selector::AtOrBefore(t)));
    assert_eq!(at(m2.wall_time_ns).unwrap().snapshot_id, "0002");
    assert_eq!(at(m3.wall_time_ns - 1).unwrap().snapshot_id, "0002");
    assert!(matches!(
        at(m1.wall_time_ns - 1),
        Err(RestoreError::NotFound { .. })
    ));
    let latest = rt
        .block_on(select(&store, INSTANCE, &Selector::Latest))
        .unwrap();
    assert_eq!(&latest, m3);

    // Materialise the last link into a fresh directory and restore it.
    let dest = dir.join("restore-1");
    let mat = rt
        .block_on(materialize(
            &store,
            INSTANCE,
            &Selector::Latest,
            &dest,
            &RestoreOptions::default(),
        ))
        .expect("materialise");
    assert_eq!(mat.chain, ["0001", "0002", "0003"]);
    assert_eq!(mat.snapshot_dir, dest.join("0003"));
    assert_eq!(mat.disk_layers.len(), 2);
    assert_eq!(
        (mat.disk_layers[0].position, mat.disk_layers[1].position),
        (0, 1)
    );
    assert_eq!(
        std::fs::read(&mat.disk_layers[0].path).unwrap(),
        std::fs::read(&vda0).unwrap()
    );
    assert_eq!(
        std::fs::read(&mat.disk_layers[1].path).unwrap(),
        std::fs::read(&vda1).unwrap()
    );
    restore_and_check(&elf, &dir.join("work-1"), &mat.snapshot_dir, &chain.expect);

    // A non-empty destination is refused.
    let e = rt
        .block_on(materialize(
            &store,
            INSTANCE,
            &Selector::Latest,
            &dest,
            &RestoreOptions::default(),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");

    // Another host: refused with a clear message unless overridden.
    let other = HostInfo {
        cpu_model: "Imaginary CPU 9000".into(),
        tsc_khz: Some(1_234_567),
    };
    let opts = RestoreOptions {
        allow_host_mismatch: false,
        host: Some(other.clone()),
    };
    let e = rt
        .block_on(materialize(
            &store,
            INSTANCE,
            &Selector::Id("0002".into()),
            &dir.join("restore-2"),
            &opts,
        ))
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RestoreError::HostMismatch { .. }), "{msg}");
    assert!(msg.contains("Imaginary CPU 9000"), "{msg}");
    assert!(msg.contains("allow_host_mismatch"), "{msg}");
    let opts = RestoreOptions {
        allow_host_mismatch: true,
        host: Some(other),
    };
    let mat = rt
        .block_on(materialize(
            &store,
            INSTANCE,
            &Selector::Id("0002".into()),
            &dir.join("restore-2"),
            &opts,
        ))
        .expect("overridden host check");
    assert_eq!(mat.chain, ["0001", "0002"]);
}

/// Materialises the latest snapshot of a copy of `pristine` damaged by
/// `damage`, returning the error.
fn restore_damaged(
    rt: &tokio::runtime::Runtime,
    pristine: &Path,
    work: &Path,
    damage: impl FnOnce(&Path),
) -> RestoreError {
    let root = work.join("store");
    copy_tree(pristine, &root);
    damage(&root);
    let store = SnapshotStore::open(&StoreConfig::local(&root)).unwrap();
    let r = rt.block_on(materialize(
        &store,
        "vm-bad",
        &Selector::Id("0002".into()),
        &work.join("dest"),
        &RestoreOptions::default(),
    ));
    match r {
        Ok(m) => panic!("a damaged store restored: {:?}", m.snapshot_dir),
        Err(e) => e,
    }
}

#[test]
// Heavy: needs /dev/kvm.
fn damaged_objects_and_manifests_are_refused_by_name() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inst = boot(dir, "vm-bad", &elf, 32);
    let m = microvm(inst.as_ref());
    dirty(m, &[1, 2]);
    let (d1, _) = snapshot(inst.as_ref(), &dir.join("snaps"), "0001", MemoryKind::Full);
    dirty(m, &[2, 4]);
    let (d2, _) = snapshot(
        inst.as_ref(),
        &dir.join("snaps"),
        "0002",
        MemoryKind::Incremental,
    );
    inst.stop(Duration::from_secs(5)).expect("stop");
    let vda0 = layer_file(&dir.join("layers"), "vda0", 100_000, 3);

    let rt = runtime();
    let pristine = dir.join("pristine");
    let store = SnapshotStore::open(&StoreConfig::local(&pristine)).unwrap();
    let m1 = rt
        .block_on(upload(
            &store,
            &request(&d1, 1, vec![layer("vda", 0, vda0)]),
            &no_progress,
        ))
        .unwrap();
    let m2 = rt
        .block_on(upload(&store, &request(&d2, 2, vec![]), &no_progress))
        .unwrap();
    // Bad uploads: an incremental whose base is not in the store, a
    // directory that is not a snapshot, an invalid id.
    let other = SnapshotStore::open(&StoreConfig::local(&dir.join("other"))).unwrap();
    let e = rt
        .block_on(upload(&other, &request(&d2, 2, vec![]), &no_progress))
        .unwrap_err();
    assert!(
        matches!(e, UploadError::Base { ref base, .. } if base == "0001"),
        "{e}"
    );
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let e = rt
        .block_on(upload(
            &other,
            &request(&dir.join("empty"), 1, vec![]),
            &no_progress,
        ))
        .unwrap_err();
    assert!(format!("{e:?}").contains("artifacts.json"), "{e:?}");
    let mut bad_id = request(&d1, 1, vec![]);
    bad_id.snapshot_id = "../up".into();
    let e = rt
        .block_on(upload(&other, &bad_id, &no_progress))
        .unwrap_err();
    assert!(e.to_string().contains("not a valid id"), "{e}");
    let e = rt
        .block_on(select(&other, "vm-bad", &Selector::Latest))
        .unwrap_err();
    assert!(matches!(e, RestoreError::NotFound { .. }), "{e}");

    // The undamaged copy restores.
    let ok = rt.block_on(materialize(
        &store,
        "vm-bad",
        &Selector::Id("0002".into()),
        &dir.join("ok"),
        &RestoreOptions::default(),
    ));
    assert_eq!(ok.expect("pristine store restores").chain, ["0001", "0002"]);

    // A flipped byte in each object, of every kind, of both links.
    let mut kinds = HashSet::new();
    let mut case = 0;
    let objects: Vec<_> = m1
        .objects
        .iter()
        .chain(
            m2.objects
                .iter()
                .filter(|o| o.kind != ObjectKind::DiskLayer),
        )
        .cloned()
        .collect();
    for o in &objects {
        case += 1;
        let work = dir.join(format!("flip-{case}"));
        let e = restore_damaged(&rt, &pristine, &work, |root| {
            flip_byte(&object_path(root, "vm-bad", &o.key), o.size / 2)
        });
        let msg = e.to_string();
        assert!(
            matches!(&e, RestoreError::Object { object, kind, .. } if *object == format!("vm-bad/{}", o.key) && *kind == o.kind),
            "flipping a byte of {}: {msg}",
            o.key
        );
        assert!(msg.contains("sha256"), "{msg}");
        kinds.insert(o.kind);
    }
    for k in [
        ObjectKind::Memory,
        ObjectKind::State,
        ObjectKind::Devices,
        ObjectKind::Artifacts,
        ObjectKind::DiskLayer,
    ] {
        assert!(kinds.contains(&k), "no {k} object was damaged");
    }

    // Truncated.
    let mem = m2
        .objects
        .iter()
        .find(|o| o.kind == ObjectKind::Memory)
        .unwrap();
    let e = restore_damaged(&rt, &pristine, &dir.join("truncate"), |root| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(object_path(root, "vm-bad", &mem.key))
            .unwrap();
        f.set_len(mem.size - 1).unwrap();
    });
    let msg = e.to_string();
    assert!(msg.contains(&format!("vm-bad/{}", mem.key)), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");

    // Deleted.
    let state = m1
        .objects
        .iter()
        .find(|o| o.kind == ObjectKind::State)
        .unwrap();
    let e = restore_damaged(&rt, &pristine, &dir.join("delete"), |root| {
        std::fs::remove_file(object_path(root, "vm-bad", &state.key)).unwrap()
    });
    let msg = e.to_string();
    assert!(msg.contains(&format!("vm-bad/{}", state.key)), "{msg}");
    assert!(msg.contains("missing"), "{msg}");

    // The manifest edited: a field changed, an object's size changed, the
    // base's manifest changed, or cut short.
    let edit = |file: &str, from: &str, to: &str| {
        let (file, from, to) = (file.to_string(), from.to_string(), to.to_string());
        move |root: &Path| {
            let p = root.join("vm-bad").join(&file);
            let s = std::fs::read_to_string(&p).unwrap();
            assert!(s.contains(&from), "{from:?} in {s}");
            std::fs::write(&p, s.replacen(&from, &to, 1)).unwrap();
        }
    };
    type Damage = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "seq",
            Box::new(edit(
                "0002/manifest.json",
                "\"seq_at_cut\": 2",
                "\"seq_at_cut\": 3",
            )),
            "vm-bad/0002/manifest.json does not match its digest",
        ),
        (
            "size",
            Box::new(edit(
                "0002/manifest.json",
                &format!("\"size\": {}", mem.size),
                &format!("\"size\": {}", mem.size + 1),
            )),
            "vm-bad/0002/manifest.json does not match its digest",
        ),
        (
            "base",
            Box::new(edit(
                "0001/manifest.json",
                "\"seq_at_cut\": 1",
                "\"seq_at_cut\": 5",
            )),
            "vm-bad/0001/manifest.json does not match its digest",
        ),
        (
            "cut",
            Box::new(|root: &Path| {
                let p = root.join("vm-bad/0002/manifest.json");
                let s = std::fs::read(&p).unwrap();
                std::fs::write(&p, &s[..s.len() / 2]).unwrap();
            }),
            "vm-bad/0002/manifest.json is malformed",
        ),
    ];
    for (name, damage, want) in cases {
        let e = restore_damaged(
            &rt,
            &pristine,
            &dir.join(format!("manifest-{name}")),
            damage,
        );
        let msg = e.to_string();
        assert!(matches!(e, RestoreError::Manifest { .. }), "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }
    // A damaged manifest is left out of listings; the others stay.
    let root = dir.join("listing");
    copy_tree(&pristine, &root);
    edit(
        "0002/manifest.json",
        "\"seq_at_cut\": 2",
        "\"seq_at_cut\": 9",
    )(&root);
    let store = SnapshotStore::open(&StoreConfig::local(&root)).unwrap();
    let latest = rt
        .block_on(select(&store, "vm-bad", &Selector::Latest))
        .unwrap();
    assert_eq!(latest.snapshot_id, "0001");
}
