//! What the test API server costs the agent's benchmark: seeding 10,000 pods and 1,000
//! NetworkPolicies, a kube-rs watcher's paginated initial list of the pods, and the latency
//! from a label patch to the watch event, printed (not asserted).
//! `cargo bench -p egret-test-apiserver --bench watch`

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot set up has nothing to print"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use egret_test_apiserver::{ApiServer, Config};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;

const PODS: usize = 10_000;
const POLICIES: usize = 1_000;
const PATCHES: usize = 300;

fn seed_yaml() -> String {
    let mut docs = Vec::new();
    for ns in 0..20 {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}}}\n"
        ));
    }
    for i in 0..PODS {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns{}, labels: {{app: a{}}}}}\n\
             spec: {{nodeName: node-{}, containers: [{{name: app, image: img}}]}}\n\
             status: {{podIP: 10.{}.{}.{}}}\n",
            i % 20,
            i % 50,
            i % 10,
            i / 65_536,
            (i / 256) % 256,
            i % 256
        ));
    }
    for i in 0..POLICIES {
        docs.push(format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-{i}, namespace: ns{}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: a{}}}}}, policyTypes: [Egress], \
             egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}]}}]}}\n",
            i % 20,
            i % 50
        ));
    }
    docs.join("---\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let server = ApiServer::start(listen, Config::default()).expect("server starts");
    let yaml = seed_yaml();
    let start = Instant::now();
    server.seed(&yaml).expect("seed");
    let seeded = start.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (listed, mut latencies) = runtime.block_on(async {
        let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("config");
        let client = Client::try_from(config).expect("client");
        let all: Api<Pod> = Api::all(client.clone());
        let start = Instant::now();
        let mut events = watcher(all, watcher::Config::default())
            .applied_objects()
            .boxed();
        let mut seen = 0;
        while seen < PODS {
            events.next().await.expect("stream open").expect("object");
            seen += 1;
        }
        let listed = start.elapsed();
        let pods: Api<Pod> = Api::namespaced(client, "ns0");
        let mut latencies = Vec::with_capacity(PATCHES);
        for i in 0..PATCHES {
            let value = format!("v{i}");
            let sent = Instant::now();
            pods.patch(
                "pod-0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"bench": value}}})),
            )
            .await
            .expect("patch");
            loop {
                let pod = events.next().await.expect("stream open").expect("object");
                let labels = pod.metadata.labels.unwrap_or_default();
                if labels.get("bench") == Some(&value) {
                    break;
                }
            }
            latencies.push(sent.elapsed());
        }
        (listed, latencies)
    });
    latencies.sort();
    println!("test API server, {PODS} pods and {POLICIES} NetworkPolicies:");
    println!("  seed (create + status write of every object): {seeded:.2?}");
    println!("  kube-rs watcher initial list, pages of 500, until every pod is seen: {listed:.2?}");
    println!(
        "  label patch -> watch event, {PATCHES} patches: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    println!(
        "  peak RSS of server and client together: {:.0} MiB",
        peak_rss_mib()
    );
}
