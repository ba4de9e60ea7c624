//! The command line's configuration: the same file as the services
//! (`config/vmreplay.example.toml`), then the `VMR_*` environment, then flags.
//!
//! The file's `[endpoints]` table is read as the services read it
//! ([`vmr_proto::config::Endpoints`]); an optional `[cli]` table holds what
//! only the command line needs. Other tables belong to the services and are
//! left alone.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmr_proto::config::Endpoints;

use crate::error::{CliError, CliResult};

/// Settings only the command line uses (the file's `[cli]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CliSection {
    /// Where the local stack keeps its data, logs and filesystem object store
    /// (env `VMR_DATA_DIR`; default `~/.local/share/vmreplay`).
    pub data_dir: Option<PathBuf>,
    /// Extra places to look for machine images: image directories, or
    /// directories holding them (env `VMR_IMAGE_PATH`, `:`-separated).
    #[serde(default)]
    pub image_path: Vec<PathBuf>,
    /// The replayer's gRPC address (env `VMR_REPLAYER_URL`; default
    /// `http://127.0.0.1:7300`).
    pub replayer_url: Option<String>,
    /// The capture agent's gRPC address (env `VMR_AGENT_URL`; default
    /// `http://127.0.0.1:50061`).
    pub agent_url: Option<String>,
    /// Bearer token sent to the services (env `VMR_TOKEN`).
    pub token: Option<String>,
}

/// Values given as flags, which win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub bootstrap_servers: Option<String>,
    pub registry_url: Option<String>,
    pub object_store_url: Option<String>,
    pub event_partitions: Option<i32>,
    pub data_dir: Option<PathBuf>,
    pub replayer_url: Option<String>,
    pub agent_url: Option<String>,
    pub token: Option<String>,
}

/// Where each endpoint value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Flag => "flag",
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration file read, if any.
    pub file: Option<PathBuf>,
    /// The shared services.
    pub endpoints: Endpoints,
    /// Where `bootstrap_servers` came from.
    pub broker_source: Source,
    /// The data directory.
    pub data_dir: PathBuf,
    /// vmreplay's cache (`$VMR_CACHE`, else `~/.cache/vmreplay`).
    pub cache_dir: PathBuf,
    /// Extra image locations.
    pub image_path: Vec<PathBuf>,
    /// The replayer's gRPC URL.
    pub replayer_url: String,
    /// The capture agent's gRPC URL.
    pub agent_url: String,
    /// Bearer token for the services.
    pub token: Option<String>,
    /// Whether the object store was configured (file, env or flag) rather
    /// than left at its default.
    pub store_configured: bool,
}

/// The replayer's default gRPC URL.
pub const DEFAULT_REPLAYER_URL: &str = "http://127.0.0.1:7300";
/// The capture agent's default gRPC URL.
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:50061";

fn check_url(what: &str, v: &str) -> CliResult<()> {
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(())
    } else {
        Err(
            CliError::usage(format!("{what} {v:?} is not an http:// or https:// URL"))
                .hint("write it as http://HOST:PORT"),
        )
    }
}

#[derive(Debug, Deserialize)]
struct FileTables {
    #[serde(default)]
    endpoints: Option<toml::Value>,
    #[serde(default)]
    cli: Option<toml::Value>,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

impl Config {
    /// Loads the configuration: `file` (or `$VMR_CONFIG`), then the
    /// environment as given by `env`, then `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> CliResult<Self> {
        let env_file = env("VMR_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut endpoints = Endpoints::default();
        let mut cli = CliSection::default();
        let mut broker_source = Source::Default;
        let mut store_configured = false;
        if let Some(path) = &file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CliError::usage(format!(
                    "cannot read the config file {}: {e}",
                    path.display()
                ))
                .hint("pass an existing file with --config, or unset VMR_CONFIG")
            })?;
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                CliError::usage(format!("config file {}: {what}: {e}", path.display()))
                    .hint("compare with config/vmreplay.example.toml")
            };
            let tables: FileTables = toml::from_str(&text).map_err(|e| bad("not TOML", &e))?;
            if let Some(v) = tables.endpoints {
                let has_broker = v.get("bootstrap-servers").is_some();
                store_configured = v.get("object-store-url").is_some();
                endpoints = v.try_into().map_err(|e| bad("[endpoints]", &e))?;
                if has_broker {
                    broker_source = Source::File;
                }
            }
            if let Some(v) = tables.cli {
                cli = v.try_into().map_err(|e| bad("[cli]", &e))?;
            }
        }
        if env("VMR_BOOTSTRAP_SERVERS").is_some() {
            broker_source = Source::Env;
        }
        if env("VMR_OBJECT_STORE_URL").is_some() || flags.object_store_url.is_some() {
            store_configured = true;
        }
        if let Some(v) = env("VMR_EVENT_PARTITIONS") {
            if v.parse::<i32>().is_err() {
                return Err(CliError::usage(format!(
                    "VMR_EVENT_PARTITIONS={v:?} is not a number"
                )));
            }
        }
        endpoints = endpoints.with_env(&env);
        if let Some(v) = &flags.bootstrap_servers {
            endpoints.bootstrap_servers = v.clone();
            broker_source = Source::Flag;
        }
        if let Some(v) = &flags.registry_url {
            endpoints.registry_url = v.clone();
        }
        if let Some(v) = &flags.object_store_url {
            endpoints.object_store_url = v.clone();
        }
        if let Some(v) = flags.event_partitions {
            endpoints.event_partitions = v;
        }
        endpoints.validate().map_err(|e| {
            CliError::usage(format!("invalid endpoint configuration: {e}"))
                .hint("fix the [endpoints] table, the VMR_* variable or the flag")
        })?;
        let data_dir = flags
            .data_dir
            .clone()
            .or_else(|| env("VMR_DATA_DIR").map(PathBuf::from))
            .or(cli.data_dir)
            .unwrap_or_else(|| home().join(".local/share/vmreplay"));
        let cache_dir = env("VMR_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".cache/vmreplay"));
        let mut image_path = cli.image_path;
        if let Some(v) = env("VMR_IMAGE_PATH") {
            image_path.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        let replayer_url = flags
            .replayer_url
            .clone()
            .or_else(|| env("VMR_REPLAYER_URL"))
            .or(cli.replayer_url)
            .unwrap_or_else(|| DEFAULT_REPLAYER_URL.to_string());
        check_url("the replayer URL", &replayer_url)?;
        let agent_url = flags
            .agent_url
            .clone()
            .or_else(|| env("VMR_AGENT_URL"))
            .or(cli.agent_url)
            .unwrap_or_else(|| DEFAULT_AGENT_URL.to_string());
        check_url("the agent URL", &agent_url)?;
        let token = flags
            .token
            .clone()
            .or_else(|| env("VMR_TOKEN"))
            .or(cli.token)
            .filter(|t| !t.is_empty());
        Ok(Self {
            file,
            endpoints,
            broker_source,
            data_dir,
            cache_dir,
            image_path,
            replayer_url,
            agent_url,
            token,
            store_configured,
        })
    }

    /// The local stack's directory (data, logs, pid files).
    pub fn stack_dir(&self) -> PathBuf {
        self.data_dir.join("stack")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/vmreplay.example.toml");
        let c = Config::load(Some(&p), no_env, &Overrides::default()).unwrap();
        assert_eq!(c.endpoints.bootstrap_servers, "127.0.0.1:19092");
        assert_eq!(c.broker_source, Source::File);
    }

    #[test]
    fn env_then_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[endpoints]\nbootstrap-servers = \"a:1\"\n[cli]\ndata-dir = \"/d\"\n[agent]\nx = 1\n",
        )
        .unwrap();
        let env = |k: &str| (k == "VMR_BOOTSTRAP_SERVERS").then(|| "b:2".to_string());
        let c = Config::load(Some(&p), env, &Overrides::default()).unwrap();
        assert_eq!(c.endpoints.bootstrap_servers, "b:2");
        assert_eq!(c.broker_source, Source::Env);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        let flags = Overrides {
            bootstrap_servers: Some("c:3".into()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&p), env, &flags).unwrap();
        assert_eq!(c.endpoints.bootstrap_servers, "c:3");
        assert_eq!(c.broker_source, Source::Flag);
    }

    #[test]
    fn the_example_cli_table_loads_when_uncommented() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/vmreplay.example.toml");
        let text = std::fs::read_to_string(p).unwrap();
        let i = text.find("# [cli]").expect("the example has a [cli] table");
        let uncommented: String = text[..i].to_string()
            + &text[i..]
                .lines()
                .map(|l| l.strip_prefix("# ").unwrap_or(l))
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, uncommented).unwrap();
        let c = Config::load(Some(&f), no_env, &Overrides::default()).unwrap();
        assert_eq!(c.replayer_url, "http://127.0.0.1:7300");
        assert_eq!(c.agent_url, "http://127.0.0.1:50061");
        assert_eq!(c.token.as_deref(), Some("change-me-shop-token-0001"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/vmreplay/cli"));
    }

    #[test]
    fn unknown_keys_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[cli]\ndata-dri = \"/d\"\n").unwrap();
        let e = Config::load(Some(&p), no_env, &Overrides::default()).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Usage);
        assert!(e.message.contains("data-dri"), "{}", e.message);
    }
}
