//! Label and field selectors, as in Kubernetes.
//!
//! Label selectors: `app=web`, `app==web`, `tier!=db`, `env in (a,b)`, `env notin (a)`,
//! `legacy` (key exists), `!legacy` (key absent), joined by commas (all must hold).
//! Field selectors: `metadata.name`, `metadata.project` and `status.node` with `=`, `==`
//! or `!=`.

use std::collections::HashMap;

use crate::{Error, Object};

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    /// Parses a selector; errors name the `labelSelector` field.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::invalid("", "labelSelector", reason);
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(check_key(key.trim()).map_err(bad)?)
            } else if let Some((key, values)) = split_set(part, " notin ") {
                Requirement::NotIn(
                    check_key(key).map_err(bad)?,
                    parse_set(values).map_err(bad)?,
                )
            } else if let Some((key, values)) = split_set(part, " in ") {
                Requirement::In(
                    check_key(key).map_err(bad)?,
                    parse_set(values).map_err(bad)?,
                )
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(check_key(key.trim()).map_err(bad)?, value.trim().to_owned())
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                Requirement::Equals(check_key(key.trim()).map_err(bad)?, value.trim().to_owned())
            } else {
                Requirement::Exists(check_key(part).map_err(bad)?)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    /// Whether labels satisfy every requirement.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// Whether the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_set<'a>(part: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let (key, values) = part.split_once(op)?;
    Some((key.trim(), values.trim()))
}

fn parse_set(values: &str) -> Result<Vec<String>, String> {
    let inner = values
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("`{values}`: expected a parenthesised list, e.g. (a,b)"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

fn check_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!("`{key}` is not a label key"))
    }
}

/// A field a field selector can test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectableField {
    /// `metadata.name`.
    Name,
    /// `metadata.project`.
    Project,
    /// `status.node`.
    Node,
}

/// A parsed field selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(SelectableField, bool, String)>);

impl FieldSelector {
    /// Parses a selector; errors name the `fieldSelector` field.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(Error::invalid(
                    "",
                    "fieldSelector",
                    format!("`{part}`: expected FIELD=VALUE"),
                ));
            };
            let field = match field.trim() {
                "metadata.name" => SelectableField::Name,
                "metadata.project" => SelectableField::Project,
                "status.node" => SelectableField::Node,
                other => {
                    return Err(Error::invalid(
                        "",
                        "fieldSelector",
                        format!(
                            "cannot select on `{other}`; selectable: metadata.name, metadata.project, status.node"
                        ),
                    ));
                }
            };
            terms.push((field, equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    /// Whether an object satisfies every term.
    pub fn matches(&self, object: &Object) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = match field {
                SelectableField::Name => object.name().to_owned(),
                SelectableField::Project => object.project().to_owned(),
                SelectableField::Node => node_of(object).unwrap_or_default(),
            };
            (actual == *value) == *equal
        })
    }

    /// The value the selector requires of a field with `=`, if any (for index lookups).
    pub fn required(&self, field: SelectableField) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| *f == field && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

/// The node an object is placed on, for kinds that have one.
pub fn node_of(object: &Object) -> Option<String> {
    match object {
        Object::Server(o) => o.status.as_ref().map(|s| s.node.clone()),
        Object::Port(o) => o.status.as_ref().map(|s| s.node.clone()),
        Object::Router(o) => o.status.as_ref().map(|s| s.node.clone()),
        Object::Volume(o) => o.status.as_ref().map(|s| s.node.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let l = labels(&[("app", "web"), ("env", "prod")]);
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("env in (prod, staging)", true),
            ("env notin (prod)", false),
            ("tier notin (db)", true),
            ("app", true),
            ("!app", false),
            ("!legacy", true),
            ("app=web,env in (dev)", false),
        ];
        for (text, expected) in cases {
            assert_eq!(
                LabelSelector::parse(text).unwrap().matches(&l),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn bad_selectors_name_the_field() {
        let err = LabelSelector::parse("env in prod").unwrap_err();
        assert!(err.to_string().starts_with("labelSelector: "), "{err}");
        let err = FieldSelector::parse("spec.flavor=x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "fieldSelector: cannot select on `spec.flavor`; selectable: metadata.name, metadata.project, status.node"
        );
    }
}
