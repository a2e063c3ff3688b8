//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), what kubectl
//! asks for when it prints objects for people: name and age columns for every kind.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{resource::ResourceType, store::parse_rfc3339};

/// One column of a table: a name and where its cells come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Header (kubectl prints it upper-cased).
    pub name: String,
    /// `string`, `integer`, `date`, ...
    pub kind: String,
    /// `.spec.priority`; `.metadata.name` and `.metadata.creationTimestamp` print as name and
    /// age.
    pub json_path: String,
    /// Column description.
    pub description: String,
    /// 0 for the default view, more for `-o wide`.
    pub priority: u64,
}

fn column(name: &str, kind: &str, json_path: &str, description: &str) -> Column {
    Column {
        name: name.to_owned(),
        kind: kind.to_owned(),
        json_path: json_path.to_owned(),
        description: description.to_owned(),
        priority: 0,
    }
}

/// The columns of a kind: for a custom resource, Name and its CRD's
/// `additionalPrinterColumns` (Name and Age without them), as the real server builds them;
/// Name, Status and Age for pods; Name and Age for other built-in kinds.
pub fn columns(t: &ResourceType, crd: Option<&Value>) -> Vec<Column> {
    let name = column(
        "Name",
        "string",
        ".metadata.name",
        "Name must be unique within a namespace.",
    );
    let age = column(
        "Age",
        "date",
        ".metadata.creationTimestamp",
        "CreationTimestamp of the object.",
    );
    let printer = crd
        .and_then(|c| c.pointer("/spec/versions"))
        .and_then(Value::as_array)
        .and_then(|vs| {
            vs.iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(t.storage_version()))
        })
        .and_then(|v| v.get("additionalPrinterColumns"))
        .and_then(Value::as_array);
    match printer {
        Some(extra) if t.custom => {
            let field = |c: &Value, f: &str| {
                c.get(f)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            std::iter::once(name)
                .chain(extra.iter().map(|c| Column {
                    name: field(c, "name"),
                    kind: field(c, "type"),
                    json_path: field(c, "jsonPath"),
                    description: field(c, "description"),
                    priority: c.get("priority").and_then(Value::as_u64).unwrap_or(0),
                }))
                .collect()
        }
        _ if t.group.is_empty() && t.plural == "pods" => vec![
            name,
            column("Status", "string", ".status.phase", "The pod's phase."),
            age,
        ],
        _ => vec![name, age],
    }
}

/// A cell: the value at a column's path, an age for dates.
fn cell(obj: &Value, col: &Column) -> Value {
    let mut current = Some(obj);
    for segment in col.json_path.trim_start_matches('.').split('.') {
        current = current.and_then(|v| v.get(segment));
    }
    match current {
        _ if col.kind == "date" => json!(age(obj, current)),
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages.
fn age(_obj: &Value, at: Option<&Value>) -> String {
    let Some(created) = at.and_then(Value::as_str).and_then(parse_rfc3339) else {
        return "<unknown>".to_owned();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(created);
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A row's object: the whole object for `includeObject=Object`, only its metadata (as
/// `PartialObjectMetadata`) by default, nothing for `None`.
fn row_object(obj: &Value, include: &str) -> Value {
    match include {
        "Object" => obj.clone(),
        "None" => Value::Null,
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
    }
}

/// A table of `objects`.
pub fn table(objects: &[Value], metadata: Value, include: &str, columns: &[Column]) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = columns.iter().map(|c| cell(o, c)).collect();
            json!({"cells": cells, "object": row_object(o, include)})
        })
        .collect();
    let definitions: Vec<Value> = columns
        .iter()
        .map(|c| {
            let (kind, format) = match c.kind.as_str() {
                "date" => ("string", ""),
                _ if c.json_path == ".metadata.name" => ("string", "name"),
                other => (other, ""),
            };
            json!({"name": c.name, "type": kind, "format": format,
                   "description": c.description, "priority": c.priority})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}
