//! Bad policy input against a running `egret run`: for each class of bad input (an invalid
//! update of an enforced policy, a duplicate, an alias bomb, non-UTF-8, a huge file, a FIFO, a
//! device, a symlink loop, an unreadable file, a directory cycle), the valid policy enforced
//! before stays enforced, a valid file added beside the bad one takes effect, the rejection is
//! in the log, `/readyz` and `egret_policies_rejected`, and removing the bad file is noticed.
//! Needs root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use egret_tests::{
    agent::{EgretRun, http_get, sum},
    probe::Outcome,
    sandbox::{Pod, Sandbox},
};

fn connect(sandbox: &Sandbox, pod: &Pod, target: &str) -> Outcome {
    sandbox
        .probe(pod, None, &["connect", target, "--timeout-ms", "500"])
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

/// Whether egret lets `target` through (nothing listens: an allowed attempt is refused by the
/// host, a blocked one is denied by egret).
fn allowed(sandbox: &Sandbox, pod: &Pod, target: &str) -> bool {
    connect(sandbox, pod, target) != Outcome::Denied
}

/// Probes until egret lets `target` through; fails after `within`.
fn until_allowed(sandbox: &Sandbox, pod: &Pod, target: &str, within: Duration) {
    let start = Instant::now();
    while !allowed(sandbox, pod, target) {
        assert!(
            start.elapsed() < within,
            "{target} still denied after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A NetworkPolicy of namespace `shop` allowing one destination and port (shop is then
/// default-deny for egress).
fn allow(name: &str, cidr: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {cidr}}}}}]\n    ports: [{{port: {port}}}]\n"
    )
}

/// How one class of bad input is put into the policy directory, and what the log must say.
struct Case {
    name: &'static str,
    setup: fn(&Path),
    /// Text the rejection message holds (after the policy directory's path).
    message: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "invalid update of the enforced policy",
            setup: |dir| {
                std::fs::write(
                    dir.join("base.yaml"),
                    allow("base", "192.0.2.10/32", 443).replace("port: 443", "port: 70000"),
                )
                .expect("write");
            },
            message: "/base.yaml document 0: NetworkPolicy shop/base: spec.egress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
        },
        Case {
            name: "duplicate of the enforced policy",
            setup: |dir| {
                std::fs::write(dir.join("bad.yaml"), allow("base", "192.0.2.0/24", 80))
                    .expect("write");
            },
            message: "/bad.yaml document 0: NetworkPolicy shop/base: metadata.name: Duplicate value: \"base\": also defined at ",
        },
        Case {
            name: "alias bomb",
            setup: |dir| {
                let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
                for i in 1..10 {
                    let p = i - 1;
                    text.push_str(&format!(
                        "a{i}: &a{i} [{}]\n",
                        vec![format!("*a{p}"); 10].join(", ")
                    ));
                }
                std::fs::write(dir.join("bad.yaml"), text).expect("write");
            },
            message: "/bad.yaml document 0: not valid YAML: ",
        },
        Case {
            name: "non-UTF-8",
            setup: |dir| std::fs::write(dir.join("bad.yaml"), b"kind: caf\xe9\n").expect("write"),
            message: "/bad.yaml: not UTF-8: invalid byte at offset 9",
        },
        Case {
            name: "huge file",
            setup: |dir| {
                std::fs::write(dir.join("bad.yaml"), vec![b'#'; 50 * 1024 * 1024]).expect("write");
            },
            message: "/bad.yaml: not read: 52428800 bytes is over the limit of 3145728 bytes per file",
        },
        Case {
            name: "FIFO",
            setup: |dir| {
                let status = std::process::Command::new("mkfifo")
                    .arg(dir.join("bad.yaml"))
                    .status()
                    .expect("mkfifo");
                assert!(status.success());
            },
            message: "/bad.yaml: not read: it is a FIFO; only regular files and directories are read",
        },
        Case {
            name: "symlink to /dev/zero",
            setup: |dir| {
                std::os::unix::fs::symlink("/dev/zero", dir.join("bad.yaml")).expect("symlink")
            },
            message: "/bad.yaml: not read: it is a character device",
        },
        Case {
            name: "symlink loop",
            setup: |dir| {
                std::os::unix::fs::symlink("bad.yaml", dir.join("bad.yaml")).expect("symlink")
            },
            message: "/bad.yaml: failed to read: Too many levels of symbolic links (os error 40)",
        },
        Case {
            name: "unreadable file (EIO)",
            setup: |dir| {
                std::os::unix::fs::symlink("/proc/self/mem", dir.join("bad.yaml")).expect("symlink")
            },
            message: "/bad.yaml: failed to read: Input/output error (os error 5)",
        },
        Case {
            name: "directory symlinked to its parent",
            setup: |dir| std::os::unix::fs::symlink(".", dir.join("bad")).expect("symlink"),
            message: "/bad: not read: directory cycle: it is ",
        },
    ]
}

#[test]
fn bad_input_never_stops_a_reload_and_the_enforced_policy_stays() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let addrs: Vec<IpAddr> = ["192.0.2.10", "203.0.113.10"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let _host = sandbox.add_host("ext", &addrs).expect("host");

    let dir = std::env::temp_dir().join(format!("{}-policy-input", sandbox.id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("base.yaml"),
        allow("base", "192.0.2.10/32", 443),
    )
    .expect("write");
    let config = format!(
        "baseline: allow\npolicies: [policies]\nworkloads:\n\
         - {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n\
         metrics: {{address: 127.0.0.1:0}}\n",
        web.cgroup.display()
    );
    std::fs::write(dir.join("egret.yaml"), config).expect("write config");

    let agent =
        EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("spawn egret run");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = agent
        .metrics_address()
        .unwrap_or_else(|| panic!("no metrics address:\n{}", agent.log()));
    assert!(allowed(&sandbox, &web, "192.0.2.10:443"), "base allows it");
    assert!(
        !allowed(&sandbox, &web, "203.0.113.10:443"),
        "shop is default-deny"
    );

    let prefix = policies.display().to_string();
    for (i, case) in cases().iter().enumerate() {
        (case.setup)(&policies);
        // A valid policy added beside the bad input takes effect...
        let port = 8000 + u16::try_from(i).expect("port");
        let target = format!("203.0.113.10:{port}");
        assert!(
            !allowed(&sandbox, &web, &target),
            "{}: not yet allowed",
            case.name
        );
        std::fs::write(
            policies.join(format!("new-{i}.yaml")),
            allow(&format!("new-{i}"), "203.0.113.10/32", port),
        )
        .expect("write");
        until_allowed(&sandbox, &web, &target, Duration::from_secs(3));
        // ...the policy enforced before stays enforced...
        assert!(
            allowed(&sandbox, &web, "192.0.2.10:443"),
            "{}: base must stay enforced",
            case.name
        );
        assert!(
            !allowed(&sandbox, &web, "192.0.2.10:80"),
            "{}: and nothing more than base",
            case.name
        );
        // ...and the rejection is in the log, `/readyz` and the metric.
        let needle = format!("{prefix}{}", case.message);
        let log = agent.wait_log(&needle, 1, Duration::from_secs(2));
        assert!(log.contains("reload rejected"), "{}: {log}", case.name);
        let ready = http_get(&address, "/readyz").expect("readyz");
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.contains(&needle),
            "{}: {ready}",
            case.name
        );
        let metrics = http_get(&address, "/metrics").expect("metrics");
        assert!(
            sum(&metrics, "egret_policies_rejected", &[]) >= 1,
            "{}: {metrics}",
            case.name
        );

        // Removing the bad input is noticed: nothing is rejected any more.
        let _ = std::fs::remove_file(policies.join("bad.yaml"));
        let _ = std::fs::remove_file(policies.join("bad"));
        if case.name.starts_with("invalid update") {
            std::fs::write(
                policies.join("base.yaml"),
                allow("base", "192.0.2.10/32", 443),
            )
            .expect("write");
        }
        let start = Instant::now();
        loop {
            let metrics = http_get(&address, "/metrics").expect("metrics");
            let ready = http_get(&address, "/readyz").expect("readyz");
            if sum(&metrics, "egret_policies_rejected", &[]) == 0 && ready.ends_with("ready\n") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "{}: the removal was not noticed:\n{ready}\n{}",
                case.name,
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Every valid file added on the way is enforced.
    for i in 0..cases().len() {
        let port = 8000 + u16::try_from(i).expect("port");
        assert!(allowed(&sandbox, &web, &format!("203.0.113.10:{port}")));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
