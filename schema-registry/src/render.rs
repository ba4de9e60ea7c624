//! Renders a compiled protobuf file as `.proto` text.
//!
//! Schemas registered in their serialized form (a `FileDescriptorProto`) are
//! stored as text, as Confluent's registry does; `normalize=true` stores this
//! rendering for text schemas too. The output keeps the order of every list
//! in the descriptor (messages, fields, nested types, enums, values,
//! services), so message indexes stay the same, and names types fully
//! qualified (`.pkg.Type`). Constructs that cannot be written back faithfully
//! (groups, editions, options holding messages) are refused with an error
//! rather than dropped.

use std::fmt::Write as _;

use protox::prost_reflect::{
    Cardinality, DynamicMessage, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind,
    MessageDescriptor, ReflectMessage, Syntax, Value,
};

/// Errors rendering a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The descriptor uses something that has no faithful text form here.
    #[error("the descriptor cannot be written as .proto text: {0}")]
    Unsupported(String),
}

fn unsupported(what: impl Into<String>) -> RenderError {
    RenderError::Unsupported(what.into())
}

/// Renders `file` as `.proto` text.
pub fn render(file: &FileDescriptor) -> Result<String, RenderError> {
    let raw = file.file_descriptor_proto();
    let mut out = String::new();
    if let Some(other) = raw
        .syntax
        .as_deref()
        .filter(|s| !matches!(*s, "" | "proto2" | "proto3"))
    {
        return Err(unsupported(format!("syntax {other:?}")));
    }
    match file.syntax() {
        Syntax::Proto2 => out.push_str("syntax = \"proto2\";\n"),
        Syntax::Proto3 => out.push_str("syntax = \"proto3\";\n"),
    }
    if !file.package_name().is_empty() {
        let _ = writeln!(out, "package {};", file.package_name());
    }
    for (i, dep) in raw.dependency.iter().enumerate() {
        let i = i as i32;
        let kind = if raw.public_dependency.contains(&i) {
            "public "
        } else if raw.weak_dependency.contains(&i) {
            "weak "
        } else {
            ""
        };
        let _ = writeln!(out, "import {kind}{};", quote(dep.as_bytes()));
    }
    options_block(&mut out, 0, &file.options())?;
    let syntax = file.syntax();
    for m in file.messages() {
        out.push('\n');
        message(&mut out, 0, &m, syntax)?;
    }
    for e in file.enums() {
        out.push('\n');
        enumeration(&mut out, 0, &e)?;
    }
    let exts: Vec<_> = file.extensions().collect();
    if !exts.is_empty() {
        out.push('\n');
        extend_blocks(&mut out, 0, &exts, syntax)?;
    }
    for s in file.services() {
        out.push('\n');
        let _ = writeln!(out, "service {} {{", s.name());
        options_block(&mut out, 1, &s.options())?;
        for m in s.methods() {
            let input = format!(
                "{}.{}",
                if m.is_client_streaming() {
                    "stream "
                } else {
                    ""
                },
                m.input().full_name()
            );
            let output = format!(
                "{}.{}",
                if m.is_server_streaming() {
                    "stream "
                } else {
                    ""
                },
                m.output().full_name()
            );
            let opts = m.options();
            indent(&mut out, 1);
            let _ = write!(out, "rpc {}({input}) returns ({output})", m.name());
            if has_options(&opts) {
                out.push_str(" {\n");
                options_block(&mut out, 2, &opts)?;
                indent(&mut out, 1);
                out.push_str("}\n");
            } else {
                out.push_str(";\n");
            }
        }
        out.push_str("}\n");
    }
    Ok(out)
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn has_options(opts: &DynamicMessage) -> bool {
    opts.fields().next().is_some() || opts.extensions().next().is_some()
}

/// `name = value` pairs of a set of options, in field-number order.
fn option_pairs(opts: &DynamicMessage) -> Result<Vec<(String, String)>, RenderError> {
    if opts.unknown_fields().next().is_some() {
        return Err(unsupported(format!(
            "{} holds options this registry does not know",
            opts.descriptor().full_name()
        )));
    }
    let mut pairs = Vec::new();
    for (f, v) in opts.fields() {
        if f.name() == "uninterpreted_option" {
            return Err(unsupported("uninterpreted options"));
        }
        if f.name() == "map_entry" {
            continue;
        }
        for text in option_values(&f.kind(), v, f.name())? {
            pairs.push((f.name().to_string(), text));
        }
    }
    for (e, v) in opts.extensions() {
        for text in option_values(&e.kind(), v, e.full_name())? {
            pairs.push((format!("({})", e.full_name()), text));
        }
    }
    Ok(pairs)
}

fn option_values(kind: &Kind, v: &Value, name: &str) -> Result<Vec<String>, RenderError> {
    match v {
        Value::List(items) => items
            .iter()
            .map(|i| scalar_text(kind, i, name))
            .collect::<Result<_, _>>(),
        other => Ok(vec![scalar_text(kind, other, name)?]),
    }
}

fn float_text(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:?}")
    }
}

fn scalar_text(kind: &Kind, v: &Value, name: &str) -> Result<String, RenderError> {
    Ok(match v {
        Value::Bool(b) => b.to_string(),
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::U32(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::F32(n) => float_text(f64::from(*n)),
        Value::F64(n) => float_text(*n),
        Value::String(s) => quote(s.as_bytes()),
        Value::Bytes(b) => quote(b),
        Value::EnumNumber(n) => match kind.as_enum().and_then(|e| e.get_value(*n)) {
            Some(value) => value.name().to_string(),
            None => n.to_string(),
        },
        Value::Message(_) | Value::List(_) | Value::Map(_) => {
            return Err(unsupported(format!(
                "option {name} holds a message or a list"
            )))
        }
    })
}

fn options_block(out: &mut String, level: usize, opts: &DynamicMessage) -> Result<(), RenderError> {
    for (name, value) in option_pairs(opts)? {
        indent(out, level);
        let _ = writeln!(out, "option {name} = {value};");
    }
    Ok(())
}

/// Protobuf string literal of `bytes` (octal escapes for anything that is
/// not printable ASCII except UTF-8 sequences, which stay as they are).
pub fn quote(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    let text = String::from_utf8_lossy(bytes);
    let utf8 = std::str::from_utf8(bytes).is_ok();
    if utf8 {
        for c in text.chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                '\t' => s.push_str("\\t"),
                c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                    let _ = write!(s, "\\{:03o}", c as u32);
                }
                c => s.push(c),
            }
        }
    } else {
        for &b in bytes {
            match b {
                b'"' => s.push_str("\\\""),
                b'\\' => s.push_str("\\\\"),
                0x20..=0x7e => s.push(b as char),
                _ => {
                    let _ = write!(s, "\\{b:03o}");
                }
            }
        }
    }
    s.push('"');
    s
}

fn type_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => format!(".{}", m.full_name()),
        Kind::Enum(e) => format!(".{}", e.full_name()),
    }
}

/// protoc's default JSON name: underscores dropped, the letter after each
/// one upper-cased.
pub fn default_json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

struct FieldLine<'a> {
    name: &'a str,
    number: u32,
    kind: Kind,
    cardinality: Cardinality,
    proto3_optional: bool,
    in_oneof: bool,
    is_map: bool,
    raw: &'a prost_types::FieldDescriptorProto,
    options: DynamicMessage,
}

fn field_line(
    out: &mut String,
    level: usize,
    f: &FieldLine<'_>,
    syntax: Syntax,
) -> Result<(), RenderError> {
    if f.raw.r#type() == prost_types::field_descriptor_proto::Type::Group {
        return Err(unsupported(format!("group field {}", f.name)));
    }
    indent(out, level);
    let ty = if f.is_map {
        let entry = f
            .kind
            .as_message()
            .ok_or_else(|| unsupported("map field without an entry message"))?;
        format!(
            "map<{}, {}>",
            type_name(&entry.map_entry_key_field().kind()),
            type_name(&entry.map_entry_value_field().kind())
        )
    } else {
        type_name(&f.kind)
    };
    let label = if f.is_map || (f.in_oneof && !f.proto3_optional) {
        ""
    } else {
        match (syntax, f.cardinality) {
            (_, Cardinality::Repeated) => "repeated ",
            (Syntax::Proto2, Cardinality::Required) => "required ",
            (Syntax::Proto2, Cardinality::Optional) => "optional ",
            _ if f.proto3_optional => "optional ",
            _ => "",
        }
    };
    let _ = write!(out, "{label}{ty} {} = {}", f.name, f.number);
    let mut brackets: Vec<String> = Vec::new();
    if let Some(default) = &f.raw.default_value {
        let text = match &f.kind {
            Kind::String => quote(default.as_bytes()),
            // Already C-escaped in the descriptor.
            Kind::Bytes => format!("\"{default}\""),
            _ => default.clone(),
        };
        brackets.push(format!("default = {text}"));
    }
    if let Some(json) = &f.raw.json_name {
        if *json != default_json_name(f.name) {
            brackets.push(format!("json_name = {}", quote(json.as_bytes())));
        }
    }
    for (name, value) in option_pairs(&f.options)? {
        brackets.push(format!("{name} = {value}"));
    }
    if !brackets.is_empty() {
        let _ = write!(out, " [{}]", brackets.join(", "));
    }
    out.push_str(";\n");
    Ok(())
}

fn message_field(f: &FieldDescriptor) -> FieldLine<'_> {
    let raw = f.field_descriptor_proto();
    FieldLine {
        name: f.name(),
        number: f.number(),
        kind: f.kind(),
        cardinality: f.cardinality(),
        proto3_optional: raw.proto3_optional(),
        in_oneof: f.containing_oneof().is_some(),
        is_map: f.is_map(),
        raw,
        options: f.options(),
    }
}

fn ranges(list: &[(i64, i64)], max: i64) -> String {
    list.iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else if end == max {
                format!("{start} to max")
            } else {
                format!("{start} to {end}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const MAX_FIELD_NUMBER: i64 = 536_870_911;

fn message(
    out: &mut String,
    level: usize,
    m: &MessageDescriptor,
    syntax: Syntax,
) -> Result<(), RenderError> {
    indent(out, level);
    let _ = writeln!(out, "message {} {{", m.name());
    let inner = level + 1;
    options_block(out, inner, &m.options())?;
    let raw = m.descriptor_proto();
    let nested: Vec<MessageDescriptor> = m.child_messages().collect();
    let mut next_nested = 0usize;
    let fields: Vec<FieldDescriptor> = m.fields().collect();
    let mut i = 0;
    while i < fields.len() {
        let f = &fields[i];
        if f.is_map() {
            // Nested messages declared before this map field come first, so
            // that the entry keeps its place among the nested types.
            let entry = f.kind();
            let entry_name = entry.as_message().map(|e| e.full_name().to_string());
            while next_nested < nested.len() {
                let n = &nested[next_nested];
                next_nested += 1;
                if Some(n.full_name()) == entry_name.as_deref() {
                    break;
                }
                if !n.is_map_entry() {
                    message(out, inner, n, syntax)?;
                }
            }
        }
        match f.containing_oneof().filter(|o| !o.is_synthetic()) {
            Some(oneof) => {
                indent(out, inner);
                let _ = writeln!(out, "oneof {} {{", oneof.name());
                options_block(out, inner + 1, &oneof.options())?;
                while i < fields.len()
                    && fields[i]
                        .containing_oneof()
                        .is_some_and(|o| o.name() == oneof.name())
                {
                    field_line(out, inner + 1, &message_field(&fields[i]), syntax)?;
                    i += 1;
                }
                indent(out, inner);
                out.push_str("}\n");
                continue;
            }
            None => field_line(out, inner, &message_field(f), syntax)?,
        }
        i += 1;
    }
    for n in &nested[next_nested..] {
        if !n.is_map_entry() {
            message(out, inner, n, syntax)?;
        }
    }
    for e in m.child_enums() {
        enumeration(out, inner, &e)?;
    }
    if !raw.extension_range.is_empty() {
        if raw.extension_range.iter().any(|r| r.options.is_some()) {
            return Err(unsupported("extension range options"));
        }
        let list: Vec<(i64, i64)> = raw
            .extension_range
            .iter()
            .map(|r| (i64::from(r.start()), i64::from(r.end()) - 1))
            .collect();
        indent(out, inner);
        let _ = writeln!(out, "extensions {};", ranges(&list, MAX_FIELD_NUMBER));
    }
    if !raw.reserved_range.is_empty() {
        let list: Vec<(i64, i64)> = raw
            .reserved_range
            .iter()
            .map(|r| (i64::from(r.start()), i64::from(r.end()) - 1))
            .collect();
        indent(out, inner);
        let _ = writeln!(out, "reserved {};", ranges(&list, MAX_FIELD_NUMBER));
    }
    if !raw.reserved_name.is_empty() {
        indent(out, inner);
        let names: Vec<String> = raw
            .reserved_name
            .iter()
            .map(|n| quote(n.as_bytes()))
            .collect();
        let _ = writeln!(out, "reserved {};", names.join(", "));
    }
    let exts: Vec<_> = m.child_extensions().collect();
    extend_blocks(out, inner, &exts, syntax)?;
    indent(out, level);
    out.push_str("}\n");
    Ok(())
}

fn extend_blocks(
    out: &mut String,
    level: usize,
    exts: &[protox::prost_reflect::ExtensionDescriptor],
    syntax: Syntax,
) -> Result<(), RenderError> {
    let mut i = 0;
    while i < exts.len() {
        let extendee = exts[i].containing_message();
        indent(out, level);
        let _ = writeln!(out, "extend .{} {{", extendee.full_name());
        while i < exts.len() && exts[i].containing_message().full_name() == extendee.full_name() {
            let e = &exts[i];
            let raw = e.field_descriptor_proto();
            let line = FieldLine {
                name: e.name(),
                number: e.number(),
                kind: e.kind(),
                cardinality: e.cardinality(),
                proto3_optional: raw.proto3_optional(),
                in_oneof: false,
                is_map: false,
                raw,
                options: e.options(),
            };
            field_line(out, level + 1, &line, syntax)?;
            i += 1;
        }
        indent(out, level);
        out.push_str("}\n");
    }
    Ok(())
}

fn enumeration(out: &mut String, level: usize, e: &EnumDescriptor) -> Result<(), RenderError> {
    indent(out, level);
    let _ = writeln!(out, "enum {} {{", e.name());
    let inner = level + 1;
    options_block(out, inner, &e.options())?;
    // The raw list: with allow_alias, `values()` keeps one value per number.
    for raw_value in &e.enum_descriptor_proto().value {
        let v = e
            .get_value_by_name(raw_value.name())
            .ok_or_else(|| unsupported(format!("enum value {}", raw_value.name())))?;
        indent(out, inner);
        let _ = write!(out, "{} = {}", raw_value.name(), raw_value.number());
        let pairs = option_pairs(&v.options())?;
        if !pairs.is_empty() {
            let list: Vec<String> = pairs.iter().map(|(n, v)| format!("{n} = {v}")).collect();
            let _ = write!(out, " [{}]", list.join(", "));
        }
        out.push_str(";\n");
    }
    let raw = e.enum_descriptor_proto();
    if !raw.reserved_range.is_empty() {
        let list: Vec<(i64, i64)> = raw
            .reserved_range
            .iter()
            .map(|r| (i64::from(r.start()), i64::from(r.end())))
            .collect();
        indent(out, inner);
        let _ = writeln!(out, "reserved {};", ranges(&list, i64::from(i32::MAX)));
    }
    if !raw.reserved_name.is_empty() {
        indent(out, inner);
        let names: Vec<String> = raw
            .reserved_name
            .iter()
            .map(|n| quote(n.as_bytes()))
            .collect();
        let _ = writeln!(out, "reserved {};", names.join(", "));
    }
    indent(out, level);
    out.push_str("}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::schema::{accept, base64_encode, ParsedSchema, SchemaForm};

    const RICH: &str = r#"
syntax = "proto3";
package demo.rich;
import "google/protobuf/timestamp.proto";
option java_package = "com.example.rich";
option optimize_for = CODE_SIZE;
option go_package = "example.com/rich;rich";

// A reading with most of what proto3 allows.
message Reading {
  message Inner { int32 x = 1; }
  string sensor = 1 [deprecated = true];
  map<string, Inner> by_name = 2;
  message AfterMap { bytes b = 1; }
  oneof value {
    double d = 3;
    string s = 4 [json_name = "textValue"];
  }
  optional int64 maybe = 5;
  repeated int32 packed_ints = 6 [packed = false];
  google.protobuf.Timestamp at = 7;
  map<int32, Unit> units = 8;
  Inner inner = 9;
  reserved 20, 30 to 40, 100 to max;
  reserved "old", "older";
  enum Unit {
    option allow_alias = true;
    UNIT_UNSPECIFIED = 0;
    UNIT_C = 1;
    UNIT_CELSIUS = 1 [deprecated = true];
    reserved 5 to 9;
    reserved "UNIT_K";
  }
}

enum Top { TOP_ZERO = 0; }

service Readings {
  rpc Get(Reading) returns (Reading);
  rpc Watch(stream Reading) returns (stream Reading) { option deprecated = true; }
}
"#;

    const PROTO2: &str = r#"
syntax = "proto2";
package demo.two;
message Old {
  required int32 id = 1;
  optional string name = 2 [default = "a \"quoted\"\n name"];
  optional bytes raw = 3 [default = "\001\377x"];
  optional double ratio = 4 [default = -inf];
  optional Kind kind = 5 [default = KIND_B];
  repeated int32 list = 6 [packed = true];
  extensions 100 to 199;
  enum Kind { KIND_A = 1; KIND_B = 2; }
}
extend Old { optional int32 extra = 100; }
message Holder {
  extend Old { optional string note = 101; }
}
"#;

    fn round_trip(text: &str) {
        let imports = BTreeMap::new();
        let parsed = ParsedSchema::parse(text, &imports).unwrap();
        let rendered = super::render(parsed.file()).unwrap();
        let again =
            ParsedSchema::parse(&rendered, &imports).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
        assert_eq!(
            again.canonical_key(),
            parsed.canonical_key(),
            "rendering changed the descriptor:\n{rendered}"
        );
        // The serialized form is accepted, stored as this rendering, and is
        // the same schema.
        let b64 = parsed.serialized_base64();
        let accepted = accept(&b64, &imports, false).unwrap();
        assert_eq!(accepted.form, SchemaForm::Serialized);
        assert_eq!(accepted.text, rendered);
        assert_eq!(accepted.parsed.canonical_key(), parsed.canonical_key());
        // Text stays as given unless normalized.
        let plain = accept(text, &imports, false).unwrap();
        assert_eq!(plain.form, SchemaForm::Text);
        assert_eq!(plain.text, text.trim());
        let normalized = accept(text, &imports, true).unwrap();
        assert_eq!(normalized.text, rendered);
        assert_eq!(normalized.parsed.canonical_key(), parsed.canonical_key());
    }

    #[test]
    fn proto3_features_survive_rendering() {
        round_trip(RICH);
        round_trip(vmr_proto::schemas::EVENT_PROTO);
    }

    #[test]
    fn proto2_features_survive_rendering() {
        round_trip(PROTO2);
    }

    #[test]
    fn custom_options_survive_rendering() {
        round_trip(
            r#"syntax = "proto3";
package c;
import "google/protobuf/descriptor.proto";
extend google.protobuf.FieldOptions { string tag = 50001; }
extend google.protobuf.MessageOptions { int32 level = 50002; }
message M {
  option (c.level) = 3;
  string s = 1 [(c.tag) = "x", deprecated = true];
}"#,
        );
    }

    #[test]
    fn map_entries_keep_their_place_among_nested_types() {
        let parsed = ParsedSchema::parse(RICH, &BTreeMap::new()).unwrap();
        let rendered = super::render(parsed.file()).unwrap();
        let again = ParsedSchema::parse(&rendered, &BTreeMap::new()).unwrap();
        let names = |p: &ParsedSchema| -> Vec<String> {
            p.file()
                .messages()
                .next()
                .unwrap()
                .child_messages()
                .map(|m| m.name().to_string())
                .collect()
        };
        assert_eq!(
            names(&parsed),
            ["Inner", "ByNameEntry", "AfterMap", "UnitsEntry"]
        );
        assert_eq!(names(&again), names(&parsed));
    }

    #[test]
    fn references_resolve_for_serialized_schemas() {
        let mut imports = BTreeMap::new();
        imports.insert(
            "demo/common.proto".to_string(),
            "syntax = \"proto3\"; package demo; message Location { double lat = 1; }".to_string(),
        );
        let text = "syntax = \"proto3\";\npackage demo;\nimport \"demo/common.proto\";\nmessage Place { Location where = 1; }";
        let parsed = ParsedSchema::parse(text, &imports).unwrap();
        let accepted = accept(&parsed.serialized_base64(), &imports, false).unwrap();
        assert!(accepted.text.contains("import \"demo/common.proto\";"));
        assert!(accepted.text.contains(".demo.Location where = 1;"));
        assert_eq!(accepted.parsed.canonical_key(), parsed.canonical_key());
        // Without the import, the descriptor is refused with the reason.
        let err = accept(&parsed.serialized_base64(), &BTreeMap::new(), false).unwrap_err();
        assert!(err.to_string().contains("demo/common.proto"), "{err}");
    }

    #[test]
    fn groups_and_bad_descriptors_are_refused() {
        let group =
            "syntax = \"proto2\"; message A { optional group G = 1 { optional int32 x = 2; } }";
        let parsed = ParsedSchema::parse(group, &BTreeMap::new()).unwrap();
        let err = accept(&parsed.serialized_base64(), &BTreeMap::new(), false).unwrap_err();
        assert!(err.to_string().contains("group"), "{err}");
        // Base64 that is not a descriptor, and a descriptor naming an unknown type.
        let junk = base64_encode(b"\x08");
        let err = accept(&junk, &BTreeMap::new(), false).unwrap_err();
        assert!(err.to_string().contains("FileDescriptorProto"), "{err}");
        let bad = prost_types::FileDescriptorProto {
            name: Some("x.proto".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("A".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("b".into()),
                    number: Some(1),
                    r#type: Some(prost_types::field_descriptor_proto::Type::Message as i32),
                    type_name: Some(".nope.B".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let b64 = base64_encode(&prost::Message::encode_to_vec(&bad));
        assert!(accept(&b64, &BTreeMap::new(), false).is_err());
    }

    #[test]
    fn quoting_escapes_what_protobuf_needs() {
        assert_eq!(super::quote(b"a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(super::quote(b"\x01\xff"), r#""\001\377""#);
        assert_eq!(super::default_json_name("foo_bar_baz"), "fooBarBaz");
    }
}
