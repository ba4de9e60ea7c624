//! Machine images in an object store: an image directory stored under
//! `<prefix>/images/<name>/`, with the same relative layout as on disk
//! (`image.toml` and the files it names). The replayer and the agent fetch an
//! image into a local directory and load it with [`MachineImage::load`], which
//! validates it as it would a local image.
//!
//! Each file is uploaded before `image.toml`, so an interrupted upload never
//! leaves a manifest that names a missing file; a fetch checks each file's
//! size against the store's.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;
use vmr_hypervisor::image::{DiskSource, MachineImage, IMAGE_FILE};

use crate::store::SnapshotStore;

/// The namespace images live under in a store, beside the instances.
pub const IMAGES: &str = "images";

/// What went wrong storing or fetching an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image (or its manifest) is invalid.
    #[error("image")]
    Invalid(#[source] vmr_hypervisor::DriverError),
    /// A file of the image is not in the store.
    #[error("image {image}: {file} is missing from the store")]
    Missing {
        /// Image name.
        image: String,
        /// File, relative to the image.
        file: String,
    },
    /// A fetched file is not the size the store reports.
    #[error("image {image}: {file} is {got} bytes, the store has {want}")]
    Size {
        /// Image name.
        image: String,
        /// File.
        file: String,
        /// Bytes received.
        got: u64,
        /// Bytes the store reports.
        want: u64,
    },
    /// The store failed.
    #[error("image {image}: {file}: store")]
    Store {
        /// Image name.
        image: String,
        /// File.
        file: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// A local file could not be read or written.
    #[error("{path}")]
    Local {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn files_of(image: &MachineImage) -> Vec<PathBuf> {
    let mut files = vec![image.kernel.clone()];
    files.extend(image.initrd.clone());
    for d in &image.disks {
        if let DiskSource::File(f) = &d.source {
            files.push(f.clone());
        }
    }
    files
}

fn relative(image: &MachineImage, file: &Path) -> String {
    file.strip_prefix(&image.dir)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// Uploads the image in `dir` to `store` under `images/<name>/`, the files
/// first and `image.toml` last. Returns the loaded image.
pub async fn upload_image(store: &SnapshotStore, dir: &Path) -> Result<MachineImage, ImageError> {
    let image = MachineImage::load(dir).map_err(ImageError::Invalid)?;
    let mut files: Vec<String> = files_of(&image)
        .iter()
        .map(|f| relative(&image, f))
        .collect();
    files.push(IMAGE_FILE.to_string());
    for rel in files {
        let path = image.dir.join(&rel);
        let local = |source| ImageError::Local {
            path: path.clone(),
            source,
        };
        let store_err = |source| ImageError::Store {
            image: image.name.clone(),
            file: rel.clone(),
            source,
        };
        let mut src = tokio::fs::File::open(&path).await.map_err(local)?;
        let loc = store.location(IMAGES, &format!("{}/{rel}", image.name));
        let mut w = BufWriter::new(store.inner.clone(), loc);
        if let Err(e) = tokio::io::copy(&mut src, &mut w).await {
            let _ = w.abort().await;
            return Err(local(e));
        }
        w.shutdown().await.map_err(|e| {
            store_err(object_store::Error::Generic {
                store: "image upload",
                source: Box::new(e),
            })
        })?;
    }
    Ok(image)
}

async fn fetch_file(
    store: &SnapshotStore,
    name: &str,
    rel: &str,
    dest: &Path,
) -> Result<(), ImageError> {
    let loc = store.location(IMAGES, &format!("{name}/{rel}"));
    let got = match store.inner.get(&loc).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ImageError::Missing {
                image: name.into(),
                file: rel.into(),
            })
        }
        Err(source) => {
            return Err(ImageError::Store {
                image: name.into(),
                file: rel.into(),
                source,
            })
        }
    };
    let want = got.meta.size;
    let path = dest.join(rel);
    let local = |source| ImageError::Local {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(local)?;
    }
    let mut f = tokio::fs::File::create(&path).await.map_err(local)?;
    let mut stream = got.into_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| ImageError::Store {
            image: name.into(),
            file: rel.into(),
            source,
        })?;
        size += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(local)?;
    }
    f.sync_all().await.map_err(local)?;
    if size != want {
        return Err(ImageError::Size {
            image: name.into(),
            file: rel.into(),
            got: size,
            want,
        });
    }
    Ok(())
}

/// Fetches image `name` from `store` into `dest` (created if missing) and
/// loads it: `image.toml` first, then every file it names.
pub async fn fetch_image(
    store: &SnapshotStore,
    name: &str,
    dest: &Path,
) -> Result<MachineImage, ImageError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(ImageError::Missing {
            image: name.into(),
            file: IMAGE_FILE.into(),
        });
    }
    fetch_file(store, name, IMAGE_FILE, dest).await?;
    let text = tokio::fs::read_to_string(dest.join(IMAGE_FILE))
        .await
        .map_err(|source| ImageError::Local {
            path: dest.join(IMAGE_FILE),
            source,
        })?;
    // Names the files to fetch; the full validation runs once they are here.
    #[derive(serde::Deserialize)]
    struct Files {
        boot: Boot,
        #[serde(default)]
        disks: Vec<Disk>,
    }
    #[derive(serde::Deserialize)]
    struct Boot {
        kernel: String,
        initrd: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Disk {
        file: Option<String>,
    }
    let files: Files = toml::from_str(&text).map_err(|e| {
        ImageError::Invalid(vmr_hypervisor::DriverError::Image {
            image: dest.to_path_buf(),
            field: IMAGE_FILE.into(),
            reason: e.message().to_string(),
        })
    })?;
    let mut names = vec![files.boot.kernel];
    names.extend(files.boot.initrd);
    names.extend(files.disks.into_iter().filter_map(|d| d.file));
    for rel in names {
        if Path::new(&rel)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ImageError::Invalid(vmr_hypervisor::DriverError::Image {
                image: dest.to_path_buf(),
                field: "files".into(),
                reason: format!("{rel:?} must be a relative path inside the image"),
            }));
        }
        fetch_file(store, name, &rel, dest).await?;
    }
    MachineImage::load(dest).map_err(ImageError::Invalid)
}
