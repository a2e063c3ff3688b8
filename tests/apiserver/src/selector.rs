//! Label and field selectors in the query-string syntax of the real server
//! (<https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors>).

use serde_json::Value;

/// One parsed requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    NotExists { key: String },
}

/// A label selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Splits at commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`; an empty string selects everything.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in split_top_level(s) {
            let part = part.trim();
            requirements.push(Self::parse_requirement(part)?);
        }
        Ok(Self { requirements })
    }

    fn parse_requirement(part: &str) -> Result<Requirement, String> {
        let bad = || format!("unable to parse requirement: {part:?}");
        if let Some(key) = part.strip_prefix('!') {
            let key = key.trim();
            return valid_key(key)
                .then(|| Requirement::NotExists {
                    key: key.to_owned(),
                })
                .ok_or_else(bad);
        }
        let pair = |op: &str| -> Option<(String, String)> {
            let (k, v) = part.split_once(op)?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        };
        if let Some((key, value)) = pair("!=") {
            return (valid_key(&key) && valid_value(&value))
                .then_some(Requirement::NotEquals { key, value })
                .ok_or_else(bad);
        }
        if let Some((key, value)) = pair("==").or_else(|| pair("=")) {
            return (valid_key(&key) && valid_value(&value))
                .then_some(Requirement::Equals { key, value })
                .ok_or_else(bad);
        }
        if let Some(open) = part.find('(') {
            let close = part.rfind(')').filter(|&c| c > open).ok_or_else(bad)?;
            let head: Vec<&str> = part[..open].split_whitespace().collect();
            let values: Vec<String> = part[open + 1..close]
                .split(',')
                .map(|v| v.trim().to_owned())
                .collect();
            if !part[close + 1..].trim().is_empty() || values.iter().any(|v| !valid_value(v)) {
                return Err(bad());
            }
            return match head.as_slice() {
                [key, "in"] if valid_key(key) => Ok(Requirement::In {
                    key: (*key).to_owned(),
                    values,
                }),
                [key, "notin"] if valid_key(key) => Ok(Requirement::NotIn {
                    key: (*key).to_owned(),
                    values,
                }),
                _ => Err(bad()),
            };
        }
        valid_key(part)
            .then(|| Requirement::Exists {
                key: part.to_owned(),
            })
            .ok_or_else(bad)
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|r| match r {
            Requirement::Equals { key, value } => label(key) == Some(value.as_str()),
            Requirement::NotEquals { key, value } => label(key) != Some(value.as_str()),
            Requirement::In { key, values } => {
                label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
            Requirement::NotIn { key, values } => {
                label(key).is_none_or(|l| values.iter().all(|v| v != l))
            }
            Requirement::Exists { key } => label(key).is_some(),
            Requirement::NotExists { key } => label(key).is_none(),
        })
    }
}

/// A field selector: `field=value`, `field==value` and `field!=value` terms, all of which must
/// hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a field selector, accepting `metadata.name`, `metadata.namespace` and the
    /// kind's own `extra` fields, as the real server does (others are a 400).
    pub fn parse(s: &str, extra: &[&str]) -> Result<Self, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { terms });
        }
        for part in s.split(',') {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") && !extra.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    /// The name a `metadata.name=` term pins, for single-object watches.
    pub fn name(&self) -> Option<&str> {
        self.terms
            .iter()
            .find(|(f, eq, _)| *eq && f == "metadata.name")
            .map(|(_, _, v)| v.as_str())
    }

    /// Whether the object's fields satisfy every term; a missing field reads as `""` (and a
    /// missing boolean as `false`), as the real server's field sets do.
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(field, equal, value)| {
            let mut current = Some(object);
            for segment in field.split('.') {
                current = current.and_then(|v| v.get(segment));
            }
            let actual = match current {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                None if field == "spec.hostNetwork" || field == "spec.unschedulable" => {
                    "false".to_owned()
                }
                _ => String::new(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "shop", "labels": labels},
               "spec": {"nodeName": "node-a"}})
    }

    #[test]
    fn equality_and_inequality() {
        let web = pod(json!({"app": "web", "tier": "front"}));
        let api = pod(json!({"app": "api"}));
        let s = LabelSelector::parse("app=web").expect("parse");
        assert!(s.matches(&web) && !s.matches(&api));
        let s = LabelSelector::parse("app==web,tier=front").expect("parse");
        assert!(s.matches(&web) && !s.matches(&api));
        let s = LabelSelector::parse("app!=web").expect("parse");
        assert!(!s.matches(&web) && s.matches(&api));
        // `!=` also selects objects without the key, as the real server does.
        let s = LabelSelector::parse("tier!=front").expect("parse");
        assert!(s.matches(&api) && !s.matches(&web));
    }

    #[test]
    fn set_based_and_existence() {
        let web = pod(json!({"app": "web", "tier": "front"}));
        let api = pod(json!({"app": "api"}));
        let db = pod(json!({"app": "db"}));
        let s = LabelSelector::parse("app in (web, api)").expect("parse");
        assert!(s.matches(&web) && s.matches(&api) && !s.matches(&db));
        let s = LabelSelector::parse("app notin (web,api)").expect("parse");
        assert!(!s.matches(&web) && !s.matches(&api) && s.matches(&db));
        let s = LabelSelector::parse("tier").expect("parse");
        assert!(s.matches(&web) && !s.matches(&api));
        let s = LabelSelector::parse("!tier").expect("parse");
        assert!(!s.matches(&web) && s.matches(&api));
        let s = LabelSelector::parse("app in (web,api),!tier").expect("parse");
        assert!(!s.matches(&web) && s.matches(&api) && !s.matches(&db));
        assert!(LabelSelector::parse("").expect("parse").matches(&db));
    }

    #[test]
    fn malformed_label_selectors_are_errors() {
        for bad in ["app in web", "a=b=c", "app in (web", "=x", "app notin"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn field_selectors() {
        let p = pod(json!({}));
        let extra = ["spec.nodeName", "spec.hostNetwork"];
        let s = FieldSelector::parse("spec.nodeName=node-a,metadata.namespace==shop", &extra)
            .expect("parse");
        assert!(s.matches(&p));
        let s = FieldSelector::parse("spec.nodeName!=node-a", &extra).expect("parse");
        assert!(!s.matches(&p));
        let s = FieldSelector::parse("spec.hostNetwork=false", &extra).expect("parse");
        assert!(s.matches(&p));
        let s = FieldSelector::parse("metadata.name=p", &[]).expect("parse");
        assert_eq!(s.name(), Some("p"));
        let err = FieldSelector::parse("spec.nodeName=x", &[]).expect_err("unsupported field");
        assert!(err.contains("field label not supported"), "{err}");
    }
}
