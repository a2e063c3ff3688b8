//! End-to-end test of local mode: `egret run` enforcing YAML policies on sandbox cgroups, with
//! hot reload. Needs root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use egret::datapath::{Datapath, DatapathConfig, Verdict};
use egret_tests::{
    agent::{EgretRun, copy_example_policies, destinations, http_get},
    probe::Outcome,
    sandbox::{Pod, Sandbox},
};

fn connect(sandbox: &Sandbox, pod: &Pod, cgroup: Option<&Path>, target: &str) -> Outcome {
    sandbox
        .probe(pod, cgroup, &["connect", target, "--timeout-ms", "500"])
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

/// Probes until `target` gives `want`; returns how long it took, failing after `within`.
fn until(
    sandbox: &Sandbox,
    pod: &Pod,
    cgroup: Option<&Path>,
    target: &str,
    want: Outcome,
    within: Duration,
    attempts: &mut u64,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = connect(sandbox, pod, cgroup, target);
        *attempts += 1;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{target} still {got:?} after {:?}, wanted {want:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn egret_run_enforces_example_policies_reloads_rejects_broken_files_and_keeps_counters() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let worker = sandbox.add_pod("worker").expect("pod");
    let addrs: Vec<IpAddr> = ["192.0.2.10", "192.0.2.254", "203.0.113.10"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let host = sandbox.add_host("ext", &addrs).expect("host");
    let _listeners: Vec<_> = [
        "192.0.2.10:443",
        "192.0.2.10:80",
        "192.0.2.254:80",
        "192.0.2.254:443",
        "203.0.113.10:443",
    ]
    .iter()
    .map(|a| {
        sandbox
            .listen_tcp(&host, a.parse().expect("addr"))
            .expect("listen")
    })
    .collect();

    let dir = std::env::temp_dir().join(format!("{}-local", sandbox.id()));
    let policies = dir.join("policies");
    copy_example_policies(&policies).expect("copy example policies");
    let late_cgroup = sandbox.cgroup().join("late");
    let config = format!(
        "baseline: allow\npolicies: [policies]\nworkloads:\n\
         - {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n\
         - {{name: worker, namespace: batch, labels: {{app: worker}}, cgroup: {}}}\n\
         - {{name: late, namespace: shop, labels: {{app: late}}, cgroup: {}}}\n\
         metrics: {{address: 127.0.0.1:0, maxDestinationSeries: 100}}\n",
        web.cgroup.display(),
        worker.cgroup.display(),
        late_cgroup.display()
    );
    std::fs::write(dir.join("egret.yaml"), config).expect("write config");

    let agent =
        EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0.3").expect("spawn egret run");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    let mut to_10 = 0u64;

    // Enforcement per the example policies.
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.10:443"),
        Outcome::Connected,
        "shop/allow-payments"
    );
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.10:80"),
        Outcome::Denied,
        "shop is default-deny"
    );
    to_10 += 2;
    assert_eq!(
        connect(&sandbox, &web, None, "203.0.113.10:443"),
        Outcome::Denied,
        "shop is default-deny"
    );
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.254:443"),
        Outcome::Denied,
        "block-metadata"
    );
    assert_eq!(
        connect(&sandbox, &worker, None, "192.0.2.10:80"),
        Outcome::Connected,
        "allow-internal"
    );
    to_10 += 1;
    assert_eq!(
        connect(&sandbox, &worker, None, "192.0.2.254:80"),
        Outcome::Denied,
        "block-metadata (priority 0) over allow-internal (priority 100)"
    );
    assert_eq!(
        connect(&sandbox, &worker, None, "203.0.113.10:443"),
        Outcome::Connected,
        "audit only"
    );

    // An edit takes effect within a second.
    let file = policies.join("shop-default-deny.yaml");
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.contains("ports: [{protocol: TCP, port: 443}]"));
    std::fs::write(
        &file,
        text.replace(
            "ports: [{protocol: TCP, port: 443}]",
            "ports: [{protocol: TCP, port: 443}, {protocol: TCP, port: 80}]",
        ),
    )
    .expect("edit");
    let took = until(
        &sandbox,
        &web,
        None,
        "192.0.2.10:80",
        Outcome::Connected,
        Duration::from_secs(1),
        &mut to_10,
    );
    eprintln!("edit took effect after {took:?}");

    // A broken file is reported with file, object and field; the previous policy stays.
    std::fs::write(
        policies.join("zz-broken.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 192.0.2.0/33}}]\n",
    )
    .expect("write broken");
    let log = agent.wait_log("reload rejected", 1, Duration::from_secs(1));
    assert!(
        log.contains("zz-broken.yaml document 0: NetworkPolicy shop/broken: spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"192.0.2.0/33\""),
        "{log}"
    );
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.10:80"),
        Outcome::Connected,
        "previous policy still enforced"
    );
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.10:443"),
        Outcome::Connected
    );
    to_10 += 2;
    assert_eq!(
        connect(&sandbox, &web, None, "192.0.2.254:443"),
        Outcome::Denied
    );
    std::fs::remove_file(policies.join("zz-broken.yaml")).expect("remove broken");

    // A workload whose cgroup appears after the start is picked up (shop is default-deny).
    sandbox.add_unmanaged_cgroup("late").expect("late cgroup");
    until(
        &sandbox,
        &web,
        Some(&late_cgroup),
        "203.0.113.10:443",
        Outcome::Denied,
        Duration::from_secs(1),
        &mut 0,
    );

    // Counters continued across the reloads: every attempt to 192.0.2.10 is counted once.
    let dp = Datapath::open(&DatapathConfig {
        pin_dir: sandbox.pin_dir().into(),
        cgroup: None,
    })
    .expect("adopt");
    let ten: IpAddr = "192.0.2.10".parse().expect("ip");
    let counters = dp.counters().expect("counters");
    let counted: u64 = counters
        .samples
        .iter()
        .filter(|s| s.destination == Some(ten))
        .map(|s| s.attempts)
        .sum();
    assert_eq!(counted, to_10, "{counters:?}");
    let blocked: u64 = counters
        .samples
        .iter()
        .filter(|s| s.destination == Some(ten) && s.verdict == Verdict::Deny)
        .map(|s| s.attempts)
        .sum();
    assert!(blocked >= 1);

    // The report names workload, destination, verdict and deciding policy.
    std::thread::sleep(Duration::from_millis(700));
    let report = std::fs::read_to_string(&agent.stdout).unwrap_or_default();
    let has = |workload: &str, dest: &str, verdict: &str, policy: &str| {
        report.lines().any(|l| {
            l.contains(workload) && l.contains(dest) && l.contains(verdict) && l.contains(policy)
        })
    };
    assert!(
        has(
            "shop/web",
            "192.0.2.254",
            "blocked",
            "EgressPolicy block-metadata rule metadata"
        ),
        "{report}"
    );
    assert!(
        has(
            "batch/worker",
            "203.0.113.10",
            "audit",
            "EgressPolicy audit-internet rule public-internet"
        ),
        "{report}"
    );
    assert!(
        has(
            "shop/web",
            "192.0.2.10",
            "passthrough",
            "NetworkPolicy shop/allow-payments rule egress[0]"
        ),
        "{report}"
    );

    // The deny log: a JSON line per blocked (and audit) attempt, naming process and policy.
    let deny_lines: Vec<serde_json::Value> = report
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("deny log line is JSON"))
        .collect();
    let metadata = deny_lines
        .iter()
        .find(|l| l["destination_ip"] == "192.0.2.254" && l["source_workload"] == "web")
        .unwrap_or_else(|| panic!("no deny-log line for web -> 192.0.2.254:\n{report}"));
    assert_eq!(metadata["verdict"], "blocked");
    assert_eq!(metadata["comm"], "egret-probe");
    assert!(
        metadata["pid"].as_u64().is_some_and(|pid| pid > 1),
        "{metadata}"
    );
    assert_eq!(metadata["port"], 443);
    assert_eq!(metadata["protocol"], "TCP");
    assert_eq!(metadata["policy"], "EgressPolicy block-metadata");
    assert_eq!(metadata["rule"], "metadata");
    assert!(
        metadata["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{metadata}"
    );
    let audit = deny_lines
        .iter()
        .find(|l| l["verdict"] == "audit")
        .unwrap_or_else(|| panic!("no audit line:\n{report}"));
    assert_eq!(audit["source_workload"], "worker");
    assert_eq!(audit["policy"], "EgressPolicy audit-internet");
    assert!(
        deny_lines.iter().all(|l| l["verdict"] != "passthrough"),
        "allowed connections are not logged"
    );

    // The same counts as Prometheus metrics, labelled by workload and deciding policy.
    let address = agent
        .metrics_address()
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", agent.log()));
    assert!(
        http_get(&address, "/readyz")
            .expect("readyz")
            .starts_with("HTTP/1.1 200")
    );
    let metrics = http_get(&address, "/metrics").expect("metrics");
    let series = |needles: &[&str]| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("egret_egress_connections_total{")
                    && needles.iter().all(|n| l.contains(n))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        series(&["destination_ip=\"192.0.2.10\""]),
        to_10,
        "{metrics}"
    );
    assert_eq!(
        series(&[
            "verdict=\"audit\"",
            "destination_ip=\"203.0.113.10\"",
            "source_namespace=\"batch\"",
            "source_workload=\"worker\"",
            "policy=\"EgressPolicy audit-internet\"",
            "protocol=\"TCP\"",
        ]),
        1,
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "egret_programs_attached {}",
            egret_common::program_names::ALL.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("egret_policies_rejected{reason=\"invalid\"} 0"),
        "{metrics}"
    );
    drop(agent);

    // A restarted agent adopts the pinned datapath and its metrics continue from the kernel's
    // counts; the flags override the config's metrics section.
    let restarted = EgretRun::start_with(
        &dir,
        sandbox.pin_dir(),
        sandbox.cgroup(),
        "0",
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--max-destination-series",
            "1",
        ],
        "-2",
    )
    .expect("restart egret run");
    let log = restarted.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert!(log.contains("adopted pinned programs and maps"), "{log}");
    let address = restarted.metrics_address().expect("metrics address");
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = http_get(&address, "/metrics").expect("metrics");
        let ten: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("egret_egress_connections_workload_total{")
                    && l.contains("source_workload=\"web\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if ten > 0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "restarted agent exports no counts:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let destinations = destinations(&metrics);
    assert_eq!(
        destinations.len(),
        2,
        "--max-destination-series 1: one address and `other`: {destinations:?}"
    );
    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("egret_egress_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    let kernel: u64 = dp
        .counters()
        .expect("counters")
        .samples
        .iter()
        .map(|s| s.attempts)
        .sum();
    assert_eq!(
        total, kernel,
        "the restarted agent's metrics start from the pinned counters"
    );
    drop(restarted);
    let _ = std::fs::remove_dir_all(&dir);
}
