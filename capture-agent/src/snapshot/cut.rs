//! The snapshot cut of one recorded instance, one unit of work.
//!
//! 1. Read, for every event topic, the high watermark of the instance's
//!    partition (before the pause: every event numbered after the cut is
//!    produced after this, so it lands at or after these offsets).
//! 2. Pause the guest through the driver (QEMU `stop`, the microVM's pause:
//!    both stop the vhost-user queues with GET_VRING_BASE).
//! 3. `checkpoint` every device backend: idle, capture durable, `seq` read,
//!    and for disks the top layer frozen and a new one opened.
//! 4. `seq_at_cut` = the instance's counter (last number handed out) after
//!    every device acknowledged.
//! 5. Save the execution state through the driver (the guest stays paused;
//!    staged: the microVM writes its files without syncing them).
//! 6. Record a `Lifecycle` snapshot event in the agent's event log.
//! 7. Resume; the pause is what the guest saw of the cut. Then the driver
//!    makes the snapshot durable (the microVM's fsyncs run here, after the
//!    resume); nothing below starts before.
//! 8. Pack each newly frozen disk layer, upload with `vmr-snapshot` (only
//!    new layers; the chain below is taken over from the base snapshot),
//!    manifest last, then (unless publishing is off) publish it on
//!    `vmr.snapshots.v1`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use vmr_hypervisor::{MemoryKind, RunState, SnapshotOptions, StagedSnapshot};
use vmr_proto::domain::LifecycleKind;
use vmr_snapshot::{DiskLayerFile, Manifest, PartitionOffset, SnapshotStore, UploadRequest};

use crate::instance::RecordedInstance;
use crate::supervisor::BackendKind;
use vmr_proto::config::Endpoints;

/// A disk's layer directory: `<data>/<instance>/<device>.layers` (the
/// backend's first top layer is `base` in it).
pub fn layer_dir(inst: &RecordedInstance, device: &str) -> PathBuf {
    inst.dirs().root.join(format!("{device}.layers"))
}

/// Errors of a cut.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    /// The guest is not running under the driver.
    #[error("the instance has no running guest")]
    NoGuest,
    /// The broker could not tell the partitions' ends.
    #[error("cannot read the offsets of {topic}: {reason}")]
    Offsets { topic: String, reason: String },
    /// The driver refused or failed.
    #[error("driver: {0}")]
    Driver(String),
    /// A device backend refused or failed its checkpoint.
    #[error("checkpoint of device {device}")]
    Checkpoint {
        device: String,
        #[source]
        source: vhost_tap::checkpoint::CheckpointError,
    },
    /// A disk backend did not freeze a layer.
    #[error("device {0} answered the checkpoint without a frozen layer")]
    NoLayer(String),
    /// Local files.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Packing a layer.
    #[error("cannot pack disk layer {0}")]
    Pack(PathBuf, #[source] vhost_tap::blk::DiskError),
    /// The upload failed; no manifest was written.
    #[error("upload")]
    Upload(#[from] vmr_snapshot::UploadError),
    /// The lifecycle event could not be recorded.
    #[error("lifecycle event")]
    Event(#[from] crate::events::EventsError),
    /// Publishing the manifest failed (it is in the store).
    #[error("snapshot {0} is stored but was not published: {1}")]
    Publish(String, String),
}

/// Settings of a cut.
#[derive(Debug, Clone)]
pub struct CutOptions {
    /// Snapshot id (a key segment; the staging directory's name).
    pub snapshot_id: String,
    /// Full or incremental memory (incremental: microVM only).
    pub memory: MemoryKind,
    /// The snapshot this one builds on (disk layers below the new ones,
    /// and the memory base of an incremental one).
    pub base: Option<Manifest>,
    /// Where driver snapshots and packed layers are staged.
    pub staging: PathBuf,
    /// How long each backend may take to answer its checkpoint.
    pub checkpoint_timeout: Duration,
    /// Broker request timeout (offsets, publishing).
    pub broker_timeout: Duration,
    /// Publish the manifest on `vmr.snapshots.v1`.
    pub publish: bool,
    /// Kafka and Schema Registry.
    pub endpoints: Endpoints,
}

/// A stage of the cut, reported as it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Offsets,
    Pausing,
    Cut,
    Saving,
    Resumed { pause_us: u64 },
    Packing,
    Uploading { done: u64, total: u64 },
    Publishing,
}

impl Stage {
    /// Its name in an operation's status.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Offsets => "offsets",
            Stage::Pausing => "pausing",
            Stage::Cut => "cut",
            Stage::Saving => "saving",
            Stage::Resumed { .. } => "resumed",
            Stage::Packing => "packing",
            Stage::Uploading { .. } => "uploading",
            Stage::Publishing => "manifest",
        }
    }
}

/// What a cut produced.
#[derive(Debug, Clone)]
pub struct CutReport {
    /// The manifest (stored, and published if asked).
    pub manifest: Manifest,
    /// Guest-visible pause.
    pub pause: Duration,
    /// Bytes uploaded (new objects only).
    pub uploaded_bytes: u64,
    /// Time from resume to the manifest stored.
    pub upload_time: Duration,
    /// Time from resume to the driver's snapshot files durable (part of
    /// `upload_time`: nothing is uploaded before).
    pub durable_time: Duration,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CutError {
    let what = what.into();
    move |source| CutError::Io { what, source }
}

fn kafka_config(inst: &RecordedInstance, ep: &Endpoints) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &ep.bootstrap_servers)
        .set("client.id", format!("capture-agent/snapshot/{}", inst.id()));
    for (k, v) in ep.kafka_security.client_properties() {
        c.set(k, v);
    }
    c
}

/// The high watermark of the instance's partition on each event topic.
pub fn partition_ends(
    inst: &RecordedInstance,
    ep: &Endpoints,
    timeout: Duration,
) -> Result<Vec<PartitionOffset>, CutError> {
    let mut cfg = kafka_config(inst, ep);
    cfg.set("group.id", format!("vmr-snapshot-{}", inst.id()))
        .set("enable.auto.commit", "false");
    let err = |topic: &str| {
        let topic = topic.to_string();
        move |e: rdkafka::error::KafkaError| CutError::Offsets {
            topic,
            reason: e.to_string(),
        }
    };
    let consumer: BaseConsumer = cfg.create().map_err(err("(client)"))?;
    let mut out = Vec::new();
    for topic in vmr_proto::topics::EVENT_TOPICS {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(err(topic))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        if n == 0 {
            return Err(CutError::Offsets {
                topic: topic.into(),
                reason: "the topic does not exist".into(),
            });
        }
        let partition = inst.id().partition(n);
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(err(topic))?;
        out.push(PartitionOffset {
            topic: topic.into(),
            partition,
            next_offset: high,
        });
    }
    Ok(out)
}

/// A disk's frozen layers after its checkpoint, bottom first.
type DiskChain = (String, Vec<PathBuf>);

/// What the cut saved while the guest was paused: `seq_at_cut`, the disks'
/// chains and the driver's staged snapshot.
type Saved<'a> = (u64, Vec<DiskChain>, Box<dyn StagedSnapshot + 'a>);

/// Takes one snapshot of `inst` into `store`; `progress` hears each stage.
pub fn take(
    inst: &RecordedInstance,
    store: &SnapshotStore,
    rt: &tokio::runtime::Runtime,
    opts: &CutOptions,
    progress: &(dyn Fn(Stage) + Send + Sync),
) -> Result<CutReport, CutError> {
    let guest = inst.guest().ok_or(CutError::NoGuest)?;
    progress(Stage::Offsets);
    let offsets = partition_ends(inst, &opts.endpoints, opts.broker_timeout)?;
    let dir = opts.staging.join(&opts.snapshot_id);
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;

    progress(Stage::Pausing);
    let was_running = guest
        .query()
        .map_err(|e| CutError::Driver(vmr_hypervisor::error_chain(&e)))?
        .state
        == RunState::Running;
    let t0 = Instant::now();
    let (_, mono_at_cut) = now_ns();
    if was_running {
        guest
            .pause()
            .map_err(|e| CutError::Driver(vmr_hypervisor::error_chain(&e)))?;
    }
    // From here on the guest is resumed whatever happens.
    let cut = (|| -> Result<Saved<'_>, CutError> {
        progress(Stage::Cut);
        let mut chains = Vec::new();
        for d in inst.devices() {
            let disk = matches!(d.kind, BackendKind::Blk { .. });
            let next = disk.then(|| layer_dir(inst, &d.name).join(&opts.snapshot_id));
            let r = vhost_tap::checkpoint::request(
                &inst.dirs().control(&d.name),
                next.as_deref(),
                opts.checkpoint_timeout,
            )
            .map_err(|source| CutError::Checkpoint {
                device: d.name.clone(),
                source,
            })?;
            if disk {
                if r.frozen_layer.is_none() {
                    return Err(CutError::NoLayer(d.name.clone()));
                }
                chains.push((d.name.clone(), r.chain));
            }
        }
        let seq_at_cut = inst.events().seq().peek().saturating_sub(1);
        progress(Stage::Saving);
        // Staged: the execution state is saved now; the driver makes it
        // durable after the resume (the microVM's fsyncs are not part of
        // the pause).
        let staged = guest
            .snapshot_staged(
                &dir,
                SnapshotOptions {
                    memory: opts.memory,
                },
            )
            .map_err(|e| CutError::Driver(vmr_hypervisor::error_chain(&e)))?;
        inst.events().lifecycle(
            LifecycleKind::Snapshot,
            &format!("snapshot {} seq_at_cut {seq_at_cut}", opts.snapshot_id),
        )?;
        Ok((seq_at_cut, chains, staged))
    })();
    let resumed = if was_running {
        guest
            .resume()
            .map_err(|e| CutError::Driver(vmr_hypervisor::error_chain(&e)))
    } else {
        Ok(())
    };
    let pause = t0.elapsed();
    let t_up = Instant::now();
    let (seq_at_cut, chains, staged) = cut?;
    resumed?;
    progress(Stage::Resumed {
        pause_us: pause.as_micros() as u64,
    });
    // Durable before anything uploads it. The guest-visible pause is the
    // agent's (the driver saw a paused guest); artifacts.json carries it
    // into the manifest.
    staged
        .complete(was_running.then_some(pause))
        .map_err(|e| CutError::Driver(vmr_hypervisor::error_chain(&e)))?;
    let durable_time = t_up.elapsed();

    // New layers: those above what the base snapshot already holds.
    progress(Stage::Packing);
    let disk_dir = opts.staging.join(format!("{}.disk", opts.snapshot_id));
    std::fs::create_dir_all(&disk_dir)
        .map_err(io(format!("cannot create {}", disk_dir.display())))?;
    let mut layers = Vec::new();
    for (device, chain) in &chains {
        let have = opts.base.as_ref().map_or(0, |b| {
            b.disk_layers()
                .iter()
                .filter(|o| o.disk.as_ref().is_some_and(|d| &d.device == device))
                .count()
        });
        for (pos, layer) in chain.iter().enumerate().skip(have) {
            let out = disk_dir.join(format!("{device}.{pos}"));
            vhost_tap::blk::pack_layer(layer, &out)
                .map_err(|e| CutError::Pack(layer.clone(), e))?;
            layers.push(DiskLayerFile {
                device: device.clone(),
                position: pos as u32,
                path: out,
            });
        }
    }
    let req = UploadRequest {
        dir: dir.clone(),
        snapshot_id: opts.snapshot_id.clone(),
        image: inst.image().name.clone(),
        seq_at_cut,
        mono_time_ns: mono_at_cut,
        offsets,
        disk_layers: layers,
        base_snapshot_id: match opts.memory {
            MemoryKind::Incremental => None,
            MemoryKind::Full => opts.base.as_ref().map(|b| b.snapshot_id.clone()),
        },
    };
    let report = |p: &vmr_snapshot::Progress| {
        progress(Stage::Uploading {
            done: p.bytes_done,
            total: p.bytes_total,
        })
    };
    let manifest = rt.block_on(vmr_snapshot::upload(store, &req, &report))?;
    let upload_time = t_up.elapsed();
    let uploaded_bytes = manifest
        .objects
        .iter()
        .filter(|o| o.key.starts_with(&format!("{}/", opts.snapshot_id)))
        .map(|o| o.size)
        .sum();
    let _ = std::fs::remove_dir_all(&disk_dir);
    if opts.publish {
        progress(Stage::Publishing);
        publish(inst, &opts.endpoints, rt, &manifest, opts.broker_timeout)
            .map_err(|e| CutError::Publish(manifest.snapshot_id.clone(), e))?;
    }
    Ok(CutReport {
        manifest,
        pause,
        uploaded_bytes,
        upload_time,
        durable_time,
    })
}

fn publish(
    inst: &RecordedInstance,
    ep: &Endpoints,
    rt: &tokio::runtime::Runtime,
    m: &Manifest,
    timeout: Duration,
) -> Result<(), String> {
    let url = &ep.registry_url;
    let client = schema_registry::client::RegistryClient::new(url).map_err(|e| e.to_string())?;
    let subject = vmr_proto::schemas::value_subject(vmr_proto::topics::SNAPSHOTS);
    let source = vmr_proto::schemas::topic_value_schemas()
        .into_iter()
        .find(|(t, _, _)| *t == vmr_proto::topics::SNAPSHOTS)
        .map(|(_, s, _)| s)
        .ok_or("no schema for vmr.snapshots.v1")?;
    let req = schema_registry::api::SchemaRequest::protobuf(source);
    let id = rt
        .block_on(client.register(&subject, &req))
        .map_err(|e| format!("schema registry at {url}: {e}"))?;
    let producer: rdkafka::producer::FutureProducer = kafka_config(inst, ep)
        .set("acks", "all")
        .create()
        .map_err(|e| e.to_string())?;
    rt.block_on(vmr_snapshot::publish(&producer, id as u32, m, timeout))
        .map(drop)
        .map_err(|e| e.to_string())
}

fn now_ns() -> (u64, u64) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    (wall, mono)
}

/// Removes a staging directory, ignoring one that is gone.
pub fn remove_staging(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
