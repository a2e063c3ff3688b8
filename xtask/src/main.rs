//! Developer tasks: `cargo xtask setup | test | run | bench`. Each installs what is missing first.

mod bench;
mod bench_tc;
mod demo;
mod image;
mod setup;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use setup::{NIGHTLY, run};

/// egret's developer tasks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Installs the nightly's rust-src and bpf-linker when missing (idempotent).
    Setup,
    /// Runs every check: rustfmt, clippy (host and BPF target, warnings denied), unit tests and
    /// the privileged end-to-end tests against the real kernel (needs root).
    Test,
    /// Builds the container image: a static (musl) egret `FROM scratch`, tagged with the crate
    /// version as the DaemonSet references it (podman or buildah, offline).
    Image,
    /// Regenerates checked-in files derived from others: the EgressPolicy CRD (from the Rust
    /// type) and the PrometheusRule (from the plain alert rules).
    Codegen,
    /// Fuzzes policy input (bytes -> objects -> compiled entries) for a bounded time under a
    /// memory limit; fails on a panic, a leak of the limit or a timeout.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Runs the demo: a sandbox with a test pod and external hosts, egret enforcing on it, and
    /// a table of recent connections with their verdicts and counters (needs root).
    Run {
        /// One round: print the table and exit (for tests).
        #[arg(long)]
        once: bool,
    },
    /// Measures what the TC programs cost an allowed flow: iperf3 through a sandbox pod's veth
    /// with and without them, printed as a ratio (needs root and iperf3).
    BenchTc,
    /// Benchmarks the datapath against no enforcement, iptables and nftables with 10 to
    /// 100,000 rules, and prints a markdown table (needs root; about 5 minutes, `--quick` 1).
    Bench {
        /// N = 10 and 100,000 only, one round.
        #[arg(long)]
        quick: bool,
    },
    /// The bench's client, run inside the sandbox's pod (not for direct use).
    #[command(hide = true)]
    BenchClient { args: Vec<String> },
}

fn main() -> ExitCode {
    let Cli { task } = Cli::parse();
    let result = match task {
        Task::Setup => setup::setup(),
        Task::Test => setup::setup().and_then(|()| test()),
        Task::Codegen => setup::setup().and_then(|()| codegen()),
        Task::Image => setup::setup().and_then(|()| image::build().map(drop)),
        Task::Fuzz { seconds } => setup::setup().and_then(|()| fuzz(seconds)),
        Task::Run { once } => setup::setup().and_then(|()| demo::run(once)),
        Task::BenchTc => setup::setup().and_then(|()| bench_tc::run()),
        Task::Bench { quick } => setup::setup().and_then(|()| bench::run(quick)),
        // Runs inside the sandbox: no setup, nothing but the timed loop.
        Task::BenchClient { args } => bench::client(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test() -> anyhow::Result<()> {
    step("rustfmt");
    run(Command::new("cargo").args([&format!("+{NIGHTLY}"), "fmt", "--all", "--", "--check"]))?;
    step("clippy (host crates)");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("clippy (kernel programs, BPF target)");
    run(Command::new("cargo")
        .current_dir("ebpf")
        .args([
            &format!("+{NIGHTLY}"),
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"]))?;
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the end-to-end tests load eBPF programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    step("the container image (`cargo xtask image`; tests/tests/image.rs runs it)");
    image::build()?;
    step("unit and privileged end-to-end tests");
    // The end-to-end tests run the `egret` and `egret-probe` binaries as a user would; `cargo
    // test` alone builds only test harnesses for them.
    run(cargo().args(["build", "--bins"]))?;
    let (passed, failed) = cargo_test()?;
    step("fuzz policy input, 30 seconds (`cargo xtask fuzz`)");
    fuzz(30)?;
    step("the demo, one round (`cargo xtask run --once`)");
    demo::run(true)?;
    // One closing line for the whole run: cargo's own last lines are per test binary.
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn cargo_test() -> anyhow::Result<(u64, u64)> {
    use std::io::BufRead as _;
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("cargo test stdout"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 12 passed; 0 failed; 0 ignored; ..."
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        anyhow::bail!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

/// Peak memory a fuzz input may reach: a few times the largest input plus the agent's baseline.
const FUZZ_RSS_LIMIT_MB: u32 = 1024;

/// Runs the `policy_input` fuzz target (`fuzz/`, its own workspace) for `seconds`, seeded with
/// the example and conformance policies. libFuzzer stops with an error on a panic, an input
/// that takes over 10 s, or one that grows the process past the memory limit.
fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let root = std::env::current_dir()?;
    let corpus = root.join("target/fuzz-corpus/policy_input");
    std::fs::create_dir_all(&corpus)?;
    run(Command::new("cargo")
        .current_dir("fuzz")
        .args([&format!("+{NIGHTLY}"), "fuzz", "run", "policy_input"])
        .arg(&corpus)
        .arg(root.join("manifests/examples/local/policies"))
        .arg(root.join("tests/conformance/netpol"))
        .arg(root.join("tests/conformance/egresspolicy"))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            &format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}"),
            "-timeout=10",
            "-max_len=16384",
            "-print_final_stats=1",
        ]))
}

fn codegen() -> anyhow::Result<()> {
    let yaml = setup::capture(cargo().args(["run", "--quiet", "-p", "egret", "--", "crd"]))?;
    let path = std::path::Path::new("manifests/crds/egresspolicy.yaml");
    std::fs::create_dir_all("manifests/crds")?;
    std::fs::write(path, yaml)?;
    println!("wrote {}", path.display());

    // The PrometheusRule carries the plain rules file's groups; a test checks they agree.
    let rules = std::fs::read_to_string("manifests/alerts/egret-rules.yaml")?;
    let groups = rules
        .find("groups:")
        .map(|at| &rules[at..])
        .ok_or_else(|| anyhow::anyhow!("manifests/alerts/egret-rules.yaml has no `groups:`"))?;
    let indented: String = groups.lines().map(|l| format!("  {l}\n")).collect();
    let rule = format!(
        "# Generated by `cargo xtask codegen` from manifests/alerts/egret-rules.yaml; do not edit.\n\
         apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: egret\n  namespace: egret-system\n  \
         labels: {{app.kubernetes.io/name: egret}}\nspec:\n{indented}"
    );
    std::fs::write("manifests/components/monitoring/prometheusrule.yaml", rule)?;
    println!("wrote manifests/components/monitoring/prometheusrule.yaml");
    Ok(())
}

fn step(name: &str) {
    println!("==> {name}");
}
