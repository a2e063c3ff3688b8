//! `cargo xtask image`: egret's container image, `FROM scratch` with one static binary, built
//! offline with Debian's podman (or buildah) and tagged with the crate version as the DaemonSet
//! references it.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{cargo, setup::run};

/// The musl target: a static binary needs nothing from the image.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The repository the DaemonSet pulls from (`manifests/base/daemonset.yaml`).
pub const REPOSITORY: &str = "ghcr.io/egret-dev/egret";

/// The crate version, as the image tag.
pub fn version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string("Cargo.toml").context("read Cargo.toml")?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_owned)
        .context("no workspace version in Cargo.toml")
}

/// Builds the static binary and the image; returns the image's tag.
pub fn build() -> anyhow::Result<String> {
    crate::setup::ensure_image_tools()?;
    let version = version()?;
    // ring's C and assembly need a musl C compiler for this target.
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "egret",
            "--bin",
            "egret",
            "--target",
            TARGET,
        ])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc"))?;
    let binary = PathBuf::from(format!("target/{TARGET}/release/egret"));
    let context = PathBuf::from("target/image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("egret"))
        .with_context(|| format!("copy {}", binary.display()))?;
    let tag = format!("{REPOSITORY}:{version}");
    let builder = if Command::new("podman").arg("--version").output().is_ok() {
        "podman"
    } else {
        "buildah"
    };
    run(Command::new(builder)
        .args(["build", "--pull=never", "-f", "Containerfile"])
        .args(["--build-arg", &format!("VERSION={version}")])
        .args(["-t", &tag, "-t", &format!("egret:{version}")])
        .arg(&context))
    .with_context(|| format!("{builder} build"))?;
    println!("built {tag} (also egret:{version})");
    Ok(tag)
}
