//! The demo behind `cargo xtask run`: a sandbox "cluster" (pods `shop/web`, `shop/api` and
//! `batch/worker`, and external hosts on TEST-NET addresses), `egret run` enforcing the example
//! policies of `manifests/examples/local/` on it, and traffic each round. egret prints the
//! connections it counted with their verdict and deciding policy.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egret_tests::{
    probe::egret_binary,
    sandbox::{Pod, Sandbox},
};

use crate::{cargo, setup::run as run_command};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Each round: (pod, destination, what egret should say and why).
const TRAFFIC: [(&str, &str, &str); 7] = [
    (
        "web",
        "192.0.2.10:443",
        "passthrough: shop/allow-payments lets web reach the payments API",
    ),
    ("web", "203.0.113.10:443", "blocked: shop is default-deny"),
    (
        "api",
        "192.0.2.10:443",
        "blocked: only web may reach payments",
    ),
    (
        "worker",
        "192.0.2.10:443",
        "passthrough: allow-internal (priority 100)",
    ),
    (
        "worker",
        "192.0.2.254:80",
        "blocked: block-metadata (priority 0) beats allow-internal",
    ),
    (
        "web",
        "192.0.2.254:443",
        "blocked: block-metadata, for every workload",
    ),
    (
        "worker",
        "203.0.113.10:443",
        "audit: audit-internet would deny it; allowed and counted",
    ),
];

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(once: bool) -> anyhow::Result<()> {
    run_command(cargo().args([
        "build",
        "--quiet",
        "-p",
        "egret",
        "-p",
        "egret-tests",
        "--bins",
    ]))?;
    let examples = Path::new("manifests/examples/local")
        .canonicalize()
        .context("run `cargo xtask run` from the repository root")?;
    // The sandbox finds egret-probe and egret beside this binary, in cargo's target directory.
    let mut sandbox = Sandbox::new().context("failed to create the demo sandbox")?;
    let pods = [
        sandbox.add_pod("web")?,
        sandbox.add_pod("api")?,
        sandbox.add_pod("worker")?,
    ];
    let hosts: Vec<IpAddr> = ["192.0.2.10", "192.0.2.254", "203.0.113.10"]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let host = sandbox.add_host("internet", &hosts)?;
    let _listeners = [
        "192.0.2.10:443",
        "192.0.2.254:80",
        "192.0.2.254:443",
        "203.0.113.10:443",
    ]
    .iter()
    .map(|a| {
        sandbox
            .listen_tcp(&host, a.parse()?)
            .map_err(anyhow::Error::from)
    })
    .collect::<anyhow::Result<Vec<_>>>()?;

    let dir = std::env::temp_dir().join(format!("{}-demo", sandbox.id()));
    std::fs::create_dir_all(&dir)?;
    let workload = |pod: &Pod, namespace: &str| {
        format!(
            "- {{name: {}, namespace: {namespace}, labels: {{app: {}}}, cgroup: {}, ips: [{}]}}\n",
            pod.name,
            pod.name,
            pod.cgroup.display(),
            pod.ipv4
        )
    };
    let config = format!(
        "# Written by `cargo xtask run`: the example policies, on the sandbox's cgroups.\n\
         baseline: allow\npolicies: [{}]\nmetrics: {{address: 127.0.0.1:0}}\nworkloads:\n{}{}{}",
        examples.join("policies").display(),
        workload(&pods[0], "shop"),
        workload(&pods[1], "shop"),
        workload(&pods[2], "batch"),
    );
    let config_path = dir.join("egret.yaml");
    std::fs::write(&config_path, config)?;
    let log_path = dir.join("egret.log");

    let mut child = Command::new(egret_binary())
        .arg("--pin-dir")
        .arg(sandbox.pin_dir())
        .args([
            "run",
            "--report-interval",
            if once { "0.3" } else { "2" },
            "--cgroup",
        ])
        .arg(sandbox.cgroup())
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("failed to start egret run")?;
    let stdout = child.stdout.take().context("egret stdout")?;
    let agent = Agent(child);
    // egret's reports go to our stdout as they come; `--once` waits for the first one.
    let reported = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&reported);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("policy enforced")
    {
        if Instant::now() > deadline {
            bail!(
                "egret run did not start:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    println!(
        "\negret demo: `egret run --config {}`",
        config_path.display()
    );
    println!(
        "policies: {} (see the comments in each file)",
        examples.join("policies").display()
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let metrics = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .unwrap_or("?");
    println!("egret's log: {}", log_path.display());
    println!("metrics: http://{metrics}/metrics (also /healthz, /readyz)\n");
    println!("traffic each round:");
    for (pod, target, why) in TRAFFIC {
        println!("  {pod:<7} -> {target:<18} {why}");
    }
    println!();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    loop {
        for (name, target, _) in TRAFFIC {
            let pod = pods.iter().find(|p| p.name == name).context("demo pod")?;
            sandbox.probe(pod, None, &["connect", target, "--timeout-ms", "500"])?;
        }
        if once {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|l| l.contains("audit"))
            {
                if Instant::now() > deadline {
                    bail!(
                        "egret reported no connections; its log is {}",
                        log_path.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            break;
        }
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(100));
            if STOP.load(Ordering::SeqCst) {
                break;
            }
        }
        if STOP.load(Ordering::SeqCst) {
            break;
        }
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nremoving the sandbox");
    Ok(())
}
