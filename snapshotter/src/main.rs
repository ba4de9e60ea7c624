//! `vmr-snapshot`: upload a driver's snapshot directory to a store, list an
//! instance's snapshots, or verify and materialise one for a restore.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmr_snapshot::{
    list, materialize, upload, PartitionOffset, Progress, RestoreOptions, Selector, SnapshotStore,
    StoreConfig, UploadRequest,
};

/// Snapshot store tool.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Store URL: file:///dir or s3://bucket/prefix (S3 settings from the
    /// AWS_* environment variables).
    #[arg(long, env = "VMR_SNAPSHOT_STORE")]
    store: String,
    /// Skip the fsync of objects and manifests on a file:// store.
    #[arg(long)]
    no_fsync: bool,
    /// Upload bandwidth limit in bytes per second.
    #[arg(long)]
    max_bytes_per_sec: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Uploads a snapshot directory; prints `progress <done> <total>` lines,
    /// then `uploaded <instance>/<id> <digest>`.
    Upload {
        /// The snapshot directory a driver wrote.
        #[arg(long)]
        dir: PathBuf,
        /// Snapshot id (default: the directory's name).
        #[arg(long)]
        id: Option<String>,
        /// Machine image the instance booted from.
        #[arg(long, default_value = "")]
        image: String,
        /// The instance's seq at the cut.
        #[arg(long, default_value_t = 0)]
        seq_at_cut: u64,
        /// Resume offsets, `topic:partition:offset` (repeatable).
        #[arg(long = "offset")]
        offsets: Vec<String>,
    },
    /// Lists an instance's complete snapshots, oldest cut first.
    List {
        /// The instance.
        instance: String,
    },
    /// Verifies and materialises a snapshot into a directory; prints the
    /// snapshot directory.
    Restore {
        /// The instance.
        instance: String,
        /// Snapshot id, `latest`, or `at:<wall-ns>` (latest at or before).
        #[arg(default_value = "latest")]
        which: String,
        /// Destination directory (missing or empty).
        #[arg(long)]
        dest: PathBuf,
        /// Restore even if the recording host's CPU differs.
        #[arg(long)]
        allow_host_mismatch: bool,
    },
}

fn parse_offset(s: &str) -> anyhow::Result<PartitionOffset> {
    let mut it = s.rsplitn(3, ':');
    let (Some(off), Some(part), Some(topic)) = (it.next(), it.next(), it.next()) else {
        anyhow::bail!("offset {s:?} is not topic:partition:offset");
    };
    Ok(PartitionOffset {
        topic: topic.into(),
        partition: part
            .parse()
            .with_context(|| format!("partition in {s:?}"))?,
        next_offset: off.parse().with_context(|| format!("offset in {s:?}"))?,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = StoreConfig::new(&cli.store);
    cfg.fsync = !cli.no_fsync;
    cfg.max_bytes_per_sec = cli.max_bytes_per_sec;
    let store = SnapshotStore::open(&cfg)?;
    match cli.cmd {
        Cmd::Upload {
            dir,
            id,
            image,
            seq_at_cut,
            offsets,
        } => {
            let snapshot_id = match id {
                Some(id) => id,
                None => dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("the directory has no name to use as the snapshot id")?
                    .to_string(),
            };
            let req = UploadRequest {
                dir,
                snapshot_id,
                image,
                seq_at_cut,
                mono_time_ns: 0,
                offsets: offsets
                    .iter()
                    .map(|s| parse_offset(s))
                    .collect::<anyhow::Result<_>>()?,
                disk_layers: vec![],
                base_snapshot_id: None,
            };
            let report = |p: &Progress| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "progress {} {}", p.bytes_done, p.bytes_total);
                let _ = out.flush();
            };
            let m = upload(&store, &req, &report).await?;
            println!("uploaded {} {}", m.key(), m.digest);
        }
        Cmd::List { instance } => {
            for m in list(&store, &instance).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{} bytes",
                    m.snapshot_id,
                    m.wall_time_ns,
                    m.base_snapshot_id.as_deref().unwrap_or("-"),
                    m.seq_at_cut,
                    m.total_bytes()
                );
            }
        }
        Cmd::Restore {
            instance,
            which,
            dest,
            allow_host_mismatch,
        } => {
            let sel = if which == "latest" {
                Selector::Latest
            } else if let Some(t) = which.strip_prefix("at:") {
                Selector::AtOrBefore(t.parse().context("at:<wall-ns>")?)
            } else {
                Selector::Id(which)
            };
            let opts = RestoreOptions {
                allow_host_mismatch,
                host: None,
            };
            let m = materialize(&store, &instance, &sel, &dest, &opts).await?;
            println!("{}", m.snapshot_dir.display());
        }
    }
    Ok(())
}
