//! The alert rules: valid, unit-tested with `promtool test rules` against input series, and the
//! same in the plain rules file and the PrometheusRule.

use std::{path::Path, process::Command};

fn manifests() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(manifests().join("alerts"))
        .output()
        .unwrap_or_else(|e| panic!("promtool is missing ({e}): `cargo xtask setup` installs Debian's prometheus package"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "egret-rules.yaml"]);
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    let out = promtool(&["test", "rules", "egret-rules.test.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheusrule_carries_the_same_groups() {
    let read = |p: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(manifests().join(p)).expect("read"))
            .expect("yaml")
    };
    let rules = read("alerts/egret-rules.yaml");
    let crd = read("components/monitoring/prometheusrule.yaml");
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(
        crd["spec"]["groups"], rules["groups"],
        "manifests/components/monitoring/prometheusrule.yaml is stale: run `cargo xtask codegen`"
    );
}
