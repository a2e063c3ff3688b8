//! The `EgressPolicy` custom resource (`egret.dev/v1alpha1`, cluster-scoped), modelled on the
//! upstream AdminNetworkPolicy: priorities, ordered rules with Allow / Deny / Pass, and an Audit
//! mode. `cargo xtask codegen` writes its CRD to `manifests/crds/`; a test fails when that file
//! is stale.

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector},
    util::intstr::IntOrString,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Egress rules for the pods a subject selects, evaluated before NetworkPolicy.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "egret.dev",
    version = "v1alpha1",
    kind = "EgressPolicy",
    plural = "egresspolicies",
    shortname = "egp",
    status = "EgressPolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicySpec {
    /// Evaluation order: lower first (0 to 1000); ties are broken by name.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
    /// `Enforce` (default) or `Audit`: an Audit policy never changes a verdict; connections it
    /// would deny are allowed and counted as `audit`.
    #[serde(default)]
    pub mode: PolicyMode,
    /// The pods this policy governs.
    pub subject: Subject,
    /// Evaluated in order; the first rule whose peers and ports match decides. Names are
    /// unique (a list map keyed by name, so the API server refuses a repeated one).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<EgressRule>,
}

/// Whether a policy's decisions take effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyMode {
    #[default]
    Enforce,
    Audit,
}

/// Selects pods by their namespace's labels and their own; a missing selector matches all.
/// At least one must be given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.namespaceSelector) || has(self.podSelector)",
     "message": "must specify namespaceSelector and/or podSelector"}
]))]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// What a matching rule does.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum RuleAction {
    /// Allow, skipping everything after.
    Allow,
    /// Deny, whatever NetworkPolicy says.
    Deny,
    /// Skip the remaining EgressPolicies: NetworkPolicy (or the baseline) decides.
    Pass,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Unique within the policy; names the rule in metrics, logs and `egret explain`. A
    /// DNS-1123 label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    pub action: RuleAction,
    /// Destinations; the rule matches any of them. Must not be empty.
    #[schemars(length(min = 1))]
    pub to: Vec<EgressPeer>,
    /// Ports; the rule matches any of them. Empty or missing: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EgressPort>,
}

/// A destination: pods (`namespaceSelector` and/or `podSelector`, ANDed) or `networks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.networks) || (!has(self.namespaceSelector) && !has(self.podSelector))",
     "message": "networks may not be combined with namespaceSelector or podSelector"},
    {"rule": "has(self.networks) || has(self.namespaceSelector) || has(self.podSelector)",
     "message": "must specify networks, namespaceSelector or podSelector"}
]))]
pub struct EgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// CIDRs (IPv4 or IPv6); at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub networks: Option<Vec<String>>,
}

/// A port, as in NetworkPolicy: protocol (default TCP), number or named port, optional end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.protocol) || self.protocol in ['TCP', 'UDP', 'SCTP']",
     "message": "protocol must be TCP, UDP or SCTP"},
    {"rule": "!has(self.port) || type(self.port) == string || (self.port >= 1 && self.port <= 65535)",
     "message": "port must be between 1 and 65535, inclusive"},
    {"rule": "!has(self.endPort) || (has(self.port) && type(self.port) == int && self.endPort >= self.port && self.endPort <= 65535)",
     "message": "endPort needs a numeric port and must be between port and 65535"}
]))]
pub struct EgressPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
}

/// Written by the agent: whether the policy was accepted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EgressPolicyStatus {
    /// `Accepted`, or `Invalid` with a message naming the field.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn crd_is_cluster_scoped_with_status() {
        let crd = EgressPolicy::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "egret.dev");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }

    /// The cross-field rules `validate.rs` applies are declared in the CRD too, so the API
    /// server refuses what local mode refuses.
    #[test]
    fn crd_declares_the_cross_field_rules() {
        let yaml = super::super::crd_yaml().unwrap();
        for rule in [
            "has(self.namespaceSelector) || has(self.podSelector)",
            "networks may not be combined with namespaceSelector or podSelector",
            "must specify networks, namespaceSelector or podSelector",
            "protocol must be TCP, UDP or SCTP",
            "port must be between 1 and 65535, inclusive",
            "endPort needs a numeric port",
            "x-kubernetes-list-map-keys",
            "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        ] {
            assert!(yaml.contains(rule), "{rule} is not in the CRD");
        }
    }

    /// The checked-in CRD must be what the Rust type generates (`cargo xtask codegen`).
    #[test]
    fn checked_in_crd_is_not_stale() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/crds/egresspolicy.yaml");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            checked_in,
            super::super::crd_yaml().unwrap(),
            "{} is stale: run `cargo xtask codegen`",
            path.display()
        );
    }
}
