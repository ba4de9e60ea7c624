//! The agent's gRPC service (`vmr.v1.CaptureAgent`) and what it needs.
//!
//! - [`host`]: the instances of this agent (launch from an image, inspect,
//!   pause, resume, stop, filters, lifecycle history).
//! - [`grpc`]: the tonic service over the host.
//! - [`prometheus`]: `/metrics` over HTTP.
//! - [`snapshot`]: the [`SnapshotControl`] trait the snapshot engine
//!   implements for the snapshot RPCs.
//!
//! [`serve`] runs them together with the standard `grpc.health.v1` and
//! reflection (`grpc.reflection.v1` and `v1alpha`) services.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use vmr_proto::pb::capture_agent_server::CaptureAgentServer;

use crate::config::AgentConfig;

pub mod grpc;
pub mod host;
pub mod prometheus;
pub mod snapshot;

pub use host::{Host, HostError};
pub use snapshot::{
    OperationState, OperationStatus, SnapshotControl, SnapshotControlError, SnapshotEntry,
    SnapshotRequest,
};

/// The encoded `FileDescriptorSet` of `vmr/v1/agent.proto` and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/capture_agent_descriptor.bin"));

/// How long open calls (watch streams) get to end after the shutdown
/// signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the reflection service cannot be built: {0}")]
    Reflection(String),
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs the gRPC service on `cfg.agent.listen` and `/metrics` on
/// `cfg.agent.metrics-listen` until `shutdown` completes, then stops every
/// instance. Before it serves, it re-attaches to the instances an earlier
/// agent process left running ([`Host::recover`]) and restarts their
/// snapshot schedules through `snapshots`. `snapshots` serves the snapshot RPCs (`None`: they answer
/// `UNIMPLEMENTED`).
pub async fn serve(
    cfg: AgentConfig,
    snapshots: Option<Arc<dyn SnapshotControl>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listen = cfg.agent.listen;
    let metrics_listen = cfg.agent.metrics_listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen,
            source,
        })?;
    let mlistener =
        TcpListener::bind(metrics_listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: metrics_listen,
                source,
            })?;
    let host = Host::new(cfg);
    {
        let h = host.clone();
        match tokio::task::spawn_blocking(move || h.probe_broker()).await {
            Ok(Ok(())) => {
                tracing::info!(bootstrap = %host.config().endpoints.bootstrap_servers, "broker reachable")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "broker unreachable at start; launches are refused with UNAVAILABLE until it answers")
            }
            Err(_) => {}
        }
    }
    {
        let h = host.clone();
        let snaps = snapshots.clone();
        let r = tokio::task::spawn_blocking(move || {
            let found = h.recover();
            if let Some(s) = &snaps {
                for (e, spec) in &found {
                    if let Some(i) = e.running() {
                        s.launched(i, spec);
                    }
                }
            }
            found.len()
        })
        .await;
        match r {
            Ok(n) if n > 0 => tracing::info!(
                instances = n,
                "re-attached to instances left running by an earlier agent process"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "re-attaching instances panicked"),
        }
    }
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    {
        let h = host.clone();
        tokio::spawn(async move {
            if let Err(error) = prometheus::serve(h, mlistener, async {
                let _ = metrics_stopped.await;
            })
            .await
            {
                tracing::warn!(%error, "the metrics endpoint failed");
            }
        });
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CaptureAgentServer<grpc::CaptureAgentService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let svc = CaptureAgentServer::new(grpc::CaptureAgentService {
        host: host.clone(),
        snapshots: snapshots.clone(),
    });
    tracing::info!(grpc = %listen, metrics = %metrics_listen, "capture agent serving");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            let _ = tx.send(());
        });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("calls still open after the shutdown grace; closing");
            Ok(())
        }
    };
    let _ = stop_metrics.send(());
    tracing::info!("stopping every instance");
    let h = host.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(s) = &snapshots {
            for e in h.entries() {
                s.stopping(e.id().as_str());
            }
        }
        h.stop_all()
    })
    .await;
    result.map_err(ServeError::from)
}
