//! `vmr-console`: serves the web console.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The vmreplay web console: recorded instances on a timeline, replays
/// steered from the browser.
#[derive(Parser, Debug)]
#[command(name = "vmr-console", version)]
struct Args {
    /// Configuration file (TOML; see config/console.example.toml).
    #[arg(long, env = "VMR_CONSOLE_CONFIG")]
    config: PathBuf,
    /// HTTP address (overrides `listen` in the configuration).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = vmr_console::Config::load(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let listen = args.listen.unwrap_or(config.listen);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler succeeds in a fresh process");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    vmr_console::run(config, listen, shutdown).await?;
    Ok(())
}
