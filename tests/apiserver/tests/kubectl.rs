//! The real `kubectl` (Debian's package, installed by `cargo xtask setup`) against the test
//! API server: apply, get with selectors, label, patch, status, watch, a three-way apply, a
//! stale replace and delete, with the stored objects checked after each step.

#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use egret_test_apiserver::{ApiServer, Config};
use serde_json::Value;

/// kubectl pointed at one server, with a discovery cache of its own.
struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env_remove("KUBECONFIG");
        c
    }

    /// Runs kubectl and returns stdout; panics with stderr when it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .expect("kubectl runs (installed by `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl expecting failure; returns stderr.
    fn fail(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("kubectl runs");
        assert!(!out.status.success(), "kubectl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn apply(&self, dir: &Path, file: &str, yaml: &str) -> String {
        let path = dir.join(file);
        std::fs::write(&path, yaml).expect("write manifest");
        self.run(&["apply", "-f", path.to_str().expect("utf-8 path")])
    }

    fn names(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        let list: Value = serde_json::from_str(&self.run(&all)).expect("kubectl prints JSON");
        list["items"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|i| {
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }
}

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web, tier: front, v: "1"}
spec:
  nodeName: node-a
  containers:
  - {name: app, image: "web:1"}
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api}
spec:
  nodeName: node-b
  containers:
  - {name: app, image: "api:1"}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#;

const EGRESS_POLICY: &str = r#"
apiVersion: egret.dev/v1alpha1
kind: EgressPolicy
metadata: {name: block-metadata}
spec:
  priority: 10
  subject: {podSelector: {}}
  rules:
  - name: metadata
    action: Deny
    to: [{networks: [192.0.2.254/32]}]
"#;

fn server() -> (ApiServer, tempfile::TempDir, Kubectl) {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let server = ApiServer::start(listen, Config::default()).expect("server starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let kubectl = Kubectl {
        kubeconfig,
        cache: dir.path().join("cache"),
    };
    (server, dir, kubectl)
}

fn crd_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/crds/egresspolicy.yaml")
}

#[test]
fn kubectl_apply_get_label_patch_delete() {
    let (server, dir, kubectl) = server();
    let pod = |name: &str| server.object("", "pods", "shop", name);

    // apply -f: namespace, pods, a NetworkPolicy.
    kubectl.apply(dir.path(), "workloads.yaml", WORKLOADS);
    let ns = server
        .object("", "namespaces", "", "shop")
        .expect("namespace stored");
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "shop"
    );
    let web = pod("web").expect("pod stored");
    assert_eq!(web["metadata"]["labels"]["tier"], "front");
    assert_eq!(web["spec"]["containers"][0]["image"], "web:1");
    assert!(web["metadata"]["uid"].is_string());
    assert!(
        server
            .object(
                "networking.k8s.io",
                "networkpolicies",
                "shop",
                "default-deny"
            )
            .is_some()
    );

    // The CRD, then a custom resource of it: the CRD makes the kind served.
    kubectl.run(&["apply", "-f", crd_path().to_str().expect("utf-8 path")]);
    kubectl.apply(dir.path(), "egp.yaml", EGRESS_POLICY);
    let egp = server
        .object("egret.dev", "egresspolicies", "", "block-metadata")
        .expect("EgressPolicy stored");
    assert_eq!(egp["spec"]["priority"], 10);
    assert_eq!(egp["metadata"]["generation"], 1);
    assert!(egp["metadata"].get("namespace").is_none(), "cluster-scoped");
    assert_eq!(kubectl.names(&["egp"]), ["block-metadata"]);
    assert_eq!(egp["spec"]["mode"], "Enforce", "the CRD schema's default");

    // The CRD schema: kubectl's fieldValidation=Strict refuses unknown fields, --validate=false
    // prunes them, and values outside the schema are 422 with the fields named.
    let unknown = EGRESS_POLICY
        .replace("block-metadata", "unknown-field")
        .replace("priority: 10", "priority: 10\n  surprise: 1");
    let path = dir.path().join("unknown.yaml");
    std::fs::write(&path, &unknown).expect("write");
    let path = path.to_str().expect("utf-8 path");
    let err = kubectl.fail(&["apply", "-f", path]);
    assert!(
        err.contains(r#"strict decoding error: unknown field "spec.surprise""#),
        "{err}"
    );
    kubectl.run(&["apply", "--validate=false", "-f", path]);
    let pruned = server
        .object("egret.dev", "egresspolicies", "", "unknown-field")
        .expect("stored without the unknown field");
    assert!(pruned["spec"].get("surprise").is_none(), "{pruned}");
    kubectl.run(&["delete", "egp", "unknown-field"]);
    let invalid = EGRESS_POLICY
        .replace("block-metadata", "invalid")
        .replace("priority: 10", "priority: 5000\n  mode: Loud");
    std::fs::write(dir.path().join("invalid.yaml"), invalid).expect("write");
    let err = kubectl.fail(&[
        "apply",
        "-f",
        dir.path()
            .join("invalid.yaml")
            .to_str()
            .expect("utf-8 path"),
    ]);
    assert!(
        err.contains(r#"The EgressPolicy "invalid" is invalid"#),
        "{err}"
    );
    assert!(
        err.contains(r#"spec.mode: Unsupported value: "Loud""#),
        "{err}"
    );
    assert!(err.contains("spec.priority: Invalid value: 5000"), "{err}");
    assert!(
        server
            .object("egret.dev", "egresspolicies", "", "invalid")
            .is_none()
    );
    // The rule list is a list map keyed by name, and names are DNS labels.
    let duplicate = EGRESS_POLICY.replace("block-metadata", "duplicate").replace(
        "  - name: metadata\n",
        "  - name: Metadata\n    action: Deny\n    to: [{networks: [192.0.2.1/32]}]\n  - name: metadata\n    action: Deny\n    to: [{networks: [192.0.2.2/32]}]\n  - name: metadata\n",
    );
    std::fs::write(dir.path().join("duplicate.yaml"), duplicate).expect("write");
    let err = kubectl.fail(&[
        "apply",
        "-f",
        dir.path()
            .join("duplicate.yaml")
            .to_str()
            .expect("utf-8 path"),
    ]);
    assert!(
        err.contains(r#"spec.rules[2]: Duplicate value: {"name":"metadata"}"#),
        "{err}"
    );
    assert!(
        err.contains(r#"spec.rules[0].name: Invalid value: "Metadata""#),
        "{err}"
    );

    // get with label and field selectors.
    assert_eq!(
        kubectl.names(&["pods", "-n", "shop", "-l", "app=web"]),
        ["web"]
    );
    assert_eq!(
        kubectl.names(&["pods", "-A", "-l", "app in (web,api)"]),
        ["api", "web"]
    );
    assert_eq!(kubectl.names(&["pods", "-A", "-l", "!tier"]), ["api"]);
    assert_eq!(kubectl.names(&["pods", "-A", "-l", "app!=web"]), ["api"]);
    assert_eq!(
        kubectl.names(&["pods", "-A", "--field-selector", "spec.nodeName=node-b"]),
        ["api"]
    );
    assert_eq!(
        kubectl.names(&[
            "pods",
            "-A",
            "--field-selector",
            "metadata.name=web,metadata.namespace=shop"
        ]),
        ["web"]
    );
    // Tables, as kubectl prints them: the pods' phase, the CRD's printer columns.
    let table = kubectl.run(&["get", "pods", "-n", "shop"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "STATUS", "AGE"], "{table}");
    assert_eq!(rows[1][..2], ["api", "Pending"], "{table}");
    assert_eq!(rows[2][..2], ["web", "Pending"], "{table}");
    let table = kubectl.run(&["get", "egp"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["NAME", "PRIORITY", "MODE"],
            vec!["block-metadata", "10", "Enforce"]
        ]
    );

    // label (a merge patch from kubectl).
    kubectl.run(&["label", "pod", "web", "-n", "shop", "team=payments"]);
    kubectl.run(&["label", "pod", "api", "-n", "shop", "tier=back"]);
    assert_eq!(
        pod("web").expect("web")["metadata"]["labels"]["team"],
        "payments"
    );
    assert_eq!(kubectl.names(&["pods", "-A", "-l", "tier=back"]), ["api"]);
    let requests = server.requests();
    let label = requests
        .iter()
        .rfind(|r| r.verb == "patch")
        .expect("label is logged as a patch");
    assert_eq!(
        (
            label.resource.as_str(),
            label.namespace.as_str(),
            label.name.as_str()
        ),
        ("pods", "shop", "api")
    );
    assert!(label.user_agent.starts_with("kubectl"), "{label:?}");

    // patch: strategic (containers merge by name) and merge.
    let before = pod("web").expect("web");
    kubectl.run(&[
        "patch",
        "pod",
        "web",
        "-n",
        "shop",
        "-p",
        r#"{"spec":{"containers":[{"name":"sidecar","image":"side:1"}]}}"#,
    ]);
    let web = pod("web").expect("web");
    let containers: Vec<&str> = web["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        containers,
        ["app", "sidecar"],
        "strategic merge kept the first container"
    );
    assert!(
        web["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            > before["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
    );
    kubectl.run(&[
        "patch",
        "egp",
        "block-metadata",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"priority":5}}"#,
    ]);
    let egp = server
        .object("egret.dev", "egresspolicies", "", "block-metadata")
        .expect("egp");
    assert_eq!(egp["spec"]["priority"], 5);
    assert_eq!(
        egp["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );
    kubectl.run(&[
        "patch",
        "egp",
        "block-metadata",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/priority","value":7}]"#,
    ]);
    assert_eq!(
        server
            .object("egret.dev", "egresspolicies", "", "block-metadata")
            .expect("egp")["spec"]["priority"],
        7
    );

    // The status subresource: only status changes, the generation stays.
    kubectl.run(&[
        "patch", "egp", "block-metadata", "--subresource=status", "--type", "merge", "-p",
        r#"{"status":{"conditions":[{"type":"Accepted","status":"True","reason":"Valid","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z","observedGeneration":3}]},"spec":{"priority":99}}"#,
    ]);
    let egp = server
        .object("egret.dev", "egresspolicies", "", "block-metadata")
        .expect("egp");
    assert_eq!(egp["status"]["conditions"][0]["type"], "Accepted");
    assert_eq!(
        egp["spec"]["priority"], 7,
        "a status write changed the spec"
    );
    assert_eq!(egp["metadata"]["generation"], 3);
    kubectl.run(&[
        "patch",
        "egp",
        "block-metadata",
        "--type",
        "merge",
        "-p",
        r#"{"status":null}"#,
    ]);
    let egp = server
        .object("egret.dev", "egresspolicies", "", "block-metadata")
        .expect("egp");
    assert_eq!(
        egp["status"]["conditions"][0]["type"], "Accepted",
        "a main write changed the status"
    );

    // apply of a changed object: a three-way merge keeps what others set (the label `team`),
    // drops what the last apply set and this one does not (`v`), changes the image.
    kubectl.apply(
        dir.path(),
        "workloads.yaml",
        &WORKLOADS
            .replace(
                r#"labels: {app: web, tier: front, v: "1"}"#,
                "labels: {app: web, tier: front}",
            )
            .replace("web:1", "web:2"),
    );
    let web = pod("web").expect("web");
    let labels = &web["metadata"]["labels"];
    assert_eq!(labels["team"], "payments");
    assert!(labels.get("v").is_none(), "{labels}");
    assert_eq!(web["spec"]["containers"][0]["image"], "web:2");
    assert_eq!(web["spec"]["containers"][1]["name"], "sidecar");

    // replace with a stale resourceVersion: 409 Conflict.
    let stale = dir.path().join("stale.json");
    std::fs::write(&stale, serde_json::to_vec(&before).expect("json")).expect("write");
    let err = kubectl.fail(&["replace", "-f", stale.to_str().expect("utf-8 path")]);
    assert!(err.contains("the object has been modified"), "{err}");

    // delete: one pod, then the namespace with everything in it, then the custom resource.
    kubectl.run(&["delete", "pod", "api", "-n", "shop"]);
    assert!(pod("api").is_none());
    let err = kubectl.fail(&["get", "pod", "api", "-n", "shop"]);
    assert!(
        err.contains("NotFound") && err.contains(r#"pods "api" not found"#),
        "{err}"
    );
    kubectl.run(&["delete", "namespace", "shop"]);
    assert!(pod("web").is_none());
    assert!(
        server
            .object(
                "networking.k8s.io",
                "networkpolicies",
                "shop",
                "default-deny"
            )
            .is_none()
    );
    kubectl.run(&["delete", "egp", "block-metadata"]);
    assert!(server.objects("egret.dev", "egresspolicies").is_empty());
}

/// Lines a child process prints, read on a thread so the test can wait with a deadline.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line == want;
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("kubectl --watch never printed {want:?}; printed {seen:?}");
}

fn wait_for_watch(server: &ApiServer, resource: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if server
            .requests()
            .iter()
            .any(|r| r.verb == "watch" && r.resource == resource)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("kubectl never started watching {resource}");
}

#[test]
fn kubectl_watch_sees_changes() {
    let (server, dir, kubectl) = server();
    kubectl.apply(dir.path(), "workloads.yaml", WORKLOADS);
    let template = "jsonpath={.metadata.name} {.metadata.labels.tier}{\"\\n\"}";

    // --watch: the current state first, then changes.
    let mut watch = kubectl
        .command()
        .args([
            "get", "pods", "-n", "shop", "-l", "app=web", "--watch", "-o", template,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    let rx = lines(&mut watch);
    let seen = wait_for(&rx, "web front");
    assert_eq!(seen, ["web front"]);
    wait_for_watch(&server, "pods");
    kubectl.run(&[
        "label",
        "pod",
        "web",
        "-n",
        "shop",
        "tier=back",
        "--overwrite",
    ]);
    wait_for(&rx, "web back");
    // A change to a pod the selector does not match is not seen.
    kubectl.run(&["label", "pod", "api", "-n", "shop", "tier=api"]);
    kubectl.run(&[
        "label",
        "pod",
        "web",
        "-n",
        "shop",
        "tier=mid",
        "--overwrite",
    ]);
    let seen = wait_for(&rx, "web mid");
    assert_eq!(seen, ["web mid"]);
    watch.kill().expect("kill kubectl");
    let _ = watch.wait();

    // --watch-only on a custom resource: no initial state, then the change.
    kubectl.run(&["apply", "-f", crd_path().to_str().expect("utf-8 path")]);
    kubectl.apply(dir.path(), "egp.yaml", EGRESS_POLICY);
    server.clear_requests();
    let mut watch = kubectl
        .command()
        .args([
            "get",
            "egp",
            "--watch-only",
            "-o",
            "jsonpath={.metadata.name} {.spec.priority}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    let rx = lines(&mut watch);
    wait_for_watch(&server, "egresspolicies");
    kubectl.apply(
        dir.path(),
        "egp.yaml",
        &EGRESS_POLICY.replace("priority: 10", "priority: 20"),
    );
    let seen = wait_for(&rx, "block-metadata 20");
    assert_eq!(
        seen,
        ["block-metadata 20"],
        "--watch-only printed the initial state"
    );
    kubectl.run(&["delete", "egp", "block-metadata"]);
    wait_for(&rx, "block-metadata 20");
    watch.kill().expect("kill kubectl");
    let _ = watch.wait();
}

#[test]
fn kubectl_server_side_apply() {
    let (server, dir, kubectl) = server();
    let config = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: default}}\ndata: {data}\n"
        )
    };
    let path = dir.path().join("cm.yaml");
    let path_str = path.to_str().expect("utf-8 path");
    std::fs::write(&path, config("{a: '1', b: '2'}")).expect("write");
    let out = kubectl.run(&["apply", "--server-side", "-f", path_str]);
    assert!(out.contains("serverside-applied"), "{out}");
    let cm = server
        .object("", "configmaps", "default", "settings")
        .expect("stored");
    assert_eq!(cm["data"], serde_json::json!({"a": "1", "b": "2"}));
    std::fs::write(&path, config("{a: '3'}")).expect("write");
    kubectl.run(&["apply", "--server-side", "-f", path_str]);
    let cm = server
        .object("", "configmaps", "default", "settings")
        .expect("stored");
    assert_eq!(
        cm["data"],
        serde_json::json!({"a": "3"}),
        "b is no longer applied"
    );
    let apply = server
        .requests()
        .into_iter()
        .rfind(|r| r.verb == "patch")
        .expect("apply is a patch");
    assert!(apply.query.contains("fieldManager=kubectl"), "{apply:?}");
}
