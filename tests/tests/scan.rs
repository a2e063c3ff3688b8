//! A workload scanning 100,000 distinct addresses: every attempt is denied and counted exactly
//! once, the destination series stay within the budget with the rest counted under `other`,
//! and the deny log stays short. Needs root.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use egret_tests::{
    agent::{EgretRun, copy_example_policies, destinations, http_get, sum},
    probe::probe_binary,
    sandbox::Sandbox,
};

const SCANNED: u64 = 100_000;
const BUDGET: usize = 100;

#[test]
fn scanning_100k_denied_addresses_stays_within_the_series_budget() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    // The scanned addresses lie in 2001:db8:2::/64, the subnet of this host; the scan is denied
    // at the syscall, so nothing is sent at all.
    let host_addr: IpAddr = "2001:db8:2::10".parse().expect("ip");
    let _host = sandbox.add_host("ext", &[host_addr]).expect("host");

    let dir = std::env::temp_dir().join(format!("{}-scan", sandbox.id()));
    copy_example_policies(&dir.join("policies")).expect("policies");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0, maxDestinationSeries: {BUDGET}}}\nworkloads:\n\
             - {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n",
            web.cgroup.display()
        ),
    )
    .expect("config");
    let egret = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = egret.metrics_address().expect("metrics address");

    let count = SCANNED.to_string();
    let output = sandbox
        .command_in(&web.netns, &web.cgroup, &probe_binary())
        .expect("probe command")
        .args(["scan", "[2001:db8:2::1:0]:9", "--count", &count])
        .output()
        .expect("scan");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("scan summary");
    assert_eq!(
        summary["outcomes"],
        serde_json::json!({"denied": SCANNED}),
        "{summary}"
    );

    // Wait until the agent has drained every count.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let metrics = http_get(&address, "/metrics").expect("metrics");
        if sum(
            &metrics,
            "egret_egress_connections_total",
            &["verdict=\"blocked\""],
        ) == SCANNED
        {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "blocked count never reached {SCANNED}:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };

    let destinations = destinations(&metrics);
    assert_eq!(
        destinations.len(),
        BUDGET + 1,
        "the budget's destinations and `other`"
    );
    assert!(destinations.contains("other"));
    assert_eq!(
        sum(
            &metrics,
            "egret_egress_connections_total",
            &["destination_ip=\"other\""]
        ),
        SCANNED - BUDGET as u64
    );
    assert_eq!(
        sum(&metrics, "egret_metrics_destinations_overflow_total", &[]),
        SCANNED - BUDGET as u64
    );
    assert_eq!(
        sum(
            &metrics,
            "egret_egress_connections_workload_total",
            &["verdict=\"blocked\"", "source_workload=\"web\""]
        ),
        SCANNED
    );
    assert_eq!(
        sum(&metrics, "egret_kernel_counter_lost_total", &[]),
        0,
        "nothing lost in the kernel"
    );
    // The kernel's destination map filled up; the rest was counted without destination.
    let counters_entries = sum(&metrics, "egret_map_entries", &["map=\"EGRET_COUNTERS\""]);
    let counters_capacity = sum(&metrics, "egret_map_capacity", &["map=\"EGRET_COUNTERS\""]);
    assert!(counters_entries <= counters_capacity);

    // The deny log did not take 100,000 lines: the per-source limit held it back, and counted.
    std::thread::sleep(Duration::from_millis(800));
    let log_lines = std::fs::read_to_string(&egret.stdout)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count();
    assert!((1..=200).contains(&log_lines), "{log_lines} deny-log lines");
    let metrics = http_get(&address, "/metrics").expect("metrics");
    let held_back = sum(&metrics, "egret_deny_log_suppressed_total", &[]);
    let dropped = sum(&metrics, "egret_deny_log_kernel_dropped", &[]);
    assert_eq!(
        log_lines as u64 + held_back + dropped,
        SCANNED,
        "every event logged, held back or dropped, and counted"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
