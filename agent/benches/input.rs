//! Peak memory and time of loading hostile or large policy input:
//! `cargo bench -p egret --bench input`. Prints one line per scenario: a 50 MB file at the
//! default per-file cap (refused from its size), the same file with the caps raised so it is
//! parsed (memory relative to the accepted input), a file just under the default cap, and an
//! alias bomb. Each scenario runs in a fresh process (this binary, re-executed), and its peak
//! resident memory comes from the kernel (`VmHWM` minus the resident size before loading), so
//! it is what loading really used. Loading is `cluster::load`: the snapshot read and the
//! `PolicyStore` load the local source makes on every reload, then the world built from it.

use std::{path::Path, time::Instant};

use egret::policy::cluster::{self, Limits};

/// `VmHWM` or `VmRSS` of this process, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// NetworkPolicies with distinct names, about `bytes` of them.
fn many_policies(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 1024);
    let mut i = 0;
    while text.len() < bytes {
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-{i}, namespace: ns-{}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20 - to: [{{ipBlock: {{cidr: 10.{}.{}.0/24, except: [10.{}.{}.128/25]}}}}]\n    ports: [{{protocol: TCP, port: 443}}, {{protocol: UDP, port: 53}}]\n",
            i % 100,
            i / 256 % 256,
            i % 256,
            i / 256 % 256,
            i % 256
        ));
        i += 1;
    }
    text
}

fn alias_bomb() -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bomb}\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text
}

/// One scenario, in this process: writes the input, drops it, then loads it.
fn scenario(name: &str, dir: &Path, text: String, limits: Limits) {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, &text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let input_mib = text.len() as f64 / (1024.0 * 1024.0);
    drop(text);
    // The peak so far is the generated text: start counting from what is resident now.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    let (world, errors) = cluster::load(&[dir.to_path_buf()], limits);
    let took = start.elapsed();
    let peak = status_kib("VmHWM:").saturating_sub(before);
    println!(
        "{name:<44} input {input_mib:>7.1} MiB  peak +{:>8.1} MiB ({:>5.1}x input)  {:>8.1?}  {} policies loaded, {} errors{}",
        peak as f64 / 1024.0,
        peak as f64 / 1024.0 / input_mib,
        took,
        world.network_policies.len(),
        errors.len(),
        errors
            .first()
            .map(|e| format!(": {}", e.to_string().chars().take(110).collect::<String>()))
            .unwrap_or_default()
    );
    let _ = std::fs::remove_file(&file);
}

const SCENARIOS: [&str; 4] = [
    "50 MB file, default limits (refused)",
    "50 MB file, caps raised to 64 MiB (parsed)",
    "2.9 MB file, default limits (parsed)",
    "alias bomb (refused by the parser)",
];

fn main() {
    let Ok(which) = std::env::var("EGRET_BENCH_SCENARIO") else {
        // Each scenario in its own process, so one's peak is not hidden by another's.
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        for (i, name) in SCENARIOS.iter().enumerate() {
            let status = std::process::Command::new(&exe)
                .env("EGRET_BENCH_SCENARIO", i.to_string())
                .status()
                .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
            assert!(status.success(), "{name}: {status}");
        }
        return;
    };
    let index: usize = which.parse().unwrap_or(usize::MAX);
    let dir = std::env::temp_dir().join(format!("egret-bench-input-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let raised = Limits {
        max_file_bytes: 64 * 1024 * 1024,
        max_directory_bytes: 64 * 1024 * 1024,
    };
    match index {
        0 => scenario(
            SCENARIOS[0],
            &dir,
            many_policies(50_000_000),
            Limits::default(),
        ),
        1 => scenario(SCENARIOS[1], &dir, many_policies(50_000_000), raised),
        2 => scenario(
            SCENARIOS[2],
            &dir,
            many_policies(2_900_000),
            Limits::default(),
        ),
        3 => scenario(SCENARIOS[3], &dir, alias_bomb(), Limits::default()),
        _ => panic!("no scenario {which}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
