//! Property tests: on random clusters, built as raw Kubernetes objects so that parsing and
//! validation run too, what the compiled datapath answers (through the model of the kernel
//! lookup, as `egret explain` does) equals what the reference evaluator says.

use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    cluster::Cluster,
    compile::{CompileOptions, compile},
    model::World,
    reference,
};
use crate::datapath::Verdict;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const APPS: [&str; 3] = ["web", "db", "api"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "alt"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 9000];
const CIDRS: [&str; 8] = [
    "198.51.100.0/24",
    "198.51.100.0/28",
    "198.51.100.2/32",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "2001:db8:1::/64",
    "2001:db8:1::3/128",
    "::/0",
];
const EXCEPTS: [&str; 4] = [
    "198.51.100.0/30",
    "198.51.100.3/32",
    "2001:db8:1::2/127",
    "192.0.2.128/25",
];
const OUTSIDE: [&str; 5] = [
    "192.0.2.1",
    "192.0.2.200",
    "203.0.113.9",
    "2001:db8::1",
    "::ffff:198.51.100.2",
];

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(&APPS[..]).prop_map(|app| json!({"matchLabels": {"app": app}})),
        (prop::sample::select(&APPS[..]), prop::sample::select(&["In", "NotIn"][..]))
            .prop_map(|(app, op)| json!({"matchExpressions": [{"key": "app", "operator": op, "values": [app]}]})),
        prop::sample::select(&["Exists", "DoesNotExist"][..])
            .prop_map(|op| json!({"matchExpressions": [{"key": "tier", "operator": op}]})),
    ]
}

fn namespace_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(&["a", "b"][..]).prop_map(|t| json!({"matchLabels": {"team": t}})),
        prop::sample::select(&NAMESPACES[..])
            .prop_map(|ns| json!({"matchLabels": {"kubernetes.io/metadata.name": ns}})),
    ]
}

fn ports() -> impl Strategy<Value = Option<Vec<Value>>> {
    let entry = (
        prop::option::of(prop::sample::select(&["TCP", "UDP", "SCTP"][..])),
        prop_oneof![
            3 => prop::sample::select(&PORTS[..]).prop_map(|p| json!(p)),
            2 => prop::sample::select(&PORT_NAMES[..]).prop_map(|n| json!(n)),
            1 => Just(Value::Null),
        ],
        prop::option::weighted(0.2, 0u16..200),
    )
        .prop_map(|(protocol, port, span)| {
            let mut v = json!({});
            if let Some(p) = protocol {
                v["protocol"] = json!(p);
            }
            if !port.is_null() {
                v["port"] = port.clone();
            }
            if let (Some(span), Some(n)) = (span, port.as_u64()) {
                v["endPort"] = json!(n + u64::from(span));
            }
            v
        });
    prop::option::of(prop::collection::vec(entry, 1..3))
}

/// A NetworkPolicy peer (`netpol`) or an EgressPolicy peer.
fn peer(netpol: bool) -> impl Strategy<Value = Value> {
    let block = (
        prop::sample::select(&CIDRS[..]),
        prop::option::of(prop::sample::select(&EXCEPTS[..])),
    )
        .prop_map(move |(cidr, except)| {
            let contained = except.filter(|e| {
                let (c, e): (ipnet::IpNet, ipnet::IpNet) =
                    (cidr.parse().unwrap(), e.parse().unwrap());
                c.contains(&e) && e.prefix_len() > c.prefix_len()
            });
            match (netpol, contained) {
                (true, Some(e)) => json!({"ipBlock": {"cidr": cidr, "except": [e]}}),
                (true, None) => json!({"ipBlock": {"cidr": cidr}}),
                (false, _) => json!({"networks": [cidr]}),
            }
        });
    let pods = (
        prop::option::of(namespace_selector()),
        prop::option::of(selector()),
    )
        .prop_map(|(ns, pods)| {
            let mut v = json!({});
            if let Some(ns) = ns {
                v["namespaceSelector"] = ns;
            }
            if let Some(p) = pods {
                v["podSelector"] = p;
            }
            if v == json!({}) {
                v["podSelector"] = json!({});
            }
            v
        });
    prop_oneof![block, pods]
}

fn network_policy(i: usize) -> impl Strategy<Value = Value> {
    let rule = (
        prop::option::of(prop::collection::vec(peer(true), 1..3)),
        ports(),
    )
        .prop_map(|(to, ports)| {
            let mut v = json!({});
            if let Some(to) = to {
                v["to"] = json!(to);
            }
            if let Some(p) = ports {
                v["ports"] = json!(p);
            }
            v
        });
    (
        prop::sample::select(&NAMESPACES[..]),
        selector(),
        0usize..4,
        prop::collection::vec(rule, 0..3),
    )
        .prop_map(move |(ns, pods, types, egress)| {
            let mut spec = json!({"podSelector": pods, "egress": egress});
            // Unset (defaulted from the egress section), or one of the explicit combinations.
            let explicit: [&[&str]; 3] = [&["Egress"], &["Ingress"], &["Ingress", "Egress"]];
            if let Some(t) = types.checked_sub(1).map(|i| explicit[i]) {
                spec["policyTypes"] = json!(t);
            }
            json!({"metadata": {"name": format!("np{i}"), "namespace": ns}, "spec": spec})
        })
}

fn egress_policy(i: usize) -> impl Strategy<Value = Value> {
    let rule = |j: usize| {
        (
            prop::sample::select(&["Allow", "Deny", "Pass"][..]),
            prop::collection::vec(peer(false), 1..3),
            ports(),
        )
            .prop_map(move |(action, to, ports)| {
                let mut v = json!({"name": format!("r{j}"), "action": action, "to": to});
                if let Some(p) = ports {
                    v["ports"] = json!(p);
                }
                v
            })
    };
    (
        0u32..3,
        any::<bool>(),
        prop::option::of(namespace_selector()),
        selector(),
        (rule(0), rule(1), rule(2), 1usize..=3),
    )
        .prop_map(move |(priority, audit, ns, pods, (r0, r1, r2, n))| {
            let mut subject = json!({"podSelector": pods});
            if let Some(ns) = ns {
                subject["namespaceSelector"] = ns;
            }
            let rules: Vec<Value> = [r0, r1, r2].into_iter().take(n).collect();
            json!({
                "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy",
                "metadata": {"name": format!("ep{i}")},
                "spec": {"priority": priority, "mode": if audit { "Audit" } else { "Enforce" }, "subject": subject, "rules": rules}
            })
        })
}

fn pod(i: usize) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&NAMESPACES[..]),
        prop::sample::select(&APPS[..]),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec((prop::sample::select(&PORT_NAMES[..]), prop::sample::select(&PORTS[..]), prop::sample::select(&["TCP", "UDP"][..])), 0..3),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(ns, app, tier, v6, ports, host_network)| {
            let mut labels = json!({"app": app});
            if tier {
                labels["tier"] = json!("1");
            }
            let v4 = format!("198.51.100.{}", i + 1);
            let mut ips = vec![json!({"ip": v4})];
            if v6 {
                ips.push(json!({"ip": format!("2001:db8:1::{}", i + 1)}));
            }
            // The API server refuses two ports of one container with the same name.
            let mut names = std::collections::BTreeSet::new();
            let ports: Vec<Value> = ports
                .into_iter()
                .filter(|(name, _, _)| names.insert(*name))
                .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
                .collect();
            json!({
                "metadata": {"name": format!("p{i}"), "namespace": ns, "labels": labels},
                "spec": {"nodeName": "n", "hostNetwork": host_network, "containers": [{"name": "c", "ports": ports}]},
                "status": {"podIP": v4, "podIPs": ips}
            })
        })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(prop::sample::select(&["a", "b"][..]), 3),
        (1usize..7).prop_flat_map(|n| (0..n).map(pod).collect::<Vec<_>>()),
        (0usize..4).prop_flat_map(|n| (0..n).map(network_policy).collect::<Vec<_>>()),
        (0usize..4).prop_flat_map(|n| (0..n).map(egress_policy).collect::<Vec<_>>()),
    )
        .prop_map(|(teams, pods, nps, eps)| {
            let mut cluster = Cluster::default();
            for (ns, team) in NAMESPACES.iter().zip(teams) {
                let v = json!({"metadata": {"name": ns, "labels": {"team": team}}});
                cluster
                    .namespaces
                    .insert((*ns).into(), serde_json::from_value(v).unwrap());
            }
            for p in pods {
                let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(p).unwrap();
                let key = (
                    p.metadata.namespace.clone().unwrap(),
                    p.metadata.name.clone().unwrap(),
                );
                cluster.pods.insert(key, p);
            }
            for np in nps {
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_json::from_value(np).unwrap();
                let key = (
                    np.metadata.namespace.clone().unwrap(),
                    np.metadata.name.clone().unwrap(),
                );
                cluster.network_policies.insert(key, np);
            }
            for ep in eps {
                let ep: super::crd::EgressPolicy = serde_json::from_value(ep).unwrap();
                cluster
                    .egress_policies
                    .insert(ep.metadata.name.clone().unwrap(), ep);
            }
            cluster
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn compiled_datapath_agrees_with_reference_semantics(
        cluster in cluster(),
        deny_baseline in any::<bool>(),
        probes in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<bool>(),
             prop::sample::select(&[6u8, 17, 132][..]), prop::sample::select(&[53u16, 80, 81, 8080, 8100, 9000][..])),
            30,
        ),
    ) {
        let world = World::new(&cluster);
        let baseline = if deny_baseline { Verdict::Deny } else { Verdict::Allow };
        let compiled = compile(&world, &CompileOptions {
                baseline,
                ..CompileOptions::default()
            });
        let addresses: Vec<IpAddr> = world
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .chain(OUTSIDE.iter().map(|a| a.parse().unwrap()))
            .collect();
        for (from, to, _, protocol, port) in probes {
            let pod = from.get(&world.pods);
            let dest = *to.get(&addresses);
            let endpoint = compiled.endpoints[&(pod.namespace.clone(), pod.name.clone())];
            let (_, decision) = compiled.desired.lookup(endpoint, dest, protocol, port).entry.unwrap();
            let got = (decision.verdict, compiled.origin(decision.rule).clone());
            let want = reference::evaluate(&world, baseline, pod, dest, protocol, port);
            prop_assert_eq!(
                &got, &want,
                "{}/{} -> {} {}/{}; invalid: {:?}", pod.namespace, pod.name, dest, protocol, port, world.invalid
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// After a pod's labels change, the incremental compile decides every probe exactly as a
    /// compile from scratch of the changed cluster.
    #[test]
    fn incremental_compile_after_label_change_equals_fresh_compile(
        cluster in cluster(),
        which in any::<prop::sample::Index>(),
        app in prop::sample::select(&APPS[..]),
        tier in any::<bool>(),
        probes in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(),
             prop::sample::select(&[6u8, 17][..]), prop::sample::select(&[53u16, 80, 81, 8080][..])),
            30,
        ),
    ) {
        let world = World::new(&cluster);
        let options = CompileOptions::default();
        let mut compiler = super::compile::Compiler::new(world.clone(), options.clone());
        let _ = compiler.compile();
        let mut pod = (**which.get(&world.pods)).clone();
        pod.labels.insert("app".into(), app.into());
        if tier {
            pod.labels.insert("tier".into(), "1".into());
        } else {
            pod.labels.remove("tier");
        }
        compiler.update_pod(pod.clone());
        let incremental = compiler.compile();
        let mut changed = world.clone();
        let i = changed.pods.iter().position(|p| p.namespace == pod.namespace && p.name == pod.name).unwrap();
        changed.pods[i] = pod.into();
        let fresh = compile(&changed, &options);
        let addresses: Vec<IpAddr> = changed.pods.iter().flat_map(|p| p.ips.iter().copied())
            .chain(OUTSIDE.iter().map(|a| a.parse().unwrap())).collect();
        for (from, to, protocol, port) in probes {
            let pod = from.get(&changed.pods);
            let key = (pod.namespace.clone(), pod.name.clone());
            let dest = *to.get(&addresses);
            let decide = |c: &super::compile::Compiled| {
                let (_, d) = c.desired.lookup(c.endpoints[&key], dest, protocol, port).entry.unwrap();
                (d.verdict, c.origin(d.rule).clone())
            };
            prop_assert_eq!(decide(&incremental), decide(&fresh), "{:?} -> {} {}/{}", key, dest, protocol, port);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Whatever the change between two cluster states, a compiler that compiled the first and
    /// is then given the second decides like a compile from scratch of the second: nothing
    /// memoised leaks from one state into the other.
    #[test]
    fn recompile_after_any_change_equals_fresh_compile(
        before in cluster(),
        after in cluster(),
        probes in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(),
             prop::sample::select(&[6u8, 17, 132][..]), prop::sample::select(&[53u16, 80, 81, 8080, 9000][..])),
            30,
        ),
    ) {
        let options = CompileOptions::default();
        let mut compiler = super::compile::Compiler::new(World::new(&before), options.clone());
        let _ = compiler.compile();
        let world = World::new(&after);
        compiler.set_world(world.clone());
        let recompiled = compiler.compile();
        let fresh = compile(&world, &options);
        let addresses: Vec<IpAddr> = world.pods.iter().flat_map(|p| p.ips.iter().copied())
            .chain(OUTSIDE.iter().map(|a| a.parse().unwrap())).collect();
        for (from, to, protocol, port) in probes {
            let pod = from.get(&world.pods);
            let key = (pod.namespace.clone(), pod.name.clone());
            let dest = *to.get(&addresses);
            let decide = |c: &super::compile::Compiled| {
                let (_, d) = c.desired.lookup(c.endpoints[&key], dest, protocol, port).entry.unwrap();
                (d.verdict, c.origin(d.rule).clone())
            };
            prop_assert_eq!(decide(&recompiled), decide(&fresh), "{:?} -> {} {}/{}", key, dest, protocol, port);
        }
    }
}

/// One change to one pod, as the agent's watch sees it.
#[derive(Clone, Debug)]
enum PodChange {
    Remove,
    Labels(&'static str, bool),
    Address(&'static str),
    /// A named port renamed (or given to a pod that had none).
    Port(&'static str, u16),
    /// A new pod, a copy of this one with another name and address.
    Add(&'static str),
}

fn pod_change() -> impl Strategy<Value = PodChange> {
    let addresses = &["10.9.0.1", "10.9.0.2", "198.51.100.2", "2001:db8:1::3"][..];
    prop_oneof![
        Just(PodChange::Remove),
        (prop::sample::select(&APPS[..]), any::<bool>())
            .prop_map(|(app, tier)| PodChange::Labels(app, tier)),
        prop::sample::select(addresses).prop_map(PodChange::Address),
        (
            prop::sample::select(&PORT_NAMES[..]),
            prop::sample::select(&PORTS[..])
        )
            .prop_map(|(name, port)| PodChange::Port(name, port)),
        prop::sample::select(addresses).prop_map(PodChange::Add),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// After a series of pod changes of every kind (added, removed, relabelled, readdressed,
    /// ports renamed), the incremental compile the agent runs decides every probe exactly as a
    /// compile from scratch of the changed cluster.
    #[test]
    fn incremental_compile_after_pod_changes_equals_fresh_compile(
        cluster in cluster(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), pod_change()), 1..5),
        probes in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(),
             prop::sample::select(&[6u8, 17][..]), prop::sample::select(&PORTS[..])),
            30,
        ),
    ) {
        let mut world = World::new(&cluster);
        let options = CompileOptions::default();
        let mut compiler = super::compile::Compiler::new(world.clone(), options.clone());
        let _ = compiler.compile();
        for (n, (which, change)) in changes.into_iter().enumerate() {
            if world.pods.is_empty() {
                break;
            }
            let mut pod = (**which.get(&world.pods)).clone();
            match change {
                PodChange::Remove => {
                    world.remove_pod(&pod.namespace, &pod.name);
                    compiler.remove_pod(&pod.namespace, &pod.name);
                    let _ = compiler.compile();
                    continue;
                }
                PodChange::Labels(app, tier) => {
                    pod.labels.insert("app".into(), app.into());
                    if tier {
                        pod.labels.insert("tier".into(), "1".into());
                    } else {
                        pod.labels.remove("tier");
                    }
                }
                PodChange::Address(address) => pod.ips = vec![address.parse().unwrap()],
                PodChange::Port(name, number) => {
                    pod.ports = vec![super::model::NamedPort {
                        name: name.into(),
                        protocol: super::model::Protocol::Tcp,
                        number,
                    }];
                }
                PodChange::Add(address) => {
                    pod.name = format!("added-{n}");
                    pod.ips = vec![address.parse().unwrap()];
                }
            }
            world.remove_pod(&pod.namespace, &pod.name);
            world.insert_pod(pod.clone().into());
            compiler.update_pod(pod);
            // Compiling between changes exercises what the compiler keeps from one to the next.
            let _ = compiler.compile();
        }
        prop_assume!(!world.pods.is_empty());
        let incremental = compiler.compile();
        let fresh = compile(&world, &options);
        let addresses: Vec<IpAddr> = world.pods.iter().flat_map(|p| p.ips.iter().copied())
            .chain(OUTSIDE.iter().map(|a| a.parse().unwrap())).collect();
        for (from, to, protocol, port) in probes {
            let pod = from.get(&world.pods);
            let key = (pod.namespace.clone(), pod.name.clone());
            let dest = *to.get(&addresses);
            let decide = |c: &super::compile::Compiled| {
                let (_, d) = c.desired.lookup(c.endpoints[&key], dest, protocol, port).entry.unwrap();
                (d.verdict, c.origin(d.rule).clone())
            };
            prop_assert_eq!(decide(&incremental), decide(&fresh), "{:?} -> {} {}/{}", key, dest, protocol, port);
        }
    }
}
