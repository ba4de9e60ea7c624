//! The registry's state and the `_schemas` record formats.
//!
//! The state is a pure function of the `_schemas` log: every instance applies
//! the same records in the same order and so reaches the same state, including
//! the same verdict on conflicting records (two instances that picked the same
//! id or version: the record that comes first in the log wins, the later one
//! is rejected and its writer retries).
//!
//! Record formats (JSON, as Confluent's registry writes them):
//!
//! | key | value |
//! | --- | --- |
//! | `{"keytype":"SCHEMA","subject":S,"version":V,"magic":1}` | `{"subject":S,"version":V,"id":I,"schemaType":"PROTOBUF","references":[..],"schema":TEXT,"deleted":B}`; null = version permanently deleted |
//! | `{"keytype":"CONFIG","subject":S?,"magic":0}` | `{"compatibilityLevel":L}`; null = config removed |
//! | `{"keytype":"DELETE_SUBJECT","subject":S,"magic":0}` | `{"subject":S,"version":LATEST}` |
//! | `{"keytype":"MODE","subject":S?,"magic":0}` | `{"mode":M}`; null = mode removed |
//! | `{"keytype":"NOOP","magic":0}` | ignored |

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::compat::CompatibilityLevel;
use crate::schema::{SchemaReference, SchemaType};

/// Errors building or reading records.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A record's key or value is not valid JSON of the expected shape.
    #[error("malformed {what} record: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Key of a `_schemas` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RecordKey {
    /// One version of a subject.
    Schema {
        subject: String,
        version: i32,
        magic: i32,
    },
    /// A compatibility level (global when `subject` is absent).
    Config {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        magic: i32,
    },
    /// A subject's soft deletion.
    DeleteSubject { subject: String, magic: i32 },
    /// A mode (global when `subject` is absent).
    Mode {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        magic: i32,
    },
    /// A marker with no effect.
    Noop { magic: i32 },
}

impl RecordKey {
    /// Key of a subject version.
    pub fn schema(subject: &str, version: i32) -> Self {
        Self::Schema {
            subject: subject.to_string(),
            version,
            magic: 1,
        }
    }

    /// Key of a compatibility config.
    pub fn config(subject: Option<&str>) -> Self {
        Self::Config {
            subject: subject.map(str::to_string),
            magic: 0,
        }
    }

    /// Key of a mode.
    pub fn mode(subject: Option<&str>) -> Self {
        Self::Mode {
            subject: subject.map(str::to_string),
            magic: 0,
        }
    }

    /// The key's JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("record keys always serialize")
    }
}

/// Value of a `SCHEMA` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaValue {
    pub subject: String,
    pub version: i32,
    pub id: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<SchemaReference>,
    pub schema: String,
    #[serde(default)]
    pub deleted: bool,
}

/// Value of a `CONFIG` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigValue {
    pub compatibility_level: CompatibilityLevel,
}

/// What a subject (or the registry) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Reads and writes (the default).
    Readwrite,
    /// Reads only; writes are refused.
    Readonly,
    /// Registrations carry their own ids (and optionally versions), without
    /// compatibility checks; for copying schemas from another registry.
    Import,
}

impl Mode {
    /// Parses a mode name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_uppercase())).ok()
    }

    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Readwrite => "READWRITE",
            Self::Readonly => "READONLY",
            Self::Import => "IMPORT",
        }
    }
}

/// Value of a `MODE` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeValue {
    pub mode: Mode,
}

/// Value of a `DELETE_SUBJECT` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteSubjectValue {
    pub subject: String,
    pub version: i32,
}

/// What makes two registrations "the same schema" (and so the same id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaContent {
    pub schema_type: SchemaType,
    /// The schema text, trimmed.
    pub schema: String,
    pub references: Vec<SchemaReference>,
}

/// One version of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    pub id: i32,
    pub deleted: bool,
}

/// Outcome of applying one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The record changed (or confirmed) the state.
    Accepted,
    /// The record conflicts with an earlier one and was ignored.
    Rejected(String),
    /// The record is not one the registry acts on (NOOP, unknown key type,
    /// malformed JSON).
    Ignored,
}

/// The registry's state, rebuilt from the log.
#[derive(Debug, Default, Clone)]
pub struct State {
    schemas: BTreeMap<i32, SchemaContent>,
    by_content: HashMap<SchemaContent, i32>,
    subjects: BTreeMap<String, BTreeMap<i32, VersionEntry>>,
    global_level: Option<CompatibilityLevel>,
    subject_levels: BTreeMap<String, CompatibilityLevel>,
    global_mode: Option<Mode>,
    subject_modes: BTreeMap<String, Mode>,
    /// Every `(subject, version) -> id` ever accepted, kept after tombstones
    /// so that schemas referencing a permanently deleted version still
    /// compile, on every instance alike.
    history: HashMap<(String, i32), i32>,
    max_id: i32,
}

impl State {
    /// Applies one record (key and value as read from the log).
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> Applied {
        let Some(key) = key else {
            return Applied::Ignored;
        };
        let Ok(key) = serde_json::from_slice::<RecordKey>(key) else {
            return Applied::Ignored;
        };
        match key {
            RecordKey::Schema {
                subject, version, ..
            } => match value {
                None => {
                    if let Some(versions) = self.subjects.get_mut(&subject) {
                        versions.remove(&version);
                        if versions.is_empty() {
                            self.subjects.remove(&subject);
                        }
                    }
                    Applied::Accepted
                }
                Some(v) => match serde_json::from_slice::<SchemaValue>(v) {
                    Ok(v) => self.apply_schema(&subject, version, v),
                    Err(_) => Applied::Ignored,
                },
            },
            RecordKey::Config { subject, .. } => {
                let level = match value {
                    None => None,
                    Some(v) => match serde_json::from_slice::<ConfigValue>(v) {
                        Ok(c) => Some(c.compatibility_level),
                        Err(_) => return Applied::Ignored,
                    },
                };
                match (subject, level) {
                    (None, l) => self.global_level = l,
                    (Some(s), Some(l)) => {
                        self.subject_levels.insert(s, l);
                    }
                    (Some(s), None) => {
                        self.subject_levels.remove(&s);
                    }
                }
                Applied::Accepted
            }
            RecordKey::DeleteSubject { subject, .. } => {
                // The per-version SCHEMA records carry the deletion; this one
                // also covers writers that only emit DELETE_SUBJECT.
                let upto = value
                    .and_then(|v| serde_json::from_slice::<DeleteSubjectValue>(v).ok())
                    .map_or(i32::MAX, |d| d.version);
                if let Some(versions) = self.subjects.get_mut(&subject) {
                    for (_, e) in versions.range_mut(..=upto) {
                        e.deleted = true;
                    }
                }
                Applied::Accepted
            }
            RecordKey::Mode { subject, .. } => {
                let mode = match value {
                    None => None,
                    Some(v) => match serde_json::from_slice::<ModeValue>(v) {
                        Ok(m) => Some(m.mode),
                        Err(_) => return Applied::Ignored,
                    },
                };
                match (subject, mode) {
                    (None, m) => self.global_mode = m,
                    (Some(s), Some(m)) => {
                        self.subject_modes.insert(s, m);
                    }
                    (Some(s), None) => {
                        self.subject_modes.remove(&s);
                    }
                }
                Applied::Accepted
            }
            RecordKey::Noop { .. } => Applied::Ignored,
        }
    }

    fn apply_schema(&mut self, subject: &str, version: i32, v: SchemaValue) -> Applied {
        if v.subject != subject || v.version != version {
            return Applied::Rejected("key and value disagree".into());
        }
        if v.id <= 0 || version <= 0 {
            return Applied::Rejected("ids and versions start at 1".into());
        }
        let schema_type = match v.schema_type.as_deref() {
            Some("PROTOBUF") => SchemaType::Protobuf,
            Some("JSON") => SchemaType::Json,
            _ => SchemaType::Avro,
        };
        let content = SchemaContent {
            schema_type,
            schema: v.schema.trim().to_string(),
            references: v.references,
        };
        if let Some(existing) = self.schemas.get(&v.id) {
            if *existing != content {
                return Applied::Rejected(format!("id {} is taken by another schema", v.id));
            }
        } else if let Some(&other) = self.by_content.get(&content) {
            return Applied::Rejected(format!("this schema already has id {other}"));
        }
        let versions = self.subjects.entry(subject.to_string()).or_default();
        if let Some(e) = versions.get_mut(&version) {
            if e.id != v.id {
                return Applied::Rejected(format!(
                    "version {version} of {subject} is taken by id {}",
                    e.id
                ));
            }
            e.deleted = v.deleted;
            return Applied::Accepted;
        }
        versions.insert(
            version,
            VersionEntry {
                id: v.id,
                deleted: v.deleted,
            },
        );
        self.history.insert((subject.to_string(), version), v.id);
        self.schemas.insert(v.id, content.clone());
        self.by_content.insert(content, v.id);
        self.max_id = self.max_id.max(v.id);
        Applied::Accepted
    }

    /// The schema registered under `id`.
    pub fn schema(&self, id: i32) -> Option<&SchemaContent> {
        self.schemas.get(&id)
    }

    /// The id `subject` `version` has, or had before a permanent delete.
    pub fn version_id(&self, subject: &str, version: i32) -> Option<i32> {
        self.subjects
            .get(subject)
            .and_then(|v| v.get(&version))
            .map(|e| e.id)
            .or_else(|| self.history.get(&(subject.to_string(), version)).copied())
    }

    /// Every id with a schema, ascending.
    pub fn schema_ids(&self) -> impl Iterator<Item = i32> + '_ {
        self.schemas.keys().copied()
    }

    /// The id of an identical schema, if any.
    pub fn id_of(&self, content: &SchemaContent) -> Option<i32> {
        self.by_content.get(content).copied()
    }

    /// Highest id in use (0 when none).
    pub fn max_id(&self) -> i32 {
        self.max_id
    }

    /// Subjects with at least one live version (or any version when
    /// `deleted`), sorted.
    pub fn subjects(&self, deleted: bool) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, v)| deleted || v.values().any(|e| !e.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Subjects with versions, all of them soft-deleted, sorted.
    pub fn deleted_subjects(&self) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, v)| !v.is_empty() && v.values().all(|e| e.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Versions of `subject` (live ones unless `deleted`), ascending.
    pub fn versions(&self, subject: &str, deleted: bool) -> Vec<(i32, VersionEntry)> {
        self.subjects
            .get(subject)
            .map(|v| {
                v.iter()
                    .filter(|(_, e)| deleted || !e.deleted)
                    .map(|(&n, &e)| (n, e))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Highest version number `subject` ever had (0 when none).
    pub fn max_version(&self, subject: &str) -> i32 {
        self.subjects
            .get(subject)
            .and_then(|v| v.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// `(subject, version)` pairs using `id` (live ones unless `deleted`).
    pub fn usages(&self, id: i32, deleted: bool) -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for (s, versions) in &self.subjects {
            for (&n, e) in versions {
                if e.id == id && (deleted || !e.deleted) {
                    out.push((s.clone(), n));
                }
            }
        }
        out
    }

    /// Ids of live versions whose schema references `subject` `version`,
    /// ascending and without repeats.
    pub fn referencing(&self, subject: &str, version: i32) -> Vec<i32> {
        let mut ids: Vec<i32> = self
            .subjects
            .values()
            .flat_map(|v| v.values())
            .filter(|e| !e.deleted)
            .map(|e| e.id)
            .filter(|id| {
                self.schemas.get(id).is_some_and(|c| {
                    c.references
                        .iter()
                        .any(|r| r.subject == subject && r.version == version)
                })
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The mode set for `subject`, if any.
    pub fn subject_mode(&self, subject: &str) -> Option<Mode> {
        self.subject_modes.get(subject).copied()
    }

    /// The global mode (READWRITE when never set).
    pub fn global_mode(&self) -> Mode {
        self.global_mode.unwrap_or(Mode::Readwrite)
    }

    /// The mode in force for `subject`.
    pub fn effective_mode(&self, subject: &str) -> Mode {
        self.subject_mode(subject)
            .unwrap_or_else(|| self.global_mode())
    }

    /// The level set for `subject`, if any.
    pub fn subject_level(&self, subject: &str) -> Option<CompatibilityLevel> {
        self.subject_levels.get(subject).copied()
    }

    /// The global level (the default when never set).
    pub fn global_level(&self) -> CompatibilityLevel {
        self.global_level.unwrap_or(CompatibilityLevel::DEFAULT)
    }

    /// The level in force for `subject`.
    pub fn effective_level(&self, subject: &str) -> CompatibilityLevel {
        self.subject_level(subject)
            .unwrap_or_else(|| self.global_level())
    }
}

/// Encodes a SCHEMA record.
pub fn schema_record(v: &SchemaValue) -> (Vec<u8>, Vec<u8>) {
    (
        RecordKey::schema(&v.subject, v.version).to_bytes(),
        serde_json::to_vec(v).expect("schema values always serialize"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(subject: &str, version: i32, id: i32, schema: &str) -> SchemaValue {
        SchemaValue {
            subject: subject.into(),
            version,
            id,
            schema_type: Some("PROTOBUF".into()),
            references: vec![],
            schema: schema.into(),
            deleted: false,
        }
    }

    fn apply(state: &mut State, v: &SchemaValue) -> Applied {
        let (k, val) = schema_record(v);
        state.apply(Some(&k), Some(&val))
    }

    #[test]
    fn key_and_value_json_match_confluent() {
        let (k, v) = schema_record(&value("t-value", 1, 3, "syntax = \"proto3\";"));
        assert_eq!(
            String::from_utf8(k).unwrap(),
            r#"{"keytype":"SCHEMA","subject":"t-value","version":1,"magic":1}"#
        );
        assert_eq!(
            String::from_utf8(v).unwrap(),
            r#"{"subject":"t-value","version":1,"id":3,"schemaType":"PROTOBUF","schema":"syntax = \"proto3\";","deleted":false}"#
        );
        assert_eq!(
            String::from_utf8(RecordKey::config(None).to_bytes()).unwrap(),
            r#"{"keytype":"CONFIG","magic":0}"#
        );
        let c = ConfigValue {
            compatibility_level: CompatibilityLevel::FullTransitive,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"compatibilityLevel":"FULL_TRANSITIVE"}"#
        );
    }

    #[test]
    fn first_record_wins_conflicts() {
        let mut s = State::default();
        assert_eq!(apply(&mut s, &value("a", 1, 1, "A")), Applied::Accepted);
        // Another instance picked id 1 for a different schema.
        assert!(matches!(
            apply(&mut s, &value("b", 1, 1, "B")),
            Applied::Rejected(_)
        ));
        // Or version 1 of "a" for another id.
        assert!(matches!(
            apply(&mut s, &value("a", 1, 2, "B")),
            Applied::Rejected(_)
        ));
        // Or a fresh id for content that already has one.
        assert!(matches!(
            apply(&mut s, &value("c", 1, 9, "A")),
            Applied::Rejected(_)
        ));
        // The same content under another subject shares the id.
        assert_eq!(apply(&mut s, &value("c", 1, 1, "A")), Applied::Accepted);
        assert_eq!(apply(&mut s, &value("b", 1, 2, "B")), Applied::Accepted);
        assert_eq!(s.max_id(), 2);
        assert_eq!(s.subjects(false), ["a", "b", "c"]);
        assert_eq!(
            s.usages(1, false),
            [("a".to_string(), 1), ("c".to_string(), 1)]
        );
    }

    #[test]
    fn deletes_and_configs() {
        let mut s = State::default();
        apply(&mut s, &value("a", 1, 1, "A"));
        apply(&mut s, &value("a", 2, 2, "B"));
        let mut del = value("a", 1, 1, "A");
        del.deleted = true;
        apply(&mut s, &del);
        assert_eq!(s.versions("a", false).len(), 1);
        assert_eq!(s.versions("a", true).len(), 2);
        let k = br#"{"keytype":"DELETE_SUBJECT","subject":"a","magic":0}"#;
        let v = br#"{"subject":"a","version":2}"#;
        assert_eq!(s.apply(Some(k), Some(v)), Applied::Accepted);
        assert!(s.subjects(false).is_empty());
        assert_eq!(s.max_version("a"), 2);
        // Tombstones remove versions; ids stay resolvable.
        let k1 = RecordKey::schema("a", 1).to_bytes();
        let k2 = RecordKey::schema("a", 2).to_bytes();
        s.apply(Some(&k1), None);
        s.apply(Some(&k2), None);
        assert!(s.subjects(true).is_empty());
        assert!(s.schema(2).is_some());
        // References to permanently deleted versions still resolve.
        assert_eq!(s.version_id("a", 2), Some(2));
        assert_eq!(s.version_id("a", 3), None);

        assert_eq!(s.global_level(), CompatibilityLevel::Backward);
        let cfg = br#"{"compatibilityLevel":"NONE"}"#;
        s.apply(Some(&RecordKey::config(Some("x")).to_bytes()), Some(cfg));
        assert_eq!(s.effective_level("x"), CompatibilityLevel::None);
        assert_eq!(s.effective_level("y"), CompatibilityLevel::Backward);
        s.apply(Some(&RecordKey::config(Some("x")).to_bytes()), None);
        assert_eq!(s.effective_level("x"), CompatibilityLevel::Backward);
    }

    #[test]
    fn modes_and_references() {
        let mut s = State::default();
        assert_eq!(s.effective_mode("a"), Mode::Readwrite);
        let k = RecordKey::mode(None).to_bytes();
        assert_eq!(
            String::from_utf8(k.clone()).unwrap(),
            r#"{"keytype":"MODE","magic":0}"#
        );
        assert_eq!(
            s.apply(Some(&k), Some(br#"{"mode":"READONLY"}"#)),
            Applied::Accepted
        );
        let ks = RecordKey::mode(Some("a")).to_bytes();
        s.apply(Some(&ks), Some(br#"{"mode":"IMPORT"}"#));
        assert_eq!(s.effective_mode("a"), Mode::Import);
        assert_eq!(s.effective_mode("b"), Mode::Readonly);
        s.apply(Some(&ks), None);
        s.apply(Some(&k), None);
        assert_eq!(s.effective_mode("a"), Mode::Readwrite);
        assert_eq!(Mode::parse("readonly"), Some(Mode::Readonly));
        assert_eq!(Mode::parse("sideways"), None);

        apply(&mut s, &value("dep", 1, 1, "D"));
        let mut user = value("user", 1, 2, "U");
        user.references = vec![SchemaReference {
            name: "dep.proto".into(),
            subject: "dep".into(),
            version: 1,
        }];
        apply(&mut s, &user);
        assert_eq!(s.referencing("dep", 1), [2]);
        assert!(s.referencing("dep", 2).is_empty());
        user.deleted = true;
        apply(&mut s, &user);
        assert!(s.referencing("dep", 1).is_empty());
        assert_eq!(s.deleted_subjects(), ["user"]);
        assert_eq!(s.usages(2, true), [("user".to_string(), 1)]);
        assert!(s.usages(2, false).is_empty());
    }

    #[test]
    fn junk_records_are_ignored() {
        let mut s = State::default();
        assert_eq!(s.apply(None, Some(b"x")), Applied::Ignored);
        assert_eq!(s.apply(Some(b"not json"), Some(b"x")), Applied::Ignored);
        assert_eq!(
            s.apply(Some(br#"{"keytype":"NOOP","magic":0}"#), None),
            Applied::Ignored
        );
        assert_eq!(
            s.apply(Some(br#"{"keytype":"MODE","magic":0}"#), Some(b"{}")),
            Applied::Ignored
        );
        assert_eq!(
            s.apply(
                Some(br#"{"keytype":"MODE","magic":0}"#),
                Some(br#"{"mode":"SIDEWAYS"}"#)
            ),
            Applied::Ignored
        );
        let k = RecordKey::schema("a", 1).to_bytes();
        assert_eq!(s.apply(Some(&k), Some(b"{")), Applied::Ignored);
    }
}
