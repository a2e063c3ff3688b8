//! `cargo xtask bench`: egret's datapath against no enforcement (the floor), iptables (legacy
//! and nft backends) and nftables, with N non-matching rules plus one allowed host, measured as
//! a new user would, in a sandbox the bench builds (client pod and server host in their own
//! network namespaces, pinned to different CPUs). Variants run interleaved within each round;
//! every figure is also given as a ratio to the floor of the same round and N. Before a cell is
//! timed, a denied destination must really be denied, or the cell is reported invalid.
//!
//! The client side runs in the pod as `xtask bench-client` (this binary, re-executed in the
//! pod's namespace and cgroup), so what is timed is the syscall loop alone.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egret_tests::sandbox::{Host, Pod, Sandbox, cgroup2_mount};
use serde_json::{Value, json};

use crate::{cargo, setup::run as run_command};

/// The host every variant allows, and one every variant denies (it listens too, so a
/// connection that gets through is seen).
const ALLOWED: &str = "192.0.2.10";
const DENIED: &str = "192.0.2.20";
/// Added by the "change one rule" step.
const CHANGED: &str = "192.0.2.30";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const IPERF_PORT: u16 = 5201;
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Floor,
    Egret,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Variant {
    const ALL: [Self; 5] = [
        Self::Floor,
        Self::Egret,
        Self::IptablesLegacy,
        Self::IptablesNft,
        Self::Nftables,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Egret => "egret",
            Self::IptablesLegacy => "iptables-legacy",
            Self::IptablesNft => "iptables-nft",
            Self::Nftables => "nftables",
        }
    }
}

/// Settings of one run.
struct Plan {
    sizes: Vec<usize>,
    rounds: usize,
    /// How long each timed loop runs.
    window: Duration,
}

/// Everything the bench keeps alive: the sandbox, its pod and host, the server sockets.
struct Bench {
    sandbox: Sandbox,
    pod: Pod,
    host: Host,
    dir: PathBuf,
    egret: PathBuf,
    egret_build: &'static str,
    /// The pod's cgroup relative to the cgroup2 mount (for iptables' and nft's cgroup match).
    cgroup_rel: String,
    cgroup_level: usize,
    /// The pod's cgroup as nft names it (see [`Bench::new`]).
    nft_path: String,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and builds network namespaces: run it as root");
    }
    ensure_tools()?;
    run_command(cargo().args(["build", "--quiet", "-p", "egret-tests", "--bins"]))?;
    // Load and change times are the agent's parse and compile: time the release build. One
    // cargo call for both, so the binary and the example share one build of the library.
    run_command(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "egret",
        "--bin",
        "egret",
        "--example",
        "counter_scrape",
    ]))?;
    let egret = std::env::current_exe()?
        .ancestors()
        .nth(2)
        .map(|target| target.join("release").join("egret"))
        .filter(|p| p.is_file())
        .context("no release egret binary in the target directory")?;
    let plan = if quick {
        Plan {
            sizes: vec![10, 100_000],
            rounds: 1,
            window: Duration::from_millis(700),
        }
    } else {
        Plan {
            sizes: vec![10, 1_000, 10_000, 100_000],
            rounds: 3,
            window: Duration::from_millis(800),
        }
    };
    let bench = Bench::new(egret)?;
    let stats_before = sysctl_get("kernel.bpf_stats_enabled").unwrap_or_default();
    set_bpf_stats("0")?;
    let result = bench.run(&plan, quick);
    let _ = Command::new("sysctl")
        .args([
            "-qw",
            &format!("kernel.bpf_stats_enabled={}", stats_before.trim()),
        ])
        .status();
    let _ = std::fs::remove_dir_all(&bench.dir);
    let report = result?;
    let scrape =
        counter_scrape(&bench.egret).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let mut report = report;
    report["counter_scrape"] = scrape;
    print_table(&report);
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out)?;
    let path = out.join("datapath.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Installs what only the bench needs (not on the test path): Debian's iptables, nftables,
/// iperf3 and bpftool.
fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("iptables-legacy", "iptables"),
        ("nft", "nftables"),
        ("iperf3", "iperf3"),
        ("bpftool", "bpftool"),
    ]
    .into_iter()
    .filter(|(bin, _)| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map_or(true, |o| !o.status.success())
    })
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing Debian's {}", missing.join(", "));
    run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

impl Bench {
    fn new(egret: PathBuf) -> anyhow::Result<Self> {
        let egret_build = "release";
        let mut sandbox = Sandbox::new().context("failed to create the bench sandbox")?;
        let pod = sandbox.add_pod("client")?;
        let addrs: Vec<IpAddr> = [ALLOWED, DENIED, CHANGED]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let host = sandbox.add_host("server", &addrs)?;
        let dir = std::env::temp_dir().join(format!("{}-bench", sandbox.id()));
        std::fs::create_dir_all(dir.join("policies"))?;
        let root = cgroup2_mount()?;
        let rel = pod
            .cgroup
            .strip_prefix(&root)
            .context("the pod's cgroup lies outside the cgroup2 mount")?;
        let cgroup_level = rel.components().count();
        let cgroup_rel = rel.display().to_string();
        // nft resolves `socket cgroupv2` paths below /sys/fs/cgroup, also on a hybrid layout
        // whose cgroup2 is mounted further down; the level counts in the cgroup2 hierarchy.
        let nft_path = pod
            .cgroup
            .strip_prefix("/sys/fs/cgroup")
            .context("the pod's cgroup lies outside /sys/fs/cgroup")?
            .display()
            .to_string();
        let bench = Self {
            sandbox,
            pod,
            host,
            dir,
            egret,
            egret_build,
            cgroup_rel,
            cgroup_level,
            nft_path,
        };
        bench.start_servers()?;
        Ok(bench)
    }

    /// TCP listeners (accepting on the server CPU), UDP sinks and an iperf3 server, in the
    /// server host's namespace.
    fn start_servers(&self) -> anyhow::Result<()> {
        for addr in [ALLOWED, DENIED, CHANGED] {
            let listener = self
                .sandbox
                .listen_tcp(&self.host, SocketAddr::new(addr.parse()?, TCP_PORT))?;
            std::thread::spawn(move || accept_loop(&listener));
            let sink = self
                .sandbox
                .bind_udp(&self.host, SocketAddr::new(addr.parse()?, UDP_PORT))?;
            std::thread::spawn(move || drain_loop(&sink));
        }
        let iperf = which("iperf3")?;
        let mut server =
            self.sandbox
                .command_in(&self.host.netns, self.sandbox.cgroup(), &iperf)?;
        server
            .args(["-s", "-B", ALLOWED, "-p", &IPERF_PORT.to_string(), "-A"])
            .arg(SERVER_CPU.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.sandbox.adopt_child(server.spawn()?);
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    fn run(&self, plan: &Plan, quick: bool) -> anyhow::Result<Value> {
        let mut cells = Vec::new();
        for round in 0..plan.rounds {
            for &n in &plan.sizes {
                // Rotate the order each round, so no variant always follows the same one.
                let mut order = Variant::ALL.to_vec();
                order.rotate_left(round % Variant::ALL.len());
                for variant in order {
                    eprintln!("bench: round {} N={n} {}", round + 1, variant.name());
                    let cell = self
                        .cell(variant, n, plan.window)
                        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
                    let mut cell = cell;
                    cell["variant"] = json!(variant.name());
                    cell["n"] = json!(n);
                    cell["round"] = json!(round + 1);
                    cells.push(cell);
                }
            }
        }
        Ok(json!({
            "quick": quick,
            "sizes": plan.sizes,
            "rounds": plan.rounds,
            "window_ms": plan.window.as_millis() as u64,
            "egret_build": self.egret_build,
            "load": load_average(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": sysctl_get("kernel.osrelease").unwrap_or_default().trim(),
            "cells": cells,
        }))
    }

    /// Sets up `variant` with `n` rules, checks it denies, times the workloads, tears it down.
    fn cell(&self, variant: Variant, n: usize, window: Duration) -> anyhow::Result<Value> {
        let mut cell = json!({});
        let enforcer = self.enforce(variant, n, &mut cell)?;
        let outcome = self.measure(variant, window, &mut cell);
        let changed = match (&outcome, &enforcer) {
            (Ok(()), Some(_)) => self.change(variant, n, &enforcer, &mut cell),
            _ => Ok(()),
        };
        self.teardown(variant, enforcer);
        outcome?;
        changed?;
        Ok(cell)
    }

    fn enforce(
        &self,
        variant: Variant,
        n: usize,
        cell: &mut Value,
    ) -> anyhow::Result<Option<Enforcer>> {
        let start = Instant::now();
        let enforcer = match variant {
            Variant::Floor => return Ok(None),
            Variant::Egret => {
                std::fs::write(
                    self.dir.join("policies/bench.yaml"),
                    network_policy(n, None),
                )?;
                let config = format!(
                    "baseline: allow\npolicies: [{}]\nworkloads:\n- {{name: client, namespace: bench, labels: {{app: bench}}, cgroup: {}, ips: [{}]}}\n",
                    self.dir.join("policies").display(),
                    self.pod.cgroup.display(),
                    self.pod.ipv4
                );
                let config_path = self.dir.join("egret.yaml");
                std::fs::write(&config_path, config)?;
                let log = self.dir.join("egret.log");
                let child = Command::new(&self.egret)
                    .arg("--pin-dir")
                    .arg(self.sandbox.pin_dir())
                    .args(["run", "--report-interval", "3600", "--cgroup"])
                    .arg(self.sandbox.cgroup())
                    .arg("--config")
                    .arg(&config_path)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("failed to start egret run")?;
                let enforcer = Enforcer::Egret { child, log };
                enforcer.wait_enforced(1, Duration::from_secs(60))?;
                enforcer
            }
            Variant::IptablesLegacy | Variant::IptablesNft => {
                let file = self.dir.join("iptables.rules");
                std::fs::write(&file, iptables_rules(n, &self.cgroup_rel))?;
                let restore = if variant == Variant::IptablesLegacy {
                    "iptables-legacy-restore"
                } else {
                    "iptables-nft-restore"
                };
                self.in_pod_netns(&format!("{restore} < {}", file.display()))?;
                Enforcer::Iptables(if variant == Variant::IptablesLegacy {
                    "iptables-legacy"
                } else {
                    "iptables-nft"
                })
            }
            Variant::Nftables => {
                let file = self.dir.join("nft.rules");
                std::fs::write(&file, nft_rules(n, &self.nft_path, self.cgroup_level))?;
                self.in_pod_netns(&format!("nft -f {}", file.display()))?;
                Enforcer::Nftables
            }
        };
        cell["load_ms"] = json!(ms(start.elapsed()));
        if let Enforcer::Egret { .. } = enforcer {
            cell["memlock_bytes"] = json!(self.egret_memlock());
        }
        Ok(Some(enforcer))
    }

    /// The denied host must be denied and the allowed one allowed, or the cell is invalid; then
    /// each workload runs for `window`.
    fn measure(&self, variant: Variant, window: Duration, cell: &mut Value) -> anyhow::Result<()> {
        let denied = self.client(&["check", &format!("{DENIED}:{TCP_PORT}")])?;
        let allowed = self.client(&["check", &format!("{ALLOWED}:{TCP_PORT}")])?;
        let denied_ok = variant == Variant::Floor || denied["connected"] == json!(false);
        let valid = denied_ok && allowed["connected"] == json!(true);
        cell["valid"] = json!(valid);
        cell["check"] = json!({"denied": denied, "allowed": allowed});
        if !valid {
            return Ok(());
        }
        let secs = format!("{}", window.as_secs_f64());
        for (name, mode, port, program) in [
            ("tcp", "tcp", TCP_PORT, "connect4"),
            ("udp", "udp", UDP_PORT, "sendmsg4"),
            ("connected_udp", "cudp", UDP_PORT, "connect4"),
        ] {
            let target = format!("{ALLOWED}:{port}");
            let mut result = self.client(&[mode, &target, &secs])?;
            // The kernel's per-program statistics cost two clock reads per run, so they are
            // on only for a separate, shorter loop, never while the ratios are measured.
            if variant == Variant::Egret && name != "connected_udp" {
                let _ = set_bpf_stats("1");
                let before = self.prog_stats(program);
                let short = format!("{}", window.as_secs_f64() / 2.0);
                let ran = self.client(&[mode, &target, &short]);
                let after = self.prog_stats(program);
                let _ = set_bpf_stats("0");
                if let (Ok(_), Some(b), Some(a)) = (ran, before, after)
                    && a.1 > b.1
                {
                    result["hook_ns_per_call"] = json!((a.0 - b.0) as f64 / (a.1 - b.1) as f64);
                    result["hook"] = json!(program);
                }
            }
            cell[name] = result;
        }
        cell["iperf3_gbps"] = json!(self.iperf(window).ok());
        Ok(())
    }

    /// Times one changed rule: the host [`CHANGED`] becomes allowed. For egret, from the
    /// policy file's write to egret's "policy enforced"; for the others, the command's run.
    fn change(
        &self,
        variant: Variant,
        n: usize,
        enforcer: &Option<Enforcer>,
        cell: &mut Value,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        match (variant, enforcer) {
            (Variant::Egret, Some(enforcer)) => {
                std::fs::write(
                    self.dir.join("policies/bench.yaml"),
                    network_policy(n, Some(CHANGED)),
                )?;
                enforcer.wait_enforced(2, Duration::from_secs(60))?;
            }
            (Variant::IptablesLegacy | Variant::IptablesNft, Some(Enforcer::Iptables(bin))) => {
                self.in_pod_netns(&format!("{bin} -I EGRET 2 -d {CHANGED}/32 -j ACCEPT"))?;
            }
            (Variant::Nftables, _) => {
                self.in_pod_netns(&format!(
                    "nft add element inet egret allow4 {{ {CHANGED} }}"
                ))?;
            }
            _ => return Ok(()),
        }
        cell["change_ms"] = json!(ms(start.elapsed()));
        let now = self.client(&["check", &format!("{CHANGED}:{TCP_PORT}")])?;
        cell["change_effective"] = now["connected"].clone();
        Ok(())
    }

    fn teardown(&self, variant: Variant, enforcer: Option<Enforcer>) {
        match enforcer {
            Some(Enforcer::Egret { mut child, .. }) => {
                let _ = child.kill();
                let _ = child.wait();
                // The pinned links outlive the process: detach, so the next cell starts clean.
                let _ = Command::new(&self.egret)
                    .arg("--pin-dir")
                    .arg(self.sandbox.pin_dir())
                    .arg("detach")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            Some(Enforcer::Iptables(bin)) => {
                let _ =
                    self.in_pod_netns(&format!("{bin} -F OUTPUT; {bin} -F EGRET; {bin} -X EGRET"));
            }
            Some(Enforcer::Nftables) => {
                let _ = self.in_pod_netns("nft delete table inet egret");
            }
            None => {}
        }
        let _ = variant;
    }

    /// Runs `script` in the pod's network namespace (not `ip netns exec`, which remounts /sys
    /// and so hides the cgroup2 mount nft resolves `socket cgroupv2` paths in).
    fn in_pod_netns(&self, script: &str) -> anyhow::Result<()> {
        let mut command = self.sandbox.command_in(
            &self.pod.netns,
            self.sandbox.cgroup(),
            Path::new("/bin/sh"),
        )?;
        run_quiet(command.args(["-c", script]))
    }

    /// Runs `xtask bench-client ARGS` in the pod (its namespace and cgroup) on the client CPU.
    fn client(&self, args: &[&str]) -> anyhow::Result<Value> {
        let exe = std::env::current_exe()?;
        let output = self
            .sandbox
            .command_in(&self.pod.netns, &self.pod.cgroup, &exe)?
            .arg("bench-client")
            .args(args)
            .stderr(Stdio::inherit())
            .output()?;
        if !output.status.success() {
            bail!("bench-client {args:?} failed: {}", output.status);
        }
        serde_json::from_slice(&output.stdout).context("bench-client output")
    }

    fn iperf(&self, window: Duration) -> anyhow::Result<f64> {
        let iperf = which("iperf3")?;
        let secs = window.as_secs().max(1).to_string();
        let output = self
            .sandbox
            .command_in(&self.pod.netns, &self.pod.cgroup, &iperf)?
            .args([
                "-c",
                ALLOWED,
                "-p",
                &IPERF_PORT.to_string(),
                "-J",
                "-t",
                &secs,
                "-A",
            ])
            .arg(CLIENT_CPU.to_string())
            .output()?;
        let value: Value = serde_json::from_slice(&output.stdout).context("iperf3 -J output")?;
        value["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .context("iperf3 reported no throughput")
    }

    /// (run_time_ns, run_cnt) of egret's `program`, from the kernel's statistics.
    fn prog_stats(&self, program: &str) -> Option<(u64, u64)> {
        let link = self.sandbox.pin_dir().join("links").join(program);
        let out = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(link)
            .output()
            .ok()?;
        let link: Value = serde_json::from_slice(&out.stdout).ok()?;
        let id = link["prog_id"].as_u64()?;
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .ok()?;
        let prog: Value = serde_json::from_slice(&out.stdout).ok()?;
        prog["id"].as_u64()?;
        // bpftool leaves both out while the program has not run.
        Some((
            prog["run_time_ns"].as_u64().unwrap_or(0),
            prog["run_cnt"].as_u64().unwrap_or(0),
        ))
    }

    /// Kernel memory charged for egret's maps (`bytes_memlock`, as bpftool reports it).
    fn egret_memlock(&self) -> u64 {
        let maps = self.sandbox.pin_dir().join("maps");
        let Ok(entries) = std::fs::read_dir(&maps) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| {
                let out = Command::new("bpftool")
                    .args(["-j", "map", "show", "pinned"])
                    .arg(e.path())
                    .output()
                    .ok()?;
                let map: Value = serde_json::from_slice(&out.stdout).ok()?;
                map["bytes_memlock"].as_u64()
            })
            .sum()
    }
}

enum Enforcer {
    Egret { child: Child, log: PathBuf },
    Iptables(&'static str),
    Nftables,
}

impl Enforcer {
    /// Waits until egret's log holds `count` "policy enforced" lines.
    fn wait_enforced(&self, count: usize, within: Duration) -> anyhow::Result<()> {
        let Self::Egret { log, .. } = self else {
            return Ok(());
        };
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.matches("policy enforced").count() >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("egret did not enforce in time:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The i-th non-matching rule address: 10.0.0.0/8 is never routed in the sandbox, and nothing
/// is ever sent to it; it only fills the rule sets.
fn filler(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// A NetworkPolicy selecting the client with `n` non-matching ipBlock peers and the allowed
/// host (and `extra`, for the changed rule, in place of the first filler).
fn network_policy(n: usize, extra: Option<&str>) -> String {
    let mut out = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: bench}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n",
    );
    for i in 1..=n {
        let addr = match (i, extra) {
            (1, Some(extra)) => extra.to_owned(),
            _ => filler(i),
        };
        let _ = writeln!(out, "    - ipBlock: {{cidr: {addr}/32}}");
    }
    let _ = writeln!(out, "    - ipBlock: {{cidr: {ALLOWED}/32}}");
    out
}

/// What an operator writes for the same policy with iptables: a chain for the pod's cgroup,
/// established traffic accepted first, one rule per peer, REJECT for the rest.
fn iptables_rules(n: usize, cgroup: &str) -> String {
    let mut out = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:EGRET - [0:0]\n",
    );
    let _ = writeln!(out, "-A OUTPUT -m cgroup --path {cgroup} -j EGRET");
    out.push_str("-A EGRET -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for i in 1..=n {
        let _ = writeln!(out, "-A EGRET -d {}/32 -j ACCEPT", filler(i));
    }
    let _ = writeln!(out, "-A EGRET -d {ALLOWED}/32 -j ACCEPT");
    out.push_str("-A EGRET -j REJECT\nCOMMIT\n");
    out
}

/// The same with nftables: `socket cgroupv2` and one set of peers.
fn nft_rules(n: usize, cgroup: &str, level: usize) -> String {
    let mut out =
        String::from("table inet egret {\n  set allow4 {\n    type ipv4_addr\n    elements = { ");
    for i in 1..=n {
        let _ = write!(out, "{}, ", filler(i));
    }
    let _ = writeln!(out, "{ALLOWED} }}\n  }}");
    let _ = writeln!(
        out,
        "  chain pod {{\n    ct state established,related accept\n    ip daddr @allow4 accept\n    reject\n  }}\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    socket cgroupv2 level {level} \"{cgroup}\" jump pod\n  }}\n}}"
    );
    out
}

fn accept_loop(listener: &TcpListener) {
    pin_cpu(SERVER_CPU);
    // A deep accept queue (std listens with 128): a full one drops handshakes, and a dropped
    // handshake costs the client a one-second SYN retransmit, not the hook's nanoseconds.
    // SAFETY: plain syscall on a listening socket; listening again only resizes the queue.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let _ = listener.set_nonblocking(false);
    for stream in listener.incoming() {
        drop(stream);
    }
}

fn drain_loop(socket: &UdpSocket) {
    pin_cpu(SERVER_CPU);
    let _ = socket.set_read_timeout(None);
    let mut buf = [0u8; 2048];
    while socket.recv(&mut buf).is_ok() {}
}

fn pin_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()?;
    if !out.status.success() {
        bail!("{program} is not installed");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled`: the kernel's run time and count per program.
fn set_bpf_stats(value: &str) -> anyhow::Result<()> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", value)
        .context("failed to set kernel.bpf_stats_enabled")
}

fn sysctl_get(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name.replace('.', "/"))).ok()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client side, run in the pod: `check TARGET`, or `tcp|udp|cudp TARGET SECONDS`. Prints
/// one JSON object.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    pin_cpu(CLIENT_CPU);
    let [mode, target, rest @ ..] = args else {
        bail!("usage: bench-client check|tcp|udp|cudp TARGET [SECONDS]");
    };
    let target: SocketAddr = target.parse()?;
    let window = Duration::from_secs_f64(rest.first().map_or(Ok(1.0), |s| s.parse())?);
    let value = match mode.as_str() {
        "check" => {
            let connected = TcpStream::connect_timeout(&target, Duration::from_millis(500));
            json!({"connected": connected.is_ok(), "error": connected.err().map(|e| e.to_string())})
        }
        "tcp" => timed(window, || {
            let stream = TcpStream::connect(target)?;
            // Close with a reset (SO_LINGER 0): no TIME_WAIT, so tens of thousands of
            // connections a second never run out of source ports.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid socket and option buffer of the size passed.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as u32,
                )
            };
            drop(stream);
            Ok(())
        })?,
        "udp" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let payload = [0u8; 64];
            timed(window, || socket.send_to(&payload, target).map(drop))?
        }
        "cudp" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(target)?;
            let payload = [0u8; 64];
            timed(window, || socket.send(&payload).map(drop))?
        }
        other => bail!("unknown bench-client mode {other}"),
    };
    writeln!(std::io::stdout(), "{value}")?;
    Ok(())
}

/// Runs `op` for `window` (after a short warm-up), timing each call.
fn timed(window: Duration, mut op: impl FnMut() -> std::io::Result<()>) -> anyhow::Result<Value> {
    let warm = Instant::now();
    while warm.elapsed() < window / 10 {
        op()?;
    }
    let mut samples = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < window {
        let t = Instant::now();
        op()?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    samples.sort_unstable();
    let n = samples.len().max(1);
    let pct = |p: f64| {
        samples
            .get(((n as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    Ok(json!({
        "count": samples.len(),
        "mean_ns": samples.iter().sum::<u64>() as f64 / n as f64,
        "p50_ns": pct(0.50),
        "p99_ns": pct(0.99),
        "per_sec": samples.len() as f64 / total.as_secs_f64(),
    }))
}

/// The scrape time of a full 65,536-entry counter map, batched and key by key (the agent's
/// `counter_scrape` example).
fn counter_scrape(egret: &Path) -> anyhow::Result<Value> {
    let example = egret
        .parent()
        .map(|release| release.join("examples").join("counter_scrape"))
        .context("no release directory")?;
    let out = crate::setup::capture(&mut Command::new(example))?;
    serde_json::from_str(out.trim()).context("counter_scrape output")
}

/// Medians over rounds per (variant, N) and the ratio to the floor of the same round.
fn print_table(report: &Value) {
    let cells = report["cells"].as_array().cloned().unwrap_or_default();
    let floor: BTreeMap<(u64, u64), &Value> = cells
        .iter()
        .filter(|c| c["variant"] == "floor")
        .map(|c| {
            (
                (
                    c["n"].as_u64().unwrap_or(0),
                    c["round"].as_u64().unwrap_or(0),
                ),
                c,
            )
        })
        .collect();
    let metric = |c: &Value, path: &[&str]| path.iter().fold(c, |v, k| &v[*k]).as_f64();
    println!(
        "\n{} run, {} round(s), load average at the end: {}\n",
        if report["quick"] == json!(true) {
            "quick"
        } else {
            "full"
        },
        report["rounds"],
        report["load"].as_str().unwrap_or("?"),
    );
    println!(
        "| variant | N | valid | load ms | change ms | TCP connect+close mean µs (ratio) | p50 µs (ratio) | p99 µs | conn/s | UDP sendto mean µs (ratio) | p50 µs (ratio) | p99 µs | dgram/s | connected UDP send mean µs (ratio) | iperf3 Gbit/s | hook ns/call (connect4 / sendmsg4) | memlock MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut keys: Vec<(String, u64)> = cells
        .iter()
        .map(|c| {
            (
                c["variant"].as_str().unwrap_or("?").to_owned(),
                c["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    keys.sort_by_key(|(v, n)| (*n, Variant::ALL.iter().position(|x| x.name() == v)));
    keys.dedup();
    for (variant, n) in keys {
        let mine: Vec<&Value> = cells
            .iter()
            .filter(|c| c["variant"] == variant.as_str() && c["n"].as_u64() == Some(n))
            .collect();
        let valid = mine.iter().all(|c| c["valid"] == json!(true));
        let med = |path: &[&str]| median(mine.iter().filter_map(|c| metric(c, path)).collect());
        let ratio = |path: &[&str]| {
            median(
                mine.iter()
                    .filter_map(|c| {
                        let f = floor.get(&(n, c["round"].as_u64()?))?;
                        Some(metric(c, path)? / metric(f, path)?)
                    })
                    .collect(),
            )
        };
        let f = |v: Option<f64>, scale: f64, digits: usize| {
            v.map_or("-".to_owned(), |v| format!("{:.*}", digits, v / scale))
        };
        println!(
            "| {variant} | {n} | {} | {} | {} | {} ({}) | {} ({}) | {} | {} | {} ({}) | {} ({}) | {} | {} | {} ({}) | {} | {} / {} | {} |",
            if valid { "yes" } else { "**no**" },
            f(med(&["load_ms"]), 1.0, 1),
            f(med(&["change_ms"]), 1.0, 1),
            f(med(&["tcp", "mean_ns"]), 1e3, 2),
            f(ratio(&["tcp", "mean_ns"]), 1.0, 3),
            f(med(&["tcp", "p50_ns"]), 1e3, 1),
            f(ratio(&["tcp", "p50_ns"]), 1.0, 3),
            f(med(&["tcp", "p99_ns"]), 1e3, 1),
            f(med(&["tcp", "per_sec"]), 1.0, 0),
            f(med(&["udp", "mean_ns"]), 1e3, 3),
            f(ratio(&["udp", "mean_ns"]), 1.0, 3),
            f(med(&["udp", "p50_ns"]), 1e3, 2),
            f(ratio(&["udp", "p50_ns"]), 1.0, 3),
            f(med(&["udp", "p99_ns"]), 1e3, 1),
            f(med(&["udp", "per_sec"]), 1.0, 0),
            f(med(&["connected_udp", "mean_ns"]), 1e3, 3),
            f(ratio(&["connected_udp", "mean_ns"]), 1.0, 3),
            f(med(&["iperf3_gbps"]), 1.0, 2),
            f(med(&["tcp", "hook_ns_per_call"]), 1.0, 0),
            f(med(&["udp", "hook_ns_per_call"]), 1.0, 0),
            f(med(&["memlock_bytes"]), 1048576.0, 1),
        );
    }
    let scrape = &report["counter_scrape"];
    println!(
        "\ncounter scrape, full {}-entry map: batched {} ms, key by key {} ms",
        scrape["entries"], scrape["batched_ms"], scrape["key_by_key_ms"]
    );
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}
