//! Where the shared services are: the Kafka cluster, the Schema Registry and
//! the object store. Every vmreplay binary takes these from its configuration
//! file, flags or environment, so the same binaries run against the local stack
//! or against any Kafka cluster, Confluent/Karapace registry and S3 bucket.

use serde::Deserialize;

/// Addresses of the shared services.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Endpoints {
    /// Kafka bootstrap servers, comma-separated `host:port` pairs
    /// (env `VMR_BOOTSTRAP_SERVERS`).
    #[serde(default = "default_bootstrap")]
    pub bootstrap_servers: String,
    /// Base URL of a Confluent-compatible Schema Registry
    /// (env `VMR_REGISTRY_URL`).
    #[serde(default = "default_registry")]
    pub registry_url: String,
    /// Object store for snapshots: `s3://bucket/prefix` or `file:///path`
    /// (env `VMR_OBJECT_STORE_URL`).
    #[serde(default = "default_object_store")]
    pub object_store_url: String,
    /// Partitions of each event topic; must match the cluster's topics.
    #[serde(default = "default_partitions")]
    pub event_partitions: i32,
}

fn default_bootstrap() -> String {
    "127.0.0.1:19092".into()
}
fn default_registry() -> String {
    "http://127.0.0.1:18081".into()
}
fn default_object_store() -> String {
    "file:///var/lib/vmreplay/objects".into()
}
fn default_partitions() -> i32 {
    8
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            bootstrap_servers: default_bootstrap(),
            registry_url: default_registry(),
            object_store_url: default_object_store(),
            event_partitions: default_partitions(),
        }
    }
}

/// Errors in endpoint configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointsError {
    #[error("{name} must not be empty")]
    Empty { name: &'static str },
    #[error("registry url {0:?} must start with http:// or https://")]
    RegistryScheme(String),
    #[error("object store url {0:?} must start with s3:// or file://")]
    ObjectStoreScheme(String),
    #[error("event partitions must be positive, got {0}")]
    Partitions(i32),
}

impl Endpoints {
    /// Applies `VMR_BOOTSTRAP_SERVERS`, `VMR_REGISTRY_URL`,
    /// `VMR_OBJECT_STORE_URL` and `VMR_EVENT_PARTITIONS` from `env`.
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(v) = env("VMR_BOOTSTRAP_SERVERS") {
            self.bootstrap_servers = v;
        }
        if let Some(v) = env("VMR_REGISTRY_URL") {
            self.registry_url = v;
        }
        if let Some(v) = env("VMR_OBJECT_STORE_URL") {
            self.object_store_url = v;
        }
        if let Some(v) = env("VMR_EVENT_PARTITIONS").and_then(|v| v.parse().ok()) {
            self.event_partitions = v;
        }
        self
    }

    /// Checks that every address is usable.
    pub fn validate(&self) -> Result<(), EndpointsError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(EndpointsError::Empty {
                name: "bootstrap-servers",
            });
        }
        if !(self.registry_url.starts_with("http://") || self.registry_url.starts_with("https://"))
        {
            return Err(EndpointsError::RegistryScheme(self.registry_url.clone()));
        }
        if !(self.object_store_url.starts_with("s3://")
            || self.object_store_url.starts_with("file://"))
        {
            return Err(EndpointsError::ObjectStoreScheme(
                self.object_store_url.clone(),
            ));
        }
        if self.event_partitions <= 0 {
            return Err(EndpointsError::Partitions(self.event_partitions));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            endpoints: Endpoints,
        }
        let text = include_str!("../../config/vmreplay.example.toml");
        let f: File = toml::from_str(text).expect("the example config parses");
        f.endpoints.validate().unwrap();
        assert_eq!(f.endpoints.event_partitions, 8);
    }

    #[test]
    fn unknown_fields_and_bad_urls_are_rejected() {
        assert!(toml::from_str::<Endpoints>("bootstrap-server = \"x\"").is_err());
        let e = Endpoints {
            registry_url: "ftp://x".into(),
            ..Endpoints::default()
        };
        assert!(matches!(
            e.validate(),
            Err(EndpointsError::RegistryScheme(_))
        ));
        let e = Endpoints::default()
            .with_env(|k| (k == "VMR_OBJECT_STORE_URL").then(|| "s3://bucket/snaps".to_string()));
        assert_eq!(e.object_store_url, "s3://bucket/snaps");
        e.validate().unwrap();
    }
}
