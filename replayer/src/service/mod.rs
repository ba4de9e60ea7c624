//! The replayer's gRPC service (`vmr.v1.Replayer`) with the standard health
//! and reflection (`grpc.reflection.v1` and `v1alpha`) services, over the
//! [`clone`](crate::clone) runtime.
//!
//! Every call needs `authorization: Bearer <token>`; the configuration maps
//! tokens to tenants and tenants to the instances they may see. Clones are
//! independent; all of them are torn down when the server shuts down.

pub mod config;
mod grpc;
mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use vmr_proto::pb::replayer_server::ReplayerServer;

pub use config::{Config, ConfigError};

use crate::clone::CloneRuntime;

/// The encoded `FileDescriptorSet` of `vmr.v1.Replayer` and its imports,
/// served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/replayer_descriptor.bin"));

/// How long open calls may go on after the shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the shutdown waits for clones still being built.
const BUILD_DRAIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Errors running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the snapshot store")]
    Store(#[from] vmr_snapshot::StoreError),
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the reflection service cannot be built: {0}")]
    Reflection(String),
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// A clone and who owns it.
pub(crate) struct Entry {
    pub tenant: String,
    pub runtime: Arc<CloneRuntime>,
    pub progress: tokio::sync::broadcast::Sender<vmr_proto::pb::ReplayProgress>,
    /// What the clone was asked for (a switch rebuilds it with these).
    pub params: Arc<grpc::Params>,
    /// Switches so far (`u32::MAX` while one is under way).
    pub switches: u32,
}

/// Shared state of the service.
pub(crate) struct State {
    pub config: Config,
    pub store: vmr_snapshot::SnapshotStore,
    pub blk_bin: PathBuf,
    pub net_bin: PathBuf,
    pub clones: Mutex<HashMap<String, Entry>>,
    /// Clones being built (counted against `max_clones`); a [`BuildSlot`]
    /// holds each one.
    pub building: Arc<Mutex<usize>>,
    pub counters: metrics::Counters,
    /// Set (under the `clones` lock) when the shutdown removes every
    /// clone: a build that ends later removes its clone instead of listing
    /// it.
    pub closing: std::sync::atomic::AtomicBool,
}

/// A clone build's place under `max_clones`. Dropping it gives the place
/// back, so every way out of the build task gives it back: success (after
/// the clone is listed), an error, a panic and the task's cancellation.
#[derive(Debug)]
#[must_use = "the place is given back when the slot is dropped"]
pub(crate) struct BuildSlot {
    building: Arc<Mutex<usize>>,
}

impl BuildSlot {
    /// Takes a place when the `listed` clones and those being built are
    /// fewer than `max`.
    pub(crate) fn reserve(building: &Arc<Mutex<usize>>, listed: usize, max: usize) -> Option<Self> {
        let mut b = building.lock().unwrap_or_else(PoisonError::into_inner);
        if listed + *b >= max {
            return None;
        }
        *b += 1;
        Some(Self {
            building: building.clone(),
        })
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        // Also while unwinding from a panic that poisoned the lock.
        let mut b = self.building.lock().unwrap_or_else(PoisonError::into_inner);
        *b = b.saturating_sub(1);
    }
}

impl State {
    fn teardown_all(&self) {
        let all: Vec<Entry> = {
            // Shutdown removes every clone even after a panic poisoned the
            // lock: otherwise their processes and namespaces would outlive
            // the service.
            let mut clones = self.clones.lock().unwrap_or_else(PoisonError::into_inner);
            self.closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            clones.drain().map(|(_, e)| e).collect()
        };
        for e in all {
            tracing::info!(clone = %e.runtime.id(), "removing clone at shutdown");
            e.runtime.teardown();
            let _ = std::fs::remove_dir_all(self.config.work_dir.join(e.runtime.id()));
        }
    }

    /// Waits (at most `bound`) until no clone is being built; whether none
    /// is.
    async fn builds_ended(&self, bound: std::time::Duration) -> bool {
        let end = tokio::time::Instant::now() + bound;
        loop {
            let n = *self.building.lock().unwrap_or_else(PoisonError::into_inner);
            if n == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                tracing::warn!(builds = n, "clones still being built at shutdown");
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Selects rustls' ring provider for TLS in this process (the dependency
/// graph enables more than one, so none is chosen automatically). Calling it
/// again does nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves on `listener` until `shutdown` completes, then removes every
/// clone (processes, namespaces, files) and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    config.validate()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|source| ServiceError::Io {
        path: config.work_dir.clone(),
        source,
    })?;
    let store = vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(
        config.store.url.clone(),
    ))?;
    let state = Arc::new(State {
        blk_bin: config
            .backends
            .blk
            .clone()
            .unwrap_or_else(|| sibling_bin("vhost-tap-blk")),
        net_bin: config
            .backends
            .net
            .clone()
            .unwrap_or_else(|| sibling_bin("vhost-tap-net")),
        config,
        store,
        clones: Mutex::new(HashMap::new()),
        building: Arc::new(Mutex::new(0)),
        counters: metrics::Counters::default(),
        closing: std::sync::atomic::AtomicBool::new(false),
    });
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = state.config.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Io {
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        tracing::info!(%addr, "metrics on /metrics");
        let st = state.clone();
        tokio::spawn(async move {
            if let Err(error) = metrics::serve(st, l, async {
                let _ = metrics_stopped.await;
            })
            .await
            {
                tracing::warn!(%error, "the metrics endpoint failed");
            }
        });
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ReplayerServer<grpc::Replayer>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServiceError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServiceError::Reflection(e.to_string()))?;
    let svc = ReplayerServer::new(grpc::Replayer {
        state: state.clone(),
    });
    // After the shutdown signal, open calls (watch streams) get a bounded
    // time to end.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &state.config.tls {
        install_crypto_provider();
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| ServiceError::Io {
                path: p.clone(),
                source,
            })
        };
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let server = builder
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
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.teardown_all()).await;
    // Builds still under way remove their clones when they end.
    state.builds_ended(BUILD_DRAIN).await;
    result.map_err(ServiceError::from)
}

/// Binds `addr` and serves until `shutdown`.
pub async fn serve_addr(
    config: Config,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Io {
            path: PathBuf::from(addr.to_string()),
            source,
        })?;
    tracing::info!(%addr, "replayer listening");
    serve(config, listener, shutdown).await
}
