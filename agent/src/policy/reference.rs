//! A straightforward evaluator of the semantics in `docs/policy.md`, straight from the validated
//! policies: no address classes, no lowering, no tries. Property tests hold the compiled
//! datapath (what `egret explain` and the kernel answer from) to agree with it.

use std::net::IpAddr;

use super::{
    crd::RuleAction,
    explain::Origin,
    model::{Namespaces, Peer, PodInfo, PortMatch, PortSpec, World},
};
use crate::datapath::Verdict;

/// The verdict and its origin for `from` connecting to `dest`:`port` over IP protocol
/// `protocol`.
pub fn evaluate(
    world: &World,
    baseline: Verdict,
    from: &PodInfo,
    dest: IpAddr,
    protocol: u8,
    port: u16,
) -> (Verdict, Origin) {
    // The kernel decides an IPv4-mapped IPv6 destination by the IPv4 rules.
    let dest = match dest {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dest, IpAddr::V4),
        v4 => v4,
    };
    let dest_pod = world
        .pods
        .iter()
        .find(|p| !p.host_network && p.ips.contains(&dest));
    let peer_matches = |peer: &Peer| match peer {
        Peer::Block { cidr, except } => {
            cidr.contains(&dest) && !except.iter().any(|x| x.contains(&dest))
        }
        Peer::Pods { namespaces, pods } => dest_pod.is_some_and(|dp| {
            pods.matches(&dp.labels)
                && match namespaces {
                    Namespaces::Only(ns) => ns == &dp.namespace,
                    Namespaces::Matching(sel) => world
                        .namespace_labels(&dp.namespace)
                        .is_some_and(|labels| sel.matches(labels)),
                }
        }),
    };
    let port_matches = |spec: &PortSpec| {
        spec.protocol.number() == protocol
            && match &spec.port {
                PortMatch::All => true,
                PortMatch::Range(first, last) => (*first..=*last).contains(&port),
                PortMatch::Named(name) => dest_pod.is_some_and(|dp| {
                    dp.ports.iter().any(|np| {
                        &np.name == name && np.protocol == spec.protocol && np.number == port
                    })
                }),
            }
    };
    let ports_match =
        |ports: Option<&[PortSpec]>| ports.is_none_or(|list| list.iter().any(port_matches));

    let egress = |include_audit: bool| -> Option<(Verdict, Origin)> {
        for ep in &world.egress_policies {
            if (ep.audit && !include_audit) || !world.subject_selects(ep, from) {
                continue;
            }
            for rule in &ep.rules {
                if rule.to.iter().any(peer_matches) && ports_match(rule.ports.as_deref()) {
                    let origin = Origin::EgressRule {
                        policy: ep.name.clone(),
                        rule: rule.name.clone(),
                        action: rule.action,
                    };
                    return match rule.action {
                        RuleAction::Allow => Some((Verdict::Allow, origin)),
                        RuleAction::Deny => Some((Verdict::Deny, origin)),
                        RuleAction::Pass => None,
                    };
                }
            }
        }
        None
    };
    let network_policy = || -> (Verdict, Origin) {
        let isolating: Vec<_> = world.isolating(from).collect();
        let Some(first) = isolating.first() else {
            return (baseline, Origin::Baseline);
        };
        for np in &isolating {
            for (i, rule) in np.rules.iter().enumerate() {
                let to_matches = rule
                    .to
                    .as_ref()
                    .is_none_or(|peers| peers.iter().any(peer_matches));
                if to_matches && ports_match(rule.ports.as_deref()) {
                    return (
                        Verdict::Allow,
                        Origin::NetworkPolicyRule {
                            namespace: np.namespace.clone(),
                            name: np.name.clone(),
                            rule: i,
                        },
                    );
                }
            }
        }
        (
            Verdict::Deny,
            Origin::Isolation {
                namespace: first.namespace.clone(),
                name: first.name.clone(),
            },
        )
    };

    let real = egress(false).unwrap_or_else(network_policy);
    let with_audit = egress(true).unwrap_or_else(network_policy);
    if real.0 == Verdict::Allow && with_audit.0 == Verdict::Deny {
        (Verdict::Audit, with_audit.1)
    } else {
        real
    }
}
