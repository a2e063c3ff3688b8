//! Validated cluster state: Kubernetes objects checked and normalised (API-server defaulting
//! applied) into the plain forms the compiler and the reference evaluator both read. An invalid
//! policy is left out whole, with an error naming the object and the field; everything else
//! still compiles.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    cluster::Cluster,
    crd::{EgressPeer, EgressPolicy, EgressPort, PolicyMode, RuleAction},
};

/// Label set of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// IP protocols a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Which kind of policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PolicyKind {
    NetworkPolicy,
    EgressPolicy,
}

/// A policy by kind, namespace (NetworkPolicy only) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{:?} {ns}/{}", self.kind, self.name),
            None => write!(f, "{:?} {}", self.kind, self.name),
        }
    }
}

/// An object that was rejected, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct InvalidPolicy {
    pub object: PolicyRef,
    /// Path of the offending field, e.g. `spec.egress[0].to[1].ipBlock.cidr`.
    pub field: String,
    pub message: String,
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Labels,
    expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Expression {
    key: String,
    operator: Operator,
    values: BTreeSet<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Checks a selector as the API server would (`metav1.LabelSelectorAsSelector`).
    pub fn parse(selector: &LabelSelector, field: &str) -> Result<Self, (String, String)> {
        let labels: Labels = selector
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut expressions = Vec::new();
        for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            let operator = match req.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err((
                        format!("{at}.operator"),
                        format!("unknown operator {other:?}"),
                    ));
                }
            };
            let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err((
                        format!("{at}.values"),
                        format!("{:?} needs at least one value", req.operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err((
                        format!("{at}.values"),
                        format!("{:?} takes no values", req.operator),
                    ));
                }
                _ => {}
            }
            if req.key.is_empty() {
                return Err((format!("{at}.key"), "empty key".into()));
            }
            expressions.push(Expression {
                key: req.key.clone(),
                operator,
                values,
            });
        }
        Ok(Self {
            labels,
            expressions,
        })
    }

    /// Whether `labels` satisfy every requirement (an empty selector matches everything).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    Operator::In => value.is_some_and(|v| e.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// Only this one (a NetworkPolicy peer with just a podSelector).
    Only(String),
    /// Those whose labels match.
    Matching(Selector),
}

/// A destination of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods (not hostNetwork ones) selected by namespace and pod labels.
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

/// The port part of a port entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of the protocol.
    All,
    /// `first..=last`.
    Range(u16, u16),
    /// A named container port of the destination pod.
    Named(String),
}

/// A port entry: protocol and port(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// A NetworkPolicy egress rule. `None` means "all" (an absent or empty list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPolRule {
    pub to: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

/// A NetworkPolicy that isolates the pods it selects for egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPol {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub rules: Vec<NetPolRule>,
}

/// An EgressPolicy rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRuleModel {
    pub name: String,
    pub action: RuleAction,
    pub to: Vec<Peer>,
    pub ports: Option<Vec<PortSpec>>,
}

/// A validated EgressPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPol {
    pub name: String,
    pub priority: u32,
    pub audit: bool,
    pub namespaces: Option<Selector>,
    pub pods: Option<Selector>,
    pub rules: Vec<EgressRuleModel>,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub number: u16,
}

/// A pod as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    pub node: Option<String>,
    /// A hostNetwork pod has the node's address: never a pod peer.
    pub host_network: bool,
    /// The owning workload for metrics and logs: a ReplicaSet's Deployment, another
    /// controller's name, or the pod's own name.
    pub workload: String,
}

/// The whole validated cluster.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: BTreeMap<String, Labels>,
    /// Sorted by (namespace, name).
    pub pods: Vec<PodInfo>,
    /// Sorted by (namespace, name); only those with Egress in their policy types.
    pub network_policies: Vec<NetPol>,
    /// Sorted by (priority, name).
    pub egress_policies: Vec<EgressPol>,
    /// Objects left out, with the reason.
    pub invalid: Vec<InvalidPolicy>,
    /// Services pods connect to by address (see `policy::services`); set by the source.
    pub services: Vec<super::services::ServiceInfo>,
    /// Indices into `pods`, per namespace.
    pods_by_namespace: BTreeMap<String, Vec<usize>>,
}

impl World {
    /// Validates `cluster`.
    pub fn new(cluster: &Cluster) -> Self {
        let mut world = Self::default();
        for (name, ns) in &cluster.namespaces {
            let mut labels: Labels = ns
                .metadata
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
            world.namespaces.insert(name.clone(), labels);
        }
        for ((namespace, name), pod) in &cluster.pods {
            world
                .namespaces
                .entry(namespace.clone())
                .or_insert_with(|| {
                    Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone())])
                });
            world.pods.push(pod_info(namespace, name, pod));
        }
        for ((namespace, name), np) in &cluster.network_policies {
            let object = PolicyRef {
                kind: PolicyKind::NetworkPolicy,
                namespace: Some(namespace.clone()),
                name: name.clone(),
            };
            match netpol(namespace, name, np) {
                Ok(Some(np)) => world.network_policies.push(np),
                Ok(None) => {}
                Err((field, message)) => world.invalid.push(InvalidPolicy {
                    object,
                    field,
                    message,
                }),
            }
        }
        for (name, ep) in &cluster.egress_policies {
            let object = PolicyRef {
                kind: PolicyKind::EgressPolicy,
                namespace: None,
                name: name.clone(),
            };
            match egress_policy(name, ep) {
                Ok(ep) => world.egress_policies.push(ep),
                Err((field, message)) => world.invalid.push(InvalidPolicy {
                    object,
                    field,
                    message,
                }),
            }
        }
        world
            .egress_policies
            .sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        for (i, pod) in world.pods.iter().enumerate() {
            world
                .pods_by_namespace
                .entry(pod.namespace.clone())
                .or_default()
                .push(i);
        }
        world
    }

    /// Labels of a namespace. Every namespace a pod lives in has an entry (at least its name
    /// label), so only namespaces without pods can be missing, and those select no pod.
    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace)
    }

    /// The pod with `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Indices into `pods` of the pods a peer selects (never hostNetwork ones), in pod order;
    /// empty for address blocks. Looks only in the namespaces the peer can select.
    pub fn peer_pod_indices(&self, peer: &Peer) -> Vec<usize> {
        let Peer::Pods { namespaces, pods } = peer else {
            return Vec::new();
        };
        let in_namespace = |ns: &str| {
            self.pods_by_namespace
                .get(ns)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| !self.pods[i].host_network && pods.matches(&self.pods[i].labels))
        };
        let mut out: Vec<usize> = match namespaces {
            Namespaces::Only(ns) => in_namespace(ns).collect(),
            Namespaces::Matching(sel) => self
                .namespaces
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .flat_map(|(ns, _)| in_namespace(ns))
                .collect(),
        };
        out.sort_unstable();
        out
    }

    /// Whether a pod peer selects `pod` (for address blocks: false; they do not look at pods).
    pub fn could_select(&self, peer: &Peer, pod: &PodInfo) -> bool {
        let Peer::Pods { namespaces, pods } = peer else {
            return false;
        };
        !pod.host_network
            && pods.matches(&pod.labels)
            && match namespaces {
                Namespaces::Only(ns) => ns == &pod.namespace,
                Namespaces::Matching(sel) => self
                    .namespace_labels(&pod.namespace)
                    .is_some_and(|labels| sel.matches(labels)),
            }
    }

    /// Adds a pod, keeping the (namespace, name) order and the indices.
    pub fn insert_pod(&mut self, pod: PodInfo) {
        self.namespaces
            .entry(pod.namespace.clone())
            .or_insert_with(|| {
                Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())])
            });
        let at = self
            .pods
            .partition_point(|p| (&p.namespace, &p.name) < (&pod.namespace, &pod.name));
        self.pods.insert(at, pod);
        self.pods_by_namespace.clear();
        for (i, pod) in self.pods.iter().enumerate() {
            self.pods_by_namespace
                .entry(pod.namespace.clone())
                .or_default()
                .push(i);
        }
    }

    /// Whether an EgressPolicy's subject selects `pod`.
    pub fn subject_selects(&self, ep: &EgressPol, pod: &PodInfo) -> bool {
        ep.pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            && ep.namespaces.as_ref().is_none_or(|s| {
                self.namespace_labels(&pod.namespace)
                    .is_some_and(|labels| s.matches(labels))
            })
    }

    /// The NetworkPolicies that isolate `pod` for egress, in (namespace, name) order.
    pub fn isolating<'a>(&'a self, pod: &'a PodInfo) -> impl Iterator<Item = &'a NetPol> + 'a {
        // Sorted by (namespace, name): the pod's namespace is one run.
        let start = self
            .network_policies
            .partition_point(|np| np.namespace < pod.namespace);
        self.network_policies[start..]
            .iter()
            .take_while(move |np| np.namespace == pod.namespace)
            .filter(move |np| np.pod_selector.matches(&pod.labels))
    }
}

fn pod_info(namespace: &str, name: &str, pod: &k8s_openapi::api::core::v1::Pod) -> PodInfo {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_ref())
        .and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    let spec = pod.spec.as_ref();
    let ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                number: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    let labels: Labels = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    PodInfo {
        workload: owning_workload(name, &pod.metadata, &labels),
        namespace: namespace.into(),
        name: name.into(),
        labels,
        ips,
        ports,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

/// The workload a pod belongs to: its controller's name, with a ReplicaSet collapsed to its
/// Deployment (the ReplicaSet is named `<deployment>-<pod-template-hash>`, and the pod carries
/// that hash as a label); the pod's own name when nothing controls it.
fn owning_workload(
    pod: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    labels: &Labels,
) -> String {
    let owners = meta.owner_references.iter().flatten();
    let Some(owner) = owners
        .clone()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.clone().next())
    else {
        return pod.to_owned();
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = labels.get("pod-template-hash")
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return deployment.to_owned();
    }
    owner.name.clone()
}

type FieldResult<T> = Result<T, (String, String)>;

/// `Ok(None)`: valid, but not an egress policy (policyTypes without Egress).
fn netpol(namespace: &str, name: &str, np: &NetworkPolicy) -> FieldResult<Option<NetPol>> {
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = Selector::parse(&spec.pod_selector.unwrap_or_default(), "spec.podSelector")?;
    let egress = spec.egress.unwrap_or_default();
    // API-server defaulting: no policyTypes means Ingress, plus Egress when egress rules exist.
    let types = spec.policy_types.unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if !egress.is_empty() {
            t.push("Egress".into());
        }
        t
    });
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err((
                format!("spec.policyTypes[{i}]"),
                format!("unknown policy type {t:?}"),
            ));
        }
    }
    let mut rules = Vec::new();
    for (i, rule) in egress.iter().enumerate() {
        let at = format!("spec.egress[{i}]");
        let to = match rule.to.as_deref() {
            None | Some([]) => None,
            Some(peers) => Some(
                peers
                    .iter()
                    .enumerate()
                    .map(|(j, p)| netpol_peer(namespace, p, &format!("{at}.to[{j}]")))
                    .collect::<FieldResult<Vec<_>>>()?,
            ),
        };
        let ports = ports(rule.ports.as_deref(), &format!("{at}.ports"))?;
        rules.push(NetPolRule { to, ports });
    }
    if !types.iter().any(|t| t == "Egress") {
        return Ok(None);
    }
    Ok(Some(NetPol {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector,
        rules,
    }))
}

fn netpol_peer(namespace: &str, peer: &NetworkPolicyPeer, at: &str) -> FieldResult<Peer> {
    let selectors = peer.namespace_selector.is_some() || peer.pod_selector.is_some();
    match (&peer.ip_block, selectors) {
        (Some(_), true) => Err((
            at.into(),
            "ipBlock cannot be combined with namespaceSelector or podSelector".into(),
        )),
        (Some(block), false) => ip_block(
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
            &format!("{at}.ipBlock"),
        ),
        (None, false) => Err((
            at.into(),
            "a peer needs ipBlock, namespaceSelector or podSelector".into(),
        )),
        (None, true) => {
            let pods = Selector::parse(
                &peer.pod_selector.clone().unwrap_or_default(),
                &format!("{at}.podSelector"),
            )?;
            let namespaces = match &peer.namespace_selector {
                Some(sel) => {
                    Namespaces::Matching(Selector::parse(sel, &format!("{at}.namespaceSelector"))?)
                }
                None => Namespaces::Only(namespace.into()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn ip_block(cidr: &str, except: &[String], at: &str) -> FieldResult<Peer> {
    let net: IpNet = cidr
        .parse()
        .map_err(|_| (format!("{at}.cidr"), format!("invalid CIDR {cidr:?}")))?;
    let mut excepts = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let field = format!("{at}.except[{i}]");
        let x: IpNet = e
            .parse()
            .map_err(|_| (field.clone(), format!("invalid CIDR {e:?}")))?;
        if !net.contains(&x) || x.prefix_len() <= net.prefix_len() {
            return Err((field, format!("{e} is not strictly inside {cidr}")));
        }
        excepts.push(x.trunc());
    }
    Ok(Peer::Block {
        cidr: net.trunc(),
        except: excepts,
    })
}

fn ports(ports: Option<&[NetworkPolicyPort]>, at: &str) -> FieldResult<Option<Vec<PortSpec>>> {
    let entries = ports.unwrap_or_default().iter();
    port_list(
        entries.map(|p| (p.protocol.as_deref(), p.port.as_ref(), p.end_port)),
        at,
    )
}

/// Port entries of either kind of policy; none means every port.
fn port_list<'a>(
    entries: impl ExactSizeIterator<Item = (Option<&'a str>, Option<&'a IntOrString>, Option<i32>)>,
    at: &str,
) -> FieldResult<Option<Vec<PortSpec>>> {
    if entries.len() == 0 {
        return Ok(None);
    }
    entries
        .enumerate()
        .map(|(i, (protocol, number, end))| port(protocol, number, end, &format!("{at}[{i}]")))
        .collect::<FieldResult<Vec<_>>>()
        .map(Some)
}

fn port(
    protocol: Option<&str>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
    at: &str,
) -> FieldResult<PortSpec> {
    let protocol = match protocol {
        None => Protocol::Tcp,
        Some(p) => Protocol::parse(p).ok_or_else(|| {
            (
                format!("{at}.protocol"),
                format!("unknown protocol {p:?} (TCP, UDP or SCTP)"),
            )
        })?,
    };
    let number = |n: i32, field: &str| -> FieldResult<u16> {
        u16::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            (
                format!("{at}.{field}"),
                format!("port {n} is outside 1-65535"),
            )
        })
    };
    let port = match (port, end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => return Err((format!("{at}.endPort"), "endPort needs port".into())),
        (Some(IntOrString::Int(n)), None) => {
            let n = number(*n, "port")?;
            PortMatch::Range(n, n)
        }
        (Some(IntOrString::Int(n)), Some(end)) => {
            let (first, last) = (number(*n, "port")?, number(end, "endPort")?);
            if last < first {
                return Err((
                    format!("{at}.endPort"),
                    format!("endPort {last} is below port {first}"),
                ));
            }
            PortMatch::Range(first, last)
        }
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() || name.len() > 15 {
                return Err((format!("{at}.port"), format!("invalid port name {name:?}")));
            }
            PortMatch::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err((
                format!("{at}.endPort"),
                "endPort needs a numeric port".into(),
            ));
        }
    };
    Ok(PortSpec { protocol, port })
}

fn egress_policy(name: &str, ep: &EgressPolicy) -> FieldResult<EgressPol> {
    let spec = &ep.spec;
    if spec.priority > 1000 {
        return Err((
            "spec.priority".into(),
            format!("{} is outside 0-1000", spec.priority),
        ));
    }
    let subject = &spec.subject;
    if subject.namespace_selector.is_none() && subject.pod_selector.is_none() {
        return Err((
            "spec.subject".into(),
            "needs namespaceSelector and/or podSelector".into(),
        ));
    }
    let namespaces = subject
        .namespace_selector
        .as_ref()
        .map(|s| Selector::parse(s, "spec.subject.namespaceSelector"))
        .transpose()?;
    let pods = subject
        .pod_selector
        .as_ref()
        .map(|s| Selector::parse(s, "spec.subject.podSelector"))
        .transpose()?;
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.name.is_empty() || !names.insert(rule.name.clone()) {
            return Err((
                format!("{at}.name"),
                format!("rule name {:?} is empty or not unique", rule.name),
            ));
        }
        if rule.to.is_empty() {
            return Err((format!("{at}.to"), "needs at least one peer".into()));
        }
        let mut to = Vec::new();
        for (j, p) in rule.to.iter().enumerate() {
            to.extend(egress_peer(p, &format!("{at}.to[{j}]"))?);
        }
        let ports = egress_ports(&rule.ports, &format!("{at}.ports"))?;
        rules.push(EgressRuleModel {
            name: rule.name.clone(),
            action: rule.action,
            to,
            ports,
        });
    }
    Ok(EgressPol {
        name: name.into(),
        priority: spec.priority,
        audit: spec.mode == PolicyMode::Audit,
        namespaces,
        pods,
        rules,
    })
}

/// One peer per CIDR of `networks`, or one pod peer.
fn egress_peer(peer: &EgressPeer, at: &str) -> FieldResult<Vec<Peer>> {
    let selectors = peer.namespace_selector.is_some() || peer.pod_selector.is_some();
    match (&peer.networks, selectors) {
        (Some(_), true) => Err((
            at.into(),
            "networks cannot be combined with namespaceSelector or podSelector".into(),
        )),
        (None, false) => Err((
            at.into(),
            "a peer needs networks, namespaceSelector or podSelector".into(),
        )),
        (Some(networks), false) => {
            if networks.is_empty() {
                return Err((format!("{at}.networks"), "needs at least one CIDR".into()));
            }
            networks
                .iter()
                .enumerate()
                .map(|(k, cidr)| ip_block(cidr, &[], &format!("{at}.networks[{k}]")))
                .collect()
        }
        (None, true) => {
            let pods = Selector::parse(
                &peer.pod_selector.clone().unwrap_or_default(),
                &format!("{at}.podSelector"),
            )?;
            let namespaces = Selector::parse(
                &peer.namespace_selector.clone().unwrap_or_default(),
                &format!("{at}.namespaceSelector"),
            )?;
            Ok(vec![Peer::Pods {
                namespaces: Namespaces::Matching(namespaces),
                pods,
            }])
        }
    }
}

fn egress_ports(list: &[EgressPort], at: &str) -> FieldResult<Option<Vec<PortSpec>>> {
    port_list(
        list.iter()
            .map(|p| (p.protocol.as_deref(), p.port.as_ref(), p.end_port)),
        at,
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    fn world(yaml: &str) -> World {
        let mut cluster = Cluster::default();
        let errors = cluster.add_yaml(Path::new("t.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        World::new(&cluster)
    }

    fn netpol_egress(egress: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n{egress}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: good, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n"
        )
    }

    #[test]
    fn bad_input_is_rejected_naming_object_and_field_and_the_rest_compiles() {
        let cases = [
            (
                "  - to: [{ipBlock: {cidr: 10.0.0.0/33}}]",
                "spec.egress[0].to[0].ipBlock.cidr",
                "invalid CIDR",
            ),
            (
                "  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.0.2.0/24]}}]",
                "spec.egress[0].to[0].ipBlock.except[0]",
                "not strictly inside",
            ),
            (
                "  - ports: [{port: 70000}]",
                "spec.egress[0].ports[0].port",
                "outside 1-65535",
            ),
            (
                "  - ports: [{port: 0}]",
                "spec.egress[0].ports[0].port",
                "outside 1-65535",
            ),
            (
                "  - ports: [{port: 90, endPort: 80}]",
                "spec.egress[0].ports[0].endPort",
                "below port",
            ),
            (
                "  - ports: [{protocol: ICMP, port: 1}]",
                "spec.egress[0].ports[0].protocol",
                "unknown protocol",
            ),
            (
                "  - to: [{podSelector: {matchExpressions: [{key: a, operator: Foo}]}}]",
                "spec.egress[0].to[0].podSelector.matchExpressions[0].operator",
                "unknown operator",
            ),
            (
                "  - to: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]",
                "spec.egress[0].to[0].podSelector.matchExpressions[0].values",
                "at least one value",
            ),
            (
                "  - to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]",
                "spec.egress[0].to[0]",
                "cannot be combined",
            ),
            (
                "  - ports: [{port: http, endPort: 90}]",
                "spec.egress[0].ports[0].endPort",
                "numeric port",
            ),
        ];
        for (egress, field, message) in cases {
            let w = world(&netpol_egress(egress));
            assert_eq!(w.invalid.len(), 1, "{egress}");
            let err = &w.invalid[0];
            assert_eq!(err.object.name, "bad");
            assert_eq!(err.field, field, "{egress}");
            assert!(err.message.contains(message), "{egress}: {}", err.message);
            assert!(
                err.to_string()
                    .starts_with(&format!("NetworkPolicy x/bad: {field}: ")),
                "{err}"
            );
            assert_eq!(
                w.network_policies.len(),
                1,
                "the valid policy still compiles"
            );
            assert_eq!(w.network_policies[0].name, "good");
        }
    }

    #[test]
    fn bad_egress_policy_is_rejected_naming_the_field() {
        let w = world(
            "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: e}\nspec:\n  priority: 1\n  subject: {podSelector: {}}\n  rules:\n  - {name: r, action: Deny, to: [{networks: [192.0.2.0/24], podSelector: {}}]}\n",
        );
        assert_eq!(w.invalid.len(), 1);
        assert_eq!(
            w.invalid[0].to_string(),
            "EgressPolicy e: spec.rules[0].to[0]: networks cannot be combined with namespaceSelector or podSelector"
        );
        let w = world(
            "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: e}\nspec:\n  priority: 1001\n  subject: {podSelector: {}}\n",
        );
        assert_eq!(w.invalid[0].field, "spec.priority");
        let w = world(
            "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: e}\nspec:\n  priority: 1\n  subject: {}\n",
        );
        assert_eq!(w.invalid[0].field, "spec.subject");
    }

    #[test]
    fn owning_workload_collapses_replicasets_to_deployments() {
        let w = world(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-7d4b9c-x2x1\n  namespace: shop\n  labels: {pod-template-hash: 7d4b9c}\n  \
             ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: u, controller: true}]\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: db-0\n  namespace: shop\n  \
             ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u, controller: true}]\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: debug, namespace: shop}\n",
        );
        let workload = |name: &str| w.pod("shop", name).unwrap().workload.clone();
        assert_eq!(workload("web-7d4b9c-x2x1"), "web");
        assert_eq!(workload("db-0"), "db");
        assert_eq!(workload("debug"), "debug");
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let labels = Labels::from([("app".to_owned(), "web".to_owned())]);
        let sel = |yaml: &str| Selector::parse(&serde_yaml::from_str(yaml).unwrap(), "s").unwrap();
        assert!(sel("{}").matches(&labels));
        assert!(sel("{matchLabels: {app: web}}").matches(&labels));
        assert!(!sel("{matchLabels: {app: web, tier: x}}").matches(&labels));
        assert!(
            sel("{matchExpressions: [{key: app, operator: In, values: [db, web]}]}")
                .matches(&labels)
        );
        assert!(
            !sel("{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}")
                .matches(&labels)
        );
        assert!(
            sel("{matchExpressions: [{key: tier, operator: NotIn, values: [x]}]}").matches(&labels)
        );
        assert!(sel("{matchExpressions: [{key: app, operator: Exists}]}").matches(&labels));
        assert!(!sel("{matchExpressions: [{key: app, operator: DoesNotExist}]}").matches(&labels));
    }

    proptest! {
        /// Whatever the text, loading and validating it reports errors and never panics.
        #[test]
        fn arbitrary_documents_never_panic(
            kind in prop::sample::select(&["NetworkPolicy", "EgressPolicy", "Pod", "Namespace"][..]),
            body in prop::collection::vec(
                prop_oneof![
                    Just("spec".to_owned()), Just("egress".to_owned()), Just("to".to_owned()), Just("ports".to_owned()),
                    Just("ipBlock".to_owned()), Just("cidr".to_owned()), Just("port".to_owned()), Just("endPort".to_owned()),
                    Just("- ".to_owned()), Just(": ".to_owned()), Just("\n  ".to_owned()), Just("{".to_owned()), Just("}".to_owned()),
                    "[a-zA-Z0-9./:]{0,8}",
                ],
                0..40,
            ),
        ) {
            let api = if kind == "EgressPolicy" { "egret.dev/v1alpha1" } else if kind == "NetworkPolicy" { "networking.k8s.io/v1" } else { "v1" };
            let text = format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: n, namespace: x}}\n{}", body.concat());
            let mut cluster = Cluster::default();
            let _ = cluster.add_yaml(Path::new("fuzz.yaml"), &text);
            let world = World::new(&cluster);
            let _ = super::super::compile::compile(&world, &Default::default());
        }
    }
}
