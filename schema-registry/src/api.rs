//! JSON bodies of the REST API (Confluent's names), shared by the server and
//! the client.

use serde::{Deserialize, Serialize};

use crate::schema::SchemaReference;

/// The media type of requests and responses.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Body of `POST /subjects/{s}/versions`, `POST /subjects/{s}` and
/// `POST /compatibility/...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRequest {
    /// The schema: `.proto` text, or a base64 `FileDescriptorProto`.
    pub schema: String,
    /// `PROTOBUF` (absent means AVRO, which this registry rejects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_type: Option<String>,
    /// Other registered schemas this one imports (`null` reads as none).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_empty"
    )]
    pub references: Vec<SchemaReference>,
    /// The id to register under (IMPORT mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i32>,
    /// The version to register as (IMPORT mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    /// Confluent's schema metadata; not supported here, so a request that
    /// sets it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// Confluent's data-contract rules; not supported here, refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_set: Option<serde_json::Value>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl SchemaRequest {
    /// A protobuf schema without references.
    pub fn protobuf(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            schema_type: Some("PROTOBUF".into()),
            references: Vec::new(),
            id: None,
            version: None,
            metadata: None,
            rule_set: None,
        }
    }

    /// The same request with `references`.
    pub fn with_references(mut self, references: Vec<SchemaReference>) -> Self {
        self.references = references;
        self
    }
}

/// Response of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The schema's global id.
    pub id: i32,
}

/// Response of `GET /schemas/ids/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaById {
    /// The schema text (or base64 descriptor with `?format=serialized`).
    pub schema: String,
    /// Always `PROTOBUF` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_type: Option<String>,
    /// The schema's references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<SchemaReference>,
}

/// A subject version (responses of `GET /subjects/{s}/versions/{v}` and of
/// the lookup `POST /subjects/{s}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubjectVersion {
    /// The subject.
    pub subject: String,
    /// The version within the subject.
    pub version: i32,
    /// The schema's global id.
    pub id: i32,
    /// Always `PROTOBUF` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_type: Option<String>,
    /// The schema text.
    pub schema: String,
    /// The schema's references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<SchemaReference>,
}

/// Response of `GET /config` and `GET /config/{s}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigResponse {
    /// The compatibility level.
    pub compatibility_level: String,
}

/// Body and response of `PUT /config[/{s}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// The compatibility level.
    pub compatibility: String,
}

/// Body and response of `PUT /mode[/{s}]`, response of `GET /mode[/{s}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeBody {
    /// `READWRITE`, `READONLY` or `IMPORT`.
    pub mode: String,
}

/// One entry of `GET /schemas/ids/{id}/versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectVersionRef {
    /// The subject.
    pub subject: String,
    /// The version.
    pub version: i32,
}

/// Response of the compatibility endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatibilityResponse {
    /// Whether the schema may be registered.
    pub is_compatible: bool,
    /// Reasons, with `?verbose=true`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

/// Every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Confluent's error code (`40401`, `42201`, `409`, `50001`, ...).
    pub error_code: i32,
    /// What went wrong.
    pub message: String,
}
