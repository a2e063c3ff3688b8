//! `cargo xtask bench-tc`: what the TC programs cost an allowed flow. One sandbox pod sends to
//! one host with iperf3 through its veth, with egret's TC programs on the pod's node-side
//! interface and without them (the socket hooks stay on in both), alternating, and prints the
//! throughputs and their ratio. A benchmark that prints figures, not a test: the target (within
//! 5 %) is read off, never asserted.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egret_tests::{agent::EgretRun, sandbox::Sandbox};

use crate::{cargo, setup::run as run_command};

/// Seconds of each iperf3 run, and runs per configuration.
const SECONDS: u32 = 4;
const ROUNDS: usize = 3;
const SERVER: &str = "192.0.2.11";

pub fn run() -> anyhow::Result<()> {
    run_command(cargo().args([
        "build",
        "--quiet",
        "-p",
        "egret",
        "-p",
        "egret-tests",
        "--bins",
    ]))?;
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    let mut sandbox = Sandbox::new().context("failed to create the sandbox")?;
    let pod = sandbox.add_pod("client")?;
    let host = sandbox.add_host("server", &[SERVER.parse()?])?;
    // The agent resolves and attaches in the node namespace, where the pod's veth ends; a child
    // inherits this thread's namespace.
    let node = File::open(Path::new("/run/netns").join(format!("{}-node", sandbox.id())))?;
    // SAFETY: setns on this (the main) thread; every namespace operation below names its own.
    if unsafe { libc::setns(node.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns,
            "iperf3",
            "--server",
            "--bind",
            SERVER,
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start iperf3 (run `cargo xtask setup`)")?;
    std::thread::sleep(Duration::from_millis(300));

    let dir = std::env::temp_dir().join(format!("{}-bench-tc", sandbox.id()));
    std::fs::create_dir_all(&dir)?;
    let config = |interfaces: &str| {
        format!(
            "baseline: allow\npolicies: []\nworkloads:\n\
             - {{name: client, namespace: bench, cgroup: {}, ips: [{}, {}]{interfaces}}}\n",
            pod.cgroup.display(),
            pod.ipv4,
            pod.ipv6
        )
    };
    std::fs::write(dir.join("egret.yaml"), config(""))?;
    let agent = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0")?;
    wait_log(&agent, "policy enforced", 1)?;

    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..ROUNDS {
        without.push(iperf(&sandbox, &pod)?);
        std::fs::write(dir.join("egret.yaml"), config(", interfaces: [p10]"))?;
        wait_log(&agent, "TC programs attached", round + 1)?;
        with.push(iperf(&sandbox, &pod)?);
        std::fs::write(dir.join("egret.yaml"), config(""))?;
        wait_log(&agent, "TC programs detached", round + 1)?;
    }
    drop(agent);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (bare, tc) = (median(&mut without), median(&mut with));
    println!(
        "iperf3 TCP, pod -> host through the veth, {ROUNDS} x {SECONDS} s each, medians:\n  \
         without TC programs: {:.2} Gbit/s  (runs: {})\n  with TC programs:    {:.2} Gbit/s  (runs: {})\n  \
         ratio with/without:  {:.3}  (target: >= 0.95)",
        bare / 1e9,
        runs(&without),
        tc / 1e9,
        runs(&with),
        tc / bare
    );
    Ok(())
}

fn runs(v: &[f64]) -> String {
    v.iter()
        .map(|b| format!("{:.2}", b / 1e9))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One iperf3 run from the pod (its namespace and cgroup); received bits per second.
fn iperf(sandbox: &Sandbox, pod: &egret_tests::sandbox::Pod) -> anyhow::Result<f64> {
    let iperf3 = which("iperf3")?;
    let output = sandbox
        .command_in(&pod.netns, &pod.cgroup, &iperf3)?
        .args(["--client", SERVER, "--time", &SECONDS.to_string(), "--json"])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&output.stderr)))?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 report without a result: {report}"))
}

fn which(name: &str) -> anyhow::Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found (run `cargo xtask setup`)"))
}

fn wait_log(agent: &EgretRun, needle: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.log().matches(needle).count() < count {
        if Instant::now() > deadline {
            bail!(
                "egret run never logged {needle:?} x{count}:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
