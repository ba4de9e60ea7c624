//! `schema-registry`: the Confluent-compatible Schema Registry server, and a
//! command that registers vmreplay's topic schemas in a running registry.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use schema_registry::client::RegistryClient;
use schema_registry::RegistryConfig;

/// Confluent-compatible Schema Registry persisted in a Kafka topic.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the REST API.
    Serve(ServeArgs),
    /// Register vmreplay's value schemas (`<topic>-value`) in a running
    /// registry and print the ids.
    Register {
        /// Base URL of the registry.
        #[arg(
            long,
            env = "VMR_REGISTRY_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        registry: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML settings file (see registry.example.toml); flags override it.
    #[arg(long, env = "VMR_REGISTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "VMR_REGISTRY_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Address of the REST API.
    #[arg(long, env = "VMR_REGISTRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// The compacted, single-partition topic of the registry.
    #[arg(long, env = "VMR_REGISTRY_TOPIC")]
    topic: Option<String>,
    /// Write and catch-up timeout, milliseconds.
    #[arg(long, env = "VMR_REGISTRY_TIMEOUT_MS")]
    timeout_ms: Option<u64>,
    /// Largest request body, bytes.
    #[arg(long, env = "VMR_REGISTRY_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
}

fn settings(args: ServeArgs) -> anyhow::Result<RegistryConfig> {
    let mut config = match &args.config {
        Some(path) => RegistryConfig::load(path)?,
        None => RegistryConfig::new(
            args.bootstrap_servers
                .clone()
                .context("--bootstrap-servers (or a --config file) is required")?,
        ),
    };
    if let Some(v) = args.bootstrap_servers {
        config.bootstrap_servers = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.topic {
        config.topic = v;
    }
    if let Some(v) = args.timeout_ms {
        config.timeout_ms = v;
    }
    if let Some(v) = args.max_body_bytes {
        config.max_body_bytes = v;
    }
    Ok(config)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let config = settings(args)?;
            schema_registry::serve(config, |_| {}, shutdown_signal()).await?;
        }
        Command::Register { registry } => {
            let client = RegistryClient::new(&registry)?;
            for t in client.register_vmr_schemas().await? {
                println!(
                    "{}\t{}\tid={}\tmessage_indexes={:?}",
                    t.topic, t.subject, t.id, t.message_indexes
                );
            }
        }
    }
    Ok(())
}
