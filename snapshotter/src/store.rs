//! The object store snapshots live in: the local filesystem
//! (`file:///path`, the default) or an S3-compatible server
//! (`s3://bucket/prefix`).
//!
//! Layout under the store's prefix: `<instance>/<snapshot-id>/<file>` for
//! objects and `<instance>/<snapshot-id>/manifest.json` for the manifest.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;
use serde::Deserialize;

/// Default size of one multipart part (and of the largest object sent in
/// a single request).
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Default number of parts in flight per object.
pub const DEFAULT_CONCURRENCY: usize = 2;

/// Errors opening a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not `file:///...` or `s3://bucket[/prefix]`.
    #[error("store URL {url:?} is not supported: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why not.
        reason: String,
    },
    /// The local directory cannot be created.
    #[error("cannot create the store directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The object store client refused the configuration.
    #[error("cannot open the store {url}")]
    Open {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// A setting is out of range.
    #[error("store setting {setting} is invalid: {reason}")]
    Setting {
        /// The setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

/// S3 settings. Each one left unset is taken from the environment
/// (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`), as the
/// AWS SDKs do.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:9000`);
    /// unset for AWS.
    pub endpoint: Option<String>,
    /// Region (`us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (local servers).
    pub allow_http: Option<bool>,
    /// Address buckets as `bucket.endpoint` (virtual-hosted style) rather
    /// than `endpoint/bucket` (path style, the default, which local servers
    /// need).
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

/// Where snapshots are stored and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct StoreConfig {
    /// `file:///absolute/path` (the default kind) or `s3://bucket[/prefix]`.
    pub url: String,
    /// On a `file://` store, fsync each object and its directory before the
    /// manifest is written, and the manifest after it (default true). An S3
    /// store's durability is the server's acknowledgement.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Size of one multipart part in bytes (at least 5 MiB, S3's minimum).
    #[serde(default = "part_size")]
    pub part_size: usize,
    /// Parts in flight per object; memory per upload stays below
    /// `(concurrency + 1) * part_size`.
    #[serde(default = "concurrency")]
    pub concurrency: usize,
    /// Upload bandwidth limit in bytes per second per upload (unset: as fast
    /// as the store takes it), so snapshots do not starve the host's other
    /// traffic.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// S3 settings (`s3://` URLs only).
    #[serde(default)]
    pub s3: S3Config,
}

fn yes() -> bool {
    true
}
fn part_size() -> usize {
    DEFAULT_PART_SIZE
}
fn concurrency() -> usize {
    DEFAULT_CONCURRENCY
}

impl StoreConfig {
    /// A store at `url` with the default settings.
    pub fn new(url: impl Into<String>) -> Self {
        StoreConfig {
            url: url.into(),
            fsync: true,
            part_size: DEFAULT_PART_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            max_bytes_per_sec: None,
            s3: S3Config::default(),
        }
    }

    /// A `file://` store rooted at the directory `dir`.
    pub fn local(dir: &FsPath) -> Self {
        Self::new(format!("file://{}", dir.display()))
    }
}

/// An opened snapshot store.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    pub(crate) inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    pub(crate) local_root: Option<PathBuf>,
    pub(crate) part_size: usize,
    pub(crate) concurrency: usize,
    pub(crate) max_bytes_per_sec: Option<u64>,
}

impl SnapshotStore {
    /// Opens the store `cfg` describes. A `file://` directory is created if
    /// missing.
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        if cfg.part_size < 5 * 1024 * 1024 {
            return Err(StoreError::Setting {
                setting: "part_size",
                reason: format!("{} is below S3's 5 MiB part minimum", cfg.part_size),
            });
        }
        if cfg.concurrency == 0 {
            return Err(StoreError::Setting {
                setting: "concurrency",
                reason: "must be at least 1".into(),
            });
        }
        let url_err = |reason: &str| StoreError::Url {
            url: cfg.url.clone(),
            reason: reason.into(),
        };
        let (inner, prefix, local_root): (Arc<dyn ObjectStore>, Path, Option<PathBuf>) =
            if let Some(path) = cfg.url.strip_prefix("file://") {
                let root = PathBuf::from(path);
                if !root.is_absolute() {
                    return Err(url_err(
                        "a file:// URL needs an absolute path (file:///dir)",
                    ));
                }
                std::fs::create_dir_all(&root).map_err(|source| StoreError::Dir {
                    path: root.clone(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(&root)
                    .map_err(|source| StoreError::Open {
                        url: cfg.url.clone(),
                        source,
                    })?
                    .with_fsync(cfg.fsync);
                (Arc::new(fs), Path::default(), Some(root))
            } else if let Some(rest) = cfg.url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(url_err("an s3:// URL needs a bucket (s3://bucket/prefix)"));
                }
                let prefix = Path::parse(prefix.trim_end_matches('/'))
                    .map_err(|e| url_err(&format!("bad prefix: {e}")))?;
                let s = &cfg.s3;
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(s.virtual_hosted_style);
                if let Some(v) = &s.endpoint {
                    b = b.with_endpoint(v);
                    if v.starts_with("http://") && s.allow_http.is_none() {
                        b = b.with_allow_http(true);
                    }
                }
                if let Some(v) = &s.region {
                    b = b.with_region(v);
                }
                if let Some(v) = &s.access_key_id {
                    b = b.with_access_key_id(v);
                }
                if let Some(v) = &s.secret_access_key {
                    b = b.with_secret_access_key(v);
                }
                if let Some(v) = &s.session_token {
                    b = b.with_token(v);
                }
                if let Some(v) = s.allow_http {
                    b = b.with_allow_http(v);
                }
                let s3 = b.build().map_err(|source| StoreError::Open {
                    url: cfg.url.clone(),
                    source,
                })?;
                (Arc::new(s3), prefix, None)
            } else {
                return Err(url_err("use file:///path or s3://bucket/prefix"));
            };
        Ok(SnapshotStore {
            inner,
            prefix,
            url: cfg.url.clone(),
            local_root,
            part_size: cfg.part_size,
            concurrency: cfg.concurrency,
            max_bytes_per_sec: cfg.max_bytes_per_sec.filter(|&r| r > 0),
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The local directory of a `file://` store.
    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    /// The location of `key` (relative to the instance's prefix).
    pub(crate) fn location(&self, instance: &str, key: &str) -> Path {
        let mut p = self.prefix.clone().join(instance);
        for part in key.split('/') {
            p = p.join(part);
        }
        p
    }

    /// The instance's prefix.
    pub(crate) fn instance_prefix(&self, instance: &str) -> Path {
        self.prefix.clone().join(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_opens() {
        let text = include_str!("../examples/store.toml");
        let cfg: StoreConfig = toml::from_str(text).expect("the example config parses");
        assert_eq!(cfg.url, "s3://vmr-snapshots/fleet-a");
        assert_eq!(cfg.s3.endpoint.as_deref(), Some("http://127.0.0.1:8014"));
        assert_eq!(cfg.max_bytes_per_sec, Some(100 << 20));
        let s = SnapshotStore::open(&cfg).expect("an S3 store opens without contacting it");
        assert_eq!(
            s.location("vm-1", "0001/memory.bin").as_ref(),
            "fleet-a/vm-1/0001/memory.bin"
        );
        let e = toml::from_str::<StoreConfig>("url = \"file:///x\"\nfsnyc = false\n").unwrap_err();
        assert!(e.to_string().contains("fsnyc"), "{e}");
        let cfg: StoreConfig = toml::from_str("url = \"file:///x\"").unwrap();
        assert!(cfg.fsync, "fsync is the default");
    }

    #[test]
    fn bad_settings_are_refused() {
        let e = |cfg: StoreConfig| SnapshotStore::open(&cfg).unwrap_err().to_string();
        assert!(e(StoreConfig::new("file://relative/dir")).contains("absolute path"));
        assert!(e(StoreConfig::new("s3:///prefix")).contains("needs a bucket"));
        assert!(e(StoreConfig::new("gs://bucket")).contains("use file:///path or s3://"));
        let mut c = StoreConfig::new("file:///tmp/x");
        c.part_size = 1024;
        assert!(e(c).contains("5 MiB"));
        let mut c = StoreConfig::new("file:///tmp/x");
        c.concurrency = 0;
        assert!(e(c).contains("at least 1"));
    }
}
