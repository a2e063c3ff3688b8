//! Local mode: the same YAML policies, enforced on local cgroups instead of Kubernetes pods.
//! The config names the workloads (namespace, labels and the cgroup they live in) and the
//! policy files; [`LocalSource::load`] turns them into the same `World` the Kubernetes source
//! gives, so compile, datapath and telemetry are shared.
//!
//! ```yaml
//! baseline: allow            # or deny (REGISTRY_ONLY-style)
//! policies: [policies/]      # files or directories, relative to this file
//! workloads:
//! - name: web
//!   namespace: shop
//!   labels: {app: web}
//!   cgroup: system.slice/web.service   # relative to the cgroup2 mount, or absolute; globs work
//!   ips: [192.0.2.20]                  # optional: where others reach it (for pod selectors)
//! ```

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::{
    datapath::{EndpointId, Verdict},
    policy::{
        cluster::{self, Limits, LoadError, Location, PolicyStore, Snapshot},
        model::{ObjectKind, ObjectRef, World},
        validate,
    },
    sys,
};

/// Errors of local mode; each names the file, and the object and field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The config file could not be read (the cause names the file and the OS error).
    #[error("config: {source}")]
    ReadConfig {
        #[source]
        source: LoadError,
    },
    #[error("config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A policy file, document or object was rejected.
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl LocalError {
    /// The `reason` label of `egret_policies_rejected`: `config`, `unreadable` or `invalid`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadConfig { .. } | Self::Config { .. } => "config",
            Self::Load(err) => err.reason(),
        }
    }
}

/// The config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Verdict for workloads no NetworkPolicy isolates.
    #[serde(default = "allow")]
    pub baseline: Verdict,
    /// Policy files or directories (Namespace, NetworkPolicy, EgressPolicy YAML).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    pub workloads: Vec<Workload>,
    /// Where to serve Prometheus metrics; none: not served.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Size caps on reading the policy files.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// The `limits` section: how much of the policy paths is read.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// Largest policy file read (default 3 MiB, the API server's request limit).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Most bytes read under one policy directory (default 32 MiB).
    #[serde(default = "default_max_directory_bytes")]
    pub max_directory_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: default_max_file_bytes(),
            max_directory_bytes: default_max_directory_bytes(),
        }
    }
}

impl From<LimitsConfig> for Limits {
    fn from(l: LimitsConfig) -> Self {
        Self {
            max_file_bytes: l.max_file_bytes,
            max_directory_bytes: l.max_directory_bytes,
        }
    }
}

fn default_max_file_bytes() -> u64 {
    cluster::DEFAULT_MAX_FILE_BYTES
}

fn default_max_directory_bytes() -> u64 {
    cluster::DEFAULT_MAX_DIRECTORY_BYTES
}

/// The `metrics` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz` (port 0: any free port, logged).
    pub address: std::net::SocketAddr,
    /// Destination IPs with their own series; the rest count under `destination_ip="other"`.
    #[serde(default = "default_budget")]
    pub max_destination_series: usize,
}

fn default_budget() -> usize {
    1000
}

fn allow() -> Verdict {
    Verdict::Allow
}

/// A local workload: what policies see as a pod.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// cgroup v2 directory (or glob), absolute or relative to the cgroup2 mount.
    pub cgroup: String,
    /// Addresses the workload is reached at, for pod-selector peers.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Named ports it serves, for rules that name a port (a Pod's container ports).
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
}

/// A named port of a workload.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadPort {
    pub name: String,
    pub port: i32,
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// Everything one load produced.
pub struct Loaded {
    pub config: Config,
    /// What to enforce: every valid object, and the last valid version of a rejected one.
    pub world: World,
    /// Fingerprint of the config and every policy file as read for this load.
    pub fingerprint: u64,
    /// Files, documents and objects rejected; the rest is in `world`.
    pub rejected: Vec<LocalError>,
    /// Objects enforced in their last valid version because the new one was rejected.
    pub kept: Vec<(ObjectRef, Location)>,
}

/// Reads the config and its policy files, and remembers what it enforced so a rejected update
/// of an object keeps its last valid version.
pub struct LocalSource {
    config_path: PathBuf,
    /// Command-line overrides of the config's `metrics` section.
    metrics_addr: Option<std::net::SocketAddr>,
    max_destination_series: Option<usize>,
    /// The objects enforced from the files, and the fingerprint of the last read.
    state: Mutex<(PolicyStore, Option<u64>)>,
}

impl LocalSource {
    pub fn new(config_path: PathBuf) -> Self {
        Self {
            config_path,
            metrics_addr: None,
            max_destination_series: None,
            state: Mutex::new((PolicyStore::default(), None)),
        }
    }

    /// Overrides the config's metrics address and series budget.
    pub fn with_metrics(
        mut self,
        address: Option<std::net::SocketAddr>,
        max_destination_series: Option<usize>,
    ) -> Self {
        self.metrics_addr = address;
        self.max_destination_series = max_destination_series;
        self
    }

    /// Loads everything. `Err`: the config itself could not be read or is invalid (nothing
    /// else was looked at). `Ok` holds every valid object and lists the rejected ones.
    pub fn load(&self) -> Result<Loaded, Vec<LocalError>> {
        let (text, config) = self.read_config();
        let snapshot = config
            .as_ref()
            .ok()
            .map(|c| Snapshot::read(&self.policy_paths(c), c.limits.into()));
        let fingerprint = fingerprint(&text, snapshot.as_ref());
        self.finish(config, snapshot, fingerprint)
    }

    /// Reads the config and every policy file (bounded, never blocking) and loads them when
    /// anything changed since the last load, including the removal of a file that could not
    /// be read. `None`: nothing changed.
    pub fn poll(&self) -> Option<Result<Loaded, Vec<LocalError>>> {
        let (text, config) = self.read_config();
        let snapshot = config
            .as_ref()
            .ok()
            .map(|c| Snapshot::read(&self.policy_paths(c), c.limits.into()));
        let fingerprint = fingerprint(&text, snapshot.as_ref());
        let last = self.state.lock().unwrap_or_else(|e| e.into_inner()).1;
        if last == Some(fingerprint) {
            return None;
        }
        Some(self.finish(config, snapshot, fingerprint))
    }

    fn policy_paths(&self, config: &Config) -> Vec<PathBuf> {
        let base = self.config_path.parent().unwrap_or(Path::new("."));
        config.policies.iter().map(|p| base.join(p)).collect()
    }

    /// The config text (or why it is unreadable) and the parsed config.
    fn read_config(&self) -> (Result<String, String>, Result<Config, Vec<LocalError>>) {
        let path = &self.config_path;
        let text = match cluster::read_file(path, cluster::DEFAULT_MAX_FILE_BYTES, None) {
            Ok(text) => text,
            Err(source) => {
                let message = source.to_string();
                return (Err(message), Err(vec![LocalError::ReadConfig { source }]));
            }
        };
        let config = self.parse_config(&text);
        (Ok(text), config)
    }

    fn parse_config(&self, text: &str) -> Result<Config, Vec<LocalError>> {
        let path = &self.config_path;
        let mut config: Config = serde_saphyr::from_str(text).map_err(|e| {
            vec![LocalError::Config {
                path: path.clone(),
                message: e
                    .to_string()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            }]
        })?;
        if let Some(address) = self.metrics_addr {
            let budget = config
                .metrics
                .as_ref()
                .map_or_else(default_budget, |m| m.max_destination_series);
            config.metrics = Some(MetricsConfig {
                address,
                max_destination_series: budget,
            });
        }
        if let (Some(budget), Some(metrics)) =
            (self.max_destination_series, config.metrics.as_mut())
        {
            metrics.max_destination_series = budget;
        }
        let problems: Vec<LocalError> = config
            .workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| check_workload(i, w, &config.workloads).err())
            .map(|message| LocalError::Config {
                path: path.clone(),
                message,
            })
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    fn finish(
        &self,
        config: Result<Config, Vec<LocalError>>,
        snapshot: Option<Snapshot>,
        fingerprint: u64,
    ) -> Result<Loaded, Vec<LocalError>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A config that does not load is reported once per change, not once per poll.
        state.1 = Some(fingerprint);
        let config = config?;
        let snapshot = snapshot.unwrap_or_default();
        // Workloads are Pods to policy: a Pod document with a workload's namespace and name
        // would replace it (and its addresses) silently, so it is refused, naming both.
        let reserved: BTreeMap<ObjectRef, String> = config
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    ObjectRef::new(ObjectKind::Pod, &w.namespace, &w.name),
                    format!(
                        "workload {}/{} of {} (workloads[{i}])",
                        w.namespace,
                        w.name,
                        self.config_path.display()
                    ),
                )
            })
            .collect();
        let outcome = state.0.load(&snapshot, &reserved);
        let mut cluster = outcome.cluster;
        for w in &config.workloads {
            cluster.pods.insert(
                (w.namespace.clone(), w.name.clone()),
                workload_pod(w).into(),
            );
        }
        let world = World::new(&cluster);
        let mut rejected: Vec<LocalError> =
            outcome.rejected.into_iter().map(LocalError::from).collect();
        // Everything was validated on the way in; anything World::new still refuses is a bug
        // worth seeing rather than a silent gap.
        rejected.extend(world.invalid.iter().map(|invalid| LocalError::Config {
            path: self.config_path.clone(),
            message: invalid.to_string(),
        }));
        Ok(Loaded {
            config,
            world,
            fingerprint,
            rejected,
            kept: outcome.kept,
        })
    }
}

/// Checks one workload as its Pod would be checked, and that no other has its name.
fn check_workload(index: usize, w: &Workload, all: &[Workload]) -> Result<(), String> {
    let at = format!("workloads[{index}]");
    let field = |e: validate::FieldResult<()>| {
        e.map_err(|e| format!("workload {}/{}: {at}.{}", w.namespace, w.name, e))
    };
    field(validate::namespace_name("namespace", &w.namespace))?;
    field(validate::object_name("name", &w.name))?;
    field(validate::labels("labels", &w.labels).map(drop))?;
    // The Pod it stands for carries its ports: checked as a Pod's container ports are.
    validate::pod(&w.namespace, &w.name, &workload_pod(w)).map_err(|e| {
        let field = e
            .field
            .replace("spec.containers[0].ports", "ports")
            .replace(".containerPort", ".port")
            .replace("status.podIPs", "ips")
            .replace("].ip", "]");
        format!(
            "workload {}/{}: {at}.{field}: {}",
            w.namespace, w.name, e.message
        )
    })?;
    if w.cgroup.is_empty() {
        return Err(format!(
            "workload {}/{}: {at}.cgroup: Required value: a cgroup directory or glob",
            w.namespace, w.name
        ));
    }
    if let Some(first) = all[..index]
        .iter()
        .position(|o| o.namespace == w.namespace && o.name == w.name)
    {
        return Err(format!(
            "workload {}/{}: {at}.name: Duplicate value: {:?}: workloads[{first}] has the same namespace and name",
            w.namespace, w.name, w.name
        ));
    }
    Ok(())
}

/// The Pod a workload stands for.
fn workload_pod(w: &Workload) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            labels: Some(w.labels.clone()),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            pod_ips: Some(
                w.ips
                    .iter()
                    .map(|ip| PodIP { ip: ip.to_string() })
                    .collect(),
            ),
            ..PodStatus::default()
        }),
        spec: (!w.ports.is_empty()).then(|| PodSpec {
            containers: vec![Container {
                name: w.name.clone(),
                ports: Some(
                    w.ports
                        .iter()
                        .map(|p| ContainerPort {
                            name: Some(p.name.clone()),
                            container_port: p.port,
                            protocol: p.protocol.clone(),
                            ..ContainerPort::default()
                        })
                        .collect(),
                ),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// One number for the config and every policy file as read, errors included.
fn fingerprint(config: &Result<String, String>, snapshot: Option<&Snapshot>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    config.hash(&mut hasher);
    snapshot.map(Snapshot::fingerprint).hash(&mut hasher);
    hasher.finish()
}

/// The cgroups of each workload as they exist now: cgroup id -> endpoint id. A workload whose
/// cgroup does not exist (yet) has none; a glob may give several.
pub fn resolve_cgroups(
    config: &Config,
    endpoints: &BTreeMap<(String, String), EndpointId>,
    cgroup_root: &Path,
) -> BTreeMap<u64, EndpointId> {
    let mut out = BTreeMap::new();
    for w in &config.workloads {
        let Some(endpoint) = endpoints.get(&(w.namespace.clone(), w.name.clone())) else {
            continue;
        };
        let pattern = if Path::new(&w.cgroup).is_absolute() {
            PathBuf::from(&w.cgroup)
        } else {
            cgroup_root.join(&w.cgroup)
        };
        let Ok(matches) = glob::glob(&pattern.to_string_lossy()) else {
            tracing::warn!(workload = %w.name, cgroup = %w.cgroup, "invalid cgroup glob");
            continue;
        };
        for dir in matches.flatten() {
            match sys::cgroup_id(&dir) {
                Ok(id) => {
                    out.insert(id, *endpoint);
                }
                Err(err) => tracing::warn!(workload = %w.name, cgroup = %dir.display(), "{err}"),
            }
        }
    }
    out
}

/// Options of `egret run` beside the config.
pub struct RunOptions {
    /// How often to print the connections counted since the last report; `None`: never.
    pub report_every: Option<std::time::Duration>,
    /// How often to look for edited files and new cgroups.
    pub poll_every: std::time::Duration,
}

/// Runs local mode until the process is stopped: enforces the config, then follows edits of the
/// config and policy files and the appearance of workload cgroups. A change that does not load
/// is reported and leaves the enforced policy as it was.
pub fn run(
    source: &LocalSource,
    datapath: crate::datapath::Datapath,
    cgroup_root: &Path,
    options: &RunOptions,
) -> anyhow::Result<()> {
    use std::time::Instant;

    let loaded = source.load().map_err(|problems| {
        for p in &problems {
            tracing::error!("{p}");
        }
        anyhow::anyhow!(
            "{} problem(s) in the config; nothing changed",
            problems.len()
        )
    })?;
    let rejected_at_start = rejections(&loaded.rejected, &loaded.kept);
    let compile_options = |config: &Config| crate::policy::compile::CompileOptions {
        baseline: config.baseline,
        node: None,
    };
    let mut config = loaded.config;
    // Metrics are served from the start (`/readyz` says when policy is written); the address is
    // read once, at start.
    let metrics = match &config.metrics {
        Some(m) => {
            let shared = std::sync::Arc::new(crate::telemetry::server::Shared {
                telemetry: std::sync::Mutex::new(crate::telemetry::Telemetry::new(
                    m.max_destination_series,
                )?),
                ready: std::sync::atomic::AtomicBool::new(false),
            });
            let addr = crate::telemetry::server::serve(m.address, std::sync::Arc::clone(&shared))?;
            tracing::info!(address = %addr, "serving metrics on /metrics, /healthz, /readyz");
            Some(shared)
        }
        None => None,
    };
    record_rejections(metrics.as_deref(), rejected_at_start);
    let mut pipeline =
        crate::pipeline::Pipeline::new(datapath, loaded.world, compile_options(&config));
    let names = std::sync::Arc::new(std::sync::Mutex::new(NameSnapshot::default()));
    match crate::datapath::EventReader::open(pipeline.datapath().pin_dir()) {
        Ok(reader) => spawn_deny_log(reader, std::sync::Arc::clone(&names), metrics.clone())?,
        Err(err) => tracing::warn!("no deny log: {err}"),
    }
    let cgroups = resolve_cgroups(&config, &pipeline.compiled().endpoints, cgroup_root);
    let changes = pipeline.enforce(cgroups)?;
    *names.lock().unwrap_or_else(|e| e.into_inner()) = NameSnapshot::of(pipeline.compiled());
    if let Some(shared) = &metrics {
        record_sync(shared, &pipeline, true);
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    tracing::info!(
        workloads = config.workloads.len(),
        cgroups = pipeline.cgroups().len(),
        entries = pipeline.compiled().desired.len(),
        changes = changes.len(),
        "policy enforced"
    );
    let mut report = Report::new(pipeline.datapath());
    let mut last_report = Instant::now();
    loop {
        std::thread::sleep(options.poll_every);
        let mut dirty = false;
        match source.poll() {
            None => {}
            Some(Ok(loaded)) => {
                record_rejections(
                    metrics.as_deref(),
                    rejections(&loaded.rejected, &loaded.kept),
                );
                config = loaded.config;
                pipeline.set_world_with(loaded.world, compile_options(&config));
                dirty = true;
                tracing::info!("reloaded config and policies");
            }
            Some(Err(problems)) => {
                record_rejections(metrics.as_deref(), rejections(&problems, &[]));
                tracing::error!(
                    problems = problems.len(),
                    "reload rejected: the config does not load; the policy enforced before stays enforced"
                );
            }
        }
        let cgroups = resolve_cgroups(&config, &pipeline.compiled().endpoints, cgroup_root);
        if dirty || &cgroups != pipeline.cgroups() {
            let result = pipeline.enforce(cgroups);
            if let Some(shared) = &metrics {
                record_sync(shared, &pipeline, result.is_ok());
            }
            if result.is_ok() {
                *names.lock().unwrap_or_else(|e| e.into_inner()) =
                    NameSnapshot::of(pipeline.compiled());
            }
            match result {
                Ok(changes) => tracing::info!(
                    cgroups = pipeline.cgroups().len(),
                    entries = pipeline.compiled().desired.len(),
                    changes = changes.len(),
                    "policy enforced"
                ),
                Err(err) => tracing::error!(
                    "failed to enforce: {err:#}; the previous policy stays enforced"
                ),
            }
        }
        if let Some(shared) = &metrics {
            drain(shared, &pipeline);
        }
        if let Some(every) = options.report_every
            && last_report.elapsed() >= every
        {
            last_report = Instant::now();
            report.print(&pipeline);
        }
    }
}

/// A load's rejections as the log, the metric and `/readyz` show them: one message each
/// (rejected objects, then the objects that keep their last valid version), and a count per
/// reason.
pub struct Rejections {
    pub messages: Vec<String>,
    pub by_reason: BTreeMap<&'static str, usize>,
}

/// Collects what a load rejected and kept.
pub fn rejections(rejected: &[LocalError], kept: &[(ObjectRef, Location)]) -> Rejections {
    let mut by_reason = BTreeMap::new();
    let mut messages = Vec::new();
    for p in rejected {
        *by_reason.entry(p.reason()).or_insert(0) += 1;
        messages.push(p.to_string());
    }
    for (object, location) in kept {
        messages.push(format!(
            "{object}: keeps its last valid version, read from {location}"
        ));
    }
    Rejections {
        messages,
        by_reason,
    }
}

/// Logs a load's rejections and shows them in the metric and the readiness detail.
fn record_rejections(metrics: Option<&crate::telemetry::server::Shared>, r: Rejections) {
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
        shared
            .telemetry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected(&r.by_reason, r.messages);
    }
}

/// What the deny log needs to name a source and a rule, as of the last enforced compile.
#[derive(Default)]
struct NameSnapshot {
    workloads: BTreeMap<EndpointId, (String, String)>,
    origins: Vec<crate::policy::explain::Origin>,
}

impl NameSnapshot {
    fn of(compiled: &crate::policy::compile::Compiled) -> Self {
        Self {
            workloads: compiled.workloads.clone(),
            origins: compiled.origins.clone(),
        }
    }
}

/// Writes the deny log to stdout from a thread that sleeps in the ring buffer's `poll`.
fn spawn_deny_log(
    mut reader: crate::datapath::EventReader,
    names: std::sync::Arc<std::sync::Mutex<NameSnapshot>>,
    metrics: Option<std::sync::Arc<crate::telemetry::server::Shared>>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    std::thread::Builder::new()
        .name("deny-log".into())
        .spawn(move || {
            let mut log = crate::telemetry::denylog::DenyLog::default();
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
                            .origins
                            .get(event.rule_id as usize)
                            .cloned()
                            .unwrap_or(crate::policy::explain::Origin::Baseline);
                        let names = crate::telemetry::denylog::Names {
                            namespace,
                            workload,
                            policy: origin.policy_label(),
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
fn record_sync(
    shared: &crate::telemetry::server::Shared,
    pipeline: &crate::pipeline::Pipeline,
    ok: bool,
) {
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
    let links =
        std::fs::read_dir(pipeline.datapath().pin_dir().join("links")).map_or(0, |d| d.count());
    telemetry.attached(links);
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

/// Moves what the kernel counted since the last drain into the metrics.
fn drain(shared: &crate::telemetry::server::Shared, pipeline: &crate::pipeline::Pipeline) {
    let counters = match pipeline.datapath().counters() {
        Ok(counters) => counters,
        Err(err) => {
            tracing::warn!("failed to read counters: {err}");
            return;
        }
    };
    let compiled = pipeline.compiled();
    let sources = sources(compiled);
    shared
        .telemetry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(
            &counters,
            |endpoint| sources.get(&endpoint).cloned(),
            |rule| compiled.origin(rule).policy_label(),
        );
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

    fn print(&mut self, pipeline: &crate::pipeline::Pipeline) {
        let deltas = self.deltas(pipeline.datapath());
        if deltas.is_empty() {
            return;
        }
        let compiled = pipeline.compiled();
        let workloads: BTreeMap<EndpointId, String> = compiled
            .workloads
            .iter()
            .map(|(id, (ns, name))| (*id, format!("{ns}/{name}")))
            .collect();
        println!(
            "{:<20} {:<28} {:<5} {:<12} {:>8}  POLICY",
            "WORKLOAD", "DESTINATION", "PROTO", "VERDICT", "ATTEMPTS"
        );
        for (endpoint, rule, destination, protocol, verdict, n) in deltas {
            let origin = compiled.origin(rule);
            let policy = match (origin, origin.rule_label()) {
                (crate::policy::explain::Origin::Baseline, _) => "default".into(),
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
    use crate::policy::compile::{CompileOptions, compile};

    #[test]
    fn formats_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_516_980_123);
        assert_eq!(rfc3339(t), "2026-11-24T10:43:00.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("egret-local-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        dir
    }

    const CONFIG: &str = "policies: [policies]\nworkloads:\n- {name: web, namespace: shop, labels: {app: web}, cgroup: x, ips: [192.0.2.20], ports: [{name: http, port: 8080}]}\n";

    fn netpol(name: &str, port: u32) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{{port: {port}}}]\n"
        )
    }

    fn ports_of(world: &World, name: &str) -> Vec<(u16, u16)> {
        let np = world
            .network_policies
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not enforced"));
        np.rules
            .iter()
            .flat_map(|r| r.ports.iter().flatten())
            .filter_map(|p| match p.port {
                crate::policy::model::PortMatch::Range(a, b) => Some((a, b)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_rejected_object_keeps_its_last_valid_version_and_the_rest_reloads() {
        let dir = temp_dir("reload");
        std::fs::write(dir.join("egret.yaml"), CONFIG).unwrap();
        std::fs::write(dir.join("policies/a.yaml"), netpol("a", 80)).unwrap();
        let source = LocalSource::new(dir.join("egret.yaml"));
        let loaded = source.load().unwrap();
        assert!(loaded.rejected.is_empty());
        assert_eq!(ports_of(&loaded.world, "a"), [(80, 80)]);
        assert!(source.poll().is_none(), "nothing changed");

        // A bad update of `a` and a new valid `b` beside it.
        std::fs::write(dir.join("policies/a.yaml"), netpol("a", 70000)).unwrap();
        std::fs::write(dir.join("policies/b.yaml"), netpol("b", 443)).unwrap();
        let loaded = source.poll().unwrap().unwrap();
        assert_eq!(
            ports_of(&loaded.world, "a"),
            [(80, 80)],
            "last valid version"
        );
        assert_eq!(
            ports_of(&loaded.world, "b"),
            [(443, 443)],
            "the new file took effect"
        );
        let messages: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [format!(
                "{} document 0: NetworkPolicy shop/a: spec.egress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
                dir.join("policies/a.yaml").display()
            )]
        );
        assert_eq!(loaded.kept.len(), 1);
        let r = rejections(&loaded.rejected, &loaded.kept);
        assert_eq!(r.by_reason, BTreeMap::from([("invalid", 1)]));
        assert!(
            r.messages[1]
                .starts_with("NetworkPolicy shop/a: keeps its last valid version, read from ")
        );

        // A FIFO beside them neither blocks the poll nor stops the reload; its removal is
        // noticed.
        let fifo = dir.join("policies/zz.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let loaded = source.poll().unwrap().unwrap();
        assert!(
            loaded
                .rejected
                .iter()
                .any(|e| e.to_string().contains("it is a FIFO")),
            "{:?}",
            loaded.rejected
        );
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(dir.join("policies/a.yaml"), netpol("a", 81)).unwrap();
        let loaded = source.poll().unwrap().unwrap();
        assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
        assert!(loaded.kept.is_empty());
        assert_eq!(ports_of(&loaded.world, "a"), [(81, 81)]);

        // Removing a file removes what it held.
        std::fs::remove_file(dir.join("policies/b.yaml")).unwrap();
        let loaded = source.poll().unwrap().unwrap();
        assert!(!loaded.world.network_policies.iter().any(|n| n.name == "b"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pod_document_named_like_a_workload_is_refused_naming_both() {
        let dir = temp_dir("workload-pod");
        std::fs::write(dir.join("egret.yaml"), CONFIG).unwrap();
        std::fs::write(
            dir.join("policies/pods.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: other}}\nstatus: {podIP: 192.0.2.99}\n",
        )
        .unwrap();
        let loaded = LocalSource::new(dir.join("egret.yaml")).load().unwrap();
        let messages: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [format!(
                "{} document 0: Pod shop/web: metadata.name: Duplicate value: \"web\": workload shop/web of {} (workloads[0]) has the same namespace and name; this document is not applied (a workload's labels, addresses and named ports are set in the config)",
                dir.join("policies/pods.yaml").display(),
                dir.join("egret.yaml").display()
            )]
        );
        // The workload is what policy sees, with its own labels, address and named port.
        let web = loaded.world.pod("shop", "web").unwrap();
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(web.ips, ["192.0.2.20".parse::<IpAddr>().unwrap()]);
        assert_eq!(web.ports.len(), 1);
        assert_eq!(
            (web.ports[0].name.as_str(), web.ports[0].number),
            ("http", 8080)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_invalid_workload_rejects_the_config_naming_the_field() {
        let dir = temp_dir("bad-workload");
        let source = LocalSource::new(dir.join("egret.yaml"));
        let cases = [
            (
                "- {name: Web, cgroup: x}",
                "workloads[0].name: Invalid value: \"Web\"",
            ),
            (
                "- {name: web, namespace: a_b, cgroup: x}",
                "workloads[0].namespace: Invalid value: \"a_b\"",
            ),
            (
                "- {name: web, cgroup: x, labels: {app: \"a b\"}}",
                "workloads[0].labels[app]: Invalid value: \"a b\"",
            ),
            (
                "- {name: web, cgroup: x, ports: [{name: http, port: 0}]}",
                "workloads[0].ports[0].port: Invalid value: 0",
            ),
            (
                "- {name: web, cgroup: x}\n- {name: web, cgroup: y}",
                "workloads[1].name: Duplicate value: \"web\"",
            ),
            (
                "- {name: web, cgroup: x, ips: [192.0.2.1, 192.0.2.2]}",
                "workloads[0].ips[1]: Invalid value: \"192.0.2.2\": may specify no more than one IP for each IP family",
            ),
        ];
        for (workloads, expect) in cases {
            std::fs::write(dir.join("egret.yaml"), format!("workloads:\n{workloads}\n")).unwrap();
            let Err(problems) = source.load() else {
                panic!("{workloads} was accepted");
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            let message = problems[0].to_string();
            assert!(message.contains(expect), "{workloads}: {message}");
            assert!(
                message.starts_with(&format!(
                    "config {}: workload ",
                    dir.join("egret.yaml").display()
                )),
                "{message}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn example_config_loads_and_means_what_it_says() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/local/egret.yaml");
        let loaded = LocalSource::new(path).load().unwrap_or_else(|problems| {
            panic!(
                "{}",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(loaded.config.workloads.len(), 3);
        let compiled = compile(&loaded.world, &CompileOptions::default());
        let decide = |from: (&str, &str), to: &str, port: u16| {
            let endpoint = compiled.endpoints[&(from.0.to_owned(), from.1.to_owned())];
            let (_, d) = compiled
                .desired
                .lookup(endpoint, to.parse().unwrap(), 6, port)
                .entry
                .unwrap();
            let answer = crate::policy::explain::Answer::new(
                d.verdict,
                compiled.origin(d.rule),
                compiled.baseline,
                to,
            );
            (d.verdict, answer.policy.map(|p| p.to_string()))
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            decide(("shop", "web"), "192.0.2.10", 443),
            (Verdict::Allow, some("NetworkPolicy shop/allow-payments"))
        );
        assert_eq!(
            decide(("shop", "web"), "203.0.113.10", 443).0,
            Verdict::Deny
        );
        assert_eq!(
            decide(("shop", "api"), "192.0.2.10", 443),
            (Verdict::Deny, some("NetworkPolicy shop/default-deny"))
        );
        assert_eq!(
            decide(("batch", "worker"), "192.0.2.10", 443),
            (Verdict::Allow, some("EgressPolicy allow-internal"))
        );
        assert_eq!(
            decide(("batch", "worker"), "192.0.2.254", 80),
            (Verdict::Deny, some("EgressPolicy block-metadata"))
        );
        assert_eq!(
            decide(("shop", "web"), "192.0.2.254", 443),
            (Verdict::Deny, some("EgressPolicy block-metadata"))
        );
        assert_eq!(
            decide(("batch", "worker"), "203.0.113.10", 443),
            (Verdict::Audit, some("EgressPolicy audit-internet"))
        );
    }
}
