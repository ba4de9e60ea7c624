//! The server's settings, from a TOML file, flags or the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use vmr_proto::config::{KafkaSecurity, KafkaSecurityError};

/// Errors loading the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid registry config {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    /// The Kafka security settings are unusable.
    #[error("invalid Kafka security settings")]
    Security(#[from] KafkaSecurityError),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Settings of a registry instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RegistryConfig {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// Address the REST API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The compacted, single-partition topic holding the registry's records.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How long a write (or reading up to the end of the topic) may take, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest request body accepted, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How the Kafka clients encrypt and authenticate (`[kafka_security]`);
    /// PLAINTEXT when absent.
    #[serde(default)]
    pub kafka_security: KafkaSecurity,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_topic() -> String {
    vmr_proto::topics::SCHEMAS.to_string()
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_body() -> usize {
    crate::server::DEFAULT_MAX_BODY_BYTES
}

impl RegistryConfig {
    /// Settings with defaults for everything but the bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            listen: default_listen(),
            topic: default_topic(),
            timeout_ms: default_timeout_ms(),
            max_body_bytes: default_max_body(),
            kafka_security: KafkaSecurity::default(),
        }
    }

    /// Checks values the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("bootstrap_servers must not be empty".into());
        }
        if self.topic.trim().is_empty() {
            return bad("topic must not be empty".into());
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms must be positive".into());
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes must be positive".into());
        }
        Ok(())
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The write/read timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../registry.example.toml");
        let c = RegistryConfig::from_toml(text, "registry.example.toml").unwrap();
        assert_eq!(c.topic, "_schemas");
        assert_eq!(c.listen.port(), 8081);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err =
            RegistryConfig::from_toml("bootstrap_servers = \"x\"\nbogus = 1\n", "t").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
    }
}
