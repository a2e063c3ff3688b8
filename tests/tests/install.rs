//! Installing egret on a cluster: the kustomize manifests build offline and every document is
//! what its type says; the example EgressPolicies pass the CRD's schema as the API server applies
//! it; the RBAC stays inside what the agent may need; and the DaemonSet's capabilities are
//! enough for egret to enforce, each of them needed. (That the RBAC grants every call the agent
//! makes is checked where the calls are made: `tests/tests/agent.rs`.)
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egret_test_apiserver::{ApiServer, Config};
use egret_tests::{
    manifests::{self, Grant},
    probe::{Outcome, egret_binary},
    sandbox::Sandbox,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Deserializes `doc` into `T` and back: every field the document sets must survive, so a
/// misspelt or misplaced field (which serde would silently drop) fails.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let parsed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    missing(doc, &back, String::new(), &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fields the type does not have: {}",
            lost.join(", ")
        ))
    }
}

fn missing(doc: &Value, back: &Value, at: String, out: &mut Vec<String>) {
    match (doc, back) {
        (Value::Object(d), Value::Object(b)) => {
            for (k, v) in d {
                match b.get(k) {
                    Some(bv) => missing(v, bv, format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k}")),
                }
            }
        }
        (Value::Array(d), Value::Array(b)) => {
            for (i, (dv, bv)) in d.iter().zip(b).enumerate() {
                missing(dv, bv, format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn parse_as_its_type(doc: &Value) -> Result<(), String> {
    use k8s_openapi::{
        api::{
            apps::v1::DaemonSet,
            core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
            rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
        },
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
        (Some("v1"), Some("Namespace")) => typed::<Namespace>(doc),
        (Some("v1"), Some("ServiceAccount")) => typed::<ServiceAccount>(doc),
        (Some("v1"), Some("Service")) => typed::<Service>(doc),
        (Some("v1"), Some("ConfigMap")) => typed::<ConfigMap>(doc),
        (Some("apps/v1"), Some("DaemonSet")) => typed::<DaemonSet>(doc),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => typed::<ClusterRole>(doc),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
            typed::<ClusterRoleBinding>(doc)
        }
        (Some("rbac.authorization.k8s.io/v1"), Some("Role")) => typed::<Role>(doc),
        (Some("rbac.authorization.k8s.io/v1"), Some("RoleBinding")) => typed::<RoleBinding>(doc),
        (Some("apiextensions.k8s.io/v1"), Some("CustomResourceDefinition")) => {
            typed::<CustomResourceDefinition>(doc)
        }
        // The Prometheus Operator's kinds have no Rust type here: their shape is checked below
        // and the rules by promtool (agent/tests/alerts.rs).
        (Some("monitoring.coreos.com/v1"), Some("ServiceMonitor" | "PrometheusRule")) => Ok(()),
        (api, kind) => Err(format!("unexpected document {api:?} {kind:?}")),
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the build"))
}

fn agent_args(docs: &[Value]) -> Vec<String> {
    find(docs, "DaemonSet", "egret")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_variant_builds_offline_and_every_document_parses_into_its_type() {
    for variant in ["", "overlays/strict", "overlays/monitoring"] {
        let docs = manifests::build(variant).unwrap_or_else(|e| panic!("{e}"));
        for doc in &docs {
            if let Err(e) = parse_as_its_type(doc) {
                panic!(
                    "manifests/{variant}: {} {}: {e}",
                    doc["kind"], doc["metadata"]["name"]
                );
            }
        }
        let operator = docs
            .iter()
            .filter(|d| d["apiVersion"] == "monitoring.coreos.com/v1")
            .count();
        if variant == "overlays/monitoring" {
            assert_eq!(operator, 2, "ServiceMonitor and PrometheusRule");
            let dashboard = find(&docs, "ConfigMap", "egret-dashboard");
            let json = dashboard["data"]["egret-dashboard.json"]
                .as_str()
                .expect("dashboard");
            let json: Value = serde_json::from_str(json).expect("the dashboard is JSON");
            assert!(json["panels"].is_array());
            let monitor = find(&docs, "ServiceMonitor", "egret");
            let service = find(&docs, "Service", "egret-metrics");
            assert_eq!(
                monitor["spec"]["endpoints"][0]["port"],
                service["spec"]["ports"][0]["name"]
            );
        } else {
            assert_eq!(
                operator, 0,
                "manifests/{variant} must apply without the Prometheus Operator's CRDs"
            );
        }
        let args = agent_args(&docs);
        let strict = variant == "overlays/strict";
        for flag in ["--unknown-pods=deny", "--baseline=deny"] {
            assert_eq!(
                args.iter().any(|a| a == flag),
                strict,
                "{variant}: {args:?}"
            );
        }
    }
}

#[test]
fn the_cleanup_builds_detaches_on_every_node_and_needs_no_api_access() {
    let docs = manifests::build("cleanup").unwrap_or_else(|e| panic!("{e}"));
    for doc in &docs {
        if let Err(e) = parse_as_its_type(doc) {
            panic!(
                "manifests/cleanup: {} {}: {e}",
                doc["kind"], doc["metadata"]["name"]
            );
        }
    }
    let ds = find(&docs, "DaemonSet", "egret-cleanup");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(pod["tolerations"][0]["operator"] == "Exists");
    let args = |k: &str| -> Vec<String> {
        pod[k][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    };
    assert!(args("initContainers").contains(&"detach".to_owned()));
    assert!(args("containers").contains(&"--wait".to_owned()));
    assert_eq!(
        pod["containers"][0]["image"]
            .as_str()
            .and_then(|i| i.rsplit(':').next()),
        Some(egret::VERSION)
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str().is_some_and(|k| k.contains("Role"))),
        "the cleanup needs no RBAC"
    );
}

#[test]
fn the_daemonset_runs_everywhere_unprivileged_with_probes_and_the_crate_version() {
    let docs = manifests::build("").unwrap_or_else(|e| panic!("{e}"));
    let ds = find(&docs, "DaemonSet", "egret");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"]
            .as_str()
            .and_then(|i| i.rsplit(':').next()),
        Some(egret::VERSION),
        "the image is the crate's version"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let env = container["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf"), "{mounts:?}");
}

/// What the agent may be granted at most: read on what it watches; create/update/patch only on
/// its Lease, Events and the EgressPolicy status subresource.
fn within_envelope(grant: &Grant) -> Result<(), String> {
    const WATCHED: [(&str, &str); 6] = [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("networking.k8s.io", "networkpolicies"),
        ("discovery.k8s.io", "endpointslices"),
        ("egret.dev", "egresspolicies"),
    ];
    const WRITTEN: [(&str, &str); 3] = [
        ("coordination.k8s.io", "leases"),
        ("events.k8s.io", "events"),
        ("egret.dev", "egresspolicies/status"),
    ];
    for group in &grant.groups {
        for resource in &grant.resources {
            for verb in &grant.verbs {
                if [group, resource, verb].iter().any(|s| s.contains('*')) {
                    return Err(format!("wildcard in {}", grant.role));
                }
                let key = (group.as_str(), resource.as_str());
                let ok = match verb.as_str() {
                    "get" | "list" | "watch" => {
                        WATCHED.contains(&key) || (WRITTEN.contains(&key) && verb == "get")
                    }
                    "create" | "update" | "patch" => WRITTEN.contains(&key),
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "{} grants {verb} on {group:?} {resource}",
                        grant.role
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_rbac_grants_nothing_beyond_what_the_agent_may_need() {
    for variant in ["", "overlays/strict", "overlays/monitoring"] {
        let docs = manifests::build(variant).unwrap_or_else(|e| panic!("{e}"));
        let grants = manifests::grants(&docs, "egret-system", "egret");
        assert!(grants.len() >= 5, "{grants:?}");
        for grant in &grants {
            if let Err(e) = within_envelope(grant) {
                panic!("manifests/{variant}: {e}");
            }
        }
        // Nothing else in the build is bound to anyone.
        let bindings = docs
            .iter()
            .filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
            .count();
        assert_eq!(bindings, 3, "manifests/{variant}");
    }
    // The envelope check itself fails on what it must refuse.
    let bad = |groups: &[&str], resources: &[&str], verbs: &[&str]| Grant {
        namespace: None,
        role: "bad".into(),
        groups: groups.iter().map(|s| (*s).to_owned()).collect(),
        resources: resources.iter().map(|s| (*s).to_owned()).collect(),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        names: Vec::new(),
    };
    for grant in [
        bad(&[""], &["secrets"], &["get"]),
        bad(&[""], &["pods"], &["patch"]),
        bad(&["egret.dev"], &["egresspolicies"], &["update"]),
        bad(&["networking.k8s.io"], &["networkpolicies"], &["delete"]),
        bad(&["*"], &["pods"], &["list"]),
    ] {
        assert!(within_envelope(&grant).is_err(), "{grant:?}");
    }
}

/// The test API server, with a kubeconfig for it in `dir`.
fn api_server(dir: &Path) -> (ApiServer, std::path::PathBuf) {
    let server = ApiServer::start("127.0.0.1:0".parse().expect("addr"), Config::default())
        .expect("test API server");
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (server, kubeconfig)
}

/// `kubectl` against `kubeconfig`, as an operator runs it.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl (`cargo xtask setup` installs it)")
}

#[test]
fn every_example_egress_policy_passes_the_crd_schema_as_the_api_server_applies_it() {
    let dir = std::env::temp_dir().join(format!("egret-install-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (server, kubeconfig) = api_server(&dir);
    let apply = |file: &Path| {
        kubectl(
            &kubeconfig,
            &[
                "apply",
                "--validate=strict",
                "-f",
                file.to_str().expect("utf-8"),
            ],
        )
    };
    let crd = manifests::dir().join("crds/egresspolicy.yaml");
    let out = apply(&crd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut examples = Vec::new();
    let mut stack = vec![manifests::dir().join("examples")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("examples").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .contains("kind: EgressPolicy")
            {
                examples.push(path);
            }
        }
    }
    assert!(!examples.is_empty(), "no example EgressPolicy found");
    for example in &examples {
        // Only the EgressPolicies: the examples also hold Namespaces of local mode.
        let text = std::fs::read_to_string(example).expect("read");
        let docs: Vec<&str> = text
            .split("\n---")
            .filter(|d| d.contains("kind: EgressPolicy"))
            .collect();
        let only = dir.join("egress.yaml");
        std::fs::write(&only, docs.join("\n---\n")).expect("write");
        let out = apply(&only);
        assert!(
            out.status.success(),
            "{}: {}",
            example.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        server.objects("egret.dev", "egresspolicies").len() >= examples.len(),
        "every example stored"
    );
    // The same check refuses a field the schema does not have.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: bad}\n\
         spec: {priority: 10, subject: {podSelector: {}}, rules: [], extra: 1}\n",
    )
    .expect("write");
    let out = apply(&bad);
    assert!(!out.status.success(), "an unknown field must be refused");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the cleanup DaemonSet's containers add to their capabilities (all of them dropped).
fn cleanup_capabilities() -> Vec<String> {
    let docs = manifests::build("cleanup").unwrap_or_else(|e| panic!("{e}"));
    let spec = &find(&docs, "DaemonSet", "egret-cleanup")["spec"]["template"]["spec"];
    let mut caps = Vec::new();
    for container in ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
    {
        let security = &container["securityContext"];
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(security["privileged"], false);
        caps.extend(
            security["capabilities"]["add"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned)),
        );
    }
    caps
}

/// Runs `egret run` with only `caps` in its bounding set (as root, like the container); returns
/// whether it came to enforce, and its log.
fn run_with_capabilities(sandbox: &Sandbox, dir: &Path, caps: &[String]) -> (bool, String) {
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let log = dir.join(format!("egret-{}.log", caps.join("-")));
    let mut child = Command::new("setpriv")
        .args(["--reuid", "0", "--inh-caps=-all"])
        .arg(format!("--bounding-set={bounding}"))
        .arg(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .args(["run", "--report-interval", "0", "--cgroup"])
        .arg(sandbox.cgroup())
        .arg("--config")
        .arg(dir.join("egret.yaml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("setpriv (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(20);
    let enforced = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("policy enforced") {
            break true;
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    (enforced, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn the_daemonsets_capabilities_are_enough_to_enforce_and_each_is_needed() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let _host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("addr")])
        .expect("host");
    let dir = std::env::temp_dir().join(format!("{}-install-caps", sandbox.id()));
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nworkloads:\n- {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n",
            web.cgroup.display()
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("policies/deny.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: shop}\n\
         spec: {podSelector: {}, policyTypes: [Egress]}\n",
    )
    .expect("policy");
    let all = manifests::daemonset_capabilities();
    assert_eq!(
        all,
        ["bpf", "perfmon", "net_admin", "sys_admin", "sys_ptrace"],
        "the set these tests prove"
    );
    // What enforcing needs; the other two are the agent's veth lookup (agent.rs runs `egret
    // agent` with all five).
    let caps: Vec<String> = all[..3].to_vec();
    assert_eq!(
        caps,
        ["bpf", "perfmon", "net_admin"],
        "the set this test proves"
    );

    let (enforced, log) = run_with_capabilities(&sandbox, &dir, &caps);
    assert!(enforced, "egret with {caps:?} never enforced:\n{log}");
    // Enforcing for real: the pod's connection is refused by policy, in the kernel.
    let outcome = sandbox
        .probe(
            &web,
            None,
            &["connect", "192.0.2.10:80", "--timeout-ms", "500"],
        )
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt");
    assert_eq!(outcome, Outcome::Denied, "with {caps:?}");

    // Uninstall as the cleanup DaemonSet does it: `egret detach` with no capability at all
    // removes the pins, and with the last reference gone the kernel detaches the programs.
    let cleanup = cleanup_capabilities();
    assert!(cleanup.is_empty(), "the cleanup asks for {cleanup:?}");
    let out = Command::new("setpriv")
        .args(["--reuid", "0", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .arg("detach")
        .output()
        .expect("detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sandbox.pin_dir().exists(), "pins left behind");
    let outcome = sandbox
        .probe(
            &web,
            None,
            &["connect", "192.0.2.10:80", "--timeout-ms", "500"],
        )
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt");
    assert_ne!(outcome, Outcome::Denied, "still enforced after the cleanup");
    // The cleanup pod's main container: detaches (nothing left), then stays until SIGTERM.
    let mut waiting = Command::new(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .args(["detach", "--wait"])
        .spawn()
        .expect("detach --wait");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().expect("wait").is_none(),
        "detach --wait exited by itself"
    );
    let pid = libc::pid_t::try_from(waiting.id()).expect("pid");
    // SAFETY: plain syscall on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(
        waiting.wait().expect("wait").success(),
        "SIGTERM ends it cleanly"
    );

    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| c != &missing).cloned().collect();
        let (enforced, log) = run_with_capabilities(&sandbox, &dir, &fewer);
        assert!(
            !enforced,
            "egret enforced without {missing}: the DaemonSet asks for too much"
        );
        assert!(
            log.contains("denied") || log.contains("not permitted"),
            "without {missing}, egret says why:\n{log}"
        );
        let _ = Command::new(egret_binary())
            .arg("--pin-dir")
            .arg(sandbox.pin_dir())
            .arg("detach")
            .output();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_readme_install_works_against_the_test_api_server() {
    // The README's "Install on a cluster", where no real cluster is needed: the manifests and a
    // first policy applied with kubectl, an agent on this machine enforcing them.
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let dir = std::env::temp_dir().join(format!("{}-install-readme", sandbox.id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (_server, kubeconfig) = api_server(&dir);
    let kubectl = |args: &[&str]| {
        let out = kubectl(&kubeconfig, args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let manifests_dir = manifests::dir();
    let applied = kubectl(&["apply", "-k", manifests_dir.to_str().expect("utf-8")]);
    for created in [
        "customresourcedefinition.apiextensions.k8s.io/egresspolicies.egret.dev",
        "clusterrole.rbac.authorization.k8s.io/egret",
        "daemonset.apps/egret",
    ] {
        assert!(applied.contains(created), "{applied}");
    }
    let policy = manifests_dir.join("examples/local/policies/block-metadata.yaml");
    kubectl(&["apply", "-f", policy.to_str().expect("utf-8")]);

    let log = dir.join("agent.log");
    let mut agent = Command::new(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .arg("agent")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", "node-1", "--metrics-addr", "127.0.0.1:0"])
        .arg("--cgroup")
        .arg(sandbox.cgroup())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("egret agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = kubectl(&[
            "get",
            "egresspolicy",
            "block-metadata",
            "-o",
            "jsonpath={.status.conditions[0].type}={.status.conditions[0].status}",
        ]);
        if status == "Accepted=True" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status, "Accepted=True", "{text}");
    let address = egret_tests::agent::metrics_address_in(&text).expect("metrics address");
    let metrics = egret_tests::agent::http_get(&address, "/metrics").expect("metrics");
    assert!(metrics.contains("egret_watched_objects"), "{metrics}");
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
