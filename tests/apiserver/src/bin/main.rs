//! `egret-test-apiserver`: the in-memory Kubernetes API server of egret's tests, for manual
//! runs. `--kubeconfig-out` writes a kubeconfig that points kubectl and kube-rs at it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use egret_test_apiserver::{ApiServer, Config};

/// An in-memory Kubernetes API server over plain HTTP, for tests.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Writes a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Preloads the YAML (or JSON) objects of every file in this directory.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egret-test-apiserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        listen,
        kubeconfig_out,
        seed,
        bookmark_interval,
    } = cli;
    let config = Config {
        bookmark_interval: Duration::from_secs(bookmark_interval.max(1)),
        ..Config::default()
    };
    let server = ApiServer::start(listen, config)?;
    if let Some(dir) = seed {
        let n = server.seed_dir(&dir)?;
        tracing::info!(objects = n, dir = %dir.display(), "seeded");
    }
    if let Some(path) = kubeconfig_out {
        server.write_kubeconfig(&path)?;
        tracing::info!(path = %path.display(), "wrote kubeconfig");
    }
    println!("{}", server.url());
    server
        .wait_for_ctrl_c()
        .context("failed to wait for Ctrl-C")?;
    Ok(())
}
