//! Conformance: every case under `tests/conformance/` is run through the `egret explain` binary,
//! on top of the upstream e2e cluster (`base-xyz.yaml`: namespaces x, y, z, pods a, b, c).
//!
//! A case is `<name>.yaml` (its policies) with `<name>.table` and/or `<name>.jsonl`:
//! - `.table`: truth tables like the upstream suite's reachability matrices. `# TCP 80` starts a
//!   table; each row is `<from pod> <9 cells>` over x/a x/b x/c y/a y/b y/c z/a z/b z/c, with `.`
//!   allow, `X` deny, `A` audit.
//! - `.jsonl`: probes with an `expect` of verdict and optionally policy (`Kind ns/name`,
//!   `EgressPolicy name`, or `default`) and rule (`null` for none). A first line
//!   `{"args": [...]}` adds command-line arguments.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance")
}

/// Runs `egret explain --probes -` on `base + case` and returns one answer per probe.
fn explain(case: &Path, args: &[String], probes: &[Value]) -> Vec<Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_egret"))
        .arg("explain")
        .arg("-f")
        .arg(conformance_dir().join("base-xyz.yaml"))
        .arg("-f")
        .arg(case)
        .args(args)
        .args(["--probes", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn egret explain");
    let input: String = probes.iter().map(|p| format!("{p}\n")).collect();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write probes");
    let output = child.wait_with_output().expect("egret explain");
    assert!(
        output.status.success(),
        "egret explain failed on {}: {}",
        case.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("answer is JSON"))
        .collect();
    assert_eq!(
        answers.len(),
        probes.len(),
        "one answer per probe, in order"
    );
    answers
}

fn policy_name(answer: &Value) -> String {
    match &answer["policy"] {
        Value::Null => "default".into(),
        p => match p["namespace"].as_str() {
            Some(ns) => format!(
                "{} {ns}/{}",
                p["kind"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            ),
            None => format!(
                "{} {}",
                p["kind"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            ),
        },
    }
}

fn run_table(case: &Path, table: &Path, failures: &mut Vec<String>) {
    let text = std::fs::read_to_string(table).expect("read table");
    // (protocol, port, from, to, expected verdict)
    let mut expected = Vec::new();
    let mut current: Option<(String, u16)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('#') {
            let mut words = header.split_whitespace();
            if let (Some(proto @ ("TCP" | "UDP" | "SCTP")), Some(port)) =
                (words.next(), words.next())
            {
                current = Some((
                    proto.into(),
                    port.trim_end_matches(':').parse().expect("port"),
                ));
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (from, cells) = line.split_once(' ').expect("row: <pod> <cells>");
        let (proto, port) = current.clone().expect("a `# PROTO PORT` line before rows");
        let cells: Vec<char> = cells.trim().chars().collect();
        assert_eq!(cells.len(), PODS.len(), "{}: row {from}", table.display());
        for (to, cell) in PODS.iter().zip(cells) {
            let verdict = match cell {
                '.' => "allow",
                'X' => "deny",
                'A' => "audit",
                other => panic!("{}: unknown cell {other:?}", table.display()),
            };
            expected.push((
                proto.clone(),
                port,
                from.to_owned(),
                (*to).to_owned(),
                verdict,
            ));
        }
    }
    assert!(!expected.is_empty(), "{} holds no table", table.display());
    let probes: Vec<Value> = expected
        .iter()
        .map(|(proto, port, from, to, _)| json!({"from": from, "to": to, "port": port, "protocol": proto}))
        .collect();
    for ((proto, port, from, to, verdict), answer) in
        expected.iter().zip(explain(case, &[], &probes))
    {
        if answer["verdict"] != *verdict {
            failures.push(format!(
                "{}: {from} -> {to} {proto}/{port}: expected {verdict}, egret says {} ({})",
                table.display(),
                answer["verdict"],
                answer["reason"]
            ));
        }
    }
}

fn run_jsonl(case: &Path, jsonl: &Path, failures: &mut Vec<String>) {
    let text = std::fs::read_to_string(jsonl).expect("read jsonl");
    let mut args = Vec::new();
    let mut probes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).expect("jsonl line");
        if let Some(a) = value.get("args") {
            args = a
                .as_array()
                .expect("args")
                .iter()
                .map(|s| s.as_str().expect("arg").to_owned())
                .collect();
        } else {
            probes.push(value);
        }
    }
    for (probe, answer) in probes.iter().zip(explain(case, &args, &probes)) {
        let expect = &probe["expect"];
        let mut wrong = Vec::new();
        if answer["verdict"] != expect["verdict"] {
            wrong.push(format!(
                "verdict {} (expected {})",
                answer["verdict"], expect["verdict"]
            ));
        }
        if let Some(policy) = expect.get("policy").and_then(Value::as_str)
            && policy_name(&answer) != policy
        {
            wrong.push(format!(
                "policy {} (expected {policy})",
                policy_name(&answer)
            ));
        }
        if let Some(rule) = expect.get("rule")
            && answer["rule"] != *rule
        {
            wrong.push(format!("rule {} (expected {rule})", answer["rule"]));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {probe}: {} -- {}",
                jsonl.display(),
                wrong.join(", "),
                answer["reason"]
            ));
        }
    }
}

fn run_suite(dir: &str) {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(conformance_dir().join(dir))
        .expect("conformance dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in &cases {
        let (table, jsonl) = (case.with_extension("table"), case.with_extension("jsonl"));
        assert!(
            table.exists() || jsonl.exists(),
            "{} has no expectations",
            case.display()
        );
        if table.exists() {
            run_table(case, &table, &mut failures);
        }
        if jsonl.exists() {
            run_jsonl(case, &jsonl, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} wrong answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn networkpolicy_egress_conformance() {
    run_suite("netpol");
}

#[test]
fn egresspolicy_conformance() {
    run_suite("egresspolicy");
}

#[test]
fn invalid_policy_is_reported_with_object_and_field() {
    let case = conformance_dir().join("netpol/20-invalid-policy-rejected-others-compile.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["explain", "-f"])
        .arg(conformance_dir().join("base-xyz.yaml"))
        .arg("-f")
        .arg(&case)
        .args(["--from", "x/a", "--to", "192.0.2.1", "--port", "80"])
        .output()
        .expect("egret explain");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{} document 0: NetworkPolicy x/broken: spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"198.51.100.0/33\": must be a valid CIDR value",
            case.display()
        )),
        "{stderr}"
    );
}
