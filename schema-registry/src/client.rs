//! A client of the registry's REST API (ours or any Confluent-compatible one).
//!
//! ```no_run
//! # async fn demo() -> Result<(), schema_registry::client::ClientError> {
//! use schema_registry::api::SchemaRequest;
//! use schema_registry::client::RegistryClient;
//!
//! let client = RegistryClient::new("http://127.0.0.1:8081")?;
//! let id = client
//!     .register("vmr.net.v1-value", &SchemaRequest::protobuf(vmr_proto::schemas::EVENT_PROTO))
//!     .await?;
//! let schema = client.schema_by_id(id).await?;
//! # let _ = schema; Ok(()) }
//! ```

use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    CompatibilityResponse, ConfigResponse, ConfigUpdate, ErrorBody, ModeBody, RegisterResponse,
    SchemaById, SchemaRequest, SubjectVersion, CONTENT_TYPE,
};

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an http(s) URL.
    #[error("registry URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    /// The request did not complete.
    #[error("request to the schema registry failed")]
    Http(#[from] reqwest::Error),
    /// The registry answered with an error body.
    #[error("schema registry returned HTTP {status} (error code {code}): {message}")]
    Api {
        status: u16,
        code: i32,
        message: String,
    },
}

impl ClientError {
    /// Confluent's error code, when the registry sent one.
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A schema registered for one topic by [`RegistryClient::register_vmr_schemas`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredTopic {
    /// The Kafka topic.
    pub topic: &'static str,
    /// Its value subject (`<topic>-value`).
    pub subject: String,
    /// The schema id to put in the wire format.
    pub id: i32,
    /// The value message's index path within the schema.
    pub message_indexes: Vec<i32>,
}

/// A REST client of a Confluent-compatible Schema Registry.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

impl RegistryClient {
    /// A client of the registry at `base_url` (for example
    /// `http://127.0.0.1:8081`), with a 30 s request timeout.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ClientError::BadUrl(base_url.to_string()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The registry's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(serde_json::to_vec(b).expect("request bodies always serialize"));
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => (e.error_code, e.message),
            Err(_) => (i32::from(status.as_u16()), text),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Registers `schema` under `subject`; returns its id.
    pub async fn register(
        &self,
        subject: &str,
        schema: &SchemaRequest,
    ) -> Result<i32, ClientError> {
        let path = format!("/subjects/{}/versions", encode(subject));
        let r: RegisterResponse = self.call(Method::POST, &path, Some(schema)).await?;
        Ok(r.id)
    }

    /// Finds `schema` among `subject`'s versions.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &SchemaRequest,
    ) -> Result<SubjectVersion, ClientError> {
        let path = format!("/subjects/{}", encode(subject));
        self.call(Method::POST, &path, Some(schema)).await
    }

    /// The schema with `id`.
    pub async fn schema_by_id(&self, id: i32) -> Result<SchemaById, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/schemas/ids/{id}"), None)
            .await
    }

    /// Subject names.
    pub async fn subjects(&self) -> Result<Vec<String>, ClientError> {
        self.call::<(), _>(Method::GET, "/subjects", None).await
    }

    /// Version numbers of `subject`.
    pub async fn versions(&self, subject: &str) -> Result<Vec<i32>, ClientError> {
        let path = format!("/subjects/{}/versions", encode(subject));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// One version (`"latest"` or a number) of `subject`.
    pub async fn version(
        &self,
        subject: &str,
        version: &str,
    ) -> Result<SubjectVersion, ClientError> {
        let path = format!("/subjects/{}/versions/{}", encode(subject), encode(version));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// Whether `schema` is compatible with `subject`'s version (`"latest"` or
    /// a number); the reasons when not.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        version: &str,
        schema: &SchemaRequest,
    ) -> Result<CompatibilityResponse, ClientError> {
        let path = format!(
            "/compatibility/subjects/{}/versions/{}?verbose=true",
            encode(subject),
            encode(version)
        );
        self.call(Method::POST, &path, Some(schema)).await
    }

    /// The compatibility level (global when `subject` is `None`).
    pub async fn config(&self, subject: Option<&str>) -> Result<String, ClientError> {
        let path = match subject {
            Some(s) => format!("/config/{}", encode(s)),
            None => "/config".to_string(),
        };
        let r: ConfigResponse = self.call::<(), _>(Method::GET, &path, None).await?;
        Ok(r.compatibility_level)
    }

    /// Sets the compatibility level (global when `subject` is `None`).
    pub async fn set_config(
        &self,
        subject: Option<&str>,
        level: &str,
    ) -> Result<String, ClientError> {
        let path = match subject {
            Some(s) => format!("/config/{}", encode(s)),
            None => "/config".to_string(),
        };
        let body = ConfigUpdate {
            compatibility: level.to_string(),
        };
        let r: ConfigUpdate = self.call(Method::PUT, &path, Some(&body)).await?;
        Ok(r.compatibility)
    }

    /// Deletes `subject` (soft, or `permanent` after a soft delete); returns
    /// the versions deleted.
    pub async fn delete_subject(
        &self,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<i32>, ClientError> {
        let path = format!("/subjects/{}?permanent={permanent}", encode(subject));
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    /// Deletes one version (`"latest"` or a number) of `subject`: soft, or
    /// `permanent` after a soft delete; returns the version deleted.
    pub async fn delete_version(
        &self,
        subject: &str,
        version: &str,
        permanent: bool,
    ) -> Result<i32, ClientError> {
        let path = format!(
            "/subjects/{}/versions/{}?permanent={permanent}",
            encode(subject),
            encode(version)
        );
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    /// Ids of the schemas that reference `subject`'s `version`.
    pub async fn referenced_by(
        &self,
        subject: &str,
        version: &str,
    ) -> Result<Vec<i32>, ClientError> {
        let path = format!(
            "/subjects/{}/versions/{}/referencedby",
            encode(subject),
            encode(version)
        );
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// The mode (global when `subject` is `None`).
    pub async fn mode(&self, subject: Option<&str>) -> Result<String, ClientError> {
        let path = match subject {
            Some(s) => format!("/mode/{}", encode(s)),
            None => "/mode".to_string(),
        };
        let r: ModeBody = self.call::<(), _>(Method::GET, &path, None).await?;
        Ok(r.mode)
    }

    /// Sets the mode (global when `subject` is `None`).
    pub async fn set_mode(
        &self,
        subject: Option<&str>,
        mode: &str,
        force: bool,
    ) -> Result<String, ClientError> {
        let path = match subject {
            Some(s) => format!("/mode/{}?force={force}", encode(s)),
            None => format!("/mode?force={force}"),
        };
        let body = ModeBody {
            mode: mode.to_string(),
        };
        let r: ModeBody = self.call(Method::PUT, &path, Some(&body)).await?;
        Ok(r.mode)
    }

    /// `GET path` (with its query), as JSON; for endpoints without a typed
    /// method.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call::<(), _>(Method::GET, path, None).await
    }

    /// Registers the value schema of every vmreplay topic under
    /// `<topic>-value` and returns the ids to frame records with.
    pub async fn register_vmr_schemas(&self) -> Result<Vec<RegisteredTopic>, ClientError> {
        let mut out = Vec::new();
        for (topic, source, index) in vmr_proto::schemas::topic_value_schemas() {
            let subject = vmr_proto::schemas::value_subject(topic);
            let id = self
                .register(&subject, &SchemaRequest::protobuf(source))
                .await?;
            out.push(RegisteredTopic {
                topic,
                subject,
                id,
                message_indexes: vec![index],
            });
        }
        Ok(out)
    }

    /// Waits until the registry answers `GET /subjects`, for up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.subjects().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_http_urls_and_encodes_segments() {
        assert!(matches!(
            RegistryClient::new("127.0.0.1:8081"),
            Err(ClientError::BadUrl(_))
        ));
        assert_eq!(encode("vmr.net.v1-value"), "vmr.net.v1-value");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
