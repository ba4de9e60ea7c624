//! Where the shared services are: the Kafka cluster, the Schema Registry and
//! the object store. Every vmreplay binary takes these from its configuration
//! file, flags or environment, so the same binaries run against the local stack
//! or against any Kafka cluster, Confluent/Karapace registry and S3 bucket.
//!
//! [`KafkaSecurity`] is the Kafka client security (TLS, SASL) that every
//! binary shares; [`KafkaSecurity::client_properties`] turns it into the
//! librdkafka properties its clients are created with.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

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
    /// How the Kafka clients encrypt and authenticate
    /// (`[endpoints.kafka-security]`); PLAINTEXT when absent.
    #[serde(default)]
    pub kafka_security: KafkaSecurity,
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
            kafka_security: KafkaSecurity::default(),
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

/// Environment variable holding the SASL user name; it wins over
/// `sasl-username`.
pub const ENV_SASL_USERNAME: &str = "VMR_KAFKA_SASL_USERNAME";
/// Environment variable holding the SASL password; it wins over
/// `sasl-password-file`.
pub const ENV_SASL_PASSWORD: &str = "VMR_KAFKA_SASL_PASSWORD";

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SecurityProtocol {
    /// No encryption, no authentication.
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    /// TLS; a client certificate if `ssl-cert-file` and `ssl-key-file` are set.
    #[serde(rename = "SSL")]
    Ssl,
    /// SASL authentication without encryption.
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL authentication over TLS.
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The name in configuration files (`SASL_SSL`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// The librdkafka value (`sasl_ssl`).
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the protocol authenticates with SASL.
    pub fn is_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// Whether the protocol encrypts with TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SecurityProtocol {
    type Err = KafkaSecurityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Plaintext,
            Self::Ssl,
            Self::SaslPlaintext,
            Self::SaslSsl,
        ]
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| KafkaSecurityError::UnknownProtocol(s.to_string()))
    }
}

/// librdkafka's `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// User name and password sent as they are (use it with SASL_SSL).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name in configuration files, which librdkafka also takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SaslMechanism {
    type Err = KafkaSecurityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Plain, Self::ScramSha256, Self::ScramSha512]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| KafkaSecurityError::UnknownMechanism(s.to_string()))
    }
}

/// A password: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The password itself, for the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The Kafka security table as written in a configuration file (keys in
/// kebab-case; the snake_case spellings are accepted too). The password is
/// never in the file itself: it comes from `sasl-password-file` or the
/// `VMR_KAFKA_SASL_PASSWORD` environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaSecuritySettings {
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required with SASL_*.
    #[serde(default, alias = "sasl_mechanism")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (env `VMR_KAFKA_SASL_USERNAME` wins over it).
    #[serde(default, alias = "sasl_username")]
    pub sasl_username: Option<String>,
    /// File whose content (one trailing newline removed) is the SASL
    /// password (env `VMR_KAFKA_SASL_PASSWORD` wins over it).
    #[serde(default, alias = "sasl_password_file")]
    pub sasl_password_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the brokers' certificates;
    /// without it, OpenSSL's default CA store is used. SSL and SASL_SSL only.
    #[serde(default, alias = "ssl_ca_file")]
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); needs `ssl-key-file`.
    #[serde(default, alias = "ssl_cert_file")]
    pub ssl_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate; needs `ssl-cert-file`.
    #[serde(default, alias = "ssl_key_file")]
    pub ssl_key_file: Option<PathBuf>,
}

/// Errors in the Kafka security settings. No message ever contains the
/// password.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KafkaSecurityError {
    #[error("unknown Kafka security protocol {0:?} (PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL)")]
    UnknownProtocol(String),
    #[error("unknown SASL mechanism {0:?} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")]
    UnknownMechanism(String),
    #[error("Kafka security protocol {protocol} needs {what}")]
    Missing {
        protocol: SecurityProtocol,
        what: &'static str,
    },
    #[error("{what} is set but Kafka security protocol {protocol} does not use it (use {needs})")]
    Unused {
        protocol: SecurityProtocol,
        what: &'static str,
        needs: &'static str,
    },
    #[error("{what} {path} cannot be read: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("ssl-cert-file and ssl-key-file go together (a client certificate needs its key)")]
    CertWithoutKey,
}

/// Kafka client security, checked and with its secrets loaded: the files it
/// names exist and are readable, and SASL has a mechanism, a user name and
/// a password. Deserializing one (from a [`KafkaSecuritySettings`] table)
/// reads `VMR_KAFKA_SASL_USERNAME`, `VMR_KAFKA_SASL_PASSWORD` and the
/// password file, so a configuration that loads is one a client can use.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "KafkaSecuritySettings")]
pub struct KafkaSecurity {
    settings: KafkaSecuritySettings,
    username: Option<String>,
    password: Option<Secret>,
}

impl TryFrom<KafkaSecuritySettings> for KafkaSecurity {
    type Error = KafkaSecurityError;
    fn try_from(settings: KafkaSecuritySettings) -> Result<Self, Self::Error> {
        Self::resolve(settings, |k| std::env::var(k).ok())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), KafkaSecurityError> {
    let bad = |reason: String| KafkaSecurityError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

impl KafkaSecurity {
    /// Checks `settings` and loads the SASL user name and password: `env`
    /// (`VMR_KAFKA_SASL_USERNAME`, `VMR_KAFKA_SASL_PASSWORD`) wins over the
    /// settings' user name and password file.
    pub fn resolve(
        settings: KafkaSecuritySettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, KafkaSecurityError> {
        let protocol = settings.protocol;
        let (mut username, mut password) = (None, None);
        if protocol.is_sasl() {
            let missing = |what| KafkaSecurityError::Missing { protocol, what };
            if settings.sasl_mechanism.is_none() {
                return Err(missing(
                    "sasl-mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                ));
            }
            username = env(ENV_SASL_USERNAME)
                .or_else(|| settings.sasl_username.clone())
                .filter(|u| !u.is_empty());
            if username.is_none() {
                return Err(missing(
                    "a user name (sasl-username or VMR_KAFKA_SASL_USERNAME)",
                ));
            }
            password = match (env(ENV_SASL_PASSWORD), &settings.sasl_password_file) {
                (Some(p), _) => Some(p),
                (None, Some(path)) => {
                    check_file("sasl-password-file", path)?;
                    let text =
                        std::fs::read_to_string(path).map_err(|e| KafkaSecurityError::File {
                            what: "sasl-password-file",
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    Some(text.strip_suffix('\r').unwrap_or(text).to_string())
                }
                (None, None) => None,
            }
            .filter(|p| !p.is_empty())
            .map(Secret);
            if password.is_none() {
                return Err(missing(
                    "a password (sasl-password-file or VMR_KAFKA_SASL_PASSWORD)",
                ));
            }
        } else {
            let unused = [
                ("sasl-mechanism", settings.sasl_mechanism.is_some()),
                ("sasl-username", settings.sasl_username.is_some()),
                ("sasl-password-file", settings.sasl_password_file.is_some()),
            ];
            if let Some((what, _)) = unused.iter().find(|(_, set)| *set) {
                return Err(KafkaSecurityError::Unused {
                    protocol,
                    what,
                    needs: "SASL_PLAINTEXT or SASL_SSL",
                });
            }
        }
        let files = [
            ("ssl-ca-file", &settings.ssl_ca_file),
            ("ssl-cert-file", &settings.ssl_cert_file),
            ("ssl-key-file", &settings.ssl_key_file),
        ];
        if protocol.is_tls() {
            if settings.ssl_cert_file.is_some() != settings.ssl_key_file.is_some() {
                return Err(KafkaSecurityError::CertWithoutKey);
            }
            for (what, path) in files {
                if let Some(path) = path {
                    check_file(what, path)?;
                }
            }
        } else if let Some((what, _)) = files.iter().find(|(_, p)| p.is_some()) {
            return Err(KafkaSecurityError::Unused {
                protocol,
                what,
                needs: "SSL or SASL_SSL",
            });
        }
        Ok(Self {
            settings,
            username,
            password,
        })
    }

    /// The settings this was made from (to change some and
    /// [`KafkaSecurity::resolve`] again).
    pub fn settings(&self) -> &KafkaSecuritySettings {
        &self.settings
    }

    /// The security protocol.
    pub fn protocol(&self) -> SecurityProtocol {
        self.settings.protocol
    }

    /// The SASL user name in use (SASL protocols only).
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The librdkafka properties to set on every client (producer, consumer,
    /// admin) after `bootstrap.servers`: `security.protocol`, and the
    /// `sasl.*` and `ssl.*` properties the protocol uses. `sasl.password`
    /// holds the password itself: pass the list to the client and never log
    /// it.
    pub fn client_properties(&self) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let mut out = vec![("security.protocol", s.protocol.as_librdkafka().to_string())];
        if s.protocol.is_sasl() {
            if let Some(m) = s.sasl_mechanism {
                out.push(("sasl.mechanism", m.name().to_string()));
            }
            if let Some(u) = &self.username {
                out.push(("sasl.username", u.clone()));
            }
            if let Some(p) = &self.password {
                out.push(("sasl.password", p.expose().to_string()));
            }
        }
        if s.protocol.is_tls() {
            let files = [
                ("ssl.ca.location", &s.ssl_ca_file),
                ("ssl.certificate.location", &s.ssl_cert_file),
                ("ssl.key.location", &s.ssl_key_file),
            ];
            for (key, path) in files {
                if let Some(p) = path {
                    out.push((key, p.display().to_string()));
                }
            }
        }
        out
    }
}

/// When a bearer token stops being accepted: an RFC 3339 date and time
/// (`2026-12-31T23:59:59Z`, `2026-12-31T23:59:59.5+02:00`). The replayer
/// and the console read a token's optional `expires_at` as one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    at: std::time::SystemTime,
    text: String,
}

/// Why a token expiry is not an RFC 3339 date and time.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an RFC 3339 date and time (like 2026-12-31T23:59:59Z)")]
pub struct ExpiryError(String);

impl Expiry {
    /// The instant itself.
    pub fn at(&self) -> std::time::SystemTime {
        self.at
    }

    /// Whether `now` is at or after the expiry.
    pub fn has_passed(&self, now: std::time::SystemTime) -> bool {
        now >= self.at
    }
}

impl fmt::Display for Expiry {
    /// As written in the configuration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Expiry {
    type Err = ExpiryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let at = parse_rfc3339(s).ok_or_else(|| ExpiryError(s.to_string()))?;
        Ok(Expiry {
            at,
            text: s.to_string(),
        })
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`, `t` or a space
/// accepted for the `T` and `z` for the `Z`.
fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        for (k, d) in b[start..i.min(start + 9)].iter().enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - k as u32);
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from 1970-01-01 to the date (proleptic Gregorian calendar).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    let base = std::time::UNIX_EPOCH;
    let t = if secs >= 0 {
        base.checked_add(std::time::Duration::from_secs(secs as u64))?
    } else {
        base.checked_sub(std::time::Duration::from_secs(secs.unsigned_abs()))?
    };
    t.checked_add(std::time::Duration::from_nanos(u64::from(nanos)))
}

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn secs(s: &str) -> u64 {
        s.parse::<Expiry>()
            .unwrap_or_else(|e| panic!("{e}"))
            .at()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    #[test]
    fn rfc3339_instants_parse() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0);
        // `date -u -d 2026-12-01T15:30:00Z +%s`
        assert_eq!(secs("2026-12-01T15:30:00Z"), 1_796_139_000);
        assert_eq!(secs("2026-12-01T17:30:00+02:00"), 1_796_139_000);
        assert_eq!(secs("2026-12-01t13:00:00.999-02:30"), 1_796_139_000);
        assert_eq!(secs("2024-02-29T00:00:00Z"), 1_709_164_800);
        let e: Expiry = "2000-01-01T00:00:00.25Z".parse().expect("valid");
        assert_eq!(
            e.at().duration_since(UNIX_EPOCH).expect("after 1970"),
            Duration::new(946_684_800, 250_000_000)
        );
        assert_eq!(e.to_string(), "2000-01-01T00:00:00.25Z");
        assert!(e.has_passed(e.at()));
        assert!(!e.has_passed(e.at() - Duration::from_nanos(1)));
    }

    #[test]
    fn malformed_instants_are_refused() {
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01T15:30:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T15:30:00.Z",
            "2026-12-01T15:30:00+0200",
            "2026-12-01T15:30:00Z trailing",
            "tomorrow",
        ] {
            let err = bad.parse::<Expiry>().expect_err(bad);
            assert!(err.to_string().contains("RFC 3339"), "{err}");
        }
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

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("vmr-proto-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("the temp dir is writable");
            Self(d)
        }
        fn file(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("the temp dir is writable");
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn plaintext_is_the_default_and_sets_only_the_protocol() {
        let s = KafkaSecurity::default();
        assert_eq!(s.protocol(), SecurityProtocol::Plaintext);
        assert_eq!(
            s.client_properties(),
            vec![("security.protocol", "plaintext".to_string())]
        );
        assert_eq!(Endpoints::default().kafka_security, s);
    }

    #[test]
    fn sasl_ssl_gives_librdkafka_every_property() {
        let d = TempDir::new("sasl-ssl");
        let settings = KafkaSecuritySettings {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("vmr".into()),
            sasl_password_file: Some(d.file("password", "s3cret-pw\n")),
            ssl_ca_file: Some(d.file("ca.crt", "pem")),
            ssl_cert_file: Some(d.file("tls.crt", "pem")),
            ssl_key_file: Some(d.file("tls.key", "pem")),
        };
        let s = KafkaSecurity::resolve(settings, no_env).unwrap();
        let path = |n: &str| d.0.join(n).display().to_string();
        assert_eq!(
            s.client_properties(),
            vec![
                ("security.protocol", "sasl_ssl".to_string()),
                ("sasl.mechanism", "SCRAM-SHA-512".to_string()),
                ("sasl.username", "vmr".to_string()),
                ("sasl.password", "s3cret-pw".to_string()),
                ("ssl.ca.location", path("ca.crt")),
                ("ssl.certificate.location", path("tls.crt")),
                ("ssl.key.location", path("tls.key")),
            ]
        );
        // The password never shows in Debug output.
        let debug = format!("{s:?} {:?}", s.settings());
        assert!(!debug.contains("s3cret-pw"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn the_environment_wins_over_the_file_settings() {
        let d = TempDir::new("env");
        let settings = KafkaSecuritySettings {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: Some("from-file".into()),
            sasl_password_file: Some(d.file("password", "file-pw")),
            ..Default::default()
        };
        let env = |k: &str| match k {
            ENV_SASL_USERNAME => Some("from-env".to_string()),
            ENV_SASL_PASSWORD => Some("env-pw".to_string()),
            _ => None,
        };
        let s = KafkaSecurity::resolve(settings.clone(), env).unwrap();
        let props = s.client_properties();
        assert!(props.contains(&("sasl.username", "from-env".into())));
        assert!(props.contains(&("sasl.password", "env-pw".into())));
        assert!(props.contains(&("security.protocol", "sasl_plaintext".into())));
        assert!(props.contains(&("sasl.mechanism", "PLAIN".into())));
        assert!(!props.iter().any(|(k, _)| k.starts_with("ssl.")));
        // A password from the environment needs no file at all.
        let only_env = KafkaSecuritySettings {
            sasl_password_file: None,
            ..settings
        };
        let s = KafkaSecurity::resolve(only_env, env).unwrap();
        assert_eq!(s.username(), Some("from-env"));
    }

    #[test]
    fn a_missing_ca_file_is_refused_by_name() {
        let settings = KafkaSecuritySettings {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha256),
            sasl_username: Some("vmr".into()),
            ssl_ca_file: Some("/nonexistent/kafka/ca.crt".into()),
            ..Default::default()
        };
        let env = |k: &str| (k == ENV_SASL_PASSWORD).then(|| "pw-0123".to_string());
        let e = KafkaSecurity::resolve(settings, env).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("ssl-ca-file /nonexistent/kafka/ca.crt cannot be read: "),
            "{msg}"
        );
        assert!(!msg.contains("pw-0123"));
        let d = TempDir::new("dir");
        let e = check_file("ssl-ca-file", &d.0).unwrap_err();
        assert!(e.to_string().ends_with("not a regular file"), "{e}");
    }

    #[test]
    fn sasl_needs_a_mechanism_a_user_and_a_password() {
        let base = KafkaSecuritySettings {
            protocol: SecurityProtocol::SaslSsl,
            ..Default::default()
        };
        let e = KafkaSecurity::resolve(base.clone(), no_env).unwrap_err();
        assert!(e.to_string().contains("needs sasl-mechanism"), "{e}");
        let with_mech = KafkaSecuritySettings {
            sasl_mechanism: Some(SaslMechanism::Plain),
            ..base
        };
        let e = KafkaSecurity::resolve(with_mech.clone(), no_env).unwrap_err();
        assert!(e.to_string().contains("needs a user name"), "{e}");
        let with_user = KafkaSecuritySettings {
            sasl_username: Some("vmr".into()),
            ..with_mech
        };
        let e = KafkaSecurity::resolve(with_user.clone(), no_env).unwrap_err();
        assert!(e.to_string().contains("needs a password"), "{e}");
        // An empty password file is no password.
        let d = TempDir::new("empty");
        let empty = KafkaSecuritySettings {
            sasl_password_file: Some(d.file("password", "\n")),
            ..with_user
        };
        let e = KafkaSecurity::resolve(empty, no_env).unwrap_err();
        assert!(e.to_string().contains("needs a password"), "{e}");
    }

    #[test]
    fn settings_the_protocol_does_not_use_are_refused() {
        let sasl_on_plaintext = KafkaSecuritySettings {
            sasl_username: Some("vmr".into()),
            ..Default::default()
        };
        let e = KafkaSecurity::resolve(sasl_on_plaintext, no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sasl-username is set but Kafka security protocol PLAINTEXT does not use it \
             (use SASL_PLAINTEXT or SASL_SSL)"
        );
        let ca_without_tls = KafkaSecuritySettings {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: Some("vmr".into()),
            ssl_ca_file: Some("/etc/ca.crt".into()),
            ..Default::default()
        };
        let env = |k: &str| (k == ENV_SASL_PASSWORD).then(|| "pw".to_string());
        let e = KafkaSecurity::resolve(ca_without_tls, env).unwrap_err();
        assert!(e.to_string().starts_with("ssl-ca-file is set"), "{e}");
        let d = TempDir::new("cert");
        let cert_only = KafkaSecuritySettings {
            protocol: SecurityProtocol::Ssl,
            ssl_cert_file: Some(d.file("tls.crt", "pem")),
            ..Default::default()
        };
        assert_eq!(
            KafkaSecurity::resolve(cert_only, no_env),
            Err(KafkaSecurityError::CertWithoutKey)
        );
    }

    #[test]
    fn the_security_table_parses_in_kebab_and_snake_case() {
        let d = TempDir::new("toml");
        let ca = d.file("ca.crt", "pem");
        let pw = d.file("pw", "secret-from-file");
        let text = format!(
            "[endpoints]\nbootstrap-servers = \"k:9093\"\n\
             [endpoints.kafka-security]\nprotocol = \"SASL_SSL\"\n\
             sasl-mechanism = \"SCRAM-SHA-256\"\nsasl-username = \"vmr\"\n\
             sasl-password-file = {pw:?}\nssl-ca-file = {ca:?}\n"
        );
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            endpoints: Endpoints,
        }
        let f: File = toml::from_str(&text).unwrap();
        let props = f.endpoints.kafka_security.client_properties();
        assert!(props.contains(&("sasl.mechanism", "SCRAM-SHA-256".into())));
        assert!(props.contains(&("ssl.ca.location", ca.display().to_string())));
        assert!(!format!("{f:?}").contains("secret-from-file"));

        let snake = format!("protocol = \"SSL\"\nssl_ca_file = {ca:?}\n");
        let s: KafkaSecurity = toml::from_str(&snake).unwrap();
        assert_eq!(s.protocol(), SecurityProtocol::Ssl);

        for bad in [
            "protocol = \"TLS\"",
            "protocol = \"SASL_SSL\"\nsasl-mechanism = \"GSSAPI\"",
            "protocl = \"SSL\"",
            "protocol = \"SSL\"\nssl-ca-file = \"/nonexistent/ca.crt\"",
        ] {
            assert!(toml::from_str::<KafkaSecurity>(bad).is_err(), "{bad}");
        }
        let e = toml::from_str::<KafkaSecurity>(
            "protocol = \"SSL\"\nssl-ca-file = \"/nonexistent/ca.crt\"",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("ssl-ca-file /nonexistent/ca.crt cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn names_parse_case_insensitively() {
        assert_eq!("sasl_ssl".parse(), Ok(SecurityProtocol::SaslSsl));
        assert_eq!("SSL".parse(), Ok(SecurityProtocol::Ssl));
        assert_eq!("scram-sha-512".parse(), Ok(SaslMechanism::ScramSha512));
        assert!(matches!(
            "tls".parse::<SecurityProtocol>(),
            Err(KafkaSecurityError::UnknownProtocol(_))
        ));
        assert!("GSSAPI".parse::<SaslMechanism>().is_err());
    }
}
