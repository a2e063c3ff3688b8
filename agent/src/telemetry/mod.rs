//! Telemetry: the kernel's per-destination counters as Prometheus metrics, with a cardinality
//! budget whose idle destination series expire, plus the agent's health, served on `/metrics`
//! beside `/healthz` and `/readyz`. `docs/metrics.md` lists every metric and label.

pub mod denylog;
pub mod http;
pub mod server;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::datapath::{Counters, EndpointId, MapUsage, RuleId, Verdict};

/// Label value of destinations past the series budget, and of attempts the kernel counted
/// without their destination.
pub const OTHER: &str = "other";

/// How many destination series `/metrics` holds, and for how long an idle one stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesLimits {
    /// At most this many destination IPs get their own series; the rest count as [`OTHER`].
    pub max_destinations: usize,
    /// A destination series that has not grown for this long is dropped, and a destination
    /// left without series frees its place in the budget. `None`: series never expire.
    pub idle: Option<Duration>,
}

impl SeriesLimits {
    /// The default budget: 1000 destinations.
    pub const DEFAULT_MAX_DESTINATIONS: usize = 1000;
    /// The default idle time: 10 minutes, twice the 5-minute windows the alerts and the
    /// dashboard use, so that no `increase()` they take misses a series still in use.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
}

impl Default for SeriesLimits {
    fn default() -> Self {
        Self {
            max_destinations: Self::DEFAULT_MAX_DESTINATIONS,
            idle: Some(Self::DEFAULT_IDLE),
        }
    }
}

/// A duration as the flags and the config write it: a number and a unit (`ms`, `s`, `m`,
/// `h`), as `90s` or `10m`; `0` turns series expiry off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTime(pub Option<Duration>);

impl Default for IdleTime {
    fn default() -> Self {
        Self(Some(SeriesLimits::DEFAULT_IDLE))
    }
}

impl std::str::FromStr for IdleTime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if text == "0" {
            return Ok(Self(None));
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?}: expected a number and a unit (ms, s, m, h), as 10m"))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?}: expected a number and a unit (ms, s, m, h), as 10m"))?;
        let duration = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(format!("{s:?}: unit {unit:?} is none of ms, s, m, h")),
        };
        Ok(Self((!duration.is_zero()).then_some(duration)))
    }
}

impl<'de> serde::Deserialize<'de> for IdleTime {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The labels of one `egret_egress_connections_total` series with its own destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DestinationSeries {
    verdict: &'static str,
    destination: IpAddr,
    protocol: String,
    namespace: String,
    workload: String,
    policy: String,
}

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
    veth_lookup_failing: IntGauge,
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
    /// Why pods' veths cannot be looked up, for `/readyz`.
    veth_lookup_problem: Option<String>,
    /// The destination-series budget and idle time.
    limits: SeriesLimits,
    /// Destination IPs with their own series, and how many series each has.
    destinations: HashMap<IpAddr, usize>,
    /// Every series with its own destination, and when its count last grew.
    series: HashMap<DestinationSeries, Instant>,
    /// Kernel counter values at the last drain, by (endpoint, rule, destination, protocol,
    /// verdict); kernel counters only grow, so the difference is what is new.
    seen: HashMap<(EndpointId, RuleId, Option<IpAddr>, u8, Verdict), u64>,
    seen_lost: [u64; 3],
}

impl Telemetry {
    /// Metrics whose destination series keep within `limits`.
    pub fn new(limits: SeriesLimits) -> Result<Self, TelemetryError> {
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
            veth_lookup_failing: gauge(
                "egret_pod_veth_lookup_failing",
                "1 while the agent cannot look up pods' veths at all (no hostPID, CAP_SYS_ADMIN or CAP_SYS_PTRACE missing): pods' raw sockets are refused and unclaimed container veths pass link traffic only; /readyz says why. Else 0.",
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
            limits,
            destinations: HashMap::new(),
            series: HashMap::new(),
            seen: HashMap::new(),
            seen_lost: [0; 3],
            seen_restarts: HashMap::new(),
            rejections: Vec::new(),
            over_budget: Vec::new(),
            veth_lookup_problem: None,
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

    /// How long an idle destination series stays (`None`: for good).
    pub fn idle(&self) -> Option<Duration> {
        self.limits.idle
    }

    /// The kernel deleted these counters (of endpoints that are gone): what drains took of
    /// them is forgotten. Their series stay (they are per owning workload and keep its total).
    pub fn forget(&mut self, deleted: &[crate::datapath::CounterSample]) {
        for s in deleted {
            self.seen
                .remove(&(s.endpoint, s.rule, s.destination, s.protocol, s.verdict));
        }
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
        self.drain_at(Instant::now(), counters, source, policy);
    }

    /// [`Self::drain`] at `now`: first drops the destination series idle for the idle time
    /// (their places in the budget go to the destinations that come next), then adds the new
    /// counts. Only series go: the kernel values in `seen` stay, so a destination seen again
    /// gets a new series holding what it counted since, and nothing is counted twice.
    pub fn drain_at(
        &mut self,
        now: Instant,
        counters: &Counters,
        source: impl Fn(EndpointId) -> Option<Source>,
        policy: impl Fn(RuleId) -> String,
    ) {
        self.expire(now);
        for s in &counters.samples {
            let key = (s.endpoint, s.rule, s.destination, s.protocol, s.verdict);
            let before = self.seen.insert(key, s.attempts).unwrap_or(0);
            let delta = s.attempts.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let own = match s.destination {
                Some(ip) if self.destinations.contains_key(&ip) => Some(ip),
                Some(ip) if self.destinations.len() < self.limits.max_destinations => {
                    self.destinations.insert(ip, 0);
                    Some(ip)
                }
                _ => {
                    self.overflow.inc_by(delta);
                    None
                }
            };
            let who = source(s.endpoint).unwrap_or_else(|| Source {
                namespace: String::new(),
                workload: format!("endpoint-{}", s.endpoint),
            });
            let protocol = crate::policy::model::Protocol::from_number(s.protocol)
                .map_or_else(|| s.protocol.to_string(), |p| p.to_string());
            let policy = policy(s.rule);
            let destination = own.map_or_else(|| OTHER.to_owned(), |ip| ip.to_string());
            self.connections
                .with_label_values(&[
                    s.verdict.counter_label(),
                    destination.as_str(),
                    protocol.as_str(),
                    who.namespace.as_str(),
                    who.workload.as_str(),
                    policy.as_str(),
                ])
                .inc_by(delta);
            if let Some(ip) = own {
                let series = DestinationSeries {
                    verdict: s.verdict.counter_label(),
                    destination: ip,
                    protocol,
                    namespace: who.namespace.clone(),
                    workload: who.workload.clone(),
                    policy,
                };
                if self.series.insert(series, now).is_none() {
                    *self.destinations.entry(ip).or_default() += 1;
                }
            }
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

    /// Drops every destination series that has not grown for the idle time; a destination
    /// left without series leaves the budget.
    fn expire(&mut self, now: Instant) {
        let Some(idle) = self.limits.idle else {
            return;
        };
        let Self {
            connections,
            destinations,
            series,
            ..
        } = self;
        series.retain(|labels, last| {
            if now.saturating_duration_since(*last) < idle {
                return true;
            }
            let destination = labels.destination.to_string();
            let _ = connections.remove_label_values(&[
                labels.verdict,
                destination.as_str(),
                labels.protocol.as_str(),
                labels.namespace.as_str(),
                labels.workload.as_str(),
                labels.policy.as_str(),
            ]);
            if let Some(count) = destinations.get_mut(&labels.destination) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    destinations.remove(&labels.destination);
                }
            }
            false
        });
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

    /// Records why pods' veths cannot be looked up at all; `None`: they can.
    pub fn veth_lookup(&mut self, problem: Option<String>) {
        self.veth_lookup_failing.set(i64::from(problem.is_some()));
        self.veth_lookup_problem = problem;
    }

    /// What [`Self::veth_lookup`] was last given.
    pub fn veth_lookup_problem(&self) -> Option<&str> {
        self.veth_lookup_problem.as_deref()
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

    fn limits(max_destinations: usize, idle: Option<Duration>) -> SeriesLimits {
        SeriesLimits {
            max_destinations,
            idle,
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
        let mut t = Telemetry::new(limits(10, None)).unwrap();
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
        let mut t = Telemetry::new(limits(1000, None)).unwrap();
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

    /// The `i`th address of 2001:db8::/32.
    fn ip(i: u32) -> IpAddr {
        IpAddr::V6(std::net::Ipv6Addr::from(
            0x2001_0db8_u128 << 96 | u128::from(i),
        ))
    }

    /// The series of `egret_egress_connections_total` with their own destination, by
    /// (destination, workload).
    fn own_series(text: &str) -> BTreeMap<(String, String), u64> {
        text.lines()
            .filter(|l| l.starts_with("egret_egress_connections_total{"))
            .filter_map(|l| {
                let label = |name: &str| {
                    l.split(&format!("{name}=\""))
                        .nth(1)?
                        .split('"')
                        .next()
                        .map(str::to_owned)
                };
                let destination = label("destination_ip").filter(|d| d != OTHER)?;
                let value = l.rsplit(' ').next()?.parse().ok()?;
                Some(((destination, label("source_workload")?), value))
            })
            .collect()
    }

    /// The sum of the `other` series.
    fn other(text: &str) -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("egret_egress_connections_total{")
                    && l.contains("destination_ip=\"other\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn workload_total(text: &str, workload: &str) -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("egret_egress_connections_workload_total{")
                    && l.contains(&format!("source_workload=\"{workload}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Endpoint 1 is `shop/web`, endpoint 2 `shop/api`.
    fn two_workloads(endpoint: EndpointId) -> Option<Source> {
        Some(Source {
            namespace: "shop".into(),
            workload: if endpoint == 1 { "web" } else { "api" }.into(),
        })
    }

    fn from(endpoint: EndpointId, dest: IpAddr, attempts: u64) -> CounterSample {
        CounterSample {
            endpoint,
            ..sample(Some(dest), Verdict::Deny, attempts)
        }
    }

    #[test]
    fn idle_destination_series_expire_and_free_their_place_in_the_budget() {
        let idle = Duration::from_secs(10);
        let mut t = Telemetry::new(limits(2, Some(idle))).unwrap();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (a, b, c) = (ip(1), ip(2), ip(3));
        let drain = |t: &mut Telemetry, now, samples: Vec<CounterSample>| {
            t.drain_at(
                now,
                &Counters {
                    samples,
                    lost: [0; 3],
                },
                two_workloads,
                |_| "default".into(),
            );
        };
        // web reaches A and B, api reaches B: the budget of 2 is full.
        drain(
            &mut t,
            at(0),
            vec![from(1, a, 3), from(1, b, 2), from(2, b, 1)],
        );
        // web's A and api's B keep growing; web's B does not.
        drain(
            &mut t,
            at(5),
            vec![from(1, a, 4), from(1, b, 2), from(2, b, 5)],
        );
        // Past the idle time of web's B only: it goes, B keeps its place (api's series lives),
        // so C has none and counts as `other`.
        drain(
            &mut t,
            at(11),
            vec![from(1, a, 4), from(1, b, 2), from(2, b, 5), from(1, c, 1)],
        );
        let text = t.encode();
        let web = |d: IpAddr| (d.to_string(), "web".to_owned());
        let api = |d: IpAddr| (d.to_string(), "api".to_owned());
        assert_eq!(
            own_series(&text),
            BTreeMap::from([(web(a), 4), (api(b), 5)]),
            "{text}"
        );
        assert_eq!(other(&text), 1);
        assert_eq!(t.destination_series(), 2);
        // Past the idle time of everything but C's attempts: A and B go, C and D get places.
        let (d, e) = (ip(4), ip(5));
        drain(
            &mut t,
            at(16),
            vec![
                from(1, a, 4),
                from(1, b, 2),
                from(2, b, 5),
                from(1, c, 2),
                from(2, d, 7),
                from(2, e, 1),
            ],
        );
        let text = t.encode();
        assert_eq!(
            own_series(&text),
            BTreeMap::from([(web(c), 1), (api(d), 7)]),
            "C's first attempt stays under `other`; the budget holds C and D, E is `other`: {text}"
        );
        assert_eq!(t.destination_series(), 2);
        assert_eq!(other(&text), 2);
        // Per workload nothing went: every attempt, exactly once.
        assert_eq!(workload_total(&text, "web"), 4 + 2 + 2);
        assert_eq!(workload_total(&text, "api"), 5 + 7 + 1);
    }

    #[test]
    fn an_expired_destination_seen_again_gets_a_new_series_of_its_new_counts() {
        let mut t = Telemetry::new(limits(10, Some(Duration::from_secs(10)))).unwrap();
        let t0 = Instant::now();
        let a = ip(1);
        let counters = |n| Counters {
            samples: vec![from(1, a, n)],
            lost: [0; 3],
        };
        t.drain_at(t0, &counters(5), two_workloads, |_| "default".into());
        t.drain_at(
            t0 + Duration::from_secs(10),
            &counters(5),
            two_workloads,
            |_| "default".into(),
        );
        let text = t.encode();
        assert!(own_series(&text).is_empty(), "{text}");
        assert_eq!(t.destination_series(), 0);
        assert_eq!(workload_total(&text, "web"), 5);
        t.drain_at(
            t0 + Duration::from_secs(11),
            &counters(7),
            two_workloads,
            |_| "default".into(),
        );
        let text = t.encode();
        assert_eq!(
            own_series(&text),
            BTreeMap::from([((a.to_string(), "web".to_owned()), 2)]),
            "{text}"
        );
        assert_eq!(
            workload_total(&text, "web"),
            7,
            "neither lost nor counted twice"
        );
    }

    #[test]
    fn a_long_running_agent_keeps_within_the_budget_as_destinations_change() {
        let idle = Duration::from_secs(60);
        let mut t = Telemetry::new(limits(100, Some(idle))).unwrap();
        let t0 = Instant::now();
        let mut samples = Vec::new();
        // Every minute and a second a hundred new destinations, for an hour: 6,000 in all.
        for round in 0..60u32 {
            samples.extend((0..100).map(|i| from(1, ip(round * 100 + i), 1)));
            let now = t0 + (idle + Duration::from_secs(1)) * round;
            t.drain_at(
                now,
                &Counters {
                    samples: samples.clone(),
                    lost: [0; 3],
                },
                two_workloads,
                |_| "default".into(),
            );
            let text = t.encode();
            let series = own_series(&text);
            assert_eq!(series.len(), 100, "round {round}");
            assert!(
                series
                    .keys()
                    .all(|(d, _)| (0..100).any(|i| *d == ip(round * 100 + i).to_string())),
                "round {round}: only this round's destinations"
            );
            assert_eq!(other(&text), 0);
            assert_eq!(
                workload_total(&text, "web"),
                u64::from(round + 1) * 100,
                "round {round}"
            );
        }
    }

    #[test]
    fn without_an_idle_time_series_stay() {
        let mut t = Telemetry::new(limits(10, None)).unwrap();
        let t0 = Instant::now();
        let counters = Counters {
            samples: vec![from(1, ip(1), 1)],
            lost: [0; 3],
        };
        t.drain_at(t0, &counters, two_workloads, |_| "default".into());
        t.drain_at(
            t0 + Duration::from_secs(1_000_000),
            &counters,
            two_workloads,
            |_| "default".into(),
        );
        assert_eq!(own_series(&t.encode()).len(), 1);
    }

    #[test]
    fn idle_times_parse_with_their_unit() {
        let parse = |s: &str| s.parse::<IdleTime>().map(|i| i.0);
        assert_eq!(parse("10m"), Ok(Some(Duration::from_secs(600))));
        assert_eq!(parse("2s"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(parse("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse("1h"), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(parse("0"), Ok(None));
        assert_eq!(parse("0s"), Ok(None));
        for bad in ["10", "m", "10x", "-1s", ""] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(IdleTime::default().0, Some(SeriesLimits::DEFAULT_IDLE));
    }

    #[test]
    fn counters_moved_out_of_the_destination_map_are_not_counted_twice() {
        let mut t = Telemetry::new(limits(10, None)).unwrap();
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
