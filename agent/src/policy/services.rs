//! Services: a pod's `connect()` names the Service's address (its ClusterIP, an external IP, a
//! load balancer's ingress IP), not the pod kube-proxy will pick, so a policy that allows the
//! pods behind a Service would deny the Service. egret decides a connection to a Service address
//! and port by the verdicts for the Service's ready endpoints at their target ports:
//!
//! * every endpoint allowed (or audited): allowed, as the first endpoint's decision says;
//! * every endpoint denied: denied, as the first endpoint's decision says;
//! * endpoints disagree: denied, with the reason naming one allowed and one denied endpoint;
//! * no ready endpoint: decided by the address alone, like any other address;
//! * a port the Service does not expose: denied (nothing would answer it).
//!
//! Named target ports need no lookup here: each EndpointSlice carries the port number its
//! endpoints serve the Service port on (`ports[].name` is the Service port's name).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::datapath::{Decision, Verdict};

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service as the compiler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// Where pods reach it: ClusterIPs, external IPs, load balancer ingress IPs.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
}

/// One port of a Service and the ready endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// Empty for a Service's single unnamed port.
    pub name: String,
    /// IP protocol number.
    pub protocol: u8,
    pub port: u16,
    /// Ready endpoints: address and the port they serve this Service port on.
    pub endpoints: Vec<(IpAddr, u16)>,
}

/// How a connection to a Service port is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceVerdict {
    /// No ready endpoint: by the Service address alone.
    ByAddress,
    /// Every endpoint gave this decision's verdict (allowed or audited, or denied).
    Agreed(Decision),
    /// Some endpoints are allowed, some denied: denied.
    Disagree {
        allowed: (IpAddr, u16),
        denied: (IpAddr, u16),
    },
}

/// Decides a Service port for one source from `decide(address, protocol, port)`, the source's
/// decision for a direct connection.
pub fn decide_port(
    port: &ServicePortInfo,
    mut decide: impl FnMut(IpAddr, u8, u16) -> Decision,
) -> ServiceVerdict {
    let mut first: Option<Decision> = None;
    let mut allowed = None;
    let mut denied = None;
    let mut audit = None;
    for &(address, target) in &port.endpoints {
        let decision = decide(address, port.protocol, target);
        first.get_or_insert(decision);
        match decision.verdict {
            Verdict::Deny => {
                denied.get_or_insert((address, target));
            }
            Verdict::Audit => {
                audit.get_or_insert(decision);
                allowed.get_or_insert((address, target));
            }
            Verdict::Allow => {
                allowed.get_or_insert((address, target));
            }
        }
    }
    match (first, allowed, denied) {
        (None, _, _) => ServiceVerdict::ByAddress,
        (Some(_), Some(allowed), Some(denied)) => ServiceVerdict::Disagree { allowed, denied },
        // All allowed: an audit endpoint makes the connection one an Audit policy would deny.
        (Some(first), Some(_), None) => ServiceVerdict::Agreed(audit.unwrap_or(first)),
        (Some(first), None, _) => ServiceVerdict::Agreed(first),
    }
}

/// The Services pods can connect to, from the API objects: Services with a ClusterIP (not
/// headless, not ExternalName) or external addresses, with each port's ready endpoints from the
/// Service's EndpointSlices. Sorted by namespace and name.
pub fn from_objects<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<ServiceInfo> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let (Some(namespace), Some(name)) = (
            slice.metadata.namespace.clone(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned(),
        ) else {
            continue;
        };
        by_service.entry((namespace, name)).or_default().push(slice);
    }
    let mut out: Vec<ServiceInfo> = services
        .into_iter()
        .filter_map(|service| {
            let namespace = service.metadata.namespace.clone()?;
            let name = service.metadata.name.clone()?;
            let spec = service.spec.as_ref()?;
            if spec.type_.as_deref() == Some("ExternalName") {
                return None;
            }
            let mut addresses: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .chain(spec.external_ips.iter().flatten())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            if let Some(ingress) = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
            {
                addresses.extend(
                    ingress
                        .iter()
                        .filter_map(|i| i.ip.as_deref())
                        .filter_map(|ip| ip.parse::<IpAddr>().ok()),
                );
            }
            addresses.sort();
            addresses.dedup();
            if addresses.is_empty() {
                return None;
            }
            let slices = by_service
                .get(&(namespace.clone(), name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let protocol = protocol_number(p.protocol.as_deref().unwrap_or("TCP"))?;
                    let port = u16::try_from(p.port).ok()?;
                    let name = p.name.clone().unwrap_or_default();
                    Some(ServicePortInfo {
                        endpoints: ready_endpoints(slices, &name, protocol),
                        name,
                        protocol,
                        port,
                    })
                })
                .collect();
            Some(ServiceInfo {
                namespace,
                name,
                addresses,
                ports,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The ready endpoints of the slices for the Service port named `name`, with the port each
/// serves it on. An endpoint whose readiness is unknown counts as ready (the API's rule).
fn ready_endpoints(slices: &[&EndpointSlice], name: &str, protocol: u8) -> Vec<(IpAddr, u16)> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or_default() == name;
            let same_protocol =
                protocol_number(p.protocol.as_deref().unwrap_or("TCP")) == Some(protocol);
            (same_name && same_protocol)
                .then_some(p.port)
                .flatten()
                .and_then(|port| u16::try_from(port).ok())
        }) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            out.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|a| (a, target)),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn dns() -> (Vec<Service>, Vec<EndpointSlice>) {
        let svc = service(serde_json::json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
            ]}
        }));
        // Named target port "dns": each slice says the number its pods serve it on.
        let a = slice(serde_json::json!({
            "metadata": {"name": "kube-dns-a", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.5"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.6"]},
                {"addresses": ["10.0.0.7"], "conditions": {"ready": false}}
            ]
        }));
        let b = slice(serde_json::json!({
            "metadata": {"name": "kube-dns-b", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 1053, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["10.0.1.5"]}]
        }));
        let headless = service(serde_json::json!({
            "metadata": {"name": "headless", "namespace": "x"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        let external = service(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "x"},
            "spec": {"type": "ExternalName", "externalName": "example.invalid"}
        }));
        (vec![svc, headless, external], vec![a, b])
    }

    #[test]
    fn ready_endpoints_with_named_target_ports_resolved_per_slice() {
        let (services, slices) = dns();
        let infos = from_objects(&services, &slices);
        assert_eq!(
            infos.len(),
            1,
            "headless and ExternalName Services have no address"
        );
        let dns = &infos[0];
        assert_eq!(dns.addresses, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let udp = dns.ports.iter().find(|p| p.protocol == 17).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            udp.endpoints,
            vec![
                (ip("10.0.0.5"), 5353),
                (ip("10.0.0.6"), 5353),
                (ip("10.0.1.5"), 1053)
            ],
            "not-ready 10.0.0.7 left out; unknown readiness counts as ready"
        );
        let tcp = dns.ports.iter().find(|p| p.protocol == 6).unwrap();
        assert_eq!(
            tcp.endpoints,
            vec![(ip("10.0.0.5"), 53), (ip("10.0.0.6"), 53)]
        );
    }

    fn decision(verdict: Verdict, rule: u32) -> Decision {
        Decision { verdict, rule }
    }

    #[test]
    fn endpoints_agreeing_disagreeing_or_absent() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let port = ServicePortInfo {
            name: "dns".into(),
            protocol: 17,
            port: 53,
            endpoints: vec![(ip("10.0.0.5"), 5353), (ip("10.0.0.6"), 5353)],
        };
        let allow_all = decide_port(&port, |_, _, _| decision(Verdict::Allow, 7));
        assert_eq!(
            allow_all,
            ServiceVerdict::Agreed(decision(Verdict::Allow, 7))
        );
        let deny_all = decide_port(&port, |_, _, _| decision(Verdict::Deny, 9));
        assert_eq!(deny_all, ServiceVerdict::Agreed(decision(Verdict::Deny, 9)));
        let split = decide_port(&port, |a, _, p| {
            assert_eq!(p, 5353, "decided at the target port");
            if a == ip("10.0.0.5") {
                decision(Verdict::Allow, 7)
            } else {
                decision(Verdict::Deny, 9)
            }
        });
        assert_eq!(
            split,
            ServiceVerdict::Disagree {
                allowed: (ip("10.0.0.5"), 5353),
                denied: (ip("10.0.0.6"), 5353)
            }
        );
        let audit = decide_port(&port, |a, _, _| {
            if a == ip("10.0.0.5") {
                decision(Verdict::Allow, 7)
            } else {
                decision(Verdict::Audit, 8)
            }
        });
        assert_eq!(audit, ServiceVerdict::Agreed(decision(Verdict::Audit, 8)));
        let empty = ServicePortInfo {
            endpoints: Vec::new(),
            ..port
        };
        assert_eq!(
            decide_port(&empty, |_, _, _| unreachable!()),
            ServiceVerdict::ByAddress
        );
    }

    mod compiled {
        //! Through the compiler: what the kernel's lookup answers for a Service address.
        use std::path::Path;

        use super::*;
        use crate::policy::{
            cluster::load_yaml,
            compile::{CompileOptions, compile},
            explain::Origin,
            model::World,
        };

        const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
status: {podIP: 10.0.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: open, namespace: other, labels: {app: open}}
status: {podIP: 10.0.9.2}
---
apiVersion: v1
kind: Pod
metadata: {name: dns-a, namespace: kube-system, labels: {app: dns}}
spec: {containers: [{name: dns, ports: [{name: dns, containerPort: 5353, protocol: UDP}]}]}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: dns-b, namespace: kube-system, labels: {app: dns}}
status: {podIP: 10.0.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: kube-system, labels: {app: web}}
status: {podIP: 10.0.0.7}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: app}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: dns}}}]
    ports: [{protocol: UDP, port: 5353}]
";

        fn port(name: &str, protocol: u8, port: u16, endpoints: &[(&str, u16)]) -> ServicePortInfo {
            ServicePortInfo {
                name: name.into(),
                protocol,
                port,
                endpoints: endpoints
                    .iter()
                    .map(|(a, p)| (a.parse().unwrap(), *p))
                    .collect(),
            }
        }

        fn world() -> World {
            let (mut world, errors) = load_yaml(Path::new("t.yaml"), PODS);
            assert!(errors.is_empty(), "{errors:?}");
            let service = |name: &str, vip: &str, ports| ServiceInfo {
                namespace: "kube-system".into(),
                name: name.into(),
                addresses: vec![vip.parse().unwrap()],
                ports,
            };
            world.services = vec![
                service(
                    "kube-dns",
                    "10.96.0.10",
                    vec![port(
                        "dns",
                        17,
                        53,
                        &[("10.0.0.5", 5353), ("10.0.0.6", 5353)],
                    )],
                ),
                service(
                    "mixed",
                    "10.96.0.11",
                    vec![port(
                        "dns",
                        17,
                        53,
                        &[("10.0.0.5", 5353), ("10.0.0.7", 5353)],
                    )],
                ),
                service("empty", "10.96.0.12", vec![port("http", 6, 80, &[])]),
            ];
            world
        }

        #[test]
        fn a_service_is_decided_by_its_ready_endpoints() {
            let compiled = compile(&world(), &CompileOptions::default());
            let client = compiled.endpoints[&("app".to_owned(), "client".to_owned())];
            let open = compiled.endpoints[&("other".to_owned(), "open".to_owned())];
            let decide = |endpoint, to: &str, protocol, port| {
                let (_, d) = compiled
                    .desired
                    .lookup(endpoint, to.parse().unwrap(), protocol, port)
                    .entry
                    .unwrap();
                (d.verdict, compiled.origin(d.rule).clone())
            };
            // The DNS pods are allowed at 5353, so the DNS Service's ClusterIP is, at 53.
            let (verdict, origin) = decide(client, "10.96.0.10", 17, 53);
            assert_eq!(verdict, Verdict::Allow);
            assert!(
                matches!(&origin, Origin::NetworkPolicyRule { name, .. } if name == "dns-only"),
                "{origin:?}"
            );
            // The pod address itself at 53 is not.
            assert_eq!(decide(client, "10.0.0.5", 17, 53).0, Verdict::Deny);
            // A port the Service does not expose.
            let (verdict, origin) = decide(client, "10.96.0.10", 6, 53);
            assert_eq!(verdict, Verdict::Deny);
            assert!(matches!(origin, Origin::ServiceNoPort { .. }), "{origin:?}");
            // Endpoints that disagree: denied, naming one of each.
            let (verdict, origin) = decide(client, "10.96.0.11", 17, 53);
            assert_eq!(verdict, Verdict::Deny);
            assert_eq!(
                origin,
                Origin::ServiceEndpointsDisagree {
                    namespace: "kube-system".into(),
                    name: "mixed".into(),
                    allowed: "10.0.0.5:5353".into(),
                    denied: "10.0.0.7:5353".into(),
                }
            );
            // No endpoints: by the address alone (the client is isolated: denied; an
            // unisolated pod: allowed by the baseline).
            assert_eq!(decide(client, "10.96.0.12", 6, 80).0, Verdict::Deny);
            assert_eq!(decide(open, "10.96.0.12", 6, 80).0, Verdict::Allow);
            // For a pod nothing isolates, every endpoint is allowed.
            assert_eq!(decide(open, "10.96.0.11", 17, 53).0, Verdict::Allow);
            // And unexposed ports are still denied.
            assert_eq!(decide(open, "10.96.0.11", 17, 54).0, Verdict::Deny);
            // Addresses around the Service are untouched.
            assert_eq!(decide(open, "10.96.0.13", 17, 54).0, Verdict::Allow);
        }
    }
}
