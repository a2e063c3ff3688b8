//! Discovery and OpenAPI documents: what kubectl reads before it maps a kind to a URL and
//! before `apply` (the OpenAPI v3 index, and per group-version a document whose PATCH
//! operations declare `fieldValidation`, so kubectl leaves validation to the server).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resource::ResourceType;

/// The server version `/version` reports.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-egret-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// The non-core groups with their versions, preferred first.
fn groups(types: &[ResourceType]) -> BTreeMap<&str, Vec<&str>> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        let versions = groups.entry(&t.group).or_default();
        for v in &t.versions {
            if !versions.contains(&v.as_str()) {
                versions.push(v);
            }
        }
    }
    groups
}

fn group_json(name: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(json!({})),
    })
}

/// `/apis`.
pub fn group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(name, versions)| group_json(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if served.
pub fn group(types: &[ResourceType], name: &str) -> Option<Value> {
    let groups = groups(types);
    let versions = groups.get(name)?;
    let mut g = group_json(name, versions);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

fn served<'a>(
    types: &'a [ResourceType],
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'a ResourceType> {
    types
        .iter()
        .filter(move |t| t.group == group && t.versions.iter().any(|v| v == version))
}

/// `/api/v1` or `/apis/<group>/<version>`, if served.
pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for t in served(types, group, version) {
        let mut verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        if t.plural == "namespaces" {
            verbs.retain(|v| *v != "deletecollection");
        }
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": verbs,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Every served group-version as its OpenAPI v3 path (`api/v1`, `apis/egret.dev/v1alpha1`).
fn openapi_paths(types: &[ResourceType]) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    for t in types {
        for v in &t.versions {
            let path = if t.group.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{}/{v}", t.group)
            };
            if !out.iter().any(|(p, _, _)| *p == path) {
                out.push((path, t.group.clone(), v.clone()));
            }
        }
    }
    out.sort();
    out
}

/// `/openapi/v3`: the index kubectl fetches first; `hash` changes when CRDs change, so
/// kubectl's cache of the documents stays right.
pub fn openapi_index(types: &[ResourceType], hash: u64) -> Value {
    let paths: serde_json::Map<String, Value> = openapi_paths(types)
        .into_iter()
        .map(|(path, _, _)| {
            let url = json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash:016X}")});
            (path, url)
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/<path>`: for each resource a path with a PATCH operation tagged with its
/// group-version-kind and the `fieldValidation` parameter. kubectl's query-parameter
/// verifier finds it and sends `fieldValidation=Strict` instead of validating client-side.
/// No schemas are published, so kubectl computes strategic merge patches from its compiled-in
/// types (as it does for any server without them).
pub fn openapi_document(types: &[ResourceType], path: &str) -> Option<Value> {
    let (_, group, version) = openapi_paths(types)
        .into_iter()
        .find(|(p, _, _)| p == path)?;
    let mut paths = serde_json::Map::new();
    for t in served(types, &group, &version) {
        let gvk = json!({"group": t.group, "version": version, "kind": t.kind});
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
        ]);
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", t.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let item = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        let collection = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("{prefix}/{}", t.plural)
        };
        paths.insert(
            item,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
        paths.insert(collection, json!({"get": op("list"), "post": op("post")}));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::builtins;

    #[test]
    fn discovery_lists_status_subresources_and_short_names() {
        let types = builtins();
        let core = resource_list(&types, "", "v1").expect("core");
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"pods") && names.contains(&"pods/status"));
        assert!(!names.contains(&"configmaps/status"));
        let groups = group_list(&types);
        assert!(
            groups["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .any(|g| g["name"] == "networking.k8s.io")
        );
        assert!(resource_list(&types, "egret.dev", "v1alpha1").is_none());
    }

    #[test]
    fn openapi_patch_operations_declare_field_validation() {
        let types = builtins();
        let index = openapi_index(&types, 7);
        assert!(
            index["paths"]["apis/networking.k8s.io/v1"]["serverRelativeURL"]
                .as_str()
                .is_some_and(|u| u.starts_with("/openapi/v3/apis/networking.k8s.io/v1?hash="))
        );
        let doc = openapi_document(&types, "api/v1").expect("api/v1");
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Pod");
        assert!(
            patch["parameters"]
                .as_array()
                .expect("parameters")
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
        );
        assert!(openapi_document(&types, "apis/egret.dev/v1alpha1").is_none());
    }
}
