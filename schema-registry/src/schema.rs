//! Schema types, references, and the protobuf parser (protox) that turns a
//! schema (its `.proto` text, or its serialized `FileDescriptorProto` in
//! base64) plus its resolved references into descriptors.

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
    /// A serialized descriptor has no faithful `.proto` text form.
    #[error("invalid protobuf schema: {0}")]
    Render(#[from] crate::render::RenderError),
}

/// The form a schema was given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaForm {
    /// `.proto` text.
    Text,
    /// A base64 `FileDescriptorProto` (what confluent-kafka's serializers send).
    Serialized,
}

/// A schema as accepted from a request: the text to store and its compiled
/// form.
#[derive(Debug, Clone)]
pub struct AcceptedSchema {
    /// The text to store: the request's text (trimmed), or the rendering of
    /// a serialized descriptor, or the rendering of either with `normalize`.
    pub text: String,
    /// The text, compiled.
    pub parsed: ParsedSchema,
    /// How the schema arrived.
    pub form: SchemaForm,
}

/// Reads a schema in either form. A string that is valid base64 of a
/// `FileDescriptorProto` is taken as serialized; anything else as text.
/// Serialized descriptors are rendered as text, and the rendering is compiled
/// again and must give the same descriptor. With `normalize`, text schemas are
/// stored as their rendering as well.
pub fn accept(
    schema: &str,
    imports: &BTreeMap<String, String>,
    normalize: bool,
) -> Result<AcceptedSchema, SchemaError> {
    let trimmed = schema.trim();
    if let Some(bytes) = base64_decode(trimmed) {
        match ParsedSchema::from_descriptor(&bytes, imports) {
            Ok(input) => {
                let text = crate::render::render(input.file())?;
                let parsed = ParsedSchema::parse(&text, imports)?;
                if normalised(input.file()) != normalised(parsed.file())
                    || crate::render::render(parsed.file())? != text
                {
                    return Err(SchemaError::Invalid(
                        "the serialized descriptor does not survive conversion to .proto text"
                            .into(),
                    ));
                }
                return Ok(AcceptedSchema {
                    text,
                    parsed,
                    form: SchemaForm::Serialized,
                });
            }
            Err(descriptor_error) => {
                // Base64-looking text is still tried as text; if that fails
                // too, the descriptor's error is the useful one.
                return match ParsedSchema::parse(trimmed, imports) {
                    Ok(parsed) => text_schema(trimmed, parsed, imports, normalize),
                    Err(_) => Err(descriptor_error),
                };
            }
        }
    }
    let parsed = ParsedSchema::parse(trimmed, imports)?;
    text_schema(trimmed, parsed, imports, normalize)
}

fn text_schema(
    trimmed: &str,
    parsed: ParsedSchema,
    imports: &BTreeMap<String, String>,
    normalize: bool,
) -> Result<AcceptedSchema, SchemaError> {
    if !normalize {
        return Ok(AcceptedSchema {
            text: trimmed.to_string(),
            parsed,
            form: SchemaForm::Text,
        });
    }
    let text = crate::render::render(parsed.file())?;
    let again = ParsedSchema::parse(&text, imports)?;
    if again.canonical_key() != parsed.canonical_key() {
        return Err(SchemaError::Invalid(
            "the schema does not survive normalization".into(),
        ));
    }
    Ok(AcceptedSchema {
        text,
        parsed: again,
        form: SchemaForm::Text,
    })
}

/// The raw descriptor with what differs between equivalent producers
/// cleared: file name, source info, default JSON names, explicit proto2
/// syntax, empty option messages.
fn normalised(file: &FileDescriptor) -> prost_types::FileDescriptorProto {
    use prost_types::{DescriptorProto, FieldDescriptorProto};
    fn opt<T: Default + PartialEq>(o: &mut Option<T>) {
        if o.as_ref().is_some_and(|v| *v == T::default()) {
            *o = None;
        }
    }
    fn field(f: &mut FieldDescriptorProto) {
        if f.label.is_none() {
            f.label = Some(prost_types::field_descriptor_proto::Label::Optional as i32);
        }
        if f.json_name.as_deref() == Some(crate::render::default_json_name(f.name()).as_str()) {
            f.json_name = None;
        }
        opt(&mut f.options);
        if f.proto3_optional == Some(false) {
            f.proto3_optional = None;
        }
    }
    fn message(m: &mut DescriptorProto) {
        opt(&mut m.options);
        m.field.iter_mut().for_each(field);
        m.extension.iter_mut().for_each(field);
        m.nested_type.iter_mut().for_each(message);
        m.oneof_decl.iter_mut().for_each(|o| opt(&mut o.options));
        m.enum_type.iter_mut().for_each(|e| {
            opt(&mut e.options);
            e.value.iter_mut().for_each(|v| opt(&mut v.options));
        });
    }
    let mut p = file.file_descriptor_proto().clone();
    p.name = None;
    p.source_code_info = None;
    if p.syntax.as_deref() == Some("proto2") {
        p.syntax = None;
    }
    opt(&mut p.options);
    p.message_type.iter_mut().for_each(message);
    p.extension.iter_mut().for_each(field);
    p.enum_type.iter_mut().for_each(|e| {
        opt(&mut e.options);
        e.value.iter_mut().for_each(|v| opt(&mut v.options));
    });
    p.service.iter_mut().for_each(|s| {
        opt(&mut s.options);
        s.method.iter_mut().for_each(|m| {
            opt(&mut m.options);
            if m.client_streaming == Some(false) {
                m.client_streaming = None;
            }
            if m.server_streaming == Some(false) {
                m.server_streaming = None;
            }
        });
    });
    p
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

fn resolver(root: &str, imports: &BTreeMap<String, String>) -> ChainFileResolver {
    let mut chain = ChainFileResolver::new();
    chain.add(SourceResolver {
        root: root.to_string(),
        imports: imports.clone(),
    });
    chain.add(GoogleFileResolver::new());
    chain
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
        let mut compiler = protox::Compiler::with_file_resolver(resolver(source, imports));
        compiler.include_source_info(false);
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

    /// Reads a serialized `FileDescriptorProto`; its imports are compiled
    /// from `imports` (and the well-known files). The file is renamed to
    /// [`ROOT_FILE_NAME`].
    pub fn from_descriptor(
        bytes: &[u8],
        imports: &BTreeMap<String, String>,
    ) -> Result<Self, SchemaError> {
        let raw = <prost_types::FileDescriptorProto as prost::Message>::decode(bytes)
            .map_err(|e| SchemaError::Invalid(format!("not a FileDescriptorProto: {e}")))?;
        for (name, text) in imports {
            let depth = nesting_depth(text);
            if depth > MAX_NESTING {
                return Err(SchemaError::Invalid(format!(
                    "{name} nests {depth} levels deep; at most {MAX_NESTING} are accepted"
                )));
            }
        }
        let mut pool = if raw.dependency.is_empty() {
            DescriptorPool::new()
        } else {
            let mut compiler = protox::Compiler::with_file_resolver(resolver("", imports));
            compiler.include_imports(true);
            compiler.include_source_info(false);
            compiler
                .open_files(raw.dependency.iter())
                .map_err(|e| SchemaError::Invalid(e.to_string()))?;
            compiler.descriptor_pool()
        };
        // A later occurrence of a singular field wins, so appending field 1
        // renames the file without re-encoding (and so without losing the
        // extension options the original bytes carry).
        let mut renamed = bytes.to_vec();
        renamed.push(0x0a);
        prost::encoding::encode_varint(ROOT_FILE_NAME.len() as u64, &mut renamed);
        renamed.extend_from_slice(ROOT_FILE_NAME.as_bytes());
        pool.decode_file_descriptor_proto(renamed.as_slice())
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        let file = pool
            .get_file_by_name(ROOT_FILE_NAME)
            .ok_or_else(|| SchemaError::Invalid("descriptor has no file".into()))?;
        Ok(Self { pool, file })
    }

    /// What decides whether two schemas are the same: the compiled
    /// descriptor's encoding. Text that differs only in layout or comments,
    /// and a serialized descriptor of the same file, give the same key.
    pub fn canonical_key(&self) -> Vec<u8> {
        without_source_info(&self.file.encode_to_vec())
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
    /// alphabet, padded) `FileDescriptorProto` without source information,
    /// custom options included.
    pub fn serialized_base64(&self) -> String {
        base64_encode(&self.canonical_key())
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

/// An encoded `FileDescriptorProto` without its `source_code_info` (field
/// 9), which records positions in the text and so differs between layouts.
fn without_source_info(bytes: &[u8]) -> Vec<u8> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut out = Vec::with_capacity(bytes.len());
    let mut buf = bytes;
    while !buf.is_empty() {
        let start = bytes.len() - buf.len();
        let Ok((tag, wire)) = decode_key(&mut buf) else {
            return bytes.to_vec();
        };
        let skip = match wire {
            WireType::Varint => decode_varint(&mut buf).map(|_| 0),
            WireType::SixtyFourBit => Ok(8),
            WireType::ThirtyTwoBit => Ok(4),
            WireType::LengthDelimited => decode_varint(&mut buf).map(|l| l as usize),
            _ => return bytes.to_vec(),
        };
        let Ok(skip) = skip else {
            return bytes.to_vec();
        };
        if skip > buf.len() {
            return bytes.to_vec();
        }
        buf = &buf[skip..];
        let end = bytes.len() - buf.len();
        if tag != 9 {
            out.extend_from_slice(&bytes[start..end]);
        }
    }
    out
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

/// Decodes standard padded base64; `None` unless `text` is entirely that.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = text.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, chunk) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
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
    fn base64_decoding_is_strict() {
        for (o, i) in [("Zg==", "f"), ("Zm8=", "fo"), ("Zm9vYmFy", "foobar")] {
            assert_eq!(base64_decode(o).unwrap(), i.as_bytes());
        }
        for bad in [
            "",
            "Zg=",
            "Z===",
            "Zg==Zg==",
            "syntax = \"proto3\";",
            "ab$d",
        ] {
            assert!(base64_decode(bad).is_none(), "{bad}");
        }
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
