//! Running `egret run` (local mode) in a sandbox, for tests and the demo: its config, its logs,
//! and plain HTTP GETs to what it serves.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::probe::egret_binary;

/// A running `egret run`, killed on drop.
pub struct EgretRun {
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl EgretRun {
    /// Starts `egret run --config <dir>/egret.yaml`, pinning under `pin_dir` and attaching to
    /// `cgroup`; stdout and stderr go to files in `dir`.
    pub fn start(
        dir: &Path,
        pin_dir: &Path,
        cgroup: &Path,
        report_interval: &str,
    ) -> std::io::Result<Self> {
        Self::start_with(dir, pin_dir, cgroup, report_interval, &[], "")
    }

    /// [`Self::start`] with more arguments to `egret run`, logging to files named with `suffix`.
    pub fn start_with(
        dir: &Path,
        pin_dir: &Path,
        cgroup: &Path,
        report_interval: &str,
        args: &[&str],
        suffix: &str,
    ) -> std::io::Result<Self> {
        let stdout = dir.join(format!("stdout{suffix}.log"));
        let stderr = dir.join(format!("stderr{suffix}.log"));
        let child = Command::new(egret_binary())
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["run", "--report-interval", report_interval, "--cgroup"])
            .arg(cgroup)
            .arg("--config")
            .arg(dir.join("egret.yaml"))
            .args(args)
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times; panics with the log after `within`.
    pub fn wait_log(&self, needle: &str, count: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "egret run never logged {needle:?} x{count}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address it serves metrics on, from its log.
    pub fn metrics_address(&self) -> Option<String> {
        metrics_address_in(&self.log())
    }
}

/// The address an egret process serves metrics on, from its log (`egret run` and `egret agent`
/// log it alike).
pub fn metrics_address_in(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("serving metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .map(str::to_owned)
}

impl Drop for EgretRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the example policies the README walks through to `to`, so a test can edit them.
pub fn copy_example_policies(to: &Path) -> std::io::Result<()> {
    let examples =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/local/policies");
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(&examples)?.flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// A plain HTTP/1.1 GET on loopback; returns the whole response, status line first.
pub fn http_get(address: &str, path_and_query: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Percent-encodes a URL query value.
pub fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Samples of `metric` in a Prometheus text exposition: (label text, value).
pub fn samples<'a>(
    exposition: &'a str,
    metric: &'a str,
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    exposition.lines().filter_map(move |line| {
        let rest = line.strip_prefix(metric)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(inner) => inner.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

/// Sum of the samples of `metric` whose labels contain every one of `needles`.
pub fn sum(exposition: &str, metric: &str, needles: &[&str]) -> u64 {
    samples(exposition, metric)
        .filter(|(labels, _)| needles.iter().all(|n| labels.contains(n)))
        .map(|(_, v)| v as u64)
        .sum()
}

/// The distinct `destination_ip` values of `egret_egress_connections_total`.
pub fn destinations(exposition: &str) -> std::collections::BTreeSet<String> {
    samples(exposition, "egret_egress_connections_total")
        .filter_map(|(labels, _)| {
            Some(
                labels
                    .split("destination_ip=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .to_owned(),
            )
        })
        .collect()
}
