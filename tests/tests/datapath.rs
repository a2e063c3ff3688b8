//! End-to-end tests of the datapath against the real kernel: each test builds a sandbox, loads
//! and attaches egret's programs under the sandbox's cgroup, and makes real connection attempts
//! from inside test pods. They need root; without it they fail with a message saying so.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egret::{
    datapath::{
        Counters, Datapath, DatapathConfig, Decision, LoadMode, Verdict,
        lower::{L4, Rule},
    },
    rules_file::{EndpointSpec, RulesFile},
};
use egret_tests::{
    probe::{Outcome, egret_binary},
    sandbox::{Host, Pod, Sandbox},
};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn rule(to: &[&str], l4: L4, verdict: Verdict, id: u32) -> Rule<Decision> {
    Rule {
        to: to.iter().map(|n| n.parse().expect("test prefix")).collect(),
        except: Vec::new(),
        l4,
        action: Decision { verdict, rule: id },
    }
}

fn ports(protocol: u8, first: u16, last: u16) -> L4 {
    L4::Ports {
        protocol,
        first,
        last,
    }
}

/// A sandbox with one pod and one external host holding `host_addrs`.
struct World {
    sandbox: Sandbox,
    pod: Pod,
    host: Host,
}

impl World {
    fn new(host_addrs: &[&str]) -> Self {
        let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
        let pod = sandbox.add_pod("a").expect("pod");
        let addrs: Vec<IpAddr> = host_addrs.iter().map(|a| ip(a)).collect();
        let host = sandbox.add_host("ext", &addrs).expect("host");
        Self { sandbox, pod, host }
    }

    fn open(&self) -> Datapath {
        Datapath::open(&DatapathConfig {
            pin_dir: self.sandbox.pin_dir().into(),
            cgroup: Some(self.sandbox.cgroup().into()),
        })
        .unwrap_or_else(|e| panic!("open datapath: {e:?}"))
    }

    /// Enforces `rules` for the pod (endpoint 1, default allow).
    fn enforce(&self, rules: Vec<Rule<Decision>>) -> Datapath {
        let mut datapath = self.open();
        let file = self.rules_file(rules);
        datapath
            .sync(&file.desired(), &file.cgroup_ids().expect("cgroup ids"))
            .unwrap_or_else(|e| panic!("sync: {e:?}"));
        datapath
    }

    fn rules_file(&self, rules: Vec<Rule<Decision>>) -> RulesFile {
        RulesFile {
            endpoints: vec![EndpointSpec {
                cgroup: self.pod.cgroup.clone(),
                id: 1,
                default: Verdict::Allow,
                rules,
            }],
        }
    }

    fn listen(&self, at: &str) -> TcpListener {
        self.sandbox
            .listen_tcp(&self.host, addr(at))
            .expect("listen")
    }

    /// Outcomes of TCP connects from the pod (or from `cgroup` in the pod's namespace).
    fn connect(&self, cgroup: Option<&Path>, target: &str, count: u32) -> Vec<Outcome> {
        let count = count.to_string();
        self.sandbox
            .probe(&self.pod, cgroup, &["connect", target, "--count", &count])
            .expect("probe")
            .into_iter()
            .map(|a| a.outcome)
            .collect()
    }

    fn udp(&self, target: &str, count: u32) -> Vec<Outcome> {
        let count = count.to_string();
        self.sandbox
            .probe(&self.pod, None, &["udp", target, "--count", &count])
            .expect("probe")
            .into_iter()
            .map(|a| a.outcome)
            .collect()
    }
}

/// Counts of (destination, verdict, rule) for endpoint 1 over all protocols, as the kernel
/// counted them.
fn counts(counters: &Counters) -> BTreeMap<(Option<IpAddr>, Verdict, u32), u64> {
    let mut out = BTreeMap::new();
    for s in counters.samples.iter().filter(|s| s.endpoint == 1) {
        *out.entry((s.destination, s.verdict, s.rule)).or_default() += s.attempts;
    }
    out
}

/// Accepts every pending connection; returns how many there were.
fn drain(listener: &TcpListener) -> usize {
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        match listener.accept() {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    n
}

#[test]
fn tcp_denied_by_exact_address_fails_with_eperm_and_sends_nothing() {
    let w = World::new(&["192.0.2.10", "192.0.2.11"]);
    let denied = w.listen("192.0.2.10:80");
    let allowed = w.listen("192.0.2.11:80");
    let _dp = w.enforce(vec![rule(&["192.0.2.10/32"], L4::Any, Verdict::Deny, 1)]);

    assert_eq!(w.connect(None, "192.0.2.10:80", 1), [Outcome::Denied]);
    assert_eq!(w.connect(None, "192.0.2.11:80", 1), [Outcome::Connected]);
    assert_eq!(
        drain(&denied),
        0,
        "a denied connect must not reach the host"
    );
    assert_eq!(drain(&allowed), 1);
}

#[test]
fn tcp_denied_by_cidr_with_except() {
    let w = World::new(&["192.0.2.10", "192.0.2.20", "192.0.2.200"]);
    let _listeners: Vec<_> = ["192.0.2.10:443", "192.0.2.20:443", "192.0.2.200:443"]
        .iter()
        .map(|a| w.listen(a))
        .collect();
    let mut deny = rule(&["192.0.2.0/24"], L4::Any, Verdict::Deny, 3);
    deny.except = vec!["192.0.2.16/28".parse().expect("prefix")];
    let _dp = w.enforce(vec![deny]);

    assert_eq!(w.connect(None, "192.0.2.10:443", 1), [Outcome::Denied]);
    assert_eq!(w.connect(None, "192.0.2.200:443", 1), [Outcome::Denied]);
    assert_eq!(
        w.connect(None, "192.0.2.20:443", 1),
        [Outcome::Connected],
        "inside the except"
    );
}

#[test]
fn tcp_denied_by_port_and_port_range() {
    let w = World::new(&["192.0.2.10"]);
    let ports_open = [8080u16, 8081, 8999, 9000, 9005, 9010, 9011];
    let _listeners: Vec<_> = ports_open
        .iter()
        .map(|p| w.listen(&format!("192.0.2.10:{p}")))
        .collect();
    let _dp = w.enforce(vec![
        rule(&["0.0.0.0/0"], ports(TCP, 8080, 8080), Verdict::Deny, 1),
        rule(&["192.0.2.0/24"], ports(TCP, 9000, 9010), Verdict::Deny, 2),
    ]);

    for (port, expected) in [
        (8080, Outcome::Denied),
        (8081, Outcome::Connected),
        (8999, Outcome::Connected),
        (9000, Outcome::Denied),
        (9005, Outcome::Denied),
        (9010, Outcome::Denied),
        (9011, Outcome::Connected),
    ] {
        assert_eq!(
            w.connect(None, &format!("192.0.2.10:{port}"), 1),
            [expected],
            "port {port}"
        );
    }
}

#[test]
fn udp_sendto_denied_while_other_destination_passes() {
    let w = World::new(&["192.0.2.10", "192.0.2.11"]);
    let denied = w
        .sandbox
        .bind_udp(&w.host, addr("192.0.2.10:53"))
        .expect("udp");
    let allowed = w
        .sandbox
        .bind_udp(&w.host, addr("192.0.2.11:53"))
        .expect("udp");
    let _dp = w.enforce(vec![rule(
        &["192.0.2.10/32"],
        ports(UDP, 53, 53),
        Verdict::Deny,
        4,
    )]);

    assert_eq!(w.udp("192.0.2.10:53", 1), [Outcome::Denied]);
    assert_eq!(w.udp("192.0.2.11:53", 1), [Outcome::Sent]);
    let mut buf = [0u8; 64];
    assert!(
        denied.recv_from(&mut buf).is_err(),
        "a denied datagram must not arrive"
    );
    let (n, _) = allowed
        .recv_from(&mut buf)
        .expect("allowed datagram arrives");
    assert_eq!(&buf[..n], b"egret");
}

#[test]
fn ipv6_destinations_are_enforced() {
    let w = World::new(&["2001:db8:2::10", "2001:db8:2::11"]);
    let denied = w.listen("[2001:db8:2::10]:80");
    let _allowed = w.listen("[2001:db8:2::11]:80");
    let _dp = w.enforce(vec![rule(
        &["2001:db8:2::10/128"],
        ports(TCP, 80, 80),
        Verdict::Deny,
        5,
    )]);

    assert_eq!(w.connect(None, "[2001:db8:2::10]:80", 1), [Outcome::Denied]);
    assert_eq!(
        w.connect(None, "[2001:db8:2::11]:80", 1),
        [Outcome::Connected]
    );
    assert_eq!(drain(&denied), 0);
}

#[test]
fn ipv4_mapped_ipv6_is_decided_by_ipv4_rules_on_tcp_and_udp() {
    let w = World::new(&["192.0.2.10", "192.0.2.11"]);
    let _denied = w.listen("192.0.2.10:80");
    let _allowed = w.listen("192.0.2.11:80");
    let udp_denied = w
        .sandbox
        .bind_udp(&w.host, addr("192.0.2.10:53"))
        .expect("udp");
    let udp_allowed = w
        .sandbox
        .bind_udp(&w.host, addr("192.0.2.11:53"))
        .expect("udp");
    let dp = w.enforce(vec![rule(&["192.0.2.10/32"], L4::Any, Verdict::Deny, 6)]);

    assert_eq!(
        w.connect(None, "[::ffff:192.0.2.10]:80", 1),
        [Outcome::Denied]
    );
    assert_eq!(
        w.connect(None, "[::ffff:192.0.2.11]:80", 1),
        [Outcome::Connected]
    );
    assert_eq!(w.udp("[::ffff:192.0.2.10]:53", 1), [Outcome::Denied]);
    assert_eq!(w.udp("[::ffff:192.0.2.11]:53", 1), [Outcome::Sent]);
    let mut buf = [0u8; 64];
    assert!(udp_denied.recv_from(&mut buf).is_err());
    assert!(udp_allowed.recv_from(&mut buf).is_ok());
    // Counted under the IPv4 address, where the IPv4 rules decided it.
    let counters = counts(&dp.counters().expect("counters"));
    assert_eq!(
        counters.get(&(Some(ip("192.0.2.10")), Verdict::Deny, 6)),
        Some(&2)
    );
}

#[test]
fn sendmmsg_delivers_only_allowed_datagrams() {
    let w = World::new(&["192.0.2.10", "192.0.2.11", "192.0.2.12"]);
    let sockets: Vec<_> = ["192.0.2.10:53", "192.0.2.11:53", "192.0.2.12:53"]
        .iter()
        .map(|a| w.sandbox.bind_udp(&w.host, addr(a)).expect("udp"))
        .collect();
    let _dp = w.enforce(vec![rule(
        &["192.0.2.11/32"],
        ports(UDP, 53, 53),
        Verdict::Deny,
        7,
    )]);

    let attempts = w
        .sandbox
        .probe(
            &w.pod,
            None,
            &[
                "sendmmsg",
                "192.0.2.10:53",
                "192.0.2.11:53",
                "192.0.2.12:53",
            ],
        )
        .expect("probe");
    let outcomes: Vec<Outcome> = attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [Outcome::Sent, Outcome::Denied, Outcome::Sent]);
    let mut buf = [0u8; 64];
    let received: Vec<Option<String>> = sockets
        .iter()
        .map(|s| {
            s.recv_from(&mut buf)
                .ok()
                .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .collect();
    assert_eq!(
        received,
        [Some("egret-0".into()), None, Some("egret-2".into())]
    );
}

#[test]
fn process_outside_endpoint_cgroups_is_untouched_and_uncounted() {
    let w = World::new(&["192.0.2.10"]);
    let _listener = w.listen("192.0.2.10:80");
    let dp = w.enforce(vec![rule(&["192.0.2.10/32"], L4::Any, Verdict::Deny, 8)]);
    // Same network namespace as the pod, but a cgroup that is no endpoint's (yet under the
    // cgroup the programs are attached to, so the programs do run for it).
    let outsider = w.sandbox.add_unmanaged_cgroup("not-a-pod").expect("cgroup");

    assert_eq!(
        w.connect(Some(&outsider), "192.0.2.10:80", 2),
        [Outcome::Connected; 2]
    );
    assert_eq!(w.connect(None, "192.0.2.10:80", 1), [Outcome::Denied]);
    let counters = dp.counters().expect("counters");
    let total: u64 = counters.samples.iter().map(|s| s.attempts).sum();
    assert_eq!(total, 1, "only the pod's attempt is counted: {counters:?}");
}

#[test]
fn container_cgroup_created_after_policy_is_enforced() {
    let w = World::new(&["192.0.2.10", "192.0.2.11"]);
    let _l1 = w.listen("192.0.2.10:80");
    let _l2 = w.listen("192.0.2.11:80");
    let dp = w.enforce(vec![rule(&["192.0.2.10/32"], L4::Any, Verdict::Deny, 9)]);
    let endpoints_before = dp.endpoints().expect("endpoints");
    // Created after the rules were written, two levels deep, as runtimes nest containers.
    let container = w
        .sandbox
        .add_container(&w.pod, "ctr-late")
        .expect("container");
    let nested = w
        .sandbox
        .add_cgroup_below(&container, "init")
        .expect("nested");

    assert_eq!(
        w.connect(Some(&container), "192.0.2.10:80", 1),
        [Outcome::Denied]
    );
    assert_eq!(
        w.connect(Some(&nested), "192.0.2.10:80", 1),
        [Outcome::Denied]
    );
    assert_eq!(
        w.connect(Some(&container), "192.0.2.11:80", 1),
        [Outcome::Connected]
    );
    assert_eq!(
        dp.endpoints().expect("endpoints"),
        endpoints_before,
        "no new map entry needed"
    );
}

#[test]
fn counters_increase_once_per_attempt_with_verdict_and_destination() {
    let w = World::new(&["192.0.2.10", "192.0.2.11", "2001:db8:2::10"]);
    let _l1 = w.listen("192.0.2.10:80");
    let _l2 = w.listen("192.0.2.11:80");
    let _u = w
        .sandbox
        .bind_udp(&w.host, addr("192.0.2.11:53"))
        .expect("udp");
    let dp = w.enforce(vec![
        rule(&["192.0.2.10/32"], L4::Any, Verdict::Deny, 11),
        rule(&["2001:db8:2::/64"], L4::Any, Verdict::Deny, 12),
    ]);
    let before = counts(&dp.counters().expect("counters"));
    assert!(before.is_empty(), "fresh maps start empty: {before:?}");

    assert_eq!(w.connect(None, "192.0.2.10:80", 3), [Outcome::Denied; 3]);
    assert_eq!(w.connect(None, "192.0.2.11:80", 2), [Outcome::Connected; 2]);
    assert_eq!(w.udp("192.0.2.11:53", 4), [Outcome::Sent; 4]);
    assert_eq!(w.connect(None, "[2001:db8:2::10]:80", 1), [Outcome::Denied]);

    let counters = dp.counters().expect("counters");
    let by_key: BTreeMap<_, _> = counters
        .samples
        .iter()
        .map(|s| ((s.destination, s.protocol, s.verdict, s.rule), s.attempts))
        .collect();
    let expected = BTreeMap::from([
        ((Some(ip("192.0.2.10")), TCP, Verdict::Deny, 11), 3),
        ((Some(ip("192.0.2.11")), TCP, Verdict::Allow, 0), 2),
        ((Some(ip("192.0.2.11")), UDP, Verdict::Allow, 0), 4),
        ((Some(ip("2001:db8:2::10")), TCP, Verdict::Deny, 12), 1),
    ]);
    assert_eq!(by_key, expected);
    assert_eq!(counters.lost, [0, 0, 0]);
}

#[test]
fn killed_agent_leaves_enforcement_and_restart_adopts_without_gap() {
    let w = World::new(&["192.0.2.10"]);
    let _listener = w.listen("192.0.2.10:80");
    let rules_path = std::env::temp_dir().join(format!("{}-rules.json", w.sandbox.id()));
    let file = w.rules_file(vec![rule(
        &["192.0.2.10/32"],
        ports(TCP, 80, 80),
        Verdict::Deny,
        21,
    )]);
    std::fs::write(&rules_path, serde_json::to_string(&file).expect("json")).expect("write rules");
    let log1 = std::env::temp_dir().join(format!("{}-agent1.log", w.sandbox.id()));
    let log2 = std::env::temp_dir().join(format!("{}-agent2.log", w.sandbox.id()));

    let agent = |log: &Path| {
        Command::new(egret_binary())
            .args(["--pin-dir"])
            .arg(w.sandbox.pin_dir())
            .args(["apply", "--hold", "--cgroup"])
            .arg(w.sandbox.cgroup())
            .arg("--rules")
            .arg(&rules_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", egret_binary().display()))
    };
    let wait_log = |log: &Path, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "agent never logged {needle:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut first = agent(&log1);
    wait_log(&log1, "policy enforced");

    let stop = std::env::temp_dir().join(format!("{}-stop", w.sandbox.id()));
    let prober = w
        .sandbox
        .spawn_probe(
            &w.pod,
            &[
                "loop",
                "192.0.2.10:80",
                "--until-file",
                stop.to_str().expect("utf-8"),
                "--interval-ms",
                "2",
            ],
        )
        .expect("prober");
    std::thread::sleep(Duration::from_millis(200));
    first.kill().expect("kill agent");
    first.wait().expect("reap agent");
    // Enforcement with no agent at all.
    std::thread::sleep(Duration::from_millis(300));
    let mut second = agent(&log2);
    let log = wait_log(&log2, "policy enforced");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&stop, "").expect("stop file");
    let attempts = w.sandbox.wait_probe(prober).expect("prober output");
    second.kill().expect("kill agent");
    second.wait().expect("reap agent");

    assert!(
        log.contains("adopted pinned programs and maps"),
        "restart must adopt, not reload:\n{log}"
    );
    assert!(
        !log.contains("attached and pinned programs"),
        "restart reloaded programs:\n{log}"
    );
    assert!(
        attempts.len() > 50,
        "prober made too few attempts: {}",
        attempts.len()
    );
    let not_denied: Vec<_> = attempts
        .iter()
        .filter(|a| a.outcome != Outcome::Denied)
        .collect();
    assert!(
        not_denied.is_empty(),
        "attempts not denied while the agent was down or restarting: {not_denied:?}"
    );
    // Counters survived too: the kernel counted each of the prober's attempts exactly once.
    let dp = Datapath::open(&DatapathConfig {
        pin_dir: w.sandbox.pin_dir().into(),
        cgroup: None,
    })
    .expect("adopt");
    assert_eq!(dp.mode(), &LoadMode::Adopted);
    let counters = counts(&dp.counters().expect("counters"));
    assert_eq!(
        counters
            .get(&(Some(ip("192.0.2.10")), Verdict::Deny, 21))
            .copied(),
        Some(attempts.len() as u64)
    );
    for path in [rules_path, log1, log2, stop] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn generation_flips_under_cpu_pressure_never_expose_a_verdict_neither_policy_gives() {
    let w = World::new(&["192.0.2.10"]);
    let _l85 = w.listen("192.0.2.10:85");
    // Both policies deny port 85 and allow the rest, through different entries: A with one
    // exact-address rule, B with a CIDR and two ranges. Writing B over A entry by entry would
    // pass through states that allow 85; a generation swap never does.
    let a = w.rules_file(vec![rule(
        &["192.0.2.10/32"],
        ports(TCP, 80, 89),
        Verdict::Deny,
        31,
    )]);
    let b = w.rules_file(vec![
        rule(&["192.0.2.0/24"], ports(TCP, 85, 85), Verdict::Deny, 32),
        rule(&["192.0.2.0/28"], ports(TCP, 70, 99), Verdict::Deny, 33),
    ]);
    let (desired_a, desired_b) = (a.desired(), b.desired());
    let endpoints = a.cgroup_ids().expect("cgroups");
    let mut dp = w.open();
    dp.sync(&desired_a, &endpoints).expect("sync");

    let stop = std::env::temp_dir().join(format!("{}-flip-stop", w.sandbox.id()));
    let prober = w
        .sandbox
        .spawn_probe(
            &w.pod,
            &[
                "loop",
                "192.0.2.10:85",
                "--until-file",
                stop.to_str().expect("utf-8"),
                "--interval-ms",
                "0",
            ],
        )
        .expect("prober");
    // The prober shares 2 % of a CPU with a hog, so it is throttled and preempted at
    // arbitrary points, inside the programs too: a program that read the old generation
    // number can then still be looking up its entries long after the flip. Only a real wait
    // for running programs (not a sleep) keeps the old generation intact until it is done.
    let pressure = egret_tests::pressure::CpuPressure::new(
        &format!("{}-pressure", w.sandbox.id()),
        2_000,
        100_000,
    )
    .expect("cpu pressure");
    pressure.add(prober).expect("throttle the prober");
    let flips = 1000;
    for i in 0..flips {
        let desired = if i % 2 == 0 { &desired_b } else { &desired_a };
        dp.sync(desired, &endpoints).expect("sync");
    }
    std::fs::write(&stop, "").expect("stop");
    let attempts = w.sandbox.wait_probe(prober).expect("prober output");
    drop(pressure);
    let _ = std::fs::remove_file(&stop);

    assert!(
        attempts.len() > 100,
        "prober made too few attempts: {}",
        attempts.len()
    );
    let wrong: Vec<_> = attempts
        .iter()
        .filter(|a| a.outcome != Outcome::Denied)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} attempts got a verdict neither policy gives",
        wrong.len(),
        attempts.len()
    );
}

#[test]
fn loaded_object_holds_every_map_and_program() {
    let w = World::new(&["192.0.2.10"]);
    let dp = w.open();
    let maps = std::fs::read_dir(w.sandbox.pin_dir().join("maps")).expect("maps dir");
    let mut names: Vec<String> = maps
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = egret_common::map_names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    for program in egret_common::program_names::ALL {
        assert!(
            w.sandbox.pin_dir().join("links").join(program).exists(),
            "{program} not pinned"
        );
    }
    assert!(
        matches!(dp.mode(), LoadMode::Loaded { attached } if attached.len() == egret_common::program_names::ALL.len())
    );
}
