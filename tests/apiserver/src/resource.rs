//! The kinds the server serves: the built-in ones egret and kubectl use, and every
//! CustomResourceDefinition created through the API.

use serde_json::Value;

/// One served resource: what discovery lists and what the routes and the store are keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, `""` for the core group.
    pub group: String,
    /// Served versions, the storage (preferred) version first.
    pub versions: Vec<String>,
    /// Plural resource name, as in URLs (`pods`).
    pub plural: String,
    /// Singular name (`pod`).
    pub singular: String,
    /// Kind (`Pod`).
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names kubectl resolves (`po`).
    pub short_names: Vec<String>,
    /// Whether the kind has a `status` subresource: then writes to the main resource leave
    /// `status` alone and status writes change nothing else, as the real server does.
    pub status: bool,
    /// Categories (`all`) kubectl expands.
    pub categories: Vec<String>,
    /// Whether a CustomResourceDefinition declared it (custom resources take no strategic
    /// merge patch).
    pub custom: bool,
}

impl ResourceType {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The storage version, the first served one.
    pub fn storage_version(&self) -> &str {
        self.versions.first().map_or("v1", String::as_str)
    }

    /// `pods` or `egresspolicies.egret.dev`, as the real server names a resource in messages.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The field selectors the real server accepts for this kind besides `metadata.name` and
    /// `metadata.namespace` (it rejects any other with 400).
    pub fn field_labels(&self) -> &'static [&'static str] {
        match (self.group.as_str(), self.plural.as_str()) {
            ("", "pods") => &[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            ("", "events") => &[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ],
            ("events.k8s.io", "events") => &[
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "type",
                "reportingController",
            ],
            ("", "namespaces") => &["status.phase"],
            ("", "nodes") => &["spec.unschedulable"],
            ("", "secrets") => &["type"],
            _ => &[],
        }
    }
}

/// Builds a built-in resource type.
fn builtin(
    group: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short_names: &[&str],
    status: bool,
) -> ResourceType {
    ResourceType {
        group: group.to_owned(),
        versions: vec!["v1".to_owned()],
        plural: plural.to_owned(),
        singular: kind.to_lowercase(),
        kind: kind.to_owned(),
        namespaced,
        short_names: short_names.iter().map(|s| (*s).to_owned()).collect(),
        status,
        categories: Vec::new(),
        custom: false,
    }
}

/// The built-in kinds: what egret's agent watches and writes, plus what kubectl users apply
/// beside it.
pub fn builtins() -> Vec<ResourceType> {
    let mut types = vec![
        builtin("", "namespaces", "Namespace", false, &["ns"], true),
        builtin("", "pods", "Pod", true, &["po"], true),
        builtin("", "services", "Service", true, &["svc"], true),
        builtin("", "nodes", "Node", false, &["no"], true),
        builtin("", "events", "Event", true, &["ev"], false),
        builtin("", "configmaps", "ConfigMap", true, &["cm"], false),
        builtin("", "secrets", "Secret", true, &[], false),
        builtin(
            "",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
        ),
        builtin("", "endpoints", "Endpoints", true, &["ep"], false),
        builtin(
            "discovery.k8s.io",
            "endpointslices",
            "EndpointSlice",
            true,
            &[],
            false,
        ),
        builtin(
            "networking.k8s.io",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
            false,
        ),
        builtin("coordination.k8s.io", "leases", "Lease", true, &[], false),
        builtin("events.k8s.io", "events", "Event", true, &["ev"], false),
        builtin(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
        ),
        builtin("apps", "deployments", "Deployment", true, &["deploy"], true),
        builtin("apps", "replicasets", "ReplicaSet", true, &["rs"], true),
        builtin("apps", "daemonsets", "DaemonSet", true, &["ds"], true),
        builtin("apps", "statefulsets", "StatefulSet", true, &["sts"], true),
        // Stored and served, not enforced: installing egret (`kubectl apply -k manifests/`)
        // creates them, and its tests read them back.
        builtin(
            "rbac.authorization.k8s.io",
            "roles",
            "Role",
            true,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
        ),
    ];
    for t in &mut types {
        if matches!(
            t.plural.as_str(),
            "pods" | "services" | "deployments" | "replicasets" | "daemonsets" | "statefulsets"
        ) {
            t.categories = vec!["all".to_owned()];
        }
    }
    types
}

/// The resource type a CustomResourceDefinition object declares, or why it declares none.
pub fn from_crd(crd: &Value) -> Result<ResourceType, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let plural = names
        .get("plural")
        .and_then(Value::as_str)
        .ok_or("spec.names.plural: Required value")?;
    let kind = names
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("spec.names.kind: Required value")?;
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map_or_else(|| kind.to_lowercase(), str::to_owned);
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let scope = spec
        .get("scope")
        .and_then(Value::as_str)
        .ok_or("spec.scope: Required value")?;
    let namespaced = match scope {
        "Namespaced" => true,
        "Cluster" => false,
        other => return Err(format!("spec.scope: Unsupported value: {other:?}")),
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions: Required value")?;
    let mut served = Vec::new();
    let mut status = false;
    for v in versions {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or("spec.versions[].name: Required value")?;
        if !v.get("served").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        if v.pointer("/subresources/status").is_some() {
            status = true;
        }
        // The storage version is the one the real server prefers in discovery.
        if v.get("storage").and_then(Value::as_bool).unwrap_or(false) {
            served.insert(0, name.to_owned());
        } else {
            served.push(name.to_owned());
        }
    }
    if served.is_empty() {
        return Err("spec.versions: Invalid value: must have at least one served version".into());
    }
    let expected = format!("{plural}.{group}");
    let name = crd.pointer("/metadata/name").and_then(Value::as_str);
    if name != Some(expected.as_str()) {
        return Err(format!(
            "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"
        ));
    }
    Ok(ResourceType {
        group: group.to_owned(),
        versions: served,
        plural: plural.to_owned(),
        singular,
        kind: kind.to_owned(),
        namespaced,
        short_names: strings(names.get("shortNames")),
        status,
        categories: strings(names.get("categories")),
        custom: true,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn crd_declares_a_cluster_scoped_type_with_status() {
        let crd = json!({
            "metadata": {"name": "egresspolicies.egret.dev"},
            "spec": {
                "group": "egret.dev",
                "scope": "Cluster",
                "names": {"plural": "egresspolicies", "kind": "EgressPolicy", "shortNames": ["egp"]},
                "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                              "subresources": {"status": {}}}],
            }
        });
        let t = from_crd(&crd).expect("valid CRD");
        assert_eq!(t.group, "egret.dev");
        assert_eq!(t.versions, ["v1alpha1"]);
        assert!(!t.namespaced);
        assert!(t.status);
        assert_eq!(t.short_names, ["egp"]);
        assert_eq!(t.singular, "egresspolicy");
    }

    #[test]
    fn crd_name_must_match_plural_and_group() {
        let crd = json!({
            "metadata": {"name": "wrong.egret.dev"},
            "spec": {"group": "egret.dev", "scope": "Cluster",
                     "names": {"plural": "egresspolicies", "kind": "EgressPolicy"},
                     "versions": [{"name": "v1", "served": true, "storage": true}]}
        });
        let err = from_crd(&crd).expect_err("name mismatch");
        assert!(err.contains("metadata.name"), "{err}");
    }
}
