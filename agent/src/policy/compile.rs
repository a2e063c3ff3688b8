//! The policy compiler: validated cluster state in, the datapath entries for this node's
//! endpoints out. Pure: no I/O, no clock; the same input gives the same, sorted output.
//!
//! Each endpoint (pod) gets an ordered rule list: the rules of the EgressPolicies whose subject
//! selects it, by priority, then the egress rules of the NetworkPolicies of its namespace. Peers
//! become address sets (pod IPs, CIDRs with exceptions), named ports become one rule per
//! destination pod. [`crate::datapath::lower`] finds which rules match each (address, protocol,
//! port) region, and [`decide`] applies the semantics of `docs/policy.md` to them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
    sync::Arc,
};

use egret_common::RULE_DEFAULT;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    crd::RuleAction,
    explain::Origin,
    ids::{EndpointName, IdTable},
    model::{Peer, PodInfo, PolicyKind, PolicyRef, PortMatch, PortSpec, World},
    services::{ServiceInfo, ServiceVerdict, decide_port},
};
use crate::datapath::{
    ClassId, Decision, DesiredState, EndpointId, PolicyMatch, PortPrefix, RuleId, Verdict,
    lower::{AddrSet, L4, LowerMemo, SetEndpoint, SetRule, lower_sets_with},
};

/// How the node treats pods no NetworkPolicy isolates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// `Allow` (Kubernetes' default), or `Deny` for a REGISTRY_ONLY-style default deny.
    pub baseline: Verdict,
    /// Only pods on this node become endpoints; `None`: every pod (explain).
    pub node: Option<String>,
    /// The most policy entries one policy may need for this node's endpoints ([`Budget`]).
    pub max_policy_entries: usize,
}

/// Default of [`CompileOptions::max_policy_entries`]: a tenth of the policy map's default
/// capacity for one generation, so that ten policies at the limit still fit beside each other.
pub const DEFAULT_MAX_POLICY_ENTRIES: usize = 50_000;

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            baseline: Verdict::Allow,
            node: None,
            max_policy_entries: DEFAULT_MAX_POLICY_ENTRIES,
        }
    }
}

/// Rule name of the deny-everything rule that stands in for an EgressPolicy over its entry
/// budget.
pub const BUDGET_RULE: &str = "entry-budget";

/// A policy left out because its entries for this node's endpoints would exceed the per-policy
/// budget. Its pods do not lose a restriction by it: a NetworkPolicy over budget still isolates
/// its pods (with none of its rules allowing), an enforcing EgressPolicy over budget denies its
/// pods everything from its priority on (one rule, [`BUDGET_RULE`], whatever its own rules
/// were: they are what does not fit). An Audit one is left out (it enforces nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub policy: PolicyRef,
    /// Entries its rules need per endpoint, by themselves: each destination block or exception
    /// times each port prefix. Other policies' blocks can split this one's into more address
    /// classes, so a set can need more than the sum of its policies' numbers: the map check
    /// ([`crate::datapath::DatapathError::NoRoom`]) refuses such a set whole.
    pub per_endpoint: usize,
    /// This node's endpoints it selects.
    pub endpoints: usize,
    pub budget: usize,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            policy,
            per_endpoint,
            endpoints,
            budget,
        } = self;
        write!(
            f,
            "{policy}: rejected, over the per-policy entry budget: it needs up to {} policy entries \
             ({per_endpoint} per endpoint x {endpoints} endpoint(s) on this node), the budget is \
             {budget} (--max-policy-entries); its pods get none of its allows ({}), every other \
             policy is enforced",
            per_endpoint.saturating_mul(*endpoints),
            if policy.kind == PolicyKind::EgressPolicy {
                "an enforcing EgressPolicy denies them everything from its priority on, as rule entry-budget"
            } else {
                "they stay isolated by it"
            },
        )
    }
}

/// What a rule in an endpoint's list does once it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Egress {
        audit: bool,
        action: RuleAction,
        id: RuleId,
    },
    NetworkPolicy {
        id: RuleId,
    },
    /// Matches nothing: gives a Service address a class of its own (see `apply_services`).
    ClassMarker,
}

/// The endpoint id that holds the class markers while lowering; no cgroup ever maps to it and
/// its entries are dropped before the state is returned.
const CLASS_HOLDER: EndpointId = u32::MAX;

/// The compiler's output.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub desired: DesiredState,
    /// (namespace, pod) -> endpoint id, for the endpoints compiled now.
    pub endpoints: BTreeMap<(String, String), EndpointId>,
    /// Endpoint id -> (namespace, owning workload) of the endpoints compiled now.
    pub workloads: BTreeMap<EndpointId, (String, String)>,
    /// Every id the compiler knows, also of endpoints and rules that are gone: counts they
    /// made keep their names.
    pub ids: IdTable,
    pub baseline: Verdict,
    /// Policies over the per-policy entry budget, left out (see [`Budget`]).
    pub over_budget: Vec<Budget>,
}

impl Compiled {
    /// What rule `id` stands for (the baseline for unknown ids).
    pub fn origin(&self, id: RuleId) -> &Origin {
        self.ids.origin(id).unwrap_or(&Origin::Baseline)
    }

    /// Who endpoint `id` is, also when it is gone: (namespace, owning workload).
    pub fn workload(&self, id: EndpointId) -> Option<(String, String)> {
        if let Some(live) = self.workloads.get(&id) {
            return Some(live.clone());
        }
        self.ids.endpoint_name(id).map(
            |EndpointName {
                 namespace,
                 workload,
                 ..
             }| (namespace.clone(), workload.clone()),
        )
    }
}

/// Per endpoint: whether it is isolated, and by which NetworkPolicy's rule id.
struct EndpointContext {
    isolation: Option<RuleId>,
}

/// Compiles `world` for the endpoints `options` selects, from scratch.
pub fn compile(world: &World, options: &CompileOptions) -> Compiled {
    Compiler::new(world.clone(), options.clone()).compile()
}

/// A compiler that keeps what it worked out between compiles: rule ids, each rule's expansion
/// into address sets (until a change could alter it), class ids, and each endpoint's lowered
/// entries (reused while its inputs are the same). After a small change, such as one pod's
/// labels, a compile redoes only what that change touches.
pub struct Compiler {
    world: World,
    options: CompileOptions,
    /// Stable ids, kept across compiles (and, through the pipeline, across restarts).
    origins: IdTable,
    expander: Expander,
    memo: LowerMemo<Action>,
}

impl Compiler {
    pub fn new(world: World, options: CompileOptions) -> Self {
        Self::with_ids(world, options, IdTable::default())
    }

    /// A compiler that keeps the ids `ids` assigned before (an agent restart).
    pub fn with_ids(world: World, options: CompileOptions, ids: IdTable) -> Self {
        Self {
            world,
            options,
            origins: ids,
            expander: Expander::default(),
            memo: LowerMemo::default(),
        }
    }

    /// The options it compiles with.
    pub fn options(&self) -> &CompileOptions {
        &self.options
    }

    /// Changes the options; ids stay (a rule keeps its id whatever the baseline).
    pub fn set_options(&mut self, options: CompileOptions) {
        self.options = options;
        self.expander.cache.clear();
    }

    /// The id table, for the caller to store and to forget ids nothing refers to.
    pub fn ids_mut(&mut self) -> &mut IdTable {
        &mut self.origins
    }

    /// The rule ids the current world's policies stand for (whether or not a compiled endpoint
    /// uses them).
    pub fn live_rules(&mut self) -> std::collections::BTreeSet<RuleId> {
        let Self { world, origins, .. } = self;
        let mut live = std::collections::BTreeSet::from([RULE_DEFAULT]);
        for ep in &world.egress_policies {
            for rule in &ep.rules {
                live.insert(origins.rule(&egress_origin(&ep.name, &rule.name, rule.action)));
            }
        }
        for np in &world.network_policies {
            for i in 0..np.rules.len() {
                live.insert(origins.rule(&Origin::NetworkPolicyRule {
                    namespace: np.namespace.clone(),
                    name: np.name.clone(),
                    rule: i,
                }));
            }
            live.insert(origins.rule(&Origin::Isolation {
                namespace: np.namespace.clone(),
                name: np.name.clone(),
            }));
        }
        live
    }

    /// The validated cluster the compiler works on.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Replaces the whole cluster state (a policy was added, changed or removed). Every rule is
    /// expanded again, but address sets keep their ids when their content is the same, so
    /// classes keep theirs and the lowering reuses what did not change.
    pub fn set_world(&mut self, world: World) {
        self.world = world;
        self.expander.cache.clear();
    }

    /// Adds or replaces one pod. Only the expansions of rules that could name the pod, before
    /// or after, are dropped: rules whose pod peers could select it, and rules that resolve a
    /// named port on every pod their peers allow (no peers, or address blocks). Everything else
    /// stays expanded, so a pod's churn costs what it touches.
    pub fn update_pod(&mut self, pod: PodInfo) {
        let at = self
            .world
            .pods
            .binary_search_by(|p| (&p.namespace, &p.name).cmp(&(&pod.namespace, &pod.name)));
        let pod = Arc::new(pod);
        let old = match at {
            Ok(i) if self.world.pods[i] == pod => return,
            Ok(i) => Some(std::mem::replace(&mut self.world.pods[i], Arc::clone(&pod))),
            Err(_) => {
                self.world.insert_pod(Arc::clone(&pod));
                None
            }
        };
        self.forget_expansions_naming(old.as_deref(), Some(&pod));
    }

    /// Removes one pod (nothing if it is not there), dropping the expansions that could name
    /// it.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.world.remove_pod(namespace, name) {
            self.forget_expansions_naming(Some(&*old), None);
        }
    }

    /// Drops the cached expansion of every rule whose result may differ because `old` became
    /// `new` (either `None`: the pod was added or removed).
    fn forget_expansions_naming(&mut self, old: Option<&PodInfo>, new: Option<&PodInfo>) {
        let world = &self.world;
        let names = |to: Option<&[Peer]>, ports: Option<&[PortSpec]>| {
            let named = ports
                .is_some_and(|ports| ports.iter().any(|p| matches!(p.port, PortMatch::Named(_))));
            let selects = |peer: &Peer| {
                [old, new]
                    .into_iter()
                    .flatten()
                    .any(|pod| world.could_select(peer, pod))
            };
            match to {
                // Every destination: pods matter only through named ports.
                None => named,
                Some(peers) => peers.iter().any(|peer| match peer {
                    Peer::Pods { .. } => selects(peer),
                    Peer::Block { .. } => named,
                }),
            }
        };
        let mut stale = Vec::new();
        for ep in &world.egress_policies {
            for rule in &ep.rules {
                if names(Some(&rule.to), rule.ports.as_deref()) {
                    stale.push(egress_origin(&ep.name, &rule.name, rule.action));
                }
            }
        }
        for np in &world.network_policies {
            for (r, rule) in np.rules.iter().enumerate() {
                if names(rule.to.as_deref(), rule.ports.as_deref()) {
                    stale.push(Origin::NetworkPolicyRule {
                        namespace: np.namespace.clone(),
                        name: np.name.clone(),
                        rule: r,
                    });
                }
            }
        }
        for origin in stale {
            let id = self.origins.rule(&origin);
            self.expander.cache.remove(&id);
        }
    }

    /// Compiles the current state.
    pub fn compile(&mut self) -> Compiled {
        let Self {
            world,
            options,
            origins,
            expander,
            memo,
        } = self;
        // Intern every policy's rules up front, in policy order, so that ids do not depend on
        // which endpoints exist.
        for ep in &world.egress_policies {
            for rule in &ep.rules {
                origins.rule(&egress_origin(&ep.name, &rule.name, rule.action));
            }
        }
        for np in &world.network_policies {
            for i in 0..np.rules.len() {
                origins.rule(&Origin::NetworkPolicyRule {
                    namespace: np.namespace.clone(),
                    name: np.name.clone(),
                    rule: i,
                });
            }
            origins.rule(&Origin::Isolation {
                namespace: np.namespace.clone(),
                name: np.name.clone(),
            });
        }
        expander.collect_garbage();

        let sources: Vec<&PodInfo> = world
            .pods
            .iter()
            .map(AsRef::as_ref)
            .filter(|p: &&PodInfo| options.node.is_none() || p.node == options.node)
            .collect();
        let over_budget = over_budget(world, options, origins, expander, &sources);
        let rejected = |kind| {
            over_budget
                .iter()
                .filter(move |b| b.policy.kind == kind)
                .map(|b| (b.policy.namespace.as_deref(), b.policy.name.as_str()))
        };
        let rejected_egress: BTreeSet<&str> = rejected(PolicyKind::EgressPolicy)
            .map(|(_, name)| name)
            .collect();
        let rejected_np: BTreeSet<(Option<&str>, &str)> =
            rejected(PolicyKind::NetworkPolicy).collect();
        let everywhere = (!rejected_egress.is_empty()).then(|| {
            expander.set(
                vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
                Vec::new(),
            )
        });
        let mut endpoints = BTreeMap::new();
        let mut workloads = BTreeMap::new();
        let mut lists = Vec::with_capacity(sources.len());
        let mut contexts = HashMap::new();
        for pod in &sources {
            let id = origins.endpoint(&pod.namespace, &pod.name, &pod.workload);
            endpoints.insert((pod.namespace.clone(), pod.name.clone()), id);
            workloads.insert(id, (pod.namespace.clone(), pod.workload.clone()));
            let mut rules = Vec::new();
            for ep in world
                .egress_policies
                .iter()
                .filter(|ep| world.subject_selects(ep, pod))
            {
                if rejected_egress.contains(ep.name.as_str()) {
                    if let (false, Some(set)) = (ep.audit, everywhere) {
                        let id =
                            origins.rule(&egress_origin(&ep.name, BUDGET_RULE, RuleAction::Deny));
                        let action = Action::Egress {
                            audit: false,
                            action: RuleAction::Deny,
                            id,
                        };
                        rules.push(SetRule {
                            set,
                            l4: L4::Any,
                            action,
                        });
                    }
                    continue;
                }
                for rule in &ep.rules {
                    let rule_id = origins.rule(&egress_origin(&ep.name, &rule.name, rule.action));
                    let action = Action::Egress {
                        audit: ep.audit,
                        action: rule.action,
                        id: rule_id,
                    };
                    let expansion =
                        expander.expand(world, rule_id, Some(&rule.to), rule.ports.as_deref());
                    push_rules(&expansion, action, &mut rules);
                }
            }
            let mut isolation = None;
            for np in world.isolating(pod) {
                isolation.get_or_insert_with(|| {
                    origins.rule(&Origin::Isolation {
                        namespace: np.namespace.clone(),
                        name: np.name.clone(),
                    })
                });
                if rejected_np.contains(&(Some(np.namespace.as_str()), np.name.as_str())) {
                    continue;
                }
                for (r, rule) in np.rules.iter().enumerate() {
                    let rule_id = origins.rule(&Origin::NetworkPolicyRule {
                        namespace: np.namespace.clone(),
                        name: np.name.clone(),
                        rule: r,
                    });
                    let expansion =
                        expander.expand(world, rule_id, rule.to.as_deref(), rule.ports.as_deref());
                    push_rules(
                        &expansion,
                        Action::NetworkPolicy { id: rule_id },
                        &mut rules,
                    );
                }
            }
            contexts.insert(id, EndpointContext { isolation });
            lists.push(SetEndpoint {
                endpoint: id,
                rules,
            });
        }

        // Every Service address gets a class of its own, so that its entries can differ from
        // those of the addresses around it.
        let mut service_addresses: Vec<IpNet> = world
            .services
            .iter()
            .flat_map(|s| s.addresses.iter().map(|a| IpNet::from(*a)))
            .collect();
        service_addresses.sort();
        service_addresses.dedup();
        if !service_addresses.is_empty() {
            let rules = service_addresses
                .iter()
                .map(|net| SetRule {
                    set: expander.set(vec![*net], Vec::new()),
                    l4: L4::Any,
                    action: Action::ClassMarker,
                })
                .collect();
            lists.push(SetEndpoint {
                endpoint: CLASS_HOLDER,
                rules,
            });
        }

        let baseline = options.baseline;
        let mut desired = lower_sets_with(memo, &expander.sets, &lists, |endpoint, matching| {
            let isolation = contexts.get(&endpoint).and_then(|c| c.isolation);
            decide(matching.iter().map(|a| **a), isolation, baseline)
        });
        if !service_addresses.is_empty() {
            // The holder's id is the largest: its entries are the map's tail.
            drop(desired.policy.split_off(&PolicyMatch {
                endpoint: CLASS_HOLDER,
                class: None,
                protocol: None,
                port: None,
            }));
            let ids: Vec<EndpointId> = endpoints.values().copied().collect();
            apply_services(&mut desired, &world.services, &ids, origins);
        }
        Compiled {
            desired,
            endpoints,
            workloads,
            ids: origins.clone(),
            baseline,
            over_budget,
        }
    }
}

/// The policies whose entries for this node's endpoints (`sources`) would exceed
/// `options.max_policy_entries`, with the numbers. Per rule: each destination block or exception
/// of each address set, times each port prefix its ports lower to; times the endpoints the
/// policy selects. Computed from the rules' expansions, which the compile needs
/// anyway, before anything is lowered: an oversized policy costs no lowering.
fn over_budget(
    world: &World,
    options: &CompileOptions,
    origins: &mut IdTable,
    expander: &mut Expander,
    sources: &[&PodInfo],
) -> Vec<Budget> {
    let mut egress: BTreeMap<&str, usize> = BTreeMap::new();
    let mut network: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for pod in sources {
        for ep in world
            .egress_policies
            .iter()
            .filter(|ep| world.subject_selects(ep, pod))
        {
            *egress.entry(ep.name.as_str()).or_default() += 1;
        }
        for np in world.isolating(pod) {
            *network
                .entry((np.namespace.as_str(), np.name.as_str()))
                .or_default() += 1;
        }
    }
    let mut out = Vec::new();
    let budget = options.max_policy_entries;
    let entries = |expander: &Expander, expansion: &Expansion| -> usize {
        expansion
            .iter()
            .map(|&(set, l4)| {
                let blocks = expander
                    .sets
                    .get(set)
                    .map_or(1, |s| (s.to.len() + s.except.len()).max(1));
                let ports = match l4 {
                    L4::Ports { first, last, .. } => {
                        crate::datapath::lower::port_prefixes(first, last).len()
                    }
                    L4::Any | L4::Protocol(_) => 1,
                };
                blocks.saturating_mul(ports)
            })
            .fold(0usize, usize::saturating_add)
    };
    for ep in &world.egress_policies {
        let Some(&selected) = egress.get(ep.name.as_str()) else {
            continue;
        };
        let mut per_endpoint = 0usize;
        for rule in &ep.rules {
            let id = origins.rule(&egress_origin(&ep.name, &rule.name, rule.action));
            let expansion = expander.expand(world, id, Some(&rule.to), rule.ports.as_deref());
            per_endpoint = per_endpoint.saturating_add(entries(expander, &expansion));
        }
        if per_endpoint.saturating_mul(selected) > budget {
            out.push(Budget {
                policy: PolicyRef {
                    kind: PolicyKind::EgressPolicy,
                    namespace: None,
                    name: ep.name.clone(),
                },
                per_endpoint,
                endpoints: selected,
                budget,
            });
        }
    }
    for np in &world.network_policies {
        let Some(&selected) = network.get(&(np.namespace.as_str(), np.name.as_str())) else {
            continue;
        };
        let mut per_endpoint = 0usize;
        for (r, rule) in np.rules.iter().enumerate() {
            let id = origins.rule(&Origin::NetworkPolicyRule {
                namespace: np.namespace.clone(),
                name: np.name.clone(),
                rule: r,
            });
            let expansion = expander.expand(world, id, rule.to.as_deref(), rule.ports.as_deref());
            per_endpoint = per_endpoint.saturating_add(entries(expander, &expansion));
        }
        if per_endpoint.saturating_mul(selected) > budget {
            out.push(Budget {
                policy: PolicyRef {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some(np.namespace.clone()),
                    name: np.name.clone(),
                },
                per_endpoint,
                endpoints: selected,
                budget,
            });
        }
    }
    out
}

/// Rewrites, for every endpoint, the entries of each Service address's class: each exposed port
/// decided by the Service's ready endpoints (`policy::services`), every other port denied.
fn apply_services(
    desired: &mut DesiredState,
    services: &[ServiceInfo],
    endpoints: &[EndpointId],
    ids: &mut IdTable,
) {
    // Every address's class, found once: the same few addresses are looked up for every
    // endpoint (a class lookup is a search per prefix length).
    let mut classes: HashMap<std::net::IpAddr, ClassId> = HashMap::new();
    for service in services {
        let ready = service
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|(address, _)| *address));
        for address in service.addresses.iter().copied().chain(ready) {
            classes
                .entry(address)
                .or_insert_with(|| desired.class_of(address));
        }
    }
    let class_of = |desired: &DesiredState, address| {
        classes
            .get(&address)
            .copied()
            .unwrap_or_else(|| desired.class_of(address))
    };
    let direct = |desired: &DesiredState, endpoint, address, protocol, port| {
        let class = class_of(desired, address);
        desired
            .lookup_class(endpoint, class, protocol, port)
            .entry
            .map_or(
                Decision {
                    verdict: Verdict::Allow,
                    rule: RULE_DEFAULT,
                },
                |(_, decision)| decision,
            )
    };
    // Worked out against the entries as lowered, then written: a Service's endpoints are
    // decided as direct connections, never through another Service's entries.
    let mut rewrites: BTreeMap<(EndpointId, ClassId), Vec<(PolicyMatch, Decision)>> =
        BTreeMap::new();
    for &endpoint in endpoints {
        for service in services {
            let no_port = Decision {
                verdict: Verdict::Deny,
                rule: ids.rule(&Origin::ServiceNoPort {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                }),
            };
            for &address in &service.addresses {
                let class = class_of(desired, address);
                let entries = rewrites.entry((endpoint, class)).or_default();
                entries.push((
                    PolicyMatch {
                        endpoint,
                        class: Some(class),
                        protocol: None,
                        port: None,
                    },
                    no_port,
                ));
                for port in &service.ports {
                    let verdict = decide_port(port, |a, protocol, p| {
                        direct(desired, endpoint, a, protocol, p)
                    });
                    let decision = match verdict {
                        ServiceVerdict::ByAddress => {
                            direct(desired, endpoint, address, port.protocol, port.port)
                        }
                        ServiceVerdict::Agreed(decision) => decision,
                        ServiceVerdict::Disagree { allowed, denied } => Decision {
                            verdict: Verdict::Deny,
                            rule: ids.rule(&Origin::ServiceEndpointsDisagree {
                                namespace: service.namespace.clone(),
                                name: service.name.clone(),
                                allowed: socket(allowed),
                                denied: socket(denied),
                            }),
                        },
                    };
                    entries.push((
                        PolicyMatch {
                            endpoint,
                            class: Some(class),
                            protocol: Some(port.protocol),
                            port: Some(PortPrefix {
                                port: port.port,
                                bits: 16,
                            }),
                        },
                        decision,
                    ));
                }
            }
        }
    }
    // Each rewritten (endpoint, class) is one run of keys: removed by range, not by a pass
    // over every entry.
    for &(endpoint, class) in rewrites.keys() {
        let first = PolicyMatch {
            endpoint,
            class: Some(class),
            protocol: None,
            port: None,
        };
        let last = PolicyMatch {
            protocol: Some(u8::MAX),
            port: Some(PortPrefix {
                port: u16::MAX,
                bits: u8::MAX,
            }),
            ..first
        };
        let run: Vec<PolicyMatch> = desired
            .policy
            .range(first..=last)
            .map(|(key, _)| *key)
            .collect();
        for key in run {
            desired.policy.remove(&key);
        }
    }
    for entries in rewrites.into_values() {
        desired.policy.extend(entries);
    }
}

/// `10.0.0.5:53` or `[2001:db8::5]:53`.
fn socket((address, port): (std::net::IpAddr, u16)) -> String {
    std::net::SocketAddr::from((address, port)).to_string()
}

fn egress_origin(policy: &str, rule: &str, action: RuleAction) -> Origin {
    Origin::EgressRule {
        policy: policy.into(),
        rule: rule.into(),
        action,
    }
}

/// The semantics, over the actions of the rules that match one connection, in list order
/// (EgressPolicy rules by priority, then NetworkPolicy rules): see `docs/policy.md`.
pub fn decide(
    matching: impl Iterator<Item = Action> + Clone,
    isolation: Option<RuleId>,
    baseline: Verdict,
) -> Decision {
    let real = evaluate(matching.clone(), false, isolation, baseline);
    let with_audit = evaluate(matching, true, isolation, baseline);
    if real.verdict == Verdict::Allow && with_audit.verdict == Verdict::Deny {
        Decision {
            verdict: Verdict::Audit,
            rule: with_audit.rule,
        }
    } else {
        real
    }
}

fn evaluate(
    matching: impl Iterator<Item = Action>,
    include_audit: bool,
    isolation: Option<RuleId>,
    baseline: Verdict,
) -> Decision {
    let mut network_policy_allow = None;
    let mut passed = false;
    for action in matching {
        match action {
            Action::Egress { audit, action, id } if !passed && (include_audit || !audit) => {
                match action {
                    RuleAction::Allow => {
                        return Decision {
                            verdict: Verdict::Allow,
                            rule: id,
                        };
                    }
                    RuleAction::Deny => {
                        return Decision {
                            verdict: Verdict::Deny,
                            rule: id,
                        };
                    }
                    RuleAction::Pass => passed = true,
                }
            }
            Action::Egress { .. } => {}
            Action::NetworkPolicy { id } => {
                network_policy_allow.get_or_insert(id);
            }
            Action::ClassMarker => {}
        }
    }
    match (isolation, network_policy_allow) {
        (Some(_), Some(id)) => Decision {
            verdict: Verdict::Allow,
            rule: id,
        },
        (Some(id), None) => Decision {
            verdict: Verdict::Deny,
            rule: id,
        },
        (None, _) => Decision {
            verdict: baseline,
            rule: RULE_DEFAULT,
        },
    }
}

/// One policy rule as (address set id, protocol/ports) pairs, before an endpoint's action is
/// attached.
type Expansion = Vec<(usize, L4)>;

/// Expands each policy rule once, however many endpoints it applies to, and keeps it until
/// [`Compiler::update_pod`] finds it may have changed. Keyed by rule id.
#[derive(Default)]
struct Expander {
    cache: HashMap<RuleId, Rc<Expansion>>,
    /// Address sets, interned by value: many policies name the same destinations.
    sets: Vec<AddrSet>,
    set_ids: HashMap<AddrSet, usize>,
}

impl Expander {
    /// Sets no cached expansion refers to any more pile up as rules change; when they
    /// outnumber the live ones, start afresh (set ids, and so classes, are then renumbered).
    fn collect_garbage(&mut self) {
        let live: std::collections::HashSet<usize> = self
            .cache
            .values()
            .flat_map(|e| e.iter().map(|(s, _)| *s))
            .collect();
        if self.sets.len() > 2 * live.len() + 4096 {
            *self = Self::default();
        }
    }

    fn set(&mut self, to: Vec<IpNet>, except: Vec<IpNet>) -> usize {
        let set = AddrSet { to, except };
        if let Some(id) = self.set_ids.get(&set) {
            return *id;
        }
        self.sets.push(set.clone());
        self.set_ids.insert(set, self.sets.len() - 1);
        self.sets.len() - 1
    }

    /// The expansion of the rule at `key` with peers `to` (`None`: every destination) and
    /// `ports`: one entry per (peer, port entry), or per destination pod for a named port.
    fn expand(
        &mut self,
        world: &World,
        key: RuleId,
        to: Option<&[Peer]>,
        ports: Option<&[PortSpec]>,
    ) -> Rc<Expansion> {
        if let Some(hit) = self.cache.get(&key) {
            return Rc::clone(hit);
        }
        let everywhere = [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
        let port_entries: Vec<Option<&PortSpec>> = match ports {
            None => vec![None],
            Some(list) => list.iter().map(Some).collect(),
        };
        let peers: Vec<Option<&Peer>> = match to {
            None => vec![None],
            Some(list) => list.iter().map(Some).collect(),
        };
        let mut out = Vec::new();
        // Plain ipBlocks (no `except`) of one rule share its ports and action, so together
        // they are one address set: N such peers cost one address class and one set of policy
        // entries, not N. Only with numeric ports (a named port is resolved per peer below).
        let plain: Vec<IpNet> = peers
            .iter()
            .filter_map(|peer| match peer {
                Some(Peer::Block { cidr, except }) if except.is_empty() => Some(*cidr),
                _ => None,
            })
            .collect();
        let numeric: Option<Vec<L4>> = port_entries.iter().map(|spec| numeric_l4(*spec)).collect();
        let merged = match numeric {
            Some(l4s) if plain.len() > 1 => {
                let set = self.set(plain, Vec::new());
                out.extend(l4s.into_iter().map(|l4| (set, l4)));
                true
            }
            _ => false,
        };
        for peer in &peers {
            if merged && matches!(peer, Some(Peer::Block { except, .. }) if except.is_empty()) {
                continue;
            }
            // Indices of the destination pods this peer can name; `None`: any pod.
            let selected: Option<Vec<usize>> = match peer {
                Some(p @ Peer::Pods { .. }) => Some(world.peer_pod_indices(p)),
                _ => None,
            };
            for spec in &port_entries {
                if let Some(PortSpec {
                    protocol,
                    port: PortMatch::Named(name),
                }) = spec
                {
                    // Resolved on each destination pod; never matches an address that is no
                    // pod's.
                    let candidates: Box<dyn Iterator<Item = usize>> = match &selected {
                        Some(indices) => Box::new(indices.iter().copied()),
                        None => {
                            Box::new((0..world.pods.len()).filter(|&i| !world.pods[i].host_network))
                        }
                    };
                    for i in candidates {
                        let pod = &world.pods[i];
                        // Port names are unique per container, not per pod: a name may stand
                        // for several numbers, and matches each.
                        let mut numbers: Vec<u16> = pod
                            .ports
                            .iter()
                            .filter(|np| &np.name == name && np.protocol == *protocol)
                            .map(|np| np.number)
                            .collect();
                        if numbers.is_empty() {
                            continue;
                        }
                        numbers.sort_unstable();
                        numbers.dedup();
                        let ips: Vec<IpNet> = pod
                            .ips
                            .iter()
                            .filter(|ip| match peer {
                                Some(Peer::Block { cidr, except }) => {
                                    cidr.contains(*ip) && !except.iter().any(|x| x.contains(*ip))
                                }
                                _ => true,
                            })
                            .map(|ip| IpNet::from(*ip))
                            .collect();
                        if !ips.is_empty() {
                            let set = self.set(ips, Vec::new());
                            for number in numbers {
                                let l4 = L4::Ports {
                                    protocol: protocol.number(),
                                    first: number,
                                    last: number,
                                };
                                out.push((set, l4));
                            }
                        }
                    }
                    continue;
                }
                let Some(l4) = numeric_l4(*spec) else {
                    continue;
                };
                let (to, except) = match peer {
                    None => (everywhere.to_vec(), Vec::new()),
                    Some(Peer::Block { cidr, except }) => (vec![*cidr], except.clone()),
                    Some(Peer::Pods { .. }) => (
                        selected
                            .iter()
                            .flatten()
                            .flat_map(|&i| world.pods[i].ips.iter().map(|ip| IpNet::from(*ip)))
                            .collect(),
                        Vec::new(),
                    ),
                };
                // A selector that matches no pod gives an empty set: it matches nothing.
                let set = self.set(to, except);
                out.push((set, l4));
            }
        }
        let out = Rc::new(out);
        self.cache.insert(key, Rc::clone(&out));
        out
    }
}

/// The protocol and ports of a numeric port entry (`None`: every protocol and port); `None`
/// for a named port.
fn numeric_l4(spec: Option<&PortSpec>) -> Option<L4> {
    Some(match spec {
        None => L4::Any,
        Some(PortSpec {
            protocol,
            port: PortMatch::All,
        }) => L4::Protocol(protocol.number()),
        Some(PortSpec {
            protocol,
            port: PortMatch::Range(first, last),
        }) => L4::Ports {
            protocol: protocol.number(),
            first: *first,
            last: *last,
        },
        Some(PortSpec {
            port: PortMatch::Named(_),
            ..
        }) => return None,
    })
}

/// Appends an expansion's rules with `action` to an endpoint's list.
fn push_rules(expansion: &Expansion, action: Action, out: &mut Vec<SetRule<Action>>) {
    out.extend(
        expansion
            .iter()
            .map(|&(set, l4)| SetRule { set, l4, action }),
    );
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path};

    use super::*;
    use crate::policy::cluster::load_yaml;

    /// Pods `web` and `db` in `shop`; `db`'s NetworkPolicy allows 192.0.2.11, and `big` (for
    /// `db`) allows 203.0.113.0/24 on `ranges` UDP port ranges; an EgressPolicy `wide` denies
    /// 198.51.100.0/24 to `web` on as many ranges.
    fn world(ranges: u16) -> World {
        let ports: Vec<String> = (0..ranges)
            .map(|i| {
                format!(
                    "{{protocol: UDP, port: {}, endPort: {}}}",
                    1000 + i * 100,
                    1077 + i * 100
                )
            })
            .collect();
        let ports = ports.join(", ");
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, labels: {{app: web}}}}\nstatus: {{podIP: 10.0.0.1}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: shop, labels: {{app: db}}}}\nstatus: {{podIP: 10.0.0.2}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db-out, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: db}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: 192.0.2.11/32}}}}]}}]}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: db}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: 203.0.113.0/24}}}}], ports: [{ports}]}}]}}\n---\n\
             apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: wide}}\n\
             spec: {{priority: 10, subject: {{podSelector: {{matchLabels: {{app: web}}}}}}, rules: [{{name: r, action: Allow, to: [{{networks: [198.51.100.0/24]}}], ports: [{ports}]}}]}}\n"
        );
        let (world, errors) = load_yaml(Path::new("world.yaml"), &text);
        assert!(errors.is_empty(), "{errors:?}");
        world
    }

    fn verdict(compiled: &Compiled, pod: &str, to: &str, port: u16) -> Verdict {
        let id = compiled.endpoints[&("shop".to_owned(), pod.to_owned())];
        let to: IpAddr = to.parse().unwrap();
        compiled
            .desired
            .lookup(id, to, egret_common::protocol::UDP, port)
            .entry
            .map_or(compiled.baseline, |(_, decision)| decision.verdict)
    }

    #[test]
    fn a_policy_over_its_entry_budget_is_left_out_without_opening_its_pods() {
        let options = |max| CompileOptions {
            max_policy_entries: max,
            ..CompileOptions::default()
        };
        // Within the budget: both policies allow what they name.
        let within = compile(&world(40), &options(100_000));
        assert!(within.over_budget.is_empty(), "{:?}", within.over_budget);
        assert_eq!(verdict(&within, "db", "203.0.113.5", 1005), Verdict::Allow);
        assert_eq!(
            verdict(&within, "web", "198.51.100.5", 1005),
            Verdict::Allow
        );

        // Over it: both are named with their numbers; `db` stays isolated (only db-out allows),
        // `web` is denied from `wide` on.
        let over = compile(&world(40), &options(100));
        let named: Vec<String> = over
            .over_budget
            .iter()
            .map(|b| b.policy.to_string())
            .collect();
        assert_eq!(named, ["EgressPolicy wide", "NetworkPolicy shop/big"]);
        for b in &over.over_budget {
            assert_eq!(b.endpoints, 1);
            assert!(b.per_endpoint > 100, "{b:?}");
            assert!(b.to_string().contains("the budget is 100 "), "{b}");
        }
        assert_eq!(verdict(&over, "db", "203.0.113.5", 1005), Verdict::Deny);
        assert_eq!(verdict(&over, "db", "192.0.2.11", 53), Verdict::Allow);
        assert_eq!(verdict(&over, "web", "198.51.100.5", 1005), Verdict::Deny);
        // Failing closed: from `wide`'s priority on, `web` is denied everything.
        assert_eq!(verdict(&over, "web", "192.0.2.99", 53), Verdict::Deny);
        assert_eq!(verdict(&within, "web", "192.0.2.99", 53), Verdict::Allow);
        assert!(over.desired.len() < within.desired.len());
    }
}
