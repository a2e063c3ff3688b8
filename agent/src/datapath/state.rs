//! The datapath's desired content for one policy generation, as exact map entries, its diff
//! against another, and a userspace model of the kernel's lookup over it.
//!
//! Everything here is pure: the loader writes what [`diff`] says, and `explain` answers through
//! [`DesiredState::lookup`], so what it says is what the kernel does.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egret_common::{
    CLASS_WORLD, POLICY_PREFIX_CLASS, POLICY_PREFIX_ENDPOINT, POLICY_PREFIX_PORT,
    POLICY_PREFIX_PROTOCOL, verdict,
};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Agent-assigned id of an endpoint (a pod, or a local workload).
pub type EndpointId = u32;
/// Id of an address class: the set of addresses that the same rule peers contain.
pub type ClassId = u32;
/// Agent-assigned id of the rule that decided; [`egret_common::RULE_DEFAULT`] for defaults.
pub type RuleId = u32;

/// What happens to a connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allowed (counted as `passthrough`).
    Allow,
    /// Rejected with `EPERM` (counted as `blocked`).
    Deny,
    /// Allowed, but an Audit policy would deny it (counted as `audit`).
    Audit,
}

impl Verdict {
    /// The value the kernel stores.
    pub const fn to_raw(self) -> u8 {
        match self {
            Self::Allow => verdict::ALLOW,
            Self::Deny => verdict::DENY,
            Self::Audit => verdict::AUDIT,
        }
    }

    /// The verdict for a value the kernel stored, if it is one.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            verdict::ALLOW => Some(Self::Allow),
            verdict::DENY => Some(Self::Deny),
            verdict::AUDIT => Some(Self::Audit),
            _ => None,
        }
    }

    /// The counter label operators see (Istio's Passthrough / BlackHole).
    pub const fn counter_label(self) -> &'static str {
        match self {
            Self::Allow => "passthrough",
            Self::Deny => "blocked",
            Self::Audit => "audit",
        }
    }
}

/// A verdict and the rule that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: RuleId,
}

/// Where a policy entry applies: a prefix of (endpoint, class, protocol, port).
///
/// `class`, `protocol` and `port` are each only set when the one before is: the kernel's trie
/// cannot wildcard a field in the middle of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    pub endpoint: EndpointId,
    pub class: Option<ClassId>,
    pub protocol: Option<u8>,
    /// The first port and how many leading bits of it are matched (1 to 16).
    pub port: Option<PortPrefix>,
}

/// A block of ports: those whose `bits` leading bits equal `port`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    /// The first and last port of the block.
    pub fn range(self) -> (u16, u16) {
        // `checked_shr` is `None` for a 16-bit shift: a single port spans nothing more.
        let span = u16::MAX.checked_shr(u32::from(self.bits)).unwrap_or(0);
        (self.port, self.port | span)
    }
}

impl PolicyMatch {
    /// Number of key bits the kernel matches for this entry.
    pub fn prefix_len(&self) -> u32 {
        match (self.class, self.protocol, self.port) {
            (None, _, _) => POLICY_PREFIX_ENDPOINT,
            (Some(_), None, _) => POLICY_PREFIX_CLASS,
            (Some(_), Some(_), None) => POLICY_PREFIX_PROTOCOL,
            (Some(_), Some(_), Some(p)) => POLICY_PREFIX_PROTOCOL + u32::from(p.bits),
        }
    }

    /// The kernel key data for `generation` (fields beyond the prefix are zero).
    pub fn to_key(&self, generation: u32) -> egret_common::PolicyKey {
        egret_common::PolicyKey::new(
            generation,
            self.endpoint,
            self.class.unwrap_or(0),
            self.protocol.unwrap_or(0),
            self.port.map_or(0, |p| p.port),
        )
    }

    /// Inverse of [`Self::to_key`] for a key with `prefix_len` bits; `None` for lengths the
    /// agent never writes.
    pub fn from_key(key: &egret_common::PolicyKey, prefix_len: u32) -> Option<Self> {
        let endpoint = key.endpoint_id();
        let entry = match prefix_len {
            POLICY_PREFIX_ENDPOINT => Self {
                endpoint,
                class: None,
                protocol: None,
                port: None,
            },
            POLICY_PREFIX_CLASS => Self {
                endpoint,
                class: Some(key.class_id()),
                protocol: None,
                port: None,
            },
            POLICY_PREFIX_PROTOCOL => Self {
                endpoint,
                class: Some(key.class_id()),
                protocol: Some(key.protocol),
                port: None,
            },
            len if len > POLICY_PREFIX_PROTOCOL && len <= POLICY_PREFIX_PORT => Self {
                endpoint,
                class: Some(key.class_id()),
                protocol: Some(key.protocol),
                port: Some(PortPrefix {
                    port: key.port(),
                    bits: u8::try_from(len - POLICY_PREFIX_PROTOCOL).ok()?,
                }),
            },
            _ => return None,
        };
        Some(entry)
    }
}

/// The exact content of the address and policy maps for one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub addr4: BTreeMap<Ipv4Net, ClassId>,
    pub addr6: BTreeMap<Ipv6Net, ClassId>,
    pub policy: BTreeMap<PolicyMatch, Decision>,
}

/// What the kernel's lookup found, step by step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub class: ClassId,
    /// The policy entry that matched, and its decision; `None` when the endpoint has none.
    pub entry: Option<(PolicyMatch, Decision)>,
}

impl DesiredState {
    /// Total number of map entries this state occupies.
    pub fn len(&self) -> usize {
        self.addr4.len() + self.addr6.len() + self.policy.len()
    }

    /// Whether the state holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address class of `addr`, as the kernel's address tries find it. An IPv4-mapped IPv6
    /// address is looked up as IPv4, as the connect6/sendmsg6 hooks do.
    pub fn class_of(&self, addr: IpAddr) -> ClassId {
        match addr {
            IpAddr::V4(v4) => longest_v4(&self.addr4, v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => longest_v4(&self.addr4, v4),
                None => longest_v6(&self.addr6, v6),
            },
        }
        .unwrap_or(CLASS_WORLD)
    }

    /// Models the kernel decision for `endpoint` connecting to `addr`:`port` over `protocol`.
    pub fn lookup(&self, endpoint: EndpointId, addr: IpAddr, protocol: u8, port: u16) -> Lookup {
        self.lookup_class(endpoint, self.class_of(addr), protocol, port)
    }

    /// [`Self::lookup`] for an address whose class is known.
    pub fn lookup_class(
        &self,
        endpoint: EndpointId,
        class: ClassId,
        protocol: u8,
        port: u16,
    ) -> Lookup {
        let mut candidates = Vec::with_capacity(19);
        // Most classes have no port entries for a protocol: one range query says so, instead
        // of sixteen lookups that miss.
        let ports = |port| PolicyMatch {
            endpoint,
            class: Some(class),
            protocol: Some(protocol),
            port: Some(port),
        };
        let any_port = self
            .policy
            .range(
                ports(PortPrefix { port: 0, bits: 0 })..=ports(PortPrefix {
                    port: u16::MAX,
                    bits: u8::MAX,
                }),
            )
            .next()
            .is_some();
        for bits in (1..=16u8).rev().filter(|_| any_port) {
            let mask = u16::MAX << (16 - bits);
            candidates.push(PolicyMatch {
                endpoint,
                class: Some(class),
                protocol: Some(protocol),
                port: Some(PortPrefix {
                    port: port & mask,
                    bits,
                }),
            });
        }
        candidates.push(PolicyMatch {
            endpoint,
            class: Some(class),
            protocol: Some(protocol),
            port: None,
        });
        candidates.push(PolicyMatch {
            endpoint,
            class: Some(class),
            protocol: None,
            port: None,
        });
        candidates.push(PolicyMatch {
            endpoint,
            class: None,
            protocol: None,
            port: None,
        });
        let entry = candidates
            .into_iter()
            .find_map(|candidate| self.policy.get(&candidate).map(|d| (candidate, *d)));
        Lookup { class, entry }
    }
}

fn longest_v4(map: &BTreeMap<Ipv4Net, ClassId>, addr: Ipv4Addr) -> Option<ClassId> {
    (0..=32u8).rev().find_map(|len| {
        let net = Ipv4Net::new(addr, len).ok()?.trunc();
        map.get(&net).copied()
    })
}

fn longest_v6(map: &BTreeMap<Ipv6Net, ClassId>, addr: Ipv6Addr) -> Option<ClassId> {
    (0..=128u8).rev().find_map(|len| {
        let net = Ipv6Net::new(addr, len).ok()?.trunc();
        map.get(&net).copied()
    })
}

/// Entries to write and to delete to turn one state into another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upsert_addr4: Vec<(Ipv4Net, ClassId)>,
    pub upsert_addr6: Vec<(Ipv6Net, ClassId)>,
    pub upsert_policy: Vec<(PolicyMatch, Decision)>,
    pub delete_addr4: Vec<Ipv4Net>,
    pub delete_addr6: Vec<Ipv6Net>,
    pub delete_policy: Vec<PolicyMatch>,
}

impl Changes {
    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.upsert_addr4.len()
            + self.upsert_addr6.len()
            + self.upsert_policy.len()
            + self.delete_addr4.len()
            + self.delete_addr6.len()
            + self.delete_policy.len()
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The changes that turn `current` into `desired`.
pub fn diff(current: &DesiredState, desired: &DesiredState) -> Changes {
    let (upsert_addr4, delete_addr4) = diff_map(&current.addr4, &desired.addr4);
    let (upsert_addr6, delete_addr6) = diff_map(&current.addr6, &desired.addr6);
    let (upsert_policy, delete_policy) = diff_map(&current.policy, &desired.policy);
    Changes {
        upsert_addr4,
        upsert_addr6,
        upsert_policy,
        delete_addr4,
        delete_addr6,
        delete_policy,
    }
}

fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    // One pass over both maps in key order (a lookup per key costs several times more at 10^5
    // entries).
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    let mut current = current.iter().peekable();
    let mut desired = desired.iter().peekable();
    loop {
        match (current.peek(), desired.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                deletes.push(**k);
                current.next();
            }
            (None, Some((k, v))) => {
                upserts.push((**k, **v));
                desired.next();
            }
            (Some((ck, cv)), Some((dk, dv))) => match ck.cmp(dk) {
                std::cmp::Ordering::Less => {
                    deletes.push(**ck);
                    current.next();
                }
                std::cmp::Ordering::Greater => {
                    upserts.push((**dk, **dv));
                    desired.next();
                }
                std::cmp::Ordering::Equal => {
                    if cv != dv {
                        upserts.push((**dk, **dv));
                    }
                    current.next();
                    desired.next();
                }
            },
        }
    }
    (upserts, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(rule: RuleId) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            rule,
        }
    }

    #[test]
    fn diff_then_apply_reaches_desired() {
        let mut a = DesiredState::default();
        a.addr4.insert("192.0.2.0/24".parse().unwrap(), 1);
        a.addr4.insert("198.51.100.0/24".parse().unwrap(), 2);
        let mut b = DesiredState::default();
        b.addr4.insert("192.0.2.0/24".parse().unwrap(), 3);
        b.addr4.insert("203.0.113.0/24".parse().unwrap(), 2);
        let changes = diff(&a, &b);
        assert_eq!(
            changes.upsert_addr4,
            vec![
                ("192.0.2.0/24".parse().unwrap(), 3),
                ("203.0.113.0/24".parse().unwrap(), 2)
            ]
        );
        assert_eq!(
            changes.delete_addr4,
            vec!["198.51.100.0/24".parse().unwrap()]
        );
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn lookup_takes_longest_prefix() {
        let mut s = DesiredState::default();
        s.addr4.insert("192.0.2.0/24".parse().unwrap(), 1);
        s.addr4.insert("192.0.2.8/29".parse().unwrap(), 2);
        let base = PolicyMatch {
            endpoint: 7,
            class: None,
            protocol: None,
            port: None,
        };
        s.policy.insert(base, allow(0));
        let tcp_1_any = PolicyMatch {
            class: Some(1),
            protocol: Some(6),
            ..base
        };
        s.policy.insert(tcp_1_any, allow(10));
        let port_80 = PolicyMatch {
            port: Some(PortPrefix { port: 80, bits: 16 }),
            ..tcp_1_any
        };
        s.policy.insert(port_80, allow(11));
        let v4 = |a: &str| a.parse::<IpAddr>().unwrap();
        assert_eq!(s.class_of(v4("192.0.2.9")), 2);
        assert_eq!(s.class_of(v4("192.0.2.1")), 1);
        assert_eq!(s.class_of(v4("::ffff:192.0.2.1")), 1);
        assert_eq!(s.class_of(v4("203.0.113.1")), CLASS_WORLD);
        assert_eq!(
            s.lookup(7, v4("192.0.2.1"), 6, 80).entry,
            Some((port_80, allow(11)))
        );
        assert_eq!(
            s.lookup(7, v4("192.0.2.1"), 6, 81).entry,
            Some((tcp_1_any, allow(10)))
        );
        assert_eq!(
            s.lookup(7, v4("192.0.2.1"), 17, 80).entry,
            Some((base, allow(0)))
        );
        assert_eq!(s.lookup(8, v4("192.0.2.1"), 6, 80).entry, None);
    }

    #[test]
    fn policy_match_round_trips_through_kernel_key() {
        let m = PolicyMatch {
            endpoint: 3,
            class: Some(9),
            protocol: Some(17),
            port: Some(PortPrefix {
                port: 1024,
                bits: 6,
            }),
        };
        assert_eq!(m.prefix_len(), POLICY_PREFIX_PROTOCOL + 6);
        assert_eq!(PolicyMatch::from_key(&m.to_key(1), m.prefix_len()), Some(m));
        assert_eq!(m.port.unwrap().range(), (1024, 2047));
    }
}
