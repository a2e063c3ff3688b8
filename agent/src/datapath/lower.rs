//! Lowers per-endpoint rule lists to the exact datapath entries of a [`DesiredState`].
//!
//! The kernel does two fixed lookups per decision, whatever the number of rules: the
//! destination's address class (longest prefix in the address trie), then the longest prefix of
//! (endpoint, class, protocol, port) in the policy trie. This module makes both tries give the
//! answer that evaluating the rules would:
//!
//! * **Classes.** Every prefix named by any rule (`to` and `except`) goes into the address trie.
//!   For an address `a`, the longest such prefix `L` is contained in every named prefix that
//!   contains `a` (prefixes are nested or disjoint), so the set of rules whose address set
//!   contains `L` is exactly the set whose address set contains `a`. Prefixes with the same set
//!   share a class id.
//! * **Ports.** For each (endpoint, class), the rules matching that class split each protocol's
//!   port space into segments; each segment is evaluated once and written as a few port
//!   prefixes, only where it differs from the shorter entry the kernel would fall back to.
//!
//! How the matching rules combine into a decision (first match, Kubernetes' union, Pass, Audit)
//! is the caller's `evaluate` function: this module only finds which rules match.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use egret_common::CLASS_WORLD;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::state::{ClassId, Decision, DesiredState, EndpointId, PolicyMatch, PortPrefix};

/// An endpoint's rules, in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRules<A> {
    pub endpoint: EndpointId,
    pub rules: Vec<Rule<A>>,
}

/// One rule: the destinations and ports it matches, and what the evaluator makes of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule<A> {
    /// Destination prefixes the rule matches (IPv4 and IPv6 may mix).
    pub to: Vec<IpNet>,
    /// Prefixes carved out of `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
    /// Protocol and ports.
    #[serde(default)]
    pub l4: L4,
    pub action: A,
}

/// The protocol and port part of a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    /// Every protocol and port.
    #[default]
    Any,
    /// One IP protocol, every port.
    Protocol(u8),
    /// One IP protocol, ports `first..=last`.
    Ports { protocol: u8, first: u16, last: u16 },
}

impl L4 {
    fn protocol(self) -> Option<u8> {
        match self {
            Self::Any => None,
            Self::Protocol(p) | Self::Ports { protocol: p, .. } => Some(p),
        }
    }

    /// Whether a connection over `protocol` to a port in `first..=last` (all of them) matches.
    fn covers(self, protocol: u8, first: u16, last: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Protocol(p) => p == protocol,
            Self::Ports {
                protocol: p,
                first: f,
                last: l,
            } => p == protocol && f <= first && last <= l,
        }
    }
}

/// Destinations that rules share: addresses in `to` and in none of `except`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrSet {
    pub to: Vec<IpNet>,
    pub except: Vec<IpNet>,
}

/// A rule whose destinations are one of the [`AddrSet`]s given to [`lower_sets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetRule<A> {
    /// Index into the sets.
    pub set: usize,
    pub l4: L4,
    pub action: A,
}

/// An endpoint's rules over shared address sets, in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetEndpoint<A> {
    pub endpoint: EndpointId,
    pub rules: Vec<SetRule<A>>,
}

/// Lowers `endpoints` to datapath entries. `evaluate` gets an endpoint and the actions of the
/// rules that match one (destination, protocol, port), in the endpoint's order, and returns the
/// decision; with no rule it must return the endpoint's default.
pub fn lower<A, F>(endpoints: &[EndpointRules<A>], evaluate: F) -> DesiredState
where
    A: Copy + PartialEq,
    F: Fn(EndpointId, &[&A]) -> Decision,
{
    let mut sets = Vec::new();
    let shared: Vec<SetEndpoint<A>> = endpoints
        .iter()
        .map(|e| SetEndpoint {
            endpoint: e.endpoint,
            rules: e
                .rules
                .iter()
                .map(|r| {
                    sets.push(AddrSet {
                        to: r.to.clone(),
                        except: r.except.clone(),
                    });
                    SetRule {
                        set: sets.len() - 1,
                        l4: r.l4,
                        action: r.action,
                    }
                })
                .collect(),
        })
        .collect();
    lower_sets(&sets, &shared, evaluate)
}

/// What [`lower_sets_with`] keeps between calls, so that a small change costs little. A
/// signature keeps its class id, so a class id always stands for the same sets; an endpoint
/// whose rules and default did not change therefore keeps the entries of every class that still
/// exists, and only classes that appeared since are evaluated for it.
pub struct LowerMemo<A> {
    /// (IPv6?, sorted set ids) -> class id.
    class_ids: HashMap<(bool, Vec<usize>), ClassId>,
    next_class: ClassId,
    /// Classes of the previous call.
    classes: std::collections::HashSet<ClassId>,
    endpoints: HashMap<EndpointId, EndpointMemo<A>>,
}

impl<A> Default for LowerMemo<A> {
    fn default() -> Self {
        Self {
            class_ids: HashMap::new(),
            next_class: CLASS_WORLD + 1,
            classes: std::collections::HashSet::new(),
            endpoints: HashMap::new(),
        }
    }
}

/// An endpoint's inputs and, per class where some rule of it matches, its entries.
struct EndpointMemo<A> {
    default: Decision,
    rules: Vec<SetRule<A>>,
    classes: BTreeMap<ClassId, Vec<(PolicyMatch, Decision)>>,
}

/// [`lower`] for rules whose destinations are shared: each set is classified once, however
/// many endpoints' rules use it.
pub fn lower_sets<A, F>(sets: &[AddrSet], endpoints: &[SetEndpoint<A>], evaluate: F) -> DesiredState
where
    A: Copy + PartialEq,
    F: Fn(EndpointId, &[&A]) -> Decision,
{
    lower_sets_with(&mut LowerMemo::default(), sets, endpoints, evaluate)
}

/// [`lower_sets`], reusing and updating `memo`. Sets no endpoint uses are ignored.
pub fn lower_sets_with<A, F>(
    memo: &mut LowerMemo<A>,
    sets: &[AddrSet],
    endpoints: &[SetEndpoint<A>],
    evaluate: F,
) -> DesiredState
where
    A: Copy + PartialEq,
    F: Fn(EndpointId, &[&A]) -> Decision,
{
    let mut state = DesiredState::default();
    // Who uses each set: (endpoint index, rule index).
    let mut users: Vec<Vec<(usize, usize)>> = vec![Vec::new(); sets.len()];
    for (e, endpoint) in endpoints.iter().enumerate() {
        for (r, rule) in endpoint.rules.iter().enumerate() {
            users[rule.set].push((e, r));
        }
    }
    let used: Vec<bool> = users.iter().map(|u| !u.is_empty()).collect();

    // Set ids, per class.
    let mut members: BTreeMap<ClassId, Vec<usize>> = BTreeMap::new();
    let v4 = classify(sets, &used, |net| match net {
        IpNet::V4(n) => Some(n.trunc()),
        IpNet::V6(_) => None,
    });
    let v6 = classify(sets, &used, |net| match net {
        IpNet::V6(n) => Some(n.trunc()),
        IpNet::V4(_) => None,
    });
    for (net, set) in v4 {
        state
            .addr4
            .insert(net, class_id(memo, &mut members, false, set));
    }
    // IPv4 and IPv6 never share a class: a signature is keyed with its family.
    for (net, set) in v6 {
        state
            .addr6
            .insert(net, class_id(memo, &mut members, true, set));
    }

    // The classes that contain each set.
    let mut set_classes: Vec<Vec<ClassId>> = vec![Vec::new(); sets.len()];
    for (class, set_ids) in &members {
        for &set in set_ids {
            set_classes[set].push(*class);
        }
    }
    let added: Vec<ClassId> = members
        .keys()
        .copied()
        .filter(|c| !memo.classes.contains(c))
        .collect();

    let mut entries = Vec::new();
    let mut kept = HashMap::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let id = endpoint.endpoint;
        let default = evaluate(id, &[]);
        // Rules of this endpoint matching `class`, in the endpoint's order.
        let matching = |class: ClassId| -> Vec<&SetRule<A>> {
            let signature = members.get(&class).map_or(&[][..], Vec::as_slice);
            endpoint
                .rules
                .iter()
                .filter(|r| signature.binary_search(&r.set).is_ok())
                .collect()
        };
        let evaluate_class = |class: ClassId, rules: &[&SetRule<A>]| {
            let mut out = Vec::new();
            lower_class(&mut out, id, class, rules, default, &evaluate);
            out
        };
        let reusable = memo
            .endpoints
            .remove(&id)
            .filter(|m| m.default == default && m.rules == endpoint.rules);
        let classes = match reusable {
            Some(mut m) => {
                m.classes.retain(|class, _| members.contains_key(class));
                for &class in &added {
                    let rules = matching(class);
                    if !rules.is_empty() {
                        m.classes.insert(class, evaluate_class(class, &rules));
                    }
                }
                m.classes
            }
            None => {
                let mut relevant: BTreeMap<ClassId, Vec<&SetRule<A>>> = BTreeMap::new();
                for rule in &endpoint.rules {
                    for &class in &set_classes[rule.set] {
                        relevant.entry(class).or_default().push(rule);
                    }
                }
                // Pushed in rule order, so each class's rules are in the endpoint's order.
                relevant
                    .into_iter()
                    .map(|(class, rules)| (class, evaluate_class(class, &rules)))
                    .collect()
            }
        };
        entries.push((
            PolicyMatch {
                endpoint: id,
                class: None,
                protocol: None,
                port: None,
            },
            default,
        ));
        for class_entries in classes.values() {
            entries.extend_from_slice(class_entries);
        }
        kept.insert(
            id,
            EndpointMemo {
                default,
                rules: endpoint.rules.clone(),
                classes,
            },
        );
    }
    memo.endpoints = kept;
    memo.classes = members.keys().copied().collect();
    // Endpoints come in id order and each one's entries in key order, so this is already
    // sorted and the map is bulk-built; the sort only guards that assumption.
    entries.sort_by_key(|(key, _)| *key);
    state.policy = entries.into_iter().collect();
    // Signatures that are gone keep their ids until there are many; then start afresh (the
    // next compile renumbers every class, which costs one full rewrite of a generation).
    if memo.class_ids.len() > 2 * members.len() + 4096 {
        *memo = LowerMemo::default();
    }
    state
}

/// Writes the policy entries of one (endpoint, class) whose matching rules are `rules`.
fn lower_class<A, F>(
    out: &mut Vec<(PolicyMatch, Decision)>,
    endpoint: EndpointId,
    class: ClassId,
    rules: &[&SetRule<A>],
    fallback: Decision,
    evaluate: &F,
) where
    F: Fn(EndpointId, &[&A]) -> Decision,
{
    let select = |pred: &dyn Fn(L4) -> bool| -> Vec<&A> {
        rules
            .iter()
            .filter(|r| pred(r.l4))
            .map(|r| &r.action)
            .collect()
    };
    let class_match = PolicyMatch {
        endpoint,
        class: Some(class),
        protocol: None,
        port: None,
    };
    let class_decision = evaluate(endpoint, &select(&|l4| l4 == L4::Any));
    if class_decision != fallback {
        out.push((class_match, class_decision));
    }
    let protocols: BTreeSet<u8> = rules.iter().filter_map(|r| r.l4.protocol()).collect();
    for protocol in protocols {
        let protocol_match = PolicyMatch {
            protocol: Some(protocol),
            ..class_match
        };
        let rest = evaluate(
            endpoint,
            &select(&|l4| l4 == L4::Any || l4 == L4::Protocol(protocol)),
        );
        if rest != class_decision {
            out.push((protocol_match, rest));
        }
        // Segment boundaries: each range's first port, and the port after its last.
        let mut cuts = BTreeSet::from([0u32]);
        for rule in rules {
            if let L4::Ports {
                protocol: p,
                first,
                last,
            } = rule.l4
                && p == protocol
            {
                cuts.insert(u32::from(first));
                cuts.insert(u32::from(last) + 1);
            }
        }
        cuts.insert(1 << 16);
        let cuts: Vec<u32> = cuts.into_iter().collect();
        // Adjacent segments with equal decisions are merged before being cut into prefixes.
        let mut run: Option<(u16, u16, Decision)> = None;
        for pair in cuts.windows(2) {
            let (first, last) = (pair[0] as u16, (pair[1] - 1) as u16);
            let decision = evaluate(endpoint, &select(&|l4| l4.covers(protocol, first, last)));
            run = match run {
                Some((f, _, d)) if d == decision => Some((f, last, d)),
                Some((f, l, d)) => {
                    emit_ports(out, protocol_match, f, l, d, rest);
                    Some((first, last, decision))
                }
                None => Some((first, last, decision)),
            };
        }
        if let Some((f, l, d)) = run {
            emit_ports(out, protocol_match, f, l, d, rest);
        }
    }
}

fn emit_ports(
    out: &mut Vec<(PolicyMatch, Decision)>,
    protocol_match: PolicyMatch,
    first: u16,
    last: u16,
    decision: Decision,
    rest: Decision,
) {
    if decision == rest {
        return;
    }
    for prefix in port_prefixes(first, last) {
        out.push((
            PolicyMatch {
                port: Some(prefix),
                ..protocol_match
            },
            decision,
        ));
    }
}

/// The fewest port prefixes that cover exactly `first..=last`. A whole-space range yields none
/// of 0 bits: callers write that as the protocol entry itself.
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros();
        if bits == 0 {
            // The whole port space: two /1 blocks keep every entry longer than the protocol's.
            out.push(PortPrefix { port: 0, bits: 1 });
            out.push(PortPrefix {
                port: 0x8000,
                bits: 1,
            });
        } else {
            out.push(PortPrefix {
                port: lo as u16,
                bits: bits as u8,
            });
        }
        lo += size;
    }
    out
}

/// Gives every prefix of one family named by any set (in `to` or `except`) the ids of the sets
/// that contain the whole prefix, in increasing order.
fn classify<N, F>(sets: &[AddrSet], used: &[bool], family: F) -> BTreeMap<N, Vec<usize>>
where
    N: Prefix,
    F: Fn(&IpNet) -> Option<N>,
{
    let mut signatures: BTreeMap<N, Vec<usize>> = BTreeMap::new();
    for set in sets.iter().zip(used).filter(|(_, u)| **u).map(|(s, _)| s) {
        for net in set.to.iter().chain(&set.except).filter_map(&family) {
            signatures.entry(net).or_default();
        }
    }
    // Named prefixes sorted by (first address, length): those inside `net` form one run.
    let named: Vec<N> = signatures.keys().copied().collect();
    let mut inside: Vec<N> = Vec::new();
    for (s, set) in sets.iter().enumerate().filter(|(s, _)| used[*s]) {
        let excepts: Vec<N> = set.except.iter().filter_map(&family).collect();
        inside.clear();
        for net in set.to.iter().filter_map(&family) {
            let start = named.partition_point(|n| n.first() < net.first());
            inside.extend(
                named[start..]
                    .iter()
                    .take_while(|n| n.first() <= net.last())
                    .filter(|n| net.holds(**n)),
            );
        }
        inside.sort_unstable();
        inside.dedup();
        for n in &inside {
            if !excepts.iter().any(|x| x.holds(*n))
                && let Some(signature) = signatures.get_mut(n)
            {
                signature.push(s);
            }
        }
    }
    signatures
}

fn class_id<A>(
    memo: &mut LowerMemo<A>,
    members: &mut BTreeMap<ClassId, Vec<usize>>,
    v6: bool,
    set: Vec<usize>,
) -> ClassId {
    if set.is_empty() {
        // Named only as an exception (or by a rule of nobody): matches no rule, like the world.
        return CLASS_WORLD;
    }
    let key = (v6, set);
    let id = match memo.class_ids.get(&key) {
        Some(id) => *id,
        None => {
            let id = memo.next_class;
            memo.next_class += 1;
            memo.class_ids.insert(key.clone(), id);
            id
        }
    };
    members.entry(id).or_insert(key.1);
    id
}

/// The few operations [`classify`] needs from a prefix of either family.
trait Prefix: Copy + Ord {
    fn first(&self) -> u128;
    fn last(&self) -> u128;
    /// Whether `other` lies entirely within `self`.
    fn holds(&self, other: Self) -> bool {
        self.first() <= other.first() && other.last() <= self.last()
    }
}

impl Prefix for Ipv4Net {
    fn first(&self) -> u128 {
        u128::from(u32::from(self.network()))
    }
    fn last(&self) -> u128 {
        u128::from(u32::from(self.broadcast()))
    }
}

impl Prefix for Ipv6Net {
    fn first(&self) -> u128 {
        u128::from(self.network())
    }
    fn last(&self) -> u128 {
        u128::from(self.broadcast())
    }
}

/// The simplest evaluator: the first matching rule's decision, else the endpoint's default.
pub fn first_match(
    default: impl Fn(EndpointId) -> Decision,
) -> impl Fn(EndpointId, &[&Decision]) -> Decision {
    move |endpoint, actions| actions.first().map_or_else(|| default(endpoint), |a| **a)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::datapath::state::Verdict;

    const DEFAULT: Decision = Decision {
        verdict: Verdict::Allow,
        rule: 0,
    };

    /// What the rules mean, evaluated directly: the reference the lowered entries must match.
    fn reference(rules: &[Rule<Decision>], addr: IpAddr, protocol: u8, port: u16) -> Decision {
        let in_net = |n: &IpNet| n.contains(&addr);
        rules
            .iter()
            .find(|r| {
                r.to.iter().any(in_net)
                    && !r.except.iter().any(in_net)
                    && r.l4.covers(protocol, port, port)
            })
            .map_or(DEFAULT, |r| r.action)
    }

    #[test]
    fn port_prefixes_cover_exactly() {
        for (first, last) in [
            (0, 65535),
            (80, 80),
            (1, 65535),
            (1000, 2000),
            (0, 0),
            (65535, 65535),
        ] {
            let prefixes = port_prefixes(first, last);
            let mut covered: Vec<(u16, u16)> = prefixes.iter().map(|p| p.range()).collect();
            covered.sort();
            assert_eq!(covered.first().unwrap().0, first);
            assert_eq!(covered.last().unwrap().1, last);
            for w in covered.windows(2) {
                assert_eq!(
                    u32::from(w[0].1) + 1,
                    u32::from(w[1].0),
                    "{first}-{last}: gap or overlap"
                );
            }
            assert!(prefixes.iter().all(|p| p.bits >= 1));
        }
        assert_eq!(port_prefixes(80, 80).len(), 1);
        assert!(port_prefixes(1000, 2000).len() <= 2 * 16);
    }

    #[test]
    fn except_carves_out_of_cidr() {
        let rules = vec![EndpointRules {
            endpoint: 1,
            rules: vec![Rule {
                to: vec!["192.0.2.0/24".parse().unwrap()],
                except: vec!["192.0.2.128/25".parse().unwrap()],
                l4: L4::Any,
                action: Decision {
                    verdict: Verdict::Deny,
                    rule: 5,
                },
            }],
        }];
        let state = lower(&rules, first_match(|_| DEFAULT));
        let at = |a: &str| state.lookup(1, a.parse().unwrap(), 6, 443).entry.unwrap().1;
        assert_eq!(at("192.0.2.1").verdict, Verdict::Deny);
        assert_eq!(at("192.0.2.200").verdict, Verdict::Allow);
        assert_eq!(at("198.51.100.1").verdict, Verdict::Allow);
    }

    #[test]
    fn packets_without_ports_match_only_rules_without_a_port_restriction() {
        // The TC programs decide ICMP and other port-less protocols as port 0. Rules name ports
        // 1-65535 at most (Kubernetes ports start at 1), and "any port" is a protocol prefix
        // without a port, so port 0 falls to the rules that name no port.
        const ICMP: u8 = 1;
        let allow = |rule| Decision {
            verdict: Verdict::Allow,
            rule,
        };
        let to = vec!["192.0.2.0/24".parse().unwrap()];
        let rules = vec![EndpointRules {
            endpoint: 1,
            rules: vec![
                Rule {
                    to: to.clone(),
                    except: Vec::new(),
                    l4: L4::Ports {
                        protocol: ICMP,
                        first: 1,
                        last: 65535,
                    },
                    action: allow(2),
                },
                Rule {
                    to: vec!["192.0.2.10/32".parse().unwrap()],
                    except: Vec::new(),
                    l4: L4::Protocol(ICMP),
                    action: allow(3),
                },
                Rule {
                    to,
                    except: Vec::new(),
                    l4: L4::Any,
                    action: allow(4),
                },
            ],
        }];
        let deny = Decision {
            verdict: Verdict::Deny,
            rule: 0,
        };
        let state = lower(&rules, first_match(|_| deny));
        let at = |a: &str, port| {
            state
                .lookup(1, a.parse().unwrap(), ICMP, port)
                .entry
                .unwrap()
                .1
        };
        assert_eq!(at("192.0.2.10", 0).rule, 3, "protocol rule, any port");
        assert_eq!(at("192.0.2.11", 0).rule, 4, "any protocol");
        assert_eq!(at("192.0.2.11", 7).rule, 2, "a port rule matches a port");
        assert_eq!(at("198.51.100.1", 0), deny);
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u8..4, 24u8..=32).prop_map(|(host, len)| {
                IpNet::V4(
                    Ipv4Net::new([192, 0, 2, host * 64].into(), len)
                        .unwrap()
                        .trunc(),
                )
            }),
            (0u8..4, 120u8..=128).prop_map(|(host, len)| {
                let addr: std::net::Ipv6Addr = format!("2001:db8::{:x}", u16::from(host) * 64)
                    .parse()
                    .unwrap();
                IpNet::V6(Ipv6Net::new(addr, len).unwrap().trunc())
            }),
            Just("0.0.0.0/0".parse().unwrap()),
        ]
    }

    fn arb_l4() -> impl Strategy<Value = L4> {
        prop_oneof![
            Just(L4::Any),
            prop_oneof![Just(6u8), Just(17)].prop_map(L4::Protocol),
            (prop_oneof![Just(6u8), Just(17)], 0u16..70, 0u16..10).prop_map(
                |(protocol, first, span)| {
                    L4::Ports {
                        protocol,
                        first,
                        last: first + span,
                    }
                }
            ),
        ]
    }

    fn arb_rule(rule: u32) -> impl Strategy<Value = Rule<Decision>> {
        (
            prop::collection::vec(arb_net(), 1..3),
            prop::collection::vec(arb_net(), 0..2),
            arb_l4(),
            prop_oneof![
                Just(Verdict::Allow),
                Just(Verdict::Deny),
                Just(Verdict::Audit)
            ],
        )
            .prop_map(move |(to, except, l4, verdict)| Rule {
                to,
                except,
                l4,
                action: Decision { verdict, rule },
            })
    }

    fn arb_endpoint(endpoint: EndpointId) -> impl Strategy<Value = EndpointRules<Decision>> {
        prop::collection::vec((1u32..100).prop_flat_map(arb_rule), 0..6)
            .prop_map(move |rules| EndpointRules { endpoint, rules })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The kernel's two lookups over the lowered entries give the first-match decision for
        /// every endpoint, address, protocol and port.
        #[test]
        fn lowered_lookup_agrees_with_rules(
            endpoints in (arb_endpoint(1), arb_endpoint(2)).prop_map(|(a, b)| vec![a, b]),
            probes in prop::collection::vec(
                (0usize..2, 0u8..=255, any::<bool>(), prop_oneof![Just(6u8), Just(17), Just(1)], 0u16..90),
                40,
            ),
        ) {
            let state = lower(&endpoints, first_match(|_| DEFAULT));
            for (e, host, v6, protocol, port) in probes {
                let addr: IpAddr = if v6 {
                    format!("2001:db8::{host:x}").parse().unwrap()
                } else {
                    format!("192.0.2.{host}").parse().unwrap()
                };
                let expected = reference(&endpoints[e].rules, addr, protocol, port);
                let got = state.lookup(endpoints[e].endpoint, addr, protocol, port).entry.map(|(_, d)| d);
                prop_assert_eq!(got, Some(expected), "endpoint {} to {} proto {} port {}", e, addr, protocol, port);
            }
        }
    }
}
