//! What a connection attempt came to, as `egret-probe` reports it, and how to run the probe.

use std::{io, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The outcome of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// TCP handshake completed.
    Connected,
    /// Datagram handed to the network stack.
    Sent,
    /// `EPERM`: egret (or another cgroup program) rejected the syscall.
    Denied,
    /// `ECONNREFUSED`: the destination was reached, nothing listened.
    Refused,
    /// No answer in time.
    Timeout,
    /// No route to the destination.
    Unreachable,
    /// Any other error.
    Error,
}

impl Outcome {
    /// Classifies a socket error.
    pub fn from_error(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM) => Self::Denied,
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::ETIMEDOUT) => Self::Timeout,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Self::Unreachable,
            _ => Self::Error,
        }
    }
}

/// One line of the probe's output.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Attempt {
    pub protocol: String,
    pub target: String,
    pub outcome: Outcome,
}

/// Parses the probe's JSON lines.
pub fn parse_attempts(stdout: &str) -> Result<Vec<Attempt>, serde_json::Error> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

/// Path of the `egret-probe` binary: `EGRET_PROBE` if set, else next to the running executable
/// (cargo puts test binaries in `deps/`, beside which the workspace's binaries are built).
pub fn probe_binary() -> PathBuf {
    binary("EGRET_PROBE", "egret-probe")
}

/// Path of the `egret` binary, found like [`probe_binary`] (`EGRET_BIN` overrides).
pub fn egret_binary() -> PathBuf {
    binary("EGRET_BIN", "egret")
}

fn binary(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no `{name}` binary beside {}: build it first (`cargo build --bins`; `cargo xtask test` does) or set {var}",
                exe.display()
            )
        })
}
