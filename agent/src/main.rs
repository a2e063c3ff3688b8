//! The `egret` binary: command-line edge over the library. Errors become one line with their
//! whole chain, and a non-zero exit.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use egret::{
    datapath::{self, Datapath, DatapathConfig, LoadMode, Verdict},
    policy::{
        cluster,
        compile::{CompileOptions, compile},
        explain::Probe,
    },
    rules_file::RulesFile,
    sys,
};

/// eBPF egress enforcement: decides every outbound connection of the processes in the
/// endpoints' cgroups, and counts blocked and passthrough attempts per destination.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// bpffs directory where programs and maps are pinned (bpffs is mounted when missing).
    #[arg(long, global = true, default_value = datapath::DEFAULT_PIN_DIR, env = "EGRET_PIN_DIR")]
    pin_dir: PathBuf,
    /// Sizes of the maps egret creates, as MAP=ENTRIES (endpoints, addr4, addr6, policy,
    /// counters; see docs/operations.md for the defaults and their kernel memory). Applies when
    /// the maps are made: a first start, or after `egret detach`.
    #[arg(long, global = true, value_delimiter = ',', env = "EGRET_MAP_ENTRIES")]
    map_entries: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Loads and attaches the programs to a cgroup and pins them, or adopts those already
    /// pinned. Enforcement stays after egret exits.
    Attach {
        /// cgroup v2 directory to attach to; defaults to the cgroup2 root.
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Enforces a datapath rules file (endpoints by cgroup, ordered first-match rules).
    Apply {
        /// The rules file (JSON).
        #[arg(long)]
        rules: PathBuf,
        /// cgroup v2 directory to attach to when not attached yet; defaults to the cgroup2 root.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Stay running after applying, as an agent does, until killed.
        #[arg(long)]
        hold: bool,
    },
    /// Answers, offline, what egret decides for a connection: verdict, deciding policy and rule,
    /// and why. Reads Namespace, Pod, NetworkPolicy and EgressPolicy YAML; answers from the
    /// compiled datapath entries, as the kernel would.
    Explain {
        /// YAML file or directory (multi-document files and `kind: List` work); repeatable.
        #[arg(short = 'f', long = "file", required_unless_present_any = ["kubeconfig", "cluster"])]
        files: Vec<PathBuf>,
        /// Read the objects from the cluster this kubeconfig names, not from files.
        #[arg(long, conflicts_with = "files")]
        kubeconfig: Option<PathBuf>,
        /// Read the objects from the cluster kube finds (`$KUBECONFIG`, `~/.kube/config` or
        /// in-cluster), not from files.
        #[arg(long, conflicts_with_all = ["files", "kubeconfig"])]
        cluster: bool,
        /// Source pod, `namespace/name`.
        #[arg(long, required_unless_present = "probes")]
        from: Option<String>,
        /// Destination: an IP address or `namespace/name` of a pod.
        #[arg(long, required_unless_present = "probes")]
        to: Option<String>,
        /// Destination port.
        #[arg(long, required_unless_present = "probes")]
        port: Option<u16>,
        /// TCP, UDP or SCTP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// JSON lines of `{"from","to","port","protocol"}` to answer in order (`-`: stdin);
        /// answers are JSON lines.
        #[arg(long, conflicts_with_all = ["from", "to", "port"])]
        probes: Option<PathBuf>,
        /// Verdict for pods no NetworkPolicy isolates: `allow`, or `deny` (REGISTRY_ONLY-style).
        #[arg(long, value_enum, default_value_t = Baseline::Allow)]
        baseline: Baseline,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Largest policy file read, in bytes (as `limits.maxFileBytes` of `egret run`).
        #[arg(long, default_value_t = egret::policy::cluster::DEFAULT_MAX_FILE_BYTES)]
        max_file_bytes: u64,
        /// Most bytes read under one directory (as `limits.maxDirectoryBytes`).
        #[arg(long, default_value_t = egret::policy::cluster::DEFAULT_MAX_DIRECTORY_BYTES)]
        max_directory_bytes: u64,
    },
    /// Local mode: enforces the YAML policies of a config on local cgroups, follows edits of the
    /// config and policy files (a broken edit is reported and changes nothing) and cgroups that
    /// appear later, and prints the connections counted since the last report.
    Run {
        /// The config (workloads with their cgroups, policy files, baseline).
        #[arg(long)]
        config: PathBuf,
        /// cgroup v2 directory the programs attach to when not attached yet; defaults to the
        /// cgroup2 root. Relative workload cgroups are resolved against the cgroup2 root.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Seconds between reports of recent connections; 0 turns them off.
        #[arg(long, default_value_t = 2.0)]
        report_interval: f64,
        /// Seconds between reads of the config and policy files, and between counter drains
        /// when nothing else happens. New cgroups and new interfaces do not wait for it.
        #[arg(long, default_value = "0.2", value_parser = positive_seconds)]
        poll_interval: std::time::Duration,
        /// Serve /metrics, /healthz and /readyz here (overrides the config's `metrics.address`).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Destination IPs with their own metric series; the rest count as `other` (overrides
        /// the config's `metrics.maxDestinationSeries`; default 1000).
        #[arg(long)]
        max_destination_series: Option<usize>,
        /// How long a destination's metric series stays without growing before it is dropped
        /// and its place in the budget freed, as `10m` or `90s`; `0`: never dropped (overrides
        /// the config's `metrics.seriesIdle`; default 10m). Also how long the kernel keeps the
        /// counters of a workload that is gone.
        #[arg(long)]
        metrics_series_idle: Option<egret::telemetry::IdleTime>,
        #[command(flatten)]
        faults: FaultOptions,
    },
    /// Runs the node agent: enforces the cluster's NetworkPolicies and EgressPolicies for the
    /// pods on this node (a DaemonSet runs one per node), serves metrics, writes EgressPolicy
    /// status.
    Agent {
        /// kubeconfig file; default: `$KUBECONFIG`, `~/.kube/config`, else the in-cluster
        /// service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name (the downward API's `spec.nodeName`): only its pods are enforced.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The agent's namespace, where the status Lease lives.
        #[arg(long, env = "POD_NAMESPACE", default_value = "egret-system")]
        namespace: String,
        /// cgroup v2 directory to attach to (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The cgroup2 mount, where the kubelet's pod cgroups are (default: found in
        /// /proc/self/mountinfo).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Verdict for pods no NetworkPolicy isolates (`deny`: REGISTRY_ONLY-style).
        #[arg(long, value_enum, default_value_t = Baseline::Allow)]
        baseline: Baseline,
        /// What a process in a pod cgroup egret does not know yet gets.
        #[arg(long, value_enum, default_value_t = egret::source::kubernetes::UnknownPods::Allow)]
        unknown_pods: egret::source::kubernetes::UnknownPods,
        /// Names (or globs) of the node-side veths of pods, as the CNI names them (`lxc*`,
        /// `cali*`, `veth*`): while a started pod's veth is not found yet, the unclaimed ones
        /// pass link traffic only. Other veths are never held.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        pod_veths: Vec<String>,
        /// Most policy entries one NetworkPolicy or EgressPolicy may need for this node's pods;
        /// a policy over it is rejected (logged with the numbers, in /readyz and
        /// egret_policies_rejected{reason="entry-budget"}) and every other policy is written.
        #[arg(long, default_value_t = egret::policy::compile::DEFAULT_MAX_POLICY_ENTRIES)]
        max_policy_entries: usize,
        /// Where to serve /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9091")]
        metrics_addr: std::net::SocketAddr,
        /// Destination IPs with their own metric series; the rest count as "other".
        #[arg(long, default_value_t = egret::telemetry::SeriesLimits::DEFAULT_MAX_DESTINATIONS)]
        max_destination_series: usize,
        /// How long a destination's metric series stays without growing before it is dropped
        /// and its place in the budget freed, as `10m` or `90s`; `0`: never dropped.
        #[arg(long, default_value = "10m")]
        metrics_series_idle: egret::telemetry::IdleTime,
        #[command(flatten)]
        faults: FaultOptions,
    },
    /// Prints the EgressPolicy CustomResourceDefinition (`egret crd | kubectl apply -f -`).
    Crd,
    /// Prints the kernel's connection counters.
    Counters {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Prints the active generation and each map's fill.
    Status,
    /// Detaches the programs and removes every pin. Enforcement stops.
    Detach {
        /// Then wait for SIGTERM or SIGINT instead of exiting, so that the pods of a cleanup
        /// DaemonSet (`manifests/cleanup`) stay Running and `kubectl rollout status` says when
        /// every node is done.
        #[arg(long)]
        wait: bool,
    },
}

/// What `egret run` and `egret agent` do about faults and floods.
#[derive(clap::Args)]
struct FaultOptions {
    /// What a datapath fault (an endpoint without policy in the kernel) gets; counted under
    /// policy `missing-policy` either way.
    #[arg(long, value_enum, default_value_t = Baseline::Allow)]
    on_fault: Baseline,
    /// Deny-log lines per (workload, destination): `BURST/PER_SECOND`.
    #[arg(long, default_value = "5/1")]
    deny_log_per_destination: egret::telemetry::denylog::Rate,
    /// Deny-log lines per workload across all destinations: `BURST/PER_SECOND`.
    #[arg(long, default_value = "50/10")]
    deny_log_per_source: egret::telemetry::denylog::Rate,
}

impl FaultOptions {
    /// The deny log's limits from the flags.
    fn deny_log(&self) -> egret::telemetry::denylog::Limits {
        egret::telemetry::denylog::Limits {
            per_destination: self.deny_log_per_destination,
            per_source: self.deny_log_per_source,
            ..egret::telemetry::denylog::Limits::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Baseline {
    Allow,
    Deny,
}

impl Baseline {
    fn verdict(self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny => Verdict::Deny,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a terminal; log files and CI get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EGRET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egret: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        pin_dir,
        map_entries,
        command,
    } = cli;
    let entries = if map_entries.is_empty() {
        None
    } else {
        Some(datapath::MapEntries::parse(&map_entries)?)
    };
    match command {
        Command::Attach { cgroup } => {
            preflight(&pin_dir, &[("--cgroup", cgroup.as_deref())], false)?;
            let datapath = open(pin_dir, entries.as_ref(), Some(cgroup))?;
            report_mode(&datapath);
        }
        Command::Apply {
            rules,
            cgroup,
            hold,
        } => {
            let file = RulesFile::load(&rules)?;
            preflight(&pin_dir, &[("--cgroup", cgroup.as_deref())], false)?;
            let mut datapath = open(pin_dir, entries.as_ref(), Some(cgroup))?;
            report_mode(&datapath);
            let desired = file.desired();
            let endpoints = file.cgroup_ids()?;
            let changes = datapath
                .sync(&desired, &endpoints)
                .with_context(|| format!("failed to enforce {}", rules.display()))?;
            tracing::info!(
                rules = %rules.display(),
                endpoints = endpoints.len(),
                entries = desired.len(),
                changes = changes.len(),
                generation = datapath.generation(),
                "policy enforced"
            );
            if hold {
                loop {
                    std::thread::park();
                }
            }
        }
        Command::Explain {
            files,
            kubeconfig,
            cluster: from_cluster,
            from,
            to,
            port,
            protocol,
            probes,
            baseline,
            output,
            max_file_bytes,
            max_directory_bytes,
        } => {
            let limits = egret::policy::cluster::Limits {
                max_file_bytes,
                max_directory_bytes,
            };
            let world = if kubeconfig.is_some() || from_cluster {
                // The same objects the agent watches, listed once, through the same conversion.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let client = egret::source::kubernetes::client(kubeconfig.as_deref()).await?;
                    let view = egret::source::kubernetes::list(&client).await?;
                    anyhow::Ok(view.world())
                })?
            } else {
                // The same messages, at the same level, as `egret run` logs for the same files.
                let (world, errors) = cluster::load(&files, limits);
                for err in &errors {
                    tracing::error!("{err}");
                }
                world
            };
            for invalid in &world.invalid {
                tracing::error!("{invalid}");
            }
            let options = CompileOptions {
                baseline: baseline.verdict(),
                ..CompileOptions::default()
            };
            let compiled = compile(&world, &options);
            let mut out = std::io::stdout().lock();
            if let Some(probes) = probes {
                let text = if probes.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&probes)
                        .with_context(|| format!("failed to read {}", probes.display()))?
                };
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let answer = serde_json::from_str::<Probe>(line)
                        .map_err(|e| format!("probe line {}: {e}", i + 1))
                        .and_then(|p| {
                            p.answer(&world, &compiled)
                                .map_err(|e| format!("probe line {}: {e}", i + 1))
                        });
                    let json = match answer {
                        Ok(answer) => serde_json::to_value(&answer)?,
                        Err(error) => {
                            serde_json::json!({"verdict": null, "policy": null, "rule": null, "reason": error, "error": true})
                        }
                    };
                    writeln!(out, "{json}")?;
                }
            } else {
                let probe = Probe {
                    from: from.unwrap_or_default(),
                    to: to.unwrap_or_default(),
                    port: port.unwrap_or_default(),
                    protocol,
                };
                let answer = probe.answer(&world, &compiled)?;
                match output {
                    Output::Json => writeln!(out, "{}", serde_json::to_value(&answer)?)?,
                    Output::Table => {
                        let policy = answer
                            .policy
                            .as_ref()
                            .map_or_else(|| "default".to_owned(), ToString::to_string);
                        writeln!(
                            out,
                            "verdict: {}",
                            serde_json::to_value(answer.verdict)?
                                .as_str()
                                .unwrap_or("?")
                        )?;
                        writeln!(out, "policy:  {policy}")?;
                        writeln!(out, "rule:    {}", answer.rule.as_deref().unwrap_or("-"))?;
                        writeln!(out, "reason:  {}", answer.reason)?;
                    }
                }
            }
        }
        Command::Run {
            config,
            cgroup,
            report_interval,
            poll_interval,
            metrics_addr,
            max_destination_series,
            metrics_series_idle,
            faults,
        } => {
            let config_file = config.display().to_string();
            let source = egret::local::LocalSource::new(config).with_metrics(
                metrics_addr,
                max_destination_series,
                metrics_series_idle,
            );
            preflight(
                &pin_dir,
                &[("--cgroup", cgroup.as_deref())],
                source.wants_tc(),
            )?;
            // The flag wins over the config's `maps:`.
            let entries = match entries {
                Some(entries) => Some(entries),
                None => match source.map_entries() {
                    items if items.is_empty() => None,
                    items => Some(
                        datapath::MapEntries::parse(&items)
                            .with_context(|| format!("{config_file}: maps"))?,
                    ),
                },
            };
            let mut datapath = open(pin_dir, entries.as_ref(), Some(cgroup))?;
            datapath.set_on_fault(faults.on_fault.verdict());
            report_mode(&datapath);
            let options = egret::local::RunOptions {
                report_every: (report_interval > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(report_interval)),
                poll_every: poll_interval,
                deny_log: faults.deny_log(),
            };
            egret::local::run(source, datapath, &sys::cgroup2_mount()?, &options)?;
        }
        Command::Agent {
            kubeconfig,
            node_name,
            namespace,
            cgroup,
            cgroup_root,
            baseline,
            unknown_pods,
            pod_veths,
            max_policy_entries,
            metrics_addr,
            max_destination_series,
            metrics_series_idle,
            faults,
        } => {
            // The agent's TC programs go on every pod's veth.
            preflight(
                &pin_dir,
                &[
                    ("--cgroup", cgroup.as_deref()),
                    ("--cgroup-root", cgroup_root.as_deref()),
                ],
                true,
            )?;
            agent(
                (pin_dir, entries.as_ref()),
                kubeconfig,
                egret::source::kubernetes::AgentOptions {
                    identity: egret::source::kubernetes::identity(&node_name),
                    node: node_name,
                    namespace,
                    baseline: baseline.verdict(),
                    unknown_pods,
                    pod_veths,
                    max_policy_entries,
                    cgroup_root: match cgroup_root {
                        Some(root) => root,
                        None => sys::cgroup2_mount()?,
                    },
                    own_cgroup: None,
                },
                cgroup,
                (
                    metrics_addr,
                    egret::telemetry::SeriesLimits {
                        max_destinations: max_destination_series,
                        idle: metrics_series_idle.0,
                    },
                ),
                &faults,
            )?;
        }
        Command::Crd => print!("{}", egret::policy::crd_yaml()?),
        Command::Counters { output } => {
            let datapath = open(pin_dir, entries.as_ref(), None)?;
            let counters = datapath.counters()?;
            print_counters(&counters, output)?;
        }
        Command::Status => {
            let datapath = open(pin_dir, entries.as_ref(), None)?;
            println!("pin directory: {}", datapath.pin_dir().display());
            println!("active generation: {}", datapath.generation());
            for usage in datapath.usage() {
                println!(
                    "{:<26} {:>8} / {:<8} ({:.1}%)",
                    usage.name,
                    usage.entries,
                    usage.capacity,
                    100.0 * f64::from(usage.entries) / f64::from(usage.capacity)
                );
            }
        }
        Command::Detach { wait } => {
            datapath::uninstall(&pin_dir)?;
            tracing::info!(pin_dir = %pin_dir.display(), "detached");
            if wait {
                egret::sys::wait_for_termination()?;
            }
        }
    }
    Ok(())
}

/// `egret agent`: the Kubernetes source on a tokio runtime, feeding the shared runtime on this
/// thread.
fn agent(
    (pin_dir, entries): (PathBuf, Option<&datapath::MapEntries>),
    kubeconfig: Option<PathBuf>,
    mut options: egret::source::kubernetes::AgentOptions,
    cgroup: Option<PathBuf>,
    metrics: (std::net::SocketAddr, egret::telemetry::SeriesLimits),
    faults: &FaultOptions,
) -> anyhow::Result<()> {
    if options.node.is_empty() {
        anyhow::bail!("--node-name (or NODE_NAME) must name this node");
    }
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = tokio.block_on(egret::source::kubernetes::client(kubeconfig.as_deref()))?;
    // Attached before any watch lists: what the pins enforce stays enforced meanwhile.
    let mut datapath = open(pin_dir, entries, Some(cgroup))?;
    datapath.set_on_fault(faults.on_fault.verdict());
    // Never enforced on itself, from before its first API call: pinned guards and a deny
    // baseline would otherwise keep a new agent pod from the API (a rolling update's deadlock).
    if let Some(own) = egret::source::kubernetes::cgroups::Kubepods::find(&options.cgroup_root)
        .as_ref()
        .and_then(egret::source::kubernetes::own_cgroup)
    {
        let id = sys::cgroup_id(&own)?;
        datapath.set_role(id, egret::datapath::CgroupRole::Unmanaged)?;
        options.own_cgroup = Some(id);
        tracing::info!(cgroup = %own.display(), "the agent's own pod cgroup is never enforced");
    }
    report_mode(&datapath);
    let watches = {
        let _inside = tokio.enter();
        egret::source::kubernetes::watch::Watches::start(&client)
    };
    let health = egret::source::kubernetes::health_check(std::sync::Arc::clone(watches.health()));
    let (events, receiver) = std::sync::mpsc::channel();
    tracing::info!(node = %options.node, "watching the cluster");
    tokio.spawn(egret::source::kubernetes::run(
        watches, client, options, events,
    ));
    egret::runtime::run(
        datapath,
        &receiver,
        egret::runtime::RuntimeOptions {
            metrics: Some(metrics),
            report_every: None,
            tick: std::time::Duration::from_millis(200),
            health: Some(health),
            waiting: Some("waiting for the initial list of every watch".into()),
            pending_label: "unknown-pod",
            deny_log: faults.deny_log(),
        },
    )?;
    Ok(())
}

/// Checks that the host offers what egret needs (`egret::preflight`), before anything that
/// enforces is touched; `cgroups` are the directories given on the command line, by flag.
fn preflight(
    pin_dir: &Path,
    cgroups: &[(&'static str, Option<&Path>)],
    tcx: bool,
) -> anyhow::Result<()> {
    egret::preflight::check(&egret::preflight::Needs {
        pin_dir,
        bpffs_mount: Path::new(datapath::BPFFS_MOUNT),
        cgroups: cgroups
            .iter()
            .filter_map(|(flag, path)| Some((*flag, (*path)?)))
            .collect(),
        tcx,
    })?;
    Ok(())
}

/// Opens the datapath; `attach_to` is `Some` for commands that may attach (its inner `None`
/// meaning the cgroup2 root).
fn open(
    pin_dir: PathBuf,
    entries: Option<&datapath::MapEntries>,
    attach_to: Option<Option<PathBuf>>,
) -> anyhow::Result<Datapath> {
    let cgroup = match attach_to {
        Some(Some(cgroup)) => Some(cgroup),
        Some(None) => Some(sys::cgroup2_mount()?),
        None => None,
    };
    Ok(Datapath::open_with(
        &DatapathConfig { pin_dir, cgroup },
        entries,
    )?)
}

fn report_mode(datapath: &Datapath) {
    match datapath.mode() {
        LoadMode::Adopted => tracing::info!(
            pin_dir = %datapath.pin_dir().display(),
            generation = datapath.generation(),
            "adopted pinned programs and maps"
        ),
        LoadMode::Loaded { attached } => tracing::info!(
            pin_dir = %datapath.pin_dir().display(),
            programs = ?attached,
            "attached and pinned programs"
        ),
    }
}

fn print_counters(counters: &datapath::Counters, output: Output) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            for s in &counters.samples {
                let line = serde_json::json!({
                    "endpoint": s.endpoint,
                    "rule": s.rule,
                    "destination": s.destination.map_or_else(|| "other".to_owned(), |d| d.to_string()),
                    "protocol": s.protocol,
                    "verdict": s.verdict.counter_label(),
                    "attempts": s.attempts,
                });
                writeln!(out, "{line}")?;
            }
        }
        Output::Table => {
            writeln!(
                out,
                "{:<9} {:<6} {:<40} {:<6} {:<12} {:>10}",
                "ENDPOINT", "RULE", "DESTINATION", "PROTO", "VERDICT", "ATTEMPTS"
            )?;
            for s in &counters.samples {
                let dest = s
                    .destination
                    .map_or_else(|| "other".to_owned(), |d| d.to_string());
                writeln!(
                    out,
                    "{:<9} {:<6} {:<40} {:<6} {:<12} {:>10}",
                    s.endpoint,
                    s.rule,
                    dest,
                    s.protocol,
                    s.verdict.counter_label(),
                    s.attempts
                )?;
            }
            if counters.lost.iter().any(|&n| n > 0) {
                writeln!(
                    out,
                    "lost (no room in either counter map): {:?}",
                    counters.lost
                )?;
            }
        }
    }
    Ok(())
}

/// A positive number of seconds (`0.2`, `30`).
fn positive_seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{text:?} is no positive number of seconds"))
}
