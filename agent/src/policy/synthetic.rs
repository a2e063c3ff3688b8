//! A synthetic cluster of a given size, for the compile benchmark (and anything else that needs
//! a large, realistic cluster without an API server). Deterministic: no randomness.
//!
//! Namespaces `ns-000`…, each with the same shape of pods and NetworkPolicies (default deny,
//! DNS to `ns-000`, app-to-app on a named port, HTTPS out with private ranges excepted, a port
//! range to another team), and cluster-wide EgressPolicies by priority (a metadata-address deny,
//! per-team allows, denies, Passes and Audit policies). Pods spread over nodes round-robin.

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};

use super::{cluster::Cluster, crd::EgressPolicy};

/// Sizes of a synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub namespaces: usize,
    pub pods_per_namespace: usize,
    pub network_policies_per_namespace: usize,
    pub egress_policies: usize,
    pub nodes: usize,
}

/// The node whose endpoints the benchmark compiles.
pub const NODE: &str = "node-0";

/// The pod at `index` in namespace `ns`: its labels and node follow from the indices.
pub fn pod(shape: &Shape, ns: usize, index: usize, app_shift: usize) -> Value {
    let global = ns * shape.pods_per_namespace + index;
    let (hi, lo) = (global / 256, global % 256);
    json!({
        "metadata": {"name": format!("p-{index:04}"), "namespace": format!("ns-{ns:03}"),
                     "labels": {"app": format!("app-{}", (index + app_shift) % 10), "tier": format!("{}", index % 3)}},
        "spec": {"nodeName": format!("node-{}", global % shape.nodes), "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080 + (index % 2), "protocol": "TCP"},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        // 198.18.0.0/15 (RFC 2544 benchmarking) and 2001:db8::/32: addresses nothing is sent to.
        "status": {"podIP": format!("198.18.{hi}.{lo}"),
                   "podIPs": [{"ip": format!("198.18.{hi}.{lo}")}, {"ip": format!("2001:db8:18::{global:x}")}]}
    })
}

fn network_policy(ns: usize, i: usize) -> Value {
    let name = format!("np-{i}");
    let meta = json!({"name": name, "namespace": format!("ns-{ns:03}")});
    let spec = match i {
        0 => json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        1 => json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}},
                    "podSelector": {"matchLabels": {"app": "app-0"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        2 => {
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["0", "1"]}]},
            "policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
            "ports": [{"port": 443}]}]})
        }
        3 => {
            json!({"podSelector": {"matchLabels": {"tier": "2"}}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (ns + 1) % 10)}}}],
            "ports": [{"port": 9000, "endPort": 9100}]}]})
        }
        k => {
            json!({"podSelector": {"matchLabels": {"app": format!("app-{}", k % 10)}}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (k + 1) % 10)}}}],
            "ports": [{"port": "http"}]}]})
        }
    };
    json!({"metadata": meta, "spec": spec})
}

fn egress_policy(i: usize) -> Value {
    let (team, next) = (format!("t{}", i % 10), format!("t{}", (i + 1) % 10));
    let spec = if i == 0 {
        json!({"priority": 0, "subject": {"podSelector": {}}, "rules": [
            {"name": "metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}], "ports": [{"port": 80}]}]})
    } else {
        json!({"priority": i % 1000, "mode": if i.is_multiple_of(7) { "Audit" } else { "Enforce" },
            "subject": {"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"tier": format!("{}", i % 3)}}},
            "rules": [
                {"name": "monitoring", "action": "Allow", "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-001"}},
                                                                   "podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}}}],
                 "ports": [{"port": 9090}]},
                {"name": "partners", "action": "Pass", "to": [{"namespaceSelector": {"matchLabels": {"team": next}}}]},
                {"name": "blocked-range", "action": "Deny", "to": [{"networks": [format!("203.0.{}.0/24", i % 256)]}]}]})
    };
    json!({"apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": format!("ep-{i:03}")}, "spec": spec})
}

/// Builds the cluster. `serde_json::from_value` of values built here cannot fail; a bug in
/// this generator shows as a missing object, which the benchmark's entry count would expose.
pub fn cluster(shape: &Shape) -> Cluster {
    let mut cluster = Cluster::default();
    for ns in 0..shape.namespaces {
        let name = format!("ns-{ns:03}");
        let v = json!({"metadata": {"name": name, "labels": {"team": format!("t{}", ns % 10)}}});
        if let Ok(n) = serde_json::from_value::<Namespace>(v) {
            cluster.namespaces.insert(name.clone(), n);
        }
        for index in 0..shape.pods_per_namespace {
            if let Ok(p) = serde_json::from_value::<Pod>(pod(shape, ns, index, 0)) {
                cluster
                    .pods
                    .insert((name.clone(), format!("p-{index:04}")), p);
            }
        }
        for i in 0..shape.network_policies_per_namespace {
            if let Ok(np) = serde_json::from_value::<NetworkPolicy>(network_policy(ns, i)) {
                cluster
                    .network_policies
                    .insert((name.clone(), format!("np-{i}")), np);
            }
        }
    }
    for i in 0..shape.egress_policies {
        if let Ok(ep) = serde_json::from_value::<EgressPolicy>(egress_policy(i)) {
            cluster.egress_policies.insert(format!("ep-{i:03}"), ep);
        }
    }
    cluster
}
