//! Rebuilds the kernel programs when bpf-linker changes: it is the programs' linker, and cargo
//! does not track it otherwise.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
