//! The vmreplay web console: recorded instances on a timeline, and replays
//! steered from the browser.
//!
//! A background [`consumer`] reads the event topics into the
//! [`aggregate::Aggregator`], which keeps per-instance rollups (counts per
//! device and direction per time bucket at several resolutions, lifecycle
//! markers, sensor series), so a timeline overview never ships raw events.
//! The [`server`] serves the embedded page and its JSON and server-sent
//! events API; replay calls go to the replayer's gRPC API with the caller's
//! token ([`replayer`]). Every asset is compiled into the binary.

pub mod aggregate;
pub mod config;
pub mod consumer;
pub mod decode;
pub mod replayer;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

pub use config::{Config, ConfigError};

/// Errors running the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Serves the console until `shutdown` resolves; the consumer runs as long.
pub async fn run(
    config: Config,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    let agg = Arc::new(RwLock::new(aggregate::Aggregator::new()));
    let consumer = consumer::Consumer::start(
        &config.kafka.bootstrap_servers,
        Duration::from_secs(config.kafka.fetch_timeout_secs.max(1)),
        agg.clone(),
    );
    let state = Arc::new(server::AppState::new(
        config,
        agg,
        Some(consumer.status.clone()),
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ConsoleError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(%listen, "console listening");
    let r = axum::serve(listener, server::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ConsoleError::Serve);
    // Stopping the consumer joins its threads, which may block briefly.
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .ok();
    r
}
