//! Installs what building egret needs and the machine lacks, idempotently: the nightly's
//! `rust-src` (the BPF target builds `core` from source) and bpf-linker 0.13 built against the
//! nightly's own LLVM, Debian's prometheus and kubectl, and cargo-fuzz. A machine that has them
//! pays a few `--version` calls.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The toolchain aya-build compiles the kernel programs with.
pub const NIGHTLY: &str = "nightly";
/// bpf-linker releases that work with aya 0.14 and an LLVM 22 nightly.
const BPF_LINKER_VERSION: &str = "0.13";

pub fn setup() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_prometheus()?;
    ensure_kubectl()?;
    ensure_cargo_fuzz()?;
    ensure_iperf3()?;
    Ok(())
}

/// Installs Debian `packages` (as root, from the package archive) for `why`.
fn apt_install(packages: &[&str], why: &str) -> anyhow::Result<()> {
    println!("setup: installing Debian's {} ({why})", packages.join(", "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| {
        format!(
            "failed to install {} (needs root and Debian's package archive)",
            packages.join(", ")
        )
    })
}

/// What `cargo xtask image` (which `cargo xtask test` runs) needs, installed only by it (the
/// demo needs none of it): the musl target, musl-gcc (ring's C for
/// that target), podman to build and run the image, and runc (crun, podman's default, refuses
/// the hybrid cgroup layout of these machines).
pub fn ensure_image_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("podman", "podman"),
        ("runc", "runc"),
        ("musl-gcc", "musl-tools"),
    ]
    .into_iter()
    .filter(|(binary, _)| {
        capture(Command::new("sh").args(["-c", &format!("command -v {binary}")])).is_err()
    })
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        apt_install(&missing, "the container image and its test")?;
    }
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l == crate::image::TARGET) {
        println!(
            "setup: adding the {} target (the image's static binary)",
            crate::image::TARGET
        );
        run(Command::new("rustup").args(["target", "add", crate::image::TARGET]))?;
    }
    Ok(())
}

/// kubectl: the test API server's tests drive the real one against it. These machines ship the
/// `kubectl` package; where it is missing, apt installs it, or Debian's older
/// `kubernetes-client` where no archive carries `kubectl`.
fn ensure_kubectl() -> anyhow::Result<()> {
    if capture(Command::new("kubectl").args(["version", "--client"])).is_ok() {
        return Ok(());
    }
    println!("setup: installing kubectl (Debian's kubectl, else kubernetes-client)");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let install = |package: &str| {
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    install("kubectl")
        .or_else(|_| install("kubernetes-client"))
        .context("failed to install kubectl (needs root and Debian's package archive)")
}

/// cargo-fuzz, for `cargo xtask fuzz` (and its bounded run in `cargo xtask test`).
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if capture(Command::new("cargo").args(["fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz (the policy-input fuzz target runs under it)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("failed to install cargo-fuzz")
}

/// Debian's `iperf3`, for `cargo xtask bench-tc`.
fn ensure_iperf3() -> anyhow::Result<()> {
    if capture(Command::new("iperf3").arg("--version")).is_ok() {
        return Ok(());
    }
    apt_install(&["iperf3"], "cargo xtask bench-tc")
}

/// Debian's `prometheus` package: the alert tests run its `promtool`, and the end-to-end test
/// scrapes egret with a real Prometheus.
fn ensure_prometheus() -> anyhow::Result<()> {
    if capture(Command::new("promtool").arg("--version")).is_ok()
        && capture(Command::new("prometheus").arg("--version")).is_ok()
    {
        return Ok(());
    }
    apt_install(&["prometheus"], "prometheus and promtool")
}

fn ensure_nightly() -> anyhow::Result<()> {
    let out = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    if !out.lines().any(|l| l.starts_with(NIGHTLY)) {
        bail!(
            "the `{NIGHTLY}` toolchain is missing; egret's kernel programs need it \
             (`rustup toolchain install {NIGHTLY}`)"
        );
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: installing rust-src for the {NIGHTLY} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = capture(Command::new("bpf-linker").arg("--version"))
        && version
            .split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(&format!("{BPF_LINKER_VERSION}.")))
    {
        return Ok(());
    }
    let (prefix, major) = llvm_prefix()?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY} toolchain's LLVM {major} \
         (LLVM_PREFIX={}); this takes a few minutes, once",
        prefix.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("failed to build bpf-linker")?;
    Ok(())
}

/// A directory whose `lib/` holds `libLLVM.so` (and the versioned name bpf-linker links
/// against) as links to the nightly's own LLVM, which ships no development files. It lives
/// outside the work tree: the installed bpf-linker finds its LLVM there at run time.
fn llvm_prefix() -> anyhow::Result<(PathBuf, String)> {
    let sysroot = capture(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    )?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("failed to list {}", sysroot_lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map_or_else(|| Path::new(&home).join(".cache"), PathBuf::from);
    let prefix = cache.join("egret").join(format!("llvm-{major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        symlink(sysroot_lib.join(&llvm), &link)
            .with_context(|| format!("failed to link {}", link.display()))?;
    }
    Ok((prefix, major))
}

/// Runs a command, failing with its name when it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn capture(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
