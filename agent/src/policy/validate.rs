//! The API server's validation, in one place for every source: object names and namespaces,
//! labels and selectors, NetworkPolicy (`ValidateNetworkPolicy` in
//! kubernetes/pkg/apis/networking/validation), the Pod fields policy reads, and the EgressPolicy
//! CRD's schema and cross-field rules. Each check converts as it goes, so what compiles is
//! exactly what was checked: `World::new` and the object converters live here.
//!
//! Messages are worded as the API server words them (`spec.egress[0].ports[0].port: Invalid
//! value: 70000: must be between 1 and 65535, inclusive`), so what `kubectl apply` would
//! refuse reads the same when egret refuses it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    cluster::Cluster,
    crd::{EgressPeer, EgressPolicy, EgressPort, PolicyMode},
    model::{
        EgressPol, EgressRuleModel, Expression, FieldError, InvalidPolicy, Labels,
        NAMESPACE_NAME_LABEL, NamedPort, Namespaces, NetPol, NetPolRule, ObjectKind, ObjectRef,
        Operator, Peer, PodInfo, PortMatch, PortSpec, Protocol, Selector, World,
        implicit_namespace,
    },
};

/// A check's result: the converted value, or the first field that breaks a rule.
pub type FieldResult<T> = Result<T, FieldError>;

/// The highest EgressPolicy priority (the CRD declares the same bound).
pub const MAX_PRIORITY: u32 = 1000;

/// Checks and converts every item into a vector of exactly their number. A model lives as long
/// as its object is enforced, and `push` or `collect` over fallible items would leave room for
/// more (four for the first, then doubling): for a small policy, most of its model.
fn exactly<T>(items: impl ExactSizeIterator<Item = FieldResult<T>>) -> FieldResult<Vec<T>> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.push(item?);
    }
    Ok(out)
}

/// `Invalid value: <value>: <rule>`.
fn invalid(field: impl Into<String>, value: impl std::fmt::Debug, rule: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: format!("Invalid value: {value:?}: {rule}"),
    }
}

/// `Required value: <rule>`.
fn required(field: impl Into<String>, rule: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: format!("Required value: {rule}"),
    }
}

/// `Unsupported value: <value>: supported values: ...`.
fn unsupported(field: impl Into<String>, value: &str, supported: &[&str]) -> FieldError {
    let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    FieldError {
        field: field.into(),
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            list.join(", ")
        ),
    }
}

/// `Forbidden: <rule>`.
fn forbidden(field: impl Into<String>, rule: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: format!("Forbidden: {rule}"),
    }
}

/// `Duplicate value: <value>`.
fn duplicate(field: impl Into<String>, value: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: format!("Duplicate value: {value:?}"),
    }
}

const DNS1123_LABEL_RULE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (at most 63 characters)";
const DNS1123_SUBDOMAIN_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (at most 253 characters)";
const LABEL_NAME_RULE: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters), with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')";
const LABEL_VALUE_RULE: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)";
const PORT_NAME_RULE: &str = "must be an IANA_SVC_NAME: at most 15 lower case alphanumeric characters or '-', with at least one letter, no '--', and not starting or ending with '-'";
const PORT_RANGE_RULE: &str = "must be between 1 and 65535, inclusive";
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63.
fn is_label_word(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A namespace name or the namespace of a namespaced object (`ValidateNamespaceName`).
pub fn namespace_name(field: &str, name: &str) -> FieldResult<()> {
    if name.is_empty() {
        return Err(required(field, "name or generateName is required"));
    }
    if !is_dns1123_label(name) {
        return Err(invalid(field, name, DNS1123_LABEL_RULE));
    }
    Ok(())
}

/// The name of a Pod, NetworkPolicy or EgressPolicy (`NameIsDNSSubdomain`).
pub fn object_name(field: &str, name: &str) -> FieldResult<()> {
    if name.is_empty() {
        return Err(required(field, "name or generateName is required"));
    }
    if !is_dns1123_subdomain(name) {
        return Err(invalid(field, name, DNS1123_SUBDOMAIN_RULE));
    }
    Ok(())
}

/// A label key, or any qualified name (`IsQualifiedName`).
pub fn label_key(field: &str, key: &str) -> FieldResult<()> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty() && is_dns1123_subdomain(prefix) && is_label_word(name)
        }
        None => is_label_word(key),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(field, key, LABEL_NAME_RULE))
    }
}

/// A label value (`IsValidLabelValue`).
pub fn label_value(field: &str, value: &str) -> FieldResult<()> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(invalid(field, value, LABEL_VALUE_RULE))
    }
}

/// A label set (`ValidateLabels`).
pub fn labels<'a>(
    field: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> FieldResult<Labels> {
    let mut out = Labels::new();
    for (key, value) in labels {
        label_key(field, key)?;
        label_value(&format!("{field}[{key}]"), value)?;
        out.insert(key.clone(), value.clone());
    }
    Ok(out)
}

/// A named port (`IsValidPortName`, IANA_SVC_NAME).
pub fn port_name(field: &str, name: &str) -> FieldResult<()> {
    let bytes = name.as_bytes();
    let ok = !name.is_empty()
        && name.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && !name.contains("--")
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, name, PORT_NAME_RULE))
    }
}

fn protocol(field: &str, value: Option<&str>) -> FieldResult<Protocol> {
    match value {
        None => Ok(Protocol::Tcp),
        Some(p) => Protocol::parse(p).ok_or_else(|| unsupported(field, p, PROTOCOLS)),
    }
}

fn port_number(field: &str, n: i32) -> FieldResult<u16> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| invalid(field, n, PORT_RANGE_RULE))
}

/// A label selector (`ValidateLabelSelector` and `LabelSelectorAsSelector`).
pub fn selector(selector: &LabelSelector, field: &str) -> FieldResult<Selector> {
    let labels = labels(
        &format!("{field}.matchLabels"),
        selector.match_labels.iter().flatten(),
    )?;
    let requirements = selector.match_expressions.as_deref().unwrap_or_default();
    let mut expressions = Vec::with_capacity(requirements.len());
    for (i, req) in requirements.iter().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let operator = match req.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(unsupported(
                    format!("{at}.operator"),
                    other,
                    &["In", "NotIn", "Exists", "DoesNotExist"],
                ));
            }
        };
        label_key(&format!("{at}.key"), &req.key)?;
        let values = req.values.as_deref().unwrap_or_default();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(required(
                    format!("{at}.values"),
                    "must be specified when `operator` is 'In' or 'NotIn'",
                ));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(forbidden(
                    format!("{at}.values"),
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                ));
            }
            _ => {}
        }
        for (j, v) in values.iter().enumerate() {
            label_value(&format!("{at}.values[{j}]"), v)?;
        }
        let mut values = values.to_vec();
        values.sort_unstable();
        values.dedup();
        values.shrink_to_fit();
        expressions.push(Expression {
            key: req.key.clone(),
            operator,
            values,
        });
    }
    // In key order, as the map gives them; `collect` would leave room for more.
    let mut sorted = Vec::with_capacity(labels.len());
    sorted.extend(labels);
    Ok(Selector {
        labels: sorted,
        expressions,
    })
}

/// A CIDR as the API server parses it (`ParseCIDRSloppy`: host bits may be set).
fn cidr(field: &str, value: &str) -> FieldResult<IpNet> {
    value.parse::<IpNet>().map_err(|_| {
        invalid(
            field,
            value,
            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        )
    })
}

fn ip_block(cidr_text: &str, except: &[String], at: &str) -> FieldResult<Peer> {
    if cidr_text.is_empty() {
        return Err(required(format!("{at}.cidr"), "cidr is required"));
    }
    let net = cidr(&format!("{at}.cidr"), cidr_text)?;
    let mut excepts = Vec::with_capacity(except.len());
    for (i, e) in except.iter().enumerate() {
        let field = format!("{at}.except[{i}]");
        let x = cidr(&field, e)?;
        let same_family = matches!(
            (net, x),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        );
        if !same_family {
            return Err(invalid(
                field,
                e,
                &format!("must be of the same IP family as cidr {cidr_text}"),
            ));
        }
        if !net.contains(&x) || x.prefix_len() <= net.prefix_len() {
            return Err(invalid(
                field,
                e,
                &format!("must be a strict subset of `cidr` {cidr_text}"),
            ));
        }
        excepts.push(x.trunc());
    }
    Ok(Peer::Block {
        cidr: net.trunc(),
        except: excepts,
    })
}

/// Port entries of either kind of policy; none means every port.
fn port_list<'a>(
    entries: impl ExactSizeIterator<Item = (Option<&'a str>, Option<&'a IntOrString>, Option<i32>)>,
    at: &str,
) -> FieldResult<Option<Vec<PortSpec>>> {
    if entries.len() == 0 {
        return Ok(None);
    }
    exactly(
        entries
            .enumerate()
            .map(|(i, (protocol, number, end))| port(protocol, number, end, &format!("{at}[{i}]"))),
    )
    .map(Some)
}

/// One port entry (`ValidateNetworkPolicyPort`).
fn port(
    protocol_name: Option<&str>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
    at: &str,
) -> FieldResult<PortSpec> {
    let protocol = protocol(&format!("{at}.protocol"), protocol_name)?;
    let port = match (port, end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => {
            return Err(forbidden(
                format!("{at}.endPort"),
                "may not be specified when `port` is not specified",
            ));
        }
        (Some(IntOrString::Int(n)), None) => {
            let n = port_number(&format!("{at}.port"), *n)?;
            PortMatch::Range(n, n)
        }
        (Some(IntOrString::Int(n)), Some(end)) => {
            let first = port_number(&format!("{at}.port"), *n)?;
            let last = port_number(&format!("{at}.endPort"), end)?;
            if last < first {
                return Err(invalid(
                    format!("{at}.endPort"),
                    end,
                    &format!("must be greater than or equal to `port` {first}"),
                ));
            }
            PortMatch::Range(first, last)
        }
        (Some(IntOrString::String(name)), None) => {
            port_name(&format!("{at}.port"), name)?;
            PortMatch::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err(forbidden(
                format!("{at}.endPort"),
                "may not be specified when `port` is non-numeric",
            ));
        }
    };
    Ok(PortSpec { protocol, port })
}

fn netpol_ports(
    ports: Option<&[NetworkPolicyPort]>,
    at: &str,
) -> FieldResult<Option<Vec<PortSpec>>> {
    let entries = ports.unwrap_or_default().iter();
    port_list(
        entries.map(|p| (p.protocol.as_deref(), p.port.as_ref(), p.end_port)),
        at,
    )
}

fn netpol_peer(namespace: &str, peer: &NetworkPolicyPeer, at: &str) -> FieldResult<Peer> {
    let selectors = peer.namespace_selector.is_some() || peer.pod_selector.is_some();
    match (&peer.ip_block, selectors) {
        (Some(_), true) => Err(forbidden(
            at,
            "may not specify both ipBlock and another peer (namespaceSelector or podSelector)",
        )),
        (Some(block), false) => ip_block(
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
            &format!("{at}.ipBlock"),
        ),
        (None, false) => Err(required(
            at,
            "must specify a peer (ipBlock, namespaceSelector or podSelector)",
        )),
        (None, true) => {
            let pods = selector(
                &peer.pod_selector.clone().unwrap_or_default(),
                &format!("{at}.podSelector"),
            )?;
            let namespaces = match &peer.namespace_selector {
                Some(sel) => {
                    Namespaces::Matching(selector(sel, &format!("{at}.namespaceSelector"))?)
                }
                None => Namespaces::Only(namespace.into()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn netpol_peers(
    namespace: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    at: &str,
) -> FieldResult<Option<Vec<Peer>>> {
    match peers {
        None | Some([]) => Ok(None),
        Some(peers) => exactly(
            peers
                .iter()
                .enumerate()
                .map(|(j, p)| netpol_peer(namespace, p, &format!("{at}[{j}]"))),
        )
        .map(Some),
    }
}

/// A NetworkPolicy (`ValidateNetworkPolicy`). `Ok(None)`: valid, but not an egress policy
/// (policyTypes without Egress). Ingress rules are checked too, as the API server checks them,
/// though egret enforces only egress.
pub fn network_policy(
    namespace: &str,
    name: &str,
    np: &NetworkPolicy,
) -> FieldResult<Option<NetPol>> {
    namespace_name("metadata.namespace", namespace)?;
    object_name("metadata.name", name)?;
    labels("metadata.labels", np.metadata.labels.iter().flatten())?;
    let Some(spec) = np.spec.as_ref() else {
        return Err(required("spec", "spec is required"));
    };
    let pod_selector = selector(
        spec.pod_selector
            .as_ref()
            .unwrap_or(&LabelSelector::default()),
        "spec.podSelector",
    )?;
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        netpol_peers(namespace, rule.from.as_deref(), &format!("{at}.from"))?;
        netpol_ports(rule.ports.as_deref(), &format!("{at}.ports"))?;
    }
    let egress = spec.egress.as_deref().unwrap_or_default();
    let mut rules = Vec::with_capacity(egress.len());
    for (i, rule) in egress.iter().enumerate() {
        let at = format!("spec.egress[{i}]");
        let to = netpol_peers(namespace, rule.to.as_deref(), &format!("{at}.to"))?;
        let ports = netpol_ports(rule.ports.as_deref(), &format!("{at}.ports"))?;
        rules.push(NetPolRule { to, ports });
    }
    // API-server defaulting: no policyTypes means Ingress, plus Egress when egress rules exist.
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if !egress.is_empty() {
            t.push("Egress".into());
        }
        t
    });
    if types.len() > 2 {
        return Err(invalid(
            "spec.policyTypes",
            &types,
            "may not specify more than two policyTypes",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, t) in types.iter().enumerate() {
        let field = format!("spec.policyTypes[{i}]");
        if t != "Ingress" && t != "Egress" {
            return Err(unsupported(field, t, &["Ingress", "Egress"]));
        }
        if !seen.insert(t) {
            return Err(duplicate(field, t));
        }
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

/// A Namespace: its name and labels; the API server adds the name label.
pub fn namespace(name: &str, ns: &Namespace) -> FieldResult<Labels> {
    namespace_name("metadata.name", name)?;
    let mut labels = labels("metadata.labels", ns.metadata.labels.iter().flatten())?;
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.to_owned());
    Ok(labels)
}

/// An IP as the API server accepts it in `status.podIP(s)` (no leading zeros, no zone).
fn pod_ip(field: &str, ip: &str) -> FieldResult<IpAddr> {
    ip.parse::<IpAddr>().map_err(|_| {
        invalid(
            field,
            ip,
            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        )
    })
}

/// A Pod: name, labels, addresses and the named container ports policy rules can use.
pub fn pod(namespace: &str, name: &str, pod: &Pod) -> FieldResult<PodInfo> {
    namespace_name("metadata.namespace", namespace)?;
    object_name("metadata.name", name)?;
    let labels = labels("metadata.labels", pod.metadata.labels.iter().flatten())?;
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, entry) in status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("status.podIPs[{i}].ip");
        let ip = pod_ip(&field, &entry.ip)?;
        if ips.contains(&ip) {
            return Err(duplicate(field, &entry.ip));
        }
        if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
            return Err(invalid(
                field,
                &entry.ip,
                "may specify no more than one IP for each IP family",
            ));
        }
        ips.push(ip);
    }
    if let Some(text) = status.and_then(|s| s.pod_ip.as_deref()) {
        let ip = pod_ip("status.podIP", text)?;
        match ips.first() {
            Some(first) if *first != ip => {
                return Err(invalid(
                    "status.podIPs[0].ip",
                    first.to_string(),
                    &format!("must match status.podIP {text}"),
                ));
            }
            Some(_) => {}
            None => ips.push(ip),
        }
    }
    let spec = pod.spec.as_ref();
    let mut ports: Vec<NamedPort> = Vec::new();
    for (c, container) in spec.into_iter().flat_map(|s| &s.containers).enumerate() {
        // Names are unique within a container (`validateContainerPorts`).
        let first_of_container = ports.len();
        for (p, entry) in container.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{c}].ports[{p}]");
            let number = port_number(&format!("{at}.containerPort"), entry.container_port)?;
            let protocol = protocol(&format!("{at}.protocol"), entry.protocol.as_deref())?;
            if let Some(port) = &entry.name {
                let field = format!("{at}.name");
                port_name(&field, port)?;
                if ports[first_of_container..]
                    .iter()
                    .any(|other| &other.name == port)
                {
                    return Err(duplicate(field, port));
                }
                ports.push(NamedPort {
                    name: port.clone(),
                    protocol,
                    number,
                });
            }
        }
    }
    // Pushed one at a time, as found: kept at their number (see `exactly`).
    ips.shrink_to_fit();
    ports.shrink_to_fit();
    Ok(PodInfo {
        workload: owning_workload(name, &pod.metadata, &labels),
        namespace: namespace.into(),
        name: name.into(),
        labels,
        ips,
        ports,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    })
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

/// An EgressPolicy: the CRD's schema (which an older CRD in a cluster may not enforce) and its
/// cross-field rules.
pub fn egress_policy(name: &str, ep: &EgressPolicy) -> FieldResult<EgressPol> {
    object_name("metadata.name", name)?;
    labels("metadata.labels", ep.metadata.labels.iter().flatten())?;
    let spec = &ep.spec;
    if spec.priority > MAX_PRIORITY {
        return Err(invalid(
            "spec.priority",
            spec.priority,
            &format!("must be between 0 and {MAX_PRIORITY}, inclusive"),
        ));
    }
    let subject = &spec.subject;
    if subject.namespace_selector.is_none() && subject.pod_selector.is_none() {
        return Err(required(
            "spec.subject",
            "must specify namespaceSelector and/or podSelector",
        ));
    }
    let namespaces = subject
        .namespace_selector
        .as_ref()
        .map(|s| selector(s, "spec.subject.namespaceSelector"))
        .transpose()?;
    let pods = subject
        .pod_selector
        .as_ref()
        .map(|s| selector(s, "spec.subject.podSelector"))
        .transpose()?;
    let mut names = BTreeSet::new();
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.name.is_empty() {
            return Err(required(format!("{at}.name"), "every rule needs a name"));
        }
        if !is_dns1123_label(&rule.name) {
            return Err(invalid(
                format!("{at}.name"),
                &rule.name,
                DNS1123_LABEL_RULE,
            ));
        }
        if !names.insert(rule.name.clone()) {
            return Err(duplicate(format!("{at}.name"), &rule.name));
        }
        if rule.to.is_empty() {
            return Err(required(
                format!("{at}.to"),
                "must specify at least one peer",
            ));
        }
        let mut to = Vec::new();
        for (j, p) in rule.to.iter().enumerate() {
            to.extend(egress_peer(p, &format!("{at}.to[{j}]"))?);
        }
        // A peer with networks gives one per CIDR: the number is known only now.
        to.shrink_to_fit();
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
        (Some(_), true) => Err(forbidden(
            at,
            "networks may not be combined with namespaceSelector or podSelector",
        )),
        (None, false) => Err(required(
            at,
            "must specify networks, namespaceSelector or podSelector",
        )),
        (Some(networks), false) => {
            if networks.is_empty() {
                return Err(required(
                    format!("{at}.networks"),
                    "must specify at least one CIDR",
                ));
            }
            networks
                .iter()
                .enumerate()
                .map(|(k, cidr)| ip_block(cidr, &[], &format!("{at}.networks[{k}]")))
                .map(|r| {
                    // A network is a bare CIDR: name it without ip_block's `.cidr`.
                    r.map_err(|mut e| {
                        e.field = e.field.trim_end_matches(".cidr").to_owned();
                        e
                    })
                })
                .collect()
        }
        (None, true) => {
            let pods = selector(
                &peer.pod_selector.clone().unwrap_or_default(),
                &format!("{at}.podSelector"),
            )?;
            let namespaces = selector(
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

fn reject(world: &mut World, object: ObjectRef, error: FieldError) {
    let FieldError { field, message } = error;
    world.invalid.push(InvalidPolicy {
        object,
        field,
        message,
    });
}

impl World {
    /// Validates a cluster of Kubernetes objects built in memory (the synthetic benchmark
    /// cluster, the property tests): every object is checked as the API server would; an
    /// invalid one is left out (listed in `invalid`), everything else is kept. The sources
    /// validate each object as it arrives and keep only its model (`cluster::PolicyStore`,
    /// the Kubernetes source's `View`); they build their worlds with [`Self::from_validated`].
    pub fn new(cluster: &Cluster) -> Self {
        let mut world = Self::default();
        let mut namespaces = BTreeMap::new();
        for (name, ns) in &cluster.namespaces {
            match namespace(name, ns) {
                Ok(labels) => {
                    namespaces.insert(name.clone(), Arc::new(labels));
                }
                Err(e) => reject(
                    &mut world,
                    ObjectRef::new(ObjectKind::Namespace, "", name),
                    e,
                ),
            }
        }
        let mut pods = Vec::new();
        for ((ns, name), p) in &cluster.pods {
            match pod(ns, name, p) {
                Ok(info) => pods.push(Arc::new(info)),
                Err(e) => reject(&mut world, ObjectRef::new(ObjectKind::Pod, ns, name), e),
            }
        }
        let mut network_policies = Vec::new();
        for ((ns, name), np) in &cluster.network_policies {
            match network_policy(ns, name, np) {
                Ok(Some(np)) => network_policies.push(Arc::new(np)),
                Ok(None) => {}
                Err(e) => reject(
                    &mut world,
                    ObjectRef::new(ObjectKind::NetworkPolicy, ns, name),
                    e,
                ),
            }
        }
        let mut egress_policies = Vec::new();
        for (name, ep) in &cluster.egress_policies {
            match egress_policy(name, ep) {
                Ok(ep) => egress_policies.push(Arc::new(ep)),
                Err(e) => reject(
                    &mut world,
                    ObjectRef::new(ObjectKind::EgressPolicy, "", name),
                    e,
                ),
            }
        }
        Self::from_validated(
            namespaces,
            pods,
            network_policies,
            egress_policies,
            world.invalid,
        )
    }

    /// A world of objects validated one at a time (the sources keep them so): puts them in the
    /// order the compiler relies on and indexes the pods. A namespace that only pods name gets
    /// the labels the API server gives every namespace. The models are shared, not copied.
    pub fn from_validated(
        mut namespaces: BTreeMap<String, Arc<Labels>>,
        mut pods: Vec<Arc<PodInfo>>,
        mut network_policies: Vec<Arc<NetPol>>,
        mut egress_policies: Vec<Arc<EgressPol>>,
        invalid: Vec<InvalidPolicy>,
    ) -> Self {
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for pod in &pods {
            if !namespaces.contains_key(&pod.namespace) {
                namespaces.insert(pod.namespace.clone(), implicit_namespace(&pod.namespace));
            }
        }
        network_policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        egress_policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let mut world = Self {
            namespaces,
            pods,
            network_policies,
            egress_policies,
            invalid,
            ..Self::default()
        };
        world.index_pods();
        world
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn world(yaml: &str) -> World {
        let (world, errors) = super::super::cluster::load_yaml(Path::new("t.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        world
    }

    #[test]
    fn names_labels_and_ports_follow_the_api_server() {
        assert!(namespace_name("f", "shop-1").is_ok());
        assert!(namespace_name("f", "Shop").is_err());
        assert!(namespace_name("f", &"a".repeat(64)).is_err());
        assert!(object_name("f", "a.b-c").is_ok());
        assert!(object_name("f", "Bad_Name!").is_err());
        assert!(object_name("f", "-a").is_err());
        assert!(label_key("f", "app.kubernetes.io/name").is_ok());
        assert!(label_key("f", "Team_1.x").is_ok());
        assert!(label_key("f", "/x").is_err());
        assert!(label_key("f", "a/b/c").is_err());
        assert!(label_key("f", "Example.com/x").is_err());
        assert!(label_value("f", "").is_ok());
        assert!(label_value("f", "v1.2_x-y").is_ok());
        assert!(label_value("f", "-v").is_err());
        assert!(label_value("f", &"v".repeat(64)).is_err());
        assert!(port_name("f", "http-alt").is_ok());
        assert!(port_name("f", "8080").is_err(), "needs a letter");
        assert!(port_name("f", "a--b").is_err());
        assert!(port_name("f", "abcdefghijklmnop").is_err(), "16 characters");
    }

    #[test]
    fn world_new_rejects_what_a_source_did_not_validate() {
        // A cluster built without the loader (the Kubernetes source, whose CRD may be older):
        // World::new applies the same rules and leaves the object out.
        let mut cluster = Cluster::default();
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                     "egress": [{"ports": [{"port": 70000}]}]}
        }))
        .unwrap();
        cluster
            .network_policies
            .insert(("x".into(), "bad".into()), np);
        cluster
            .network_policies
            .insert(("x".into(), "Bad_Name!".into()), NetworkPolicy::default());
        let good: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        }))
        .unwrap();
        cluster
            .network_policies
            .insert(("x".into(), "good".into()), good);
        let w = World::new(&cluster);
        let messages: Vec<String> = w.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "NetworkPolicy x/Bad_Name!: metadata.name: Invalid value: \"Bad_Name!\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (at most 253 characters)",
                "NetworkPolicy x/bad: spec.egress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            ]
        );
        assert_eq!(w.network_policies.len(), 1);
        assert_eq!(w.network_policies[0].name, "good");
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
        let sel = |json: serde_json::Value| {
            selector(&serde_json::from_value(json).unwrap(), "s").unwrap()
        };
        use serde_json::json;
        assert!(sel(json!({})).matches(&labels));
        assert!(sel(json!({"matchLabels": {"app": "web"}})).matches(&labels));
        assert!(!sel(json!({"matchLabels": {"app": "web", "tier": "x"}})).matches(&labels));
        let expr = |op: &str, values: &[&str]| json!({"matchExpressions": [{"key": "app", "operator": op, "values": values}]});
        assert!(sel(expr("In", &["db", "web"])).matches(&labels));
        assert!(!sel(expr("NotIn", &["web"])).matches(&labels));
        assert!(
            sel(
                json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]})
            )
            .matches(&labels)
        );
        assert!(
            sel(json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]}))
                .matches(&labels)
        );
        assert!(
            !sel(json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}))
                .matches(&labels)
        );
    }
}
