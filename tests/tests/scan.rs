//! A workload scanning 100,000 distinct addresses: every attempt is denied and counted exactly
//! once, the destination series stay within the budget with the rest counted under `other`,
//! and the deny log stays short; and destinations that go quiet give their series, and their
//! places in the budget, to the next ones. Needs root.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use egret_tests::{
    agent::{EgretRun, copy_example_policies, destinations, http_get, sum},
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

    sandbox.scan_denied(&web, "[2001:db8:2::1:0]:9", SCANNED);

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

/// The budget and idle time of the series-expiry test: short, so the test waits seconds.
const SMALL_BUDGET: usize = 8;
const IDLE_SECONDS: u64 = 4;

/// Waits until `/metrics` satisfies `done`; panics with the last exposition after 30 s.
fn metrics_until(address: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(address, "/metrics").expect("metrics");
        if done(&metrics) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_destination_series_expire_and_their_places_go_to_new_destinations() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let host_addr: IpAddr = "2001:db8:2::10".parse().expect("ip");
    let _host = sandbox.add_host("ext", &[host_addr]).expect("host");
    let dir = std::env::temp_dir().join(format!("{}-series-idle", sandbox.id()));
    copy_example_policies(&dir.join("policies")).expect("policies");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0, maxDestinationSeries: {SMALL_BUDGET}, seriesIdle: {IDLE_SECONDS}s}}\n\
             workloads:\n- {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n",
            web.cgroup.display()
        ),
    )
    .expect("config");
    let egret = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = egret.metrics_address().expect("metrics address");
    let blocked_by_web = |metrics: &str| {
        sum(
            metrics,
            "egret_egress_connections_workload_total",
            &["verdict=\"blocked\"", "source_workload=\"web\""],
        )
    };
    let old: Vec<String> = (0..SMALL_BUDGET)
        .map(|i| format!("2001:db8:2::1:{i}"))
        .collect();

    // The budget's worth of destinations, twice each.
    sandbox.scan_denied(&web, "[2001:db8:2::1:0]:9", SMALL_BUDGET as u64);
    sandbox.scan_denied(&web, "[2001:db8:2::1:0]:9", SMALL_BUDGET as u64);
    let metrics = metrics_until(&address, "counted the first scans", |m| {
        blocked_by_web(m) == 2 * SMALL_BUDGET as u64
    });
    assert_eq!(
        destinations(&metrics),
        old.iter().cloned().collect(),
        "each its own series, none `other`"
    );

    // Quiet past the idle time: every series of those destinations goes; the per-workload
    // total keeps every attempt.
    let started = Instant::now();
    let metrics = metrics_until(&address, "dropped the idle series", |m| {
        destinations(m).is_empty()
    });
    assert!(
        started.elapsed() >= Duration::from_secs(IDLE_SECONDS) - Duration::from_secs(1),
        "series dropped before the idle time: after {:?}",
        started.elapsed()
    );
    assert_eq!(blocked_by_web(&metrics), 2 * SMALL_BUDGET as u64);

    // New destinations take the freed places, and two old ones come back with new series
    // holding what they counted since.
    const NEW: u64 = SMALL_BUDGET as u64 - 2;
    sandbox.scan_denied(&web, "[2001:db8:2::2:0]:9", NEW);
    sandbox.scan_denied(&web, "[2001:db8:2::1:0]:9", 2);
    let total = 2 * SMALL_BUDGET as u64 + NEW + 2;
    let metrics = metrics_until(&address, "counted the second scans", |m| {
        blocked_by_web(m) == total
    });
    let expected: std::collections::BTreeSet<String> = (0..NEW)
        .map(|i| format!("2001:db8:2::2:{i}"))
        .chain(old[..2].iter().cloned())
        .collect();
    assert_eq!(
        destinations(&metrics),
        expected,
        "within the budget, none `other`"
    );
    for destination in &expected {
        assert_eq!(
            sum(
                &metrics,
                "egret_egress_connections_total",
                &[&format!("destination_ip=\"{destination}\"")]
            ),
            1,
            "{destination}: a new series counts from its new attempts\n{metrics}"
        );
    }
    assert_eq!(
        sum(&metrics, "egret_metrics_destinations_overflow_total", &[]),
        0
    );
    // Exact per workload: every attempt once, none lost with its series, none twice.
    assert_eq!(blocked_by_web(&metrics), total);
    let _ = std::fs::remove_dir_all(&dir);
}
