//! The agent's snapshot engine: the consistent cut ([`cut`]), operations the
//! gRPC service watches, pins, retention ([`vmr_snapshot::retention`]) and
//! staggered schedules ([`schedule`]).
//!
//! [`SnapshotEngine`] implements the service's
//! [`SnapshotControl`](crate::service::SnapshotControl): `take` starts an
//! operation on its own thread and returns at once; the operation reports
//! its stage (`offsets`, `pausing`, `cut`, `saving`, `resumed`, `packing`,
//! `uploading` with bytes, `manifest`) through a watch channel. One snapshot
//! of an instance runs at a time. After each cut the engine deletes what
//! interrupted snapshots of the instance left (store objects without a
//! manifest, [`vmr_snapshot::sweep_unfinished`], and staging directories
//! of an earlier agent process). After each snapshot the retention policy
//! deletes what it no longer keeps (pinned snapshots and the memory bases of
//! kept ones stay; objects a kept snapshot names stay).
//!
//! Scheduled snapshots: one [`schedule::HostSchedule`] per engine, which an
//! instance joins at its launch (with its period) and leaves at its stop;
//! the module [`schedule`] gives the staggering rule.

pub mod cut;
pub mod schedule;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use vmr_hypervisor::MemoryKind;
use vmr_proto::InstanceId;
use vmr_snapshot::{Manifest, Policy, SnapshotStore, StoreConfig};

use crate::instance::RecordedInstance;
use crate::service::{
    OperationState, OperationStatus, SnapshotControl, SnapshotControlError, SnapshotEntry,
    SnapshotRequest,
};

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The object store.
    pub store: StoreConfig,
    /// Where driver snapshots and packed layers are staged before upload.
    pub staging_dir: PathBuf,
    /// Where pins are kept (`<state>/<instance>.pins.json`).
    pub state_dir: PathBuf,
    /// Retention after each snapshot.
    pub policy: Policy,
    /// How long a backend may take to answer its checkpoint.
    pub checkpoint_timeout: Duration,
    /// Broker requests (offsets, publishing).
    pub broker_timeout: Duration,
    /// Publish manifests on `vmr.snapshots.v1`.
    pub publish: bool,
    /// Kafka and Schema Registry (offsets at the cut, publishing).
    pub endpoints: vmr_proto::config::Endpoints,
    /// Period of the scheduled snapshots of an instance launched without
    /// one of its own (zero: only on demand).
    pub default_period: Duration,
}

impl EngineConfig {
    /// A `file://` store at `store_dir`, staging and state under `work`,
    /// keep everything, publish.
    pub fn local(
        store_dir: &std::path::Path,
        work: &std::path::Path,
        endpoints: vmr_proto::config::Endpoints,
    ) -> Self {
        Self {
            store: StoreConfig::local(store_dir),
            staging_dir: work.join("staging"),
            state_dir: work.join("state"),
            policy: Policy::default(),
            checkpoint_timeout: Duration::from_secs(10),
            broker_timeout: Duration::from_secs(10),
            publish: true,
            endpoints,
            default_period: Duration::ZERO,
        }
    }

    /// The engine `capture-agent serve` runs, from the `[snapshots]` table
    /// (paths not given go under `<data-dir>/.snapshots/`).
    pub fn from_agent(cfg: &crate::config::AgentConfig) -> Self {
        let s = &cfg.snapshots;
        let base = cfg.agent.data_dir.join(".snapshots");
        let url = match &s.store_url {
            Some(u) => u.clone(),
            None if cfg.endpoints.object_store_url
                != vmr_proto::config::Endpoints::default().object_store_url =>
            {
                cfg.endpoints.object_store_url.clone()
            }
            None => format!("file://{}", base.join("store").display()),
        };
        let mut store = StoreConfig::new(url);
        store.fsync = s.fsync;
        store.max_bytes_per_sec = s.max_upload_bytes_per_sec;
        Self {
            store,
            staging_dir: s
                .staging_dir
                .clone()
                .unwrap_or_else(|| base.join("staging")),
            state_dir: s.state_dir.clone().unwrap_or_else(|| base.join("state")),
            policy: Policy {
                keep_last: s.keep_last,
                keep_within: s.keep_within_secs.map(Duration::from_secs),
            },
            checkpoint_timeout: Duration::from_secs(s.checkpoint_timeout_secs),
            broker_timeout: Duration::from_secs(s.broker_timeout_secs),
            publish: s.publish,
            endpoints: cfg.endpoints.clone(),
            default_period: Duration::from_secs(s.period_secs),
        }
    }
}

struct Inner {
    cfg: EngineConfig,
    store: SnapshotStore,
    rt: tokio::runtime::Runtime,
    ops: Mutex<HashMap<String, watch::Sender<OperationStatus>>>,
    busy: Mutex<HashSet<String>>,
    next_op: AtomicU64,
    last_id: Mutex<HashMap<String, String>>,
    /// Per instance, the staging directories of the current microVM chain.
    chains: Mutex<HashMap<String, Vec<String>>>,
    /// Operations between their start and the guest's resume.
    cutting: AtomicUsize,
    /// The host's scheduled snapshots.
    host: schedule::HostSchedule,
}

/// One operation's share of [`Inner::cutting`], given back once.
struct CutSlot<'a> {
    inner: &'a Inner,
    held: AtomicBool,
}

impl CutSlot<'_> {
    fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.inner.cutting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for CutSlot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The snapshot engine. Cheap to clone.
#[derive(Clone)]
pub struct SnapshotEngine {
    inner: Arc<Inner>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn unavailable(e: impl std::fmt::Display) -> SnapshotControlError {
    SnapshotControlError::Unavailable(e.to_string())
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

impl SnapshotEngine {
    /// Opens the store and starts the engine's runtime.
    pub fn new(cfg: EngineConfig) -> Result<Self, SnapshotControlError> {
        let store =
            SnapshotStore::open(&cfg.store).map_err(|e| SnapshotControlError::InvalidArgument {
                field: "store".into(),
                reason: chain(&e),
            })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapshot")
            .enable_all()
            .build()
            .map_err(|e| SnapshotControlError::Internal(e.to_string()))?;
        Ok(Self {
            inner: Arc::new_cyclic(|me| Inner {
                cfg,
                store,
                rt,
                ops: Mutex::new(HashMap::new()),
                busy: Mutex::new(HashSet::new()),
                next_op: AtomicU64::new(1),
                last_id: Mutex::new(HashMap::new()),
                chains: Mutex::new(HashMap::new()),
                cutting: AtomicUsize::new(0),
                host: schedule::HostSchedule::for_engine(me.clone()),
            }),
        })
    }

    /// Snapshots between their start and the guest's resume (what a
    /// scheduled cut waits for).
    pub fn cuts_running(&self) -> usize {
        self.inner.cutting.load(Ordering::Acquire)
    }

    /// The host's schedule.
    pub fn schedule(&self) -> &schedule::HostSchedule {
        &self.inner.host
    }

    /// Deletes what interrupted snapshots of `instance` left, other than
    /// `current` (the one just taken): store objects of ids without a
    /// manifest, and staging directories that are not links of the
    /// instance's current microVM chain. Returns the store ids removed.
    fn sweep(&self, instance: &str, current: &str) -> Vec<String> {
        let swept = match self.inner.rt.block_on(vmr_snapshot::sweep_unfinished(
            &self.inner.store,
            instance,
            &[current],
        )) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(%instance, error = %chain(&e), "cannot sweep unfinished snapshots");
                Vec::new()
            }
        };
        for id in &swept {
            tracing::info!(%instance, snapshot = %id, "unfinished snapshot removed from the store");
        }
        let chain: Vec<String> = self
            .inner
            .chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance)
            .cloned()
            .unwrap_or_default();
        let staging = self.inner.cfg.staging_dir.join(instance);
        for e in std::fs::read_dir(&staging).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != current && !chain.contains(&name) && e.path().is_dir() {
                tracing::info!(%instance, dir = %e.path().display(), "stale staging directory removed");
                cut::remove_staging(&e.path());
            }
        }
        swept
    }

    /// The store.
    pub fn store(&self) -> &SnapshotStore {
        &self.inner.store
    }

    /// Complete snapshots of `instance` in the store, oldest cut first.
    pub fn manifests(&self, instance: &str) -> Result<Vec<Manifest>, SnapshotControlError> {
        self.inner
            .rt
            .block_on(vmr_snapshot::list(&self.inner.store, instance))
            .map_err(|e| unavailable(chain(&e)))
    }

    fn pins_path(&self, instance: &str) -> PathBuf {
        self.inner
            .cfg
            .state_dir
            .join(format!("{instance}.pins.json"))
    }

    /// The pinned snapshot ids of `instance`.
    pub fn pins(&self, instance: &str) -> BTreeSet<String> {
        std::fs::read(self.pins_path(instance))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn store_pins(
        &self,
        instance: &str,
        pins: &BTreeSet<String>,
    ) -> Result<(), SnapshotControlError> {
        let p = self.pins_path(instance);
        let body =
            serde_json::to_vec(pins).map_err(|e| SnapshotControlError::Internal(e.to_string()))?;
        std::fs::create_dir_all(&self.inner.cfg.state_dir)
            .and_then(|_| {
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, &body)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &p)
            })
            .map_err(|e| {
                SnapshotControlError::Internal(format!("cannot write {}: {e}", p.display()))
            })
    }

    /// Applies the retention policy to `instance`; returns the ids deleted.
    pub fn apply_retention(&self, instance: &str) -> Result<Vec<String>, SnapshotControlError> {
        let all = self.manifests(instance)?;
        let (_, delete) = vmr_snapshot::retention::plan(
            &all,
            &self.pins(instance),
            &self.inner.cfg.policy,
            now_ns(),
        );
        let mut remaining = all;
        let mut done = Vec::new();
        for id in delete {
            self.inner
                .rt
                .block_on(vmr_snapshot::retention::delete(
                    &self.inner.store,
                    instance,
                    &id,
                    &remaining,
                ))
                .map_err(|e| unavailable(chain(&e)))?;
            remaining.retain(|m| m.snapshot_id != id);
            tracing::info!(%instance, snapshot = %id, "snapshot deleted by retention");
            done.push(id);
        }
        Ok(done)
    }

    /// Takes a snapshot of `inst` on the calling thread, reporting to `tx`.
    fn run(
        &self,
        inst: &RecordedInstance,
        request: &SnapshotRequest,
        id: &str,
        tx: &watch::Sender<OperationStatus>,
        cut_over: &(dyn Fn() + Sync),
    ) -> Result<Manifest, String> {
        let instance = inst.id().to_string();
        let all = self.manifests(&instance).map_err(|e| e.to_string())?;
        let base = all
            .iter()
            .rev()
            .find(|m| m.driver == inst.driver())
            .cloned();
        let memory = if request.incremental {
            if base.is_none() {
                return Err(
                    "an incremental snapshot needs an earlier snapshot of the instance".into(),
                );
            }
            MemoryKind::Incremental
        } else {
            MemoryKind::Full
        };
        let staging = self.inner.cfg.staging_dir.join(&instance);
        let opts = cut::CutOptions {
            snapshot_id: id.to_string(),
            memory,
            base,
            staging: staging.clone(),
            checkpoint_timeout: self.inner.cfg.checkpoint_timeout,
            broker_timeout: self.inner.cfg.broker_timeout,
            publish: self.inner.cfg.publish,
            endpoints: self.inner.cfg.endpoints.clone(),
        };
        let progress = |s: cut::Stage| {
            if matches!(
                s,
                cut::Stage::Resumed { .. }
                    | cut::Stage::Packing
                    | cut::Stage::Uploading { .. }
                    | cut::Stage::Publishing
            ) {
                cut_over();
            }
            tx.send_modify(|st| {
                st.stage = s.name().to_string();
                match s {
                    cut::Stage::Uploading { done, total } => {
                        st.bytes_done = done;
                        st.bytes_total = total;
                    }
                    _ => {
                        st.bytes_done = 0;
                        st.bytes_total = 0;
                    }
                }
            })
        };
        let r = cut::take(inst, &self.inner.store, &self.inner.rt, &opts, &progress)
            .map_err(|e| chain(&e));
        // QEMU's staging directory goes at once. A microVM chain's stay
        // while the chain grows (the VMM reads an incremental snapshot's
        // parent); a full snapshot starts a new chain and the old one goes.
        let older = {
            let mut chains = self.inner.chains.lock().unwrap_or_else(|p| p.into_inner());
            let c = chains.entry(instance.clone()).or_default();
            let full = memory == MemoryKind::Full;
            let older = if full && r.is_ok() {
                std::mem::take(c)
            } else {
                Vec::new()
            };
            if r.is_ok() {
                c.push(id.to_string());
            }
            older
        };
        self.inner
            .last_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(instance.clone(), id.to_string());
        for old in older {
            cut::remove_staging(&staging.join(old));
        }
        if inst.driver() != vmr_hypervisor::microvm::NAME || r.is_err() {
            cut::remove_staging(&staging.join(id));
        }
        // After the cut, not before it: the cut stays close to its slot.
        self.sweep(&instance, id);
        let r = r?;
        tracing::info!(instance = %instance, snapshot = %id, pause_us = r.pause.as_micros() as u64, bytes = r.uploaded_bytes, durable_us = r.durable_time.as_micros() as u64, upload_ms = r.upload_time.as_millis() as u64, "snapshot stored");
        if request.pin {
            let mut pins = self.pins(&instance);
            pins.insert(id.to_string());
            self.store_pins(&instance, &pins)
                .map_err(|e| e.to_string())?;
        }
        if let Err(e) = self.apply_retention(&instance) {
            tracing::warn!(%instance, error = %e, "retention failed");
        }
        Ok(r.manifest)
    }

    /// A new snapshot id for `instance`: the wall time in ms, zero-padded,
    /// so ids sort by time.
    fn new_id(&self, instance: &str) -> String {
        let mut id = format!("s{:014}", now_ns() / 1_000_000);
        let last = self
            .inner
            .last_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance)
            .cloned();
        if last.as_deref() >= Some(id.as_str()) {
            id = format!("{}-1", last.unwrap_or_default());
        }
        id
    }

    /// Takes a snapshot and waits for it (at most `timeout`).
    pub fn take_and_wait(
        &self,
        instance: Arc<RecordedInstance>,
        request: SnapshotRequest,
        timeout: Duration,
    ) -> Result<OperationStatus, SnapshotControlError> {
        let op = self.take(instance, request)?;
        let mut rx = self.watch(&op.id)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let st = rx.borrow_and_update().clone();
            if st.state.is_done() {
                return Ok(st);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(SnapshotControlError::Unavailable(format!(
                    "operation {} did not finish within {timeout:?} (stage {})",
                    op.id, st.stage
                )));
            }
            let _ = self
                .inner
                .rt
                .block_on(async { tokio::time::timeout(left, rx.changed()).await });
        }
    }
}

impl SnapshotControl for SnapshotEngine {
    fn take(
        &self,
        instance: Arc<RecordedInstance>,
        request: SnapshotRequest,
    ) -> Result<OperationStatus, SnapshotControlError> {
        let name = instance.id().to_string();
        if !self
            .inner
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            return Err(SnapshotControlError::FailedPrecondition(format!(
                "a snapshot of {name} is already running"
            )));
        }
        let n = self.inner.next_op.fetch_add(1, Ordering::Relaxed);
        let id = format!("snap-{name}-{n}");
        let status = OperationStatus {
            id: id.clone(),
            instance: instance.id().clone(),
            state: OperationState::Running,
            stage: "pending".into(),
            bytes_done: 0,
            bytes_total: 0,
            error: None,
            manifest: None,
            started_ns: now_ns(),
            finished_ns: 0,
        };
        let (tx, _) = watch::channel(status.clone());
        self.inner
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), tx.clone());
        let me = self.clone();
        let snapshot_id = self.new_id(&name);
        self.inner.cutting.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("snapshot-op".into())
            .spawn(move || {
                let slot = CutSlot {
                    inner: &me.inner,
                    held: AtomicBool::new(true),
                };
                let r = me.run(&instance, &request, &snapshot_id, &tx, &|| slot.release());
                slot.release();
                // Not busy before the result is out: a caller that sees
                // the operation done may take the next snapshot at once.
                me.inner
                    .busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                tx.send_modify(|st| {
                    st.finished_ns = now_ns();
                    match r {
                        Ok(m) => {
                            st.state = OperationState::Succeeded;
                            st.manifest = Some(m.to_proto());
                        }
                        Err(e) => {
                            tracing::warn!(instance = %name, error = %e, "snapshot failed");
                            st.state = OperationState::Failed;
                            st.error = Some(e);
                        }
                    }
                });
            });
        if let Err(e) = spawned {
            self.inner.cutting.fetch_sub(1, Ordering::AcqRel);
            return Err(SnapshotControlError::Internal(e.to_string()));
        }
        Ok(status)
    }

    fn operation(&self, id: &str) -> Result<OperationStatus, SnapshotControlError> {
        Ok(self.watch(id)?.borrow().clone())
    }

    fn watch(&self, id: &str) -> Result<watch::Receiver<OperationStatus>, SnapshotControlError> {
        self.inner
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|t| t.subscribe())
            .ok_or_else(|| SnapshotControlError::NotFound(format!("no operation {id}")))
    }

    fn list(&self, instance: &InstanceId) -> Result<Vec<SnapshotEntry>, SnapshotControlError> {
        let name = instance.to_string();
        let pins = self.pins(&name);
        let mut v: Vec<SnapshotEntry> = self
            .manifests(&name)?
            .into_iter()
            .map(|m| SnapshotEntry {
                pinned: pins.contains(&m.snapshot_id),
                manifest: m.to_proto(),
            })
            .collect();
        v.reverse();
        Ok(v)
    }

    fn pin(
        &self,
        instance: &InstanceId,
        snapshot_id: &str,
        pinned: bool,
    ) -> Result<SnapshotEntry, SnapshotControlError> {
        let name = instance.to_string();
        let m = self
            .manifests(&name)?
            .into_iter()
            .find(|m| m.snapshot_id == snapshot_id)
            .ok_or_else(|| {
                SnapshotControlError::NotFound(format!("no snapshot {name}/{snapshot_id}"))
            })?;
        let mut pins = self.pins(&name);
        if pinned {
            pins.insert(snapshot_id.to_string());
        } else {
            pins.remove(snapshot_id);
        }
        self.store_pins(&name, &pins)?;
        Ok(SnapshotEntry {
            manifest: m.to_proto(),
            pinned,
        })
    }

    fn launched(&self, instance: Arc<RecordedInstance>, spec: &vmr_proto::pb::InstanceSpec) {
        let period = match spec.snapshot_interval_secs {
            0 => self.inner.cfg.default_period,
            n => Duration::from_secs(n.into()),
        };
        if period.is_zero() {
            return;
        }
        let name = instance.id().to_string();
        let request = SnapshotRequest {
            incremental: spec.incremental,
            pin: false,
        };
        match self.inner.host.join(instance, period, request) {
            Ok(()) => {
                tracing::info!(instance = %name, period_s = period.as_secs_f64(), incremental = spec.incremental, "snapshot schedule started");
            }
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot start the snapshot schedule")
            }
        }
    }

    fn stopping(&self, instance: &str) {
        if self.inner.host.leave(instance) {
            tracing::info!(%instance, "snapshot schedule stopped");
        }
    }

    fn delete(&self, instance: &InstanceId, snapshot_id: &str) -> Result<(), SnapshotControlError> {
        let name = instance.to_string();
        if self.pins(&name).contains(snapshot_id) {
            return Err(SnapshotControlError::FailedPrecondition(format!(
                "snapshot {name}/{snapshot_id} is pinned; unpin it first"
            )));
        }
        let all = self.manifests(&name)?;
        if !all.iter().any(|m| m.snapshot_id == snapshot_id) {
            return Err(SnapshotControlError::NotFound(format!(
                "no snapshot {name}/{snapshot_id}"
            )));
        }
        self.inner
            .rt
            .block_on(vmr_snapshot::retention::delete(
                &self.inner.store,
                &name,
                snapshot_id,
                &all,
            ))
            .map(drop)
            .map_err(|e| match e {
                vmr_snapshot::RetentionError::Needed { .. } => {
                    SnapshotControlError::FailedPrecondition(e.to_string())
                }
                other => unavailable(chain(&other)),
            })
    }
}
