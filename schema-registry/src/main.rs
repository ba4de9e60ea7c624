//! `schema-registry`: the Confluent-compatible Schema Registry server, and a
//! command that registers vmreplay's topic schemas in a running registry.
//! `--check-config` checks the flags, the configuration file and the
//! environment of either command, and exits without reaching a broker.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use schema_registry::client::RegistryClient;
use schema_registry::log::{check_client_configs, LogConfig};
use schema_registry::RegistryConfig;
use vmr_proto::config::{KafkaSecurity, SaslMechanism, SecurityProtocol};

/// Confluent-compatible Schema Registry persisted in a Kafka topic.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Check the flags, the configuration file and the environment (Kafka
    /// security files and the SASL password included), then exit 0, or
    /// with an error that says what is wrong; no broker is contacted.
    #[arg(long, global = true)]
    check_config: bool,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[arg(long)]
    kafka_security_protocol: Option<SecurityProtocol>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long)]
    kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (VMR_KAFKA_SASL_USERNAME wins over it).
    #[arg(long)]
    kafka_sasl_username: Option<String>,
    /// File holding the SASL password (VMR_KAFKA_SASL_PASSWORD wins over it).
    #[arg(long)]
    kafka_sasl_password_file: Option<PathBuf>,
    /// PEM CA certificates of the brokers (SSL, SASL_SSL).
    #[arg(long)]
    kafka_ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS).
    #[arg(long)]
    kafka_ssl_cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long)]
    kafka_ssl_key_file: Option<PathBuf>,
}

impl ServeArgs {
    fn has_security_flags(&self) -> bool {
        self.kafka_security_protocol.is_some()
            || self.kafka_sasl_mechanism.is_some()
            || self.kafka_sasl_username.is_some()
            || self.kafka_sasl_password_file.is_some()
            || self.kafka_ssl_ca_file.is_some()
            || self.kafka_ssl_cert_file.is_some()
            || self.kafka_ssl_key_file.is_some()
    }
}

/// The settings: the file (whose Kafka security table must be valid on its
/// own), then the flags and environment over it.
fn settings(args: ServeArgs) -> anyhow::Result<RegistryConfig> {
    let security_flags = args.has_security_flags();
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
    if security_flags {
        let mut s = config.kafka_security.settings().clone();
        if let Some(v) = args.kafka_security_protocol {
            s.protocol = v;
        }
        if let Some(v) = args.kafka_sasl_mechanism {
            s.sasl_mechanism = Some(v);
        }
        if let Some(v) = args.kafka_sasl_username {
            s.sasl_username = Some(v);
        }
        if let Some(v) = args.kafka_sasl_password_file {
            s.sasl_password_file = Some(v);
        }
        if let Some(v) = args.kafka_ssl_ca_file {
            s.ssl_ca_file = Some(v);
        }
        if let Some(v) = args.kafka_ssl_cert_file {
            s.ssl_cert_file = Some(v);
        }
        if let Some(v) = args.kafka_ssl_key_file {
            s.ssl_key_file = Some(v);
        }
        config.kafka_security = KafkaSecurity::resolve(s, |k| std::env::var(k).ok())
            .context("invalid Kafka security flags")?;
    }
    config.validate()?;
    Ok(config)
}

/// What `--check-config` prints: the settings without the password.
fn describe(config: &RegistryConfig) -> String {
    let sec = &config.kafka_security;
    let mut out = format!(
        "bootstrap_servers={} listen={} topic={} timeout_ms={} max_body_bytes={} \
         kafka_security={}",
        config.bootstrap_servers,
        config.listen,
        config.topic,
        config.timeout_ms,
        config.max_body_bytes,
        sec.protocol()
    );
    if let Some(m) = sec
        .settings()
        .sasl_mechanism
        .filter(|_| sec.protocol().is_sasl())
    {
        out += &format!(
            " sasl_mechanism={m} sasl_username={}",
            sec.username().unwrap_or("")
        );
    }
    out
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
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let source = args
                .config
                .as_ref()
                .map_or("flags".to_string(), |p| p.display().to_string());
            let config = settings(args)?;
            if cli.check_config {
                check_client_configs(&LogConfig {
                    bootstrap_servers: config.bootstrap_servers.clone(),
                    topic: config.topic.clone(),
                    timeout: config.timeout(),
                    security: config.kafka_security.clone(),
                })
                .context("librdkafka refused the client settings")?;
                println!("{source}: configuration is valid");
                println!("{}", describe(&config));
                return Ok(());
            }
            schema_registry::serve(config, |_| {}, shutdown_signal()).await?;
        }
        Command::Register { registry } => {
            let client = RegistryClient::new(&registry)?;
            if cli.check_config {
                println!("registry url {registry}: valid");
                return Ok(());
            }
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
