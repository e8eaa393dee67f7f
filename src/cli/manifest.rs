//! Reading manifests for `apply -f` and `delete -f`: files, directories (recursively,
//! `*.yaml`, `*.yml`, `*.json`, in sorted order) and `-` for standard input, each holding
//! one or more YAML / JSON documents.
//!
//! Every document is decoded before anything is sent, and every problem is reported as
//! `FILE:LINE:COL: servers/web-1: spec.x: reason`, so one run shows all of them. A
//! `kind: List` document (what `ferro get -o json` prints for several objects) stands for
//! its `items`.

use std::io::Read;
use std::path::{Path, PathBuf};

use ferro_api::Object;
use ferro_api::codec::{self, CodecError, Node, NodeValue, Position};
use ferro_api::validation::Invalid;

/// What `-` reads, and how messages name it.
pub const STDIN: &str = "<stdin>";

/// One decoded document and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    /// The file it came from (`<stdin>` for `-`).
    pub source: String,
    /// The parsed document, for positions of later problems.
    pub node: Node,
    /// The decoded object.
    pub object: Object,
}

impl Document {
    /// `FILE:LINE:COL` of the field at `path` (`spec.networks[0].fixedIp`), or of its
    /// closest ancestor present in the source.
    pub fn locate(&self, path: &str) -> String {
        let position = locate(&self.node, path).or(self.node.position);
        at(&self.source, position)
    }

    /// One line per violation: `FILE:LINE:COL: servers/web-1: spec.x: reason`.
    pub fn describe_invalid(&self, invalid: &Invalid) -> Vec<String> {
        invalid
            .violations
            .iter()
            .map(|v| format!("{}: {}: {v}", self.locate(&v.path), invalid.object))
            .collect()
    }
}

/// Reads and decodes every document of the given paths, and runs `check` on each decoded
/// one. Returns the documents in order, and one message per problem, in source order (a
/// syntax error stops the reading of its file only).
pub fn load(
    paths: &[PathBuf],
    mut check: impl FnMut(&mut Document) -> Vec<String>,
) -> (Vec<Document>, Vec<String>) {
    let mut documents = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let files = match expand(path) {
            Ok(files) => files,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        for file in files {
            let (source, text) = match read(&file) {
                Ok(read) => read,
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
            };
            decode(&source, &text, &mut documents, &mut problems, &mut check);
        }
    }
    (documents, problems)
}

/// The manifest files a path stands for: itself, or the manifests under a directory.
fn expand(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.as_os_str() == "-" {
        return Ok(vec![path.to_path_buf()]);
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    walk(path, &mut files).map_err(|e| format!("{}: {e}", path.display()))?;
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{}: no manifests (*.yaml, *.yml, *.json) in this directory",
            path.display()
        ));
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(path);
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<(String, String), String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("{STDIN}: {e}"))?;
        return Ok((STDIN.to_owned(), text));
    }
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{source}: {e}"))?;
    Ok((source, text))
}

/// Decodes the documents of one text, appending them or the problems found.
fn decode(
    source: &str,
    text: &str,
    out: &mut Vec<Document>,
    problems: &mut Vec<String>,
    check: &mut impl FnMut(&mut Document) -> Vec<String>,
) {
    let nodes = match codec::parse_yaml(text) {
        Ok(nodes) => nodes,
        Err(error) => {
            problems.push(describe_codec_error(source, None, &error));
            return;
        }
    };
    for node in nodes.into_iter().flat_map(unwrap_list) {
        match codec::decode_object(&node) {
            Ok(object) => {
                let mut document = Document {
                    source: source.to_owned(),
                    node,
                    object,
                };
                problems.extend(check(&mut document));
                out.push(document);
            }
            Err(error) => problems.push(describe_codec_error(source, node.position, &error)),
        }
    }
}

/// The items of a `kind: List` document, or the document itself.
fn unwrap_list(node: Node) -> Vec<Node> {
    let NodeValue::Map(entries) = &node.value else {
        return vec![node];
    };
    let is_list = entries
        .iter()
        .any(|(k, v)| k == "kind" && v.value == NodeValue::String("List".into()));
    let items = entries.iter().find(|(k, _)| k == "items").map(|(_, v)| v);
    match (is_list, items) {
        (
            true,
            Some(Node {
                value: NodeValue::Seq(items),
                ..
            }),
        ) => items.clone(),
        _ => vec![node],
    }
}

fn describe_codec_error(source: &str, document: Option<Position>, error: &CodecError) -> String {
    match error {
        CodecError::Syntax { position, message } => {
            format!("{}: {message}", at(source, Some(*position)))
        }
        CodecError::TooManyNodes { .. } => format!("{source}: {error}"),
        CodecError::Field { object, field } => {
            let object = object
                .as_deref()
                .map(|o| format!("{o}: "))
                .unwrap_or_default();
            let path = if field.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", field.path)
            };
            format!(
                "{}: {object}{path}{}",
                at(source, field.position.or(document)),
                field.reason
            )
        }
    }
}

fn at(source: &str, position: Option<Position>) -> String {
    match position {
        Some(p) => format!("{source}:{}:{}", p.line, p.column),
        None => source.to_owned(),
    }
}

/// One step of a field path.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Field(String),
    Index(usize),
    Key(String),
}

/// Splits `spec.networks[0].fixedIp` / `metadata.labels["app"]` into steps.
fn steps(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut chars = path.chars().peekable();
    let mut field = String::new();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                if !field.is_empty() {
                    steps.push(Step::Field(std::mem::take(&mut field)));
                }
            }
            '[' => {
                if !field.is_empty() {
                    steps.push(Step::Field(std::mem::take(&mut field)));
                }
                let mut inner = String::new();
                let quoted = chars.peek() == Some(&'"');
                if quoted {
                    chars.next();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => inner.extend(chars.next()),
                            '"' => break,
                            c => inner.push(c),
                        }
                    }
                    // The closing bracket.
                    chars.next();
                    steps.push(Step::Key(inner));
                } else {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                        inner.push(c);
                    }
                    match inner.parse() {
                        Ok(i) => steps.push(Step::Index(i)),
                        Err(_) => steps.push(Step::Key(inner)),
                    }
                }
            }
            c => field.push(c),
        }
    }
    if !field.is_empty() {
        steps.push(Step::Field(field));
    }
    steps
}

/// The position of the deepest node along `path` that exists in the document.
fn locate(node: &Node, path: &str) -> Option<Position> {
    let mut current = node;
    let mut found = node.position;
    for step in steps(path) {
        let next = match (&current.value, &step) {
            (NodeValue::Map(entries), Step::Field(name) | Step::Key(name)) => {
                entries.iter().find(|(k, _)| k == name).map(|(_, v)| v)
            }
            (NodeValue::Seq(items), Step::Index(i)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(next) => {
                current = next;
                found = next.position.or(found);
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_steps() {
        assert_eq!(
            steps(r#"spec.networks[0].fixedIp"#),
            vec![
                Step::Field("spec".into()),
                Step::Field("networks".into()),
                Step::Index(0),
                Step::Field("fixedIp".into())
            ]
        );
        assert_eq!(
            steps(r#"metadata.labels["a.b/c"]"#),
            vec![
                Step::Field("metadata".into()),
                Step::Field("labels".into()),
                Step::Key("a.b/c".into())
            ]
        );
    }

    #[test]
    fn violations_point_at_the_field_or_its_closest_ancestor() {
        let text = "apiVersion: ferro/v1\nkind: Network\nmetadata:\n  name: n\nspec:\n  subnets:\n  - cidr: 10.0.0.0/24\n  - cidr: nope\n";
        let node = codec::parse_yaml(text).unwrap().remove(0);
        let at = |path| locate(&node, path).map(|p| (p.line, p.column));
        assert_eq!(at("spec.subnets[1].cidr"), Some((8, 11)));
        // Missing fields point at the closest ancestor that exists.
        assert_eq!(at("spec.subnets[1].gateway").map(|p| p.0), Some(8));
        assert_eq!(at("spec.mtu").map(|p| p.0), Some(6));
    }

    #[test]
    fn problems_carry_file_line_and_column() {
        let mut docs = Vec::new();
        let mut problems = Vec::new();
        decode(
            "m.yaml",
            "apiVersion: ferro/v1\nkind: Server\nmetadata:\n  name: web-1\nspec:\n  flavour: m1.tiny\n",
            &mut docs,
            &mut problems,
            &mut |_| Vec::new(),
        );
        assert!(docs.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("m.yaml:6:")
                && problems[0].contains("servers/web-1: spec.flavour"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_list_document_stands_for_its_items() {
        let mut docs = Vec::new();
        let mut problems = Vec::new();
        let text = r#"{"apiVersion": "ferro/v1", "kind": "List", "items": [
            {"apiVersion": "ferro/v1", "kind": "Flavor", "metadata": {"name": "a"}},
            {"apiVersion": "ferro/v1", "kind": "Flavor", "metadata": {"name": "b"}}]}"#;
        decode("l.json", text, &mut docs, &mut problems, &mut |_| {
            Vec::new()
        });
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&str> = docs.iter().map(|d| d.object.name()).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
