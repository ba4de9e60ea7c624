//! The console's configuration (TOML; unknown keys are refused). The
//! `[[tokens]]` and `[[tenants]]` sections have the replayer's shape, so the
//! same tenancy can be copied from the replayer's configuration.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use vmr_proto::config::Expiry;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP address of the console (overridden by `--listen`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The replayer's gRPC endpoint (`http://host:port`).
    pub replayer_url: String,
    /// Longest wait for one replayer answer, seconds.
    #[serde(default = "default_replayer_timeout")]
    pub replayer_timeout_secs: u64,
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    /// Bearer tokens and the tenant each acts for.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Tenants and the instances each may see.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}

fn default_replayer_timeout() -> u64 {
    10
}

/// Where the recorded events are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Longest wait for one broker answer, seconds.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_secs: u64,
}

fn default_fetch_timeout() -> u64 {
    10
}

/// Where the snapshots are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `file:///path` or `s3://bucket/prefix` (S3 settings from the environment).
    pub url: String,
}

/// A bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub tenant: String,
    /// When the token stops being accepted (RFC 3339,
    /// `2026-12-31T23:59:59Z`); without it, it does not expire.
    pub expires_at: Option<Expiry>,
}

/// A tenant: the instances it may see.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Instance ids.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Every instance whose id starts with this.
    pub instance_prefix: Option<String>,
}

impl TenantConfig {
    /// Whether this tenant may see `instance`.
    pub fn allows(&self, instance: &str) -> bool {
        self.instances.iter().any(|i| i == instance)
            || self
                .instance_prefix
                .as_deref()
                .is_some_and(|p| !p.is_empty() && instance.starts_with(p))
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text)?;
        c.check()?;
        Ok(c)
    }

    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !(self.replayer_url.starts_with("http://") || self.replayer_url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "replayer_url {:?} is not an http:// or https:// URL",
                self.replayer_url
            )));
        }
        if self.tokens.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[tokens]]: nobody could sign in".into(),
            ));
        }
        for t in &self.tokens {
            if t.token.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "a token of tenant {:?} is shorter than 16 characters",
                    t.tenant
                )));
            }
            if !self.tenants.iter().any(|x| x.name == t.tenant) {
                return Err(ConfigError::Invalid(format!(
                    "a token names tenant {:?}, which has no [[tenants]] entry",
                    t.tenant
                )));
            }
        }
        for t in &self.tenants {
            if t.instances.is_empty() && t.instance_prefix.as_deref().unwrap_or("").is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?} has neither instances nor an instance_prefix",
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// The tenant a bearer token acts for at `now`.
    pub fn authenticate(
        &self,
        token: &str,
        now: std::time::SystemTime,
    ) -> Result<&TenantConfig, TokenRefused> {
        let t = self
            .tokens
            .iter()
            .find(|t| t.token == token)
            .ok_or(TokenRefused::Unknown)?;
        if let Some(e) = t.expires_at.as_ref().filter(|e| e.has_passed(now)) {
            return Err(TokenRefused::Expired(e.to_string()));
        }
        self.tenants
            .iter()
            .find(|x| x.name == t.tenant)
            .ok_or(TokenRefused::Unknown)
    }
}

/// Why a bearer token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    #[error("the token is not accepted (unknown or revoked): sign in again")]
    Unknown,
    #[error("the token expired at {0}: sign in with a new token")]
    Expired(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let text = include_str!("../../config/console.example.toml");
        let c = Config::parse(text).expect("the example configuration parses");
        let now = std::time::SystemTime::now();
        let shop = c
            .authenticate("change-me-shop-token-0001", now)
            .expect("a token of the example");
        assert!(shop.allows("shop-1"));
        assert!(!shop.allows("db-1"));
        assert_eq!(
            c.authenticate("nope", now).err(),
            Some(TokenRefused::Unknown)
        );
    }

    #[test]
    fn expired_tokens_are_refused() {
        let text = "replayer_url = \"http://127.0.0.1:7300\"\n[kafka]\nbootstrap_servers = \"x\"\n[store]\nurl = \"file:///tmp\"\n\
                    [[tokens]]\ntoken = \"0123456789abcdef\"\ntenant = \"a\"\nexpires_at = \"2026-01-01T00:00:00Z\"\n\
                    [[tenants]]\nname = \"a\"\ninstance_prefix = \"a-\"\n";
        let c = Config::parse(text).expect("parses");
        let at = |s: &str| s.parse::<Expiry>().expect("valid").at();
        let before = at("2025-12-31T23:59:59Z");
        assert_eq!(
            c.authenticate("0123456789abcdef", before)
                .expect("not yet expired")
                .name,
            "a"
        );
        let after = at("2026-01-01T00:00:00Z");
        let err = c
            .authenticate("0123456789abcdef", after)
            .expect_err("expired");
        assert_eq!(err, TokenRefused::Expired("2026-01-01T00:00:00Z".into()));
        assert!(err.to_string().contains("expired at 2026-01-01T00:00:00Z"));
        assert_eq!(
            c.authenticate("fedcba9876543210", before).err(),
            Some(TokenRefused::Unknown)
        );
        let bad = Config::parse(&text.replace("2026-01-01T00:00:00Z", "next year"))
            .expect_err("refused")
            .to_string();
        assert!(bad.contains("RFC 3339"), "{bad}");
    }

    #[test]
    fn refusals() {
        let base = "replayer_url = \"http://127.0.0.1:7300\"\n[kafka]\nbootstrap_servers = \"x\"\n[store]\nurl = \"file:///tmp\"\n";
        let err = |extra: &str| {
            Config::parse(&format!("{base}{extra}"))
                .expect_err("refused")
                .to_string()
        };
        assert!(err("").contains("no [[tokens]]"));
        assert!(err("[[tokens]]\ntoken = \"short\"\ntenant = \"a\"\n").contains("shorter"));
        assert!(
            err("[[tokens]]\ntoken = \"0123456789abcdef\"\ntenant = \"a\"\n")
                .contains("no [[tenants]]")
        );
        assert!(err("bogus = 1\n").contains("bogus"));
    }
}
