//! Developer tasks: `cargo xtask setup | test | run`. Each installs what is missing first.

mod demo;
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
    /// Regenerates checked-in files derived from code: the EgressPolicy CRD.
    Codegen,
    /// Runs the demo: a sandbox with a test pod and external hosts, egret enforcing on it, and
    /// a table of recent connections with their verdicts and counters (needs root).
    Run {
        /// One round: print the table and exit (for tests).
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let Cli { task } = Cli::parse();
    let result = match task {
        Task::Setup => setup::setup(),
        Task::Test => setup::setup().and_then(|()| test()),
        Task::Codegen => setup::setup().and_then(|()| codegen()),
        Task::Run { once } => setup::setup().and_then(|()| demo::run(once)),
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
    step("unit and privileged end-to-end tests");
    // The end-to-end tests run the `egret` and `egret-probe` binaries as a user would; `cargo
    // test` alone builds only test harnesses for them.
    run(cargo().args(["build", "--bins"]))?;
    run(cargo().args(["test", "--no-fail-fast"]))?;
    step("the demo, one round (`cargo xtask run --once`)");
    demo::run(true)?;
    Ok(())
}

fn codegen() -> anyhow::Result<()> {
    let yaml = setup::capture(cargo().args(["run", "--quiet", "-p", "egret", "--", "crd"]))?;
    let path = std::path::Path::new("manifests/crds/egresspolicy.yaml");
    std::fs::create_dir_all("manifests/crds")?;
    std::fs::write(path, yaml)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn step(name: &str) {
    println!("==> {name}");
}
