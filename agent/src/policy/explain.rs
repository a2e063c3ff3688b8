//! What decided a connection, and the answer `egret explain` prints. Answers come from the
//! compiled datapath entries through the userspace model of the kernel's lookup, so what
//! explain says is what the kernel does.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    compile::Compiled,
    crd::RuleAction,
    model::{PolicyKind, PolicyRef, Protocol, World},
};
use crate::datapath::Verdict;

/// The source of a decision; every datapath rule id stands for one. Serialized into the pinned
/// id table (`policy::ids`), so a variant's fields are part of the stored format.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Origin {
    /// The pod is not isolated for egress: the node's baseline applies.
    Baseline,
    /// An EgressPolicy rule matched.
    EgressRule {
        policy: String,
        rule: String,
        action: RuleAction,
    },
    /// A NetworkPolicy egress rule allowed it.
    NetworkPolicyRule {
        namespace: String,
        name: String,
        rule: usize,
    },
    /// The pod is isolated for egress (by this NetworkPolicy, the first in name order) and no
    /// rule allowed it.
    Isolation { namespace: String, name: String },
    /// The process's cgroup is below a guard and no endpoint yet: denied until the agent
    /// writes its policy (the datapath's `RULE_PENDING`; no compiled rule has it).
    Pending,
    /// A connection to a Service address on a port the Service does not expose.
    ServiceNoPort { namespace: String, name: String },
    /// A connection to a Service port whose ready endpoints the policy does not treat alike:
    /// denied. Names one allowed and one denied endpoint (`address:port`).
    ServiceEndpointsDisagree {
        namespace: String,
        name: String,
        allowed: String,
        denied: String,
    },
}

impl Origin {
    /// The deciding rule's name: an EgressPolicy rule's own, `egress[i]` for a NetworkPolicy
    /// rule; `None` for the baseline and for NetworkPolicy isolation.
    pub fn rule_label(&self) -> Option<String> {
        match self {
            Self::EgressRule { rule, .. } => Some(rule.clone()),
            Self::NetworkPolicyRule { rule, .. } => Some(format!("egress[{rule}]")),
            Self::ServiceNoPort { .. } => Some("no-such-port".into()),
            Self::ServiceEndpointsDisagree { .. } => Some("endpoints-disagree".into()),
            Self::Baseline | Self::Isolation { .. } | Self::Pending => None,
        }
    }

    /// The `policy` label of metrics and logs: `EgressPolicy name`, `NetworkPolicy ns/name`,
    /// or `default` for the baseline.
    pub fn policy_label(&self) -> String {
        match self {
            Self::Baseline => "default".into(),
            Self::Pending => "pending".into(),
            Self::ServiceNoPort { namespace, name }
            | Self::ServiceEndpointsDisagree {
                namespace, name, ..
            } => format!("Service {namespace}/{name}"),
            Self::EgressRule { policy, .. } => format!("EgressPolicy {policy}"),
            Self::NetworkPolicyRule {
                namespace, name, ..
            }
            | Self::Isolation { namespace, name } => {
                format!("NetworkPolicy {namespace}/{name}")
            }
        }
    }
}

/// The answer for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub verdict: Verdict,
    /// The deciding policy; `None` when the baseline decided.
    pub policy: Option<PolicyRef>,
    /// The deciding rule's name (`egress[i]` for NetworkPolicy rules).
    pub rule: Option<String>,
    pub reason: String,
}

impl Answer {
    /// Describes `verdict` given by `origin` for a connection to `to`.
    pub fn new(verdict: Verdict, origin: &Origin, baseline: Verdict, to: &str) -> Self {
        let word = |v: Verdict| match v {
            Verdict::Allow => "allows",
            Verdict::Deny => "denies",
            Verdict::Audit => "would deny (audit)",
        };
        match origin {
            Origin::Baseline => Self {
                verdict,
                policy: None,
                rule: None,
                reason: format!(
                    "no policy isolates the pod for egress; the node baseline ({}) {} {to}",
                    if baseline == Verdict::Deny {
                        "default deny"
                    } else {
                        "allow"
                    },
                    word(verdict)
                ),
            },
            Origin::EgressRule { policy, rule, .. } => Self {
                verdict,
                policy: Some(PolicyRef {
                    kind: PolicyKind::EgressPolicy,
                    namespace: None,
                    name: policy.clone(),
                }),
                rule: Some(rule.clone()),
                reason: if verdict == Verdict::Audit {
                    format!(
                        "Audit EgressPolicy {policy} rule {rule} would deny {to}; allowed and counted as audit"
                    )
                } else {
                    format!("EgressPolicy {policy} rule {rule} {} {to}", word(verdict))
                },
            },
            Origin::NetworkPolicyRule {
                namespace,
                name,
                rule,
            } => Self {
                verdict,
                policy: Some(PolicyRef {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some(namespace.clone()),
                    name: name.clone(),
                }),
                rule: origin.rule_label(),
                reason: format!(
                    "NetworkPolicy {namespace}/{name} rule egress[{rule}] {} {to}",
                    word(verdict)
                ),
            },
            Origin::Isolation { namespace, name } => Self {
                verdict,
                policy: Some(PolicyRef {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some(namespace.clone()),
                    name: name.clone(),
                }),
                rule: None,
                reason: format!(
                    "NetworkPolicy {namespace}/{name} isolates the pod for egress and no NetworkPolicy rule allows {to}"
                ),
            },
            Origin::ServiceNoPort { namespace, name } => Self {
                verdict,
                policy: None,
                rule: origin.rule_label(),
                reason: format!(
                    "{to} is an address of Service {namespace}/{name}, which exposes no such port: denied (nothing would answer)"
                ),
            },
            Origin::ServiceEndpointsDisagree {
                namespace,
                name,
                allowed,
                denied,
            } => Self {
                verdict,
                policy: None,
                rule: origin.rule_label(),
                reason: format!(
                    "{to} is Service {namespace}/{name}, whose ready endpoints the policy does not treat alike (endpoint {allowed} allowed, endpoint {denied} denied): denied"
                ),
            },
            Origin::Pending => Self {
                verdict,
                policy: None,
                rule: None,
                reason: format!(
                    "the workload's cgroup is not written yet and lies below a guard: {} {to} until its policy is",
                    word(verdict)
                ),
            },
        }
    }
}

/// Errors of `explain`; each names the pod or address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("no pod {0} in the given files")]
    NoPod(String),
    #[error("pod {0} has no IP address in status.podIP or status.podIPs")]
    NoAddress(String),
    #[error("{0:?} is neither an IP address nor namespace/pod")]
    BadTarget(String),
    #[error("protocol {0:?} is not TCP, UDP or SCTP")]
    BadProtocol(String),
}

/// Resolves `ns/pod` or an IP address to the destination address the kernel connects to (see
/// [`kernel_destination`]).
pub fn resolve_target(world: &World, to: &str) -> Result<IpAddr, ExplainError> {
    if let Ok(ip) = to.parse() {
        return Ok(kernel_destination(ip));
    }
    let (ns, name) = to
        .split_once('/')
        .ok_or_else(|| ExplainError::BadTarget(to.into()))?;
    let pod = world
        .pod(ns, name)
        .ok_or_else(|| ExplainError::NoPod(to.into()))?;
    pod.ips
        .first()
        .copied()
        .ok_or_else(|| ExplainError::NoAddress(to.into()))
}

/// Where the kernel sends a connection to `addr`, as the datapath decides it: an unspecified
/// address means loopback (`0.0.0.0` and `::ffff:0.0.0.0` reach `127.0.0.1`, `::` reaches
/// `::1`), and an IPv4-mapped address reaches its IPv4 host. (A socket bound to a local address
/// reaches that address instead of `127.0.0.1`; explain assumes an unbound socket.)
pub fn kernel_destination(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => kernel_destination(IpAddr::V4(v4)),
            None if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Answers for a connection from `from` (`ns/pod`) to `to` (IP or `ns/pod`), through the
/// compiled entries.
pub fn explain(
    world: &World,
    compiled: &Compiled,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Answer, ExplainError> {
    let (ns, name) = from
        .split_once('/')
        .ok_or_else(|| ExplainError::NoPod(from.into()))?;
    let endpoint = compiled
        .endpoints
        .get(&(ns.to_owned(), name.to_owned()))
        .ok_or_else(|| ExplainError::NoPod(from.into()))?;
    let addr = resolve_target(world, to)?;
    let lookup = compiled
        .desired
        .lookup(*endpoint, addr, protocol.number(), port);
    let (verdict, origin) = match lookup.entry {
        Some((_, decision)) => (decision.verdict, compiled.origin(decision.rule)),
        // Every compiled endpoint has a default entry; this mirrors ON_MISSING_POLICY.
        None => (Verdict::Allow, &Origin::Baseline),
    };
    Ok(Answer::new(
        verdict,
        origin,
        compiled.baseline,
        &describe(to, addr, protocol, port),
    ))
}

/// `10.0.0.1:80/TCP`, `ns/pod (10.0.0.1):80/TCP`, or `0.0.0.0 (127.0.0.1):80/TCP` when the
/// kernel connects elsewhere than the address given.
pub fn describe(to: &str, addr: IpAddr, protocol: Protocol, port: u16) -> String {
    let host = match to.parse::<IpAddr>() {
        Ok(given) if given == addr => addr.to_string(),
        _ => format!("{to} ({addr})"),
    };
    format!("{host}:{port}/{protocol}")
}

/// One probe of the batch form: `{"from","to","port","protocol"}` (protocol defaults to TCP).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

impl Probe {
    /// Answers this probe.
    pub fn answer(&self, world: &World, compiled: &Compiled) -> Result<Answer, ExplainError> {
        let protocol = Protocol::parse(&self.protocol)
            .ok_or_else(|| ExplainError::BadProtocol(self.protocol.clone()))?;
        explain(world, compiled, &self.from, &self.to, protocol, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_and_mapped_destinations_are_where_the_kernel_connects() {
        let cases = [
            ("0.0.0.0", "127.0.0.1"),
            ("::", "::1"),
            ("::ffff:0.0.0.0", "127.0.0.1"),
            ("::ffff:192.0.2.10", "192.0.2.10"),
            ("192.0.2.10", "192.0.2.10"),
            ("2001:db8::1", "2001:db8::1"),
        ];
        for (given, reached) in cases {
            let given: IpAddr = given.parse().unwrap();
            assert_eq!(kernel_destination(given).to_string(), reached, "{given}");
        }
        let world = World::default();
        assert_eq!(
            resolve_target(&world, "0.0.0.0").unwrap().to_string(),
            "127.0.0.1"
        );
        assert_eq!(
            describe("0.0.0.0", "127.0.0.1".parse().unwrap(), Protocol::Tcp, 80),
            "0.0.0.0 (127.0.0.1):80/TCP"
        );
    }
}
