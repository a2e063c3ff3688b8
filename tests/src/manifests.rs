//! The shipped manifests as a cluster would get them (`kubectl kustomize`), and what their RBAC
//! grants, for the installation tests and the agent's end-to-end tests.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// `manifests/` of this repository.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// The documents `kubectl kustomize manifests/<variant>` builds (offline), as JSON values.
pub fn build(variant: &str) -> Result<Vec<Value>, String> {
    let path = dir().join(variant);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .map_err(|e| {
            format!(
                "kubectl kustomize {}: {e} (`cargo xtask setup` installs kubectl)",
                path.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "kubectl kustomize {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("kubectl kustomize {}: output: {e}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The capabilities the shipped DaemonSet adds, lowercase as `setpriv` names them (`bpf`, ...).
pub fn daemonset_capabilities() -> Vec<String> {
    let docs = build("").unwrap_or_else(|e| panic!("{e}"));
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "egret")
        .and_then(|ds| {
            ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                ["add"]
                .as_array()
        })
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_lowercase))
        .collect()
}

/// One API call, as the test API server records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// Empty for cluster-scoped and all-namespace calls.
    pub namespace: String,
    /// Empty for collections.
    pub name: String,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(f, "{} {group} {}{sub}", self.verb, self.resource)?;
        if !self.namespace.is_empty() {
            write!(f, " in {}", self.namespace)?;
        }
        if !self.name.is_empty() {
            write!(f, " named {}", self.name)?;
        }
        Ok(())
    }
}

/// One RBAC rule, where it applies.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The Role's namespace; `None` for a ClusterRole bound cluster-wide.
    pub namespace: Option<String>,
    pub role: String,
    pub groups: Vec<String>,
    /// `pods`, or `egresspolicies/status` for a subresource.
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    /// Empty: any name.
    pub names: Vec<String>,
}

impl Grant {
    /// Whether this rule allows `call`.
    pub fn allows(&self, call: &Call) -> bool {
        let resource = if call.subresource.is_empty() {
            call.resource.clone()
        } else {
            format!("{}/{}", call.resource, call.subresource)
        };
        self.namespace
            .as_ref()
            .is_none_or(|ns| ns == &call.namespace)
            && self.groups.contains(&call.group)
            && self.resources.contains(&resource)
            && self.verbs.contains(&call.verb)
            && (self.names.is_empty() || self.names.contains(&call.name))
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// Every rule the documents grant the ServiceAccount `namespace/name`, through RoleBindings and
/// ClusterRoleBindings.
pub fn grants(docs: &[Value], namespace: &str, name: &str) -> Vec<Grant> {
    let binds_us = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == name && s["namespace"] == namespace
            })
    };
    let role = |kind: &str, role: &str, ns: Option<&str>| {
        docs.iter().find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"] == role
                && ns.is_none_or(|ns| d["metadata"]["namespace"] == ns)
        })
    };
    let mut out = Vec::new();
    for binding in docs.iter().filter(|d| binds_us(d)) {
        let (scope, role_doc) = match (
            binding["kind"].as_str(),
            binding["roleRef"]["kind"].as_str(),
        ) {
            (Some("ClusterRoleBinding"), Some("ClusterRole")) => (
                None,
                role(
                    "ClusterRole",
                    binding["roleRef"]["name"].as_str().unwrap_or_default(),
                    None,
                ),
            ),
            (Some("RoleBinding"), Some(kind)) => {
                let ns = binding["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default();
                let role_ns = (kind == "Role").then_some(ns);
                (
                    Some(ns.to_owned()),
                    role(
                        kind,
                        binding["roleRef"]["name"].as_str().unwrap_or_default(),
                        role_ns,
                    ),
                )
            }
            _ => continue,
        };
        let Some(role_doc) = role_doc else { continue };
        for rule in role_doc["rules"].as_array().into_iter().flatten() {
            out.push(Grant {
                namespace: scope.clone(),
                role: role_doc["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                names: strings(&rule["resourceNames"]),
            });
        }
    }
    out
}
