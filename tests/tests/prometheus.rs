//! End to end with a real Prometheus (Debian's package; `cargo xtask setup` installs it): it
//! scrapes `egret run` on loopback while sandbox workloads make blocked and allowed connections,
//! and its HTTP API must show the exact counts per destination and verdict, fire the
//! blocked-egress alert, and accept every query of the Grafana dashboard.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::{IpAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use egret_tests::{
    agent::{EgretRun, copy_example_policies, http_get, url_encode},
    probe::Outcome,
    sandbox::Sandbox,
};
use serde_json::Value;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// GETs a Prometheus API path and returns the `data` of a successful answer.
fn api(address: &str, path: &str) -> Value {
    let response = http_get(address, path).expect("prometheus API");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {response}"));
    assert_eq!(json["status"], "success", "{path}: {json}");
    json["data"].clone()
}

/// The value of an instant query that returns one sample, or `None` while it returns none.
fn scalar(address: &str, query: &str) -> Option<f64> {
    let data = api(
        address,
        &format!("/api/v1/query?query={}", url_encode(query)),
    );
    let result = data["result"].as_array()?;
    assert!(result.len() <= 1, "{query}: {data}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_exact_counts_and_fires_the_blocked_egress_alert() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let addrs: Vec<IpAddr> = ["192.0.2.10", "192.0.2.254"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let host = sandbox.add_host("ext", &addrs).expect("host");
    let _listeners: Vec<_> = ["192.0.2.10:443", "192.0.2.254:443"]
        .iter()
        .map(|a| {
            sandbox
                .listen_tcp(&host, a.parse().expect("addr"))
                .expect("listen")
        })
        .collect();

    let dir = std::env::temp_dir().join(format!("{}-prometheus", sandbox.id()));
    copy_example_policies(&dir.join("policies")).expect("policies");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nmetrics: {{address: 127.0.0.1:0}}\nworkloads:\n\
             - {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n",
            web.cgroup.display()
        ),
    )
    .expect("config");
    let egret = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    egret.wait_log("policy enforced", 1, Duration::from_secs(20));
    let target = egret.metrics_address().expect("metrics address");

    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/alerts/egret-rules.yaml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\n\
             scrape_configs:\n- job_name: egret\n  static_configs: [{{targets: ['{target}']}}]\n",
            rules.display()
        ),
    )
    .expect("prometheus config");
    let prometheus_address = format!("127.0.0.1:{}", free_port());
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prometheus_address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus is missing ({e}): `cargo xtask setup` installs it")
            }),
    );
    eventually(
        "prometheus to scrape egret",
        Duration::from_secs(30),
        || {
            http_get(&prometheus_address, "/-/ready")
                .ok()
                .filter(|r| r.starts_with("HTTP/1.1 200"))?;
            scalar(&prometheus_address, "up{job=\"egret\"}").filter(|v| *v == 1.0)
        },
    );

    let connect = |target: &str| {
        sandbox
            .probe(&web, None, &["connect", target, "--timeout-ms", "500"])
            .expect("probe")[0]
            .outcome
    };
    for _ in 0..3 {
        assert_eq!(connect("192.0.2.254:443"), Outcome::Denied);
    }
    for _ in 0..2 {
        assert_eq!(connect("192.0.2.10:443"), Outcome::Connected);
    }

    let count = |destination: &str, verdict: &str| {
        format!(
            "sum(egret_egress_connections_total{{destination_ip=\"{destination}\", verdict=\"{verdict}\"}})"
        )
    };
    eventually("the blocked count", Duration::from_secs(30), || {
        scalar(&prometheus_address, &count("192.0.2.254", "blocked")).filter(|v| *v == 3.0)
    });
    eventually("the passthrough count", Duration::from_secs(30), || {
        scalar(&prometheus_address, &count("192.0.2.10", "passthrough")).filter(|v| *v == 2.0)
    });
    assert_eq!(
        scalar(&prometheus_address, &count("192.0.2.10", "blocked")),
        None,
        "no blocked series for an allowed destination"
    );
    let labels = api(
        &prometheus_address,
        &format!(
            "/api/v1/query?query={}",
            url_encode("egret_egress_connections_total{destination_ip=\"192.0.2.254\"}")
        ),
    );
    let metric = &labels["result"][0]["metric"];
    assert_eq!(metric["policy"], "EgressPolicy block-metadata");
    assert_eq!(metric["source_namespace"], "shop");
    assert_eq!(metric["source_workload"], "web");
    assert_eq!(metric["protocol"], "TCP");

    let alert = eventually(
        "EgretEgressBlocked to fire",
        Duration::from_secs(30),
        || {
            let alerts = api(&prometheus_address, "/api/v1/alerts");
            alerts["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "EgretEgressBlocked" && a["state"] == "firing"
                })
                .cloned()
        },
    );
    assert_eq!(alert["labels"]["source_workload"], "web");
    assert_eq!(
        alert["annotations"]["summary"],
        "shop/web had egress blocked"
    );

    // Every query of the dashboard is one Prometheus accepts.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../manifests/components/monitoring/egret-dashboard.json"),
        )
        .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", ".*")
                .replace("$workload", ".*");
            api(
                &prometheus_address,
                &format!("/api/v1/query?query={}", url_encode(&expr)),
            );
            queries += 1;
        }
    }
    assert!(queries >= 10);
    let _ = std::fs::remove_dir_all(&dir);
}
