//! The YAML / JSON form of Ferro objects: a user interface, not a protobuf dump.
//!
//! One descriptor-driven mapping, used for every kind, so the rules hold everywhere:
//! - field names are the schema's camelCase JSON names, matched exactly;
//! - integers are plain numbers (never quoted, never fractional);
//! - enum values are strings spelled exactly as in the schema (`Running`, `TCP`, `IPv4`),
//!   matched case-sensitively; the `*_UNSPECIFIED` zero value is never accepted;
//! - scalars declared `optional` keep their presence, so an explicit `dhcp: false` stays
//!   false while an omitted `dhcp` gets its default;
//! - timestamps are RFC 3339 strings;
//! - decoding is strict: an unknown or mistyped field is an error that names its path
//!   (`spec.networks[0].fixedIp`) and its line and column in the source.
//!
//! Encoding writes fields in schema order (`apiVersion`, `kind`, `metadata`, `spec`,
//! `status`), omits unset ones, and sorts map keys, so output is stable and diffable and
//! decodes back to the same object.

use std::fmt;

use prost_reflect::{
    DynamicMessage, EnumDescriptor, FieldDescriptor, Kind as FieldKind, MapKey, MessageDescriptor,
    ReflectMessage, Value as ProtoValue,
};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map as JsonMap, Value as Json};

use crate::kinds::{Kind, Object};

/// The `apiVersion` of every object in this schema.
pub const API_VERSION: &str = "ferro/v1";

/// A position in a YAML or JSON source, 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A field that could not be decoded: where it is and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FieldError {
    /// The field's path from the document's root: `spec.networks[0].fixedIp`.
    pub path: String,
    /// Why it was refused.
    pub reason: String,
    /// Where the field is in the source, when it came from one.
    pub position: Option<Position>,
}

/// Why a document could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The text is not valid YAML or JSON.
    #[error("{position}: {message}")]
    Syntax {
        /// Where the parser stopped.
        position: Position,
        /// The parser's message.
        message: String,
    },
    /// The text expands to more nodes than its size allows: an alias bomb.
    #[error("too many YAML nodes (more than {limit}); is this a YAML bomb?")]
    TooManyNodes {
        /// The most nodes the text was allowed.
        limit: usize,
    },
    /// The text parsed but a field does not fit the schema.
    #[error("{}{}{field}", field.position.map(|p| format!("{p}: ")).unwrap_or_default(), object.as_deref().map(|o| format!("{o}: ")).unwrap_or_default())]
    Field {
        /// `servers/web-1`, when the kind and name could be read.
        object: Option<String>,
        /// The bad field.
        field: FieldError,
    },
}

impl CodecError {
    /// Where in the source the error is, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            CodecError::Syntax { position, .. } => Some(*position),
            CodecError::Field { field, .. } => field.position,
            CodecError::TooManyNodes { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// A parsed YAML / JSON tree that remembers where each value came from.

/// A value of a parsed document with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The value.
    pub value: NodeValue,
    /// Where it starts in the source.
    pub position: Option<Position>,
}

/// The shapes a YAML / JSON value takes.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Int(i128),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A string.
    String(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order.
    Map(Vec<(String, Node)>),
}

impl NodeValue {
    fn describe(&self) -> &'static str {
        match self {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Int(_) => "an integer",
            NodeValue::Float(_) => "a number",
            NodeValue::String(_) => "a string",
            NodeValue::Seq(_) => "a list",
            NodeValue::Map(_) => "a mapping",
        }
    }
}

impl From<Json> for Node {
    fn from(json: Json) -> Self {
        let value = match json {
            Json::Null => NodeValue::Null,
            Json::Bool(b) => NodeValue::Bool(b),
            Json::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => NodeValue::Int(i.into()),
                (None, Some(u)) => NodeValue::Int(u.into()),
                _ => NodeValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => NodeValue::String(s),
            Json::Array(items) => NodeValue::Seq(items.into_iter().map(Node::from).collect()),
            Json::Object(map) => {
                NodeValue::Map(map.into_iter().map(|(k, v)| (k, Node::from(v))).collect())
            }
        };
        Node {
            value,
            position: None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<NodeValue>::deserialize(deserializer)?;
        let position = Position {
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as usize,
        };
        Ok(Node {
            value: spanned.value,
            position: Some(position),
        })
    }
}

impl<'de> Deserialize<'de> for NodeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = NodeValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_none<E>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<NodeValue, D::Error> {
        NodeValue::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<NodeValue, E> {
        Ok(NodeValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<NodeValue, E> {
        Ok(NodeValue::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<NodeValue, E> {
        Ok(NodeValue::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<NodeValue, E> {
        Ok(NodeValue::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<NodeValue, E> {
        i128::try_from(v)
            .map(NodeValue::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<NodeValue, E> {
        Ok(NodeValue::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NodeValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(NodeValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NodeValue, A::Error> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some(key) = map.next_key::<MapKeyText>()? {
            let value = map.next_value::<Node>()?;
            if entries.iter().any(|(k, _)| *k == key.0) {
                return Err(de::Error::custom(format!("duplicate key `{}`", key.0)));
            }
            entries.push((key.0, value));
        }
        Ok(NodeValue::Map(entries))
    }
}

/// A mapping key; YAML allows non-string keys, which we read as their text.
struct MapKeyText(String);

impl<'de> Deserialize<'de> for MapKeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = MapKeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<MapKeyText, E> {
                Ok(MapKeyText(v.to_owned()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<MapKeyText, E> {
                Ok(MapKeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<MapKeyText, E> {
                Ok(MapKeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<MapKeyText, E> {
                Ok(MapKeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<MapKeyText, E> {
                Ok(MapKeyText(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<MapKeyText, E> {
                Ok(MapKeyText("null".into()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// Nodes a text may hold whatever its size; beyond it, one node per byte of text.
const BASE_NODE_BUDGET: usize = 256;

/// How many YAML nodes (mappings, sequences, scalars) a text of this size may expand to.
///
/// Without aliases a node takes at least two bytes (`1,`), so one per byte never refuses
/// a real manifest however large; aliases may reuse what an anchor holds, but a text that
/// expands beyond its own size (a "billion laughs") is refused as soon as the count is
/// passed, before the expansion costs time or memory.
pub fn node_budget(text: &str) -> usize {
    BASE_NODE_BUDGET + text.len()
}

/// Parses every document of a YAML (or JSON) text. Empty documents are skipped.
pub fn parse_yaml(text: &str) -> Result<Vec<Node>, CodecError> {
    let limit = node_budget(text);
    let docs: Vec<Option<Node>> =
        serde_saphyr::from_multiple_with_options(text, yaml_options(limit)).map_err(|e| {
            if breaches_node_budget(&e) {
                CodecError::TooManyNodes { limit }
            } else {
                syntax_error(&e)
            }
        })?;
    Ok(docs
        .into_iter()
        .flatten()
        .filter(|n| !matches!(n.value, NodeValue::Null))
        .collect())
}

/// YAML 1.2 core schema, strictly: only `true`/`false` are booleans (a project named `no`
/// stays a string), `0755` stays a string, duplicate keys are errors.
fn yaml_options(max_nodes: usize) -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_nodes = max_nodes;
    // Replaying an alias inside another anchor records its events again: the same
    // exponential growth, bounded the same way.
    budget.max_recorded_anchor_events = max_nodes;
    // The default stops at 1,024 documents; a document costs at least its `---`, so the
    // text's size bounds them as it bounds nodes.
    budget.max_documents = max_nodes;
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.legacy_octal_numbers = false;
    options.leading_zero_numbers_as_strings = true;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options
}

/// Whether the parser stopped because the text expands to more nodes than allowed.
fn breaches_node_budget(mut e: &serde_saphyr::Error) -> bool {
    use serde_saphyr::budget::BudgetBreach;
    while let serde_saphyr::Error::WithSnippet { error, .. }
    | serde_saphyr::Error::AliasError { error, .. } = e
    {
        e = error;
    }
    matches!(
        e,
        serde_saphyr::Error::Budget {
            breach: BudgetBreach::Nodes { .. } | BudgetBreach::RecordedAnchorEvents { .. },
            ..
        }
    )
}

fn syntax_error(e: &serde_saphyr::Error) -> CodecError {
    let position = e
        .location()
        .map(|l| Position {
            line: l.line() as usize,
            column: l.column() as usize,
        })
        .unwrap_or_default();
    // The library's message may carry its own "at line X column Y" suffix and snippet;
    // keep the first line, without it, since we print the position ourselves.
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let mut message = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    // Some messages lead with "error: line L column C: " instead.
    message = message.strip_prefix("error: ").unwrap_or(message);
    if let Some(rest) = message.strip_prefix("line ")
        && let Some((position, text)) = rest.split_once(": ")
        && position
            .split(" column ")
            .all(|n| n.parse::<usize>().is_ok())
    {
        message = text;
    }
    let message = message.to_owned();
    CodecError::Syntax { position, message }
}

// ---------------------------------------------------------------------------------------
// Decoding: tree → message.

/// Decodes one document into an object of the kind its `kind` field names.
pub fn decode_object(node: &Node) -> Result<Object, CodecError> {
    let NodeValue::Map(entries) = &node.value else {
        return Err(field_error(
            None,
            "",
            format!("expected a mapping, found {}", node.value.describe()),
            node,
        ));
    };
    let get = |name: &str| entries.iter().find(|(k, _)| k == name).map(|(_, v)| v);

    let kind_node = get("kind").ok_or_else(|| field_error(None, "kind", "required", node))?;
    let NodeValue::String(kind_name) = &kind_node.value else {
        return Err(field_error(None, "kind", "expected a string", kind_node));
    };
    let kind = Kind::from_kind_name(kind_name).ok_or_else(|| {
        field_error(
            None,
            "kind",
            format!(
                "unknown kind `{kind_name}`; known kinds: {}",
                Kind::names().join(", ")
            ),
            kind_node,
        )
    })?;
    let object_name = get("metadata")
        .and_then(|m| match &m.value {
            NodeValue::Map(e) => e.iter().find(|(k, _)| k == "name").map(|(_, v)| v),
            _ => None,
        })
        .and_then(|n| match &n.value {
            NodeValue::String(s) => Some(format!("{}/{s}", kind.plural())),
            _ => None,
        });

    match get("apiVersion") {
        None => {
            return Err(field_error(
                object_name,
                "apiVersion",
                format!("required: `{API_VERSION}`"),
                node,
            ));
        }
        Some(v) if v.value != NodeValue::String(API_VERSION.into()) => {
            return Err(field_error(
                object_name,
                "apiVersion",
                format!("must be `{API_VERSION}`"),
                v,
            ));
        }
        Some(_) => {}
    }

    let rest: Vec<(String, Node)> = entries
        .iter()
        .filter(|(k, _)| k != "kind" && k != "apiVersion")
        .cloned()
        .collect();
    let body = Node {
        value: NodeValue::Map(rest),
        position: node.position,
    };
    let message =
        decode_message(&kind.descriptor(), &body, &mut Path::default()).map_err(|field| {
            CodecError::Field {
                object: object_name,
                field,
            }
        })?;
    Object::from_dynamic(kind, &message).map_err(|e| CodecError::Field {
        object: None,
        field: FieldError {
            path: String::new(),
            reason: e,
            position: node.position,
        },
    })
}

/// Parses and decodes every document of a YAML (or JSON) text.
pub fn decode_yaml(text: &str) -> Result<Vec<Object>, CodecError> {
    parse_yaml(text)?.iter().map(decode_object).collect()
}

/// Decodes a tree into a message of the given type, strictly.
pub fn decode_message(
    desc: &MessageDescriptor,
    node: &Node,
    path: &mut Path,
) -> Result<DynamicMessage, FieldError> {
    if desc.full_name() == "google.protobuf.Timestamp" {
        return decode_timestamp(desc, node, path);
    }
    let NodeValue::Map(entries) = &node.value else {
        return Err(path.error(
            format!("expected a mapping, found {}", node.value.describe()),
            node,
        ));
    };
    let mut message = DynamicMessage::new(desc.clone());
    for (key, value) in entries {
        let Some(field) = desc.get_field_by_json_name(key) else {
            path.push_field(key);
            let err = path.error(unknown_field_reason(desc, key), value);
            path.pop();
            return Err(err);
        };
        path.push_field(key);
        if !matches!(value.value, NodeValue::Null) {
            let decoded = decode_field(&field, value, path)?;
            message.set_field(&field, decoded);
        }
        path.pop();
    }
    Ok(message)
}

fn unknown_field_reason(desc: &MessageDescriptor, key: &str) -> String {
    let names: Vec<String> = desc.fields().map(|f| f.json_name().to_owned()).collect();
    if let Some(field) = desc.get_field_by_name(key).filter(|f| f.json_name() != key) {
        return format!("unknown field; did you mean `{}`?", field.json_name());
    }
    let lower = key.to_ascii_lowercase();
    if let Some(close) = names
        .iter()
        .find(|n| n.to_ascii_lowercase() == lower || edit_distance(n, key) <= 2)
    {
        return format!("unknown field; did you mean `{close}`?");
    }
    if names.is_empty() {
        "unknown field; this object takes no fields".to_owned()
    } else {
        format!("unknown field; expected one of: {}", names.join(", "))
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn decode_field(
    field: &FieldDescriptor,
    node: &Node,
    path: &mut Path,
) -> Result<ProtoValue, FieldError> {
    if field.is_map() {
        let FieldKind::Message(entry) = field.kind() else {
            unreachable!("a map field's kind is its entry message")
        };
        let NodeValue::Map(entries) = &node.value else {
            return Err(path.error(
                format!("expected a mapping, found {}", node.value.describe()),
                node,
            ));
        };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let mut map = std::collections::HashMap::new();
        for (key, value) in entries {
            path.push_key(key);
            let map_key = match key_field.kind() {
                FieldKind::String => MapKey::String(key.clone()),
                _ => return Err(path.error("only string map keys are supported", value)),
            };
            let decoded = decode_single(&value_field.kind(), value, path)?;
            map.insert(map_key, decoded);
            path.pop();
        }
        return Ok(ProtoValue::Map(map));
    }
    if field.is_list() {
        let NodeValue::Seq(items) = &node.value else {
            return Err(path.error(
                format!("expected a list, found {}", node.value.describe()),
                node,
            ));
        };
        let mut list = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            path.push_index(i);
            if matches!(item.value, NodeValue::Null) {
                return Err(path.error("list items cannot be null", item));
            }
            list.push(decode_single(&field.kind(), item, path)?);
            path.pop();
        }
        return Ok(ProtoValue::List(list));
    }
    decode_single(&field.kind(), node, path)
}

fn decode_single(kind: &FieldKind, node: &Node, path: &mut Path) -> Result<ProtoValue, FieldError> {
    let int = |min: i128, max: i128| -> Result<i128, FieldError> {
        match node.value {
            NodeValue::Int(i) if (min..=max).contains(&i) => Ok(i),
            NodeValue::Int(i) => {
                Err(path.error(format!("{i} is out of range ({min} to {max})"), node))
            }
            _ => Err(path.error(
                format!("expected an integer, found {}", node.value.describe()),
                node,
            )),
        }
    };
    Ok(match kind {
        FieldKind::Bool => match node.value {
            NodeValue::Bool(b) => ProtoValue::Bool(b),
            _ => {
                return Err(path.error(
                    format!("expected true or false, found {}", node.value.describe()),
                    node,
                ));
            }
        },
        FieldKind::String => match &node.value {
            NodeValue::String(s) => ProtoValue::String(s.clone()),
            NodeValue::Bool(_) | NodeValue::Int(_) | NodeValue::Float(_) => {
                let found = node.value.describe();
                return Err(path.error(
                    format!("expected a string, found {found} (quote it to make it a string)"),
                    node,
                ));
            }
            _ => {
                return Err(path.error(
                    format!("expected a string, found {}", node.value.describe()),
                    node,
                ));
            }
        },
        FieldKind::Int32 | FieldKind::Sint32 | FieldKind::Sfixed32 => {
            ProtoValue::I32(int(i32::MIN.into(), i32::MAX.into())? as i32)
        }
        FieldKind::Int64 | FieldKind::Sint64 | FieldKind::Sfixed64 => {
            ProtoValue::I64(int(i64::MIN.into(), i64::MAX.into())? as i64)
        }
        FieldKind::Uint32 | FieldKind::Fixed32 => ProtoValue::U32(int(0, u32::MAX.into())? as u32),
        FieldKind::Uint64 | FieldKind::Fixed64 => ProtoValue::U64(int(0, u64::MAX.into())? as u64),
        FieldKind::Float | FieldKind::Double => {
            let f = match node.value {
                NodeValue::Int(i) => i as f64,
                NodeValue::Float(f) => f,
                _ => {
                    return Err(path.error(
                        format!("expected a number, found {}", node.value.describe()),
                        node,
                    ));
                }
            };
            if matches!(kind, FieldKind::Float) {
                ProtoValue::F32(f as f32)
            } else {
                ProtoValue::F64(f)
            }
        }
        FieldKind::Bytes => {
            return Err(path.error("binary fields cannot be written in YAML", node));
        }
        FieldKind::Enum(desc) => ProtoValue::EnumNumber(decode_enum(desc, node, path)?),
        FieldKind::Message(desc) => ProtoValue::Message(decode_message(desc, node, path)?),
    })
}

fn decode_enum(desc: &EnumDescriptor, node: &Node, path: &mut Path) -> Result<i32, FieldError> {
    let allowed = || enum_names(desc).join(", ");
    let NodeValue::String(name) = &node.value else {
        return Err(path.error(
            format!(
                "expected one of {}, found {}",
                allowed(),
                node.value.describe()
            ),
            node,
        ));
    };
    match desc.get_value_by_name(name) {
        Some(v) if v.number() != 0 => Ok(v.number()),
        _ => {
            let hint = enum_names(desc)
                .into_iter()
                .find(|n| n.eq_ignore_ascii_case(name))
                .map(|n| format!(" (spelled `{n}`)"))
                .unwrap_or_default();
            Err(path.error(format!("`{name}` is not one of {}{hint}", allowed()), node))
        }
    }
}

/// The values a user may write for an enum, in schema order.
pub fn enum_names(desc: &EnumDescriptor) -> Vec<String> {
    desc.values()
        .filter(|v| v.number() != 0)
        .map(|v| v.name().to_owned())
        .collect()
}

fn decode_timestamp(
    desc: &MessageDescriptor,
    node: &Node,
    path: &mut Path,
) -> Result<DynamicMessage, FieldError> {
    let NodeValue::String(text) = &node.value else {
        return Err(path.error(
            format!(
                "expected an RFC 3339 timestamp string, found {}",
                node.value.describe()
            ),
            node,
        ));
    };
    let ts: jiff::Timestamp = text.parse().map_err(|_| {
        path.error(
            format!("`{text}` is not an RFC 3339 timestamp (e.g. 2026-01-02T15:04:05Z)"),
            node,
        )
    })?;
    let mut message = DynamicMessage::new(desc.clone());
    message.set_field_by_name("seconds", ProtoValue::I64(ts.as_second()));
    message.set_field_by_name("nanos", ProtoValue::I32(ts.subsec_nanosecond()));
    Ok(message)
}

/// The path of the field being decoded, for error messages.
#[derive(Clone, Debug, Default)]
pub struct Path(Vec<Segment>);

#[derive(Clone, Debug)]
enum Segment {
    Field(String),
    Index(usize),
    Key(String),
}

impl Path {
    fn push_field(&mut self, name: &str) {
        self.0.push(Segment::Field(name.to_owned()));
    }
    fn push_index(&mut self, i: usize) {
        self.0.push(Segment::Index(i));
    }
    fn push_key(&mut self, key: &str) {
        self.0.push(Segment::Key(key.to_owned()));
    }
    fn pop(&mut self) {
        self.0.pop();
    }
    fn error(&self, reason: impl Into<String>, node: &Node) -> FieldError {
        FieldError {
            path: self.to_string(),
            reason: reason.into(),
            position: node.position,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Field(name) if i == 0 => write!(f, "{name}")?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
                Segment::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

fn field_error(
    object: Option<String>,
    path: &str,
    reason: impl Into<String>,
    node: &Node,
) -> CodecError {
    CodecError::Field {
        object,
        field: FieldError {
            path: path.to_owned(),
            reason: reason.into(),
            position: node.position,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Encoding: message → JSON value → YAML / JSON text.

/// Encodes an object as a JSON value with `apiVersion` and `kind` first.
pub fn encode_object(object: &Object) -> Json {
    let message = object.to_dynamic();
    let mut map = JsonMap::new();
    map.insert("apiVersion".into(), Json::String(API_VERSION.into()));
    map.insert("kind".into(), Json::String(object.kind().name().into()));
    if let Json::Object(body) = encode_message(&message) {
        map.extend(body);
    }
    Json::Object(map)
}

/// Encodes any message of the schema as a JSON value, omitting unset fields.
pub fn encode_message(message: &DynamicMessage) -> Json {
    let desc = message.descriptor();
    if desc.full_name() == "google.protobuf.Timestamp" {
        return encode_timestamp(message);
    }
    let mut map = JsonMap::new();
    for field in desc.fields() {
        if !message.has_field(&field) {
            continue;
        }
        let value = message.get_field(&field);
        if let Some(json) = encode_field(&field, &value) {
            map.insert(field.json_name().to_owned(), json);
        }
    }
    Json::Object(map)
}

fn encode_field(field: &FieldDescriptor, value: &ProtoValue) -> Option<Json> {
    match value {
        ProtoValue::List(items) if items.is_empty() => None,
        ProtoValue::Map(entries) if entries.is_empty() => None,
        ProtoValue::List(items) => Some(Json::Array(
            items
                .iter()
                .filter_map(|v| encode_single(&field.kind(), v))
                .collect(),
        )),
        ProtoValue::Map(entries) => {
            let FieldKind::Message(entry) = field.kind() else {
                return None;
            };
            let value_kind = entry.map_entry_value_field().kind();
            let mut sorted: Vec<(String, &ProtoValue)> =
                entries.iter().map(|(k, v)| (map_key_text(k), v)).collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut map = JsonMap::new();
            for (k, v) in sorted {
                if let Some(json) = encode_single(&value_kind, v) {
                    map.insert(k, json);
                }
            }
            Some(Json::Object(map))
        }
        single => encode_single(&field.kind(), single),
    }
}

fn map_key_text(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(i) => i.to_string(),
        MapKey::I64(i) => i.to_string(),
        MapKey::U32(i) => i.to_string(),
        MapKey::U64(i) => i.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

fn encode_single(kind: &FieldKind, value: &ProtoValue) -> Option<Json> {
    Some(match value {
        ProtoValue::Bool(b) => Json::Bool(*b),
        ProtoValue::I32(i) => Json::from(*i),
        ProtoValue::I64(i) => Json::from(*i),
        ProtoValue::U32(i) => Json::from(*i),
        ProtoValue::U64(i) => Json::from(*i),
        ProtoValue::F32(f) => Json::from(f64::from(*f)),
        ProtoValue::F64(f) => Json::from(*f),
        ProtoValue::String(s) => Json::String(s.clone()),
        ProtoValue::Bytes(_) => return None,
        ProtoValue::EnumNumber(n) => {
            let FieldKind::Enum(desc) = kind else {
                return None;
            };
            // The zero value means "unset" and has no spelling users may write.
            if *n == 0 {
                return None;
            }
            match desc.get_value(*n) {
                Some(v) => Json::String(v.name().to_owned()),
                None => Json::from(*n),
            }
        }
        ProtoValue::Message(m) => encode_message(m),
        ProtoValue::List(_) | ProtoValue::Map(_) => return None,
    })
}

fn encode_timestamp(message: &DynamicMessage) -> Json {
    let seconds = message
        .get_field_by_name("seconds")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let nanos = message
        .get_field_by_name("nanos")
        .and_then(|v| v.as_i32())
        .unwrap_or(0);
    match jiff::Timestamp::new(seconds, nanos) {
        Ok(ts) => Json::String(ts.to_string()),
        Err(_) => Json::Null,
    }
}

/// Renders objects as YAML documents separated by `---`.
pub fn to_yaml(objects: &[Object]) -> String {
    let mut out = String::new();
    for (i, object) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&json_to_yaml(&encode_object(object)));
    }
    out
}

/// Renders a JSON value as YAML.
pub fn json_to_yaml(value: &Json) -> String {
    serde_saphyr::to_string(value).unwrap_or_else(|e| format!("# cannot render as YAML: {e}\n"))
}

/// Renders an object as pretty JSON.
pub fn to_json(object: &Object) -> String {
    serde_json::to_string_pretty(&encode_object(object)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
