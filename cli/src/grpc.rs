//! The gRPC side: a runtime for the blocking command line, bounded channels
//! to the replayer and the agent, the bearer token, and `tonic::Status`
//! turned into [`CliError`] (and so into an exit code).

use std::future::Future;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::error::{CliError, CliResult, ErrorKind};

/// How long a connection to a service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one unary call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A current-thread runtime for one command.
pub fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::other(format!("cannot start the async runtime: {e}")))
}

/// Runs `f` to completion on a fresh runtime.
pub fn block_on<F: Future>(f: F) -> CliResult<F::Output> {
    Ok(runtime()?.block_on(f))
}

/// Which service a channel goes to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Replayer,
    Agent,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Replayer => "replayer",
            Service::Agent => "capture agent",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Service::Replayer => "--replayer-url / VMR_REPLAYER_URL",
            Service::Agent => "--agent-url / VMR_AGENT_URL",
        }
    }
}

/// Connects to `url` within [`CONNECT_TIMEOUT`].
pub async fn connect(svc: Service, url: &str) -> CliResult<Channel> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| CliError::usage(format!("the {} URL {url:?} is invalid: {e}", svc.name())))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    ep.connect().await.map_err(|e| {
        CliError::unavailable(format!(
            "cannot reach the {} at {url}: {}",
            svc.name(),
            source_chain(&e)
        ))
        .hint(format!(
            "start the {} or point {} at a running one",
            svc.name(),
            svc.flag()
        ))
    })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A request carrying `authorization: Bearer <token>` when a token is set.
pub fn request<T>(msg: T, token: Option<&str>) -> CliResult<Request<T>> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}").parse().map_err(|_| {
            CliError::usage("the token holds characters a header cannot carry")
                .hint("check --token / VMR_TOKEN")
        })?;
        r.metadata_mut().insert("authorization", v);
    }
    Ok(r)
}

/// The error a failed call of `what` becomes.
pub fn status_error(svc: Service, what: &str, s: &Status) -> CliError {
    let msg = format!("{what}: {}", s.message());
    let (kind, hint): (ErrorKind, Option<String>) = match s.code() {
        Code::NotFound => (ErrorKind::NotFound, None),
        Code::InvalidArgument | Code::OutOfRange => (ErrorKind::Usage, None),
        Code::AlreadyExists => (ErrorKind::FailedPrecondition, None),
        Code::FailedPrecondition | Code::Aborted => (ErrorKind::FailedPrecondition, None),
        Code::Unavailable | Code::DeadlineExceeded => (
            ErrorKind::Unavailable,
            Some(format!("check that the {} is running", svc.name())),
        ),
        Code::Unauthenticated => (
            ErrorKind::FailedPrecondition,
            Some("set a valid bearer token with --token, VMR_TOKEN or [cli] token".into()),
        ),
        Code::PermissionDenied => (
            ErrorKind::FailedPrecondition,
            Some("this token's tenant may not see that instance or clone".into()),
        ),
        Code::Unimplemented => (
            ErrorKind::FailedPrecondition,
            Some(format!("this {} does not support it", svc.name())),
        ),
        _ => (ErrorKind::Other, None),
    };
    let mut e = CliError::new(
        kind,
        format!("the {} refused {msg} ({:?})", svc.name(), s.code()),
    );
    if let Some(h) = hint {
        e = e.hint(h);
    }
    e
}
