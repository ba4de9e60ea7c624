//! `vmr.v1.Replayer` over the clone runtime: authorization, request checks
//! and the mapping of errors to gRPC codes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use vmr_proto::pb;

use super::config::{parse_cidr, parse_mac, TenantConfig};
use super::{BuildSlot, Entry, State};
use crate::clone::{self, CloneError, ClonePlan, NicPlan};
use crate::filter::{Filter, NetMatch};
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
        CloneError::OutOfRange(_) => Code::OutOfRange,
        CloneError::Precondition(_) => Code::FailedPrecondition,
        CloneError::Snapshot(_) => Code::DataLoss,
        CloneError::Source(s) => match s {
            SourceError::Retention { .. } => Code::FailedPrecondition,
            SourceError::BeyondEnd { .. } | SourceError::RangeBeyondEnd { .. } => Code::OutOfRange,
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
        CloneError::GoLive {
            replay_kept: true, ..
        } => Code::FailedPrecondition,
        CloneError::GoLive { .. } => Code::Internal,
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

fn net_match(m: Option<&pb::NetMatch>, field: &str) -> Result<NetMatch, Status> {
    let Some(m) = m else {
        return Ok(NetMatch::default());
    };
    let bad = |what: String| Status::invalid_argument(format!("filter.{field}: {what}"));
    let mut out = NetMatch::default();
    for mac in &m.macs {
        out.macs
            .push(crate::filter::parse_mac(mac).map_err(|e| bad(format!("MAC {mac:?}: {e}")))?);
    }
    for ip in &m.ips {
        out.ips.push(
            ip.parse()
                .map_err(|e| bad(format!("address {ip:?}: {e}")))?,
        );
    }
    for p in &m.ports {
        out.ports.push(
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("port {p} is not in 1..=65535")))?,
        );
    }
    Ok(out)
}

fn block_ops(ops: &[i32], field: &str) -> Result<Vec<vmr_proto::BlockOp>, Status> {
    ops.iter()
        .map(|o| {
            vmr_proto::BlockOp::try_from(*o).map_err(|_| {
                Status::invalid_argument(format!("filter.{field}: {o} is not a block op"))
            })
        })
        .collect()
}

/// A request's filter: unset delivers everything; a present one delivers
/// the kinds it lists (at least one), narrowed by its device, op and
/// address conditions.
fn filter_of(f: Option<&pb::EventFilter>) -> Result<Filter, Status> {
    let Some(f) = f else {
        return Ok(Filter::default());
    };
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
    for d in f.devices.iter().chain(&f.exclude_devices) {
        if !vmr_snapshot::manifest::is_segment(d) {
            return Err(Status::invalid_argument(format!(
                "filter: {d:?} is not a valid device name"
            )));
        }
    }
    Ok(Filter {
        kinds: k,
        exclude_kinds: KindSet::empty(),
        devices: f.devices.clone(),
        exclude_devices: f.exclude_devices.clone(),
        block_ops: block_ops(&f.block_ops, "block_ops")?,
        exclude_block_ops: block_ops(&f.exclude_block_ops, "exclude_block_ops")?,
        net: net_match(f.net.as_ref(), "net")?,
        exclude_net: net_match(f.exclude_net.as_ref(), "exclude_net")?,
    })
}

fn selector_of(s: Option<pb::SnapshotSelector>) -> Result<vmr_snapshot::Selector, Status> {
    Ok(match s.and_then(|s| s.pick) {
        None | Some(pb::snapshot_selector::Pick::Latest(true)) => vmr_snapshot::Selector::Latest,
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
        Some(pb::snapshot_selector::Pick::AtOrBeforeNs(t)) => vmr_snapshot::Selector::AtOrBefore(t),
    })
}

/// A request's window: unset is the whole recording after the cut; a
/// present one is a `seq` range or exactly one other form, checked for what
/// no recording can fit (an empty range, a percentage outside 0 to 100, a
/// part that does not exist). Whether it fits the recording is found when
/// the clone is built.
fn window_of(w: Option<pb::ReplayWindow>) -> Result<Window, Status> {
    use pb::replay_window::Form;
    use std::time::Duration as D;
    let Some(w) = w else {
        return Ok(Window::All);
    };
    let bad = |m: String| Status::invalid_argument(format!("window: {m}"));
    let seq = w.from_seq != 0 || w.to_seq != 0;
    let window = match (seq, w.form) {
        (true, Some(_)) => {
            return Err(bad(
                "give either from_seq/to_seq or one other form, not both".into(),
            ))
        }
        (false, None) => {
            return Err(bad(
                "a present window needs from_seq/to_seq or one form (leave it unset to replay the whole recording)".into(),
            ))
        }
        (true, None) => {
            if w.to_seq != 0 && w.from_seq > w.to_seq {
                return Err(bad(format!(
                    "from_seq {} is after to_seq {}",
                    w.from_seq, w.to_seq
                )));
            }
            Window::Seq {
                from: w.from_seq,
                to: (w.to_seq != 0).then_some(w.to_seq),
            }
        }
        (false, Some(Form::AfterCutNs(ns))) => {
            if ns == 0 {
                return Err(bad("after_cut_ns must be at least 1".into()));
            }
            Window::AfterCut(D::from_nanos(ns))
        }
        (false, Some(Form::Percent(p))) => Window::Percent {
            from: p.from_percent,
            to: p.to_percent.unwrap_or(100.0),
        },
        (false, Some(Form::Time(t))) => Window::Time {
            from: D::from_nanos(t.from_ns),
            to: t.to_ns.map(D::from_nanos),
        },
        (false, Some(Form::WallTime(t))) => Window::WallTime {
            from_ns: t.from_ns,
            to_ns: t.to_ns.unwrap_or(u64::MAX),
        },
        (false, Some(Form::Portion(p))) => {
            if p.parts == 0 || p.part == 0 || p.part > p.parts || p.parts > 1000 {
                return Err(bad(format!(
                    "part {} of {} does not exist (parts count from 1; at most 1000 parts)",
                    p.part, p.parts
                )));
            }
            Window::Portion {
                index: p.part - 1,
                parts: p.parts,
            }
        }
        (false, Some(Form::Text(t))) => t.parse::<Window>().map_err(|e| bad(e.to_string()))?,
    };
    window
        .validate()
        .map_err(|e| bad(format!("{window}: {e}")))?;
    Ok(window)
}

/// What a clone was asked for, kept for a switch to another cut.
#[derive(Clone)]
pub(crate) struct Params {
    pub instance: String,
    pub speed: Speed,
    pub filter: Filter,
    pub gdb: bool,
    pub faults: Vec<clone::faults::FaultRule>,
    pub seed: u64,
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
        let config = &self.state.config;
        let known = config
            .token(token.trim())
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if known
            .expires_at
            .as_ref()
            .is_some_and(|e| e.has_passed(std::time::SystemTime::now()))
        {
            return Err(Status::unauthenticated("token expired"));
        }
        config
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
        let filter = filter_of(r.filter.as_ref())?;
        let faults = clone::faults::rules_from_specs(&r.faults).map_err(|e| match e {
            clone::faults::FaultError::Unsupported { .. } => Status::unimplemented(e.to_string()),
            clone::faults::FaultError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        })?;
        let selector = selector_of(r.snapshot)?;
        let w = window_of(r.window)?;
        let params = Params {
            instance: r.instance_id,
            speed,
            filter,
            gdb: r.gdb,
            faults,
            seed: r.seed,
        };
        let slot = self.reserve()?;
        // The build runs as its own task: a caller that gives up (a deadline, a
        // dropped connection) must not cancel it half way, which would leave
        // processes behind. A clone finished after its caller left is listed
        // and can be deleted.
        let this = Replayer {
            state: self.state.clone(),
        };
        let start_paused = r.start_paused;
        let clone_id = new_id();
        let id = clone_id.clone();
        self.detached(&clone_id, slot, async move {
            this.create_detached(id, tenant, params, selector, w, start_paused)
                .await
        })
        .await
        .map(Response::new)
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
        // During a switch the listed runtime is the old one, being torn
        // down: a control would act on it (or, going live, on the namespace
        // the new guest gets under the same name).
        let switching = self
            .state
            .clones
            .lock()
            .expect("clones lock")
            .get(&r.clone_id)
            .is_some_and(|e| e.switches == u32::MAX);
        if switching {
            return Err(Status::failed_precondition(format!(
                "clone {} is being switched to another snapshot; try again when the switch is over",
                r.clone_id
            )));
        }
        if action == pb::ControlAction::Switch {
            let selector = match r.snapshot {
                None => vmr_snapshot::Selector::Id(rt.info().snapshot_id),
                s => selector_of(s)?,
            };
            let w = window_of(r.window)?;
            // Its own task, like a create: a caller that gives up must not
            // leave the clone torn down and never rebuilt.
            let this = Replayer {
                state: self.state.clone(),
            };
            let id = r.clone_id.clone();
            let start = r.start;
            return tokio::spawn(async move { this.switch(&id, selector, w, start).await })
                .await
                .map_err(|e| Status::internal(format!("switching failed: {}", task_failure(e))))?
                .map(Response::new);
        }
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
            pb::ControlAction::GoLive => rt2.go_live(),
            pb::ControlAction::Switch => unreachable!("handled above"),
        })
        .await
        .map_err(|e| Status::internal(format!("control task: {e}")))?;
        res.map_err(clone_status)?;
        Ok(Response::new(rt.info()))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let tenant = self.tenant(&req)?;
        let id = req.get_ref().clone_id.clone();
        let (rt, progress) = self.entry(&tenant, &id)?;
        let mut rx = progress.subscribe();
        // A watcher that comes after the crash still gets it.
        let first = pb::ReplayProgress {
            clone: Some(rt.info()),
            lifecycle: rt.crash(),
            ..Default::default()
        };
        let state = self.state.clone();
        // A switch replaces the runtime: the stream follows the current one.
        let current = move || {
            state
                .clones
                .lock()
                .expect("clones lock")
                .get(&id)
                .map(|e| e.runtime.clone())
        };
        let stream = async_stream(first, current, move || rx.try_recv());
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
            faults: rt.injected_faults(),
            seed: rt.seed(),
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
        let e = {
            let mut clones = self.state.clones.lock().expect("clones lock");
            if clones.get(&id).is_some_and(|e| e.switches == u32::MAX) {
                return Err(Status::failed_precondition(format!(
                    "clone {id} is being switched to another snapshot; delete it when the switch is over"
                )));
            }
            clones.remove(&id)
        };
        if let Some(e) = e {
            self.state.counters.deleted.fetch_add(1, Ordering::Relaxed);
            let base = self.state.config.work_dir.join(&id);
            tokio::task::spawn_blocking(move || {
                e.runtime.teardown();
                let _ = std::fs::remove_dir_all(base);
            })
            .await
            .map_err(|e| {
                Status::internal(format!(
                    "clone {id} is no longer listed, but removing it failed: {}",
                    task_failure(e)
                ))
            })?;
        }
        Ok(Response::new(pb::DeleteCloneResponse {}))
    }
}

/// The progress stream: the current state, then each message, until the
/// replay is over (and every message before it was sent) or the clone goes.
fn async_stream(
    first: pb::ReplayProgress,
    current: impl Fn() -> Option<Arc<clone::CloneRuntime>> + Send + 'static,
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
                    tracing::debug!(missed = n, "a watcher fell behind");
                }
                Err(TryRecvError::Closed) => return,
                Err(TryRecvError::Empty) => {
                    let Some(rt) = current() else { return };
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
    /// The part of `CreateClone` after the request is checked: build, then
    /// list the clone.
    async fn create_detached(
        &self,
        clone_id: String,
        tenant: TenantConfig,
        params: Params,
        selector: vmr_snapshot::Selector,
        w: Window,
        start_paused: bool,
    ) -> Result<pb::Clone, Status> {
        let (tx, _) = tokio::sync::broadcast::channel(4096);
        let res = self
            .build(
                &params,
                selector,
                w,
                clone_id,
                true,
                0,
                start_paused,
                tx.clone(),
            )
            .await;
        // The build's slot (held by the task) is given back after the clone
        // is listed, so the two never both miss it.
        let res = match res {
            Ok(rt) => {
                let info = rt.info();
                let refused = {
                    let mut clones = self.state.clones.lock().expect("clones lock");
                    if self.state.closing.load(Ordering::SeqCst) {
                        Some(rt)
                    } else {
                        clones.insert(
                            info.clone_id.clone(),
                            Entry {
                                tenant: tenant.name.clone(),
                                runtime: rt,
                                progress: tx,
                                params: Arc::new(params.clone()),
                                switches: 0,
                            },
                        );
                        None
                    }
                };
                match refused {
                    None => {
                        tracing::info!(clone = %info.clone_id, instance = %params.instance, tenant = %tenant.name, "clone created");
                        Ok(info)
                    }
                    // Built after the shutdown removed every clone: it
                    // goes too, rather than outlive the server.
                    Some(rt) => {
                        let base = self.state.config.work_dir.join(&info.clone_id);
                        let _ = tokio::task::spawn_blocking(move || {
                            rt.teardown();
                            let _ = std::fs::remove_dir_all(base);
                        })
                        .await;
                        Err(Status::unavailable(format!(
                            "the server is shutting down; clone {} was removed",
                            info.clone_id
                        )))
                    }
                }
            }
            Err(s) => Err(s),
        };
        let counter = if res.is_ok() {
            &self.state.counters.created
        } else {
            &self.state.counters.create_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        res
    }
}

/// Why a task ended without a result: its panic's message, or its
/// cancellation.
fn task_failure(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "its task was cancelled".into();
    }
    let payload = e.into_panic();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("it panicked: {msg}")
}

/// Marks a listed clone as being switched (`switches == u32::MAX`) until
/// dropped. Unless the switch is [`done`](Self::done), dropping it ends the
/// mark (the clone can be deleted or switched again) and fails the clone's
/// replay with `failure`: the old guest may be gone, whichever way the
/// switch ended (an error, a panic, the task's cancellation).
struct SwitchMark {
    state: Arc<State>,
    id: String,
    switches: u32,
    failure: String,
    done: bool,
}

impl Drop for SwitchMark {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut clones = self
            .state
            .clones
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = clones.get_mut(&self.id) {
            if e.switches == u32::MAX {
                e.switches = self.switches;
            }
            e.runtime.fail_with(self.failure.clone());
        }
    }
}

impl Replayer {
    /// Counts a clone being built against `max_clones` until the slot is
    /// dropped.
    fn reserve(&self) -> Result<BuildSlot, Status> {
        let clones = self.state.clones.lock().expect("clones lock");
        BuildSlot::reserve(
            &self.state.building,
            clones.len(),
            self.state.config.max_clones,
        )
        .ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} clones already exist (max_clones)",
                self.state.config.max_clones
            ))
        })
    }

    /// Runs `build` (the build and listing of clone `clone_id`) as its own
    /// task, which holds `slot` until it ends, however it ends. A task that
    /// panics or is cancelled is a failed create: its files go, and the
    /// error says what happened.
    async fn detached<T: Send + 'static>(
        &self,
        clone_id: &str,
        slot: BuildSlot,
        build: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
    ) -> Result<T, Status> {
        let task = tokio::spawn(async move {
            let res = build.await;
            drop(slot);
            res
        });
        match task.await {
            Ok(res) => res,
            Err(e) => {
                let why = task_failure(e);
                tracing::error!(clone = %clone_id, %why, "building a clone failed");
                self.state
                    .counters
                    .create_failed
                    .fetch_add(1, Ordering::Relaxed);
                let listed = self
                    .state
                    .clones
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains_key(clone_id);
                if !listed {
                    let _ = std::fs::remove_dir_all(self.state.config.work_dir.join(clone_id));
                }
                Err(Status::internal(format!(
                    "building clone {clone_id} failed: {why}"
                )))
            }
        }
    }

    /// Restarts clone `id` from another cut: the old guest, backends and
    /// namespace go, a new one is built under the same id with the same
    /// parameters, and watchers keep their stream.
    async fn switch(
        &self,
        id: &str,
        selector: vmr_snapshot::Selector,
        w: Window,
        start: bool,
    ) -> Result<pb::Clone, Status> {
        let (old, params, progress, switches) = {
            let mut clones = self.state.clones.lock().expect("clones lock");
            let e = clones
                .get_mut(id)
                .ok_or_else(|| Status::not_found(format!("no clone {id}")))?;
            if e.switches == u32::MAX {
                return Err(Status::failed_precondition("the clone is being switched"));
            }
            let sw = e.switches;
            e.switches = u32::MAX;
            (e.runtime.clone(), e.params.clone(), e.progress.clone(), sw)
        };
        let mut mark = SwitchMark {
            state: self.state.clone(),
            id: id.to_string(),
            switches,
            failure: "switching failed: the switch task panicked or was cancelled before the new guest was listed".into(),
            done: false,
        };
        if let Err(e) = tokio::task::spawn_blocking(move || old.teardown()).await {
            mark.failure = format!(
                "switching failed: tearing down the old guest failed: {}",
                task_failure(e)
            );
            return Err(Status::internal(mark.failure.clone()));
        }
        let res = self
            .build(
                &params,
                selector,
                w,
                id.to_string(),
                false,
                switches + 1,
                !start,
                progress,
            )
            .await;
        let rt = match res {
            Ok(rt) => rt,
            Err(s) => {
                mark.failure = format!("switching failed: {}", s.message());
                return Err(s);
            }
        };
        let unlisted = {
            let mut clones = self.state.clones.lock().expect("clones lock");
            match clones.get_mut(id) {
                Some(e) => {
                    let info = rt.info();
                    e.runtime = rt;
                    e.switches = switches + 1;
                    mark.done = true;
                    tracing::info!(clone = %id, snapshot = %info.snapshot_id, "clone switched");
                    return Ok(info);
                }
                None => rt,
            }
        };
        // Removed meanwhile (the server is shutting down): the new guest
        // goes too.
        mark.done = true;
        let _ = tokio::task::spawn_blocking(move || unlisted.teardown()).await;
        Err(Status::not_found(format!(
            "clone {id} was deleted during the switch"
        )))
    }

    /// Materialises the snapshot and builds clone `clone_id` (`fresh`: a
    /// new clone, whose whole directory goes on failure; otherwise a switch,
    /// whose new snapshot and run directories go).
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        p: &Params,
        selector: vmr_snapshot::Selector,
        w: Window,
        clone_id: String,
        fresh: bool,
        switches: u32,
        start_paused: bool,
        tx: tokio::sync::broadcast::Sender<pb::ReplayProgress>,
    ) -> Result<Arc<clone::CloneRuntime>, Status> {
        let cfg = &self.state.config;
        let base = cfg.work_dir.join(&clone_id);
        let snap_dir = base.join(format!("snapshot-{switches}"));
        let run_dir = base.join(format!("run-{switches}"));
        let cleanup = |s: Status| {
            if fresh {
                let _ = std::fs::remove_dir_all(&base);
            } else {
                let _ = std::fs::remove_dir_all(&snap_dir);
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            s
        };
        let opts = vmr_snapshot::RestoreOptions {
            allow_host_mismatch: cfg.store.allow_host_mismatch,
            host: None,
        };
        let m =
            vmr_snapshot::materialize(&self.state.store, &p.instance, &selector, &snap_dir, &opts)
                .await
                .map_err(|e| cleanup(restore_status(e)))?;
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
        // A disk is either one raw file at the cut (position 0), or a
        // chain of packed layers on a base image: the image's blank disk,
        // a zero file of the layers' disk size.
        let mut disks: Vec<(String, std::path::PathBuf)> = Vec::new();
        let mut disk_layers: HashMap<String, Vec<std::path::PathBuf>> = HashMap::new();
        let mut devices: Vec<String> = m.disk_layers.iter().map(|l| l.device.clone()).collect();
        devices.sort();
        devices.dedup();
        for dev in devices {
            let mut chain: Vec<&vmr_snapshot::LayerPath> =
                m.disk_layers.iter().filter(|l| l.device == dev).collect();
            chain.sort_by_key(|l| l.position);
            let sizes: Vec<Option<u64>> = chain.iter().map(|l| packed_disk_size(&l.path)).collect();
            if chain.len() == 1 && sizes[0].is_none() {
                disks.push((dev, chain[0].path.clone()));
                continue;
            }
            let Some(Some(size)) = sizes.first().copied() else {
                return Err(cleanup(Status::data_loss(format!(
                    "disk {dev}: a chain of {} layers whose bottom is not a packed layer",
                    chain.len()
                ))));
            };
            if sizes.iter().any(|s| *s != Some(size)) {
                return Err(cleanup(Status::data_loss(format!(
                    "disk {dev}: the layers of its chain disagree on the disk size"
                ))));
            }
            let base = match image.disks.iter().find(|d| d.name == dev) {
                Some(d) => d.image.clone(),
                None => {
                    let base = snap_dir.join(format!("{dev}.base.img"));
                    std::fs::File::create(&base)
                        .and_then(|f| f.set_len(size))
                        .map_err(|e| {
                            cleanup(Status::internal(format!("{}: {e}", base.display())))
                        })?;
                    base
                }
            };
            disks.push((dev.clone(), base));
            disk_layers.insert(dev, chain.iter().map(|l| l.path.clone()).collect());
        }
        let mut nics = Vec::new();
        let mut access = clone::AccessPlan {
            service_port: image.service_port,
            ..Default::default()
        };
        for n in &image.nics {
            nics.push(NicPlan {
                name: n.name.clone(),
                mac: parse_mac(&n.mac).map_err(|e| cleanup(Status::internal(e.to_string())))?,
            });
            let mut a = clone::NicAddrs {
                peer_ip: n.peer.clone(),
                ..Default::default()
            };
            if let Some(ip) = &n.ip {
                let (ip, prefix) = parse_cidr(ip).map_err(|e| cleanup(Status::internal(e)))?;
                a.guest_ip = Some(ip.to_string());
                a.prefix = prefix;
            }
            access.nics.push(a);
        }
        let kinds = p.filter.kinds;
        let plan = ClonePlan {
            clone_id: clone_id.clone(),
            work_dir: run_dir.clone(),
            snapshot_dir: m.snapshot_dir.clone(),
            manifest,
            disks,
            disk_layers,
            nics,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            memory_mib: image.memory_mib,
            vcpus: image.vcpus,
            qemu_devices: image.qemu_devices.clone(),
            blk_bin: self.state.blk_bin.clone(),
            net_bin: self.state.net_bin.clone(),
            bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
            kafka_security: cfg.kafka.security.clone(),
            fetch_timeout: Duration::from_secs(cfg.kafka.fetch_timeout_secs),
            kinds,
            filter: p.filter.clone(),
            window: w,
            speed: p.speed,
            start_paused,
            gdb: p.gdb,
            faults: p.faults.clone(),
            seed: p.seed,
            switches,
            access,
            owned_dir: Some(snap_dir.clone()),
        };
        let listener = Box::new(move |p: pb::ReplayProgress| {
            let _ = tx.send(p);
        });
        // A panicking build unwinds through the runtime it started (whose
        // drop tears it down); its files go here.
        let built = tokio::task::spawn_blocking(move || clone::build(plan, listener))
            .await
            .map_err(|e| {
                cleanup(Status::internal(format!(
                    "building the clone failed: {}",
                    task_failure(e)
                )))
            })?;
        built.map_err(|e| cleanup(clone_status(e)))
    }
}

/// The disk size a packed layer file (`VMRLAY01`, version 1: magic, `u32`
/// version, `u32` cluster size, `u64` disk size, little endian) names;
/// `None` for any other file.
fn packed_disk_size(path: &std::path::Path) -> Option<u64> {
    use std::io::Read;
    let mut h = [0u8; 24];
    std::fs::File::open(path).ok()?.read_exact(&mut h).ok()?;
    (&h[0..8] == b"VMRLAY01" && h[8..12] == 1u32.to_le_bytes())
        .then(|| u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A service over a file store in `dir`, with room for one clone.
    fn replayer(dir: &std::path::Path) -> Replayer {
        let config = super::super::Config::parse(&format!(
            "work_dir = \"{work}\"\nmax_clones = 1\n[kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n[store]\nurl = \"file://{store}\"\n",
            work = dir.join("work").display(),
            store = dir.join("store").display(),
        ))
        .expect("a valid configuration");
        let store = vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(
            config.store.url.clone(),
        ))
        .expect("a file store");
        Replayer {
            state: Arc::new(State {
                config,
                store,
                blk_bin: "vhost-tap-blk".into(),
                net_bin: "vhost-tap-net".into(),
                clones: Mutex::new(HashMap::new()),
                building: Arc::new(Mutex::new(0)),
                counters: Default::default(),
                closing: Default::default(),
            }),
        }
    }

    fn building(r: &Replayer) -> usize {
        *r.state.building.lock().expect("building lock")
    }

    #[tokio::test]
    async fn a_panicking_build_gives_its_slot_back_and_says_why() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let r = replayer(tmp.path());
        let slot = r.reserve().expect("room for one clone");
        let full = r.reserve().expect_err("max_clones is 1");
        assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
        let dir = r.state.config.work_dir.join("c-panics");
        std::fs::create_dir_all(dir.join("snapshot-0")).expect("work dir");
        let res: Result<(), Status> = r
            .detached("c-panics", slot, async {
                panic!("the layer chain of vda is cyclic");
            })
            .await;
        let e = res.expect_err("the build panicked");
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert_eq!(
            e.message(),
            "building clone c-panics failed: it panicked: the layer chain of vda is cyclic"
        );
        assert_eq!(building(&r), 0, "the slot was given back");
        drop(r.reserve().expect("the slot is free again"));
        assert!(!dir.exists(), "the failed clone's files are removed");
        assert_eq!(r.state.counters.create_failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_build_cancelled_with_its_runtime_gives_its_slot_back() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let r = Arc::new(replayer(tmp.path()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let slot = r.reserve().expect("room for one clone");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let r2 = r.clone();
        rt.spawn(async move {
            let _: Result<(), Status> = r2
                .detached("c-cancelled", slot, async move {
                    let _ = started_tx.send(());
                    std::future::pending().await
                })
                .await;
        });
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the build task ran");
        assert_eq!(building(&r), 1, "the build holds its slot");
        // Shutting the runtime down cancels the build task.
        rt.shutdown_timeout(Duration::from_secs(10));
        assert_eq!(building(&r), 0, "the cancelled build gave its slot back");
        drop(r.reserve().expect("the slot is free again"));
    }

    #[tokio::test]
    async fn the_shutdown_waits_for_builds_under_way_within_its_bound() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let r = Arc::new(replayer(tmp.path()));
        r.state.teardown_all();
        assert!(
            r.state.closing.load(Ordering::SeqCst),
            "builds that end now remove their clones"
        );
        let t = std::time::Instant::now();
        let slot = r.reserve().expect("room for one clone");
        let r2 = r.clone();
        tokio::spawn(async move {
            let _: Result<(), Status> = r2
                .detached("c-late", slot, async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err(Status::unavailable("the server is shutting down"))
                })
                .await;
        });
        assert!(r.state.builds_ended(Duration::from_secs(20)).await);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "it waited for the build"
        );
        let slot = r.reserve().expect("room for one clone");
        let r3 = r.clone();
        let stuck = tokio::spawn(async move {
            let _: Result<(), Status> = r3.detached("c-stuck", slot, std::future::pending()).await;
        });
        tokio::task::yield_now().await;
        let t = std::time::Instant::now();
        assert!(!r.state.builds_ended(Duration::from_millis(300)).await);
        assert!(t.elapsed() < Duration::from_secs(10), "the wait is bounded");
        stuck.abort();
    }

    #[test]
    fn a_slot_is_given_back_after_a_panic_that_poisoned_the_count() {
        let building = Arc::new(Mutex::new(0));
        let slot = BuildSlot::reserve(&building, 0, 1).expect("room for one");
        assert!(BuildSlot::reserve(&building, 0, 1).is_none(), "full");
        let b2 = building.clone();
        let _ = std::thread::spawn(move || {
            let _slot = slot;
            let _held = b2.lock().expect("count lock");
            panic!("poisons the count");
        })
        .join();
        assert!(building.is_poisoned());
        assert_eq!(*building.lock().unwrap_or_else(|p| p.into_inner()), 0);
        assert!(BuildSlot::reserve(&building, 0, 1).is_some());
    }
}
