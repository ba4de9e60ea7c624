//! `vmr.v1.Replayer` over the clone runtime: authorization, request checks
//! and the mapping of errors to gRPC codes.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use vmr_proto::pb;

use super::config::{parse_mac, TenantConfig};
use super::{Entry, State};
use crate::clone::{self, CloneError, ClonePlan, NicPlan};
use crate::schedule::Speed;
use crate::source::SourceError;
use crate::window::Window;
use crate::{Kind, KindSet};

pub(crate) struct Replayer {
    pub state: Arc<State>,
}

fn clone_status(e: CloneError) -> Status {
    let code = match &e {
        CloneError::Invalid(_) => Code::InvalidArgument,
        CloneError::Snapshot(_) => Code::DataLoss,
        CloneError::Source(s) => match s {
            SourceError::Retention { .. }
            | SourceError::BeyondEnd { .. }
            | SourceError::RangeBeyondEnd { .. } => Code::FailedPrecondition,
            SourceError::Config(_) => Code::InvalidArgument,
            SourceError::Kafka { .. } | SourceError::Timeout { .. } => Code::Unavailable,
            _ => Code::FailedPrecondition,
        },
        CloneError::Driver(d) => match d {
            vmr_hypervisor::DriverError::Artifact { .. } => Code::DataLoss,
            _ => Code::Internal,
        },
        CloneError::Setup { .. } => Code::Internal,
        CloneError::State(_) => Code::FailedPrecondition,
    };
    Status::new(code, chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn restore_status(e: vmr_snapshot::RestoreError) -> Status {
    use vmr_snapshot::RestoreError as R;
    let code = match &e {
        R::NotFound { .. } => Code::NotFound,
        R::Manifest { .. } | R::Object { .. } | R::Chain { .. } | R::Layout { .. } => {
            Code::DataLoss
        }
        R::HostMismatch { .. } => Code::FailedPrecondition,
        R::Dest { .. } => Code::Internal,
        R::Store { .. } => Code::Unavailable,
    };
    Status::new(code, chain(&e))
}

/// A request's speed: unset is recorded speed.
fn speed_of(s: Option<&pb::Speed>) -> Result<Speed, Status> {
    match s.and_then(|s| s.speed.as_ref()) {
        None => Ok(Speed::REALTIME),
        Some(pb::speed::Speed::AsFastAsPossible(true)) => Ok(Speed::AsFastAsPossible),
        Some(pb::speed::Speed::AsFastAsPossible(false)) => Err(Status::invalid_argument(
            "speed.as_fast_as_possible must be true when set (leave speed unset for 1x)",
        )),
        Some(pb::speed::Speed::Factor(f)) => {
            Speed::factor(*f).map_err(|e| Status::invalid_argument(format!("speed: {e}")))
        }
    }
}

fn kinds_of(f: Option<&pb::EventFilter>) -> Result<KindSet, Status> {
    let Some(f) = f else {
        return Ok(KindSet::all());
    };
    if !f.devices.is_empty() {
        return Err(Status::unimplemented(
            "filtering by device is not supported yet",
        ));
    }
    let mut k = KindSet::empty().with(Kind::Lifecycle);
    if f.include_block {
        k.insert(Kind::Block);
    }
    if f.include_net {
        k.insert(Kind::Net);
    }
    if f.include_env {
        k.insert(Kind::Env);
    }
    if k == KindSet::empty().with(Kind::Lifecycle) {
        return Err(Status::invalid_argument(
            "the filter lists no event kind (leave it unset to replay every kind)",
        ));
    }
    Ok(k)
}

impl Replayer {
    fn tenant<T>(&self, req: &Request<T>) -> Result<TenantConfig, Status> {
        let r = self.tenant_inner(req);
        if r.is_err() {
            self.state
                .counters
                .unauthenticated
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn tenant_inner<T>(&self, req: &Request<T>) -> Result<TenantConfig, Status> {
        let v = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("no authorization: Bearer <token> header"))?;
        let v = v
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        let token = v.strip_prefix("Bearer ").ok_or_else(|| {
            Status::unauthenticated("the authorization header is not a bearer token")
        })?;
        self.state
            .config
            .tenant_of(token.trim())
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    fn entry(
        &self,
        tenant: &TenantConfig,
        id: &str,
    ) -> Result<
        (
            Arc<clone::CloneRuntime>,
            tokio::sync::broadcast::Sender<pb::ReplayProgress>,
        ),
        Status,
    > {
        if id.is_empty() {
            return Err(Status::invalid_argument("clone_id is empty"));
        }
        let clones = self.state.clones.lock().expect("clones lock");
        let e = clones
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no clone {id}")))?;
        if e.tenant != tenant.name {
            self.state.counters.denied.fetch_add(1, Ordering::Relaxed);
            return Err(Status::permission_denied(format!(
                "clone {id} belongs to another tenant"
            )));
        }
        Ok((e.runtime.clone(), e.progress.clone()))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ReplayProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::replayer_server::Replayer for Replayer {
    async fn create_clone(
        &self,
        req: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::Clone>, Status> {
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        if !vmr_snapshot::manifest::is_segment(&r.instance_id) {
            return Err(Status::invalid_argument(format!(
                "instance_id {:?} is not a valid id",
                r.instance_id
            )));
        }
        if !tenant.allows(&r.instance_id) {
            self.state.counters.denied.fetch_add(1, Ordering::Relaxed);
            return Err(Status::permission_denied(format!(
                "tenant {} may not see instance {}",
                tenant.name, r.instance_id
            )));
        }
        let speed = speed_of(r.speed.as_ref())?;
        let kinds = kinds_of(r.filter.as_ref())?;
        let faults = clone::faults::rules_from_specs(&r.faults).map_err(|e| match e {
            clone::faults::FaultError::Unsupported { .. } => Status::unimplemented(e.to_string()),
            clone::faults::FaultError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        })?;
        let seed = r.seed;
        let selector = match r.snapshot.and_then(|s| s.pick) {
            None | Some(pb::snapshot_selector::Pick::Latest(true)) => {
                vmr_snapshot::Selector::Latest
            }
            Some(pb::snapshot_selector::Pick::Latest(false)) => {
                return Err(Status::invalid_argument(
                    "snapshot.latest must be true when set",
                ))
            }
            Some(pb::snapshot_selector::Pick::SnapshotId(id)) => {
                if !vmr_snapshot::manifest::is_segment(&id) {
                    return Err(Status::invalid_argument(format!(
                        "snapshot_id {id:?} is not a valid id"
                    )));
                }
                vmr_snapshot::Selector::Id(id)
            }
            Some(pb::snapshot_selector::Pick::AtOrBeforeNs(t)) => {
                vmr_snapshot::Selector::AtOrBefore(t)
            }
        };
        let w = r.window.unwrap_or_default();
        if w.to_seq != 0 && w.from_seq > w.to_seq {
            return Err(Status::invalid_argument(format!(
                "window.from_seq {} is after window.to_seq {}",
                w.from_seq, w.to_seq
            )));
        }
        {
            let n = self.state.clones.lock().expect("clones lock").len();
            let mut b = self.state.building.lock().expect("building lock");
            if n + *b >= self.state.config.max_clones {
                return Err(Status::resource_exhausted(format!(
                    "{} clones already exist (max_clones)",
                    self.state.config.max_clones
                )));
            }
            *b += 1;
        }
        let res = self
            .build(
                &tenant,
                r.instance_id,
                selector,
                w,
                speed,
                kinds,
                r.start_paused,
                r.gdb,
                (faults, seed),
            )
            .await;
        *self.state.building.lock().expect("building lock") -= 1;
        let counter = if res.is_ok() {
            &self.state.counters.created
        } else {
            &self.state.counters.create_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        res.map(Response::new)
    }

    async fn get_clone(
        &self,
        req: Request<pb::GetCloneRequest>,
    ) -> Result<Response<pb::Clone>, Status> {
        let tenant = self.tenant(&req)?;
        let (rt, _) = self.entry(&tenant, &req.get_ref().clone_id)?;
        Ok(Response::new(rt.info()))
    }

    async fn list_clones(
        &self,
        req: Request<pb::ListClonesRequest>,
    ) -> Result<Response<pb::ListClonesResponse>, Status> {
        let tenant = self.tenant(&req)?;
        let clones = self.state.clones.lock().expect("clones lock");
        let mut out: Vec<pb::Clone> = clones
            .values()
            .filter(|e| e.tenant == tenant.name)
            .map(|e| e.runtime.info())
            .collect();
        out.sort_by(|a, b| a.clone_id.cmp(&b.clone_id));
        Ok(Response::new(pb::ListClonesResponse { clones: out }))
    }

    async fn control(
        &self,
        req: Request<pb::ControlRequest>,
    ) -> Result<Response<pb::Clone>, Status> {
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        let (rt, _) = self.entry(&tenant, &r.clone_id)?;
        let action = pb::ControlAction::try_from(r.action)
            .map_err(|_| Status::invalid_argument(format!("unknown action {}", r.action)))?;
        let speed = match action {
            pb::ControlAction::SetSpeed => Some(speed_of(r.speed.as_ref())?),
            _ => None,
        };
        if action == pb::ControlAction::Step && r.steps == 0 {
            return Err(Status::invalid_argument("steps must be at least 1"));
        }
        let rt2 = rt.clone();
        let res = tokio::task::spawn_blocking(move || match action {
            pb::ControlAction::Unspecified => Err(CloneError::Invalid("action is unset".into())),
            pb::ControlAction::Start => rt2.start(None),
            pb::ControlAction::Pause => rt2.pause(),
            pb::ControlAction::Resume => rt2.resume(),
            pb::ControlAction::Step => rt2.step(r.steps),
            pb::ControlAction::RunTo => rt2.run_to(r.run_to_seq),
            pb::ControlAction::SetSpeed => rt2.set_speed(speed.expect("checked above")),
            pb::ControlAction::Stop => rt2.stop_replay(),
        })
        .await
        .map_err(|e| Status::internal(format!("control task: {e}")))?;
        res.map_err(clone_status)?;
        Ok(Response::new(rt.info()))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let tenant = self.tenant(&req)?;
        let (rt, progress) = self.entry(&tenant, &req.get_ref().clone_id)?;
        let mut rx = progress.subscribe();
        let first = pb::ReplayProgress {
            clone: Some(rt.info()),
            ..Default::default()
        };
        let stream = async_stream(first, rt, move || rx.try_recv());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_divergences(
        &self,
        req: Request<pb::GetDivergencesRequest>,
    ) -> Result<Response<pb::GetDivergencesResponse>, Status> {
        let tenant = self.tenant(&req)?;
        let (rt, _) = self.entry(&tenant, &req.get_ref().clone_id)?;
        Ok(Response::new(pb::GetDivergencesResponse {
            divergences: rt.divergences(),
        }))
    }

    async fn get_debugger(
        &self,
        req: Request<pb::GetDebuggerRequest>,
    ) -> Result<Response<pb::Debugger>, Status> {
        let tenant = self.tenant(&req)?;
        let (rt, _) = self.entry(&tenant, &req.get_ref().clone_id)?;
        let address = rt
            .debugger()
            .ok_or_else(|| Status::failed_precondition("the clone was created without gdb"))?;
        Ok(Response::new(pb::Debugger { address }))
    }

    async fn delete_clone(
        &self,
        req: Request<pb::DeleteCloneRequest>,
    ) -> Result<Response<pb::DeleteCloneResponse>, Status> {
        let tenant = self.tenant(&req)?;
        let id = req.get_ref().clone_id.clone();
        self.entry(&tenant, &id)?;
        let e = self.state.clones.lock().expect("clones lock").remove(&id);
        if let Some(e) = e {
            self.state.counters.deleted.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || e.runtime.teardown())
                .await
                .map_err(|e| Status::internal(format!("teardown task: {e}")))?;
        }
        Ok(Response::new(pb::DeleteCloneResponse {}))
    }
}

/// The progress stream: the current state, then each message, until the
/// replay is over (and every message before it was sent) or the clone goes.
fn async_stream(
    first: pb::ReplayProgress,
    rt: Arc<clone::CloneRuntime>,
    mut next: impl FnMut() -> Result<pb::ReplayProgress, tokio::sync::broadcast::error::TryRecvError>
        + Send
        + 'static,
) -> impl Stream<Item = Result<pb::ReplayProgress, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match next() {
                Ok(p) => {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                Err(TryRecvError::Lagged(n)) => {
                    tracing::debug!(clone = %rt.id(), missed = n, "a watcher fell behind");
                }
                Err(TryRecvError::Closed) => return,
                Err(TryRecvError::Empty) => {
                    if rt.is_over() {
                        let _ = tx
                            .send(Ok(pb::ReplayProgress {
                                clone: Some(rt.info()),
                                ..Default::default()
                            }))
                            .await;
                        return;
                    }
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl Replayer {
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        tenant: &TenantConfig,
        instance: String,
        selector: vmr_snapshot::Selector,
        w: pb::ReplayWindow,
        speed: Speed,
        kinds: KindSet,
        start_paused: bool,
        gdb: bool,
        (faults, seed): (Vec<clone::faults::FaultRule>, u64),
    ) -> Result<pb::Clone, Status> {
        let cfg = &self.state.config;
        let clone_id = new_id();
        let base = cfg.work_dir.join(&clone_id);
        let snap_dir = base.join("snapshot");
        let opts = vmr_snapshot::RestoreOptions {
            allow_host_mismatch: cfg.store.allow_host_mismatch,
            host: None,
        };
        let m =
            vmr_snapshot::materialize(&self.state.store, &instance, &selector, &snap_dir, &opts)
                .await;
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&base);
                return Err(restore_status(e));
            }
        };
        let cleanup = |s: Status| {
            let _ = std::fs::remove_dir_all(&base);
            s
        };
        let image = cfg
            .images
            .iter()
            .find(|i| i.name == m.manifest.image)
            .ok_or_else(|| {
                cleanup(Status::failed_precondition(format!(
                    "the snapshot's machine image {:?} is not configured (images)",
                    m.manifest.image
                )))
            })?;
        let manifest = vmr_proto::SnapshotManifest::try_from(m.manifest.to_proto())
            .map_err(|e| cleanup(Status::data_loss(format!("manifest: {e}"))))?;
        let mut disks: Vec<(String, std::path::PathBuf)> = Vec::new();
        for l in &m.disk_layers {
            if m.disk_layers
                .iter()
                .filter(|o| o.device == l.device)
                .count()
                > 1
            {
                return Err(cleanup(Status::unimplemented(format!(
                    "disk {} has a chain of layers; the replayer restores single-layer disks only",
                    l.device
                ))));
            }
            disks.push((l.device.clone(), l.path.clone()));
        }
        let mut nics = Vec::new();
        for n in &image.nics {
            nics.push(NicPlan {
                name: n.name.clone(),
                mac: parse_mac(&n.mac).map_err(|e| cleanup(Status::internal(e.to_string())))?,
            });
        }
        let seq_at_cut = manifest.seq_at_cut;
        let (window, until_seq) = match (w.from_seq, w.to_seq) {
            (0, 0) => (Window::All, None),
            (f, t) => {
                if t != 0 && t <= seq_at_cut {
                    return Err(cleanup(Status::failed_precondition(format!(
                        "the window ends at seq {t}, at or before the snapshot's cut at seq {seq_at_cut}"
                    ))));
                }
                (
                    Window::Seq {
                        from: f,
                        to: (t != 0).then_some(t),
                    },
                    (t != 0).then_some(t),
                )
            }
        };
        let plan = ClonePlan {
            clone_id: clone_id.clone(),
            work_dir: base.join("run"),
            snapshot_dir: m.snapshot_dir.clone(),
            manifest,
            disks,
            nics,
            kernel: image.kernel.clone(),
            cmdline: image.cmdline.clone(),
            memory_mib: image.memory_mib,
            blk_bin: self.state.blk_bin.clone(),
            net_bin: self.state.net_bin.clone(),
            bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
            kafka_security: cfg.kafka.security.clone(),
            fetch_timeout: Duration::from_secs(cfg.kafka.fetch_timeout_secs),
            kinds,
            window,
            until_seq,
            speed,
            start_paused,
            gdb,
            faults,
            seed,
        };
        let (tx, _) = tokio::sync::broadcast::channel(4096);
        let tx2 = tx.clone();
        let listener = Box::new(move |p: pb::ReplayProgress| {
            let _ = tx2.send(p);
        });
        let built = tokio::task::spawn_blocking(move || clone::build(plan, listener))
            .await
            .map_err(|e| Status::internal(format!("build task: {e}")))?;
        let rt = match built {
            Ok(rt) => rt,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&base);
                return Err(clone_status(e));
            }
        };
        let info = rt.info();
        tracing::info!(clone = %clone_id, instance = %instance, tenant = %tenant.name, "clone created");
        self.state.clones.lock().expect("clones lock").insert(
            clone_id,
            Entry {
                tenant: tenant.name.clone(),
                runtime: rt,
                progress: tx,
            },
        );
        Ok(info)
    }
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let (wall, _) = vmr_hypervisor::events::now_ns();
    format!(
        "c{:x}{:x}{}",
        std::process::id(),
        wall % 0xffff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
