//! The HTTP server: the embedded page and its JSON / server-sent-events API.
//!
//! Every `/api` call needs `Authorization: Bearer <token>` (or, for
//! clients that cannot set headers, `?access_token=`); the token's tenant
//! decides which instances exist for the caller. Replay calls are forwarded
//! to the replayer with the same token, so the replayer applies its own
//! authorization as well.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use vmr_proto::pb;
use vmr_proto::pb::replayer_client::ReplayerClient;

use crate::aggregate::{Aggregator, Overview};
use crate::config::{Config, TenantConfig};
use crate::consumer::{read_range, ConsumerStatus};
use crate::decode::{summarize, EventSummary};
use crate::replayer::{self as rp, CloneOut, DivergenceOut};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const FAVICON: &str = include_str!("../assets/favicon.svg");

/// How long a snapshot listing is reused.
const SNAPSHOT_CACHE: Duration = Duration::from_secs(2);
/// Most events a range query returns.
pub const MAX_RANGE_EVENTS: usize = 2000;

/// Everything the handlers share.
pub struct AppState {
    pub config: Config,
    pub agg: Arc<RwLock<Aggregator>>,
    pub consumer: Option<Arc<Mutex<ConsumerStatus>>>,
    pub store: Result<vmr_snapshot::SnapshotStore, String>,
    pub channel: Result<tonic::transport::Channel, String>,
    snapshots: Mutex<HashMap<String, CachedSnapshots>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// The state of a console; must be called within a Tokio runtime (the
    /// replayer channel is created there, connecting on first use).
    pub fn new(
        config: Config,
        agg: Arc<RwLock<Aggregator>>,
        consumer: Option<Arc<Mutex<ConsumerStatus>>>,
    ) -> Self {
        let store = vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(
            config.store.url.clone(),
        ))
        .map_err(|e| format!("snapshot store {}: {e}", config.store.url));
        let channel = rp::channel(&config.replayer_url);
        Self {
            config,
            agg,
            consumer,
            store,
            channel,
            snapshots: Mutex::new(HashMap::new()),
        }
    }
}

type Shared = Arc<AppState>;

/// A snapshot listing and when it was read.
type CachedSnapshots = (Instant, Result<Vec<SnapshotOut>, String>);

/// An error answer: `{"error": message, "code": code}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response()
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::Unauthenticated => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("the replayer refused the token: {msg}"),
            ),
            Code::PermissionDenied => Self::new(StatusCode::FORBIDDEN, "permission_denied", msg),
            Code::NotFound => Self::new(StatusCode::NOT_FOUND, "not_found", msg),
            Code::InvalidArgument => Self::new(StatusCode::BAD_REQUEST, "invalid_argument", msg),
            Code::FailedPrecondition => Self::new(StatusCode::CONFLICT, "failed_precondition", msg),
            Code::Unimplemented => Self::new(StatusCode::NOT_IMPLEMENTED, "unimplemented", msg),
            Code::ResourceExhausted => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "resource_exhausted", msg)
            }
            Code::DataLoss => Self::new(StatusCode::BAD_GATEWAY, "data_loss", msg),
            _ if rp::is_unreachable(&s) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "replayer_unreachable",
                format!("replayer unreachable: {msg}"),
            ),
            _ => Self::new(StatusCode::BAD_GATEWAY, "replayer_error", msg),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
}

/// A JSON body, or a 400 that says what is wrong with it.
type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(b: Body<T>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| bad_request(e.body_text()))
}

#[derive(Debug, Deserialize, Default)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The caller of an `/api` route: its token (the `Authorization: Bearer`
/// header, else `?access_token=`) and that token's tenant.
struct Caller {
    token: String,
    tenant: TenantConfig,
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &Shared) -> Result<Self, ApiError> {
        let token = match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => v
                .to_str()
                .map_err(|_| unauthenticated("the authorization header is not text"))?
                .strip_prefix("Bearer ")
                .ok_or_else(|| unauthenticated("the authorization header is not a bearer token"))?
                .trim()
                .to_string(),
            None => Query::<TokenQuery>::try_from_uri(&parts.uri)
                .ok()
                .and_then(|Query(q)| q.access_token)
                .ok_or_else(|| unauthenticated("no token: sign in with your replayer token"))?,
        };
        let tenant = st
            .config
            .authenticate(&token, std::time::SystemTime::now())
            .cloned()
            .map_err(|e| unauthenticated(e.to_string()))?;
        Ok(Caller { token, tenant })
    }
}

impl Caller {
    /// `Ok` when the caller's tenant may see instance `id`; the same
    /// answer as for an instance never recorded otherwise.
    fn may_see(&self, id: &str) -> Result<(), ApiError> {
        if self.tenant.allows(id) {
            Ok(())
        } else {
            Err(unknown_instance(self, id))
        }
    }
}

fn unknown_instance(c: &Caller, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_instance",
        format!(
            "no recording of instance {id:?} is visible to tenant {:?}",
            c.tenant.name
        ),
    )
}

type Client = ReplayerClient<tonic::transport::Channel>;

fn client(st: &AppState) -> Result<Client, ApiError> {
    st.channel
        .clone()
        .map(ReplayerClient::new)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "replayer_unreachable", e))
}

/// One replayer call with the caller's token, answered within the
/// configured `replayer_timeout_secs`.
async fn ask<M, T, F>(
    st: &AppState,
    c: &Caller,
    msg: M,
    call: impl FnOnce(Client, tonic::Request<M>) -> F,
) -> Result<T, ApiError>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let d = Duration::from_secs(st.config.replayer_timeout_secs.max(1));
    ask_within(st, c, msg, d, "no answer", call).await
}

/// [`ask`] with its own bound `d`; `what` names what did not come in time.
async fn ask_within<M, T, F>(
    st: &AppState,
    c: &Caller,
    msg: M,
    d: Duration,
    what: &str,
    call: impl FnOnce(Client, tonic::Request<M>) -> F,
) -> Result<T, ApiError>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let cl = client(st)?;
    let req = rp::authed(&c.token, msg)?;
    match tokio::time::timeout(d, call(cl, req)).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "replayer_unreachable",
            format!("replayer unreachable: {what} within {} s", d.as_secs()),
        )),
    }
}

/// The router of the console.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route(
            "/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .route("/favicon.svg", get(|| asset(FAVICON, "image/svg+xml")))
        .route("/api/session", get(session))
        .route("/api/health", get(health))
        .route("/api/instances", get(instances))
        .route("/api/instances/{id}/timeline", get(timeline))
        .route("/api/instances/{id}/events", get(events))
        .route("/api/clones", get(list_clones).post(create_clone))
        .route("/api/clones/{id}", get(get_clone).delete(delete_clone))
        .route("/api/clones/{id}/control", post(control))
        .route("/api/clones/{id}/divergences", get(divergences))
        .route("/api/clones/{id}/watch", get(watch))
        .with_state(state)
}

async fn index() -> impl IntoResponse {
    asset(INDEX_HTML, "text/html; charset=utf-8").await
}

async fn asset(body: &'static str, mime: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

async fn session(c: Caller) -> ApiResult<serde_json::Value> {
    Ok(Json(json!({"tenant": c.tenant.name})))
}

#[derive(Serialize)]
struct Health {
    replayer: Reach,
    kafka: Option<ConsumerStatus>,
    store: Reach,
}

#[derive(Serialize)]
struct Reach {
    ok: bool,
    error: Option<String>,
}

impl Reach {
    fn of<T>(r: Result<T, String>) -> Self {
        match r {
            Ok(_) => Reach {
                ok: true,
                error: None,
            },
            Err(e) => Reach {
                ok: false,
                error: Some(e),
            },
        }
    }
}

async fn health(State(st): State<Shared>, c: Caller) -> ApiResult<Health> {
    let replayer = Reach::of(
        ask(&st, &c, pb::ListClonesRequest {}, |mut cl, r| async move {
            cl.list_clones(r).await
        })
        .await
        .map_err(|e| format!("{} ({})", e.message, st.config.replayer_url)),
    );
    let store = Reach::of(st.store.as_ref().map_err(Clone::clone));
    Ok(Json(Health {
        replayer,
        kafka: st.consumer.as_ref().map(|s| s.lock().clone()),
        store,
    }))
}

async fn instances(State(st): State<Shared>, c: Caller) -> ApiResult<serde_json::Value> {
    let list = st.agg.read().instances(|id| c.tenant.allows(id));
    Ok(Json(json!({"tenant": c.tenant.name, "instances": list})))
}

/// A snapshot marker.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotOut {
    pub snapshot_id: String,
    pub t: u64,
    pub seq_at_cut: u64,
    pub driver: String,
    pub image: String,
    pub memory: &'static str,
    pub base_snapshot_id: Option<String>,
    pub bytes: u64,
}

async fn snapshots_of(st: &AppState, id: &str) -> Result<Vec<SnapshotOut>, String> {
    if let Some((at, v)) = st.snapshots.lock().get(id) {
        if at.elapsed() < SNAPSHOT_CACHE {
            return v.clone();
        }
    }
    let store = st.store.as_ref().map_err(|e| e.clone())?;
    let r = match tokio::time::timeout(Duration::from_secs(10), vmr_snapshot::list(store, id)).await
    {
        Err(_) => Err("the snapshot store did not answer within 10 s".to_string()),
        Ok(Err(e)) => Err(format!("snapshot store: {e}")),
        Ok(Ok(ms)) => Ok(ms
            .iter()
            .map(|m| SnapshotOut {
                snapshot_id: m.snapshot_id.clone(),
                t: m.wall_time_ns,
                seq_at_cut: m.seq_at_cut,
                driver: m.driver.clone(),
                image: m.image.clone(),
                memory: if m.base_snapshot_id.is_some() {
                    "incremental"
                } else {
                    "full"
                },
                base_snapshot_id: m.base_snapshot_id.clone(),
                bytes: m.total_bytes(),
            })
            .collect()),
    };
    st.snapshots
        .lock()
        .insert(id.to_string(), (Instant::now(), r.clone()));
    r
}

#[derive(Debug, Deserialize)]
struct RangeQuery {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    to: u64,
    #[serde(default = "default_points")]
    points: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_points() -> u64 {
    1200
}

fn default_limit() -> usize {
    200
}

#[derive(Serialize)]
struct TimelineOut {
    #[serde(flatten)]
    overview: Overview,
    snapshots: Vec<SnapshotOut>,
    snapshots_error: Option<String>,
}

async fn timeline(
    State(st): State<Shared>,
    c: Caller,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<TimelineOut> {
    c.may_see(&id)?;
    let overview = {
        let a = st.agg.read();
        let r = a.instance(&id).ok_or_else(|| unknown_instance(&c, &id))?;
        r.overview(&id, q.from, q.to, q.points.clamp(10, 5000))
    };
    let (snapshots, snapshots_error) = match snapshots_of(&st, &id).await {
        Ok(s) => (s, None),
        Err(e) => (vec![], Some(e)),
    };
    Ok(Json(TimelineOut {
        overview,
        snapshots,
        snapshots_error,
    }))
}

#[derive(Serialize)]
struct EventsOut {
    instance: String,
    from_ns: u64,
    to_ns: u64,
    events: Vec<EventSummary>,
    truncated: bool,
}

async fn events(
    State(st): State<Shared>,
    c: Caller,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<EventsOut> {
    c.may_see(&id)?;
    if q.to < q.from {
        return Err(bad_request("the range ends before it starts"));
    }
    let limit = q.limit.clamp(1, MAX_RANGE_EVENTS);
    let plan: Vec<(String, i32, i64, i64)> = {
        let a = st.agg.read();
        let r = a.instance(&id).ok_or_else(|| unknown_instance(&c, &id))?;
        r.offsets
            .iter()
            .filter_map(|(topic, idx)| {
                idx.start_for(q.from)
                    .map(|s| (topic.to_string(), idx.partition, s, idx.last_offset))
            })
            .collect()
    };
    let bootstrap = st.config.kafka.bootstrap_servers.clone();
    let timeout = Duration::from_secs(st.config.kafka.fetch_timeout_secs.max(1));
    let (from, to) = (q.from, q.to);
    let inst = id.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for (topic, part, start, last) in plan {
            all.extend(read_range(
                &bootstrap,
                timeout,
                &topic,
                part,
                start,
                last,
                &inst,
                from,
                to,
                limit + 1,
            )?);
        }
        Ok::<_, String>(all)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "kafka_unreachable",
            format!("cannot read the events from Kafka: {e}"),
        )
    })?;
    let mut events: Vec<EventSummary> = read.iter().map(summarize).collect();
    events.sort_by_key(|e| e.seq);
    let truncated = events.len() > limit;
    events.truncate(limit);
    Ok(Json(EventsOut {
        instance: id,
        from_ns: q.from,
        to_ns: q.to,
        events,
        truncated,
    }))
}

fn clone_out(st: &AppState, c: &pb::Clone) -> CloneOut {
    let a = st.agg.read();
    CloneOut::from_pb(c, |inst, seq| a.instance(inst)?.time_of_seq(seq))
}

async fn list_clones(State(st): State<Shared>, c: Caller) -> ApiResult<serde_json::Value> {
    let r = ask(&st, &c, pb::ListClonesRequest {}, |mut cl, r| async move {
        cl.list_clones(r).await
    })
    .await?;
    let clones: Vec<CloneOut> = r.clones.iter().map(|x| clone_out(&st, x)).collect();
    Ok(Json(json!({ "clones": clones })))
}

async fn create_clone(
    State(st): State<Shared>,
    c: Caller,
    b: Body<rp::CreateIn>,
) -> ApiResult<CloneOut> {
    let b = body(b)?;
    c.may_see(&b.instance_id)?;
    let req = b.to_pb().map_err(bad_request)?;
    // Restoring a snapshot may take a while: allow more than one answer's time.
    let d = Duration::from_secs(st.config.replayer_timeout_secs.max(1) * 6);
    let r = ask_within(&st, &c, req, d, "no clone", |mut cl, r| async move {
        cl.create_clone(r).await
    })
    .await?;
    Ok(Json(clone_out(&st, &r)))
}

async fn get_clone(
    State(st): State<Shared>,
    c: Caller,
    Path(clone_id): Path<String>,
) -> ApiResult<CloneOut> {
    let req = pb::GetCloneRequest { clone_id };
    let r = ask(
        &st,
        &c,
        req,
        |mut cl, r| async move { cl.get_clone(r).await },
    )
    .await?;
    Ok(Json(clone_out(&st, &r)))
}

async fn delete_clone(
    State(st): State<Shared>,
    c: Caller,
    Path(clone_id): Path<String>,
) -> ApiResult<serde_json::Value> {
    let req = pb::DeleteCloneRequest { clone_id };
    // Tearing a clone down (its VM, backends and namespace) may take longer
    // than one answer; a call given up on would be cancelled at the replayer.
    let d = Duration::from_secs(st.config.replayer_timeout_secs.max(1) * 6);
    ask_within(&st, &c, req, d, "no answer", |mut cl, r| async move {
        cl.delete_clone(r).await
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}

async fn control(
    State(st): State<Shared>,
    c: Caller,
    Path(id): Path<String>,
    b: Body<rp::ControlIn>,
) -> ApiResult<CloneOut> {
    let req = body(b)?
        .to_pb(&id)
        .map_err(|e| bad_request(e.to_string()))?;
    // A switch restores another snapshot and going live rewires the NICs:
    // like a create, they may take longer than one answer. (A call given up
    // on is cancelled at the replayer, so the bound must fit the work.)
    let slow = [
        pb::ControlAction::Switch as i32,
        pb::ControlAction::GoLive as i32,
    ];
    let d = Duration::from_secs(
        st.config.replayer_timeout_secs.max(1) * if slow.contains(&req.action) { 6 } else { 1 },
    );
    let r = ask_within(&st, &c, req, d, "no answer", |mut cl, r| async move {
        cl.control(r).await
    })
    .await?;
    Ok(Json(clone_out(&st, &r)))
}

async fn divergences(
    State(st): State<Shared>,
    c: Caller,
    Path(clone_id): Path<String>,
) -> ApiResult<serde_json::Value> {
    let req = pb::GetDivergencesRequest { clone_id };
    let r = ask(&st, &c, req, |mut cl, r| async move {
        cl.get_divergences(r).await
    })
    .await?;
    let d: Vec<DivergenceOut> = r.divergences.iter().map(DivergenceOut::from).collect();
    Ok(Json(json!({ "divergences": d })))
}

/// One `progress` message of the watch stream.
#[derive(Serialize)]
struct ProgressOut {
    clone: Option<CloneOut>,
    console: Option<String>,
    divergence: Option<DivergenceOut>,
    lifecycle: Option<LifecycleOut>,
}

#[derive(Serialize)]
struct LifecycleOut {
    kind: &'static str,
    detail: String,
    wall_time_ns: u64,
    last_seq_applied: u64,
    /// Recorded time of `last_seq_applied` (where the clone's marker goes).
    position_ns: Option<u64>,
}

fn progress_out(st: &AppState, p: &pb::ReplayProgress) -> ProgressOut {
    let clone = p.clone.as_ref().map(|c| clone_out(st, c));
    let lifecycle = p.lifecycle.as_ref().map(|l| {
        let kind = l
            .lifecycle
            .as_ref()
            .map(|x| crate::aggregate::lifecycle_name_pb(x.kind))
            .unwrap_or("unspecified");
        let instance = p.clone.as_ref().map(|c| c.instance_id.clone());
        let position_ns = instance.and_then(|i| {
            st.agg
                .read()
                .instance(&i)
                .and_then(|r| r.time_of_seq(l.last_seq_applied))
        });
        LifecycleOut {
            kind,
            detail: l
                .lifecycle
                .as_ref()
                .map(|x| x.detail.clone())
                .unwrap_or_default(),
            wall_time_ns: l.wall_time_ns,
            last_seq_applied: l.last_seq_applied,
            position_ns,
        }
    });
    ProgressOut {
        clone,
        console: (!p.console.is_empty()).then(|| String::from_utf8_lossy(&p.console).into_owned()),
        divergence: p.divergence.as_ref().map(DivergenceOut::from),
        lifecycle,
    }
}

async fn watch(
    State(st): State<Shared>,
    c: Caller,
    Path(clone_id): Path<String>,
) -> Result<Response, ApiError> {
    let req = pb::WatchRequest { clone_id };
    let stream = ask(&st, &c, req, |mut cl, r| async move { cl.watch(r).await }).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(256);
    let st2 = st.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        loop {
            match stream.message().await {
                Ok(Some(p)) => {
                    let out = progress_out(&st2, &p);
                    let ev = SseEvent::default()
                        .event("progress")
                        .json_data(&out)
                        .unwrap_or_else(|_| SseEvent::default().event("progress"));
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx
                        .send(Ok(SseEvent::default()
                            .event("end")
                            .data("the replay is over")))
                        .await;
                    return;
                }
                Err(s) => {
                    let e = ApiError::from(s);
                    let data = json!({"code": e.code, "error": e.message}).to_string();
                    let _ = tx
                        .send(Ok(SseEvent::default().event("failure").data(data)))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response())
}
