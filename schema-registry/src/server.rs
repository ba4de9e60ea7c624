//! The REST server (axum): Confluent's routes, media types, body limit and
//! error bodies.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    CompatibilityResponse, ConfigResponse, ConfigUpdate, ErrorBody, ModeBody, RegisterResponse,
    SchemaRequest, SubjectVersionRef, CONTENT_TYPE,
};
use crate::registry::{Registry, RegistryError, VersionSpec};

/// Largest request body accepted.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How much of an over-limit body is read and discarded before answering 413.
const DRAIN_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

/// Media types accepted on request bodies.
pub const ACCEPTED_CONTENT_TYPES: [&str; 3] = [
    "application/vnd.schemaregistry.v1+json",
    "application/vnd.schemaregistry+json",
    "application/json",
];

/// An error response: HTTP status plus Confluent's JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: i32, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error_code: code,
                message: message.into(),
            },
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %e, "request failed");
        }
        Self::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.status, &self.body)
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).expect("response bodies always serialize");
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response()
}

fn ok<T: Serialize>(body: &T) -> Response {
    json(StatusCode::OK, body)
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    max_body: usize,
}

/// Builds the router over `registry`.
pub fn router(registry: Arc<Registry>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(|| async { ok(&serde_json::json!({})) }))
        .route("/schemas/types", get(|| async { ok(&["PROTOBUF"]) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(schema_text_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/schemas/ids/{id}/subjects", get(id_subjects))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route(
            "/subjects/{subject}/versions/{version}",
            get(version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(version_text),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route("/mode", get(global_mode).put(put_global_mode))
        .route(
            "/mode/{subject}",
            get(subject_mode)
                .put(put_subject_mode)
                .delete(delete_subject_mode),
        )
        .route("/contexts", get(|| async { ok(&["."]) }))
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility_one),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(compatibility_all),
        )
        .route("/config", get(global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
        .layer(DefaultBodyLimit::disable())
        .with_state(AppState { registry, max_body })
}

/// Checks the media type, reads at most the body limit and parses JSON.
async fn read_json<T: DeserializeOwned>(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !ACCEPTED_CONTENT_TYPES.contains(&essence.as_str()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                415,
                format!(
                    "HTTP 415 Unsupported Media Type: {ct:?}; use one of {}",
                    ACCEPTED_CONTENT_TYPES.join(", ")
                ),
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            413,
            format!("request body exceeds {} bytes", app.max_body),
        )
    };
    // An over-limit body is still read (and discarded) up to DRAIN_LIMIT_BYTES
    // so that the client, which is usually still sending, gets the 413 instead
    // of a reset connection. Beyond that the connection is dropped.
    let drain_limit = DRAIN_LIMIT_BYTES.max(2 * app.max_body as u64);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > drain_limit) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut received: u64 = 0;
    let mut over = declared.is_some_and(|len| len > app.max_body as u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                400,
                format!("reading the request body failed: {e}"),
            )
        })?;
        received += chunk.len() as u64;
        if received > drain_limit {
            return Err(too_large());
        }
        if received > app.max_body as u64 {
            over = true;
        }
        if !over {
            buf.extend_from_slice(&chunk);
        }
    }
    if over {
        return Err(too_large());
    }
    let bytes = Bytes::from(buf);
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unrecognized or malformed request body: {e}"),
        )
    })
}

/// A boolean query parameter; `true` in any case (Python clients send
/// `True`).
fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// `deletedOnly` (Confluent's name) or `deleted_only` (what confluent-kafka's
/// Python client sends).
fn deleted_only(q: &HashMap<String, String>) -> bool {
    flag(q, "deletedOnly") || flag(q, "deleted_only")
}

/// Applies `offset` and `limit` (negative or absent: no limit).
fn page<T>(items: Vec<T>, q: &HashMap<String, String>) -> Result<Vec<T>, ApiError> {
    let number = |name: &str| -> Result<Option<i64>, ApiError> {
        match q.get(name) {
            None => Ok(None),
            Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    400,
                    format!("query parameter {name}={v:?} is not a number"),
                )
            }),
        }
    };
    let offset = number("offset")?.unwrap_or(0).max(0) as usize;
    let limit = number("limit")?.filter(|l| *l >= 0).map(|l| l as usize);
    Ok(items
        .into_iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .collect())
}

fn serialized(q: &HashMap<String, String>) -> bool {
    q.get("format").is_some_and(|v| v == "serialized")
}

fn parse_id(s: &str) -> Result<i32, ApiError> {
    s.parse::<i32>()
        .map_err(|_| RegistryError::SchemaNotFound(s.to_string()).into())
}

async fn schema_by_id(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(ok(&app.registry.schema_by_id(id, serialized(&q)).await?))
}

async fn schema_text_by_id(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let s = app.registry.schema_by_id(id, false).await?;
    Ok((StatusCode::OK, s.schema).into_response())
}

async fn id_usages(
    app: &AppState,
    id: &str,
    q: &HashMap<String, String>,
) -> Result<Vec<(String, i32)>, ApiError> {
    let id = parse_id(id)?;
    let mut usages = app.registry.id_usages(id, flag(q, "deleted")).await?;
    if let Some(only) = q.get("subject") {
        usages.retain(|(s, _)| s == only);
    }
    Ok(usages)
}

async fn id_versions(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let usages: Vec<_> = id_usages(&app, &id, &q)
        .await?
        .into_iter()
        .map(|(subject, version)| SubjectVersionRef { subject, version })
        .collect();
    Ok(ok(&page(usages, &q)?))
}

async fn id_subjects(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut subjects: Vec<String> = id_usages(&app, &id, &q)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    subjects.dedup();
    Ok(ok(&page(subjects, &q)?))
}

async fn subjects(
    State(app): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut list = if deleted_only(&q) {
        app.registry.deleted_subjects()
    } else {
        app.registry.subjects(flag(&q, "deleted"))
    };
    if let Some(prefix) = q.get("subjectPrefix").or_else(|| q.get("subject")) {
        list.retain(|s| s.starts_with(prefix.as_str()));
    }
    Ok(ok(&page(list, &q)?))
}

async fn versions(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let list = app
        .registry
        .versions(&subject, flag(&q, "deleted"), deleted_only(&q))
        .await?;
    Ok(ok(&page(list, &q)?))
}

async fn version(
    State(app): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let spec = VersionSpec::parse(&version)?;
    Ok(ok(&app
        .registry
        .version(&subject, spec, serialized(&q), flag(&q, "deleted"))
        .await?))
}

async fn version_text(
    State(app): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let spec = VersionSpec::parse(&version)?;
    let v = app
        .registry
        .version(&subject, spec, false, flag(&q, "deleted"))
        .await?;
    Ok((StatusCode::OK, v.schema).into_response())
}

async fn referenced_by(
    State(app): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let spec = VersionSpec::parse(&version)?;
    let ids = app.registry.referenced_by(&subject, spec).await?;
    Ok(ok(&page(ids, &q)?))
}

async fn delete_version(
    State(app): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let spec = VersionSpec::parse(&version)?;
    Ok(ok(&app
        .registry
        .delete_version(&subject, spec, flag(&q, "permanent"))
        .await?))
}

async fn register(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: SchemaRequest = read_json(&app, &headers, body).await?;
    let id = app
        .registry
        .register(&subject, &req, flag(&q, "normalize"))
        .await?;
    Ok(ok(&RegisterResponse { id }))
}

async fn lookup(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: SchemaRequest = read_json(&app, &headers, body).await?;
    let mut found = app
        .registry
        .lookup(&subject, &req, flag(&q, "normalize"), flag(&q, "deleted"))
        .await?;
    if serialized(&q) {
        found.schema = app.registry.schema_by_id(found.id, true).await?.schema;
    }
    Ok(ok(&found))
}

async fn delete_subject(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    Ok(ok(&app
        .registry
        .delete_subject(&subject, flag(&q, "permanent"))
        .await?))
}

async fn compatibility(
    app: AppState,
    subject: String,
    spec: Option<VersionSpec>,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: SchemaRequest = read_json(&app, &headers, body).await?;
    let messages = app
        .registry
        .check_compatibility(&subject, spec, &req)
        .await?;
    Ok(ok(&CompatibilityResponse {
        is_compatible: messages.is_empty(),
        messages: if flag(&q, "verbose") {
            messages
        } else {
            Vec::new()
        },
    }))
}

async fn compatibility_one(
    State(app): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let spec = VersionSpec::parse(&version)?;
    compatibility(app, subject, Some(spec), q, headers, body).await
}

async fn compatibility_all(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    compatibility(app, subject, None, q, headers, body).await
}

async fn global_config(State(app): State<AppState>) -> Result<Response, ApiError> {
    let level = app.registry.level(None, true)?;
    Ok(ok(&ConfigResponse {
        compatibility_level: level.as_str().to_string(),
    }))
}

async fn subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let level = app
        .registry
        .level(Some(&subject), flag(&q, "defaultToGlobal"))?;
    Ok(ok(&ConfigResponse {
        compatibility_level: level.as_str().to_string(),
    }))
}

async fn put_config(
    app: AppState,
    subject: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let update: ConfigUpdate = read_json(&app, &headers, body).await?;
    let level = app
        .registry
        .set_level(subject.as_deref(), &update.compatibility)
        .await?;
    Ok(ok(&ConfigUpdate {
        compatibility: level.as_str().to_string(),
    }))
}

async fn put_global_config(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_config(app, None, headers, body).await
}

async fn put_subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_config(app, Some(subject), headers, body).await
}

async fn global_mode(State(app): State<AppState>) -> Result<Response, ApiError> {
    let mode = app.registry.mode(None, true)?;
    Ok(ok(&ModeBody {
        mode: mode.as_str().to_string(),
    }))
}

async fn subject_mode(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mode = app
        .registry
        .mode(Some(&subject), flag(&q, "defaultToGlobal"))?;
    Ok(ok(&ModeBody {
        mode: mode.as_str().to_string(),
    }))
}

async fn put_mode(
    app: AppState,
    subject: Option<String>,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let update: ModeBody = read_json(&app, &headers, body).await?;
    let mode = app
        .registry
        .set_mode(subject.as_deref(), &update.mode, flag(&q, "force"))
        .await?;
    Ok(ok(&ModeBody {
        mode: mode.as_str().to_string(),
    }))
}

async fn put_global_mode(
    State(app): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_mode(app, None, q, headers, body).await
}

async fn put_subject_mode(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_mode(app, Some(subject), q, headers, body).await
}

async fn delete_subject_mode(
    State(app): State<AppState>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let old = app.registry.delete_mode(&subject).await?;
    Ok(ok(&ModeBody {
        mode: old.as_str().to_string(),
    }))
}

async fn delete_subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let old = app.registry.delete_level(&subject).await?;
    Ok(ok(&ConfigResponse {
        compatibility_level: old.as_str().to_string(),
    }))
}
