//! End-to-end tests of `egret agent`: the real binary against the in-repo test API server
//! (driven with the real `kubectl`, as an operator would), enforcing on sandbox pods whose
//! cgroups are laid out as the kubelet's systemd driver makes them. Needs root, like every test
//! here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use egret_test_apiserver::{ApiServer, Config};
use egret_tests::{
    agent::{http_get, metrics_address_in, samples},
    manifests::{self, Call},
    probe::{Outcome, egret_binary},
    sandbox::{Host, Pod, Sandbox},
};
use serde_json::Value;

const NODE: &str = "node-1";

/// A running `egret agent`, killed on drop.
struct Agent {
    child: Child,
    stderr: PathBuf,
}

impl Agent {
    fn start(sandbox: &Sandbox, dir: &Path, kubeconfig: &Path, args: &[&str]) -> Self {
        Self::spawn(Command::new(egret_binary()), sandbox, dir, kubeconfig, args)
    }

    /// `egret agent` on the sandbox, run by `command`: egret itself, or a wrapper whose
    /// arguments end with egret's path; its log goes to `dir/agent.log`.
    fn spawn(
        mut command: Command,
        sandbox: &Sandbox,
        dir: &Path,
        kubeconfig: &Path,
        args: &[&str],
    ) -> Self {
        let stderr = dir.join("agent.log");
        let child = command
            .arg("--pin-dir")
            .arg(sandbox.pin_dir())
            .arg("agent")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", NODE, "--metrics-addr", "127.0.0.1:0"])
            .arg("--cgroup")
            .arg(sandbox.cgroup())
            .arg("--cgroup-root")
            .arg(sandbox.cgroup())
            .args(args)
            .env("EGRET_LOG", "info,egret=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .expect("spawn egret agent");
        Self { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "egret agent never logged {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics_address(&self) -> String {
        self.wait_log("serving metrics", Duration::from_secs(20));
        metrics_address_in(&self.log()).expect("metrics address")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test API server, a kubeconfig for it, and `kubectl` pointed at it.
struct Cluster {
    server: ApiServer,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let server = ApiServer::start("127.0.0.1:0".parse().expect("addr"), Config::default())
            .expect("test API server");
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let crd = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/egresspolicy.yaml"),
        )
        .expect("CRD");
        server.seed(&crd).expect("CRD accepted");
        server
            .seed(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: egret-system}\n---\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n---\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n",
            )
            .expect("namespaces");
        Self { server, kubeconfig }
    }

    /// Runs `kubectl` as an operator would; panics with its output when it fails.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl (cargo xtask setup installs it)");
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            input.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    /// Creates a pod object on this node with `ip` and returns its uid.
    fn pod(&self, namespace: &str, name: &str, labels: &str, ip: IpAddr) -> String {
        let created = self
            .server
            .seed(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: {NODE}, containers: [{{name: c, image: scratch, ports: [{{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}\n\
                 status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n"
            ))
            .expect("pod");
        created[0]["metadata"]["uid"]
            .as_str()
            .expect("uid")
            .to_owned()
    }
}

/// The kubelet's systemd-driver layout below the sandbox's cgroup.
struct Kubepods {
    burstable: PathBuf,
}

impl Kubepods {
    fn new(sandbox: &Sandbox) -> Self {
        let root = sandbox
            .add_unmanaged_cgroup("kubepods.slice")
            .expect("kubepods.slice");
        let burstable = sandbox
            .add_cgroup_below(&root, "kubepods-burstable.slice")
            .expect("burstable");
        Self { burstable }
    }

    /// Creates the pod cgroup of `uid`, as the kubelet does when it starts the pod.
    fn pod(&self, sandbox: &Sandbox, uid: &str) -> PathBuf {
        sandbox
            .add_cgroup_below(
                &self.burstable,
                &format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            )
            .expect("pod cgroup")
    }
}

fn connect(sandbox: &Sandbox, pod: &Pod, cgroup: &Path, target: &str) -> Outcome {
    sandbox
        .probe(
            pod,
            Some(cgroup),
            &["connect", target, "--timeout-ms", "500"],
        )
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

fn udp(sandbox: &Sandbox, pod: &Pod, cgroup: &Path, target: &str) -> Outcome {
    sandbox
        .probe(pod, Some(cgroup), &["udp", target])
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

/// Probes until `target` gives `want`, failing after `within`.
fn until(
    sandbox: &Sandbox,
    pod: &Pod,
    cgroup: &Path,
    target: &str,
    want: Outcome,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = connect(sandbox, pod, cgroup, target);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{target} still {got:?} after {within:?}, wanted {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn temp_dir(sandbox: &Sandbox, what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{what}", sandbox.id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn hosts(sandbox: &mut Sandbox) -> (Host, Vec<std::net::TcpListener>) {
    let addrs: Vec<IpAddr> = ["192.0.2.10", "192.0.2.11"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let host = sandbox.add_host("ext", &addrs).expect("host");
    let listeners = ["192.0.2.10:80", "192.0.2.11:80"]
        .iter()
        .map(|a| {
            sandbox
                .listen_tcp(&host, a.parse().expect("addr"))
                .expect("listen")
        })
        .collect();
    (host, listeners)
}

const LOCKED: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-eleven, namespace: app}
spec:
  podSelector: {matchLabels: {role: locked}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 192.0.2.11/32}}]
";

#[test]
fn policies_applied_through_the_api_follow_labels_pods_and_cgroups() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let (_host, _listeners) = hosts(&mut sandbox);
    let dir = temp_dir(&sandbox, "agent");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &uid);

    let agent = Agent::start(
        &sandbox,
        &dir,
        &cluster.kubeconfig,
        &["--unknown-pods", "deny"],
    );
    agent.wait_log("policy enforced", Duration::from_secs(30));
    assert_eq!(
        connect(&sandbox, &web, &web_cgroup, "192.0.2.10:80"),
        Outcome::Connected,
        "no policy isolates app/web yet"
    );

    // A NetworkPolicy applied with kubectl, then a label that makes it select the pod.
    cluster.apply(LOCKED);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        connect(&sandbox, &web, &web_cgroup, "192.0.2.10:80"),
        Outcome::Connected,
        "the policy selects role=locked only"
    );
    cluster.kubectl(&["-n", "app", "label", "pod", "web", "role=locked"], None);
    until(
        &sandbox,
        &web,
        &web_cgroup,
        "192.0.2.10:80",
        Outcome::Denied,
        Duration::from_secs(3),
    );
    assert_eq!(
        connect(&sandbox, &web, &web_cgroup, "192.0.2.11:80"),
        Outcome::Connected
    );

    // A pod whose cgroup appears after its object: enforced from its first connect.
    let late = sandbox.add_pod("late").expect("pod");
    let late_uid = cluster.pod("app", "late", "role: locked", IpAddr::V4(late.ipv4));
    std::thread::sleep(Duration::from_millis(300));
    let late_cgroup = kubepods.pod(&sandbox, &late_uid);
    assert_eq!(
        connect(&sandbox, &late, &late_cgroup, "192.0.2.10:80"),
        Outcome::Denied,
        "first connect of a pod whose cgroup just appeared"
    );
    until(
        &sandbox,
        &late,
        &late_cgroup,
        "192.0.2.11:80",
        Outcome::Connected,
        Duration::from_secs(3),
    );

    // A pod cgroup no pod object explains: denied (`--unknown-pods deny`), counted as
    // `unknown-pod`.
    let stranger = kubepods.pod(&sandbox, "11111111-2222-3333-4444-555555555555");
    assert_eq!(
        connect(&sandbox, &late, &stranger, "192.0.2.11:80"),
        Outcome::Denied
    );

    // A deleted pod's entries go: its cgroup is unknown now, so pending.
    cluster.kubectl(
        &["-n", "app", "delete", "pod", "late", "--wait=false"],
        None,
    );
    until(
        &sandbox,
        &late,
        &late_cgroup,
        "192.0.2.11:80",
        Outcome::Denied,
        Duration::from_secs(3),
    );

    // Metrics: per destination, with the pod's namespace and workload.
    let address = agent.metrics_address();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (blocked, pending) = loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        let sum = |needles: &[&str]| -> f64 {
            samples(&metrics, "egret_egress_connections_total")
                .filter(|(labels, _)| needles.iter().all(|n| labels.contains(n)))
                .map(|(_, v)| v)
                .sum()
        };
        let blocked = sum(&[
            "verdict=\"blocked\"",
            "destination_ip=\"192.0.2.10\"",
            "source_namespace=\"app\"",
            "source_workload=\"web\"",
            "policy=\"NetworkPolicy app/only-eleven\"",
        ]);
        let pending = sum(&["verdict=\"blocked\"", "policy=\"unknown-pod\""]);
        if (blocked >= 1.0 && pending >= 2.0) || Instant::now() > deadline {
            break (blocked, pending);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(blocked >= 1.0, "blocked by only-eleven: {blocked}");
    assert!(pending >= 2.0, "unknown and deleted pods: {pending}");
    let ready = http_get(&address, "/readyz").expect("readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert_rbac_grants(&cluster.server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lost_watches_and_compacted_history_change_no_verdict() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let (_host, _listeners) = hosts(&mut sandbox);
    let dir = temp_dir(&sandbox, "agent-410");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let uid = cluster.pod("app", "web", "role: locked", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &uid);
    cluster.apply(LOCKED);
    let agent = Agent::start(&sandbox, &dir, &cluster.kubeconfig, &[]);
    agent.wait_log("policy enforced", Duration::from_secs(30));
    until(
        &sandbox,
        &web,
        &web_cgroup,
        "192.0.2.10:80",
        Outcome::Denied,
        Duration::from_secs(3),
    );

    // Every watch dropped; while they cannot reconnect, the cluster changes and its history is
    // compacted, so resuming gets 410 Gone and the watchers re-list. Meanwhile and after,
    // nothing changes.
    for round in 0..3 {
        cluster.server.hold_watches(true);
        cluster.server.drop_watches();
        for _ in 0..5 {
            assert_eq!(
                connect(&sandbox, &web, &web_cgroup, "192.0.2.10:80"),
                Outcome::Denied
            );
        }
        cluster.pod(
            "app",
            &format!("other-{round}"),
            "app: other",
            "198.51.100.200".parse().expect("ip"),
        );
        cluster.server.compact();
        cluster.server.hold_watches(false);
        for _ in 0..5 {
            assert_eq!(
                connect(&sandbox, &web, &web_cgroup, "192.0.2.10:80"),
                Outcome::Denied
            );
            assert_eq!(
                connect(&sandbox, &web, &web_cgroup, "192.0.2.11:80"),
                Outcome::Connected
            );
        }
    }
    // And the re-listed watches still follow changes.
    cluster.kubectl(&["-n", "app", "label", "pod", "web", "role-"], None);
    until(
        &sandbox,
        &web,
        &web_cgroup,
        "192.0.2.10:80",
        Outcome::Connected,
        Duration::from_secs(5),
    );
    let relists = cluster
        .server
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "pods")
        .count();
    assert!(
        relists >= 2,
        "the pod watch re-listed after 410: {relists} lists"
    );
    assert_rbac_grants(&cluster.server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dns_through_its_service_and_invalid_egress_policies_get_a_status() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let dns = sandbox.add_pod("dns").expect("pod");
    let (_host, _listeners) = hosts(&mut sandbox);
    let dir = temp_dir(&sandbox, "agent-dns");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &uid);
    cluster.pod("kube-system", "dns", "app: dns", IpAddr::V4(dns.ipv4));
    // The DNS Service's ClusterIP is a TEST-NET address the sandbox routes; kube-proxy would
    // send its datagrams to the DNS pod's 5353.
    cluster
        .server
        .seed(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
             spec: {{clusterIP: 203.0.113.53, clusterIPs: [203.0.113.53], selector: {{app: dns}}, ports: [{{name: dns, port: 53, protocol: UDP, targetPort: dns}}]}}\n\
             ---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}\n\
             addressType: IPv4\nports: [{{name: dns, port: 5353, protocol: UDP}}]\n\
             endpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
            dns.ipv4
        ))
        .expect("service");
    // Default deny for app, and an allow to the DNS pods at their port.
    cluster.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-but-dns, namespace: app}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {app: dns}}}]
    ports: [{protocol: UDP, port: 5353}]
",
    );
    // One valid and one invalid EgressPolicy: two rules with one name. Today's CRD refuses
    // that at the API; a cluster whose CRD is older than egret (here: without the rules'
    // list-map keys) stores it, and egret's own validation must catch it.
    let older_crd = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/egresspolicy.yaml"),
    )
    .expect("CRD")
    .replace(
        "                x-kubernetes-list-map-keys:\n                - name\n                x-kubernetes-list-type: map\n",
        "",
    );
    assert!(
        !older_crd.contains("x-kubernetes-list-type: map"),
        "the older CRD lacks the rules' list-map keys"
    );
    cluster.server.seed(&older_crd).expect("older CRD");
    cluster.apply(
        "apiVersion: egret.dev/v1alpha1
kind: EgressPolicy
metadata: {name: valid}
spec:
  priority: 10
  subject: {podSelector: {}}
  rules:
  - {name: metadata, action: Deny, to: [{networks: [192.0.2.254/32]}]}
---
apiVersion: egret.dev/v1alpha1
kind: EgressPolicy
metadata: {name: broken}
spec:
  priority: 20
  subject: {podSelector: {}}
  rules:
  - {name: twice, action: Deny, to: [{networks: [192.0.2.10/32]}]}
  - {name: twice, action: Allow, to: [{networks: [192.0.2.11/32]}]}
",
    );
    let agent = Agent::start(&sandbox, &dir, &cluster.kubeconfig, &[]);
    agent.wait_log("policy enforced", Duration::from_secs(30));

    assert_eq!(
        udp(&sandbox, &web, &web_cgroup, "203.0.113.53:53"),
        Outcome::Sent,
        "DNS to the Service's ClusterIP: its endpoint is allowed at 5353"
    );
    assert_eq!(
        udp(&sandbox, &web, &web_cgroup, "203.0.113.53:54"),
        Outcome::Denied,
        "a port the Service does not expose"
    );
    assert_eq!(
        udp(&sandbox, &web, &web_cgroup, &format!("{}:53", dns.ipv4)),
        Outcome::Denied,
        "the DNS pod itself at 53: not allowed"
    );
    assert_eq!(
        connect(&sandbox, &web, &web_cgroup, "192.0.2.11:80"),
        Outcome::Denied,
        "default deny; the invalid policy's Allow is not enforced"
    );

    // Status, written by the Lease holder: Accepted True for the valid policy, False with
    // reason Invalid and the field for the other.
    let deadline = Instant::now() + Duration::from_secs(15);
    let condition = |name: &str| -> Option<Value> {
        cluster
            .server
            .object("egret.dev", "egresspolicies", "", name)
            .and_then(|o| o["status"]["conditions"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["type"] == "Accepted"))
    };
    let (valid, broken) = loop {
        if let (Some(v), Some(b)) = (condition("valid"), condition("broken")) {
            break (v, b);
        }
        assert!(
            Instant::now() < deadline,
            "no status written:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(valid["status"], "True", "{valid}");
    assert_eq!(broken["status"], "False", "{broken}");
    assert_eq!(broken["reason"], "Invalid", "{broken}");
    assert!(
        broken["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rules[1].name"),
        "{broken}"
    );
    assert!(broken["observedGeneration"].as_i64().is_some(), "{broken}");
    let lease = cluster
        .server
        .object(
            "coordination.k8s.io",
            "leases",
            "egret-system",
            "egret-status-writer",
        )
        .expect("the status writer holds the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], NODE);
    // One Warning Event for the rejected policy.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster
        .server
        .objects("events.k8s.io", "events")
        .iter()
        .any(|e| e["reason"] == "Invalid" && e["regarding"]["name"] == "broken")
    {
        assert!(
            Instant::now() < deadline,
            "no Event for the rejected policy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // `egret explain` asks the cluster itself, through the same compiler.
    let explain = |to: &str, port: &str| -> Value {
        let out = Command::new(egret_binary())
            .arg("explain")
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args([
                "--from",
                "app/web",
                "--to",
                to,
                "--port",
                port,
                "--protocol",
                "UDP",
            ])
            .args(["-o", "json"])
            .output()
            .expect("egret explain");
        assert!(
            out.status.success(),
            "egret explain: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("explain JSON")
    };
    let dns_answer = explain("203.0.113.53", "53");
    assert_eq!(dns_answer["verdict"], "allow", "{dns_answer}");
    let unexposed = explain("203.0.113.53", "54");
    assert_eq!(unexposed["verdict"], "deny", "{unexposed}");
    assert_eq!(unexposed["rule"], "no-such-port", "{unexposed}");

    // Least privilege, proven on what happened: the shipped RBAC grants every call the agent
    // and `egret explain` made, and here they include every kind of write.
    let calls = assert_rbac_grants(&cluster.server);
    let made = |verb: &str, resource: &str| {
        calls
            .iter()
            .any(|c| c.verb == verb && (c.resource == resource || c.subresource == resource))
    };
    for (verb, resource) in [
        ("watch", "pods"),
        ("list", "egresspolicies"),
        ("create", "leases"),
        ("patch", "status"),
        ("create", "events"),
    ] {
        assert!(
            made(verb, resource),
            "the check saw no {verb} of {resource}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every resource call egret made to `server` (kubectl's are the operator's) is granted to
/// egret's ServiceAccount by the manifests; returns the calls.
fn assert_rbac_grants(server: &ApiServer) -> Vec<Call> {
    let docs = manifests::build("").unwrap_or_else(|e| panic!("{e}"));
    let grants = manifests::grants(&docs, "egret-system", "egret");
    let calls: Vec<Call> = server
        .requests()
        .into_iter()
        .filter(|r| !r.user_agent.starts_with("kubectl") && !r.resource.is_empty())
        .map(|r| Call {
            verb: r.verb,
            group: r.api_group,
            resource: r.resource,
            subresource: r.subresource,
            namespace: r.namespace,
            name: r.name,
        })
        .collect();
    let refused: std::collections::BTreeSet<String> = calls
        .iter()
        .filter(|c| !grants.iter().any(|g| g.allows(c)))
        .map(ToString::to_string)
        .collect();
    assert!(
        refused.is_empty(),
        "calls the shipped RBAC does not grant: {refused:#?}"
    );
    calls
}

/// Sums `egret_egress_connections_total` samples whose labels hold every needle, by policy.
fn by_policy(exposition: &str, needles: &[&str]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for (labels, value) in samples(exposition, "egret_egress_connections_total") {
        if needles.iter().all(|n| labels.contains(n)) {
            let policy = labels
                .split("policy=\"")
                .nth(1)
                .and_then(|p| p.split('"').next())
                .unwrap_or_default()
                .to_owned();
            *out.entry(policy).or_default() += value;
        }
    }
    out
}

#[test]
fn a_rolling_update_changes_no_verdict_loses_no_count_and_keeps_every_label() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let (_host, listeners) = hosts(&mut sandbox);
    let dir = temp_dir(&sandbox, "agent-upgrade");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &uid);
    let policy = |name: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: app}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n  egress:\n  \
             - to: [{{ipBlock: {{cidr: 192.0.2.11/32}}}}]\n"
        )
    };
    cluster.apply(&policy("only-eleven"));
    // The allowed host accepts (and drops) every connection, so its queue never fills.
    let stop_accepting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepting = {
        let stop = std::sync::Arc::clone(&stop_accepting);
        let listeners: Vec<std::net::TcpListener> = listeners;
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut idle = true;
                for l in &listeners {
                    while let Ok((conn, _)) = l.accept() {
                        drop(conn);
                        idle = false;
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };

    let old = Agent::start(&sandbox, &dir, &cluster.kubeconfig, &[]);
    old.wait_log("policy enforced", Duration::from_secs(30));
    // Until the policy is live; these denials are counted too.
    let mut denied_before = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&sandbox, &web, &web_cgroup, "192.0.2.10:80") != Outcome::Denied {
        assert!(Instant::now() < deadline, "the policy never took effect");
        std::thread::sleep(Duration::from_millis(50));
    }
    denied_before += 1;
    let stop = dir.join("stop-probing");
    let stop_arg = stop.to_str().expect("utf-8");
    let probers: Vec<u32> = ["192.0.2.10:80", "192.0.2.11:80"]
        .iter()
        .map(|target| {
            sandbox
                .spawn_probe_in(
                    &web,
                    &web_cgroup,
                    &[
                        "loop",
                        target,
                        "--until-file",
                        stop_arg,
                        "--interval-ms",
                        "5",
                        "--timeout-ms",
                        "1000",
                    ],
                )
                .expect("prober")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // The kubelet stops the old pod: SIGTERM, and it exits; its pins stay.
    let mut old = old;
    let pid = libc::pid_t::try_from(old.child.id()).expect("pid");
    // SAFETY: plain syscall on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let _ = old.child.wait().expect("the old agent exits on SIGTERM");
    // Meanwhile the policy is replaced by one of another name, and the pod relabelled.
    cluster.kubectl(
        &["-n", "app", "delete", "networkpolicy", "only-eleven"],
        None,
    );
    cluster.apply(&policy("only-eleven-v2"));
    cluster.kubectl(&["-n", "app", "label", "pod", "web", "tier=front"], None);
    std::thread::sleep(Duration::from_millis(500));

    // The new pod adopts the pins.
    let new_dir = dir.join("new");
    std::fs::create_dir_all(&new_dir).expect("dir");
    let new = Agent::start(&sandbox, &new_dir, &cluster.kubeconfig, &[]);
    new.wait_log("policy enforced", Duration::from_secs(30));
    assert!(
        new.log().contains("adopting pinned datapath"),
        "the new agent adopts the pinned programs:\n{}",
        new.log()
    );
    std::thread::sleep(Duration::from_millis(700));
    std::fs::write(&stop, "").expect("stop");
    let attempts: Vec<_> = probers
        .into_iter()
        .map(|pid| sandbox.wait_probe(pid).expect("prober output"))
        .collect();
    stop_accepting.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = accepting.join();

    // No wrong verdict at any moment: before, across SIGTERM, while no agent ran, after.
    let denied = &attempts[0];
    let allowed = &attempts[1];
    assert!(
        denied.len() > 100 && allowed.len() > 100,
        "{} and {} attempts",
        denied.len(),
        allowed.len()
    );
    let wrong: Vec<_> = denied
        .iter()
        .filter(|a| a.outcome != Outcome::Denied)
        .chain(allowed.iter().filter(|a| a.outcome != Outcome::Connected))
        .collect();
    assert!(
        wrong.is_empty(),
        "wrong verdicts across the update: {wrong:?}"
    );

    // No lost count, and every count keeps its labels: the old policy's name for what it
    // decided, the new one's after.
    let address = new.metrics_address();
    let needles = [
        "destination_ip=\"192.0.2.10\"",
        "verdict=\"blocked\"",
        "source_namespace=\"app\"",
        "source_workload=\"web\"",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts = by_policy(&http_get(&address, "/metrics").expect("scrape"), &needles);
        let total: f64 = counts.values().sum();
        if total as usize == denied.len() + denied_before || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let total: f64 = counts.values().sum();
    assert_eq!(
        total as usize,
        denied.len() + denied_before,
        "blocked counts by policy: {counts:?}"
    );
    let old_name = counts
        .keys()
        .any(|p| p.contains("only-eleven") && !p.contains("v2"));
    let new_name = counts.keys().any(|p| p.contains("only-eleven-v2"));
    assert!(
        old_name && new_name,
        "each count under the policy that decided it: {counts:?}"
    );
    let passed: f64 = by_policy(
        &http_get(&address, "/metrics").expect("scrape"),
        &[
            "destination_ip=\"192.0.2.11\"",
            "verdict=\"passthrough\"",
            "source_workload=\"web\"",
        ],
    )
    .values()
    .sum();
    assert_eq!(passed as usize, allowed.len(), "allowed attempts counted");
    assert_rbac_grants(&cluster.server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Moves the calling thread (and what it starts) into `netns`.
fn enter(netns: &str) {
    use std::os::fd::AsRawFd as _;
    let ns = std::fs::File::open(Path::new("/run/netns").join(netns)).expect("netns");
    // SAFETY: setns on this thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// `egret agent` as root with only the capabilities the shipped DaemonSet adds.
fn start_with_daemonset_capabilities(
    sandbox: &Sandbox,
    dir: &Path,
    kubeconfig: &Path,
    args: &[&str],
) -> Agent {
    let caps: Vec<String> = manifests::daemonset_capabilities()
        .iter()
        .map(|c| format!("+{c}"))
        .collect();
    let mut setpriv = Command::new("setpriv");
    setpriv
        .args(["--reuid", "0", "--inh-caps=-all"])
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg(egret_binary());
    Agent::spawn(setpriv, sandbox, dir, kubeconfig, args)
}

#[test]
fn a_pods_node_side_veth_gets_the_tc_programs_so_raw_packets_are_decided_too() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let (host, _listeners) = hosts(&mut sandbox);
    let receiver = |addr: &str| {
        sandbox
            .bind_udp(&host, addr.parse().expect("addr"))
            .expect("udp")
    };
    let denied_at = receiver("192.0.2.10:53");
    let allowed_at = receiver("192.0.2.11:53");
    // The agent runs where the pods' veths end, as the DaemonSet runs in the node's namespace;
    // the API server and kubectl with it, so that it reaches them on loopback.
    enter(&format!("{}-node", sandbox.id()));
    let dir = temp_dir(&sandbox, "agent-tc");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &uid);
    cluster.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-eleven, namespace: app}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{ipBlock: {cidr: 192.0.2.11/32}}]\n",
    );
    // A process of the pod (as its pause container), through which the agent finds its veth.
    let stop = dir.join("stop");
    let resident = sandbox
        .spawn_probe_in(
            &web,
            &web_cgroup,
            &[
                "loop",
                "192.0.2.11:80",
                "--until-file",
                stop.to_str().expect("utf-8"),
                "--interval-ms",
                "500",
            ],
        )
        .expect("pod process");

    // With exactly the DaemonSet's capabilities, as its pod has them.
    let agent = start_with_daemonset_capabilities(&sandbox, &dir, &cluster.kubeconfig, &[]);
    agent.wait_log("TC programs attached", Duration::from_secs(30));
    let raw_udp = |to: &str| {
        let attempts = sandbox
            .probe(&web, Some(&web_cgroup), &["raw", to, "--kind", "udp"])
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{to}: {attempts:?}");
    };
    let arrived = |at: &std::net::UdpSocket| at.recv(&mut [0u8; 64]).is_ok();
    raw_udp("192.0.2.11:53");
    assert!(
        arrived(&allowed_at),
        "raw UDP to the allowed address must arrive"
    );
    raw_udp("192.0.2.10:53");
    assert!(
        !arrived(&denied_at),
        "raw UDP to the denied address passed the pod's veth"
    );
    // Counted as blocked under its destination, as the socket hooks count.
    let address = agent.metrics_address();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        let blocked: f64 = samples(&metrics, "egret_egress_connections_total")
            .filter(|(labels, _)| {
                labels.contains("destination_ip=\"192.0.2.10\"")
                    && labels.contains("verdict=\"blocked\"")
                    && labels.contains("source_workload=\"web\"")
            })
            .map(|(_, v)| v)
            .sum();
        if blocked >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no blocked count for the raw packet:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop, "").expect("stop");
    let _ = sandbox.wait_probe(resident);
    assert_rbac_grants(&cluster.server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pods_first_process_cannot_send_a_frame_before_its_veth_is_found() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    // `web` runs; `late` has its cgroup and its veth (the CNI has run) but no process yet;
    // `stranger` is a container veth of no pod.
    let web = sandbox.add_pod("web").expect("pod");
    let late = sandbox.add_pod("late").expect("pod");
    // Frames carry the pod's own address: another would be dropped as forged anyway.
    let late_source = late.ipv4.to_string();
    let stranger = sandbox.add_pod("stranger").expect("pod");
    let (host, _listeners) = hosts(&mut sandbox);
    let receiver = |addr: &str| {
        sandbox
            .bind_udp(&host, addr.parse().expect("addr"))
            .expect("udp")
    };
    let denied_at = receiver("192.0.2.10:53");
    let allowed_at = receiver("192.0.2.11:53");
    enter(&format!("{}-node", sandbox.id()));
    let dir = temp_dir(&sandbox, "agent-pending");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let web_uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &web_uid);
    let late_uid = cluster.pod("app", "late", "app: web", IpAddr::V4(late.ipv4));
    let late_cgroup = kubepods.pod(&sandbox, &late_uid);
    cluster.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-eleven, namespace: app}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{ipBlock: {cidr: 192.0.2.11/32}}]\n",
    );
    let stop = dir.join("stop");
    let resident = sandbox
        .spawn_probe_in(
            &web,
            &web_cgroup,
            &[
                "loop",
                "192.0.2.11:80",
                "--until-file",
                stop.to_str().expect("utf-8"),
                "--interval-ms",
                "500",
            ],
        )
        .expect("pod process");
    // The sandbox's pods' veths are `p*`; its simulated external hosts' (`h*`) are no pod's.
    let pod_veths = ["--pod-veths", "p*"];
    let agent = start_with_daemonset_capabilities(&sandbox, &dir, &cluster.kubeconfig, &pod_veths);
    agent.wait_log(
        "unclaimed veths pass link traffic only",
        Duration::from_secs(30),
    );
    // web's veth and the two unclaimed ones (late's, stranger's).
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.log().matches("TC programs attached").count() < 3 {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let udp = |pod: &egret_tests::sandbox::Pod, cgroup: Option<&Path>, to: &str| {
        let attempts = sandbox.probe(pod, cgroup, &["udp", to]).expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{to}: {attempts:?}");
    };
    // While `late` is not found, a veth no pod claims passes link traffic only.
    udp(&stranger, None, "192.0.2.11:53");
    assert!(!arrived(&allowed_at), "a pending veth let a datagram out");

    // `late`'s first process sends an AF_PACKET frame to the denied address at once, before
    // any lookup could have found its veth: the pending veth drops it.
    let first = sandbox
        .spawn_probe_in(
            &late,
            &late_cgroup,
            &[
                "raw",
                "192.0.2.10:53",
                "--kind",
                "packet",
                "--source",
                &late_source,
            ],
        )
        .expect("late's first process");
    let attempts = sandbox.wait_probe(first).expect("probe");
    assert_eq!(attempts[0].outcome, Outcome::Sent, "{attempts:?}");
    assert!(
        !arrived(&denied_at),
        "late's first frame reached the denied address"
    );

    // A process that stays (as the pause container does) lets the agent find the veth: then
    // `late`'s veth is decided by its policy, and the stranger's veth is no longer held.
    let late_stop = dir.join("late-stop");
    let late_resident = sandbox
        .spawn_probe_in(
            &late,
            &late_cgroup,
            &[
                "loop",
                "192.0.2.11:80",
                "--until-file",
                late_stop.to_str().expect("utf-8"),
                "--interval-ms",
                "500",
            ],
        )
        .expect("late's resident process");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("TC programs detached") {
        assert!(
            Instant::now() < deadline,
            "the stranger's veth stayed pending:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (to, at, reaches) in [
        ("192.0.2.11:53", &allowed_at, true),
        ("192.0.2.10:53", &denied_at, false),
    ] {
        let attempts = sandbox
            .probe(
                &late,
                Some(&late_cgroup),
                &["raw", to, "--kind", "packet", "--source", &late_source],
            )
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{to}: {attempts:?}");
        assert_eq!(arrived(at), reaches, "late's frame to {to}");
    }
    udp(&stranger, None, "192.0.2.11:53");
    assert!(
        arrived(&allowed_at),
        "the stranger's veth is not egret's once every pod is found"
    );

    // The pending drops are counted: blocked, of no workload yet, under `unknown-pod`.
    let address = agent.metrics_address();
    let metrics = http_get(&address, "/metrics").expect("scrape");
    let pending: f64 = samples(&metrics, "egret_egress_connections_total")
        .filter(|(labels, _)| {
            labels.contains("source_workload=\"pending\"")
                && labels.contains("verdict=\"blocked\"")
                && labels.contains("policy=\"unknown-pod\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert!(pending >= 1.0, "no pending drop counted:\n{metrics}");
    std::fs::write(&stop, "").expect("stop");
    std::fs::write(&late_stop, "").expect("stop");
    let _ = sandbox.wait_probe(resident);
    let _ = sandbox.wait_probe(late_resident);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process that only waits, in `netns` and `cgroup` (a pod's pause container, or a runtime
/// still setting up a sandbox when `netns` is the node's); killed by the caller, or by the
/// sandbox's cgroup cleanup.
fn pause(sandbox: &Sandbox, netns: &str, cgroup: &Path) -> Child {
    sandbox
        .command_in(netns, cgroup, Path::new("sleep"))
        .expect("command")
        .arg("600")
        .spawn()
        .expect("sleep")
}

/// Waits until the agent's log holds `needle` more than `before` times, which means `what`.
fn wait_count(agent: &Agent, needle: &str, before: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.log().matches(needle).count() <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: egret agent never logged {needle:?} again:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pod_started_while_the_agent_runs_sends_no_frame_before_its_veth_is_found() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    // `fresh` has a namespace but no veth yet (the CNI has not run); `late` has its veth, but
    // neither a Pod nor a cgroup yet; `stranger` is a container veth of no pod.
    let fresh = sandbox.add_unwired_pod("fresh").expect("pod");
    let late = sandbox.add_pod("late").expect("pod");
    let stranger = sandbox.add_pod("stranger").expect("pod");
    let (host, _listeners) = hosts(&mut sandbox);
    let receiver = |addr: &str| {
        sandbox
            .bind_udp(&host, addr.parse().expect("addr"))
            .expect("udp")
    };
    let denied_at = receiver("192.0.2.10:53");
    let allowed_at = receiver("192.0.2.11:53");
    let node = sandbox.node_netns().to_owned();
    enter(&node);
    let dir = temp_dir(&sandbox, "agent-pending-late");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let web_uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &web_uid);
    cluster.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-eleven, namespace: app}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{ipBlock: {cidr: 192.0.2.11/32}}]\n",
    );
    let mut web_pause = pause(&sandbox, &web.netns, &web_cgroup);
    let agent = start_with_daemonset_capabilities(
        &sandbox,
        &dir,
        &cluster.kubeconfig,
        &["--pod-veths", "p*"],
    );
    agent.wait_log("TC programs attached", Duration::from_secs(30));
    // An AF_PACKET frame from `pod`'s namespace and `cgroup`, with the pod's own address.
    let frame = |pod: &Pod, cgroup: &Path, to: &str| {
        let source = pod.ipv4.to_string();
        let attempts = sandbox
            .probe(
                pod,
                Some(cgroup),
                &["raw", to, "--kind", "packet", "--source", &source],
            )
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{to}: {attempts:?}");
    };
    let stranger_udp = || {
        let attempts = sandbox
            .probe(&stranger, None, &["udp", "192.0.2.11:53"])
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{attempts:?}");
    };
    // Sends with `send` until something arrives at `at`.
    let arrives = |send: &dyn Fn(), at: &std::net::UdpSocket, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            send();
            if arrived(at) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never arrived:\n{}",
                agent.log()
            );
        }
    };
    // Every pod found: nothing is held.
    arrives(
        &stranger_udp,
        &allowed_at,
        "the stranger's datagram, nothing pending",
    );

    // 1. `fresh`: the pod's first process (pause) runs in its namespace before the CNI has
    // moved a veth in. Looking up finds no veth there: looked up again, it keeps the unclaimed
    // veths held, also once the lookup has seen the empty namespace many times.
    let attached = agent.log().matches("TC programs attached").count();
    let fresh_uid = cluster.pod("app", "fresh", "app: web", IpAddr::V4(fresh.ipv4));
    let fresh_cgroup = kubepods.pod(&sandbox, &fresh_uid);
    let mut fresh_pause = pause(&sandbox, &fresh.netns, &fresh_cgroup);
    wait_count(
        &agent,
        "TC programs attached",
        attached + 1,
        "late's and the stranger's veths held while fresh's is not found",
    );
    std::thread::sleep(Duration::from_secs(1));
    stranger_udp();
    assert!(
        !arrived(&allowed_at),
        "a veth no pod claims passed a datagram while fresh's veth was not found"
    );
    frame(&late, &late.cgroup, "192.0.2.11:53");
    assert!(
        !arrived(&allowed_at),
        "a frame left late's veth before its pod was known"
    );
    // The CNI runs: fresh's veth appears, is found through the pause process, and is decided by
    // its policy.
    sandbox.wire_pod(&fresh).expect("CNI");
    arrives(
        &|| frame(&fresh, &fresh_cgroup, "192.0.2.11:53"),
        &allowed_at,
        "fresh's frame to the allowed address",
    );
    frame(&fresh, &fresh_cgroup, "192.0.2.10:53");
    assert!(
        !arrived(&denied_at),
        "fresh's frame to the denied address passed its veth"
    );
    arrives(
        &stranger_udp,
        &allowed_at,
        "the stranger's datagram, all found",
    );

    // 2. `late`: the kubelet makes its cgroup before the watch delivers its Pod, and the
    // runtime's first process in it is still in the node's namespace, setting up the sandbox,
    // while the app's process (a container cgroup below) is already in the pod's.
    cluster.server.hold_watches(true);
    cluster.server.drop_watches();
    // Once the agent's Pod watch waits to reconnect, no Pod reaches it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.server.held_watches().iter().any(|r| r == "pods") {
        assert!(Instant::now() < deadline, "the Pod watch never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let attached = agent.log().matches("TC programs attached").count();
    let late_uid = cluster.pod("app", "late", "app: web", IpAddr::V4(late.ipv4));
    let late_cgroup = kubepods.pod(&sandbox, &late_uid);
    let mut setting_up = pause(&sandbox, &node, &late_cgroup);
    let app = sandbox
        .add_cgroup_below(&late_cgroup, "cri-containerd-app.scope")
        .expect("container cgroup");
    wait_count(
        &agent,
        "TC programs attached",
        attached + 1,
        "late's and the stranger's veths held while a pod cgroup is of no known pod",
    );
    frame(&late, &app, "192.0.2.11:53");
    assert!(
        !arrived(&allowed_at),
        "a frame left late's veth while its Pod was not delivered"
    );
    // The Pod arrives: no hostNetwork pod, but its first process is in the host's namespace,
    // so its veth is still not found.
    let compiled = agent.log().matches("compiled").count();
    cluster.server.hold_watches(false);
    wait_count(&agent, "compiled", compiled, "late's Pod delivered");
    std::thread::sleep(Duration::from_millis(500));
    frame(&late, &app, "192.0.2.11:53");
    assert!(
        !arrived(&allowed_at),
        "a frame left late's veth while its first process was in the host's namespace"
    );
    stranger_udp();
    assert!(
        !arrived(&allowed_at),
        "the stranger's veth is held meanwhile"
    );
    // The sandbox is set up: its process is in the pod's namespace now, the veth is found, and
    // late's frames are decided by its policy.
    let _ = setting_up.kill();
    let _ = setting_up.wait();
    let mut late_pause = pause(&sandbox, &late.netns, &late_cgroup);
    arrives(
        &|| frame(&late, &app, "192.0.2.11:53"),
        &allowed_at,
        "late's frame to the allowed address",
    );
    frame(&late, &app, "192.0.2.10:53");
    assert!(
        !arrived(&denied_at),
        "late's frame to the denied address passed its veth"
    );
    arrives(
        &stranger_udp,
        &allowed_at,
        "the stranger's datagram, all found",
    );

    // 3. `bad`: a Pod that fails validation (two IPv4 addresses) has no model, so its veth is
    // not looked up; while its cgroup exists, it holds the unclaimed veths as an unknown pod's
    // cgroup does, and releases them once its cgroup is gone.
    let attached = agent.log().matches("TC programs attached").count();
    let bad = cluster
        .server
        .seed(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: bad, namespace: app, labels: {{app: web}}}}\n\
             spec: {{nodeName: {NODE}, containers: [{{name: c, image: scratch}}]}}\n\
             status: {{phase: Running, podIP: 198.51.100.98, podIPs: [{{ip: 198.51.100.98}}, {{ip: 198.51.100.99}}]}}\n"
        ))
        .expect("invalid pod");
    let bad_uid = bad[0]["metadata"]["uid"].as_str().expect("uid").to_owned();
    // Its cgroup comes once the Pod is known (rejected), so that it holds nothing as a cgroup of
    // no known pod would.
    agent.wait_log("rejected: Pod app/bad", Duration::from_secs(10));
    let bad_cgroup = kubepods.pod(&sandbox, &bad_uid);
    wait_count(
        &agent,
        "TC programs attached",
        attached,
        "the stranger's veth held while an invalid pod's cgroup exists",
    );
    stranger_udp();
    assert!(
        !arrived(&allowed_at),
        "a veth no pod claims passed a datagram while an invalid pod's cgroup existed:\n{}",
        agent.log()
    );
    std::fs::remove_dir(&bad_cgroup).expect("remove bad's cgroup");
    arrives(
        &stranger_udp,
        &allowed_at,
        "the stranger's datagram, the invalid pod gone",
    );

    // The held frames are counted, and the agent could look every pod up.
    let address = agent.metrics_address();
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = http_get(&address, "/metrics").expect("scrape");
        let pending: f64 = samples(&metrics, "egret_egress_connections_total")
            .filter(|(labels, _)| {
                labels.contains("source_workload=\"pending\"")
                    && labels.contains("verdict=\"blocked\"")
            })
            .map(|(_, v)| v)
            .sum();
        // The stranger's datagrams and late's frames while they were held.
        if pending >= 4.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "pending drops not counted ({pending}):\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.contains("egret_pod_veth_lookup_failing 0"),
        "{metrics}"
    );
    let ready = http_get(&address, "/readyz").expect("readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    for child in [&mut web_pause, &mut fresh_pause, &mut late_pause] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_agent_that_cannot_look_pods_up_says_so_in_readiness_and_metrics() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    enter(sandbox.node_netns());
    let dir = temp_dir(&sandbox, "agent-blind");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    let web_uid = cluster.pod("app", "web", "app: web", IpAddr::V4(web.ipv4));
    let web_cgroup = kubepods.pod(&sandbox, &web_uid);
    let mut web_pause = pause(&sandbox, &web.netns, &web_cgroup);
    let capabilities = manifests::daemonset_capabilities();
    // Each setup mistake, as an agent started with it: the pod spec without hostPID (a pid
    // namespace of its own), or without CAP_SYS_PTRACE (root's processes cannot be opened).
    let without_hostpid = {
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--mount-proc", "--kill-child"])
            .arg(egret_binary());
        command
    };
    let without_ptrace = {
        let caps: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != "sys_ptrace")
            .map(|c| format!("+{c}"))
            .collect();
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", "0", "--inh-caps=-all"])
            .arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .arg(egret_binary());
        command
    };
    for (mistake, command, says) in [
        ("no-hostpid", without_hostpid, "hostPID"),
        ("no-ptrace", without_ptrace, "CAP_SYS_PTRACE"),
    ] {
        let run_dir = dir.join(mistake);
        std::fs::create_dir_all(&run_dir).expect("dir");
        let agent = Agent::spawn(command, &sandbox, &run_dir, &cluster.kubeconfig, &[]);
        let address = agent.metrics_address();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            let ready = http_get(&address, "/readyz").expect("readyz");
            if ready.contains(says) {
                break ready;
            }
            assert!(
                Instant::now() < deadline,
                "{mistake}: /readyz never said why: {ready}\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            ready.starts_with("HTTP/1.1 503") && ready.contains("app/web"),
            "{mistake}: {ready}"
        );
        let metrics = http_get(&address, "/metrics").expect("metrics");
        assert!(
            metrics.contains("egret_pod_veth_lookup_failing 1"),
            "{mistake}: {metrics}"
        );
        assert_eq!(
            agent.log().matches("cannot find pods' veths").count(),
            1,
            "{mistake}: logged once, not at every lookup:\n{}",
            agent.log()
        );
    }
    let _ = web_pause.kill();
    let _ = web_pause.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the agent the way the kubelet would run the DaemonSet's pod: its process in a pod
/// cgroup under `kubepods` from its first instruction.
fn start_in_pod_cgroup(
    sandbox: &Sandbox,
    dir: &Path,
    kubeconfig: &Path,
    cgroup: &Path,
    args: &[&str],
) -> Agent {
    use std::os::unix::process::CommandExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("cgroup.procs");
    let mut command = Command::new(egret_binary());
    // SAFETY: only an async-signal-safe write(2) of "0" to an already open file between fork
    // and exec.
    unsafe {
        command.pre_exec(move || {
            use std::io::Write as _;
            (&file).write_all(b"0")
        });
    }
    Agent::spawn(command, sandbox, dir, kubeconfig, args)
}

#[test]
fn a_strict_cluster_never_locks_the_agent_out_even_across_a_rolling_update() {
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let dir = temp_dir(&sandbox, "agent-strict");
    let cluster = Cluster::start(&dir);
    let kubepods = Kubepods::new(&sandbox);
    // Fail closed everywhere: unknown pods denied, and whatever no policy allows.
    let strict = ["--unknown-pods", "deny", "--baseline", "deny"];
    for round in 0..2 {
        // The DaemonSet's pod: hostNetwork, in egret-system, a new pod (uid, cgroup) each time.
        let uid = cluster.pod(
            "egret-system",
            &format!("egret-{round}"),
            "app: egret",
            "127.0.0.1".parse().expect("ip"),
        );
        let own = kubepods.pod(&sandbox, &uid);
        let round_dir = dir.join(format!("round-{round}"));
        std::fs::create_dir_all(&round_dir).expect("dir");
        let agent = start_in_pod_cgroup(&sandbox, &round_dir, &cluster.kubeconfig, &own, &strict);
        // Ready means every watch listed through the API and policy was written: the second
        // agent starts under the first one's pinned guards and deny baseline.
        let address = agent.metrics_address();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(&address, "/readyz")
            .expect("readyz")
            .starts_with("HTTP/1.1 200")
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the agent never became ready:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            agent.log().contains("own pod cgroup is never enforced"),
            "{}",
            agent.log()
        );
        // It keeps talking to the API: a new policy still reaches it.
        cluster.apply(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: probe-{round}, namespace: egret-system}}\n\
             spec: {{podSelector: {{}}, policyTypes: [Egress]}}\n"
        ));
        let watched = || {
            samples(
                &http_get(&address, "/metrics").expect("metrics"),
                "egret_watched_objects",
            )
            .filter(|(labels, _)| labels.contains("kind=\"NetworkPolicy\""))
            .map(|(_, v)| v)
            .sum::<f64>()
        };
        // The watch counts are reported every 5 seconds.
        let deadline = Instant::now() + Duration::from_secs(15);
        while watched() < f64::from(round + 1) {
            assert!(
                Instant::now() < deadline,
                "round {round}: the agent's watch stopped: {} NetworkPolicies\n{}",
                watched(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // SIGKILL: the next round's agent is a new pod.
        drop(agent);
    }
    assert_rbac_grants(&cluster.server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether any datagram arrived at `at` since the last call (drains what did).
fn arrived(at: &std::net::UdpSocket) -> bool {
    let mut any = false;
    while at.recv(&mut [0u8; 64]).is_ok() {
        any = true;
    }
    any
}
