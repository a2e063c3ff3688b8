//! Builds the kernel programs (`ebpf/`) for the BPF target and leaves the object in `OUT_DIR`,
//! where `datapath::loader` embeds it.
use std::path::Path;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    if std::env::var_os("AYA_BUILD_SKIP").is_none() && which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not installed; `cargo xtask setup` installs it (the README's commands run it for you)"
        );
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("..").join("ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to ebpf/")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egret-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which(binary: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}
