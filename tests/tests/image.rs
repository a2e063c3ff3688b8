//! The container image `cargo xtask image` builds (`cargo xtask test` builds it before the
//! tests): it runs as the DaemonSet runs it, a static egret `FROM scratch`, and answers
//! `--version` and an `egret explain` exactly as the host's build does. Run with podman and
//! Debian's runc (crun, podman's default, refuses the hybrid cgroup layout of these machines),
//! with explicit limits (runc may not raise the host's process limit).
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{path::Path, process::Command};

use egret_tests::probe::egret_binary;

fn image() -> String {
    format!("ghcr.io/egret-dev/egret:{}", egret::VERSION)
}

/// `podman run` of the image with `args`, `volume` mounted read-only at /policies.
fn podman_run(args: &[&str], volume: Option<&Path>) -> std::process::Output {
    let mut command = Command::new("podman");
    command.args([
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        "none",
        "--read-only",
    ]);
    if let Some(dir) = volume {
        command
            .arg("-v")
            .arg(format!("{}:/policies:ro", dir.display()));
    }
    command
        .arg(image())
        .args(args)
        .output()
        .expect("podman (`cargo xtask setup` installs it)")
}

#[test]
fn the_image_runs_egret_and_explains_as_the_host_build_does() {
    let exists = Command::new("podman")
        .args(["image", "exists", &image()])
        .status()
        .expect("podman (`cargo xtask setup` installs it)");
    assert!(
        exists.success(),
        "no image {}: build it with `cargo xtask image` (`cargo xtask test` does)",
        image()
    );
    let inspect = Command::new("podman")
        .args([
            "image",
            "inspect",
            "--format",
            "{{json .Config.Entrypoint}}",
            &image(),
        ])
        .output()
        .expect("podman inspect");
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        r#"["/usr/bin/egret"]"#
    );

    let version = podman_run(&["--version"], None);
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("egret {}", egret::VERSION)
    );

    // The upstream e2e cluster and one policy: z/c may reach x only on 80.
    let dir = std::env::temp_dir().join(format!("egret-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/base-xyz.yaml"),
        dir.join("base.yaml"),
    )
    .expect("cluster");
    std::fs::write(
        dir.join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c-to-x, namespace: z}\n\
         spec:\n  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{namespaceSelector: {matchLabels: {ns: x}}}]\n    ports: [{port: 80, protocol: TCP}]\n",
    )
    .expect("policy");
    let explain = |port: &str| -> [String; 2] {
        let args = [
            "explain",
            "-f",
            "/policies",
            "--from",
            "z/c",
            "--to",
            "x/a",
            "--port",
            port,
            "-o",
            "json",
        ];
        let inside = podman_run(&args, Some(&dir));
        assert!(
            inside.status.success(),
            "egret explain in the image: {}",
            String::from_utf8_lossy(&inside.stderr)
        );
        let mut host_args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        host_args[2] = dir.display().to_string();
        let host = Command::new(egret_binary())
            .args(&host_args)
            .output()
            .expect("egret explain");
        [inside.stdout, host.stdout].map(|o| String::from_utf8_lossy(&o).into_owned())
    };
    let [inside, host] = explain("80");
    assert_eq!(inside, host);
    let answer: serde_json::Value = serde_json::from_str(&inside).expect("JSON");
    assert_eq!(answer["verdict"], "allow", "{answer}");
    let [inside, host] = explain("81");
    assert_eq!(inside, host);
    let answer: serde_json::Value = serde_json::from_str(&inside).expect("JSON");
    assert_eq!(answer["verdict"], "deny", "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}
