//! Confluent-compatible Schema Registry persisted in Kafka, its client and the
//! wire-format codec.
//!
//! - [`server`] and [`registry`]: the REST API and its operations. The only
//!   storage is the compacted single-partition `_schemas` topic ([`log`],
//!   record formats in [`state`]); every instance rebuilds its state by
//!   reading the topic and keeps tailing it, so several instances agree.
//! - [`schema`] and [`render`]: schemas in text or serialized
//!   (`FileDescriptorProto`) form, compiled with protox; serialized schemas
//!   are stored as `.proto` text rendered from the descriptor, and identity
//!   is the compiled descriptor, whatever the form.
//! - [`compat`]: compatibility levels and the protobuf rules.
//! - [`client`]: a REST client used by producers.
//! - [`codec`]: the Confluent wire format of record values.

pub mod api;
pub mod client;
pub mod codec;
pub mod compat;
pub mod config;
pub mod log;
pub mod registry;
pub mod render;
pub mod schema;
pub mod server;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

pub use config::RegistryConfig;

/// Errors running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The Kafka clients could not be created.
    #[error("could not start the schemas log")]
    Log(#[from] log::LogError),
    /// The listen address could not be bound.
    #[error("could not listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed")]
    Http(#[source] std::io::Error),
}

/// Runs a registry until `shutdown` completes: reads the `_schemas` topic to
/// its end (retrying while the broker is unreachable), then serves the REST
/// API. `on_listening` is called with the bound address.
pub async fn serve(
    config: RegistryConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let log = log::SchemaLog::start(log::LogConfig {
        bootstrap_servers: config.bootstrap_servers.clone(),
        topic: config.topic.clone(),
        timeout: config.timeout(),
        security: config.kafka_security.clone(),
    })?;
    let registry = Arc::new(registry::Registry::new(log));
    let mut attempt = 0u32;
    loop {
        match registry.sync().await {
            Ok(()) => break,
            Err(error) => {
                attempt += 1;
                warn!(%error, attempt, "could not read the schemas topic yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    info!(
        subjects = registry.subjects(false).len(),
        "schemas topic read"
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    info!(%addr, "schema registry listening");
    on_listening(addr);
    axum::serve(listener, server::router(registry, config.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Http)
}
