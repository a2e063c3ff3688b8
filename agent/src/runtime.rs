//! The loop every source needs, whatever feeds it: compile and enforce each update the source
//! sends, serve metrics, health and readiness, read the deny log, drain the kernel counters into
//! the metrics, keep egret's links pinned and attached, and print the report of recent
//! connections.
//!
//! ```text
//! source (local files | Kubernetes) --SourceEvent--> runtime -> pipeline (compile -> lower ->
//! diff -> apply) -> datapath;  datapath counters / events -> telemetry -> /metrics, deny log
//! ```
//!
//! A source sends the node's whole state ([`Update`]) or only its cgroups ([`CgroupPlan`]),
//! through one channel; the runtime takes every event waiting before it writes, so a burst of
//! changes costs one write.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::{
    datapath::{CgroupRole, Datapath, DatapathError, EndpointId, Verdict},
    pipeline::{Pipeline, StateChange},
    policy::{compile::CompileOptions, model::World},
    telemetry::{
        Telemetry, TelemetryError,
        server::{HealthCheck, Shared},
    },
};

/// How often the loop asks the kernel whether egret's links are attached and pinned.
const LINK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Errors of the runtime; each says which part failed to start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Datapath(#[from] Box<DatapathError>),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("failed to serve metrics on {address}")]
    Metrics {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to start the deny log")]
    DenyLog {
        #[source]
        source: io::Error,
    },
}

/// Which cgroups are which workload's, and which are guards or unmanaged, as a source sees the
/// hierarchy. Endpoint ids are the compiler's, so the runtime turns this into roles after each
/// compile ([`Self::roles`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupPlan {
    /// (namespace, name) of a workload or pod -> its cgroup ids.
    pub workloads: BTreeMap<(String, String), BTreeSet<u64>>,
    /// Cgroups whose unknown descendants are denied until written (fail closed).
    pub guards: BTreeSet<u64>,
    /// Known cgroups below a guard that are no workload's.
    pub unmanaged: BTreeSet<u64>,
    /// The packet level of the workloads the source describes: their node-side interfaces
    /// (TC programs) or, without any, raw sockets refused (`datapath::tc`).
    pub interfaces: BTreeMap<(String, String), crate::datapath::tc::WorkloadInterfaces>,
    /// Node-side veths whose pod is not known yet while a pod of the node waits for its veth to
    /// be found: TC programs drop all but link traffic on them (`iface_flags::PENDING`).
    pub pending_interfaces: BTreeSet<u32>,
}

impl CgroupPlan {
    /// The role of every cgroup, given the compiled endpoint ids. An endpoint wins over a guard,
    /// a guard over unmanaged; a workload without a compiled endpoint (rejected, or on another
    /// node) gets no role, so a guard above it keeps it pending.
    pub fn roles(
        &self,
        endpoints: &BTreeMap<(String, String), EndpointId>,
    ) -> BTreeMap<u64, CgroupRole> {
        let mut out: BTreeMap<u64, CgroupRole> = self
            .unmanaged
            .iter()
            .map(|id| (*id, CgroupRole::Unmanaged))
            .collect();
        out.extend(self.guards.iter().map(|id| (*id, CgroupRole::Guard)));
        for (workload, cgroups) in &self.workloads {
            if let Some(endpoint) = endpoints.get(workload) {
                out.extend(
                    cgroups
                        .iter()
                        .map(|id| (*id, CgroupRole::Endpoint(*endpoint))),
                );
            }
        }
        out
    }
}

/// The node's whole state, from a source.
pub struct Update {
    pub change: StateChange,
    pub options: CompileOptions,
    pub cgroups: CgroupPlan,
    /// When the oldest change it includes happened (for the event-to-enforced latency).
    pub since: Option<Instant>,
}

/// What a source tells the runtime.
pub enum SourceEvent {
    /// A new state: compile and enforce it.
    Update(Box<Update>),
    /// Only the cgroups changed: enforce the last compile on them.
    Cgroups(Box<CgroupPlan>),
    /// What the source's last load rejected (shown in the log, a metric and `/readyz`).
    Rejections(Rejections),
    /// A watch's state, for metrics: kind, restarts so far, objects in its store.
    Watch {
        kind: &'static str,
        restarts: u64,
        objects: usize,
    },
    /// What readiness waits for (a watch's initial list); `None`: nothing.
    Waiting(Option<String>),
    /// Why pods' veths cannot be looked up at all (`/readyz`, a metric); `None`: they can.
    VethLookup(Option<String>),
    /// A link of the node was added, changed or removed: nothing to compile, but the
    /// workloads' `interfaces` are resolved again at once (a new interface gets its TC
    /// programs now, not at the next tick).
    Links,
}

/// How the runtime serves and reports.
pub struct RuntimeOptions {
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, and the destination-series budget.
    pub metrics: Option<(SocketAddr, crate::telemetry::SeriesLimits)>,
    /// How often to print the connections counted since the last report; `None`: never.
    pub report_every: Option<Duration>,
    /// How often to drain counters when no event comes.
    pub tick: Duration,
    /// The source's own liveness, for `/healthz`.
    pub health: Option<HealthCheck>,
    /// What readiness waits for at the start, before the first update.
    pub waiting: Option<String>,
    /// The `policy` label of denials by a guard: `pending` (local workloads), `unknown-pod`
    /// (the agent).
    pub pending_label: &'static str,
    /// The deny log's rate limits and state bound.
    pub deny_log: crate::telemetry::denylog::Limits,
}

/// A load's rejections as the log, the metric and `/readyz` show them: one message each
/// (rejected objects, then the objects that keep their last valid version), and a count per
/// reason.
pub struct Rejections {
    pub messages: Vec<String>,
    pub by_reason: BTreeMap<&'static str, usize>,
}

/// Serves metrics at once, enforces the first [`Update`] the source sends, then every event
/// after it, until the source hangs up.
pub fn run(
    datapath: Datapath,
    events: &mpsc::Receiver<SourceEvent>,
    options: RuntimeOptions,
) -> Result<(), RuntimeError> {
    let RuntimeOptions {
        metrics,
        report_every,
        tick,
        health,
        waiting,
        pending_label,
        deny_log,
    } = options;
    // Metrics, health and readiness are served from the start: `/readyz` says what it waits for.
    let shared = match metrics {
        Some((address, budget)) => {
            let mut shared = Shared::new(Telemetry::new(budget)?);
            shared.health = health;
            *shared.waiting.lock().unwrap_or_else(|e| e.into_inner()) = waiting;
            let shared = Arc::new(shared);
            let bound = crate::telemetry::server::serve(address, Arc::clone(&shared))
                .map_err(|source| RuntimeError::Metrics { address, source })?;
            tracing::info!(address = %bound, "serving metrics on /metrics, /healthz, /readyz");
            Some(shared)
        }
        None => None,
    };
    // Until the first state: only what the source reports about itself.
    let first = loop {
        match events.recv() {
            Ok(SourceEvent::Update(update)) => break *update,
            Ok(other) => handle_report(shared.as_deref(), other),
            Err(mpsc::RecvError) => return Ok(()),
        }
    };
    let Update {
        change,
        options: compile_options,
        cgroups,
        since,
    } = first;
    let start = Instant::now();
    let pipeline = match change {
        StateChange::World(world) => Pipeline::new(datapath, world, compile_options),
        // A source that starts with a delta: from nothing.
        pods @ StateChange::Pods { .. } => {
            Pipeline::new(datapath, World::default(), compile_options.clone()).map(|mut p| {
                p.apply(pods, compile_options);
                p
            })
        }
    }
    .map_err(Box::new)?;
    observe_compile(shared.as_deref(), start);
    let names = Arc::new(Mutex::new(NameSnapshot {
        pending_label,
        ..NameSnapshot::default()
    }));
    match crate::datapath::EventReader::open(pipeline.datapath().pin_dir()) {
        Ok(reader) => spawn_deny_log(reader, Arc::clone(&names), shared.clone(), deny_log)
            .map_err(|source| RuntimeError::DenyLog { source })?,
        Err(err) => tracing::warn!("no deny log: {err}"),
    }
    let tc = crate::datapath::tc::TcAttachments::open(pipeline.datapath().pin_dir())
        .inspect_err(|err| tracing::error!("no TC programs: {err}"))
        .ok();
    let mut runtime = Runtime {
        tc,
        pipeline,
        plan: cgroups,
        shared,
        names,
        dirty: true,
        over_budget: Vec::new(),
        since,
    };
    runtime.report_over_budget();
    // The first write must succeed: nothing else is enforced for these workloads yet. A set
    // the maps cannot hold is the exception: it was refused before anything was written, so
    // what a previous agent enforced stays, and staying up (not ready, the error in `/readyz`
    // and `egret_policy_write_failing`) says so where a restart loop would not; the next
    // change that makes room is written.
    match runtime.enforce() {
        Ok(()) => {}
        Err(err @ DatapathError::NoRoom { .. }) => {
            tracing::error!("failed to enforce: {err}; not ready until a change makes room");
        }
        Err(err) => return Err(Box::new(err).into()),
    }
    // The interfaces that exist now get their programs now, not after the first tick.
    runtime.reconcile_tc();
    let mut gone = HashMap::new();
    let mut report = Report::new(runtime.pipeline.datapath());
    let mut last_report = Instant::now();
    let mut last_link_check = Instant::now();
    loop {
        match events.recv_timeout(tick) {
            Ok(event) => {
                runtime.handle(event);
                // Everything already waiting goes into the same write.
                while let Ok(event) = events.try_recv() {
                    runtime.handle(event);
                }
                if let Err(err) = runtime.enforce() {
                    tracing::error!(
                        "failed to enforce: {err:#}; the previous policy stays enforced"
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        runtime.reconcile_tc();
        if let Some(shared) = &runtime.shared {
            let moved = drain(shared, &mut runtime.pipeline, pending_label, &mut gone);
            report.moved(&moved);
        }
        // Programs someone detached are attached again and pins someone removed come back,
        // within a second; the attached-programs gauge says what the kernel reports.
        if last_link_check.elapsed() >= LINK_CHECK_EVERY {
            last_link_check = Instant::now();
            let links = runtime.pipeline.datapath_mut().check_links();
            let tc = runtime
                .tc
                .as_mut()
                .map(|tc| tc.check_links())
                .unwrap_or_default();
            if let Some(shared) = &runtime.shared {
                let telemetry = shared.telemetry();
                telemetry.attached(links.attached);
                // The counter maps fill between syncs (a scan): their fill is read here too.
                telemetry.usage(&runtime.pipeline.datapath().usage());
                telemetry.links_restored(&links.reattached, &links.repinned);
                telemetry.links_restored(&tc.reattached, &tc.repinned);
            }
        }
        if let Some(every) = report_every
            && last_report.elapsed() >= every
        {
            last_report = Instant::now();
            report.print(&runtime.pipeline);
        }
    }
}

/// Applies what a source reports about itself (not a state to enforce).
fn handle_report(shared: Option<&Shared>, event: SourceEvent) {
    match event {
        SourceEvent::Rejections(rejections) => record_rejections(shared, rejections),
        SourceEvent::Watch {
            kind,
            restarts,
            objects,
        } => {
            if let Some(shared) = shared {
                shared.telemetry().watch(kind, restarts, objects);
            }
        }
        SourceEvent::Waiting(waiting) => {
            if let Some(shared) = shared {
                *shared.waiting.lock().unwrap_or_else(|e| e.into_inner()) = waiting;
            }
        }
        SourceEvent::VethLookup(problem) => {
            if let Some(shared) = shared {
                shared.telemetry().veth_lookup(problem);
            }
        }
        // The run loop resolves interfaces after every event.
        SourceEvent::Links | SourceEvent::Update(_) | SourceEvent::Cgroups(_) => {}
    }
}

/// The runtime's state between events.
struct Runtime {
    /// The TC programs on workload interfaces; `None` when their pins could not be read.
    tc: Option<crate::datapath::tc::TcAttachments>,
    pipeline: Pipeline,
    plan: CgroupPlan,
    shared: Option<Arc<Shared>>,
    names: Arc<Mutex<NameSnapshot>>,
    /// A compile not written yet.
    dirty: bool,
    /// What the last compile left out over the per-policy entry budget, as reported.
    over_budget: Vec<String>,
    /// When the oldest change not enforced yet happened.
    since: Option<Instant>,
}

impl Runtime {
    fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Update(update) => {
                let Update {
                    change,
                    options,
                    cgroups,
                    since,
                } = *update;
                let start = Instant::now();
                self.pipeline.apply(change, options);
                tracing::debug!(seconds = start.elapsed().as_secs_f64(), "compiled");
                observe_compile(self.shared.as_deref(), start);
                self.report_over_budget();
                self.plan = cgroups;
                self.dirty = true;
                self.since = match (self.since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            SourceEvent::Cgroups(plan) => self.plan = *plan,
            other => handle_report(self.shared.as_deref(), other),
        }
    }

    /// Attaches and detaches TC programs as the plan's interfaces, as they exist now, want.
    fn reconcile_tc(&mut self) {
        if let Some(tc) = &mut self.tc {
            crate::datapath::tc::reconcile_logged(
                tc,
                &self.plan.interfaces,
                &self.plan.pending_interfaces,
                &self.pipeline.compiled().endpoints,
            );
        }
    }

    /// Logs and shows (metric, `/readyz`) the policies the last compile left out over the
    /// per-policy entry budget, when they differ from the compile before.
    fn report_over_budget(&mut self) {
        let now: Vec<String> = self
            .pipeline
            .compiled()
            .over_budget
            .iter()
            .map(ToString::to_string)
            .collect();
        if now == self.over_budget {
            return;
        }
        for message in &now {
            tracing::error!("{message}");
        }
        if let Some(shared) = &self.shared {
            shared.telemetry().over_budget(now.clone());
        }
        self.over_budget = now;
    }

    /// Writes the last compile for the current cgroups, if either changed.
    fn enforce(&mut self) -> Result<(), DatapathError> {
        let roles = self.plan.roles(&self.pipeline.compiled().endpoints);
        if !self.dirty && &roles == self.pipeline.cgroups() {
            return Ok(());
        }
        let start = Instant::now();
        let result = self.pipeline.enforce(roles);
        if let Some(shared) = &self.shared {
            record_sync(shared, &self.pipeline, result.is_ok());
            *shared.write_error.lock().unwrap_or_else(|e| e.into_inner()) =
                result.as_ref().err().map(with_causes);
        }
        let changes = result?;
        self.dirty = false;
        {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            *names = NameSnapshot::of(self.pipeline.compiled(), names.pending_label);
        }
        if let Some(shared) = &self.shared {
            if let Some(since) = self.since.take() {
                shared
                    .telemetry()
                    .enforced_after(since.elapsed().as_secs_f64());
            }
            shared
                .ready
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::info!(
            cgroups = self.pipeline.cgroups().len(),
            endpoints = self.pipeline.compiled().endpoints.len(),
            entries = self.pipeline.compiled().desired.len(),
            changes = changes.len(),
            seconds = start.elapsed().as_secs_f64(),
            "policy enforced"
        );
        Ok(())
    }
}

/// `err` and the errors that caused it, as one line.
fn with_causes(err: &DatapathError) -> String {
    let mut out = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(next) = cause {
        out.push_str(": ");
        out.push_str(&next.to_string());
        cause = next.source();
    }
    out
}

fn observe_compile(shared: Option<&Shared>, start: Instant) {
    if let Some(shared) = shared {
        shared.telemetry().compiled(start.elapsed().as_secs_f64());
    }
}

/// Logs a load's rejections and shows them in the metric and the readiness detail.
fn record_rejections(metrics: Option<&Shared>, r: Rejections) {
    for m in &r.messages {
        tracing::error!("{m}");
    }
    let total: usize = r.by_reason.values().sum();
    if total > 0 {
        tracing::error!(
            rejected = total,
            "reload rejected {total} file(s) or object(s); every other object is enforced, a rejected one keeps its last valid version"
        );
    }
    if let Some(shared) = metrics {
        shared.telemetry().rejected(&r.by_reason, r.messages);
    }
}

/// What the deny log needs to name a source and a rule, as of the last enforced compile: every
/// id known, also of workloads and rules that are gone.
#[derive(Default)]
struct NameSnapshot {
    workloads: BTreeMap<EndpointId, (String, String)>,
    ids: crate::policy::ids::IdTable,
    pending_label: &'static str,
}

impl NameSnapshot {
    /// The names of `compiled`, with guard denials labelled `pending_label`.
    fn of(compiled: &crate::policy::compile::Compiled, pending_label: &'static str) -> Self {
        Self {
            workloads: labels(compiled)
                .into_iter()
                .map(|(id, s)| (id, (s.namespace, s.workload)))
                .collect(),
            ids: compiled.ids.clone(),
            pending_label,
        }
    }
}

/// Writes the deny log to stdout from a thread that sleeps in the ring buffer's `poll`.
fn spawn_deny_log(
    mut reader: crate::datapath::EventReader,
    names: Arc<Mutex<NameSnapshot>>,
    metrics: Option<Arc<Shared>>,
    limits: crate::telemetry::denylog::Limits,
) -> std::io::Result<()> {
    use std::io::Write as _;
    std::thread::Builder::new()
        .name("deny-log".into())
        .spawn(move || {
            let mut log = crate::telemetry::denylog::DenyLog::new(limits);
            let mut reported_suppressed = 0;
            loop {
                let events = reader.wait(std::time::Duration::from_millis(500));
                if !events.is_empty() {
                    let now = std::time::Instant::now();
                    let time = rfc3339(std::time::SystemTime::now());
                    let snapshot = names.lock().unwrap_or_else(|e| e.into_inner());
                    let mut out = std::io::stdout().lock();
                    for event in &events {
                        let (namespace, workload) = snapshot
                            .workloads
                            .get(&event.endpoint_id)
                            .cloned()
                            .unwrap_or_else(|| {
                                (String::new(), format!("endpoint-{}", event.endpoint_id))
                            });
                        let origin = snapshot
                            .ids
                            .origin(event.rule_id)
                            .cloned()
                            .unwrap_or(crate::policy::explain::Origin::Baseline);
                        let names = crate::telemetry::denylog::Names {
                            namespace,
                            workload,
                            policy: reserved_label(event.rule_id, snapshot.pending_label)
                                .map_or_else(|| origin.policy_label(), str::to_owned),
                            rule: origin.rule_label(),
                        };
                        if let Some(line) = log.line(event, now, &time, &names) {
                            let _ = writeln!(out, "{line}");
                        }
                    }
                    let _ = out.flush();
                }
                if let Some(shared) = &metrics {
                    let telemetry = shared.telemetry.lock().unwrap_or_else(|e| e.into_inner());
                    telemetry.deny_log(log.suppressed - reported_suppressed, reader.lost());
                    reported_suppressed = log.suppressed;
                }
            }
        })?;
    Ok(())
}

/// `2026-11-24T10:43:00.123Z`, without a date library (civil-from-days, H. Hinnant).
fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Records a policy write in the health metrics.
fn record_sync(shared: &Shared, pipeline: &Pipeline, ok: bool) {
    let telemetry = shared.telemetry.lock().unwrap_or_else(|e| e.into_inner());
    if ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        telemetry.synced(i64::try_from(now).unwrap_or(i64::MAX));
    } else {
        telemetry.sync_failed();
    }
    telemetry.usage(&pipeline.datapath().usage());
    telemetry.workloads(sources(pipeline.compiled()).values());
    telemetry.attached(pipeline.datapath().attached_programs());
}

/// Who each endpoint is, for labels.
fn sources(
    compiled: &crate::policy::compile::Compiled,
) -> BTreeMap<EndpointId, crate::telemetry::Source> {
    compiled
        .workloads
        .iter()
        .map(|(id, (namespace, workload))| {
            let source = crate::telemetry::Source {
                namespace: namespace.clone(),
                workload: workload.clone(),
            };
            (*id, source)
        })
        .collect()
}

/// Who every endpoint id the compiler knows is, live or gone, for labels; the pending
/// endpoint (0) is `pending`.
fn labels(
    compiled: &crate::policy::compile::Compiled,
) -> BTreeMap<EndpointId, crate::telemetry::Source> {
    let mut out: BTreeMap<EndpointId, crate::telemetry::Source> = compiled
        .ids
        .endpoint_names()
        .iter()
        .map(|(id, name)| {
            let source = crate::telemetry::Source {
                namespace: name.namespace.clone(),
                workload: name.workload.clone(),
            };
            (*id, source)
        })
        .collect();
    out.extend(sources(compiled));
    out.insert(
        0,
        crate::telemetry::Source {
            namespace: String::new(),
            workload: "pending".into(),
        },
    );
    out
}

/// Moves what the kernel counted since the last drain into the metrics.
/// The `policy` label of the datapath's own rule ids, which no policy compiles to: a guard's
/// denial (`pending_label`), a refused source route, a malformed or forged packet, a refused
/// raw socket.
fn reserved_label(rule: u32, pending_label: &str) -> Option<&str> {
    match rule {
        egret_common::RULE_PENDING => Some(pending_label),
        egret_common::RULE_SOURCE_ROUTE => Some("source-route"),
        egret_common::RULE_MALFORMED => Some("malformed-packet"),
        egret_common::RULE_RAW_SOCKET => Some("raw-socket"),
        egret_common::RULE_MISSING_POLICY => Some("missing-policy"),
        _ => None,
    }
}

/// Fill of the destination counter map from which idle destinations are taken out of it.
const FORGET_FROM_FILL: f64 = 0.5;

/// Takes what the kernel counted since the last drain into telemetry; deletes the counters of
/// endpoints gone for the series idle time (`gone`: since when each endpoint with counters left
/// is gone), and once the destination map is half full, moves idle destinations out of it.
/// Returns what moved.
fn drain(
    shared: &Shared,
    pipeline: &mut Pipeline,
    pending_label: &str,
    gone: &mut HashMap<EndpointId, Instant>,
) -> Vec<(crate::datapath::CounterSample, u64)> {
    let counters = match pipeline.datapath().counters() {
        Ok(counters) => counters,
        Err(err) => {
            tracing::warn!("failed to read counters: {err}");
            return Vec::new();
        }
    };
    let compiled = pipeline.compiled();
    let sources = labels(compiled);
    let mut telemetry = shared.telemetry.lock().unwrap_or_else(|e| e.into_inner());
    // Once the destination map is half full, destinations counted and idle since the last
    // drain leave it (a scan of millions of addresses would otherwise fill it for good, and
    // every workload's new destinations would only be counted without theirs).
    let with_destination = counters
        .samples
        .iter()
        .filter(|s| s.destination.is_some())
        .count();
    let capacity = pipeline
        .datapath()
        .capacity(egret_common::map_names::COUNTERS);
    let idle: Vec<crate::datapath::CounterSample> =
        if with_destination as f64 >= FORGET_FROM_FILL * f64::from(capacity) {
            counters
                .samples
                .iter()
                .filter(|s| s.destination.is_some() && telemetry.taken(s) == Some(s.attempts))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
    telemetry.drain(
        &counters,
        |endpoint| sources.get(&endpoint).cloned(),
        |rule| {
            reserved_label(rule, pending_label)
                .map_or_else(|| compiled.origin(rule).policy_label(), str::to_owned)
        },
    );
    // A gone endpoint's counters would stay in the kernel for good (pods come and go all day):
    // once it has been gone for the series idle time (time for its last counts to be scraped)
    // and everything it counted was taken, they are deleted; its ids then go with the next
    // collection. The series stay: they are per owning workload, which other pods may share.
    let now = Instant::now();
    let mut live: BTreeSet<EndpointId> = compiled.workloads.keys().copied().collect();
    live.extend(pipeline.cgroups().values().filter_map(|role| match role {
        CgroupRole::Endpoint(id) => Some(*id),
        CgroupRole::Guard | CgroupRole::Unmanaged => None,
    }));
    // Endpoint 0 counts what guards and pending interfaces deny: never gone.
    live.insert(0);
    let counted: BTreeSet<EndpointId> = counters.samples.iter().map(|s| s.endpoint).collect();
    gone.retain(|id, _| !live.contains(id) && counted.contains(id));
    for id in counted.difference(&live) {
        gone.entry(*id).or_insert(now);
    }
    if let Some(keep) = telemetry.idle() {
        let retired: Vec<crate::datapath::CounterSample> = counters
            .samples
            .iter()
            .filter(|s| {
                gone.get(&s.endpoint)
                    .is_some_and(|since| now.saturating_duration_since(*since) >= keep)
                    && telemetry.taken(s) == Some(s.attempts)
            })
            .cloned()
            .collect();
        if !retired.is_empty() {
            match pipeline.datapath_mut().delete_counters(&retired) {
                Ok(()) => {
                    telemetry.forget(&retired);
                    tracing::debug!(
                        counters = retired.len(),
                        "counters of gone endpoints deleted"
                    );
                }
                Err(err) => {
                    tracing::warn!("failed to delete the counters of gone endpoints: {err}");
                }
            }
        }
    }
    if idle.is_empty() {
        return Vec::new();
    }
    let crate::datapath::Forgotten { moved, error } =
        pipeline.datapath_mut().forget_counters(&idle);
    // What moved before a failure did move: telemetry follows it either way, or its counts
    // would be taken twice.
    telemetry.moved(&moved);
    if let Some(err) = error {
        tracing::warn!(
            moved = moved.len(),
            "failed to take idle destinations out of the counter map: {err}"
        );
    }
    tracing::debug!(
        destinations = moved.len(),
        "idle destinations left the counter map"
    );
    moved
}

/// Prints what was counted since the last report: one line per workload, destination,
/// protocol, verdict and deciding policy.
struct Report {
    last: BTreeMap<(EndpointId, u32, Option<IpAddr>, u8, Verdict), u64>,
}

impl Report {
    fn new(datapath: &crate::datapath::Datapath) -> Self {
        let mut report = Self {
            last: BTreeMap::new(),
        };
        // Counts from before this process (pinned across restarts) are not "recent".
        report.deltas(datapath);
        report
    }

    /// Counters moved to the entry without destination: what was reported of them moves too.
    fn moved(&mut self, moved: &[(crate::datapath::CounterSample, u64)]) {
        for (s, _) in moved {
            let taken = self
                .last
                .remove(&(s.endpoint, s.rule, s.destination, s.protocol, s.verdict))
                .unwrap_or(0);
            *self
                .last
                .entry((s.endpoint, s.rule, None, s.protocol, s.verdict))
                .or_default() += taken;
        }
    }

    fn deltas(
        &mut self,
        datapath: &crate::datapath::Datapath,
    ) -> Vec<(EndpointId, u32, Option<IpAddr>, u8, Verdict, u64)> {
        let Ok(counters) = datapath.counters() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for s in counters.samples {
            let key = (s.endpoint, s.rule, s.destination, s.protocol, s.verdict);
            let before = self.last.insert(key, s.attempts).unwrap_or(0);
            if s.attempts > before {
                out.push((
                    s.endpoint,
                    s.rule,
                    s.destination,
                    s.protocol,
                    s.verdict,
                    s.attempts - before,
                ));
            }
        }
        out
    }

    fn print(&mut self, pipeline: &Pipeline) {
        let deltas = self.deltas(pipeline.datapath());
        if deltas.is_empty() {
            return;
        }
        let compiled = pipeline.compiled();
        let workloads: BTreeMap<EndpointId, String> = labels(compiled)
            .into_iter()
            .map(|(id, s)| (id, format!("{}/{}", s.namespace, s.workload)))
            .collect();
        println!(
            "{:<20} {:<28} {:<5} {:<12} {:>8}  POLICY",
            "WORKLOAD", "DESTINATION", "PROTO", "VERDICT", "ATTEMPTS"
        );
        for (endpoint, rule, destination, protocol, verdict, n) in deltas {
            let origin = compiled.origin(rule);
            let policy = match (origin, origin.rule_label()) {
                (crate::policy::explain::Origin::Baseline, _) => "default".into(),
                (crate::policy::explain::Origin::Pending, _) => "pending (not written yet)".into(),
                (_, Some(r)) => format!("{} rule {r}", origin.policy_label()),
                (_, None) => format!("{} (isolation)", origin.policy_label()),
            };
            let protocol = crate::policy::model::Protocol::from_number(protocol)
                .map_or_else(|| protocol.to_string(), |p| p.to_string());
            println!(
                "{:<20} {:<28} {:<5} {:<12} {:>8}  {policy}",
                workloads.get(&endpoint).map_or("?", String::as_str),
                destination.map_or_else(|| "other".to_owned(), |d| d.to_string()),
                protocol,
                verdict.counter_label(),
                n,
            );
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_516_980_123);
        assert_eq!(rfc3339(t), "2026-11-24T10:43:00.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn endpoints_win_over_guards_and_guards_over_unmanaged() {
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        let plan = CgroupPlan {
            workloads: BTreeMap::from([
                (key("web"), BTreeSet::from([10, 11])),
                (key("rejected"), BTreeSet::from([12])),
            ]),
            guards: BTreeSet::from([1, 10]),
            unmanaged: BTreeSet::from([1, 2, 12]),
            interfaces: BTreeMap::new(),
            pending_interfaces: BTreeSet::new(),
        };
        let roles = plan.roles(&BTreeMap::from([(key("web"), 7)]));
        assert_eq!(
            roles,
            BTreeMap::from([
                (1, CgroupRole::Guard),
                (2, CgroupRole::Unmanaged),
                (10, CgroupRole::Endpoint(7)),
                (11, CgroupRole::Endpoint(7)),
                (12, CgroupRole::Unmanaged),
            ])
        );
    }
}
