//! Telemetry: the kernel's per-destination counters as Prometheus metrics, with a cardinality
//! budget, plus the agent's health, served on `/metrics` beside `/healthz` and `/readyz`.
//! `docs/metrics.md` lists every metric and label.

pub mod denylog;
pub mod http;
pub mod server;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::datapath::{Counters, EndpointId, MapUsage, RuleId, Verdict};

/// Label value of destinations past the series budget, and of attempts the kernel counted
/// without their destination.
pub const OTHER: &str = "other";

/// Who made a connection and what decided it, for labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub namespace: String,
    pub workload: String,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("failed to register metric {name}")]
    Register {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
}

/// The metrics and what the last drain saw.
pub struct Telemetry {
    registry: Registry,
    connections: IntCounterVec,
    by_workload: IntCounterVec,
    overflow: IntCounter,
    lost: IntCounterVec,
    sync_errors: IntCounter,
    write_failing: IntGauge,
    rejected: IntGaugeVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    last_sync: IntGauge,
    programs_attached: IntGauge,
    links_restored: IntCounterVec,
    deny_log_suppressed: IntCounter,
    events_lost: IntGauge,
    compile_seconds: Histogram,
    enforce_latency_seconds: Histogram,
    watch_restarts: IntCounterVec,
    watched_objects: IntGaugeVec,
    /// Watch restarts already counted, per kind (the source reports totals).
    seen_restarts: HashMap<String, u64>,
    /// Messages of the last load's rejections, for `/readyz`.
    rejections: Vec<String>,
    /// Policies the last compile left out, over the per-policy entry budget.
    over_budget: Vec<String>,
    /// At most this many destination IPs get their own series.
    budget: usize,
    destinations: HashSet<IpAddr>,
    /// Kernel counter values at the last drain, by (endpoint, rule, destination, protocol,
    /// verdict); kernel counters only grow, so the difference is what is new.
    seen: HashMap<(EndpointId, RuleId, Option<IpAddr>, u8, Verdict), u64>,
    seen_lost: [u64; 3],
}

impl Telemetry {
    /// Metrics with a budget of `max_destination_series` destination IPs.
    pub fn new(max_destination_series: usize) -> Result<Self, TelemetryError> {
        let registry = Registry::new();
        let register = |name: &'static str, c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .map_err(|source| TelemetryError::Register { name, source })
        };
        let counter_vec = |name: &'static str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .map_err(|source| TelemetryError::Register { name, source })?;
            register(name, Box::new(c.clone()))?;
            Ok::<_, TelemetryError>(c)
        };
        let gauge_vec = |name: &'static str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .map_err(|source| TelemetryError::Register { name, source })?;
            register(name, Box::new(g.clone()))?;
            Ok::<_, TelemetryError>(g)
        };
        let counter = |name: &'static str, help: &str| {
            let c = IntCounter::new(name, help)
                .map_err(|source| TelemetryError::Register { name, source })?;
            register(name, Box::new(c.clone()))?;
            Ok::<_, TelemetryError>(c)
        };
        let gauge = |name: &'static str, help: &str| {
            let g = IntGauge::new(name, help)
                .map_err(|source| TelemetryError::Register { name, source })?;
            register(name, Box::new(g.clone()))?;
            Ok::<_, TelemetryError>(g)
        };
        let histogram = |name: &'static str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .map_err(|source| TelemetryError::Register { name, source })?;
            register(name, Box::new(h.clone()))?;
            Ok::<_, TelemetryError>(h)
        };
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let telemetry = Self {
            compile_seconds: histogram(
                "egret_policy_compile_seconds",
                "Time to compile the cluster state into datapath entries.",
                latency_buckets.clone(),
            )?,
            enforce_latency_seconds: histogram(
                "egret_policy_enforce_latency_seconds",
                "From the first API event (or file change) a policy write includes to the end of that write: debounce, compile and map writes.",
                latency_buckets,
            )?,
            watch_restarts: counter_vec(
                "egret_watch_restarts_total",
                "Kubernetes watches that failed and backed off before resuming or re-listing, by kind.",
                &["kind"],
            )?,
            watched_objects: gauge_vec(
                "egret_watched_objects",
                "Objects in each Kubernetes watch's store, by kind.",
                &["kind"],
            )?,
            connections: counter_vec(
                "egret_egress_connections_total",
                "Outbound connection attempts (connect, or one datagram) by verdict: blocked (BlackHole), passthrough (allowed) or audit (allowed; an Audit policy would deny).",
                &[
                    "verdict",
                    "destination_ip",
                    "protocol",
                    "source_namespace",
                    "source_workload",
                    "policy",
                ],
            )?,
            by_workload: counter_vec(
                "egret_egress_connections_workload_total",
                "egret_egress_connections_total without destination and policy: one series per workload and verdict, created at 0 when the workload appears, so alerts see its first block as an increase.",
                &["verdict", "source_namespace", "source_workload"],
            )?,
            overflow: counter(
                "egret_metrics_destinations_overflow_total",
                "Attempts counted under destination_ip=\"other\": past the destination series budget, or counted by the kernel without their destination.",
            )?,
            lost: counter_vec(
                "egret_kernel_counter_lost_total",
                "Attempts the kernel could count in neither counter map, by verdict.",
                &["verdict"],
            )?,
            write_failing: gauge(
                "egret_policy_write_failing",
                "1 while the last policy write failed (the kernel enforces the policy written before it; /readyz says why), else 0.",
            )?,
            sync_errors: counter(
                "egret_policy_sync_errors_total",
                "Policy writes to the kernel that failed.",
            )?,
            rejected: gauge_vec(
                "egret_policies_rejected",
                "Files and objects rejected by the last load, by reason (config: the config file does not load, nothing was reloaded; unreadable: a file or document could not be read, parsed or decoded; invalid: an object failed validation or is a duplicate; entry-budget: a policy needs more policy entries than --max-policy-entries, and its pods get none of its allows). A rejected object keeps its last valid version; every other object is enforced.",
                &["reason"],
            )?,
            map_entries: gauge_vec("egret_map_entries", "Entries in each kernel map.", &["map"])?,
            map_capacity: gauge_vec(
                "egret_map_capacity",
                "Maximum entries of each kernel map.",
                &["map"],
            )?,
            last_sync: gauge(
                "egret_last_successful_sync_timestamp_seconds",
                "Unix time of the last successful policy write.",
            )?,
            programs_attached: gauge(
                "egret_programs_attached",
                "Kernel programs attached at egret's cgroup, as the kernel reports its links (all 6 when enforcing).",
            )?,
            links_restored: counter_vec(
                "egret_links_restored_total",
                "egret's programs found detached and attached again (what=reattached), or whose link pin was removed and pinned again (what=repinned), by program. Someone with CAP_NET_ADMIN or root on the node did it.",
                &["what", "program"],
            )?,
            deny_log_suppressed: counter(
                "egret_deny_log_suppressed_total",
                "Deny-log lines held back by the per-source and per-destination rate limits.",
            )?,
            events_lost: gauge(
                "egret_deny_log_kernel_dropped",
                "Deny-log events the kernel did not deliver: its ring buffer was full (no reader), or the CPU's event budget (20,000 a second) was spent by a flood. Every attempt is still counted in egret_egress_connections_total.",
            )?,
            registry,
            budget: max_destination_series,
            destinations: HashSet::new(),
            seen: HashMap::new(),
            seen_lost: [0; 3],
            seen_restarts: HashMap::new(),
            rejections: Vec::new(),
            over_budget: Vec::new(),
        };
        // Every (what, program) series exists from the start at 0, so that the first
        // restoration is an increase an alert sees.
        for what in ["reattached", "repinned"] {
            let programs = egret_common::program_names::ALL.into_iter();
            for program in programs.chain(egret_common::program_names::TC) {
                telemetry.links_restored.with_label_values(&[what, program]);
            }
        }
        Ok(telemetry)
    }

    /// Records one compile's duration.
    pub fn compiled(&self, seconds: f64) {
        self.compile_seconds.observe(seconds);
    }

    /// Records a policy write that took effect `seconds` after the change it includes.
    pub fn enforced_after(&self, seconds: f64) {
        self.enforce_latency_seconds.observe(seconds);
    }

    /// Records a watch's state: its restarts so far (a total) and the objects in its store.
    pub fn watch(&mut self, kind: &str, restarts: u64, objects: usize) {
        let seen = self.seen_restarts.entry(kind.to_owned()).or_default();
        if restarts > *seen {
            self.watch_restarts
                .with_label_values(&[kind])
                .inc_by(restarts - *seen);
            *seen = restarts;
        }
        self.watched_objects
            .with_label_values(&[kind])
            .set(i64::try_from(objects).unwrap_or(i64::MAX));
    }

    /// What the last drain took of `sample`'s counter: equal to its attempts when nothing was
    /// counted since.
    pub fn taken(&self, s: &crate::datapath::CounterSample) -> Option<u64> {
        self.seen
            .get(&(s.endpoint, s.rule, s.destination, s.protocol, s.verdict))
            .copied()
    }

    /// The kernel moved these counters (sample, attempts moved) to the entry without
    /// destination (`Datapath::forget_counters`): what was taken of them moves with them, so
    /// the next drain adds only what was counted after the take, and nothing twice. Their
    /// destinations' series stay as they are.
    pub fn moved(&mut self, moved: &[(crate::datapath::CounterSample, u64)]) {
        for (s, _) in moved {
            let taken = self
                .seen
                .remove(&(s.endpoint, s.rule, s.destination, s.protocol, s.verdict))
                .unwrap_or(0);
            *self
                .seen
                .entry((s.endpoint, s.rule, None, s.protocol, s.verdict))
                .or_default() += taken;
        }
    }

    /// Adds what the kernel counted since the last drain. `source` names the endpoint and
    /// `policy` the rule, for labels. The first drain of a restarted agent adds everything the
    /// pinned counters hold, so the metrics continue where the kernel is.
    pub fn drain(
        &mut self,
        counters: &Counters,
        source: impl Fn(EndpointId) -> Option<Source>,
        policy: impl Fn(RuleId) -> String,
    ) {
        for s in &counters.samples {
            let key = (s.endpoint, s.rule, s.destination, s.protocol, s.verdict);
            let before = self.seen.insert(key, s.attempts).unwrap_or(0);
            let delta = s.attempts.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let destination = match s.destination {
                Some(ip) if self.destinations.contains(&ip) => ip.to_string(),
                Some(ip) if self.destinations.len() < self.budget => {
                    self.destinations.insert(ip);
                    ip.to_string()
                }
                _ => {
                    self.overflow.inc_by(delta);
                    OTHER.to_owned()
                }
            };
            let who = source(s.endpoint).unwrap_or_else(|| Source {
                namespace: String::new(),
                workload: format!("endpoint-{}", s.endpoint),
            });
            let protocol = crate::policy::model::Protocol::from_number(s.protocol)
                .map_or_else(|| s.protocol.to_string(), |p| p.to_string());
            self.connections
                .with_label_values(&[
                    s.verdict.counter_label(),
                    destination.as_str(),
                    protocol.as_str(),
                    who.namespace.as_str(),
                    who.workload.as_str(),
                    policy(s.rule).as_str(),
                ])
                .inc_by(delta);
            self.by_workload
                .with_label_values(&[
                    s.verdict.counter_label(),
                    who.namespace.as_str(),
                    who.workload.as_str(),
                ])
                .inc_by(delta);
        }
        for (i, verdict) in [Verdict::Allow, Verdict::Deny, Verdict::Audit]
            .into_iter()
            .enumerate()
        {
            let delta = counters.lost[i].saturating_sub(self.seen_lost[i]);
            self.seen_lost[i] = counters.lost[i];
            if delta > 0 {
                self.lost
                    .with_label_values(&[verdict.counter_label()])
                    .inc_by(delta);
            }
        }
    }

    /// Creates the per-workload series at 0 for each of `sources` and verdict (a counter that
    /// is born at 1 hides its first increase from `increase()`).
    pub fn workloads<'a>(&self, sources: impl IntoIterator<Item = &'a Source>) {
        for source in sources {
            for verdict in [Verdict::Allow, Verdict::Deny, Verdict::Audit] {
                let _ = self.by_workload.with_label_values(&[
                    verdict.counter_label(),
                    source.namespace.as_str(),
                    source.workload.as_str(),
                ]);
            }
        }
    }

    /// Records a successful policy write at `unix_seconds`.
    pub fn synced(&self, unix_seconds: i64) {
        self.last_sync.set(unix_seconds);
        self.write_failing.set(0);
    }

    /// Records a failed policy write.
    pub fn sync_failed(&self) {
        self.sync_errors.inc();
        self.write_failing.set(1);
    }

    /// Files and objects rejected by the last load, by reason, and their messages for the
    /// readiness detail.
    pub fn rejected(&mut self, by_reason: &BTreeMap<&'static str, usize>, messages: Vec<String>) {
        for reason in ["config", "unreadable", "invalid"] {
            let n = by_reason.get(reason).copied().unwrap_or(0);
            self.rejected.with_label_values(&[reason]).set(n as i64);
        }
        self.rejections = messages;
    }

    /// What the last load rejected (and which objects keep their last valid version).
    pub fn rejections(&self) -> &[String] {
        &self.rejections
    }

    /// The policies the last compile left out over the per-policy entry budget.
    pub fn over_budget(&mut self, messages: Vec<String>) {
        self.rejected
            .with_label_values(&["entry-budget"])
            .set(messages.len() as i64);
        self.over_budget = messages;
    }

    /// What [`Self::over_budget`] was last given.
    pub fn over_budget_messages(&self) -> &[String] {
        &self.over_budget
    }

    /// Map fill.
    pub fn usage(&self, usage: &[MapUsage]) {
        for u in usage {
            self.map_entries
                .with_label_values(&[u.name])
                .set(i64::from(u.entries));
            self.map_capacity
                .with_label_values(&[u.name])
                .set(i64::from(u.capacity));
        }
    }

    /// Programs attached.
    pub fn attached(&self, programs: usize) {
        self.programs_attached.set(programs as i64);
    }

    /// Records what a link check restored: programs attached again, link pins pinned again.
    pub fn links_restored(&self, reattached: &[&str], repinned: &[&str]) {
        for (what, programs) in [("reattached", reattached), ("repinned", repinned)] {
            for program in programs {
                self.links_restored
                    .with_label_values(&[what, program])
                    .inc();
            }
        }
    }

    /// Deny-log lines held back since the last call, and the kernel's dropped-event total.
    pub fn deny_log(&self, suppressed: u64, kernel_dropped: u64) {
        self.deny_log_suppressed.inc_by(suppressed);
        self.events_lost
            .set(i64::try_from(kernel_dropped).unwrap_or(i64::MAX));
    }

    /// Number of distinct destination IPs with their own series.
    pub fn destination_series(&self) -> usize {
        self.destinations.len()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding to a Vec only fails on invalid metric families, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::CounterSample;

    fn sample(dest: Option<IpAddr>, verdict: Verdict, attempts: u64) -> CounterSample {
        CounterSample {
            endpoint: 1,
            rule: 0,
            destination: dest,
            protocol: 6,
            verdict,
            attempts,
        }
    }

    fn source(_: EndpointId) -> Option<Source> {
        Some(Source {
            namespace: "shop".into(),
            workload: "web".into(),
        })
    }

    fn value(text: &str, needle: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with("egret_egress_connections_total{") && l.contains(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn drains_deltas_and_never_decreases() {
        let mut t = Telemetry::new(10).unwrap();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let mut counters = Counters {
            samples: vec![sample(Some(ip), Verdict::Deny, 3)],
            lost: [0; 3],
        };
        t.drain(&counters, source, |_| "default".into());
        t.drain(&counters, source, |_| "default".into());
        let text = t.encode();
        assert_eq!(
            value(&text, "destination_ip=\"192.0.2.10\""),
            Some(3),
            "{text}"
        );
        assert!(text.contains("verdict=\"blocked\"") && text.contains("source_workload=\"web\""));
        counters.samples[0].attempts = 5;
        t.drain(&counters, source, |_| "default".into());
        assert_eq!(value(&t.encode(), "destination_ip=\"192.0.2.10\""), Some(5));
    }

    #[test]
    fn destinations_past_the_budget_go_to_other_and_are_counted() {
        let mut t = Telemetry::new(1000).unwrap();
        let samples: Vec<CounterSample> = (0..100_000u32)
            .map(|i| {
                sample(
                    Some(IpAddr::V6(std::net::Ipv6Addr::from(
                        0x2001_0db8_u128 << 96 | u128::from(i),
                    ))),
                    Verdict::Deny,
                    1,
                )
            })
            .chain(std::iter::once(sample(None, Verdict::Deny, 7)))
            .collect();
        t.drain(
            &Counters {
                samples,
                lost: [0; 3],
            },
            source,
            |_| "default".into(),
        );
        let text = t.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("egret_egress_connections_total{"))
            .count();
        assert_eq!(t.destination_series(), 1000);
        assert_eq!(series, 1001, "1000 destinations and `other`");
        assert_eq!(value(&text, "destination_ip=\"other\""), Some(99_000 + 7));
        assert!(
            text.contains("egret_metrics_destinations_overflow_total 99007"),
            "{text}"
        );
    }

    #[test]
    fn counters_moved_out_of_the_destination_map_are_not_counted_twice() {
        let mut t = Telemetry::new(10).unwrap();
        let ten: IpAddr = "192.0.2.10".parse().unwrap();
        let drain = |t: &mut Telemetry, samples: Vec<CounterSample>| {
            t.drain(
                &Counters {
                    samples,
                    lost: [0; 3],
                },
                source,
                |_| "default".into(),
            )
        };
        drain(
            &mut t,
            vec![
                sample(Some(ten), Verdict::Deny, 5),
                sample(None, Verdict::Deny, 2),
            ],
        );
        let idle = sample(Some(ten), Verdict::Deny, 5);
        assert_eq!(t.taken(&idle), Some(5));
        // The kernel moved 5, and counted one more for 192.0.2.10 after the drain read it: that
        // one is in the entry without destination now.
        t.moved(&[(idle, 6)]);
        drain(&mut t, vec![sample(None, Verdict::Deny, 2 + 6)]);
        let text = t.encode();
        assert_eq!(value(&text, "destination_ip=\"192.0.2.10\""), Some(5));
        assert_eq!(value(&text, "destination_ip=\"other\""), Some(2 + 1));
        assert!(
            text.contains(
                "egret_egress_connections_workload_total{source_namespace=\"shop\",source_workload=\"web\",verdict=\"blocked\"} 8"
            ),
            "{text}"
        );
        // A new attempt to the forgotten destination starts a fresh kernel entry.
        drain(
            &mut t,
            vec![
                sample(Some(ten), Verdict::Deny, 1),
                sample(None, Verdict::Deny, 8),
            ],
        );
        assert_eq!(value(&t.encode(), "destination_ip=\"192.0.2.10\""), Some(6));
    }
}
