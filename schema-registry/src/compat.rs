//! Compatibility levels and the protobuf compatibility rules.
//!
//! The rules follow Confluent's protobuf checker: the old and new schemas are
//! compared message by message (by fully-qualified name) and field by field
//! (by field number), and each difference is either compatible or not.
//!
//! Incompatible differences:
//! - the package changed;
//! - a message was removed;
//! - a field's kind changed between scalar, enum and message;
//! - a scalar field's type changed outside its wire-compatible group
//!   (`int32 uint32 int64 uint64 bool`, `sint32 sint64`, `fixed32 sfixed32`,
//!   `fixed64 sfixed64`, `string bytes`; `float` and `double` alone);
//! - a message- or enum-typed field now names another type;
//! - a `required` field was added or removed, or a field became `required`;
//! - a field changed between singular and `repeated`, unless it is a string,
//!   bytes or message field (length-delimited either way);
//! - a field was removed from a oneof, an existing field moved into a oneof
//!   that already existed, or several existing fields moved into a new oneof;
//! - a field kept its name but changed its number (stricter than Confluent,
//!   which sees a removal plus an addition).
//!
//! Compatible: adding or removing (non-required, non-oneof) fields, renaming
//! fields, adding messages and enums, any change to enum values.

use std::collections::HashSet;

use protox::prost_reflect::{Cardinality, FieldDescriptor, Kind, MessageDescriptor};
use serde::{Deserialize, Serialize};

use crate::schema::ParsedSchema;

/// Errors parsing a compatibility level.
#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    /// The level is not one of Confluent's.
    #[error("invalid compatibility level {0:?}")]
    InvalidLevel(String),
}

/// A subject's (or the registry's) compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityLevel {
    /// No checks.
    None,
    /// The new schema reads data written with the latest one.
    Backward,
    /// The new schema reads data written with every earlier one.
    BackwardTransitive,
    /// The latest schema reads data written with the new one.
    Forward,
    /// Every earlier schema reads data written with the new one.
    ForwardTransitive,
    /// Backward and forward against the latest.
    Full,
    /// Backward and forward against every earlier schema.
    FullTransitive,
}

impl CompatibilityLevel {
    /// The registry's default.
    pub const DEFAULT: Self = Self::Backward;

    /// Parses a level name (as in `{"compatibility": "BACKWARD"}`).
    pub fn parse(s: &str) -> Result<Self, CompatError> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_uppercase()))
            .map_err(|_| CompatError::InvalidLevel(s.to_string()))
    }

    /// The level's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }
}

/// Checks `new` against the existing versions (`previous`, oldest first) at
/// `level`. Returns the incompatibilities found; empty means compatible.
pub fn check(
    level: CompatibilityLevel,
    new: &ParsedSchema,
    previous: &[&ParsedSchema],
) -> Vec<String> {
    use CompatibilityLevel as L;
    let against: &[&ParsedSchema] = if level.transitive() {
        previous
    } else {
        previous.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let (backward, forward) = match level {
        L::None => (false, false),
        L::Backward | L::BackwardTransitive => (true, false),
        L::Forward | L::ForwardTransitive => (false, true),
        L::Full | L::FullTransitive => (true, true),
    };
    let mut out = Vec::new();
    for old in against {
        if backward {
            out.extend(diff(old, new).into_iter().map(|m| format!("backward: {m}")));
        }
        if forward {
            out.extend(diff(new, old).into_iter().map(|m| format!("forward: {m}")));
        }
    }
    out
}

/// The incompatible differences going from `original` to `update`.
pub fn diff(original: &ParsedSchema, update: &ParsedSchema) -> Vec<String> {
    let mut out = Vec::new();
    let (of, uf) = (original.file(), update.file());
    if of.package_name() != uf.package_name() {
        out.push(format!(
            "package changed from {:?} to {:?}",
            of.package_name(),
            uf.package_name()
        ));
    }
    let mut stack: Vec<MessageDescriptor> = of.messages().collect();
    while let Some(om) = stack.pop() {
        stack.extend(om.child_messages());
        if om.is_map_entry() {
            continue;
        }
        match update.pool().get_message_by_name(om.full_name()) {
            Some(um) => diff_message(&om, &um, &mut out),
            None => out.push(format!("message {} was removed", om.full_name())),
        }
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Shape {
    Scalar(&'static str, u8),
    Enum(String),
    Message(String),
}

fn shape(f: &FieldDescriptor) -> Shape {
    // Wire-compatible groups: 0 varint, 1 zigzag, 2 fixed32, 3 fixed64,
    // 4 length-delimited, 5 float, 6 double.
    match f.kind() {
        Kind::Int32 => Shape::Scalar("int32", 0),
        Kind::Uint32 => Shape::Scalar("uint32", 0),
        Kind::Int64 => Shape::Scalar("int64", 0),
        Kind::Uint64 => Shape::Scalar("uint64", 0),
        Kind::Bool => Shape::Scalar("bool", 0),
        Kind::Sint32 => Shape::Scalar("sint32", 1),
        Kind::Sint64 => Shape::Scalar("sint64", 1),
        Kind::Fixed32 => Shape::Scalar("fixed32", 2),
        Kind::Sfixed32 => Shape::Scalar("sfixed32", 2),
        Kind::Fixed64 => Shape::Scalar("fixed64", 3),
        Kind::Sfixed64 => Shape::Scalar("sfixed64", 3),
        Kind::String => Shape::Scalar("string", 4),
        Kind::Bytes => Shape::Scalar("bytes", 4),
        Kind::Float => Shape::Scalar("float", 5),
        Kind::Double => Shape::Scalar("double", 6),
        Kind::Enum(e) => Shape::Enum(e.full_name().to_string()),
        Kind::Message(m) => Shape::Message(m.full_name().to_string()),
    }
}

fn real_oneof(f: &FieldDescriptor) -> Option<String> {
    f.containing_oneof()
        .filter(|o| !o.is_synthetic())
        .map(|o| o.name().to_string())
}

fn length_delimited(s: &Shape) -> bool {
    matches!(s, Shape::Scalar(_, 4) | Shape::Message(_))
}

fn diff_message(o: &MessageDescriptor, u: &MessageDescriptor, out: &mut Vec<String>) {
    let m = o.full_name();
    for of in o.fields() {
        let Some(uf) = u.get_field(of.number()) else {
            if of.cardinality() == Cardinality::Required {
                out.push(format!("{m}: required field {} was removed", of.name()));
            }
            if let Some(oneof) = real_oneof(&of) {
                out.push(format!(
                    "{m}: field {} was removed from oneof {oneof}",
                    of.name()
                ));
            }
            if let Some(renamed) = u.get_field_by_name(of.name()) {
                out.push(format!(
                    "{m}: field {} changed number from {} to {}",
                    of.name(),
                    of.number(),
                    renamed.number()
                ));
            }
            continue;
        };
        let name = of.name();
        let (os, us) = (shape(&of), shape(&uf));
        match (&os, &us) {
            (Shape::Scalar(a, ga), Shape::Scalar(b, gb)) => {
                if ga != gb {
                    out.push(format!("{m}: field {name} changed type from {a} to {b}"));
                }
            }
            (Shape::Enum(a), Shape::Enum(b)) | (Shape::Message(a), Shape::Message(b)) => {
                if a != b {
                    out.push(format!("{m}: field {name} changed type from {a} to {b}"));
                }
            }
            _ => out.push(format!(
                "{m}: field {name} changed kind from {} to {}",
                kind_name(&os),
                kind_name(&us)
            )),
        }
        let (oc, uc) = (of.cardinality(), uf.cardinality());
        if oc != Cardinality::Required && uc == Cardinality::Required {
            out.push(format!("{m}: field {name} became required"));
        }
        let (ol, ul) = (oc == Cardinality::Repeated, uc == Cardinality::Repeated);
        if ol != ul && !(length_delimited(&os) && length_delimited(&us)) {
            out.push(format!(
                "{m}: field {name} changed between singular and repeated"
            ));
        }
        if let (Some(oo), None) = (real_oneof(&of), real_oneof(&uf)) {
            out.push(format!("{m}: field {name} was removed from oneof {oo}"));
        }
    }
    for f in u.fields() {
        if f.cardinality() == Cardinality::Required && o.get_field(f.number()).is_none() {
            out.push(format!("{m}: required field {} was added", f.name()));
        }
    }
    // Existing fields moving into oneofs.
    let old_oneofs: HashSet<String> = o
        .oneofs()
        .filter(|x| !x.is_synthetic())
        .map(|x| x.name().to_string())
        .collect();
    for uo in u.oneofs().filter(|x| !x.is_synthetic()) {
        let moved: Vec<String> = uo
            .fields()
            .filter_map(|uf| o.get_field(uf.number()))
            .filter(|of| real_oneof(of).is_none())
            .map(|of| of.name().to_string())
            .collect();
        if moved.is_empty() {
            continue;
        }
        if old_oneofs.contains(uo.name()) {
            out.push(format!(
                "{m}: field(s) {} moved into existing oneof {}",
                moved.join(", "),
                uo.name()
            ));
        } else if moved.len() > 1 {
            out.push(format!(
                "{m}: fields {} moved into new oneof {}",
                moved.join(", "),
                uo.name()
            ));
        }
    }
}

fn kind_name(s: &Shape) -> String {
    match s {
        Shape::Scalar(n, _) => (*n).to_string(),
        Shape::Enum(n) => format!("enum {n}"),
        Shape::Message(n) => format!("message {n}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn p(src: &str) -> ParsedSchema {
        ParsedSchema::parse(src, &BTreeMap::new()).unwrap()
    }

    const BASE: &str = r#"syntax = "proto3"; package t;
        message A { string s = 1; int32 n = 2; B b = 3; E e = 4; repeated string tags = 5;
                    oneof o { string x = 6; int64 y = 7; } int32 loose1 = 8; int32 loose2 = 9; }
        message B { bytes data = 1; }
        enum E { E_ZERO = 0; E_ONE = 1; }"#;

    fn backward(new: &str) -> Vec<String> {
        check(CompatibilityLevel::Backward, &p(new), &[&p(BASE)])
    }

    #[test]
    fn compatible_changes_pass() {
        for new in [
            BASE.to_string(),
            // Added field, renamed field, added message and enum value.
            BASE.replace("string s = 1;", "string renamed = 1; string extra = 20;")
                .replace("E_ONE = 1;", "E_ONE = 1; E_TWO = 2;")
                + " message Z {}",
            // Removed plain field; int32 -> int64 and bool (same wire group).
            BASE.replace("int32 n = 2;", "")
                .replace("int32 loose1 = 8;", "int64 loose1 = 8;")
                .replace("int32 loose2 = 9;", "bool loose2 = 9;"),
            // string <-> bytes; singular <-> repeated for length-delimited.
            BASE.replace("string s = 1;", "repeated bytes s = 1;"),
            // A single existing field moving into a new oneof.
            BASE.replace("int32 loose1 = 8;", "oneof p { int32 loose1 = 8; }"),
        ] {
            assert_eq!(backward(&new), Vec::<String>::new(), "{new}");
        }
    }

    #[test]
    fn incompatible_changes_are_reported() {
        let cases = [
            (BASE.replace("package t;", "package u;"), "package changed"),
            (
                BASE.replace(
                    "message B { bytes data = 1; }",
                    "message C { bytes data = 1; }",
                )
                .replace("B b = 3;", "C b = 3;"),
                "message t.B was removed",
            ),
            (
                BASE.replace("string s = 1;", "int32 s = 1;"),
                "changed type from string to int32",
            ),
            (
                BASE.replace("int32 n = 2;", "sint32 n = 2;"),
                "changed type from int32 to sint32",
            ),
            (
                BASE.replace("int32 n = 2;", "double n = 2;"),
                "changed type",
            ),
            (BASE.replace("B b = 3;", "string b = 3;"), "changed kind"),
            (BASE.replace("E e = 4;", "int32 e = 4;"), "changed kind"),
            (
                BASE.replace("B b = 3;", "A b = 3;"),
                "changed type from t.B to t.A",
            ),
            (
                BASE.replace("int32 n = 2;", "repeated int32 n = 2;"),
                "singular and repeated",
            ),
            (
                BASE.replace(
                    "oneof o { string x = 6; int64 y = 7; }",
                    "oneof o { string x = 6; }",
                ),
                "removed from oneof o",
            ),
            (
                BASE.replace(
                    "oneof o { string x = 6; int64 y = 7; }",
                    "string x = 6; int64 y = 7;",
                ),
                "removed from oneof o",
            ),
            (
                BASE.replace("int32 loose1 = 8;", "")
                    .replace("oneof o {", "oneof o { int32 loose1 = 8;"),
                "moved into existing oneof o",
            ),
            (
                BASE.replace(
                    "int32 loose1 = 8; int32 loose2 = 9;",
                    "oneof p { int32 loose1 = 8; int32 loose2 = 9; }",
                ),
                "moved into new oneof p",
            ),
            (
                BASE.replace("int32 n = 2;", "int32 n = 22;"),
                "changed number from 2 to 22",
            ),
        ];
        for (new, want) in cases {
            let got = backward(&new);
            assert!(
                got.iter().any(|m| m.contains(want)),
                "{want}: got {got:?} for {new}"
            );
        }
    }

    #[test]
    fn required_fields_proto2() {
        let old =
            p("syntax = \"proto2\"; message A { required int32 a = 1; optional int32 b = 2; }");
        let added = p("syntax = \"proto2\"; message A { required int32 a = 1; optional int32 b = 2; required int32 c = 3; }");
        let removed = p("syntax = \"proto2\"; message A { optional int32 b = 2; }");
        let became =
            p("syntax = \"proto2\"; message A { required int32 a = 1; required int32 b = 2; }");
        let l = CompatibilityLevel::Backward;
        assert!(check(l, &added, &[&old])[0].contains("required field c was added"));
        assert!(check(l, &removed, &[&old])[0].contains("required field a was removed"));
        assert!(check(l, &became, &[&old])[0].contains("field b became required"));
    }

    #[test]
    fn levels_choose_direction_and_depth() {
        let v1 = p("syntax = \"proto3\"; message A { string s = 1; } message Gone {}");
        let v2 = p("syntax = \"proto3\"; message A { string s = 1; }");
        let v3 = p("syntax = \"proto3\"; message A { string s = 1; int32 n = 2; }");
        use CompatibilityLevel as L;
        // v3 against v2 only: fine backward; transitive sees v1's removed message.
        assert!(check(L::Backward, &v3, &[&v1, &v2]).is_empty());
        assert!(!check(L::BackwardTransitive, &v3, &[&v1, &v2]).is_empty());
        // Forward compares the other way round: registering v2 after v1
        // (dropping a message) is fine; registering v1 after v2 is not.
        assert!(check(L::Forward, &v2, &[&v1]).is_empty());
        assert!(!check(L::Forward, &v1, &[&v2]).is_empty());
        assert!(!check(L::Backward, &v2, &[&v1]).is_empty());
        assert!(!check(L::Full, &v2, &[&v1]).is_empty());
        assert!(check(L::None, &v2, &[&v1]).is_empty());
        assert!(check(L::Backward, &v2, &[]).is_empty());
    }

    #[test]
    fn level_names_round_trip() {
        for l in [
            "NONE",
            "BACKWARD",
            "backward_transitive",
            "FORWARD",
            "FULL",
            "FULL_TRANSITIVE",
        ] {
            let parsed = CompatibilityLevel::parse(l).unwrap();
            assert_eq!(parsed.as_str(), l.to_ascii_uppercase());
        }
        assert!(CompatibilityLevel::parse("SIDEWAYS").is_err());
    }
}
