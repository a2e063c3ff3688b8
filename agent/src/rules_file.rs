//! A datapath-level rules file: endpoints by cgroup path, each with ordered first-match rules
//! over CIDRs, protocols and ports. It drives the datapath without Kubernetes semantics, for
//! tests, the interim demo, and debugging what the kernel does with a given rule list.
//!
//! ```json
//! {"endpoints": [{"cgroup": "/sys/fs/cgroup/app", "id": 1, "default": "allow",
//!   "rules": [{"to": ["192.0.2.10/32"], "l4": {"ports": {"protocol": 6, "first": 80, "last": 80}},
//!              "action": {"verdict": "deny", "rule": 1}}]}]}
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        CgroupRole, Decision, DesiredState, EndpointId, Verdict,
        lower::{EndpointRules, Rule, first_match, lower},
    },
    sys::{self, SysError},
};

/// Errors of this module; each names the file or the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum RulesFileError {
    #[error("failed to read rules file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("rules file {path}: endpoint id {id} is used twice")]
    DuplicateEndpoint { path: PathBuf, id: EndpointId },
    #[error("rules file: endpoint {id}: field `cgroup`")]
    Cgroup {
        id: EndpointId,
        #[source]
        source: SysError,
    },
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    pub endpoints: Vec<EndpointSpec>,
}

/// One endpoint and its rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// cgroup v2 directory of the endpoint.
    pub cgroup: PathBuf,
    pub id: EndpointId,
    /// Verdict when no rule matches (rule id 0).
    #[serde(default = "default_verdict")]
    pub default: Verdict,
    #[serde(default)]
    pub rules: Vec<Rule<Decision>>,
}

fn default_verdict() -> Verdict {
    Verdict::Allow
}

impl RulesFile {
    /// Reads and checks a rules file.
    pub fn load(path: &std::path::Path) -> Result<Self, RulesFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesFileError::Read {
            path: path.into(),
            source,
        })?;
        let file: Self = serde_json::from_str(&text).map_err(|source| RulesFileError::Parse {
            path: path.into(),
            source,
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for endpoint in &file.endpoints {
            if !seen.insert(endpoint.id) {
                return Err(RulesFileError::DuplicateEndpoint {
                    path: path.into(),
                    id: endpoint.id,
                });
            }
        }
        Ok(file)
    }

    /// The datapath entries the rules lower to.
    pub fn desired(&self) -> DesiredState {
        let defaults: BTreeMap<EndpointId, Verdict> =
            self.endpoints.iter().map(|e| (e.id, e.default)).collect();
        let endpoints: Vec<EndpointRules<Decision>> = self
            .endpoints
            .iter()
            .map(|e| EndpointRules {
                endpoint: e.id,
                rules: e.rules.clone(),
            })
            .collect();
        lower(
            &endpoints,
            first_match(|endpoint| Decision {
                verdict: defaults.get(&endpoint).copied().unwrap_or(Verdict::Allow),
                rule: egret_common::RULE_DEFAULT,
            }),
        )
    }

    /// cgroup id -> role (the endpoint of the given id), resolving each cgroup path.
    pub fn cgroup_ids(&self) -> Result<BTreeMap<u64, CgroupRole>, RulesFileError> {
        self.endpoints
            .iter()
            .map(|e| {
                sys::cgroup_id(&e.cgroup)
                    .map(|cgroup| (cgroup, CgroupRole::Endpoint(e.id)))
                    .map_err(|source| RulesFileError::Cgroup { id: e.id, source })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn example_rules_file_means_what_it_says() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/rules.json");
        let file = RulesFile::load(&path).unwrap();
        let state = file.desired();
        let decide = |addr: &str, protocol: u8, port: u16| {
            state
                .lookup(1, addr.parse().unwrap(), protocol, port)
                .entry
                .unwrap()
                .1
        };
        let d = |verdict, rule| Decision { verdict, rule };
        assert_eq!(decide("192.0.2.10", 6, 443), d(Verdict::Allow, 1));
        assert_eq!(decide("192.0.2.10", 6, 80), d(Verdict::Deny, 0));
        assert_eq!(decide("2001:db8::1", 17, 53), d(Verdict::Allow, 2));
        assert_eq!(decide("198.51.100.5", 6, 22), d(Verdict::Audit, 3));
        assert_eq!(decide("198.51.100.200", 6, 22), d(Verdict::Deny, 0));
    }

    #[test]
    fn malformed_rules_file_names_the_file_and_field() {
        let dir = std::env::temp_dir().join(format!("egret-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.json");
        std::fs::write(&path, r#"{"endpoints": [{"cgroup": "/x", "id": 1, "rules": [{"to": ["192.0.2.0/33"], "action": {"verdict": "deny", "rule": 1}}]}]}"#).unwrap();
        let err = RulesFile::load(&path).unwrap_err();
        let message = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(message.contains("bad.json"), "{message}");
        assert!(
            message.contains("invalid IP address") || message.contains("prefix"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
