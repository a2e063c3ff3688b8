//! The structural schema of a CustomResourceDefinition applied to custom resources as the
//! real server applies it: unknown fields pruned (or refused under
//! `fieldValidation=Strict`), `default`s filled in, then types, enums, bounds and `required`
//! checked
//! (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>).

use serde_json::{Map, Value};

/// What one pass over an object found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Paths of fields the schema does not know, removed.
    pub pruned: Vec<String>,
    /// `path: message` for every violation.
    pub errors: Vec<String>,
}

/// Prunes, defaults and validates `obj` (a whole custom resource) against the version's
/// `openAPIV3Schema`. `apiVersion`, `kind` and `metadata` are the server's and left alone.
pub fn apply(schema: &Value, obj: &mut Value) -> Outcome {
    let mut outcome = Outcome::default();
    let Value::Object(map) = obj else {
        outcome
            .errors
            .push(": Invalid value: must be an object".to_owned());
        return outcome;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    let mut unknown = Vec::new();
    for (key, value) in map.iter_mut() {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match properties.and_then(|p| p.get(key)) {
            Some(s) => visit(s, value, key, &mut outcome),
            None if preserves_unknown(schema) => {}
            None => unknown.push(key.clone()),
        }
    }
    for key in unknown {
        map.remove(&key);
        outcome.pruned.push(key);
    }
    fill_defaults(schema, map, "", &mut outcome);
    outcome
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Go's `%v`-ish rendering of a value in messages.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// Fills in defaults of missing properties and checks `required`, in an object.
fn fill_defaults(schema: &Value, map: &mut Map<String, Value>, path: &str, outcome: &mut Outcome) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (key, s) in properties {
            if !map.contains_key(key)
                && let Some(default) = s.get("default")
            {
                let mut value = default.clone();
                visit(s, &mut value, &join(path, key), outcome);
                map.insert(key.clone(), value);
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(key) {
                outcome
                    .errors
                    .push(format!("{}: Required value", join(path, key)));
            }
        }
    }
}

fn visit(schema: &Value, value: &mut Value, path: &str, outcome: &mut Outcome) {
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            let ty = schema
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("object");
            outcome.errors.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {ty}: \"null\""
            ));
        }
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match (ty, &*value) {
        _ if int_or_string => value.is_string() || value.is_i64() || value.is_u64(),
        (None, _) => true,
        (Some("string"), Value::String(_))
        | (Some("boolean"), Value::Bool(_))
        | (Some("number"), Value::Number(_))
        | (Some("object"), Value::Object(_))
        | (Some("array"), Value::Array(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    };
    if !type_ok {
        let ty = if int_or_string {
            "integer or string"
        } else {
            ty.unwrap_or("")
        };
        outcome.errors.push(format!(
            "{path}: Invalid value: \"{}\": {path} in body must be of type {ty}: \"{}\"",
            kind_of(value),
            kind_of(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        outcome.errors.push(format!(
            "{path}: Unsupported value: {}: supported values: {}",
            show(value),
            list.join(", ")
        ));
    }
    bounds(schema, value, path, outcome);
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut unknown = Vec::new();
            for (key, v) in map.iter_mut() {
                let child = join(path, key);
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(s), _) | (None, Some(s)) => visit(s, v, &child, outcome),
                    (None, None) if properties.is_some() && !preserves_unknown(schema) => {
                        unknown.push(key.clone());
                    }
                    (None, None) => {}
                }
            }
            for key in unknown {
                map.remove(&key);
                outcome.pruned.push(join(path, &key));
            }
            fill_defaults(schema, map, path, outcome);
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    visit(s, item, &format!("{path}[{i}]"), outcome);
                }
            }
            duplicates(schema, items, path, outcome);
        }
        _ => {}
    }
}

/// `x-kubernetes-list-type: map` (items unique by `x-kubernetes-list-map-keys`) and `set`
/// (items unique): a repeated item is `Duplicate value`.
fn duplicates(schema: &Value, items: &[Value], path: &str, outcome: &mut Outcome) {
    let identity = |item: &Value| -> Option<Value> {
        match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => Some(item.clone()),
            Some("map") => {
                let keys = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)?;
                let id: Map<String, Value> = keys
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|k| (k.to_owned(), item.get(k).cloned().unwrap_or(Value::Null)))
                    .collect();
                Some(Value::Object(id))
            }
            _ => None,
        }
    };
    let mut seen = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(id) = identity(item) else {
            return;
        };
        if seen.contains(&id) {
            outcome
                .errors
                .push(format!("{path}[{i}]: Duplicate value: {id}"));
        } else {
            seen.push(id);
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn bounds(schema: &Value, value: &Value, path: &str, outcome: &mut Outcome) {
    let limit = |name: &str| schema.get(name).and_then(Value::as_f64);
    if let Some(n) = value.as_f64() {
        if let Some(min) = limit("minimum")
            && n < min
        {
            outcome.errors.push(format!(
                "{path}: Invalid value: {value}: {path} in body should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = limit("maximum")
            && n > max
        {
            outcome.errors.push(format!(
                "{path}: Invalid value: {value}: {path} in body should be less than or equal to {max}"
            ));
        }
    }
    if let (Some(pattern), Value::String(s)) =
        (schema.get("pattern").and_then(Value::as_str), value)
    {
        match regex_lite::Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => outcome.errors.push(format!(
                "{path}: Invalid value: \"{s}\": {path} in body should match '{pattern}'"
            )),
            Ok(_) => {}
            // The real server refuses such a CRD; here the pattern is not checked.
            Err(_) => {}
        }
    }
    let len = match value {
        Value::String(s) => Some((s.chars().count(), "Length", "chars")),
        Value::Array(a) => Some((a.len(), "Items", "items")),
        _ => None,
    };
    if let Some((len, what, unit)) = len {
        if let Some(min) = limit(&format!("min{what}"))
            && (len as f64) < min
        {
            outcome.errors.push(format!(
                "{path}: Invalid value: {len}: {path} in body should have at least {min} {unit}"
            ));
        }
        if let Some(max) = limit(&format!("max{what}"))
            && (len as f64) > max
        {
            outcome.errors.push(format!(
                "{path}: Too many: {len}: must have at most {max} {unit}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["subject"],
                    "properties": {
                        "mode": {"type": "string", "enum": ["Enforce", "Audit"], "default": "Enforce"},
                        "priority": {"type": "integer", "minimum": 0.0, "maximum": 1000.0},
                        "subject": {"type": "object", "properties": {
                            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                        }},
                        "rules": {"type": "array", "default": [],
                                  "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                                  "items": {"type": "object", "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "port": {"x-kubernetes-int-or-string": true, "nullable": true}
                        }}},
                        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                },
                "status": {"type": "object"}
            }
        })
    }

    #[test]
    fn defaults_and_pruning() {
        let mut obj = json!({
            "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "p"},
            "spec": {"subject": {"matchLabels": {"a": "b"}, "extra": 1}, "free": {"x": 1},
                     "rules": [{"name": "r1", "port": "dns"}, {"name": "r2", "port": 53, "junk": true}]},
            "top": 1
        });
        let outcome = apply(&schema(), &mut obj);
        assert_eq!(outcome.errors, Vec::<String>::new());
        let mut pruned = outcome.pruned.clone();
        pruned.sort();
        assert_eq!(pruned, ["spec.rules[1].junk", "spec.subject.extra", "top"]);
        assert_eq!(obj["spec"]["mode"], "Enforce");
        assert_eq!(obj["spec"]["free"]["x"], 1);
        assert_eq!(obj["metadata"]["name"], "p");
    }

    #[test]
    fn list_types_and_patterns() {
        let mut obj = json!({"spec": {"subject": {},
            "rules": [{"name": "a"}, {"name": "Bad_Name"}, {"name": "a"}],
            "tags": ["x", "y", "x"]}});
        let errors = apply(&schema(), &mut obj).errors.join("\n");
        assert!(
            errors.contains(r#"spec.rules[2]: Duplicate value: {"name":"a"}"#),
            "{errors}"
        );
        assert!(
            errors.contains(r#"spec.tags[2]: Duplicate value: "x""#),
            "{errors}"
        );
        assert!(
            errors.contains(r#"spec.rules[1].name: Invalid value: "Bad_Name""#),
            "{errors}"
        );
        let mut ok = json!({"spec": {"subject": {}, "rules": [{"name": "a"}, {"name": "b-2"}], "tags": ["x"]}});
        assert_eq!(apply(&schema(), &mut ok).errors, Vec::<String>::new());
    }

    #[test]
    fn violations_name_the_field() {
        let mut obj = json!({"spec": {"mode": "Loud", "priority": 5000,
                                      "rules": [{"port": true}], "subject": {"matchLabels": {"a": 1}}}});
        let outcome = apply(&schema(), &mut obj);
        let errors = outcome.errors.join("\n");
        assert!(
            errors.contains(
                r#"spec.mode: Unsupported value: "Loud": supported values: "Enforce", "Audit""#
            ),
            "{errors}"
        );
        assert!(
            errors.contains("spec.priority: Invalid value: 5000"),
            "{errors}"
        );
        assert!(
            errors.contains("spec.rules[0].port: Invalid value"),
            "{errors}"
        );
        assert!(
            errors.contains("spec.subject.matchLabels.a: Invalid value"),
            "{errors}"
        );
        let mut missing = json!({"spec": {}});
        assert_eq!(
            apply(&schema(), &mut missing).errors,
            ["spec.subject: Required value"]
        );
    }
}
