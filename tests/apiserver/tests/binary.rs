//! The `egret-test-apiserver` binary: `--seed`, `--kubeconfig-out`, and the HTTP test hooks
//! (`/egret-test/requests`, `compact`, `drop-watches`) the agent's end-to-end tests drive,
//! with watch timeouts and the metadata-only and table views checked over raw HTTP.

#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

/// The server process; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_egret-test-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(dir.join("kubeconfig"))
        .arg("--seed")
        .arg(dir.join("seed"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server prints its URL");
    let addr = line
        .trim()
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a URL: {line:?}"));
    Server { child, addr }
}

/// One HTTP/1.1 request; returns status and body (de-chunked).
fn http(addr: SocketAddr, method: &str, path: &str, accept: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nUser-Agent: binary-test\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("response ends");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || tail.len() < size {
                break;
            }
            out.push_str(&tail[..size]);
            rest = tail[size..].strip_prefix("\r\n").unwrap_or(&tail[size..]);
        }
        out
    } else {
        body.to_owned()
    };
    (code, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const SEED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: app, image: web}]}
status: {phase: Running, podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
"#;

#[test]
fn binary_seeds_writes_a_kubeconfig_and_serves_the_test_hooks() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("seed")).expect("seed dir");
    std::fs::write(dir.path().join("seed/workloads.yaml"), SEED).expect("seed file");
    let server = start(dir.path());
    let addr = server.addr;

    // kubectl through the written kubeconfig sees the seeded pod, status included.
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(dir.path().join("kubeconfig"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["get", "pod", "web", "-n", "shop", "-o", "json"])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(pod["status"]["podIP"], "10.1.0.5");
    assert_eq!(pod["spec"]["nodeName"], "node-a");
    let rv: u64 = pod["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("version");

    // The request log over HTTP.
    let (code, body) = http(addr, "GET", "/egret-test/requests", "application/json");
    assert_eq!(code, 200);
    let log = json(&body);
    let get = log
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["verb"] == "get" && r["resource"] == "pods")
        .expect("kubectl's get is logged");
    assert_eq!(get["namespace"], "shop");
    assert_eq!(get["name"], "web");
    assert!(
        get["userAgent"]
            .as_str()
            .is_some_and(|u| u.starts_with("kubectl"))
    );

    // Views: metadata only (kube-rs metadata watchers) and tables (kubectl get).
    let (code, body) = http(
        addr,
        "GET",
        "/api/v1/namespaces/shop/pods",
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
    );
    assert_eq!(code, 200);
    let list = json(&body);
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    assert!(list["items"][0].get("spec").is_none());
    let (_, body) = http(
        addr,
        "GET",
        "/api/v1/pods?labelSelector=app%3Dweb",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    );
    let table = json(&body);
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["rows"][0]["cells"][0], "web");

    // A watch ends after timeoutSeconds, having sent the current state.
    let (code, body) = http(
        addr,
        "GET",
        "/api/v1/namespaces/shop/pods?watch=true&timeoutSeconds=1",
        "application/json",
    );
    assert_eq!(code, 200);
    let events: Vec<Value> = body.lines().map(json).collect();
    assert_eq!(events.len(), 1, "{body}");
    assert_eq!(events[0]["type"], "ADDED");

    // drop-watches ends an open watch (no timeout of its own).
    let watcher = std::thread::spawn(move || {
        http(
            addr,
            "GET",
            "/api/v1/watch/namespaces/shop/pods",
            "application/json",
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(addr, "GET", "/egret-test/requests", "application/json");
        let watches = json(&body)
            .as_array()
            .expect("array")
            .iter()
            .filter(|r| r["verb"] == "watch" && r["query"] == "")
            .count();
        if watches > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "watch never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(addr, "POST", "/egret-test/drop-watches", "application/json").0,
        200
    );
    let (code, body) = watcher.join().expect("watch thread");
    assert_eq!(code, 200);
    assert_eq!(body.lines().count(), 1, "{body}");

    // compact: a watch from before it gets an ERROR event with 410 Gone.
    assert_eq!(
        http(addr, "POST", "/egret-test/compact", "application/json").0,
        200
    );
    let (code, body) = http(
        addr,
        "GET",
        &format!(
            "/api/v1/namespaces/shop/pods?watch=1&resourceVersion={}",
            rv - 1
        ),
        "application/json",
    );
    assert_eq!(code, 200);
    let event = json(body.lines().next().expect("an event"));
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
}
