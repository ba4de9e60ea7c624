//! The snapshot round trip against a real S3-compatible server (s3s-fs,
//! installed by `scripts/s3-server.sh`) started on 127.0.0.1 by the test:
//! a microVM chain uploaded with multipart, listed, materialised and
//! restored through the driver; a byte flipped on the server refused by
//! name; S3 settings taken from the environment.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmr_snapshot::{
    list, materialize, progress_watch, upload, DiskLayerFile, ObjectKind, RestoreError,
    RestoreOptions, S3Config, Selector, SnapshotStore, StoreConfig, UploadRequest,
};
use vmr_testkit::{free_port, ChildGuard};

const S3S_FS_VERSION: &str = "0.14.1";
const ACCESS_KEY: &str = "vmr-test-access";
const SECRET_KEY: &str = "vmr-test-secret-key";
const BUCKET: &str = "snapshots";

fn s3s_fs() -> PathBuf {
    let p = match std::env::var_os("VMR_S3S_FS") {
        Some(p) => PathBuf::from(p),
        None => vmr_testkit::cache_dir()
            .join(format!("s3s-fs-{S3S_FS_VERSION}"))
            .join("bin")
            .join("s3s-fs"),
    };
    assert!(
        p.is_file(),
        "this test needs the s3s-fs S3 server at {} (set $VMR_S3S_FS to override); install it with \
         scripts/s3-server.sh, which runs `cargo install s3s-fs --version {S3S_FS_VERSION} --features binary --locked --root ~/.cache/vmreplay/s3s-fs-{S3S_FS_VERSION}`",
        p.display()
    );
    p
}

struct S3Server {
    _child: ChildGuard,
    port: u16,
    root: PathBuf,
}

fn start_s3(root: &Path) -> S3Server {
    let bin = s3s_fs();
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = ChildGuard::spawn("s3s-fs", &mut cmd).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "s3s-fs did not listen on 127.0.0.1:{port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    S3Server {
        _child: child,
        port,
        root: root.to_path_buf(),
    }
}

fn s3_config(port: u16) -> StoreConfig {
    let mut cfg = StoreConfig::new(format!("s3://{BUCKET}/fleet-a/snapshots"));
    cfg.s3 = S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..Default::default()
    };
    cfg
}

fn request(dir: &Path, layers: Vec<DiskLayerFile>) -> UploadRequest {
    UploadRequest {
        dir: dir.to_path_buf(),
        snapshot_id: dir.file_name().unwrap().to_string_lossy().into_owned(),
        image: "test-guest".into(),
        seq_at_cut: 11,
        mono_time_ns: 0,
        offsets: vec![],
        disk_layers: layers,
        base_snapshot_id: None,
    }
}

#[test]
// Heavy: needs /dev/kvm and s3s-fs (scripts/s3-server.sh).
fn microvm_chain_round_trips_through_an_s3_server() {
    s3s_fs();
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = start_s3(&dir.join("s3-root"));

    let inst = boot(dir, "vm-s3", &elf, 32);
    let chain = chain_of_three(inst.as_ref(), dir);
    inst.stop(Duration::from_secs(5)).expect("stop");
    let layer = dir.join("vda.layer");
    std::fs::write(&layer, vec![0xa5u8; 6 * 1024 * 1024 + 5]).unwrap();

    let rt = runtime();
    let store = SnapshotStore::open(&s3_config(server.port)).expect("open the S3 store");
    for (i, d) in chain.dirs.iter().enumerate() {
        let layers = if i == 0 {
            vec![DiskLayerFile {
                device: "vda".into(),
                position: 0,
                path: layer.clone(),
            }]
        } else {
            vec![]
        };
        let (report, progress) = progress_watch();
        let m = rt
            .block_on(upload(&store, &request(d, layers), &report))
            .unwrap_or_else(|e| panic!("upload {}: {e:?}", d.display()));
        assert!(m.objects.iter().all(|o| o.size > 0));
        let last = progress.borrow().clone();
        assert_eq!(last.bytes_done, last.bytes_total, "{last:?}");
        assert_eq!(last.objects_done, last.objects_total, "{last:?}");
        assert!(last.bytes_total > 0);
    }
    // The server holds the objects under the bucket and prefix.
    let on_server = server.root.join(BUCKET).join("fleet-a/snapshots/vm-s3");
    assert!(on_server.join("0003/manifest.json").is_file());
    assert!(on_server.join("0001/disk/vda.0").is_file());

    // S3 settings from the environment work the same way.
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{}", server.port));
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    let env_store = SnapshotStore::open(&StoreConfig::new(format!(
        "s3://{BUCKET}/fleet-a/snapshots"
    )))
    .expect("open from the environment");
    let ids: Vec<String> = rt
        .block_on(list(&env_store, "vm-s3"))
        .unwrap()
        .into_iter()
        .map(|m| m.snapshot_id)
        .collect();
    assert_eq!(ids, ["0001", "0002", "0003"]);

    let mat = rt
        .block_on(materialize(
            &store,
            "vm-s3",
            &Selector::Latest,
            &dir.join("restore"),
            &RestoreOptions::default(),
        ))
        .expect("materialise from S3");
    assert_eq!(mat.chain, ["0001", "0002", "0003"]);
    assert_eq!(mat.disk_layers.len(), 1);
    assert_eq!(
        std::fs::read(&mat.disk_layers[0].path).unwrap(),
        std::fs::read(&layer).unwrap()
    );
    restore_and_check(&elf, &dir.join("work"), &mat.snapshot_dir, &chain.expect);

    // A byte flipped on the server is refused, naming the object.
    let m2 = rt
        .block_on(vmr_snapshot::load_manifest(&store, "vm-s3", "0002"))
        .unwrap();
    let mem = m2
        .objects
        .iter()
        .find(|o| o.kind == ObjectKind::Memory)
        .unwrap();
    flip_byte(&on_server.join(&mem.key), 10);
    let e = rt
        .block_on(materialize(
            &store,
            "vm-s3",
            &Selector::Latest,
            &dir.join("restore-bad"),
            &RestoreOptions::default(),
        ))
        .unwrap_err();
    assert!(
        matches!(&e, RestoreError::Object { object, .. } if *object == format!("vm-s3/{}", mem.key)),
        "{e}"
    );
    assert!(e.to_string().contains("sha256"), "{e}");
    let port = server.port;
    drop(server);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "s3s-fs is stopped with the test"
    );
}
