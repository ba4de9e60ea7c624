//! Schema types, references, and the protobuf parser (protox) that turns a
//! schema's text plus its resolved references into descriptors.

use std::collections::BTreeMap;

use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use protox::prost_reflect::{DescriptorPool, FileDescriptor};
use serde::{Deserialize, Serialize};

/// File name the registered schema gets while it is compiled. References use
/// their own `name` (the import path), so this must not look like one.
pub const ROOT_FILE_NAME: &str = "__registry_schema__.proto";

/// Deepest chain of references followed while resolving a schema.
pub const MAX_REFERENCE_DEPTH: usize = 32;

/// Deepest nesting of braces, brackets, parentheses and angle brackets
/// accepted in schema text. The parser recurses on nesting, so this bounds
/// its stack use.
pub const MAX_NESTING: usize = 64;

/// Errors parsing a schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema type is not one this registry handles.
    #[error("schema type {0} is not supported; this registry accepts PROTOBUF only")]
    UnsupportedType(String),
    /// The protobuf text does not compile.
    #[error("invalid protobuf schema: {0}")]
    Invalid(String),
}

/// The kind of a schema. Only protobuf is accepted; the others are named so
/// that requests for them get a precise error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SchemaType {
    /// Protocol Buffers (`.proto` text).
    Protobuf,
    /// Apache Avro (rejected).
    Avro,
    /// JSON Schema (rejected).
    Json,
}

impl SchemaType {
    /// Parses Confluent's `schemaType` field; absent means AVRO, as in
    /// Confluent's registry.
    pub fn from_request(value: Option<&str>) -> Result<Self, SchemaError> {
        match value.unwrap_or("AVRO") {
            "PROTOBUF" => Ok(Self::Protobuf),
            "AVRO" => Err(SchemaError::UnsupportedType("AVRO".into())),
            "JSON" => Err(SchemaError::UnsupportedType("JSON".into())),
            other => Err(SchemaError::UnsupportedType(other.to_string())),
        }
    }

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Protobuf => "PROTOBUF",
            Self::Avro => "AVRO",
            Self::Json => "JSON",
        }
    }
}

/// A reference from one schema to another registered schema: `name` is the
/// import path used in the referring schema's text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SchemaReference {
    /// Import path, for example `vmr/v1/event.proto`.
    pub name: String,
    /// Subject the referenced schema is registered under.
    pub subject: String,
    /// Version of that subject.
    pub version: i32,
}

/// A compiled protobuf schema.
#[derive(Debug, Clone)]
pub struct ParsedSchema {
    pool: DescriptorPool,
    file: FileDescriptor,
}

struct SourceResolver {
    root: String,
    imports: BTreeMap<String, String>,
}

impl FileResolver for SourceResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == ROOT_FILE_NAME {
            return File::from_source(name, &self.root);
        }
        match self.imports.get(name) {
            Some(source) => File::from_source(name, source),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

impl ParsedSchema {
    /// Compiles `source`, with `imports` mapping each import path (reference
    /// name, including transitive ones) to its text. The well-known
    /// `google/protobuf/*.proto` files are always available.
    pub fn parse(source: &str, imports: &BTreeMap<String, String>) -> Result<Self, SchemaError> {
        for (name, text) in std::iter::once((ROOT_FILE_NAME, source))
            .chain(imports.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        {
            let depth = nesting_depth(text);
            if depth > MAX_NESTING {
                let which = if name == ROOT_FILE_NAME {
                    "the schema"
                } else {
                    name
                };
                return Err(SchemaError::Invalid(format!(
                    "{which} nests {depth} levels deep; at most {MAX_NESTING} are accepted"
                )));
            }
        }
        let mut chain = ChainFileResolver::new();
        chain.add(SourceResolver {
            root: source.to_string(),
            imports: imports.clone(),
        });
        chain.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(chain);
        compiler.include_imports(true);
        compiler
            .open_file(ROOT_FILE_NAME)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        let pool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(ROOT_FILE_NAME)
            .ok_or_else(|| SchemaError::Invalid("compiled schema has no root file".into()))?;
        Ok(Self { pool, file })
    }

    /// The compiled file of the registered schema.
    pub fn file(&self) -> &FileDescriptor {
        &self.file
    }

    /// The pool holding the schema and everything it imports.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The schema as Confluent's "serialized" format: a base64 (standard
    /// alphabet, padded) `FileDescriptorProto` without source information.
    pub fn serialized_base64(&self) -> String {
        let mut proto = self.file.file_descriptor_proto().clone();
        proto.source_code_info = None;
        base64_encode(&prost::Message::encode_to_vec(&proto))
    }

    /// Fully-qualified name of the message at `path` (Confluent message
    /// indexes), if it exists.
    pub fn message_at(&self, path: &[i32]) -> Option<String> {
        let (&first, rest) = path.split_first()?;
        let mut msg = self.file.messages().nth(usize::try_from(first).ok()?)?;
        for &i in rest {
            let child = msg.child_messages().nth(usize::try_from(i).ok()?)?;
            msg = child;
        }
        Some(msg.full_name().to_string())
    }
}

/// Deepest nesting of `{[(<` in protobuf text, ignoring comments and
/// string literals.
pub fn nesting_depth(text: &str) -> usize {
    let b = text.as_bytes();
    let (mut i, mut depth, mut max) = (0, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'{' | b'[' | b'(' | b'<' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' | b')' | b'>' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

/// Standard padded base64.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_event_schema() {
        let s = ParsedSchema::parse(vmr_proto::schemas::EVENT_PROTO, &BTreeMap::new()).unwrap();
        assert_eq!(s.message_at(&[0]).as_deref(), Some("vmr.v1.Event"));
        assert!(!s.serialized_base64().is_empty());
    }

    #[test]
    fn resolves_references_by_import_name() {
        let mut imports = BTreeMap::new();
        imports.insert(
            "dep/a.proto".to_string(),
            "syntax = \"proto3\"; package dep; message A { string x = 1; }".to_string(),
        );
        let src = "syntax = \"proto3\"; import \"dep/a.proto\"; \
                   import \"google/protobuf/timestamp.proto\"; \
                   message B { dep.A a = 1; google.protobuf.Timestamp t = 2; message C {} }";
        let s = ParsedSchema::parse(src, &imports).unwrap();
        assert_eq!(s.message_at(&[0, 0]).as_deref(), Some("B.C"));
        assert_eq!(s.message_at(&[1]), None);
        let err = ParsedSchema::parse(src, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("dep/a.proto"), "{err}");
    }

    #[test]
    fn malformed_text_is_invalid() {
        for bad in [
            "message {",
            "syntax = \"proto3\"; message A { strin x = 1; }",
            "syntax = \"proto3\"; message A { string x = 1; string y = 1; }",
            "syntax = \"proto4\";",
            "syntax = \"proto3\"; import \"google/protobuf/nope.proto\";",
            "syntax = \"proto3\"; option (nope) = 1; message A {}",
            "syntax = \"proto3\"; message A { map<A, string> m = 1; }",
            "syntax = \"proto3\"; message A { B b = 1; }",
            "syntax = \"proto3\"; message \u{1F600} {}",
            "\0\0\0",
            "",
        ] {
            match ParsedSchema::parse(bad, &BTreeMap::new()) {
                Err(SchemaError::Invalid(_)) => {}
                Ok(_) if bad.is_empty() => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let nested = |n: usize| {
            format!(
                "syntax = \"proto3\"; {} {}",
                "message A { ".repeat(n),
                "}".repeat(n)
            )
        };
        // The limit itself parses on a 2 MiB stack (a Tokio worker's).
        let ok = nested(MAX_NESTING);
        let parsed = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || ParsedSchema::parse(&ok, &BTreeMap::new()).is_ok())
            .unwrap()
            .join()
            .unwrap();
        assert!(parsed);
        let err = ParsedSchema::parse(&nested(100_000), &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("levels deep"), "{err}");
        assert_eq!(nesting_depth("// {{{\n/* [[[ */ \"(((\" '<<' { }"), 1);
    }

    #[test]
    fn schema_type_defaults_to_avro_and_rejects_it() {
        assert!(SchemaType::from_request(None).is_err());
        assert!(SchemaType::from_request(Some("JSON")).is_err());
        assert_eq!(
            SchemaType::from_request(Some("PROTOBUF")).unwrap(),
            SchemaType::Protobuf
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }
}
