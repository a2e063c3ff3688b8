//! The patch formats the real server accepts: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902), strategic merge patch (what `kubectl patch`, `label` and `apply` send for
//! built-in kinds) and server-side apply, approximated as a strategic merge of the applied
//! configuration.

use serde_json::{Map, Value};

/// How a PATCH body is to be read, from its `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`
    Merge,
    /// `application/json-patch+json`
    Json,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
}

impl PatchKind {
    /// The kind a content type names, if any.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies a JSON merge patch (RFC 7386): objects merge, `null` removes, anything else
/// replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Decodes one JSON pointer segment (`~1` is `/`, `~0` is `~`).
fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// Splits a JSON pointer into its parent pointer and last segment.
fn split_pointer(pointer: &str) -> Result<(&str, String), String> {
    let idx = pointer
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {pointer:?}"))?;
    Ok((&pointer[..idx], unescape(&pointer[idx + 1..])))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|&i| i <= items.len())
                    .ok_or_else(|| format!("invalid array index {last:?} in {path:?}"))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("doc is missing path: {path:?}")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map
            .remove(&last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}: missing value")),
        Some(Value::Array(items)) => {
            let index = last
                .parse::<usize>()
                .ok()
                .filter(|&i| i < items.len())
                .ok_or_else(|| format!("invalid array index {last:?} in {path:?}"))?;
            Ok(items.remove(index))
        }
        _ => Err(format!("doc is missing path: {path:?}")),
    }
}

/// Applies a JSON patch (RFC 6902); a failed `test` or a missing path fails the whole patch.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut work = doc.clone();
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation is missing {name:?}: {op}"))
        };
        let path = field("path")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("operation is missing \"value\": {op}"))
        };
        match field("op")? {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                let target = work.pointer_mut(path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing key: {path}")
                })?;
                *target = value()?;
            }
            "move" => {
                let moved = remove(&mut work, field("from")?)?;
                add(&mut work, path, moved)?;
            }
            "copy" => {
                let copied = work
                    .pointer(field("from")?)
                    .cloned()
                    .ok_or_else(|| format!("copy from a missing path: {op}"))?;
                add(&mut work, path, copied)?;
            }
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected operation {other:?}")),
        }
    }
    *doc = work;
    Ok(())
}

/// The `patchMergeKey` of a list field in the built-in types: lists with one merge by it,
/// lists without are replaced whole (the `atomic` default). `ports` is keyed by
/// `containerPort` in containers and by `port` in Services.
fn merge_key(field: &str, items: &[Value], merge: Merge<'_>) -> Option<&'static str> {
    let has = |key: &str| items.iter().all(|i| i.get(key).is_some());
    if merge.custom {
        // Custom resources have no patch metadata: every list is atomic.
        return None;
    }
    let key = match field {
        // EndpointSlice ports are atomic.
        "ports" if merge.kind == "EndpointSlice" => return None,
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        "taints" => "key",
        "ports" if has("containerPort") => "containerPort",
        "ports" => "port",
        _ => return None,
    };
    has(key).then_some(key)
}

/// Primitive lists whose patch strategy is `merge` (values are added, not replaced).
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Applies a strategic merge patch
/// (<https://github.com/kubernetes/community/blob/master/contributors/devel/sig-api-machinery/strategic-merge-patch.md>)
/// with the merge keys of the built-in types and the directives kubectl sends: `$patch`
/// (`replace`, `delete`), `$retainKeys`, `$setElementOrder/<list>` and
/// `$deleteFromPrimitiveList/<list>`.
pub fn strategic(target: &mut Value, patch: &Value, kind: &str) -> Result<(), String> {
    strategic_object(
        target,
        patch,
        Merge {
            null_deletes: true,
            kind,
            custom: false,
        },
    )
}

/// How a strategic merge treats what it meets.
#[derive(Clone, Copy, Debug)]
struct Merge<'a> {
    /// `null` removes a field (a patch) or is ignored (an applied configuration).
    null_deletes: bool,
    /// The object's kind, for the few list fields whose strategy depends on it.
    kind: &'a str,
    /// A custom resource: no merge keys, lists are replaced.
    custom: bool,
}

fn strategic_object(target: &mut Value, patch: &Value, merge: Merge<'_>) -> Result<(), String> {
    let null_deletes = merge.null_deletes;
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return Ok(());
    };
    let mut orders = Vec::new();
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            if let Some(Value::Array(items)) = target.get_mut(list) {
                items.retain(|i| !remove.contains(&i));
            }
            continue;
        }
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list.to_owned(), value.clone()));
            continue;
        }
        if value.is_null() {
            if null_deletes {
                target.remove(key);
            }
            continue;
        }
        if value.get("$patch").and_then(Value::as_str) == Some("delete") {
            target.remove(key);
            continue;
        }
        match value {
            Value::Array(items) => {
                let current = target.remove(key);
                let merged = strategic_list(key, current, items, merge)?;
                target.insert(key.clone(), merged);
            }
            Value::Object(_) => {
                strategic_object(
                    target.entry(key.clone()).or_insert(Value::Null),
                    value,
                    merge,
                )?;
            }
            _ => {
                target.insert(key.clone(), value.clone());
            }
        }
    }
    if let Some(Value::Array(retain)) = patch.get("$retainKeys") {
        target.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
    for (list, order) in orders {
        reorder(target, &list, &order);
    }
    Ok(())
}

/// Puts a merged list in the order `$setElementOrder` gives; items it does not name follow.
fn reorder(target: &mut Map<String, Value>, list: &str, order: &Value) {
    let (Some(Value::Array(items)), Some(order)) = (target.get_mut(list), order.as_array()) else {
        return;
    };
    let key = order
        .first()
        .and_then(Value::as_object)
        .and_then(|o| o.keys().next().cloned());
    let rank = |item: &Value| -> usize {
        order
            .iter()
            .position(|o| match &key {
                Some(k) => item.get(k) == o.get(k),
                None => item == o,
            })
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(|i| rank(i));
}

fn strategic_list(
    field: &str,
    current: Option<Value>,
    patch: &[Value],
    merge: Merge<'_>,
) -> Result<Value, String> {
    if patch
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        ));
    }
    let mut items = match current {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    if merges_primitives(field) && !merge.custom {
        for value in patch {
            if !items.contains(value) {
                items.push(value.clone());
            }
        }
        return Ok(Value::Array(items));
    }
    let Some(key) = merge_key(field, patch, merge) else {
        return Ok(Value::Array(patch.to_vec()));
    };
    for element in patch {
        let id = element.get(key);
        let position = items.iter().position(|i| i.get(key) == id);
        if element.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(p) = position {
                items.remove(p);
            }
            continue;
        }
        match position {
            Some(p) => strategic_object(&mut items[p], element, merge)?,
            None => {
                let mut fresh = Value::Object(Map::new());
                strategic_object(&mut fresh, element, merge)?;
                items.push(fresh);
            }
        }
    }
    Ok(Value::Array(items))
}

/// Server-side apply, approximated: what this field manager applied last time and no longer
/// applies is removed (fields of maps, items of keyed lists), then the applied configuration
/// is merged in strategically. Ownership by other managers is not tracked, so a field another
/// manager also set is removed too, and no apply ever conflicts.
pub fn apply(
    target: &mut Value,
    applied: &Value,
    previous: Option<&Value>,
    kind: &str,
    custom: bool,
) -> Result<(), String> {
    let merge = Merge {
        null_deletes: false,
        kind,
        custom,
    };
    if let Some(previous) = previous {
        remove_dropped(target, previous, applied, "", merge);
    }
    strategic_object(target, applied, merge)
}

/// Removes from `live` what `previous` set and `applied` no longer does.
fn remove_dropped(
    live: &mut Value,
    previous: &Value,
    applied: &Value,
    field: &str,
    merge: Merge<'_>,
) {
    match (live, previous, applied) {
        (Value::Object(live), Value::Object(previous), applied) => {
            for (key, before) in previous {
                if matches!(key.as_str(), "apiVersion" | "kind") {
                    continue;
                }
                match applied.get(key) {
                    None => {
                        live.remove(key);
                    }
                    Some(now) => {
                        if let Some(current) = live.get_mut(key) {
                            remove_dropped(current, before, now, key, merge);
                        }
                    }
                }
            }
        }
        (Value::Array(live), Value::Array(previous), Value::Array(applied)) => {
            let Some(key) = merge_key(field, previous, merge) else {
                return;
            };
            let find =
                |list: &[Value], id: &Value| list.iter().find(|i| i.get(key) == Some(id)).cloned();
            live.retain(|item| {
                item.get(key)
                    .is_none_or(|id| find(previous, id).is_none() || find(applied, id).is_some())
            });
            for item in live.iter_mut() {
                let Some(id) = item.get(key).cloned() else {
                    continue;
                };
                if let (Some(before), Some(now)) = (find(previous, &id), find(applied, &id)) {
                    remove_dropped(item, &before, &now, field, merge);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_merges_objects_and_null_removes() {
        let mut doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        merge(
            &mut doc,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        );
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
    }

    #[test]
    fn json_patch_ops_and_failed_test_leaves_doc_alone() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/a/e"},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "add", "path": "/a~1f", "value": true},
                {"op": "test", "path": "/a/e", "value": "y"},
            ]),
        )
        .expect("patch applies");
        assert_eq!(
            doc,
            json!({"a": {"b": [2, 3], "e": "y"}, "c": "y", "a/f": true})
        );
        let before = doc.clone();
        let err = json_patch(
            &mut doc,
            &json!([{"op": "remove", "path": "/c"}, {"op": "test", "path": "/a/e", "value": "z"}]),
        )
        .expect_err("test fails");
        assert!(err.contains("testing value"), "{err}");
        assert_eq!(doc, before);
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }

    #[test]
    fn strategic_merges_containers_by_name_and_replaces_atomic_lists() {
        let mut pod = json!({"spec": {
            "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "side:1"}
            ],
            "tolerations": [{"key": "a"}]
        }});
        strategic(
            &mut pod,
            &json!({"spec": {
                "containers": [
                    {"name": "app", "image": "app:2", "ports": [{"containerPort": 443}]},
                    {"name": "side", "$patch": "delete"},
                    {"name": "new", "image": "new:1"}
                ],
                "tolerations": [{"key": "b"}]
            }}),
            "Pod",
        )
        .expect("patch applies");
        assert_eq!(
            pod,
            json!({"spec": {
                "containers": [
                    {"name": "app", "image": "app:2",
                     "ports": [{"containerPort": 80}, {"containerPort": 443}]},
                    {"name": "new", "image": "new:1"}
                ],
                "tolerations": [{"key": "b"}]
            }})
        );
    }

    #[test]
    fn strategic_directives() {
        let mut obj = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
                             "spec": {"list": [1, 2, 3], "keep": 1, "drop": 2, "nested": {"a": 1}}});
        strategic(
            &mut obj,
            &json!({
                "metadata": {"finalizers": ["b"], "labels": {"x": null}},
                "spec": {
                    "$retainKeys": ["keep", "list", "nested"],
                    "$deleteFromPrimitiveList/list": [2],
                    "nested": {"$patch": "replace", "b": 2}
                }
            }),
            "Pod",
        )
        .expect("patch applies");
        assert_eq!(
            obj,
            json!({"metadata": {"finalizers": ["a", "b"], "labels": {}},
                   "spec": {"list": [1, 3], "keep": 1, "nested": {"b": 2}}})
        );
    }

    #[test]
    fn strategic_set_element_order() {
        let mut obj = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        strategic(
            &mut obj,
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "c"}, {"name": "b"}, {"name": "a"}],
                "containers": [{"name": "c", "image": "c"}]
            }}),
            "Pod",
        )
        .expect("patch applies");
        let names: Vec<&str> = obj["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["c", "b", "a"]);
    }

    #[test]
    fn list_strategy_depends_on_kind() {
        let mut slice = json!({"ports": [{"name": "a", "port": 1}]});
        strategic(
            &mut slice,
            &json!({"ports": [{"name": "b", "port": 2}]}),
            "EndpointSlice",
        )
        .expect("patch applies");
        assert_eq!(
            slice["ports"],
            json!([{"name": "b", "port": 2}]),
            "EndpointSlice ports are atomic"
        );
        let mut svc = json!({"spec": {"ports": [{"name": "a", "port": 1}]}});
        strategic(
            &mut svc,
            &json!({"spec": {"ports": [{"name": "b", "port": 2}]}}),
            "Service",
        )
        .expect("patch applies");
        assert_eq!(
            svc["spec"]["ports"].as_array().map(Vec::len),
            Some(2),
            "Service ports merge by port"
        );
        let mut cr = json!({"status": {"conditions": [{"type": "A"}]}});
        apply(
            &mut cr,
            &json!({"status": {"conditions": [{"type": "B"}]}}),
            None,
            "EgressPolicy",
            true,
        )
        .expect("apply");
        assert_eq!(
            cr["status"]["conditions"],
            json!([{"type": "B"}]),
            "custom lists are atomic"
        );
    }

    #[test]
    fn apply_removes_what_the_manager_stopped_applying() {
        let mut pod = json!({"metadata": {"labels": {"a": "1", "b": "2", "other": "x"}},
                             "spec": {"containers": [{"name": "app", "image": "1", "args": ["x"]},
                                                     {"name": "side", "image": "1"}]}});
        let previous = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
                              "spec": {"containers": [{"name": "app", "image": "1", "args": ["x"]},
                                                      {"name": "side", "image": "1"}]}});
        let applied = json!({"metadata": {"labels": {"a": "1"}},
                             "spec": {"containers": [{"name": "app", "image": "2"}]}});
        apply(&mut pod, &applied, Some(&previous), "Pod", false).expect("apply");
        assert_eq!(
            pod,
            json!({"metadata": {"labels": {"a": "1", "other": "x"}},
                   "spec": {"containers": [{"name": "app", "image": "2"}]}})
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml"),
            Some(PatchKind::Apply)
        );
        assert_eq!(PatchKind::from_content_type("application/json"), None);
    }
}
