//! The demo behind `cargo xtask run`: a sandbox with one test pod and two simulated external
//! hosts, `egret apply` enforcing a rules file on it through the real CLI, a prober making
//! allowed and denied connections, and a table of the outcomes beside the kernel's counters.

use std::{
    net::IpAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use egret_tests::{
    probe::{Attempt, egret_binary},
    sandbox::Sandbox,
};

use crate::{cargo, setup::run as run_command};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The destinations the prober tries each round, and what egret should say to each.
const PROBES: [(&str, &str, &str); 4] = [
    (
        "tcp",
        "192.0.2.10:443",
        "allowed: the one external host and port the rules allow",
    ),
    ("tcp", "192.0.2.10:80", "blocked: same host, other port"),
    (
        "tcp",
        "203.0.113.10:443",
        "blocked: unknown destination (default deny)",
    ),
    ("udp", "192.0.2.53:53", "allowed: DNS"),
];

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
    // The sandbox finds egret-probe and egret beside this binary, in cargo's target directory.
    let mut sandbox = Sandbox::new().context("failed to create the demo sandbox")?;
    let pod = sandbox.add_pod("web")?;
    let hosts: Vec<IpAddr> = ["192.0.2.10", "192.0.2.53", "203.0.113.10"]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let host = sandbox.add_host("internet", &hosts)?;
    let _https = sandbox.listen_tcp(&host, "192.0.2.10:443".parse()?)?;
    let _http = sandbox.listen_tcp(&host, "192.0.2.10:80".parse()?)?;
    let _other = sandbox.listen_tcp(&host, "203.0.113.10:443".parse()?)?;
    let _dns = sandbox.bind_udp(&host, "192.0.2.53:53".parse()?)?;

    let rules = serde_json::json!({"endpoints": [{
    "cgroup": pod.cgroup, "id": 1, "default": "deny",
    "rules": [
        {"to": ["192.0.2.10/32"], "l4": {"ports": {"protocol": 6, "first": 443, "last": 443}},
         "action": {"verdict": "allow", "rule": 1}},
        {"to": ["192.0.2.53/32"], "l4": {"ports": {"protocol": 17, "first": 53, "last": 53}},
         "action": {"verdict": "allow", "rule": 2}}
    ]}]});
    let rules_path = std::env::temp_dir().join(format!("{}-rules.json", sandbox.id()));
    std::fs::write(&rules_path, serde_json::to_string_pretty(&rules)?)?;
    let egret = |args: &[&str]| -> Command {
        let mut command = Command::new(egret_binary());
        command.arg("--pin-dir").arg(sandbox.pin_dir()).args(args);
        command
    };
    run_command(
        egret(&["apply", "--cgroup"])
            .arg(sandbox.cgroup())
            .arg("--rules")
            .arg(&rules_path),
    )?;

    println!(
        "\negret demo: pod `web` ({}) in cgroup {}",
        pod.ipv4,
        pod.cgroup.display()
    );
    println!(
        "rules ({}): default deny; allow 192.0.2.10:443/tcp and 192.0.2.53:53/udp\n",
        rules_path.display()
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    loop {
        print_round(&sandbox, &pod)?;
        let counters = egret(&["counters"]).output().context("egret counters")?;
        println!(
            "kernel counters (egret counters --pin-dir {}):",
            sandbox.pin_dir().display()
        );
        print!("{}", String::from_utf8_lossy(&counters.stdout));
        if once || STOP.load(Ordering::SeqCst) {
            break;
        }
        println!("\n(next round in 3 s; Ctrl-C removes the sandbox and exits)\n");
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
    let _ = std::fs::remove_file(&rules_path);
    println!("removing the sandbox");
    Ok(())
}

fn print_round(sandbox: &Sandbox, pod: &egret_tests::sandbox::Pod) -> anyhow::Result<()> {
    println!("{:<6} {:<20} {:<10} WHY", "PROTO", "DESTINATION", "OUTCOME");
    for (protocol, target, why) in PROBES {
        let mode = if protocol == "tcp" { "connect" } else { "udp" };
        let attempts: Vec<Attempt> =
            sandbox.probe(pod, None, &[mode, target, "--timeout-ms", "500"])?;
        for attempt in attempts {
            let outcome = serde_json::to_value(attempt.outcome)?;
            println!(
                "{:<6} {:<20} {:<10} {why}",
                protocol,
                target,
                outcome.as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
