//! `ferro explain KIND[.FIELD.PATH]`: what a kind or a field means, read from the comments
//! of the schema (`api/proto/ferro/v1/`), with its type as YAML writes it and, for an
//! object, its fields; for an enum, the values exactly as they are spelled.
//!
//! Paths use the JSON (camelCase) names of manifests: `ferro explain server.spec.networks`.

use anyhow::anyhow;
use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind as FieldKind, MessageDescriptor};

use super::parse_kind;

/// Arguments of `ferro explain`.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// A kind, optionally followed by a field path: `server`, `server.spec.networks`.
    #[arg(value_name = "KIND[.FIELD.PATH]")]
    pub path: String,
}

/// Runs `ferro explain`.
pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    print!("{}", explain(&args.path)?);
    Ok(())
}

/// The text `ferro explain PATH` prints.
pub fn explain(path: &str) -> anyhow::Result<String> {
    let mut parts = path.split('.');
    let kind = parse_kind(parts.next().unwrap_or_default())?;
    let mut message = kind.descriptor();
    let mut walked = Vec::new();
    let mut field: Option<FieldDescriptor> = None;
    for part in parts {
        if let Some(previous) = &field {
            message = match element_message(previous) {
                Some(m) => m,
                None => {
                    return Err(anyhow!(
                        "{}.{} has no field `{part}`: it is {}",
                        kind.name().to_ascii_lowercase(),
                        walked.join("."),
                        type_name(previous)
                    ));
                }
            };
        }
        let found = message
            .fields()
            .find(|f| f.json_name() == part || f.name() == part)
            .ok_or_else(|| {
                let names: Vec<String> =
                    message.fields().map(|f| f.json_name().to_owned()).collect();
                let place = if walked.is_empty() {
                    kind.name().to_owned()
                } else {
                    walked.join(".")
                };
                anyhow!(
                    "{place} has no field `{part}`; its fields: {}",
                    names.join(", ")
                )
            })?;
        walked.push(found.json_name().to_owned());
        field = Some(found);
    }

    let mut out = format!("KIND:        {}\n", kind.name());
    let (description, object, enumeration) = match &field {
        None => {
            out.push_str(&format!("SCOPE:       {:?}\n", kind.scope()));
            (
                comment(&message.parent_file(), message.path()),
                Some(message),
                None,
            )
        }
        Some(field) => {
            out.push_str(&format!("FIELD:       {}\n", walked.join(".")));
            out.push_str(&format!("TYPE:        {}\n", type_name(field)));
            let enumeration = match element_kind(field) {
                FieldKind::Enum(e) => Some(e),
                _ => None,
            };
            (
                comment(&field.parent_file(), field.path()),
                element_message(field),
                enumeration,
            )
        }
    };
    out.push_str("\nDESCRIPTION:\n");
    out.push_str(&indent(if description.is_empty() {
        "(undocumented)"
    } else {
        &description
    }));
    if let Some(enumeration) = enumeration {
        out.push_str("\nVALUES:\n");
        let rows: Vec<Vec<String>> = enumeration
            .values()
            .filter(|v| v.number() != 0)
            .map(|v| {
                let doc = comment(&enumeration.parent_file(), v.path());
                vec![v.name().to_owned(), first_sentence(&doc)]
            })
            .collect();
        out.push_str(&columns(&rows));
    }
    if let Some(object) = object.filter(|m| m.full_name() != "google.protobuf.Timestamp")
        && object.fields().len() > 0
    {
        out.push_str("\nFIELDS:\n");
        let rows: Vec<Vec<String>> = object
            .fields()
            .map(|f| {
                let doc = comment(&f.parent_file(), f.path());
                vec![
                    f.json_name().to_owned(),
                    type_name(&f),
                    first_sentence(&doc),
                ]
            })
            .collect();
        out.push_str(&columns(&rows));
    }
    Ok(out)
}

/// The kind of a field's elements: the value of a map, the item of a list.
fn element_kind(field: &FieldDescriptor) -> FieldKind {
    match field.kind() {
        FieldKind::Message(entry) if field.is_map() => entry.map_entry_value_field().kind(),
        kind => kind,
    }
}

/// The message a path can descend into from this field, if any.
fn element_message(field: &FieldDescriptor) -> Option<MessageDescriptor> {
    match element_kind(field) {
        FieldKind::Message(m) if m.full_name() != "google.protobuf.Timestamp" => Some(m),
        _ => None,
    }
}

/// A field's type as it is written in YAML.
fn type_name(field: &FieldDescriptor) -> String {
    let single = single_type(&element_kind(field));
    if field.is_map() {
        format!("map of string to {single}")
    } else if field.is_list() {
        format!("list of {single}")
    } else {
        single
    }
}

fn single_type(kind: &FieldKind) -> String {
    match kind {
        FieldKind::String => "string".into(),
        FieldKind::Bool => "boolean".into(),
        FieldKind::Bytes => "bytes".into(),
        FieldKind::Float | FieldKind::Double => "number".into(),
        FieldKind::Enum(e) => format!("enum ({})", enum_values(e)),
        FieldKind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            "timestamp (RFC 3339)".into()
        }
        FieldKind::Message(m) => format!("object ({})", m.name()),
        _ => "integer".into(),
    }
}

fn enum_values(e: &EnumDescriptor) -> String {
    ferro_api::codec::enum_names(e).join(" | ")
}

/// The leading comment of the element at `path` in its file, lines unwrapped into
/// paragraphs.
fn comment(file: &prost_reflect::FileDescriptor, path: &[i32]) -> String {
    let Some(info) = &file.file_descriptor_proto().source_code_info else {
        return String::new();
    };
    let Some(location) = info.location.iter().find(|l| l.path == path) else {
        return String::new();
    };
    let text = location.leading_comments();
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| {
            p.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|p| !p.is_empty())
        .collect();
    paragraphs.join("\n\n")
}

/// The first sentence of a description, for one-line summaries.
fn first_sentence(text: &str) -> String {
    let first = text.split("\n\n").next().unwrap_or_default();
    match first.find(". ") {
        Some(end) => first[..=end].to_owned(),
        None => first.to_owned(),
    }
}

/// Wraps paragraphs at 90 columns, indented by four spaces.
fn indent(text: &str) -> String {
    let mut out = String::new();
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > 86 {
                out.push_str(&format!("    {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Rows in aligned columns, indented by four spaces; the last column runs on.
fn columns(rows: &[Vec<String>]) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("    ");
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_lists_its_parts() {
        let text = explain("server").unwrap();
        assert!(text.starts_with("KIND:        Server\n"), "{text}");
        assert!(text.contains("A virtual machine."), "{text}");
        assert!(
            text.contains("    spec       object (ServerSpec)"),
            "{text}"
        );
    }

    #[test]
    fn an_enum_lists_its_values_as_spelled() {
        let text = explain("server.spec.powerState").unwrap();
        assert!(
            text.contains("TYPE:        enum (Running | Stopped)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nVALUES:\n    Running   The guest runs"),
            "{text}"
        );
        assert!(!text.contains("UNSPECIFIED"), "{text}");
    }

    #[test]
    fn a_list_of_objects_shows_its_item_fields() {
        let text = explain("srv.spec.networks").unwrap();
        assert!(
            text.contains("TYPE:        list of object (ServerNetwork)\n"),
            "{text}"
        );
        assert!(text.contains("    fixedIp   string"), "{text}");
    }

    #[test]
    fn unknown_fields_name_the_known_ones() {
        let error = explain("server.spec.flavour").unwrap_err().to_string();
        assert!(
            error.starts_with("spec has no field `flavour`; its fields: flavor, image"),
            "{error}"
        );
    }
}
