//! Machine images through an object store: the demo-linux image uploaded to
//! a filesystem store, fetched into a fresh directory and loaded; a missing
//! or replaced file refused by name.

use std::path::PathBuf;

use vmr_snapshot::image::{fetch_image, upload_image, ImageError};
use vmr_snapshot::{SnapshotStore, StoreConfig};

fn demo_linux() -> PathBuf {
    let dir = vmr_testkit::cache_dir().join("demo-linux");
    assert!(
        dir.join("image.toml").is_file(),
        "the demo-linux image is missing at {} (build it with guest/linux/build.sh)",
        dir.display()
    );
    dir
}

#[test]
fn an_image_round_trips_through_a_store_and_damage_is_named() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = SnapshotStore::open(&StoreConfig::local(&tmp.path().join("store"))).expect("store");
    let original = rt
        .block_on(upload_image(&store, &demo_linux()))
        .expect("upload");

    let dest = tmp.path().join("fetched");
    let fetched = rt
        .block_on(fetch_image(&store, &original.name, &dest))
        .expect("fetch");
    assert_eq!(fetched.name, original.name);
    assert_eq!(fetched.cmdline, original.cmdline);
    assert_eq!(fetched.nics, original.nics);
    assert_eq!(
        std::fs::read(&fetched.kernel).expect("kernel"),
        std::fs::read(&original.kernel).expect("kernel")
    );
    assert!(fetched.dir.starts_with(dest.canonicalize().expect("dest")));

    // An unknown image, and a kernel missing from the store.
    let e = rt
        .block_on(fetch_image(&store, "no-such-image", &tmp.path().join("x")))
        .expect_err("unknown image");
    assert!(
        matches!(e, ImageError::Missing { ref file, .. } if file == "image.toml"),
        "{e}"
    );
    let kernel = original
        .kernel
        .file_name()
        .expect("kernel file")
        .to_string_lossy()
        .into_owned();
    std::fs::remove_file(
        tmp.path()
            .join("store/images")
            .join(&original.name)
            .join(&kernel),
    )
    .expect("remove the stored kernel");
    let e = rt
        .block_on(fetch_image(&store, &original.name, &tmp.path().join("y")))
        .expect_err("a kernel missing from the store");
    assert!(
        matches!(e, ImageError::Missing { ref file, .. } if *file == kernel),
        "{e}"
    );
}
