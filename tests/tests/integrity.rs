//! Datapath integrity while policy and workloads change: no connection ever gets a verdict
//! that no policy gives, counts keep the labels of who made them, and a workload's new cgroup
//! is enforced from its first connect. Needs root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egret::{
    datapath::{Datapath, DatapathConfig},
    local::{LocalSource, resolve_cgroups},
    pipeline::{Pipeline, StateChange},
    policy::compile::CompileOptions,
};
use egret_tests::{
    agent::{EgretRun, http_get, samples},
    probe::Outcome,
    sandbox::{Host, Pod, Sandbox},
};

fn connect(sandbox: &Sandbox, pod: &Pod, cgroup: Option<&Path>, target: &str) -> Outcome {
    sandbox
        .probe(pod, cgroup, &["connect", target, "--timeout-ms", "500"])
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

fn temp_dir(sandbox: &Sandbox, what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{what}", sandbox.id()));
    std::fs::create_dir_all(dir.join("policies")).expect("temp dir");
    dir
}

/// A NetworkPolicy in namespace `bars` selecting `app in (apps)` that allows egress to
/// 203.0.113.20 only.
fn only_twenty(name: &str, apps: &[&str]) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: bars}}\n\
         spec:\n  podSelector: {{matchExpressions: [{{key: app, operator: In, values: [{}]}}]}}\n  \
         policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 203.0.113.20/32}}}}]\n",
        apps.join(", ")
    )
}

fn workload(name: &str, cgroup: &Path) -> String {
    format!(
        "- {{name: {name}, namespace: bars, labels: {{app: {name}}}, cgroup: {}}}\n",
        cgroup.display()
    )
}

#[test]
fn a_workload_that_sorts_first_coming_and_going_never_opens_another_workloads_denied_host() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("pod").expect("pod");
    let first = sandbox.add_pod("aaa").expect("pod");
    let host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, "192.0.2.10:80".parse().expect("addr"))
        .expect("listen");

    // `bars/pod` may reach only 203.0.113.20; `bars/aaa` (which sorts first) is not isolated,
    // so 192.0.2.10 is allowed to it. Were endpoint ids positions, adding `aaa` would give
    // `pod`'s id to `aaa`, and `pod` would for a moment be decided by `aaa`'s policy.
    let dir = temp_dir(&sandbox, "churn");
    std::fs::write(
        dir.join("policies/only-twenty.yaml"),
        only_twenty("only-twenty", &["pod"]),
    )
    .expect("policy");
    let load = |name: &str, workloads: &[(&str, &Path)]| {
        let mut config = String::from("baseline: allow\npolicies: [policies]\nworkloads:\n");
        for (w, cgroup) in workloads {
            config.push_str(&workload(w, cgroup));
        }
        let path = dir.join(name);
        std::fs::write(&path, config).expect("config");
        LocalSource::new(path)
            .load()
            .unwrap_or_else(|problems| panic!("{}", problems[0]))
    };
    let without = load("without.yaml", &[("pod", &pod.cgroup)]);
    let with = load("with.yaml", &[("aaa", &first.cgroup), ("pod", &pod.cgroup)]);

    let datapath = Datapath::open(&DatapathConfig {
        pin_dir: sandbox.pin_dir().into(),
        cgroup: Some(sandbox.cgroup().into()),
    })
    .expect("datapath");
    let options = CompileOptions::default();
    let mut pipeline =
        Pipeline::new(datapath, without.world.clone(), options.clone()).expect("pipeline");
    let root = sandbox.cgroup().to_path_buf();
    let cgroups = |loaded: &egret::local::Loaded, pipeline: &Pipeline| {
        resolve_cgroups(&loaded.config, &pipeline.compiled().endpoints, &root)
    };
    let initial = cgroups(&without, &pipeline);
    pipeline.enforce(initial).expect("enforce");
    assert_eq!(
        connect(&sandbox, &pod, None, "192.0.2.10:80"),
        Outcome::Denied
    );
    assert_eq!(
        connect(&sandbox, &first, None, "192.0.2.10:80"),
        Outcome::Connected,
        "aaa is not isolated"
    );

    let stop = dir.join("stop");
    // Datagrams, tens of thousands a second: a window of a few microseconds per change shows.
    let prober = sandbox
        .spawn_probe(
            &pod,
            &[
                "udp-loop",
                "192.0.2.10:80",
                "--until-file",
                stop.to_str().expect("utf-8"),
            ],
        )
        .expect("prober");
    let rounds = 500;
    for _ in 0..rounds {
        for loaded in [&with, &without] {
            pipeline.apply(StateChange::World(loaded.world.clone()), options.clone());
            let next = cgroups(loaded, &pipeline);
            pipeline.enforce(next).expect("enforce");
        }
    }
    std::fs::write(&stop, "").expect("stop");
    let output = sandbox.wait_probe_output(prober).expect("prober output");
    let _ = std::fs::remove_dir_all(&dir);
    let summary: serde_json::Value = serde_json::from_str(output.trim()).expect("summary line");
    let sent = summary["count"].as_u64().expect("count");
    assert!(sent > 10_000, "prober sent too few datagrams: {summary}");
    assert_eq!(
        summary["outcomes"]["denied"].as_u64(),
        Some(sent),
        "datagrams from bars/pod to its denied host got through while bars/aaa came and went {rounds} times: {summary}"
    );
}

/// Sum of `egret_egress_connections_total` samples whose labels contain every needle.
fn count(exposition: &str, needles: &[&str]) -> f64 {
    samples(exposition, "egret_egress_connections_total")
        .filter(|(labels, _)| needles.iter().all(|n| labels.contains(n)))
        .map(|(_, v)| v)
        .sum()
}

fn scrape(agent: &EgretRun) -> String {
    let address = agent.metrics_address().expect("metrics address");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        if metrics.contains("egret_egress_connections_total{") || Instant::now() > deadline {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scrape_until(agent: &EgretRun, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = scrape(agent);
        if metrics.contains(needle) || Instant::now() > deadline {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restart_with_workloads_and_policies_changed_keeps_every_counts_labels() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("pod").expect("pod");
    let zed = sandbox.add_pod("zed").expect("pod");
    let aaa = sandbox.add_pod("aaa").expect("pod");
    let host = sandbox
        .add_host("ext", &["192.0.2.10".parse::<IpAddr>().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, "192.0.2.10:80".parse().expect("addr"))
        .expect("listen");
    let dir = temp_dir(&sandbox, "labels");
    let write_config = |workloads: &[(&str, &Path)]| {
        let mut config = String::from(
            "baseline: allow\npolicies: [policies]\nmetrics: {address: 127.0.0.1:0}\nworkloads:\n",
        );
        for (w, cgroup) in workloads {
            config.push_str(&workload(w, cgroup));
        }
        std::fs::write(dir.join("egret.yaml"), config).expect("config");
    };

    // Before: bars/pod and bars/zed, both isolated by bars/only-twenty.
    std::fs::write(
        dir.join("policies/only-twenty.yaml"),
        only_twenty("only-twenty", &["pod", "zed"]),
    )
    .expect("policy");
    write_config(&[("pod", &pod.cgroup), ("zed", &zed.cgroup)]);
    let agent = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    for _ in 0..4 {
        assert_eq!(
            connect(&sandbox, &pod, None, "192.0.2.10:80"),
            Outcome::Denied
        );
    }
    for _ in 0..3 {
        assert_eq!(
            connect(&sandbox, &zed, None, "192.0.2.10:80"),
            Outcome::Denied
        );
    }
    drop(agent);

    // While it is down: a workload and a policy that sort first are added, zed is removed,
    // and the rest is reordered.
    std::fs::write(
        dir.join("policies/aaa-first.yaml"),
        only_twenty("aaa-first", &["aaa"]),
    )
    .expect("policy");
    write_config(&[("aaa", &aaa.cgroup), ("pod", &pod.cgroup)]);
    for _ in 0..2 {
        assert_eq!(
            connect(&sandbox, &aaa, None, "192.0.2.10:80"),
            Outcome::Connected
        );
    }
    let agent = EgretRun::start_with(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0", &[], "-2")
        .expect("egret");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert_eq!(
        connect(&sandbox, &aaa, None, "192.0.2.10:80"),
        Outcome::Denied
    );
    // Counters are drained into the metrics a few times a second: wait for the new block.
    let metrics = scrape_until(&agent, "policy=\"NetworkPolicy bars/aaa-first\"");
    let _ = std::fs::remove_dir_all(&dir);

    let blocked = |workload: &str, policy: &str| {
        count(
            &metrics,
            &[
                "verdict=\"blocked\"",
                "destination_ip=\"192.0.2.10\"",
                &format!("source_workload=\"{workload}\""),
                &format!("policy=\"{policy}\""),
            ],
        )
    };
    assert_eq!(
        blocked("pod", "NetworkPolicy bars/only-twenty"),
        4.0,
        "bars/pod's blocks keep their labels:\n{metrics}"
    );
    assert_eq!(
        blocked("zed", "NetworkPolicy bars/only-twenty"),
        3.0,
        "the removed workload's blocks keep its labels:\n{metrics}"
    );
    assert_eq!(
        blocked("aaa", "NetworkPolicy bars/aaa-first"),
        1.0,
        "the new workload's block is its own:\n{metrics}"
    );
    assert_eq!(
        count(
            &metrics,
            &[
                "verdict=\"blocked\"",
                "policy=\"NetworkPolicy bars/aaa-first\""
            ]
        ),
        1.0,
        "no old count moved to the policy that sorts first:\n{metrics}"
    );
    assert_eq!(
        count(
            &metrics,
            &["verdict=\"blocked\"", "source_workload=\"aaa\""]
        ),
        1.0,
        "no old count moved to the workload that sorts first:\n{metrics}"
    );
}

/// A listener on `addr` inside the pod's own network namespace.
fn listen_in_pod(sandbox: &Sandbox, pod: &Pod, addr: &str) -> std::net::TcpListener {
    let pod_host = Host {
        name: pod.name.clone(),
        netns: pod.netns.clone(),
        addrs: Vec::new(),
    };
    sandbox
        .listen_tcp(&pod_host, addr.parse().expect("addr"))
        .expect("listen in pod")
}

#[test]
fn unspecified_destinations_are_decided_as_the_loopback_they_reach() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("pod").expect("pod");
    let _v4 = listen_in_pod(&sandbox, &pod, "127.0.0.1:8080");
    let _v6 = listen_in_pod(&sandbox, &pod, "[::1]:8080");
    let dir = temp_dir(&sandbox, "unspecified");
    // Local mode's admin ports live on loopback: this workload may not reach them.
    std::fs::write(
        dir.join("policies/no-loopback.yaml"),
        "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: no-loopback}\n\
         spec:\n  priority: 10\n  subject: {podSelector: {}}\n  rules:\n  \
         - {name: loopback, action: Deny, to: [{networks: [127.0.0.0/8, \"::1/128\"]}]}\n",
    )
    .expect("policy");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "baseline: allow\npolicies: [policies]\nworkloads:\n{}",
            workload("pod", &pod.cgroup)
        ),
    )
    .expect("config");
    let agent = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));

    for target in [
        "127.0.0.1:8080",
        "0.0.0.0:8080",
        "[::1]:8080",
        "[::]:8080",
        "[::ffff:0.0.0.0]:8080",
        "[::ffff:127.0.0.1]:8080",
    ] {
        assert_eq!(
            connect(&sandbox, &pod, None, target),
            Outcome::Denied,
            "{target} reaches loopback and must be decided as loopback"
        );
    }
    for target in ["0.0.0.0:8080", "[::]:8080"] {
        let sent = sandbox
            .probe(&pod, None, &["udp", target])
            .expect("probe")
            .first()
            .map(|a| a.outcome);
        assert_eq!(sent, Some(Outcome::Denied), "UDP to {target}");
    }
    // The deny log names the address the kernel would have reached.
    let stdout = std::fs::read_to_string(&agent.stdout).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stdout.contains("127.0.0.1"), "deny log:\n{stdout}");
    assert!(!stdout.contains("0.0.0.0"), "deny log:\n{stdout}");
}

#[test]
fn a_new_cgroup_of_a_fail_closed_glob_workload_is_denied_from_its_first_connect() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let svc = sandbox.add_pod("svc-1").expect("pod");
    let other = sandbox.add_pod("other").expect("pod");
    let addrs: Vec<IpAddr> = ["192.0.2.10", "192.0.2.11"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let host = sandbox.add_host("ext", &addrs).expect("host");
    let _listeners: Vec<_> = ["192.0.2.10:80", "192.0.2.11:80"]
        .iter()
        .map(|a| {
            sandbox
                .listen_tcp(&host, a.parse().expect("addr"))
                .expect("listen")
        })
        .collect();
    let dir = temp_dir(&sandbox, "pending");
    std::fs::write(
        dir.join("policies/svc.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: svc, namespace: bars}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 192.0.2.11/32}}]\n",
    )
    .expect("policy");
    // Every `svc-*` cgroup is the workload, as systemd names a templated service's instances;
    // `pending: deny` makes the directory they appear in a guard.
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "baseline: allow\npolicies: [policies]\nmetrics: {{address: 127.0.0.1:0}}\nworkloads:\n\
             - {{name: svc, namespace: bars, labels: {{app: svc}}, cgroup: '{}/svc-*', pending: deny}}\n",
            sandbox.cgroup().display()
        ),
    )
    .expect("config");
    let agent = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert_eq!(
        connect(&sandbox, &svc, None, "192.0.2.11:80"),
        Outcome::Connected
    );
    assert_eq!(
        connect(&sandbox, &svc, None, "192.0.2.10:80"),
        Outcome::Denied
    );
    assert_eq!(
        connect(&sandbox, &other, None, "192.0.2.10:80"),
        Outcome::Connected,
        "a cgroup beside the workload's, known when egret started, is not egret's"
    );

    // A new instance: its very first connect, made right after its cgroup appears, is
    // denied (by the guard, or by its policy once egret has seen it).
    let second = sandbox.add_unmanaged_cgroup("svc-2").expect("cgroup");
    assert_eq!(
        connect(&sandbox, &svc, Some(&second), "192.0.2.10:80"),
        Outcome::Denied
    );
    // egret sees it within moments (inotify) and writes its own policy.
    let deadline = Instant::now() + Duration::from_secs(2);
    while connect(&sandbox, &svc, Some(&second), "192.0.2.11:80") != Outcome::Connected {
        assert!(Instant::now() < deadline, "svc-2 never got its policy");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Fail closed also while egret is down: a new instance, and anything else new in the
    // guarded directory, is denied everything until egret has written it.
    drop(agent);
    let third = sandbox.add_unmanaged_cgroup("svc-3").expect("cgroup");
    let misc = sandbox.add_unmanaged_cgroup("misc").expect("cgroup");
    assert_eq!(
        connect(&sandbox, &svc, Some(&third), "192.0.2.11:80"),
        Outcome::Denied,
        "pending: even what its policy will allow"
    );
    assert_eq!(
        connect(&sandbox, &other, Some(&misc), "192.0.2.10:80"),
        Outcome::Denied
    );
    assert_eq!(
        connect(&sandbox, &other, None, "192.0.2.10:80"),
        Outcome::Connected,
        "known cgroups beside it keep running"
    );

    let agent = EgretRun::start_with(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0", &[], "-2")
        .expect("egret");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert_eq!(
        connect(&sandbox, &svc, Some(&third), "192.0.2.11:80"),
        Outcome::Connected
    );
    assert_eq!(
        connect(&sandbox, &svc, Some(&third), "192.0.2.10:80"),
        Outcome::Denied
    );
    assert_eq!(
        connect(&sandbox, &other, Some(&misc), "192.0.2.10:80"),
        Outcome::Connected,
        "written as not egret's"
    );
    let metrics = scrape(&agent);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        count(&metrics, &["verdict=\"blocked\"", "policy=\"pending\""]) >= 2.0,
        "pending denials are counted:\n{metrics}"
    );
}
