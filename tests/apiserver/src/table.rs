//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), what kubectl
//! asks for when it prints objects for people: name and age columns for every kind.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::store::parse_rfc3339;

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages.
fn age(obj: &Value) -> String {
    let Some(created) = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
    else {
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
pub fn table(objects: &[Value], metadata: Value, include: &str) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            json!({
                "cells": [o.pointer("/metadata/name").cloned().unwrap_or(Value::Null), age(o)],
                "object": row_object(o, include),
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp of the object.", "priority": 0},
        ],
        "rows": rows,
    })
}
