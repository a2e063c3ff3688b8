//! Cluster state as plain Kubernetes objects, and reading it from YAML: files or directories
//! holding any mix of Namespace, Pod, NetworkPolicy and EgressPolicy documents (multi-document
//! files, and `kind: List` as `kubectl get -o yaml` prints it).
//!
//! A document that cannot be read is reported with its file, index, kind and name and the field
//! serde stopped at; the others still load.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;

use super::{
    crd::EgressPolicy,
    model::{PolicyKind, PolicyRef},
};

/// The objects a compile starts from, keyed by (namespace, name) or name.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub network_policies: BTreeMap<(String, String), NetworkPolicy>,
    pub egress_policies: BTreeMap<String, EgressPolicy>,
    /// The file each policy came from, to name it in errors.
    pub sources: BTreeMap<PolicyRef, PathBuf>,
}

/// A document that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: document {index} is not valid YAML: {message}", path.display())]
    Yaml {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{}: document {index} ({object}): {detail}", path.display())]
    Decode {
        path: PathBuf,
        index: usize,
        /// Kind and name, e.g. `NetworkPolicy allow-dns`.
        object: String,
        /// The field serde stopped at and why.
        detail: String,
    },
    #[error("{}: document {index}: unsupported kind `{kind}` (apiVersion `{api_version}`)", path.display())]
    UnknownKind {
        path: PathBuf,
        index: usize,
        kind: String,
        api_version: String,
    },
}

impl Cluster {
    /// Loads every `.yaml`, `.yml` and `.json` file under `paths` (files, or directories walked
    /// in name order). Returns what loaded and an error per document that did not.
    pub fn load(paths: &[PathBuf]) -> (Self, Vec<LoadError>) {
        let mut cluster = Self::default();
        let mut errors = Vec::new();
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files, &mut errors);
        }
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => errors.extend(cluster.add_yaml(&file, &text)),
                Err(source) => errors.push(LoadError::Read { path: file, source }),
            }
        }
        (cluster, errors)
    }

    /// The file `policy` was read from.
    pub fn source_of(&self, policy: &PolicyRef) -> Option<&PathBuf> {
        self.sources.get(policy)
    }

    /// The files [`Self::load`] reads for `paths`, in order.
    pub fn files(paths: &[PathBuf]) -> Vec<PathBuf> {
        let (mut files, mut errors) = (Vec::new(), Vec::new());
        for path in paths {
            collect_files(path, &mut files, &mut errors);
        }
        files
    }

    /// Adds the documents of one YAML text; `path` only names them in errors.
    pub fn add_yaml(&mut self, path: &Path, text: &str) -> Vec<LoadError> {
        let mut errors = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(document) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(value) => value,
                Err(err) => {
                    errors.push(LoadError::Yaml {
                        path: path.into(),
                        index,
                        message: err.to_string(),
                    });
                    // The rest of the stream cannot be trusted after a syntax error.
                    break;
                }
            };
            if let Err(err) = self.add_value(path, index, value) {
                errors.push(err);
            }
        }
        errors
    }

    fn add_value(
        &mut self,
        path: &Path,
        index: usize,
        value: serde_yaml::Value,
    ) -> Result<(), LoadError> {
        let field = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (kind, api_version) = (field("kind"), field("apiVersion"));
        match (kind.as_str(), api_version.as_str()) {
            ("List", _) => {
                let items = value
                    .get("items")
                    .and_then(|v| v.as_sequence())
                    .cloned()
                    .unwrap_or_default();
                for item in items {
                    self.add_value(path, index, item)?;
                }
            }
            ("Namespace", "v1") => {
                let ns: Namespace = decode(path, index, &kind, value)?;
                self.namespaces
                    .insert(ns.metadata.name.clone().unwrap_or_default(), ns);
            }
            ("Pod", "v1") => {
                let pod: Pod = decode(path, index, &kind, value)?;
                self.pods.insert(key(&pod.metadata), pod);
            }
            ("NetworkPolicy", "networking.k8s.io/v1") => {
                let np: NetworkPolicy = decode(path, index, &kind, value)?;
                let (namespace, name) = key(&np.metadata);
                self.sources.insert(
                    PolicyRef {
                        kind: PolicyKind::NetworkPolicy,
                        namespace: Some(namespace.clone()),
                        name: name.clone(),
                    },
                    path.into(),
                );
                self.network_policies.insert((namespace, name), np);
            }
            ("EgressPolicy", "egret.dev/v1alpha1") => {
                let ep: EgressPolicy = decode(path, index, &kind, value)?;
                self.egress_policies
                    .insert(ep.metadata.name.clone().unwrap_or_default(), ep);
            }
            _ => {
                return Err(LoadError::UnknownKind {
                    path: path.into(),
                    index,
                    kind,
                    api_version,
                });
            }
        }
        Ok(())
    }
}

/// (namespace, name); objects without a namespace live in `default`, as `kubectl apply` puts them.
fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn decode<T: DeserializeOwned>(
    path: &Path,
    index: usize,
    kind: &str,
    value: serde_yaml::Value,
) -> Result<T, LoadError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    serde_path_to_error::deserialize(value).map_err(|err| {
        let field = err.path().to_string();
        LoadError::Decode {
            path: path.into(),
            index,
            object: format!("{kind} {name}"),
            detail: format!("field `{field}`: {}", err.into_inner()),
        }
    })
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(source) => {
                errors.push(LoadError::Read {
                    path: path.into(),
                    source,
                });
                return;
            }
        };
        entries.sort();
        for entry in entries {
            let yaml = entry
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
            if entry.is_dir() || yaml {
                collect_files(&entry, files, errors);
            }
        }
    } else {
        files.push(path.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_multi_document_yaml_and_lists_and_reports_bad_documents() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  status: {podIP: 192.0.2.1}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec:
  podSelector: {}
  egress:
  - ports: [{port: [1, 2]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
"#;
        let mut cluster = Cluster::default();
        let errors = cluster.add_yaml(Path::new("cluster.yaml"), text);
        assert_eq!(cluster.namespaces.len(), 1);
        assert_eq!(cluster.pods.len(), 1);
        assert!(cluster.network_policies.is_empty());
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].contains("NetworkPolicy broken")
                && messages[0].contains("spec.egress[0].ports[0].port"),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].contains("unsupported kind `Deployment`"),
            "{}",
            messages[1]
        );
    }
}
