//! Bad input, one case per row: numbers and ranges, CIDRs and excepts, ports and endPort,
//! protocols, selectors and labels, names and duplicates, unknown kinds and apiVersions, every
//! EgressPolicy field, and file-level garbage (tabs, binary, non-UTF-8, alias bombs, deep
//! nesting, huge files, FIFOs, devices, symlink loops, unreadable files, directory cycles).
//!
//! Each case is written as `bad.yaml` beside a valid `good.yaml` in a fresh directory and
//! loaded as `egret run` and `egret explain` load it. It must be rejected with exactly the
//! expected message (file and document, kind, namespace and name, field path, offending value
//! and the rule), the valid file must still load, and `egret explain` must print the same
//! message.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use egret::policy::cluster::{self, Limits};

/// A valid policy beside every bad one: it must load whatever the bad file holds.
const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: good}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: good, labels: {app: p}}\nstatus: {podIP: 192.0.2.7}\n---\n\
apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-dns, namespace: good}\n\
spec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: UDP, port: 53}]\n";

fn np(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec:\n{spec}"
    )
}

/// A NetworkPolicy with one egress rule.
fn egress(rule: &str) -> String {
    np(&format!(
        "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - {rule}\n"
    ))
}

fn ep(spec: &str) -> String {
    format!(
        "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: bad}}\nspec:\n{spec}"
    )
}

/// An EgressPolicy with one rule.
fn ep_rule(rule: &str) -> String {
    ep(&format!(
        "  priority: 10\n  subject: {{podSelector: {{}}}}\n  rules:\n  - {rule}\n"
    ))
}

fn pod(body: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\n{body}")
}

/// What a case writes into its directory.
enum Input {
    Yaml(String),
    Bytes(Vec<u8>),
    Setup(fn(&Path)),
}

struct Case {
    name: &'static str,
    input: Input,
    /// The expected messages, with the case directory written as `DIR`; a message must start
    /// with its expectation (they stop where an upstream library's wording begins).
    expect: Vec<String>,
}

fn case(name: &'static str, yaml: String, expect: &str) -> Case {
    Case {
        name,
        input: Input::Yaml(yaml),
        expect: vec![expect.to_owned()],
    }
}

const NP_PORT: &str = "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.egress[0].ports[0]";
const NP_PEER: &str = "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.egress[0].to[0]";
const EP_RULE: &str = "DIR/bad.yaml document 0: EgressPolicy bad: spec.rules[0]";
const RANGE: &str = "must be between 1 and 65535, inclusive";
const BAD_CIDR: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
const LABEL_VALUE: &str =
    "a valid label must be an empty string or consist of alphanumeric characters";
const LABEL_NAME: &str = "name part must consist of alphanumeric characters";
const SUBDOMAIN: &str =
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters";
const DNS_LABEL: &str =
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters";
const PROTOCOLS: &str = "supported values: \"TCP\", \"UDP\", \"SCTP\"";

fn cases() -> Vec<Case> {
    let mut cases = vec![
        // Numbers and ranges; ports and endPort.
        case("port above range", egress("ports: [{port: 70000}]"), &format!("{NP_PORT}.port: Invalid value: 70000: {RANGE}")),
        case("port zero", egress("ports: [{port: 0}]"), &format!("{NP_PORT}.port: Invalid value: 0: {RANGE}")),
        case("port negative", egress("ports: [{port: -1}]"), &format!("{NP_PORT}.port: Invalid value: -1: {RANGE}")),
        case("port float", egress("ports: [{port: 80.5}]"), &format!("{NP_PORT}.port: ")),
        case("port beyond i64", egress("ports: [{port: 99999999999999999999}]"), &format!("{NP_PORT}.port: ")),
        case("port as list", egress("ports: [{port: [1, 2]}]"), &format!("{NP_PORT}.port: ")),
        case("endPort above range", egress("ports: [{port: 80, endPort: 70000}]"), &format!("{NP_PORT}.endPort: Invalid value: 70000: {RANGE}")),
        case("endPort below port", egress("ports: [{port: 90, endPort: 80}]"), &format!("{NP_PORT}.endPort: Invalid value: 80: must be greater than or equal to `port` 90")),
        case("endPort without port", egress("ports: [{endPort: 80}]"), &format!("{NP_PORT}.endPort: Forbidden: may not be specified when `port` is not specified")),
        case("endPort with named port", egress("ports: [{port: http, endPort: 90}]"), &format!("{NP_PORT}.endPort: Forbidden: may not be specified when `port` is non-numeric")),
        case("port number as string", egress("ports: [{port: \"80\"}]"), &format!("{NP_PORT}.port: Invalid value: \"80\": must be an IANA_SVC_NAME")),
        case("port name too long", egress("ports: [{port: abcdefghijklmnop}]"), &format!("{NP_PORT}.port: Invalid value: \"abcdefghijklmnop\": must be an IANA_SVC_NAME")),
        case("port name upper case", egress("ports: [{port: HTTP}]"), &format!("{NP_PORT}.port: Invalid value: \"HTTP\": must be an IANA_SVC_NAME")),
        case("endPort as string", egress("ports: [{port: 80, endPort: \"90\"}]"), &format!("{NP_PORT}.endPort: ")),
        // Protocols.
        case("protocol ICMP", egress("ports: [{protocol: ICMP, port: 1}]"), &format!("{NP_PORT}.protocol: Unsupported value: \"ICMP\": {PROTOCOLS}")),
        case("protocol lower case", egress("ports: [{protocol: tcp, port: 1}]"), &format!("{NP_PORT}.protocol: Unsupported value: \"tcp\": {PROTOCOLS}")),
        case("protocol number", egress("ports: [{protocol: 6, port: 1}]"), &format!("{NP_PORT}.protocol: ")),
        // CIDRs and excepts.
        case("cidr prefix 33", egress("to: [{ipBlock: {cidr: 10.0.0.0/33}}]"), &format!("{NP_PEER}.ipBlock.cidr: Invalid value: \"10.0.0.0/33\": {BAD_CIDR}")),
        case("cidr not an address", egress("to: [{ipBlock: {cidr: not-a-cidr}}]"), &format!("{NP_PEER}.ipBlock.cidr: Invalid value: \"not-a-cidr\": {BAD_CIDR}")),
        case("cidr octet 300", egress("to: [{ipBlock: {cidr: 300.1.1.1/8}}]"), &format!("{NP_PEER}.ipBlock.cidr: Invalid value: \"300.1.1.1/8\": {BAD_CIDR}")),
        case("cidr empty", egress("to: [{ipBlock: {cidr: \"\"}}]"), &format!("{NP_PEER}.ipBlock.cidr: Required value: cidr is required")),
        case("cidr ipv6 prefix 129", egress("to: [{ipBlock: {cidr: \"2001:db8::/129\"}}]"), &format!("{NP_PEER}.ipBlock.cidr: Invalid value: \"2001:db8::/129\": {BAD_CIDR}")),
        case("cidr without prefix", egress("to: [{ipBlock: {cidr: 10.0.0.1}}]"), &format!("{NP_PEER}.ipBlock.cidr: Invalid value: \"10.0.0.1\": {BAD_CIDR}")),
        case("except outside cidr", egress("to: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.0.2.0/24]}}]"), &format!("{NP_PEER}.ipBlock.except[0]: Invalid value: \"192.0.2.0/24\": must be a strict subset of `cidr` 10.0.0.0/8")),
        case("except equal to cidr", egress("to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]"), &format!("{NP_PEER}.ipBlock.except[0]: Invalid value: \"10.0.0.0/8\": must be a strict subset of `cidr` 10.0.0.0/8")),
        case("except other family", egress("to: [{ipBlock: {cidr: 0.0.0.0/0, except: [\"::ffff:0:0/96\"]}}]"), &format!("{NP_PEER}.ipBlock.except[0]: Invalid value: \"::ffff:0:0/96\": must be of the same IP family as cidr 0.0.0.0/0")),
        case("except invalid", egress("to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/99]}}]"), &format!("{NP_PEER}.ipBlock.except[0]: Invalid value: \"10.1.0.0/99\": {BAD_CIDR}")),
        // Peers and policy types.
        case("ipBlock with podSelector", egress("to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]"), &format!("{NP_PEER}: Forbidden: may not specify both ipBlock and another peer")),
        case("empty peer", egress("to: [{}]"), &format!("{NP_PEER}: Required value: must specify a peer")),
        case("policyTypes unknown", np("  podSelector: {}\n  policyTypes: [Egress, Sideways]\n"), "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.policyTypes[1]: Unsupported value: \"Sideways\": supported values: \"Ingress\", \"Egress\""),
        case("policyTypes duplicate", np("  podSelector: {}\n  policyTypes: [Egress, Egress]\n"), "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.policyTypes[1]: Duplicate value: \"Egress\""),
        case("spec missing", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\n".into(), "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec: Required value: spec is required"),
        case("ingress rule checked too", np("  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n"), &format!("DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.ingress[0].ports[0].port: Invalid value: 0: {RANGE}")),
        case("unknown field", egress("tos: [{ipBlock: {cidr: 10.0.0.0/8}}]"), "DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.egress[0].tos: unknown field (strict decoding, as `kubectl apply` validates)"),
        // Selectors and labels.
        case("operator unknown", egress("to: [{podSelector: {matchExpressions: [{key: a, operator: Foo}]}}]"), &format!("{NP_PEER}.podSelector.matchExpressions[0].operator: Unsupported value: \"Foo\": supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"")),
        case("In without values", egress("to: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]"), &format!("{NP_PEER}.podSelector.matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or 'NotIn'")),
        case("Exists with values", egress("to: [{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]"), &format!("{NP_PEER}.podSelector.matchExpressions[0].values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'")),
        case("expression key invalid", egress("to: [{podSelector: {matchExpressions: [{key: \"bad key!\", operator: Exists}]}}]"), &format!("{NP_PEER}.podSelector.matchExpressions[0].key: Invalid value: \"bad key!\": {LABEL_NAME}")),
        case("expression value invalid", egress("to: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [\"a b\"]}]}}]"), &format!("{NP_PEER}.namespaceSelector.matchExpressions[0].values[0]: Invalid value: \"a b\": {LABEL_VALUE}")),
        case("matchLabels key invalid", egress("to: [{podSelector: {matchLabels: {-x: y}}}]"), &format!("{NP_PEER}.podSelector.matchLabels: Invalid value: \"-x\": {LABEL_NAME}")),
        case("matchLabels value invalid", egress("to: [{podSelector: {matchLabels: {app: \"a b\"}}}]"), &format!("{NP_PEER}.podSelector.matchLabels[app]: Invalid value: \"a b\": {LABEL_VALUE}")),
        case("matchLabels value not a string", egress("to: [{podSelector: {matchLabels: {app: 1}}}]"), &format!("{NP_PEER}.podSelector.matchLabels.app: ")),
        case("podSelector of the policy invalid", np("  podSelector: {matchLabels: {\"a/b/c\": x}}\n  policyTypes: [Egress]\n"), &format!("DIR/bad.yaml document 0: NetworkPolicy x/bad: spec.podSelector.matchLabels: Invalid value: \"a/b/c\": {LABEL_NAME}")),
        case("metadata label value too long", format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x, labels: {{a: {}}}}}\nspec: {{podSelector: {{}}}}\n", "v".repeat(64)), &format!("DIR/bad.yaml document 0: NetworkPolicy x/bad: metadata.labels[a]: Invalid value: \"{}\": {LABEL_VALUE}", "v".repeat(64))),
        case("namespace label key prefix upper case", "apiVersion: v1\nkind: Namespace\nmetadata: {name: bad, labels: {Example.com/team: a}}\n".into(), &format!("DIR/bad.yaml document 0: Namespace bad: metadata.labels: Invalid value: \"Example.com/team\": {LABEL_NAME}")),
        // Names and duplicates.
        case("name missing", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x}\nspec: {podSelector: {}}\n".into(), "DIR/bad.yaml document 0: NetworkPolicy x/<unnamed>: metadata.name: Required value: name or generateName is required"),
        case("name with underscore and bang", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name!, namespace: x}\nspec: {podSelector: {}}\n".into(), &format!("DIR/bad.yaml document 0: NetworkPolicy x/Bad_Name!: metadata.name: Invalid value: \"Bad_Name!\": {SUBDOMAIN}")),
        case("name too long", format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}, namespace: x}}\nspec: {{podSelector: {{}}}}\n", "a".repeat(254)), &format!("DIR/bad.yaml document 0: NetworkPolicy x/{}: metadata.name: Invalid value: \"{}\": {SUBDOMAIN}", "a".repeat(254), "a".repeat(254))),
        case("namespace invalid", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: Bad_NS}\nspec: {podSelector: {}}\n".into(), &format!("DIR/bad.yaml document 0: NetworkPolicy Bad_NS/bad: metadata.namespace: Invalid value: \"Bad_NS\": {DNS_LABEL}")),
        case("Namespace name with a dot", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n".into(), &format!("DIR/bad.yaml document 0: Namespace a.b: metadata.name: Invalid value: \"a.b\": {DNS_LABEL}")),
        case("name not a string", "apiVersion: v1\nkind: Namespace\nmetadata: {name: [a]}\n".into(), "DIR/bad.yaml document 0: Namespace <unnamed>: metadata.name: "),
        Case {
            name: "duplicate in one file",
            input: Input::Yaml(format!("{}---\n{}", egress("ports: [{port: 80}]"), egress("ports: [{port: 81}]"))),
            expect: vec![
                "DIR/bad.yaml document 0: NetworkPolicy x/bad: metadata.name: Duplicate value: \"bad\": also defined at DIR/bad.yaml document 1; neither copy is applied".into(),
                "DIR/bad.yaml document 1: NetworkPolicy x/bad: metadata.name: Duplicate value: \"bad\": also defined at DIR/bad.yaml document 0; neither copy is applied".into(),
            ],
        },
        Case {
            name: "duplicate in two files",
            input: Input::Setup(|dir| {
                std::fs::write(dir.join("bad.yaml"), egress("ports: [{port: 80}]")).expect("test setup");
                std::fs::write(dir.join("bad2.yaml"), egress("ports: [{port: 81}]")).expect("test setup");
            }),
            expect: vec![
                "DIR/bad.yaml document 0: NetworkPolicy x/bad: metadata.name: Duplicate value: \"bad\": also defined at DIR/bad2.yaml document 0; neither copy is applied".into(),
                "DIR/bad2.yaml document 0: NetworkPolicy x/bad: metadata.name: Duplicate value: \"bad\": also defined at DIR/bad.yaml document 0; neither copy is applied".into(),
            ],
        },
        Case {
            name: "duplicate in a List",
            input: Input::Yaml(
                "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: d}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: d}}\n".into(),
            ),
            expect: vec![
                "DIR/bad.yaml document 0 item 0: Namespace d: metadata.name: Duplicate value: \"d\": also defined at DIR/bad.yaml document 0 item 1; neither copy is applied".into(),
                "DIR/bad.yaml document 0 item 1: Namespace d: metadata.name: Duplicate value: \"d\": also defined at DIR/bad.yaml document 0 item 0; neither copy is applied".into(),
            ],
        },
        // Pods.
        case("pod name invalid", pod("metadata: {name: Web, namespace: x}\n"), &format!("DIR/bad.yaml document 0: Pod x/Web: metadata.name: Invalid value: \"Web\": {SUBDOMAIN}")),
        case("podIP out of range", pod("metadata: {name: web, namespace: x}\nstatus: {podIP: 999.1.1.1}\n"), "DIR/bad.yaml document 0: Pod x/web: status.podIP: Invalid value: \"999.1.1.1\": must be a valid IP address"),
        case("podIPs two of a family", pod("metadata: {name: web, namespace: x}\nstatus: {podIPs: [{ip: 192.0.2.1}, {ip: 192.0.2.2}]}\n"), "DIR/bad.yaml document 0: Pod x/web: status.podIPs[1].ip: Invalid value: \"192.0.2.2\": may specify no more than one IP for each IP family"),
        case("podIP not first podIPs", pod("metadata: {name: web, namespace: x}\nstatus: {podIP: 192.0.2.1, podIPs: [{ip: 192.0.2.2}]}\n"), "DIR/bad.yaml document 0: Pod x/web: status.podIPs[0].ip: Invalid value: \"192.0.2.2\": must match status.podIP 192.0.2.1"),
        case("containerPort zero", pod("metadata: {name: web, namespace: x}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 0}]}]}\n"), &format!("DIR/bad.yaml document 0: Pod x/web: spec.containers[0].ports[0].containerPort: Invalid value: 0: {RANGE}")),
        case("container port names repeat", pod("metadata: {name: web, namespace: x}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80}, {name: http, containerPort: 81}]}]}\n"), "DIR/bad.yaml document 0: Pod x/web: spec.containers[0].ports[1].name: Duplicate value: \"http\""),
        case("container port protocol", pod("metadata: {name: web, namespace: x}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80, protocol: ICMP}]}]}\n"), &format!("DIR/bad.yaml document 0: Pod x/web: spec.containers[0].ports[0].protocol: Unsupported value: \"ICMP\": {PROTOCOLS}")),
        // Unknown kinds and apiVersions.
        case("Deployment", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into(), "DIR/bad.yaml document 0: unsupported kind `Deployment` (apiVersion `apps/v1`)"),
        case("NetworkPolicy v1beta1", "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\n".into(), "DIR/bad.yaml document 0: unsupported kind `NetworkPolicy` (apiVersion `networking.k8s.io/v1beta1`)"),
        case("EgressPolicy v1", "apiVersion: egret.dev/v1\nkind: EgressPolicy\nmetadata: {name: bad}\n".into(), "DIR/bad.yaml document 0: unsupported kind `EgressPolicy` (apiVersion `egret.dev/v1`)"),
        case("no kind", "foo: bar\n".into(), "DIR/bad.yaml document 0: unsupported kind `` (apiVersion ``)"),
        case("a scalar document", "just a string\n".into(), "DIR/bad.yaml document 0: unsupported kind `` (apiVersion ``)"),
        // Every EgressPolicy field.
        case("priority above 1000", ep("  priority: 1001\n  subject: {podSelector: {}}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.priority: Invalid value: 1001: must be between 0 and 1000, inclusive"),
        case("priority negative", ep("  priority: -1\n  subject: {podSelector: {}}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.priority: "),
        case("priority missing", ep("  subject: {podSelector: {}}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec: "),
        case("mode unknown", ep("  priority: 1\n  mode: Sometimes\n  subject: {podSelector: {}}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.mode: "),
        case("subject empty", ep("  priority: 1\n  subject: {}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.subject: Required value: must specify namespaceSelector and/or podSelector"),
        case("subject selector invalid", ep("  priority: 1\n  subject: {namespaceSelector: {matchExpressions: [{key: a, operator: Near}]}}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.subject.namespaceSelector.matchExpressions[0].operator: Unsupported value: \"Near\""),
        case("rule name empty", ep_rule("{name: \"\", action: Deny, to: [{networks: [10.0.0.0/8]}]}"), &format!("{EP_RULE}.name: Required value: every rule needs a name")),
        case("rule name invalid", ep_rule("{name: Rule One, action: Deny, to: [{networks: [10.0.0.0/8]}]}"), &format!("{EP_RULE}.name: Invalid value: \"Rule One\": {DNS_LABEL}")),
        case("rule names repeat", ep("  priority: 1\n  subject: {podSelector: {}}\n  rules:\n  - {name: r, action: Deny, to: [{networks: [10.0.0.0/8]}]}\n  - {name: r, action: Allow, to: [{networks: [10.0.0.0/8]}]}\n"), "DIR/bad.yaml document 0: EgressPolicy bad: spec.rules[1].name: Duplicate value: \"r\""),
        case("action unknown", ep_rule("{name: r, action: Reject, to: [{networks: [10.0.0.0/8]}]}"), &format!("{EP_RULE}.action: ")),
        case("to empty", ep_rule("{name: r, action: Deny, to: []}"), &format!("{EP_RULE}.to: Required value: must specify at least one peer")),
        case("networks with podSelector", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/8], podSelector: {}}]}"), &format!("{EP_RULE}.to[0]: Forbidden: networks may not be combined with namespaceSelector or podSelector")),
        case("networks empty", ep_rule("{name: r, action: Deny, to: [{networks: []}]}"), &format!("{EP_RULE}.to[0].networks: Required value: must specify at least one CIDR")),
        case("network invalid", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/40]}]}"), &format!("{EP_RULE}.to[0].networks[0]: Invalid value: \"10.0.0.0/40\": {BAD_CIDR}")),
        case("peer empty", ep_rule("{name: r, action: Deny, to: [{}]}"), &format!("{EP_RULE}.to[0]: Required value: must specify networks, namespaceSelector or podSelector")),
        case("rule port zero", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/8]}], ports: [{port: 0}]}"), &format!("{EP_RULE}.ports[0].port: Invalid value: 0: {RANGE}")),
        case("rule protocol", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/8]}], ports: [{protocol: GRE}]}"), &format!("{EP_RULE}.ports[0].protocol: Unsupported value: \"GRE\": {PROTOCOLS}")),
        case("rule endPort below port", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/8]}], ports: [{port: 90, endPort: 80}]}"), &format!("{EP_RULE}.ports[0].endPort: Invalid value: 80: must be greater than or equal to `port` 90")),
        case("rule unknown field", ep_rule("{name: r, action: Deny, to: [{networks: [10.0.0.0/8]}], port: 80}"), &format!("{EP_RULE}.port: unknown field")),
        case("EgressPolicy name invalid", "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: Bad!}\nspec: {priority: 1, subject: {podSelector: {}}}\n".into(), &format!("DIR/bad.yaml document 0: EgressPolicy Bad!: metadata.name: Invalid value: \"Bad!\": {SUBDOMAIN}")),
        // File-level garbage.
        case("tab indentation", "apiVersion: v1\nkind: Namespace\nmetadata:\n\tname: t\n".into(), "DIR/bad.yaml document 0: not valid YAML: line 4 column 2: tabs disallowed"),
        case("duplicate keys", "apiVersion: v1\nkind: Namespace\nkind: Namespace\nmetadata: {name: t}\n".into(), "DIR/bad.yaml document 0: not valid YAML: line 3 column 1: duplicate mapping key: kind"),
        case("unclosed flow", "apiVersion: v1\nkind: [Namespace\n".into(), "DIR/bad.yaml document 0: not valid YAML: line 2 column 7: unclosed bracket"),
        case("NUL bytes", "apiVersion: v1\0\0\nkind: Namespace\n".into(), "DIR/bad.yaml document 0: not valid YAML: line 1 column 15: unexpected character"),
        Case {
            name: "binary",
            input: Input::Bytes(vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0xff, 0xfe, 0, 0]),
            expect: vec!["DIR/bad.yaml: not UTF-8: invalid byte at offset 8".into()],
        },
        Case {
            name: "latin-1 text",
            input: Input::Bytes(b"apiVersion: v1\nkind: Namespace\nmetadata: {name: caf\xe9}\n".to_vec()),
            expect: vec!["DIR/bad.yaml: not UTF-8: invalid byte at offset 51".into()],
        },
        case("alias bomb", alias_bomb(), "DIR/bad.yaml document 0: not valid YAML: line 8 column 45: alias replay limit exceeded"),
        case("deep nesting", format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: deep}}\nx: {}{}\n", "[".repeat(5000), "]".repeat(5000)), "DIR/bad.yaml document 0: not valid YAML: line 4 column 259: recursion limit exceeded"),
        case("deep block nesting", format!("a:\n{}", (1..200).map(|i| format!("{}b:\n", " ".repeat(i))).collect::<String>()), "DIR/bad.yaml document 0: not valid YAML: line 65 column 65: budget breached: Depth"),
        Case {
            name: "huge file",
            input: Input::Setup(|dir| {
                let line = "# padding padding padding padding padding padding padding padding\n";
                std::fs::write(dir.join("bad.yaml"), line.repeat(4 * 1024 * 1024 / line.len() + 1)).expect("test setup");
            }),
            expect: vec![format!("DIR/bad.yaml: not read: {} bytes is over the limit of 3145728 bytes per file", (4 * 1024 * 1024 / 66 + 1) * 66)],
        },
        Case {
            name: "FIFO",
            input: Input::Setup(|dir| mkfifo(&dir.join("bad.yaml"))),
            expect: vec!["DIR/bad.yaml: not read: it is a FIFO; only regular files and directories are read".into()],
        },
        Case {
            name: "socket",
            input: Input::Setup(|dir| {
                let listener = std::os::unix::net::UnixListener::bind(dir.join("bad.yaml")).expect("test setup");
                std::mem::forget(listener);
            }),
            expect: vec!["DIR/bad.yaml: not read: it is a socket; only regular files and directories are read".into()],
        },
        Case {
            name: "symlink to /dev/zero",
            input: Input::Setup(|dir| std::os::unix::fs::symlink("/dev/zero", dir.join("bad.yaml")).expect("test setup")),
            expect: vec!["DIR/bad.yaml: not read: it is a character device; only regular files and directories are read".into()],
        },
        Case {
            name: "symlink loop",
            input: Input::Setup(|dir| std::os::unix::fs::symlink("bad.yaml", dir.join("bad.yaml")).expect("test setup")),
            expect: vec!["DIR/bad.yaml: failed to read: Too many levels of symbolic links (os error 40)".into()],
        },
        Case {
            name: "dangling symlink",
            input: Input::Setup(|dir| std::os::unix::fs::symlink("gone.yaml", dir.join("bad.yaml")).expect("test setup")),
            expect: vec!["DIR/bad.yaml: failed to read: No such file or directory (os error 2)".into()],
        },
        Case {
            name: "unreadable (EIO)",
            // /proc/self/mem is a regular file whose first page is never mapped: reading it
            // fails with EIO, as a failing disk would.
            input: Input::Setup(|dir| std::os::unix::fs::symlink("/proc/self/mem", dir.join("bad.yaml")).expect("test setup")),
            expect: vec!["DIR/bad.yaml: failed to read: Input/output error (os error 5)".into()],
        },
        Case {
            name: "directory symlinked to its parent",
            input: Input::Setup(|dir| {
                std::fs::create_dir(dir.join("sub")).expect("test setup");
                std::os::unix::fs::symlink("..", dir.join("sub/up")).expect("test setup");
            }),
            expect: vec!["DIR/sub/up: not read: directory cycle: it is DIR, which is already being read".into()],
        },
        Case {
            name: "directory symlink loop",
            input: Input::Setup(|dir| std::os::unix::fs::symlink("loop", dir.join("loop")).expect("test setup")),
            expect: vec!["DIR/loop: failed to read: Too many levels of symbolic links (os error 40)".into()],
        },
    ];
    for c in &mut cases {
        c.expect.sort();
    }
    cases
}

/// The "billion laughs": ten levels of ten aliases each, a billion leaves when expanded.
fn alias_bomb() -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bomb}\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("test setup");
    assert!(status.success());
}

fn temp_dir(name: &str) -> PathBuf {
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = std::env::temp_dir().join(format!("egret-bad-input-{}-{slug}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test setup");
    dir
}

fn write(dir: &Path, input: &Input) {
    match input {
        Input::Yaml(text) => std::fs::write(dir.join("bad.yaml"), text).expect("test setup"),
        Input::Bytes(bytes) => std::fs::write(dir.join("bad.yaml"), bytes).expect("test setup"),
        Input::Setup(setup) => setup(dir),
    }
    std::fs::write(dir.join("good.yaml"), GOOD).expect("test setup");
}

#[test]
fn every_bad_input_is_rejected_naming_file_object_and_field_and_the_rest_loads() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let dir = temp_dir(case.name);
        write(&dir, &case.input);
        let (world, errors) = cluster::load(std::slice::from_ref(&dir), Limits::default());
        let prefix = dir.display().to_string();
        let mut got: Vec<String> = errors
            .iter()
            .map(|e| e.to_string().replace(&prefix, "DIR"))
            .collect();
        got.sort();
        let matches = got.len() == case.expect.len()
            && got
                .iter()
                .zip(&case.expect)
                .all(|(g, e)| g.starts_with(e.as_str()));
        if !matches {
            failures.push(format!(
                "{}:\n  want {:?}\n  got  {:?}",
                case.name, case.expect, got
            ));
        }
        if world.pod("good", "p").is_none()
            || !world.network_policies.iter().any(|n| n.name == "allow-dns")
        {
            failures.push(format!(
                "{}: the valid file beside it did not load",
                case.name
            ));
        }
        if !world.invalid.is_empty() {
            failures.push(format!(
                "{}: invalid objects reached the world: {:?}",
                case.name, world.invalid
            ));
        }
        // `egret explain` prints the same messages and still answers from the valid file.
        let output = Command::new(env!("CARGO_BIN_EXE_egret"))
            .args([
                "explain",
                "-o",
                "json",
                "--from",
                "good/p",
                "--to",
                "192.0.2.1",
                "--port",
                "53",
                "--protocol",
                "UDP",
                "-f",
            ])
            .arg(&dir)
            .output()
            .expect("test setup");
        let stderr = String::from_utf8_lossy(&output.stderr).replace(&prefix, "DIR");
        let stdout = String::from_utf8_lossy(&output.stdout);
        for message in &got {
            if !stderr.contains(message.as_str()) {
                failures.push(format!(
                    "{}: explain did not print {message:?}:\n{stderr}",
                    case.name
                ));
            }
        }
        if !stdout.contains("\"verdict\":\"allow\"")
            || !stdout.contains("NetworkPolicy good/allow-dns")
        {
            failures.push(format!("{}: explain answered {stdout} {stderr}", case.name));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
