//! Validated cluster state: the plain forms the compiler and the reference evaluator both
//! read, built from Kubernetes objects by `validate.rs` (`World::new`), which checks them as
//! the API server would and applies its defaulting. An invalid object is left out whole, with
//! an error naming the object and the field; everything else still compiles.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::crd::RuleAction;

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

/// Every kind of object egret reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum ObjectKind {
    Namespace,
    Pod,
    NetworkPolicy,
    EgressPolicy,
}

impl ObjectKind {
    /// Whether objects of this kind live in a namespace (Namespace and the cluster-scoped
    /// EgressPolicy do not).
    pub const fn namespaced(self) -> bool {
        matches!(self, Self::Pod | Self::NetworkPolicy)
    }
}

/// Any object by kind, namespace (namespaced kinds only) and name: the identity the API server
/// keys objects by, so two documents with the same one are the same object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    /// A namespaced object (`namespace` is ignored for cluster-scoped kinds).
    pub fn new(kind: ObjectKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: kind.namespaced().then(|| namespace.to_owned()),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{:?} {ns}/{}", self.kind, self.name),
            None => write!(f, "{:?} {}", self.kind, self.name),
        }
    }
}

/// What is wrong with one field, worded as the API server words it
/// (`Invalid value: "x": <rule>`, `Required value: <rule>`, `Unsupported value: ...`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the offending field, e.g. `spec.egress[0].to[1].ipBlock.cidr`.
    pub field: String,
    /// Kind of problem, offending value and the rule it breaks.
    pub message: String,
}

/// An object that was rejected, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct InvalidPolicy {
    pub object: ObjectRef,
    /// Path of the offending field, e.g. `spec.egress[0].to[1].ipBlock.cidr`.
    pub field: String,
    pub message: String,
}

/// A validated label selector. Its labels and values are sorted lists rather than maps and
/// sets: a selector names a few, and a B-tree node holds room for eleven (over 500 bytes for
/// one label), in every policy that is enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// `matchLabels`, sorted by key (keys are unique).
    pub(super) labels: Vec<(String, String)>,
    pub(super) expressions: Vec<Expression>,
}

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Expression {
    pub(super) key: String,
    pub(super) operator: Operator,
    /// Sorted, without repeats.
    pub(super) values: Vec<String>,
}

impl Expression {
    fn has(&self, value: &String) -> bool {
        self.values.binary_search(value).is_ok()
    }
}

/// The operators the API server accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Whether `labels` satisfy every requirement (an empty selector matches everything).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    Operator::In => value.is_some_and(|v| e.has(v)),
                    Operator::NotIn => value.is_none_or(|v| !e.has(v)),
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

/// The labels of a namespace no object defines but a pod names: the one the API server gives
/// every namespace.
pub fn implicit_namespace(name: &str) -> Arc<Labels> {
    Arc::new(Labels::from([(
        NAMESPACE_NAME_LABEL.to_owned(),
        name.to_owned(),
    )]))
}

/// The whole validated cluster. Each model is behind an `Arc`: the source that validated it
/// keeps it too (the local files' store keeps the last valid version of every object), and a
/// compile clones the world, so a world holds pointers rather than another copy of every
/// object.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: BTreeMap<String, Arc<Labels>>,
    /// Sorted by (namespace, name).
    pub pods: Vec<Arc<PodInfo>>,
    /// Sorted by (namespace, name); only those with Egress in their policy types.
    pub network_policies: Vec<Arc<NetPol>>,
    /// Sorted by (priority, name).
    pub egress_policies: Vec<Arc<EgressPol>>,
    /// Objects left out, with the reason.
    pub invalid: Vec<InvalidPolicy>,
    /// Services pods connect to by address (see `policy::services`); set by the source.
    pub services: Vec<super::services::ServiceInfo>,
    /// Indices into `pods`, per namespace.
    pub(super) pods_by_namespace: BTreeMap<String, Vec<usize>>,
}

impl World {
    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace).map(AsRef::as_ref)
    }

    /// The pod with `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .map(AsRef::as_ref)
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
    pub fn insert_pod(&mut self, pod: Arc<PodInfo>) {
        self.namespaces
            .entry(pod.namespace.clone())
            .or_insert_with(|| implicit_namespace(&pod.namespace));
        let at = self
            .pods
            .partition_point(|p| (&p.namespace, &p.name) < (&pod.namespace, &pod.name));
        self.pods.insert(at, pod);
        self.index_pods();
    }

    /// Removes the pod `namespace/name`, if there is one; returns it.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        let at = self
            .pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
            .ok()?;
        let pod = self.pods.remove(at);
        self.index_pods();
        Some(pod)
    }

    /// Rebuilds the per-namespace indices into `pods`.
    pub(super) fn index_pods(&mut self) {
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
            .map(AsRef::as_ref)
    }
}
