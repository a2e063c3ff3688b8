//! Faults and abuse (`docs/operations.md`): what egret does when its own process dies under
//! load. Privileged, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use egret_tests::{
    agent::{EgretRun, http_get, samples, sum},
    probe::egret_binary,
    sandbox::Sandbox,
};

/// Sum of `egret_egress_connections_total` samples whose labels hold every needle.
fn metric(exposition: &str, needles: &[&str]) -> u64 {
    samples(exposition, "egret_egress_connections_total")
        .filter(|(labels, _)| needles.iter().all(|n| labels.contains(n)))
        .map(|(_, v)| v as u64)
        .sum()
}

/// What the kernel's counters hold for `verdict`, read from the pins: to `destination`, or
/// in all (with or without destination) when it is `None`.
fn kernel_counted(pin_dir: &Path, destination: Option<&str>, verdict: &str) -> u64 {
    let out = std::process::Command::new(egret_binary())
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(["counters", "-o", "json"])
        .output()
        .expect("egret counters");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| destination.is_none_or(|d| v["destination"] == d) && v["verdict"] == verdict)
        .filter_map(|v| v["attempts"].as_u64())
        .sum()
}

/// What the kernel's counters hold for `destination` and `verdict`.
fn kernel(pin_dir: &Path, destination: &str, verdict: &str) -> u64 {
    kernel_counted(pin_dir, Some(destination), verdict)
}

const DENIED: &str = "192.0.2.10";
const ALLOWED: &str = "192.0.2.11";

/// `dir/egret.yaml` for one workload (a YAML flow mapping) with metrics on, and its one
/// policy in `dir/policies/`.
fn write_config(dir: &Path, workload: &str, policy: &str) {
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0, maxDestinationSeries: 100}}\n\
             workloads:\n- {workload}\n"
        ),
    )
    .expect("config");
    std::fs::write(dir.join("policies/policy.yaml"), policy).expect("policy");
}

/// An EgressPolicy that denies the denied host to every workload.
fn deny_ten() -> String {
    format!(
        "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: deny-ten}}\n\
         spec: {{priority: 0, subject: {{podSelector: {{}}}}, rules: [{{name: ten, action: Deny, to: [{{networks: [{DENIED}/32]}}]}}]}}\n"
    )
}

/// (blocked to the denied host, passthrough to the allowed one) as `/metrics` says.
fn scrape(agent: &EgretRun) -> (u64, u64) {
    let address = agent.metrics_address().expect("metrics address");
    let text = http_get(&address, "/metrics").expect("scrape");
    (
        metric(
            &text,
            &[
                &format!("destination_ip=\"{DENIED}\""),
                "verdict=\"blocked\"",
            ],
        ),
        metric(
            &text,
            &[
                &format!("destination_ip=\"{ALLOWED}\""),
                "verdict=\"passthrough\"",
            ],
        ),
    )
}

#[test]
fn sigkill_twenty_times_under_load_changes_no_verdict_and_loses_no_count() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let _host = sandbox
        .add_host(
            "ext",
            &[DENIED.parse().expect("ip"), ALLOWED.parse().expect("ip")],
        )
        .expect("host");
    let dir = std::env::temp_dir().join(format!("{}-faults-kill", sandbox.id()));
    write_config(
        &dir,
        &format!(
            "{{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}",
            pod.cgroup.display()
        ),
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-eleven, namespace: shop}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {ALLOWED}/32}}}}]\n"
        ),
    );
    let start = |round: usize| {
        let agent = EgretRun::start_with(
            &dir,
            sandbox.pin_dir(),
            sandbox.cgroup(),
            "0",
            &[],
            &format!("-{round}"),
        )
        .expect("egret run");
        agent.wait_log("policy enforced", 1, Duration::from_secs(20));
        agent
    };
    let agent = start(0);
    let stop = dir.join("stop");
    let stop_arg = stop.to_str().expect("utf-8");
    // Datagrams as fast as one socket sends them, to each host: tens of thousands a second.
    let probers: Vec<u32> = [DENIED, ALLOWED]
        .iter()
        .map(|host| {
            sandbox
                .spawn_probe(
                    &pod,
                    &["udp-loop", &format!("{host}:53"), "--until-file", stop_arg],
                )
                .expect("prober")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut seen = scrape(&agent);
    drop(agent); // SIGKILL

    for round in 1..=20 {
        let agent = start(round);
        // A restarted agent's metrics continue from the pinned counters (after its first
        // drain): never below what the one before it showed.
        let deadline = Instant::now() + Duration::from_secs(5);
        let now = loop {
            let now = scrape(&agent);
            if (now.0 >= seen.0 && now.1 >= seen.1) || Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            now.0 >= seen.0 && now.1 >= seen.1,
            "round {round}: counts went back from {seen:?} to {now:?}"
        );
        seen = now;
        drop(agent); // SIGKILL, mid-drain or mid-sync as it happens
    }

    let agent = start(21);
    std::fs::write(&stop, "").expect("stop");
    let summaries: Vec<serde_json::Value> = probers
        .into_iter()
        .map(|pid| {
            let out = sandbox.wait_probe_output(pid).expect("prober output");
            serde_json::from_str(out.trim()).expect("summary line")
        })
        .collect();
    let denied_sent = summaries[0]["count"].as_u64().expect("count");
    let allowed_sent = summaries[1]["count"].as_u64().expect("count");
    assert!(
        denied_sent > 10_000 && allowed_sent > 10_000,
        "too few datagrams to mean anything: {summaries:?}"
    );
    // No wrong verdict at any moment of the 21 lives and 20 deaths.
    assert_eq!(
        summaries[0]["outcomes"]["denied"].as_u64(),
        Some(denied_sent),
        "{summaries:?}"
    );
    assert_eq!(
        summaries[1]["outcomes"]["sent"].as_u64(),
        Some(allowed_sent),
        "{summaries:?}"
    );
    // No lost count: the kernel's counters and /metrics agree exactly with the prober.
    assert_eq!(kernel(sandbox.pin_dir(), DENIED, "blocked"), denied_sent);
    assert_eq!(
        kernel(sandbox.pin_dir(), ALLOWED, "passthrough"),
        allowed_sent
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&agent);
        if now == (denied_sent, allowed_sent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics says {now:?}, the prober sent ({denied_sent}, {allowed_sent})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_endpoint_without_policy_gets_what_on_fault_says_and_is_counted_as_missing_policy() {
    use std::collections::BTreeMap;

    use egret::datapath::{CgroupRole, Datapath, DatapathConfig, DesiredState, Verdict};
    use egret_common::RULE_MISSING_POLICY;
    use egret_tests::probe::Outcome;

    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("ext", &[DENIED.parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, format!("{DENIED}:80").parse().expect("addr"))
        .expect("listen");
    let cgroup = egret::sys::cgroup_id(&pod.cgroup).expect("cgroup id");
    // Endpoint 4242 has no entry in either generation: what a fault (a half-removed endpoint)
    // leaves. The agent never writes that itself; the API does.
    const ORPHAN: u32 = 4242;
    for (on_fault, want, verdict) in [
        (Verdict::Allow, Outcome::Connected, Verdict::Allow),
        (Verdict::Deny, Outcome::Denied, Verdict::Deny),
        (Verdict::Allow, Outcome::Connected, Verdict::Allow),
    ] {
        let mut datapath = Datapath::open(&DatapathConfig {
            pin_dir: sandbox.pin_dir().into(),
            cgroup: Some(sandbox.cgroup().into()),
        })
        .expect("datapath");
        datapath.set_on_fault(on_fault);
        datapath
            .sync(
                &DesiredState::default(),
                &BTreeMap::from([(cgroup, CgroupRole::Endpoint(ORPHAN))]),
            )
            .expect("sync");
        let before = missing(&datapath, verdict);
        let outcome = sandbox
            .probe(
                &pod,
                None,
                &["connect", &format!("{DENIED}:80"), "--timeout-ms", "500"],
            )
            .expect("probe")[0]
            .outcome;
        assert_eq!(outcome, want, "--on-fault {on_fault:?}");
        assert_eq!(
            missing(&datapath, verdict),
            before + 1,
            "counted under missing-policy"
        );
    }

    fn missing(datapath: &Datapath, verdict: Verdict) -> u64 {
        datapath
            .counters()
            .expect("counters")
            .samples
            .iter()
            .filter(|s| {
                s.endpoint == ORPHAN && s.rule == RULE_MISSING_POLICY && s.verdict == verdict
            })
            .map(|s| s.attempts)
            .sum()
    }
}

/// `VmRSS` of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `egret_map_entries{map}` as `/metrics` says.
fn map_entries(agent: &EgretRun, map: &str) -> u64 {
    let address = agent.metrics_address().expect("metrics address");
    samples(
        &http_get(&address, "/metrics").expect("scrape"),
        "egret_map_entries",
    )
    .filter(|(labels, _)| labels.contains(&format!("map=\"{map}\"")))
    .map(|(_, v)| v as u64)
    .sum()
}

/// Entries of every pinned map under `pin_dir` that holds keys (arrays and ring buffers have a
/// fixed size), counted in the kernel: what `/metrics` does not report too.
fn every_map(pin_dir: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use aya::maps::{MapData, MapType};
    let mut out = std::collections::BTreeMap::new();
    let dir = pin_dir.join("maps");
    for entry in std::fs::read_dir(&dir).expect("pinned maps").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let map = MapData::from_pin(entry.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = map.info().unwrap_or_else(|e| panic!("{name}: {e}"));
        if !matches!(
            info.map_type(),
            Ok(MapType::Hash | MapType::LruHash | MapType::LpmTrie | MapType::PerCpuHash)
        ) {
            continue;
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let size = info.key_size() as usize;
        let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
        let mut first = true;
        let mut count = 0u64;
        loop {
            // BPF_MAP_GET_NEXT_KEY: a null key asks for the first one.
            let mut attr = [0u64; 4];
            attr[0] = fd as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            // SAFETY: `attr` is a bpf_attr prefix for BPF_MAP_GET_NEXT_KEY (map_fd, key,
            // next_key) whose buffers live through the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    4, // BPF_MAP_GET_NEXT_KEY
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            if rc != 0 {
                break;
            }
            count += 1;
            first = false;
            std::mem::swap(&mut key, &mut next);
        }
        out.insert(name, count);
    }
    out
}

#[test]
fn a_thousand_cgroups_coming_and_going_leave_the_maps_at_baseline_and_memory_flat() {
    use egret_tests::probe::Outcome;

    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("ext", &[DENIED.parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, format!("{DENIED}:80").parse().expect("addr"))
        .expect("listen");
    let churn = sandbox.add_unmanaged_cgroup("churn").expect("churn parent");
    let dir = std::env::temp_dir().join(format!("{}-faults-churn", sandbox.id()));
    write_config(
        &dir,
        &format!(
            "{{name: job, namespace: batch, labels: {{app: job}}, cgroup: \"{}/job-*\"}}",
            churn.display()
        ),
        &deny_ten(),
    );
    let agent = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    let wait_for = |what: &str, want: &dyn Fn(u64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = map_entries(&agent, "EGRET_ENDPOINTS");
            if want(n) {
                return n;
            }
            assert!(Instant::now() < deadline, "{what}: {n} endpoint entries");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let baseline = wait_for("baseline", &|_| true);
    let mut policy_after_round = Vec::new();
    let mut rss_after_round = Vec::new();
    for round in 0..3 {
        let paths: Vec<std::path::PathBuf> =
            (0..1000).map(|i| churn.join(format!("job-{i}"))).collect();
        for path in &paths {
            std::fs::create_dir(path).expect("create cgroup");
        }
        wait_for("all 1,000 enforced", &|n| n >= baseline + 1000);
        // A process of one of them, on a cgroup path used in the round before too: it gets the
        // workload's verdict, never a stale one of the cgroup that had the path.
        let outcome = sandbox
            .probe(
                &pod,
                Some(&paths[round * 7]),
                &["connect", &format!("{DENIED}:80"), "--timeout-ms", "500"],
            )
            .expect("probe")[0]
            .outcome;
        assert_eq!(outcome, Outcome::Denied, "round {round}");
        for path in &paths {
            std::fs::remove_dir(path).expect("remove cgroup");
        }
        wait_for("back to baseline", &|n| n == baseline);
        policy_after_round.push(every_map(sandbox.pin_dir()));
        rss_after_round.push(rss_kib(agent.pid()));
    }
    // Every map holds after each round what it held after the first (the first round's probe
    // adds its one counter and decision): cgroups of one workload share its policy, and
    // nothing is left of a removed cgroup.
    assert!(
        policy_after_round
            .iter()
            .all(|n| *n == policy_after_round[0]),
        "map entries after each round: {policy_after_round:#?}"
    );
    assert_eq!(
        policy_after_round[0].get("EGRET_ENDPOINTS"),
        Some(&baseline),
        "{policy_after_round:#?}"
    );
    eprintln!("map entries after each round: {:?}", policy_after_round[2]);
    // Memory flat: the third round costs what the first did (allocator noise aside).
    let growth = rss_after_round[2].saturating_sub(rss_after_round[0]);
    assert!(
        growth < 8 * 1024,
        "RSS after each round (KiB): {rss_after_round:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gone_workloads_counters_leave_the_kernel_after_the_idle_time_and_live_ones_stay() {
    use egret_tests::probe::Outcome::Denied;

    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let db = sandbox.add_pod("db").expect("pod");
    let _host = sandbox
        .add_host("ext", &[DENIED.parse().expect("ip")])
        .expect("host");
    let dir = std::env::temp_dir().join(format!("{}-faults-gone", sandbox.id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("dir");
    let config = |workloads: &[(&str, &std::path::Path)]| {
        let listed: Vec<String> = workloads
            .iter()
            .map(|(name, cgroup)| {
                format!(
                    "- {{name: {name}, namespace: shop, labels: {{app: {name}}}, cgroup: {}}}\n",
                    cgroup.display()
                )
            })
            .collect();
        std::fs::write(
            dir.join("egret.yaml"),
            format!(
                "policies: [policies]\nmetrics: {{address: 127.0.0.1:0, seriesIdle: 2s}}\nworkloads:\n{}",
                listed.concat()
            ),
        )
        .expect("config");
    };
    config(&[("web", &web.cgroup), ("db", &db.cgroup)]);
    for app in ["web", "db"] {
        std::fs::write(
            policies.join(format!("{app}.yaml")),
            network_policy(app, app, &["192.0.2.11".to_owned()], &[]),
        )
        .expect("policy");
    }
    let egret = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));
    for pod in [&web, &db] {
        let attempts = sandbox
            .probe(pod, None, &["udp", &format!("{DENIED}:53")])
            .expect("probe");
        assert_eq!(attempts[0].outcome, Denied);
    }
    let counters = || every_map(sandbox.pin_dir())["EGRET_COUNTERS"];
    assert_eq!(counters(), 2, "one destination counter per workload");

    // `db` leaves the config: once gone for the idle time (2 s) and drained, its counter goes;
    // `web`'s, as idle but live, stays. The per-workload totals keep both.
    config(&[("web", &web.cgroup)]);
    egret.wait_log("reloaded config and policies", 1, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while counters() != 1 {
        assert!(
            Instant::now() < deadline,
            "{} counters left:\n{}",
            counters(),
            egret.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counters(), 1, "a live workload's counter was deleted");
    let address = egret.metrics_address().expect("metrics address");
    let metrics = http_get(&address, "/metrics").expect("scrape");
    for workload in ["web", "db"] {
        assert_eq!(
            sum(
                &metrics,
                "egret_egress_connections_workload_total",
                &[
                    "verdict=\"blocked\"",
                    &format!("source_workload=\"{workload}\"")
                ]
            ),
            1,
            "{workload}:\n{metrics}"
        );
    }
    drop(egret);
    let _ = std::fs::remove_dir_all(&dir);
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

#[test]
fn a_thirty_second_deny_log_flood_keeps_the_agent_bounded_and_every_event_accounted() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let _host = sandbox
        .add_host("ext", &[DENIED.parse().expect("ip")])
        .expect("host");
    let dir = std::env::temp_dir().join(format!("{}-faults-flood", sandbox.id()));
    write_config(
        &dir,
        &format!(
            "{{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}",
            pod.cgroup.display()
        ),
        &deny_ten(),
    );
    // Limits of its own, to show they are the operator's.
    let agent = EgretRun::start_with(
        &dir,
        sandbox.pin_dir(),
        sandbox.cgroup(),
        "0",
        &[
            "--deny-log-per-destination",
            "2/1",
            "--deny-log-per-source",
            "20/2",
        ],
        "",
    )
    .expect("egret run");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = agent.metrics_address().expect("metrics address");
    let stop = dir.join("stop");
    let cpu_before = cpu_seconds(agent.pid());
    let started = Instant::now();
    let prober = sandbox
        .spawn_probe(
            &pod,
            &[
                "udp-loop",
                &format!("{DENIED}:53"),
                "--until-file",
                stop.to_str().expect("utf-8"),
            ],
        )
        .expect("prober");
    // /metrics keeps answering, promptly, all through the flood.
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(30) {
        let asked = Instant::now();
        let metrics = http_get(&address, "/metrics").expect("metrics during the flood");
        assert!(metrics.contains("egret_deny_log_suppressed_total"));
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    std::fs::write(&stop, "").expect("stop");
    let output = sandbox.wait_probe_output(prober).expect("prober output");
    let flood = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(agent.pid()) - cpu_before;
    let summary: serde_json::Value = serde_json::from_str(output.trim()).expect("summary");
    let attempts = summary["count"].as_u64().expect("count");
    assert_eq!(summary["outcomes"]["denied"].as_u64(), Some(attempts));
    assert!(attempts > 100_000, "a flood: {summary}");
    assert!(
        slowest < Duration::from_secs(1),
        "/metrics took {slowest:?} during the flood"
    );
    // Bounded CPU: the agent spends well under a core on a workload's flood.
    assert!(
        cpu < 0.5 * flood,
        "{cpu:.1} s of CPU in {flood:.1} s for {attempts} denied attempts"
    );
    // The limits held: 2 at once then 1 a second for the one destination.
    std::thread::sleep(Duration::from_millis(1500));
    let lines = std::fs::read_to_string(&agent.stdout)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count() as u64;
    assert!(
        (2..=2 + flood.ceil() as u64 + 2).contains(&lines),
        "{lines} deny-log lines in {flood:.1} s"
    );
    // Every event logged, held back (counted) or dropped by the kernel (counted).
    let metrics = http_get(&address, "/metrics").expect("metrics");
    let gauge = |name: &str| -> u64 { samples(&metrics, name).map(|(_, v)| v as u64).sum() };
    let held_back = gauge("egret_deny_log_suppressed_total");
    let dropped = gauge("egret_deny_log_kernel_dropped");
    assert_eq!(
        lines + held_back + dropped,
        attempts,
        "lines {lines}, held back {held_back}, dropped by the kernel {dropped}"
    );
    eprintln!(
        "flood: {attempts} attempts in {flood:.1} s; agent CPU {cpu:.2} s; {lines} lines, {held_back} held back, {dropped} dropped by the kernel; slowest scrape {slowest:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A NetworkPolicy in `shop` for pods labelled `app: <app>`: egress to each of `blocks` (/32s),
/// on UDP port ranges `ranges` (first, last); no ranges: every port.
fn network_policy(name: &str, app: &str, blocks: &[String], ranges: &[(u16, u16)]) -> String {
    let to: Vec<String> = blocks
        .iter()
        .map(|b| format!("{{ipBlock: {{cidr: {b}/32}}}}"))
        .collect();
    let ports: Vec<String> = ranges
        .iter()
        .map(|(first, last)| format!("{{protocol: UDP, port: {first}, endPort: {last}}}"))
        .collect();
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!(", ports: [{}]", ports.join(", "))
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{podSelector: {{matchLabels: {{app: {app}}}}}, policyTypes: [Egress], egress: [{{to: [{}]{ports}}}]}}\n",
        to.join(", ")
    )
}

/// `n` UDP port ranges that each lower to several prefixes (1000-1077, 1100-1177, ...).
fn ranges(n: u16) -> Vec<(u16, u16)> {
    (0..n)
        .map(|i| (1000 + i * 100, 1000 + i * 100 + 77))
        .collect()
}

#[test]
fn an_oversized_policy_is_rejected_alone_and_a_set_over_the_map_is_never_half_written() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let db = sandbox.add_pod("db").expect("pod");
    let addrs: Vec<std::net::IpAddr> = ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let _host = sandbox.add_host("ext", &addrs).expect("host");
    let dir = std::env::temp_dir().join(format!("{}-budget", sandbox.id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("dir");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0}}\nlimits: {{maxPolicyEntries: 1000}}\n\
             workloads:\n- {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n\
             - {{name: db, namespace: shop, labels: {{app: db}}, cgroup: {}}}\n",
            web.cgroup.display(),
            db.cgroup.display()
        ),
    )
    .expect("config");
    let eleven = ["192.0.2.11".to_owned()];
    let write = |name: &str, yaml: &str| {
        std::fs::write(policies.join(format!("{name}.yaml")), yaml).expect("policy")
    };
    write("web-out", &network_policy("web-out", "web", &eleven, &[]));
    write("db-out", &network_policy("db-out", "db", &eleven, &[]));
    // A policy map of 2,048 entries (both generations), so that a set over it is cheap to make.
    let start = |suffix: &str| {
        EgretRun::start_with(
            &dir,
            sandbox.pin_dir(),
            sandbox.cgroup(),
            "0",
            &["--map-entries", "policy=2048"],
            suffix,
        )
        .expect("egret run")
    };
    let egret = start("");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = egret.metrics_address().expect("metrics address");
    let udp = |pod: &egret_tests::sandbox::Pod, to: &str| {
        let attempts = sandbox.probe(pod, None, &["udp", to]).expect("probe");
        attempts[0].outcome
    };
    use egret_tests::probe::Outcome::{Denied, Sent};
    assert_eq!(udp(&db, "192.0.2.11:1005"), Sent);
    assert_eq!(udp(&db, "192.0.2.10:1005"), Denied);

    // One policy over the per-policy budget (21 blocks x 20 ranges of several prefixes), in the
    // same reload as a revocation for another workload: the revocation is written, the
    // oversized policy is left out and named with its numbers, its pods stay isolated.
    let mut blocks: Vec<String> = (1..=20).map(|i| format!("203.0.113.{i}")).collect();
    blocks.push("192.0.2.10".into());
    write("huge", &network_policy("huge", "db", &blocks, &ranges(20)));
    write(
        "web-out",
        &network_policy("web-out", "web", &["192.0.2.12".to_owned()], &[]),
    );
    let log = egret.wait_log("policy enforced", 2, Duration::from_secs(20));
    assert!(
        log.contains(
            "NetworkPolicy shop/huge: rejected, over the per-policy entry budget: it needs up to"
        ) && log.contains("the budget is 1000"),
        "{log}"
    );
    assert_eq!(
        udp(&web, "192.0.2.11:53"),
        Denied,
        "the revocation was not written"
    );
    assert_eq!(udp(&web, "192.0.2.12:53"), Sent);
    assert_eq!(
        udp(&db, "192.0.2.10:1005"),
        Denied,
        "the rejected policy's allow was enforced"
    );
    assert_eq!(udp(&db, "192.0.2.11:1005"), Sent);
    let ready = http_get(&address, "/readyz").expect("readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("NetworkPolicy shop/huge: rejected"),
        "{ready}"
    );
    let metrics = http_get(&address, "/metrics").expect("scrape");
    assert!(
        metrics.contains("egret_policies_rejected{reason=\"entry-budget\"} 1"),
        "{metrics}"
    );

    // Policies each within the budget whose sum does not fit beside the enforced generation:
    // nothing is written (the map holds what it held), the enforced policy stays, readiness
    // and the metric say so.
    let entries = |metrics: &str| {
        samples(metrics, "egret_map_entries")
            .find(|(labels, _)| labels.contains("EGRET_POLICY"))
            .map(|(_, v)| v as u64)
            .expect("policy map entries")
    };
    let before = entries(&metrics);
    // Four policies of one block and 150 port ranges each: about 790 entries each, within the
    // budget, 3,150 together.
    for i in 0..4u16 {
        let name = format!("filler-{i}");
        let block = [format!("198.51.100.{}", i + 1)];
        write(&name, &network_policy(&name, "web", &block, &ranges(150)));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let ready = http_get(&address, "/readyz").expect("readyz");
        if ready.starts_with("HTTP/1.1 503") {
            break ready;
        }
        assert!(
            Instant::now() < deadline,
            "still ready:\n{ready}\n{}",
            egret.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.contains("the last policy write failed")
            && refused.contains("entries in EGRET_POLICY, which holds 2048")
            && refused.contains("nothing was written"),
        "{refused}"
    );
    let metrics = http_get(&address, "/metrics").expect("scrape");
    assert!(
        metrics.contains("egret_policy_write_failing 1"),
        "{metrics}"
    );
    assert_eq!(
        entries(&metrics),
        before,
        "a refused set was partly written"
    );
    // What was enforced before the refused set (192.0.2.12 allowed, .11 revoked) stays.
    let still_enforced = || {
        assert_eq!(
            udp(&web, "192.0.2.12:53"),
            Sent,
            "the enforced policy changed"
        );
        assert_eq!(
            udp(&web, "192.0.2.11:53"),
            Denied,
            "the enforced policy changed"
        );
    };
    still_enforced();

    // An agent restarted while the set does not fit stays up and not ready, saying why, and
    // the policy the previous one wrote stays enforced (a restart loop would say nothing).
    drop(egret);
    let egret = start("-restarted");
    egret.wait_log(
        "not ready until a change makes room",
        1,
        Duration::from_secs(20),
    );
    let address = egret.metrics_address().expect("metrics address");
    for _ in 0..2 {
        let ready = http_get(&address, "/readyz").expect("the restarted agent stopped serving");
        assert!(
            ready.starts_with("HTTP/1.1 503")
                && ready.contains("entries in EGRET_POLICY, which holds 2048"),
            "{ready}\n{}",
            egret.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = http_get(&address, "/metrics").expect("scrape");
    assert!(
        metrics.contains("egret_policy_write_failing 1"),
        "{metrics}"
    );
    still_enforced();

    // Room again: written, ready.
    for i in 0..4 {
        std::fs::remove_file(policies.join(format!("filler-{i}.yaml"))).expect("remove");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(&address, "/readyz")
        .expect("readyz")
        .starts_with("HTTP/1.1 200")
    {
        assert!(Instant::now() < deadline, "{}", egret.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = http_get(&address, "/metrics").expect("scrape");
    assert!(
        metrics.contains("egret_policy_write_failing 0"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `/metrics` counts `total` blocked attempts for `web`; returns the exposition.
fn wait_blocked(agent: &EgretRun, total: u64) -> String {
    let address = agent.metrics_address().expect("metrics address");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        let counted: u64 = samples(&metrics, "egret_egress_connections_workload_total")
            .filter(|(l, _)| {
                l.contains("verdict=\"blocked\"") && l.contains("source_workload=\"web\"")
            })
            .map(|(_, v)| v as u64)
            .sum();
        if counted == total {
            return metrics;
        }
        assert!(
            counted < total,
            "counted {counted} of {total}: more than were made"
        );
        assert!(Instant::now() < deadline, "counted {counted} of {total}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_scan_of_five_million_addresses_keeps_the_agent_flat_and_other_workloads_their_series() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let db = sandbox.add_pod("db").expect("pod");
    let mut addrs: Vec<std::net::IpAddr> = vec!["2001:db8:2::10".parse().expect("ip")];
    addrs.extend((20..25).map(|i| std::net::IpAddr::from([192, 0, 2, i])));
    let _host = sandbox.add_host("ext", &addrs).expect("host");
    let dir = std::env::temp_dir().join(format!("{}-scan5m", sandbox.id()));
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    // `web` may reach 192.0.2.11 only: its scan of 2001:db8:2::/64 is denied at the syscall.
    std::fs::write(
        dir.join("policies/web.yaml"),
        network_policy("web-out", "web", &["192.0.2.11".to_owned()], &[]),
    )
    .expect("policy");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0, maxDestinationSeries: 100, seriesIdle: 2s}}\n\
             maps: {{counters: 32768}}\n\
             workloads:\n- {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n\
             - {{name: db, namespace: shop, labels: {{app: db}}, cgroup: {}}}\n",
            web.cgroup.display(),
            db.cgroup.display()
        ),
    )
    .expect("config");
    let egret = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));

    // The config sized the destination counter map.
    let capacity = samples(
        &http_get(
            &egret.metrics_address().expect("metrics address"),
            "/metrics",
        )
        .expect("scrape"),
        "egret_map_capacity",
    )
    .find(|(labels, _)| labels.contains("map=\"EGRET_COUNTERS\""))
    .map(|(_, v)| v as u64);
    assert_eq!(capacity, Some(32_768));

    // A million addresses, then four million more: the agent's memory after the second part
    // is what it was after the first (nothing is kept per address).
    sandbox.scan_denied(&web, "[2001:db8:2::1:0]:9", 1_000_000);
    wait_blocked(&egret, 1_000_000);
    std::thread::sleep(Duration::from_secs(1));
    let rss_first = rss_kib(egret.pid());
    sandbox.scan_denied(&web, "[2001:db8:2::1:0:0]:9", 4_000_000);
    let metrics = wait_blocked(&egret, 5_000_000);
    std::thread::sleep(Duration::from_secs(1));
    let rss_last = rss_kib(egret.pid());
    assert!(
        rss_last <= rss_first + 16 * 1024,
        "agent memory grew from {rss_first} KiB to {rss_last} KiB over four million more addresses"
    );
    assert_eq!(
        sum_metric(&metrics, "egret_kernel_counter_lost_total"),
        0,
        "nothing lost in the kernel"
    );
    // Every attempt is in the kernel's counters too, with or without its destination.
    assert_eq!(
        kernel_counted(sandbox.pin_dir(), None, "blocked"),
        5_000_000
    );

    // The scan's destinations leave the kernel's destination map once counted and idle...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = map_entries(&egret, "EGRET_COUNTERS");
        if entries < 1000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{entries} entries stay in EGRET_COUNTERS"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // ... and their series once idle for `seriesIdle`: another workload's new destinations
    // get series of their own, each counted exactly.
    std::thread::sleep(Duration::from_secs(3));
    for i in 20..25 {
        let to = format!("192.0.2.{i}:53");
        for _ in 0..3 {
            let attempts = sandbox.probe(&db, None, &["udp", &to]).expect("probe");
            assert_eq!(
                attempts[0].outcome,
                egret_tests::probe::Outcome::Sent,
                "{attempts:?}"
            );
        }
    }
    let address = egret.metrics_address().expect("metrics address");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        let own: Vec<u64> = (20..25)
            .map(|i| {
                metric(
                    &metrics,
                    &[
                        &format!("destination_ip=\"192.0.2.{i}\""),
                        "source_workload=\"db\"",
                        "verdict=\"passthrough\"",
                    ],
                )
            })
            .collect();
        if own == [3; 5] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "db's new destinations: {own:?}\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let metrics = wait_blocked(&egret, 5_000_000);
    assert_eq!(
        kernel_counted(sandbox.pin_dir(), None, "blocked"),
        5_000_000
    );
    drop(metrics);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A metric without labels, or the sum of its series.
fn sum_metric(exposition: &str, name: &str) -> u64 {
    samples(exposition, name).map(|(_, v)| v as u64).sum()
}
