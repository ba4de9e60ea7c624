//! The vmreplay command line (`vmr`).
//!
//! Each subcommand lives in its own module under [`cmd`] and returns a
//! [`CliResult`]; [`run`] prints the error and turns its kind into the exit
//! code (0 ok, 1 other, 2 usage, 3 not found, 4 unavailable, 5 failed
//! precondition). Output goes through [`output::Out`]: human tables by
//! default, JSON with `--json`.

pub mod cmd;
pub mod config;
pub mod error;
pub mod grpc;
pub mod kafka;
pub mod output;
pub mod progress;
pub mod util;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use error::{CliError, CliResult, ErrorKind};

/// The vmreplay command line: check the host, manage machine images, run the
/// local stack and read recorded events.
#[derive(Debug, Parser)]
#[command(name = "vmr", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Configuration file (the services' format, see
    /// config/vmreplay.example.toml); also `$VMR_CONFIG`.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables (see docs/cli.md).
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only results and errors, no progress.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Kafka bootstrap servers (overrides the file and $VMR_BOOTSTRAP_SERVERS).
    #[arg(long, global = true, value_name = "HOST:PORT,...")]
    pub bootstrap_servers: Option<String>,
    /// Schema Registry URL (overrides the file and $VMR_REGISTRY_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub registry_url: Option<String>,
    /// Object store URL, s3://bucket/prefix or file:///path (overrides the
    /// file and $VMR_OBJECT_STORE_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub object_store_url: Option<String>,
    /// Partitions of each event topic (overrides the file and
    /// $VMR_EVENT_PARTITIONS).
    #[arg(long, global = true, value_name = "N")]
    pub event_partitions: Option<i32>,
    /// Data directory of the local stack (overrides [cli] data-dir and
    /// $VMR_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The replayer's gRPC URL (overrides [cli] replayer-url and
    /// $VMR_REPLAYER_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub replayer_url: Option<String>,
    /// The capture agent's gRPC URL (overrides [cli] agent-url and
    /// $VMR_AGENT_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub agent_url: Option<String>,
    /// Bearer token for the services (overrides [cli] token and $VMR_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// The subcommands.
// Parsed once per run: the size of the largest variant (`replay start`'s
// arguments) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check this host and the configured services, and say what to fix.
    Doctor(cmd::doctor::DoctorArgs),
    /// Machine images: list, show, build.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Recorded events.
    #[command(subcommand)]
    Events(cmd::events::EventsCommand),
    /// The local stack: broker, topics, schema registry, filesystem object store.
    #[command(subcommand)]
    Stack(cmd::stack::StackCommand),
    /// Replays: clones of recorded instances, steered and watched.
    #[command(subcommand)]
    Replay(cmd::replay::ReplayCommand),
    /// Recorded instances on a capture agent.
    #[command(subcommand)]
    Instance(cmd::instance::InstanceCommand),
    /// Snapshots of recorded instances.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Draw an instance's recorded events, snapshots, crash and replay (SVG, PNG).
    Timeline(cmd::timeline::TimelineArgs),
    /// Print a shell completion script.
    Completions(cmd::completions::CompletionsArgs),
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let out = output::Out::new(cli.global.json, cli.global.quiet);
    match dispatch(&cli, &out) {
        Ok(()) => 0,
        Err(e) => {
            out.error(&e);
            e.kind.exit_code()
        }
    }
}

fn dispatch(cli: &Cli, out: &output::Out) -> CliResult {
    if let Command::Completions(a) = &cli.command {
        return cmd::completions::run(a);
    }
    let g = &cli.global;
    let flags = config::Overrides {
        bootstrap_servers: g.bootstrap_servers.clone(),
        registry_url: g.registry_url.clone(),
        object_store_url: g.object_store_url.clone(),
        event_partitions: g.event_partitions,
        data_dir: g.data_dir.clone(),
        replayer_url: g.replayer_url.clone(),
        agent_url: g.agent_url.clone(),
        token: g.token.clone(),
    };
    let cfg = config::Config::load(g.config.as_deref(), |k| std::env::var(k).ok(), &flags)?;
    let needs = |broker, store| cmd::stack::Needs { broker, store };
    let need = match &cli.command {
        Command::Events(_) => Some(needs(true, false)),
        Command::Timeline(_) => Some(needs(true, true)),
        Command::Snapshot(cmd::snapshot::SnapshotCommand::List(a)) if !a.agent => {
            Some(needs(false, true))
        }
        Command::Snapshot(cmd::snapshot::SnapshotCommand::Show(_)) => Some(needs(false, true)),
        _ => None,
    };
    let cfg = match need {
        Some(n) => cmd::stack::embedded_default(&cfg, n, out)?,
        None => cfg,
    };
    match &cli.command {
        Command::Doctor(a) => cmd::doctor::run(&cfg, a, out),
        Command::Image(c) => cmd::image::run(&cfg, c, out),
        Command::Events(c) => cmd::events::run(&cfg, c, out),
        Command::Stack(c) => cmd::stack::run(&cfg, c, out),
        Command::Replay(c) => cmd::replay::run(&cfg, c, out),
        Command::Instance(c) => cmd::instance::run(&cfg, c, out),
        Command::Snapshot(c) => cmd::snapshot::run(&cfg, c, out),
        Command::Timeline(a) => cmd::timeline::run(&cfg, a, out),
        Command::Completions(_) => unreachable!("handled above"),
    }
}
