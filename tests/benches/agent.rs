//! `egret agent` at scale against the test API server: 10,000 pods, 1,000 NetworkPolicies, 100
//! EgressPolicies and 50 Services, this node with its share of the pods. Prints the time from
//! start to ready, the agent's peak RSS (target under 150 MiB) and the API-event-to-enforced
//! latency of label changes, p50 and p99 (target p99 under 250 ms, debounce included), as the
//! agent's own `egret_policy_enforce_latency_seconds` measures each write.
//!
//! `sudo cargo bench -p egret-tests --bench agent` (root: it loads egret's programs into a
//! sandbox cgroup). A benchmark, not a test: it prints figures and fails only if it cannot run.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egret::policy::synthetic::{NODE, Shape, cluster};
use egret_test_apiserver::{ApiServer, Config};
use egret_tests::{
    agent::{http_get, metrics_address_in, samples},
    probe::egret_binary,
    sandbox::Sandbox,
};
use serde_json::{Value, json};

const SHAPE: Shape = Shape {
    namespaces: 100,
    pods_per_namespace: 100,
    network_policies_per_namespace: 10,
    egress_policies: 100,
    nodes: 91,
};
const SERVICES: usize = 50;
const LABEL_CHANGES: usize = 60;

fn main() {
    if let Err(err) = run() {
        eprintln!("bench agent: {err}");
        std::process::exit(1);
    }
}

fn documents(objects: impl IntoIterator<Item = Value>) -> String {
    objects
        .into_iter()
        .map(|o| serde_json::to_string(&o).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let sandbox = Sandbox::new()?;
    let dir = std::env::temp_dir().join(format!("{}-bench-agent", sandbox.id()));
    std::fs::create_dir_all(&dir)?;
    let server = ApiServer::start("127.0.0.1:0".parse()?, Config::default())?;
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let crd = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/egresspolicy.yaml"),
    )?;
    server.seed(&crd).map_err(|e| format!("CRD: {e}"))?;

    let seeding = Instant::now();
    let synthetic = cluster(&SHAPE);
    let mut objects: Vec<Value> = Vec::new();
    for ns in synthetic.namespaces.values() {
        let mut v = serde_json::to_value(ns)?;
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Namespace");
        objects.push(v);
    }
    let mut pod_ips = Vec::new();
    for pod in synthetic.pods.values() {
        let mut v = serde_json::to_value(pod)?;
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Pod");
        if let Some(ip) = v["status"]["podIP"].as_str() {
            pod_ips.push((
                pod.metadata.namespace.clone().unwrap_or_default(),
                ip.to_owned(),
            ));
        }
        objects.push(v);
    }
    for np in synthetic.network_policies.values() {
        let mut v = serde_json::to_value(np)?;
        v["apiVersion"] = json!("networking.k8s.io/v1");
        v["kind"] = json!("NetworkPolicy");
        objects.push(v);
    }
    for ep in synthetic.egress_policies.values() {
        objects.push(serde_json::to_value(ep)?);
    }
    // 50 Services, each with three endpoints among the pods of its namespace.
    for s in 0..SERVICES {
        let namespace = format!("ns-{s:03}");
        let endpoints: Vec<Value> = pod_ips
            .iter()
            .filter(|(ns, _)| ns == &namespace)
            .take(3)
            .map(|(_, ip)| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        objects.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": namespace},
            "spec": {"clusterIP": format!("198.19.255.{}", s + 1), "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}
        }));
        objects.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{s}-1"), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }));
    }
    let stored = server
        .seed(&documents(objects))
        .map_err(|e| format!("seed: {e}"))?;
    println!(
        "seeded {} objects in {:.1?} ({} pods, {} NetworkPolicies, {} EgressPolicies, {SERVICES} Services)",
        stored.len(),
        seeding.elapsed(),
        synthetic.pods.len(),
        synthetic.network_policies.len(),
        synthetic.egress_policies.len()
    );

    // This node's pods get cgroups where the kubelet's systemd driver puts them.
    let kubepods = sandbox.add_unmanaged_cgroup("kubepods.slice")?;
    let burstable = sandbox.add_cgroup_below(&kubepods, "kubepods-burstable.slice")?;
    let mut local = Vec::new();
    for object in &stored {
        if object["kind"] == "Pod" && object["spec"]["nodeName"] == NODE {
            let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
            sandbox.add_cgroup_below(
                &burstable,
                &format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            )?;
            local.push(object.clone());
        }
    }
    println!("{NODE}: {} pods with cgroups", local.len());

    let log = dir.join("agent.log");
    let start = Instant::now();
    let mut agent = Command::new(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .arg("agent")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--metrics-addr", "127.0.0.1:0"])
        .arg("--cgroup")
        .arg(sandbox.cgroup())
        .arg("--cgroup-root")
        .arg(sandbox.cgroup())
        .env("EGRET_LOG", "warn,egret=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = agent.id();
    let result = measure(&log, start, pid, &server, &local);
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    log: &std::path::Path,
    start: Instant,
    pid: u32,
    server: &ApiServer,
    local: &[Value],
) -> Result<(), Box<dyn std::error::Error>> {
    let address = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(a) = metrics_address_in(&text) {
            break a;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("agent never served metrics:\n{text}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    while !http_get(&address, "/readyz")?.starts_with("HTTP/1.1 200") {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("agent never became ready".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = start.elapsed();

    // Label changes of pods on this node: each is an API event the agent compiles and writes.
    let histogram = |metrics: &str| -> (f64, f64) {
        let get = |name: &str| {
            samples(metrics, name)
                .map(|(_, v)| v)
                .next()
                .unwrap_or_default()
        };
        (
            get("egret_policy_enforce_latency_seconds_count"),
            get("egret_policy_enforce_latency_seconds_sum"),
        )
    };
    let mut latencies = Vec::new();
    for i in 0..LABEL_CHANGES {
        let (count, sum) = histogram(&http_get(&address, "/metrics")?);
        let mut pod = local[i % local.len()].clone();
        pod["metadata"]["labels"]["app"] = json!(format!("app-{}", (i + 3) % 10));
        pod["metadata"]
            .as_object_mut()
            .map(|m| m.remove("resourceVersion"));
        server
            .seed(&serde_json::to_string(&pod)?)
            .map_err(|e| format!("label change: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (now_count, now_sum) = histogram(&http_get(&address, "/metrics")?);
            if now_count > count {
                // One write took this change: its own latency. (Several writes since: their
                // mean, which can understate the slowest of them; the bench waits for each change
                // to be enforced before the next, so one write per change is the rule.)
                latencies.push((now_sum - sum) / (now_count - count));
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("label change {i} never enforced").into());
            }
            // The latency is the agent's own measure, whatever the poll rate; scraping faster
            // would take a core from the agent it measures.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    println!();
    println!("| measure | result | target |");
    println!("|---|---|---|");
    println!("| start to ready (every watch listed, first write) | {ready:.2?} | reported |");
    println!(
        "| peak RSS of the agent | {:.0} MiB | < 150 MiB |",
        peak_kib as f64 / 1024.0
    );
    println!(
        "| label change, API event to enforced, p50 | {:.1} ms | reported |",
        quantile(0.5) * 1e3
    );
    println!(
        "| label change, API event to enforced, p99 | {:.1} ms | < 250 ms |",
        quantile(0.99) * 1e3
    );
    Ok(())
}
