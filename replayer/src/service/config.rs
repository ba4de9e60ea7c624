//! The service's configuration file (TOML; see `config/replayer.example.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid configuration: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The replayer's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to serve gRPC on (overridden by `--listen`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address to serve Prometheus metrics on (`/metrics`); none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory for materialised snapshots and the clones' private files.
    pub work_dir: PathBuf,
    /// Where the recorded events are.
    pub kafka: KafkaConfig,
    /// Where the snapshots are.
    pub store: StoreSection,
    /// The vhost-tap binaries (default: next to the `replayer` binary).
    #[serde(default)]
    pub backends: BackendsConfig,
    /// Machine images by name, as manifests name them.
    #[serde(default)]
    pub images: Vec<ImageConfig>,
    /// Bearer tokens and the tenant each one acts for.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Tenants and the instances each may see and clone.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Serve gRPC over TLS with this certificate and key.
    pub tls: Option<TlsConfig>,
    /// Most clones alive at once (all tenants).
    #[serde(default = "default_max_clones")]
    pub max_clones: usize,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:7300".parse().expect("a valid address")
}

fn default_max_clones() -> usize {
    8
}

/// TLS for the gRPC server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Kafka settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Longest wait for one broker answer, seconds.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_secs: u64,
    /// How the Kafka clients encrypt and authenticate (`[kafka.security]`);
    /// PLAINTEXT when absent.
    #[serde(default)]
    pub security: vmr_proto::config::KafkaSecurity,
}

fn default_fetch_timeout() -> u64 {
    10
}

/// The snapshot store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `file:///path` or `s3://bucket/prefix`.
    pub url: String,
    /// Restore snapshots taken on a host with another CPU model or TSC
    /// frequency.
    #[serde(default)]
    pub allow_host_mismatch: bool,
}

/// Paths of the backend binaries.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsConfig {
    pub blk: Option<PathBuf>,
    pub net: Option<PathBuf>,
}

/// How to boot a machine image's clones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The name manifests carry (`image`).
    pub name: String,
    /// Kernel (or freestanding guest) file.
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    /// Initial ramdisk (QEMU images such as demo-linux).
    pub initrd: Option<PathBuf>,
    /// Guest memory, MiB (must match the recorded instance).
    pub memory_mib: u32,
    /// vCPUs (must match the recorded instance).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Extra QEMU `-device` entries the image needs (`pvpanic`).
    #[serde(default)]
    pub qemu_devices: Vec<String>,
    /// NICs, by name, with the recorded MAC address.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// The guest's service port, reported in a live clone's access hint.
    pub service_port: Option<u16>,
    /// Disks whose base is an image file: a snapshot's layer chain for
    /// such a disk lies on this file (others lie on a zero file).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}

/// A disk of an image with a base image file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub name: String,
    /// The raw base image the disk's layer chain lies on.
    pub image: PathBuf,
}

fn default_vcpus() -> u8 {
    1
}

/// A NIC of an image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    pub name: String,
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// The guest's address on this NIC with its prefix (`192.168.77.2/24`),
    /// reported in a clone's access information.
    pub ip: Option<String>,
    /// The recorded peer's address (`192.168.77.1`): a live clone's
    /// namespace interface takes it, so the guest's routes still fit.
    pub peer: Option<String>,
}

/// A bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub tenant: String,
    /// When the token stops being accepted (RFC 3339,
    /// `2026-12-31T23:59:59Z`); without it, it does not expire.
    pub expires_at: Option<vmr_proto::config::Expiry>,
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

/// Parses `192.168.77.2/24` (a plain address gets /24 for IPv4, /64 for IPv6).
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().map_err(|e| format!("{s:?}: prefix: {e}"))?,
        None if ip.is_ipv4() => 24,
        None => 64,
    };
    if len > max {
        return Err(format!("{s:?}: prefix longer than {max}"));
    }
    Ok((ip, len))
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    crate::filter::parse_mac(s).map_err(|e| ConfigError::Invalid(format!("MAC address {s:?}: {e}")))
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            reason: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks references between sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrap_servers is empty".into());
        }
        if self.kafka.fetch_timeout_secs == 0 {
            return invalid("kafka.fetch_timeout_secs must be positive".into());
        }
        if self.max_clones == 0 {
            return invalid("max_clones must be positive".into());
        }
        for t in &self.tokens {
            if t.token.len() < 16 {
                return invalid(format!(
                    "the token of tenant {:?} is shorter than 16 characters",
                    t.tenant
                ));
            }
            if !self.tenants.iter().any(|n| n.name == t.tenant) {
                return invalid(format!(
                    "a token names tenant {:?}, which is not configured",
                    t.tenant
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if self.tokens[..i].iter().any(|o| o.token == t.token) {
                return invalid("two tokens are the same".into());
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if self.tenants[..i].iter().any(|o| o.name == t.name) {
                return invalid(format!("tenant {:?} is configured twice", t.name));
            }
            if t.instances.is_empty() && t.instance_prefix.as_deref().unwrap_or("").is_empty() {
                return invalid(format!(
                    "tenant {:?} has neither instances nor an instance_prefix",
                    t.name
                ));
            }
        }
        for img in &self.images {
            if img.memory_mib == 0 {
                return invalid(format!("image {:?}: memory_mib must be positive", img.name));
            }
            if img.vcpus == 0 {
                return invalid(format!("image {:?}: vcpus must be positive", img.name));
            }
            for n in &img.nics {
                parse_mac(&n.mac)?;
                if let Some(ip) = &n.ip {
                    parse_cidr(ip).map_err(|e| {
                        ConfigError::Invalid(format!(
                            "image {:?} nic {:?}: ip {e}",
                            img.name, n.name
                        ))
                    })?;
                }
                if let Some(p) = &n.peer {
                    p.parse::<std::net::IpAddr>().map_err(|e| {
                        ConfigError::Invalid(format!(
                            "image {:?} nic {:?}: peer {p:?}: {e}",
                            img.name, n.name
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The tenant a bearer token acts for.
    pub fn tenant_of(&self, token: &str) -> Option<&TenantConfig> {
        let t = self.token(token)?;
        self.tenants.iter().find(|n| n.name == t.tenant)
    }

    /// The configured bearer token equal to `token`.
    pub fn token(&self, token: &str) -> Option<&TokenConfig> {
        self.tokens
            .iter()
            .find(|t| constant_time_eq(t.token.as_bytes(), token.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
