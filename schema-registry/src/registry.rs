//! The registry's operations over the log: registration with id allocation
//! and compatibility checks, lookups, configs, modes and deletion.
//!
//! Two registrations are the same schema when they have the same type and
//! references and compile to the same descriptor ([`ParsedSchema::canonical_key`]),
//! whatever form (text or serialized) and layout they came in. A schema that
//! matches an existing one is written with that one's stored text, so the
//! log's records for an id always agree.
//!
//! Id allocation: a write first reads the log up to its current end, then
//! proposes `max id seen + 1` (or the existing id of identical content) and
//! `max version of the subject + 1`, produces the record and waits until its
//! own consumer has applied it. If another instance's record with the same id
//! or version reached the log first, the log's order decides: the later
//! record is rejected by every instance alike, and the writer starts over.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::api::{SchemaById, SchemaRequest, SubjectVersion};
use crate::compat::{self, CompatibilityLevel};
use crate::log::{LogError, SchemaLog};
use crate::schema::{self, ParsedSchema, SchemaReference, SchemaType, MAX_REFERENCE_DEPTH};
use crate::state::{
    schema_record, Applied, ConfigValue, DeleteSubjectValue, Mode, ModeValue, RecordKey,
    SchemaContent, SchemaValue, State, VersionEntry,
};

/// How many times a write is retried after losing a race to another instance.
const MAX_ATTEMPTS: usize = 8;

/// Errors of registry operations; each maps to a Confluent error code.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    #[error("Schema {0} not found")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error("Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently")]
    VersionSoftDeleted { subject: String, version: i32 },
    #[error("Subject '{subject}' Version {version} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted { subject: String, version: i32 },
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelNotConfigured(String),
    #[error("Subject '{0}' does not have subject-level mode configured")]
    SubjectModeNotConfigured(String),
    #[error("Invalid mode {0:?}. Valid values are READWRITE, READONLY and IMPORT")]
    InvalidMode(String),
    #[error("{0}")]
    OperationNotPermitted(String),
    #[error("One or more references exist to the schema {{subject={subject},version={version}}}: ids {ids:?}")]
    ReferenceExists {
        subject: String,
        version: i32,
        ids: Vec<i32>,
    },
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error("The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\"")]
    InvalidVersion(String),
    #[error("Invalid compatibility level: {0}")]
    InvalidLevel(String),
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", details.join("; "))]
    Incompatible {
        subject: String,
        details: Vec<String>,
    },
    #[error("Error in the backend data store: {0}")]
    Store(#[from] LogError),
    #[error("Error in the backend data store: {0}")]
    Conflict(String),
}

impl RegistryError {
    /// Confluent's error code.
    pub fn code(&self) -> i32 {
        match self {
            Self::SubjectNotFound(_) => 40401,
            Self::VersionNotFound(_) => 40402,
            Self::SchemaNotFound(_) => 40403,
            Self::SubjectNotSoftDeleted(_) => 40405,
            Self::VersionSoftDeleted { .. } => 40406,
            Self::VersionNotSoftDeleted { .. } => 40407,
            Self::SubjectLevelNotConfigured(_) => 40408,
            Self::SubjectModeNotConfigured(_) => 40409,
            Self::InvalidSchema(_) => 42201,
            Self::InvalidVersion(_) => 42202,
            Self::InvalidLevel(_) => 42203,
            Self::InvalidMode(_) => 42204,
            Self::OperationNotPermitted(_) => 42205,
            Self::ReferenceExists { .. } => 42206,
            Self::Incompatible { .. } => 409,
            Self::Store(LogError::Timeout(..)) => 50002,
            Self::Store(_) | Self::Conflict(_) => 50001,
        }
    }

    /// The HTTP status that goes with [`RegistryError::code`]. Failures of
    /// the backing topic (broker unreachable, timeouts, writes that kept
    /// losing races) are 503: the request may succeed when retried.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            409 => 409,
            c if (40000..50000).contains(&c) => (c / 100) as u16,
            _ => 503,
        }
    }
}

/// A version selector: a number or `latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    /// The newest live version.
    Latest,
    /// A specific version.
    Number(i32),
}

impl VersionSpec {
    /// Parses `latest`, `-1` (Confluent's alias for latest) or a positive number.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        match s {
            "latest" | "-1" => Ok(Self::Latest),
            n => match n.parse::<i32>() {
                Ok(v) if v > 0 => Ok(Self::Number(v)),
                _ => Err(RegistryError::InvalidVersion(s.to_string())),
            },
        }
    }
}

/// The registry service.
#[derive(Debug)]
pub struct Registry {
    log: SchemaLog,
    /// Serializes this instance's writes (other instances race through the log).
    write_lock: tokio::sync::Mutex<()>,
    parsed: Mutex<HashMap<i32, Arc<ParsedSchema>>>,
}

impl Registry {
    /// Wraps a started log.
    pub fn new(log: SchemaLog) -> Self {
        Self {
            log,
            write_lock: tokio::sync::Mutex::new(()),
            parsed: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the log up to its current end.
    pub async fn sync(&self) -> Result<(), RegistryError> {
        Ok(self.log.sync().await?)
    }

    /// Runs `f` on the state; if it yields nothing, catches up with the log
    /// (another instance may have just written) and runs it again.
    async fn read_or_sync<T>(
        &self,
        f: impl Fn(&State) -> Option<T>,
    ) -> Result<Option<T>, RegistryError> {
        if let Some(v) = self.log.read(&f) {
            return Ok(Some(v));
        }
        self.sync().await?;
        Ok(self.log.read(&f))
    }

    /// Collects the import sources of `refs`, recursively.
    fn resolve_imports(
        state: &State,
        refs: &[SchemaReference],
        out: &mut BTreeMap<String, String>,
        depth: usize,
    ) -> Result<(), RegistryError> {
        if depth > MAX_REFERENCE_DEPTH {
            return Err(RegistryError::InvalidSchema(
                "references nest too deeply (or form a cycle)".into(),
            ));
        }
        for r in refs {
            // Soft-deleted and permanently deleted versions still resolve, so
            // a schema that compiled once compiles on every instance.
            let id = state.version_id(&r.subject, r.version).ok_or_else(|| {
                RegistryError::InvalidSchema(format!(
                    "reference {} points at {} version {}, which does not exist",
                    r.name, r.subject, r.version
                ))
            })?;
            let content = state.schema(id).ok_or_else(|| {
                RegistryError::InvalidSchema(format!("reference {} has no schema", r.name))
            })?;
            out.insert(r.name.clone(), content.schema.clone());
            Self::resolve_imports(state, &content.references, out, depth + 1)?;
        }
        Ok(())
    }

    fn parse_content(
        state: &State,
        content: &SchemaContent,
    ) -> Result<ParsedSchema, RegistryError> {
        if content.schema_type != SchemaType::Protobuf {
            return Err(RegistryError::InvalidSchema(format!(
                "schema type {} is not supported",
                content.schema_type.as_str()
            )));
        }
        let mut imports = BTreeMap::new();
        Self::resolve_imports(state, &content.references, &mut imports, 0)?;
        ParsedSchema::parse(&content.schema, &imports)
            .map_err(|e| RegistryError::InvalidSchema(e.to_string()))
    }

    fn parsed_by_id(&self, state: &State, id: i32) -> Result<Arc<ParsedSchema>, RegistryError> {
        if let Some(p) = self
            .parsed
            .lock()
            .expect("cache lock is never poisoned")
            .get(&id)
        {
            return Ok(p.clone());
        }
        let content = state
            .schema(id)
            .ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))?;
        let parsed = Arc::new(Self::parse_content(state, content)?);
        self.parsed
            .lock()
            .expect("cache lock is never poisoned")
            .insert(id, parsed.clone());
        Ok(parsed)
    }

    /// Validates a request: type, schema (text or serialized), references;
    /// returns the content to store and its compiled form.
    fn prepare(
        state: &State,
        req: &SchemaRequest,
        normalize: bool,
    ) -> Result<(SchemaContent, ParsedSchema), RegistryError> {
        let schema_type = SchemaType::from_request(req.schema_type.as_deref())
            .map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        if req.schema.trim().is_empty() {
            return Err(RegistryError::InvalidSchema("the schema is empty".into()));
        }
        if req.metadata.as_ref().is_some_and(|m| !m.is_null())
            || req.rule_set.as_ref().is_some_and(|r| !r.is_null())
        {
            return Err(RegistryError::InvalidSchema(
                "schema metadata and rule sets are not supported by this registry".into(),
            ));
        }
        // A new schema may reference soft-deleted versions, not permanently
        // deleted ones (those resolve only for schemas registered earlier).
        for r in &req.references {
            if !state
                .versions(&r.subject, true)
                .iter()
                .any(|(v, _)| *v == r.version)
            {
                return Err(RegistryError::InvalidSchema(format!(
                    "reference {} points at {} version {}, which does not exist",
                    r.name, r.subject, r.version
                )));
            }
        }
        let mut imports = BTreeMap::new();
        Self::resolve_imports(state, &req.references, &mut imports, 0)?;
        let accepted = schema::accept(&req.schema, &imports, normalize)
            .map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        let content = SchemaContent {
            schema_type,
            schema: accepted.text,
            references: req.references.clone(),
        };
        Ok((content, accepted.parsed))
    }

    /// Whether the schema stored under `id` is the same schema as
    /// `content`/`parsed` (same type and references, same descriptor).
    fn same_schema(
        &self,
        state: &State,
        id: i32,
        content: &SchemaContent,
        parsed: &ParsedSchema,
    ) -> bool {
        let Some(stored) = state.schema(id) else {
            return false;
        };
        if stored == content {
            return true;
        }
        if stored.schema_type != content.schema_type || stored.references != content.references {
            return false;
        }
        self.parsed_by_id(state, id)
            .is_ok_and(|p| p.canonical_key() == parsed.canonical_key())
    }

    /// The id of the same schema anywhere in the registry, if any.
    fn find_id(
        &self,
        state: &State,
        content: &SchemaContent,
        parsed: &ParsedSchema,
    ) -> Option<i32> {
        state.id_of(content).or_else(|| {
            state
                .schema_ids()
                .find(|&id| self.same_schema(state, id, content, parsed))
        })
    }

    fn incompatibilities(
        &self,
        state: &State,
        subject: &str,
        parsed: &ParsedSchema,
        level: CompatibilityLevel,
        only: Option<i32>,
    ) -> Result<Vec<String>, RegistryError> {
        if level == CompatibilityLevel::None {
            return Ok(Vec::new());
        }
        let mut previous = Vec::new();
        for (v, e) in state.versions(subject, false) {
            if only.is_none_or(|o| o == v) {
                previous.push(self.parsed_by_id(state, e.id)?);
            }
        }
        let refs: Vec<&ParsedSchema> = previous.iter().map(|p| p.as_ref()).collect();
        Ok(compat::check(level, parsed, &refs))
    }

    /// Registers `req` under `subject`; returns the schema's id. With
    /// `normalize`, a new schema is stored as its canonical rendering.
    pub async fn register(
        &self,
        subject: &str,
        req: &SchemaRequest,
        normalize: bool,
    ) -> Result<i32, RegistryError> {
        let _guard = self.write_lock.lock().await;
        for attempt in 1..=MAX_ATTEMPTS {
            self.sync().await?;
            let proposal = self
                .log
                .read(|state| self.propose(state, subject, req, normalize))?;
            let value = match proposal {
                Ok(existing) => return Ok(existing),
                Err(value) => value,
            };
            let (k, v) = schema_record(&value);
            match self.log.append(&k, Some(&v)).await? {
                Applied::Accepted => {
                    info!(
                        subject,
                        version = value.version,
                        id = value.id,
                        "schema registered"
                    );
                    return Ok(value.id);
                }
                other => {
                    warn!(
                        subject,
                        attempt,
                        ?other,
                        "registration lost a race; retrying"
                    );
                }
            }
        }
        Err(RegistryError::Conflict(format!(
            "registration under {subject} kept conflicting with other writers"
        )))
    }

    /// Decides a registration against the current state: `Ok(id)` when the
    /// subject already has the schema, else the record to write.
    fn propose(
        &self,
        state: &State,
        subject: &str,
        req: &SchemaRequest,
        normalize: bool,
    ) -> Result<Result<i32, SchemaValue>, RegistryError> {
        let mode = state.effective_mode(subject);
        match (mode, req.id) {
            (Mode::Readonly, _) => {
                return Err(RegistryError::OperationNotPermitted(format!(
                    "Subject {subject} is in read-only mode"
                )))
            }
            (Mode::Readwrite, Some(_)) => {
                return Err(RegistryError::OperationNotPermitted(format!(
                    "Subject {subject} is not in import mode; set mode IMPORT to register with an explicit id"
                )))
            }
            (Mode::Import, None) => {
                return Err(RegistryError::OperationNotPermitted(format!(
                    "Subject {subject} is in import mode; registrations must carry an id"
                )))
            }
            (Mode::Import, Some(id)) if id <= 0 => {
                return Err(RegistryError::InvalidSchema(format!(
                    "id {id} is not valid; ids start at 1"
                )))
            }
            _ => {}
        }
        if req.version.is_some() && mode != Mode::Import {
            return Err(RegistryError::OperationNotPermitted(format!(
                "Subject {subject} is not in import mode; an explicit version needs IMPORT"
            )));
        }
        let (mut content, parsed) = Self::prepare(state, req, normalize)?;
        for (_, e) in state.versions(subject, false) {
            if self.same_schema(state, e.id, &content, &parsed)
                && req.id.is_none_or(|id| id == e.id)
            {
                return Ok(Ok(e.id));
            }
        }
        let id = match req.id {
            Some(id) => {
                if state.schema(id).is_some() {
                    if !self.same_schema(state, id, &content, &parsed) {
                        return Err(RegistryError::OperationNotPermitted(format!(
                            "Overwrite new schema with id {id} is not permitted: the id holds another schema"
                        )));
                    }
                } else if let Some(other) = self.find_id(state, &content, &parsed) {
                    return Err(RegistryError::OperationNotPermitted(format!(
                        "this schema is already registered with id {other}"
                    )));
                }
                id
            }
            None => {
                let level = state.effective_level(subject);
                let details = self.incompatibilities(state, subject, &parsed, level, None)?;
                if !details.is_empty() {
                    return Err(RegistryError::Incompatible {
                        subject: subject.to_string(),
                        details,
                    });
                }
                self.find_id(state, &content, &parsed)
                    .unwrap_or(state.max_id() + 1)
            }
        };
        if let Some(stored) = state.schema(id) {
            content = stored.clone();
        }
        let version = match req.version {
            Some(v) if v <= 0 => return Err(RegistryError::InvalidVersion(v.to_string())),
            Some(v) => {
                if state.versions(subject, true).iter().any(|(n, _)| *n == v) {
                    return Err(RegistryError::OperationNotPermitted(format!(
                        "version {v} of {subject} already exists"
                    )));
                }
                v
            }
            None => state.max_version(subject) + 1,
        };
        Ok(Err(SchemaValue {
            subject: subject.to_string(),
            version,
            id,
            schema_type: Some(content.schema_type.as_str().to_string()),
            references: content.references,
            schema: content.schema,
            deleted: false,
        }))
    }

    /// Finds the newest version of `subject` holding `req`'s schema (in
    /// either form); `deleted` includes soft-deleted versions.
    pub async fn lookup(
        &self,
        subject: &str,
        req: &SchemaRequest,
        normalize: bool,
        deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let found = self
            .read_or_sync(|state| {
                // No match yet (or no such subject): catch up with the log
                // before answering 404, another instance may have written.
                let versions = state.versions(subject, deleted);
                if versions.is_empty() {
                    return None;
                }
                let (content, parsed) = match Self::prepare(state, req, normalize) {
                    Ok(c) => c,
                    Err(e) => return Some(Err(e)),
                };
                versions
                    .into_iter()
                    .rev()
                    .find(|(_, e)| self.same_schema(state, e.id, &content, &parsed))
                    .map(|(version, e)| Ok(subject_version(state, subject, version, e.id)))
            })
            .await?;
        found.unwrap_or_else(|| {
            if self.log.read(|s| s.versions(subject, deleted).is_empty()) {
                Err(RegistryError::SubjectNotFound(subject.to_string()))
            } else {
                Err(RegistryError::SchemaNotFound("not found".into()))
            }
        })
    }

    /// The schema with `id`; `serialized` returns the base64 descriptor.
    pub async fn schema_by_id(
        &self,
        id: i32,
        serialized: bool,
    ) -> Result<SchemaById, RegistryError> {
        let content = self
            .read_or_sync(|state| state.schema(id).cloned())
            .await?
            .ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))?;
        let schema = if serialized {
            self.log
                .read(|state| self.parsed_by_id(state, id))?
                .serialized_base64()
        } else {
            content.schema
        };
        Ok(SchemaById {
            schema,
            schema_type: Some(content.schema_type.as_str().to_string()),
            references: content.references,
        })
    }

    /// `(subject, version)` pairs that use `id` (`deleted` includes
    /// soft-deleted versions).
    pub async fn id_usages(
        &self,
        id: i32,
        deleted: bool,
    ) -> Result<Vec<(String, i32)>, RegistryError> {
        self.read_or_sync(|state| state.schema(id).map(|_| state.usages(id, deleted)))
            .await?
            .ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))
    }

    /// Subject names: live ones, with `deleted` also soft-deleted ones, with
    /// `deleted_only` only soft-deleted ones.
    pub fn subjects(&self, deleted: bool) -> Vec<String> {
        self.log.read(|s| s.subjects(deleted))
    }

    /// Subjects whose versions are all soft-deleted.
    pub fn deleted_subjects(&self) -> Vec<String> {
        self.log.read(|s| s.deleted_subjects())
    }

    /// Version numbers of `subject`: live ones, with `deleted` also
    /// soft-deleted ones, with `deleted_only` only soft-deleted ones.
    pub async fn versions(
        &self,
        subject: &str,
        deleted: bool,
        deleted_only: bool,
    ) -> Result<Vec<i32>, RegistryError> {
        self.read_or_sync(|s| {
            let all = s.versions(subject, true);
            if all.is_empty() || (!deleted && !deleted_only && all.iter().all(|(_, e)| e.deleted)) {
                return None;
            }
            Some(
                all.into_iter()
                    .filter(|(_, e)| match (deleted_only, deleted) {
                        (true, _) => e.deleted,
                        (false, true) => true,
                        (false, false) => !e.deleted,
                    })
                    .map(|(n, _)| n)
                    .collect(),
            )
        })
        .await?
        .ok_or_else(|| RegistryError::SubjectNotFound(subject.to_string()))
    }

    /// Ids of the schemas whose references point at `subject` `spec`.
    pub async fn referenced_by(
        &self,
        subject: &str,
        spec: VersionSpec,
    ) -> Result<Vec<i32>, RegistryError> {
        let v = self.version(subject, spec, false, false).await?;
        Ok(self.log.read(|s| s.referencing(subject, v.version)))
    }

    /// One version of `subject`; `serialized` returns the base64
    /// descriptor; `deleted` finds soft-deleted versions too.
    pub async fn version(
        &self,
        subject: &str,
        spec: VersionSpec,
        serialized: bool,
        deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let found = self
            .read_or_sync(|state| {
                let versions = state.versions(subject, deleted);
                let hit = match spec {
                    VersionSpec::Latest => versions.last().copied(),
                    VersionSpec::Number(n) => versions.into_iter().find(|(v, _)| *v == n),
                };
                hit.map(|(v, e)| subject_version(state, subject, v, e.id))
            })
            .await?;
        let mut sv = match found {
            Some(sv) => sv,
            None if self.log.read(|s| s.versions(subject, deleted).is_empty()) => {
                return Err(RegistryError::SubjectNotFound(subject.to_string()))
            }
            None => {
                return Err(RegistryError::VersionNotFound(match spec {
                    VersionSpec::Latest => "latest".into(),
                    VersionSpec::Number(n) => n.to_string(),
                }))
            }
        };
        if serialized {
            sv.schema = self
                .log
                .read(|state| self.parsed_by_id(state, sv.id))?
                .serialized_base64();
        }
        Ok(sv)
    }

    /// Checks `req` against `subject`'s versions (one, or all when `spec` is
    /// `None`) at the subject's level; returns the incompatibilities.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        spec: Option<VersionSpec>,
        req: &SchemaRequest,
    ) -> Result<Vec<String>, RegistryError> {
        self.sync().await?;
        self.log.read(|state| {
            let (_, parsed) = Self::prepare(state, req, false)?;
            let versions = state.versions(subject, false);
            let level = state.effective_level(subject);
            let only = match spec {
                None => None,
                Some(VersionSpec::Latest) => match versions.last() {
                    Some((v, _)) => Some(*v),
                    None => return Ok(Vec::new()),
                },
                Some(VersionSpec::Number(n)) => {
                    if versions.is_empty() {
                        return Err(RegistryError::SubjectNotFound(subject.to_string()));
                    }
                    if !versions.iter().any(|(v, _)| *v == n) {
                        return Err(RegistryError::VersionNotFound(n.to_string()));
                    }
                    Some(n)
                }
            };
            // Checking one named version means "is it compatible with that
            // one"; transitivity only matters when checking all of them.
            let level = if only.is_some() {
                non_transitive(level)
            } else {
                level
            };
            self.incompatibilities(state, subject, &parsed, level, only)
        })
    }

    /// The global level, or `subject`'s (`fallback` to the global one when
    /// the subject has none).
    pub fn level(
        &self,
        subject: Option<&str>,
        fallback: bool,
    ) -> Result<CompatibilityLevel, RegistryError> {
        self.log.read(|s| match subject {
            None => Ok(s.global_level()),
            Some(sub) => match s.subject_level(sub) {
                Some(l) => Ok(l),
                None if fallback => Ok(s.global_level()),
                None => Err(RegistryError::SubjectLevelNotConfigured(sub.to_string())),
            },
        })
    }

    /// Sets the global level or `subject`'s.
    pub async fn set_level(
        &self,
        subject: Option<&str>,
        level: &str,
    ) -> Result<CompatibilityLevel, RegistryError> {
        let level = CompatibilityLevel::parse(level)
            .map_err(|_| RegistryError::InvalidLevel(level.to_string()))?;
        let value = serde_json::to_vec(&ConfigValue {
            compatibility_level: level,
        })
        .expect("config values always serialize");
        let _guard = self.write_lock.lock().await;
        self.log
            .append(&RecordKey::config(subject).to_bytes(), Some(&value))
            .await?;
        Ok(level)
    }

    /// Removes `subject`'s level; returns the level it had.
    pub async fn delete_level(&self, subject: &str) -> Result<CompatibilityLevel, RegistryError> {
        let old = self.level(Some(subject), false)?;
        let _guard = self.write_lock.lock().await;
        self.log
            .append(&RecordKey::config(Some(subject)).to_bytes(), None)
            .await?;
        Ok(old)
    }

    /// Deletes `subject`: soft (versions hidden, ids kept) or, after a soft
    /// delete, `permanent` (tombstones). Returns the versions deleted.
    pub async fn delete_subject(
        &self,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<i32>, RegistryError> {
        let _guard = self.write_lock.lock().await;
        self.sync().await?;
        let (live, all) = self
            .log
            .read(|s| (s.versions(subject, false), s.versions(subject, true)));
        if all.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_string()));
        }
        self.log.read(|s| {
            Self::writable(s, subject)?;
            for (v, _) in &all {
                Self::unreferenced(s, subject, *v)?;
            }
            Ok::<_, RegistryError>(())
        })?;
        if permanent {
            if !live.is_empty() {
                return Err(RegistryError::SubjectNotSoftDeleted(subject.to_string()));
            }
            for (v, _) in &all {
                self.log
                    .append(&RecordKey::schema(subject, *v).to_bytes(), None)
                    .await?;
            }
            return Ok(all.into_iter().map(|(v, _)| v).collect());
        }
        if live.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_string()));
        }
        for (v, e) in &live {
            self.write_soft_delete(subject, *v, e).await?;
        }
        let latest = live.last().map_or(0, |(v, _)| *v);
        let key = RecordKey::DeleteSubject {
            subject: subject.to_string(),
            magic: 0,
        };
        let value = serde_json::to_vec(&DeleteSubjectValue {
            subject: subject.to_string(),
            version: latest,
        })
        .expect("delete values always serialize");
        self.log.append(&key.to_bytes(), Some(&value)).await?;
        info!(subject, "subject deleted");
        Ok(live.into_iter().map(|(v, _)| v).collect())
    }
}

impl Registry {
    /// Refuses writes to a subject in READONLY mode.
    fn writable(state: &State, subject: &str) -> Result<(), RegistryError> {
        if state.effective_mode(subject) == Mode::Readonly {
            return Err(RegistryError::OperationNotPermitted(format!(
                "Subject {subject} is in read-only mode"
            )));
        }
        Ok(())
    }

    /// Refuses deleting a version that live schemas still reference.
    fn unreferenced(state: &State, subject: &str, version: i32) -> Result<(), RegistryError> {
        let ids = state.referencing(subject, version);
        if ids.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::ReferenceExists {
                subject: subject.to_string(),
                version,
                ids,
            })
        }
    }

    async fn write_soft_delete(
        &self,
        subject: &str,
        version: i32,
        entry: &VersionEntry,
    ) -> Result<(), RegistryError> {
        let content = self
            .log
            .read(|s| s.schema(entry.id).cloned())
            .ok_or_else(|| RegistryError::SchemaNotFound(entry.id.to_string()))?;
        let value = SchemaValue {
            subject: subject.to_string(),
            version,
            id: entry.id,
            schema_type: Some(content.schema_type.as_str().to_string()),
            references: content.references,
            schema: content.schema,
            deleted: true,
        };
        let (k, val) = schema_record(&value);
        self.log.append(&k, Some(&val)).await?;
        Ok(())
    }

    /// Deletes one version of `subject`: soft (hidden, its id stays
    /// resolvable) or, after a soft delete, `permanent` (a tombstone).
    /// `latest` means the newest live version. Returns the version deleted.
    pub async fn delete_version(
        &self,
        subject: &str,
        spec: VersionSpec,
        permanent: bool,
    ) -> Result<i32, RegistryError> {
        let _guard = self.write_lock.lock().await;
        self.sync().await?;
        let (version, entry) = self.log.read(|s| {
            let all = s.versions(subject, true);
            if all.is_empty() {
                return Err(RegistryError::SubjectNotFound(subject.to_string()));
            }
            let hit = match spec {
                VersionSpec::Latest => all.iter().rev().find(|(_, e)| !e.deleted).copied(),
                VersionSpec::Number(n) => all.iter().find(|(v, _)| *v == n).copied(),
            };
            let (version, entry) = hit.ok_or_else(|| {
                RegistryError::VersionNotFound(match spec {
                    VersionSpec::Latest => "latest".into(),
                    VersionSpec::Number(n) => n.to_string(),
                })
            })?;
            Self::writable(s, subject)?;
            Self::unreferenced(s, subject, version)?;
            Ok((version, entry))
        })?;
        if permanent {
            if !entry.deleted {
                return Err(RegistryError::VersionNotSoftDeleted {
                    subject: subject.to_string(),
                    version,
                });
            }
            self.log
                .append(&RecordKey::schema(subject, version).to_bytes(), None)
                .await?;
            info!(subject, version, "version permanently deleted");
            return Ok(version);
        }
        if entry.deleted {
            return Err(RegistryError::VersionSoftDeleted {
                subject: subject.to_string(),
                version,
            });
        }
        self.write_soft_delete(subject, version, &entry).await?;
        info!(subject, version, "version deleted");
        Ok(version)
    }

    /// The global mode, or `subject`'s (`fallback` to the global one when the
    /// subject has none).
    pub fn mode(&self, subject: Option<&str>, fallback: bool) -> Result<Mode, RegistryError> {
        self.log.read(|s| match subject {
            None => Ok(s.global_mode()),
            Some(sub) => match s.subject_mode(sub) {
                Some(m) => Ok(m),
                None if fallback => Ok(s.global_mode()),
                None => Err(RegistryError::SubjectModeNotConfigured(sub.to_string())),
            },
        })
    }

    /// Sets the global mode or `subject`'s. IMPORT needs the registry (or the
    /// subject) to be empty unless `force`.
    pub async fn set_mode(
        &self,
        subject: Option<&str>,
        mode: &str,
        force: bool,
    ) -> Result<Mode, RegistryError> {
        let mode = Mode::parse(mode).ok_or_else(|| RegistryError::InvalidMode(mode.to_string()))?;
        let _guard = self.write_lock.lock().await;
        self.sync().await?;
        if mode == Mode::Import && !force {
            let occupied = self.log.read(|s| match subject {
                None => !s.subjects(true).is_empty(),
                Some(sub) => !s.versions(sub, true).is_empty(),
            });
            if occupied {
                return Err(RegistryError::OperationNotPermitted(format!(
                    "Cannot import since found existing subjects{}; use force=true to switch anyway",
                    subject.map(|s| format!(" ({s})")).unwrap_or_default()
                )));
            }
        }
        let value = serde_json::to_vec(&ModeValue { mode }).expect("mode values always serialize");
        self.log
            .append(&RecordKey::mode(subject).to_bytes(), Some(&value))
            .await?;
        info!(subject, mode = mode.as_str(), "mode set");
        Ok(mode)
    }

    /// Removes `subject`'s mode; returns the mode it had.
    pub async fn delete_mode(&self, subject: &str) -> Result<Mode, RegistryError> {
        let old = self.mode(Some(subject), false)?;
        let _guard = self.write_lock.lock().await;
        self.log
            .append(&RecordKey::mode(Some(subject)).to_bytes(), None)
            .await?;
        Ok(old)
    }
}

fn non_transitive(level: CompatibilityLevel) -> CompatibilityLevel {
    use CompatibilityLevel as L;
    match level {
        L::BackwardTransitive => L::Backward,
        L::ForwardTransitive => L::Forward,
        L::FullTransitive => L::Full,
        other => other,
    }
}

fn subject_version(state: &State, subject: &str, version: i32, id: i32) -> SubjectVersion {
    let content = state.schema(id);
    SubjectVersion {
        subject: subject.to_string(),
        version,
        id,
        schema_type: content.map(|c| c.schema_type.as_str().to_string()),
        schema: content.map(|c| c.schema.clone()).unwrap_or_default(),
        references: content.map(|c| c.references.clone()).unwrap_or_default(),
    }
}
