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
//!   pending: deny                      # optional: fail closed for its cgroups not written yet
//! ```

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::{
    datapath::{CgroupRole, EndpointId, Verdict},
    pipeline::StateChange,
    policy::{
        cluster::{self, Limits, LoadError, Location, PolicyStore, Snapshot},
        model::{InvalidPolicy, ObjectKind, ObjectRef, World},
        validate,
    },
    runtime::{CgroupPlan, Rejections, RuntimeOptions, SourceEvent, Update},
    sys,
    telemetry::{IdleTime, SeriesLimits},
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
    /// Sizes of the maps egret creates (`policy: 2097152`), as `--map-entries` sets them; the
    /// flag wins. Applies when the maps are made (a first start, or after `egret detach`).
    #[serde(default)]
    pub maps: BTreeMap<String, u32>,
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
    /// Most policy entries one policy may need for the workloads (default 50,000); a policy
    /// over it is rejected (`policy::compile::Budget`).
    #[serde(default = "default_max_policy_entries")]
    pub max_policy_entries: usize,
}

fn default_max_policy_entries() -> usize {
    crate::policy::compile::DEFAULT_MAX_POLICY_ENTRIES
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: default_max_file_bytes(),
            max_directory_bytes: default_max_directory_bytes(),
            max_policy_entries: default_max_policy_entries(),
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
    /// How long a destination series stays without growing (`10m`; `0`: for ever).
    #[serde(default)]
    pub series_idle: IdleTime,
}

impl MetricsConfig {
    /// The destination-series budget and idle time.
    pub fn series_limits(&self) -> SeriesLimits {
        SeriesLimits {
            max_destinations: self.max_destination_series,
            idle: self.series_idle.0,
        }
    }
}

fn default_budget() -> usize {
    SeriesLimits::DEFAULT_MAX_DESTINATIONS
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
    /// What a cgroup that matches `cgroup` gets before egret has written it (a service
    /// restarted by systemd gets a new cgroup). `allow` (default): its processes are not
    /// decided until egret sees it, within milliseconds (inotify). `deny`: fail closed, also
    /// while egret is not running: the directory the pattern starts in becomes a guard, and
    /// every cgroup below it that egret has not written yet is denied; cgroups there that match
    /// no workload are written as unmanaged (see `docs/datapath.md`).
    #[serde(default)]
    pub pending: Pending,
    /// Named ports it serves, for rules that name a port (a Pod's container ports).
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    /// Node-side network interfaces (names or globs, e.g. `veth-web*`) whose packets are the
    /// workload's: TC programs there decide what raw sockets, ping sockets and `AF_PACKET` send,
    /// and drop source addresses other than `ips` (see `docs/datapath.md`).
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// [`Workload::pending`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pending {
    #[default]
    Allow,
    Deny,
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
    series_idle: Option<IdleTime>,
    /// The objects enforced from the files, and the fingerprint of the last read.
    state: Mutex<(PolicyStore, Option<u64>)>,
}

impl LocalSource {
    pub fn new(config_path: PathBuf) -> Self {
        Self {
            config_path,
            metrics_addr: None,
            max_destination_series: None,
            series_idle: None,
            state: Mutex::new((PolicyStore::default(), None)),
        }
    }

    /// Overrides the config's metrics address, series budget and series idle time.
    pub fn with_metrics(
        mut self,
        address: Option<std::net::SocketAddr>,
        max_destination_series: Option<usize>,
        series_idle: Option<IdleTime>,
    ) -> Self {
        self.metrics_addr = address;
        self.max_destination_series = max_destination_series;
        self.series_idle = series_idle;
        self
    }

    /// The config's `maps:` as `--map-entries` items (`policy=2097152`); none when the config
    /// does not read (its error comes with the first load).
    pub fn map_entries(&self) -> Vec<String> {
        self.read_config().1.map_or_else(
            |_| Vec::new(),
            |c| c.maps.iter().map(|(map, n)| format!("{map}={n}")).collect(),
        )
    }

    /// Whether the config puts TC programs on interfaces (a workload with `interfaces:`), for
    /// the preflight; `false` when the config does not load (the run says why).
    pub fn wants_tc(&self) -> bool {
        self.read_config()
            .1
            .is_ok_and(|c| c.workloads.iter().any(|w| !w.interfaces.is_empty()))
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
            config.metrics = Some(match config.metrics.take() {
                Some(metrics) => MetricsConfig { address, ..metrics },
                None => MetricsConfig {
                    address,
                    max_destination_series: default_budget(),
                    series_idle: IdleTime::default(),
                },
            });
        }
        if let Some(metrics) = config.metrics.as_mut() {
            if let Some(budget) = self.max_destination_series {
                metrics.max_destination_series = budget;
            }
            if let Some(idle) = self.series_idle {
                metrics.series_idle = idle;
            }
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
        // The snapshot is consumed file by file: its texts are gone once they are models.
        let outcome = state.0.load(snapshot, &reserved);
        let mut rejected: Vec<LocalError> =
            outcome.rejected.into_iter().map(LocalError::from).collect();
        let mut pods = Vec::new();
        for w in &config.workloads {
            match validate::pod(&w.namespace, &w.name, &workload_pod(w)) {
                Ok(pod) => pods.push(Arc::new(pod)),
                // `check_workload` refused the config already for anything this refuses: a
                // bug worth seeing rather than a silent gap.
                Err(e) => rejected.push(LocalError::Config {
                    path: self.config_path.clone(),
                    message: InvalidPolicy {
                        object: ObjectRef::new(ObjectKind::Pod, &w.namespace, &w.name),
                        field: e.field,
                        message: e.message,
                    }
                    .to_string(),
                }),
            }
        }
        let world = state.0.world_with(pods);
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

/// The cgroups of each workload as they exist now, and the guards of workloads that fail
/// closed. A workload whose cgroup does not exist (yet) has none; a glob may give several. Only
/// directories match (a pattern ending in `/*` would otherwise match the cgroup's interface
/// files).
pub fn plan_cgroups(config: &Config, cgroup_root: &Path) -> CgroupPlan {
    let mut plan = CgroupPlan::default();
    for w in &config.workloads {
        let Some(pattern) = CgroupPattern::of(w, cgroup_root) else {
            continue;
        };
        plan.interfaces.insert(
            (w.namespace.clone(), w.name.clone()),
            crate::datapath::tc::WorkloadInterfaces {
                patterns: w.interfaces.clone(),
                addresses: w.ips.clone(),
            },
        );
        let ids = plan
            .workloads
            .entry((w.namespace.clone(), w.name.clone()))
            .or_default();
        for dir in pattern.matches() {
            match sys::cgroup_id(&dir) {
                Ok(id) => {
                    ids.insert(id);
                }
                Err(err) => tracing::warn!(workload = %w.name, cgroup = %dir.display(), "{err}"),
            }
        }
    }
    // Guards: the walk below each fail-closed workload's guard directory, along its pattern. A
    // directory on the way to a match is a guard too (a cgroup created in it is pending); one
    // that leads to no match is unmanaged.
    for w in config
        .workloads
        .iter()
        .filter(|w| w.pending == Pending::Deny)
    {
        let Some(pattern) = CgroupPattern::of(w, cgroup_root) else {
            continue;
        };
        if pattern.guard == cgroup_root {
            // Never guard the whole host (refused by `guard_problems` at start).
            continue;
        }
        pattern.walk(&mut |dir, role| {
            let Ok(id) = sys::cgroup_id(dir) else { return };
            match role {
                CgroupRole::Guard => {
                    plan.guards.insert(id);
                }
                CgroupRole::Unmanaged => {
                    plan.unmanaged.insert(id);
                }
                // Matches are the workloads' above.
                CgroupRole::Endpoint(_) => {}
            }
        });
    }
    plan
}

/// [`plan_cgroups`] as roles, for the endpoints of a compile: cgroup id -> role.
pub fn resolve_cgroups(
    config: &Config,
    endpoints: &BTreeMap<(String, String), EndpointId>,
    cgroup_root: &Path,
) -> BTreeMap<u64, CgroupRole> {
    plan_cgroups(config, cgroup_root).roles(endpoints)
}

/// Workloads whose `pending: deny` would guard the cgroup2 root itself (every process on the
/// host): refused, with the workload named.
pub fn guard_problems(config: &Config, cgroup_root: &Path) -> Vec<String> {
    config
        .workloads
        .iter()
        .filter(|w| w.pending == Pending::Deny)
        .filter(|w| CgroupPattern::of(w, cgroup_root).is_some_and(|p| p.guard == cgroup_root))
        .map(|w| {
            format!(
                "workload {}/{}: field `pending`: deny would guard the cgroup2 root ({}); put the workload's cgroup in a directory of its own",
                w.namespace,
                w.name,
                cgroup_root.display()
            )
        })
        .collect()
}

/// The directories whose entries the run loop watches: every guard and every directory a
/// workload's pattern may match in, so that a new cgroup wakes it at once.
pub fn watch_dirs(config: &Config, cgroup_root: &Path) -> Vec<PathBuf> {
    let mut dirs = std::collections::BTreeSet::new();
    for w in &config.workloads {
        let Some(pattern) = CgroupPattern::of(w, cgroup_root) else {
            continue;
        };
        pattern.walk(&mut |dir, role| {
            if role == CgroupRole::Guard {
                dirs.insert(dir.to_path_buf());
            }
        });
    }
    dirs.into_iter().collect()
}

/// A workload's cgroup pattern, split where its first glob component starts.
struct CgroupPattern {
    /// The deepest directory of the pattern without glob characters.
    guard: PathBuf,
    /// The components after it, each a glob (or a literal name).
    rest: Vec<glob::Pattern>,
}

impl CgroupPattern {
    fn of(w: &Workload, cgroup_root: &Path) -> Option<Self> {
        let full = if Path::new(&w.cgroup).is_absolute() {
            PathBuf::from(&w.cgroup)
        } else {
            cgroup_root.join(&w.cgroup)
        };
        let mut guard = PathBuf::new();
        let mut rest = Vec::new();
        for component in full.components() {
            let text = component.as_os_str().to_string_lossy();
            let is_glob = text.contains(['*', '?', '[']);
            if rest.is_empty() && !is_glob {
                guard.push(component);
                continue;
            }
            match glob::Pattern::new(&text) {
                Ok(p) => rest.push(p),
                Err(err) => {
                    tracing::warn!(workload = %w.name, cgroup = %w.cgroup, "invalid cgroup glob: {err}");
                    return None;
                }
            }
        }
        if rest.is_empty() {
            // A literal path: the guard is its parent, the pattern its own name.
            let name = guard.file_name()?.to_string_lossy().into_owned();
            rest.push(glob::Pattern::new(&glob::Pattern::escape(&name)).ok()?);
            guard.pop();
        }
        Some(Self { guard, rest })
    }

    /// The directories that match the whole pattern.
    fn matches(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        self.walk(&mut |dir, role| {
            if matches!(role, CgroupRole::Endpoint(_)) {
                out.push(dir.to_path_buf());
            }
        });
        out
    }

    /// Visits the guard (as `Guard`), every directory below it on the way to a match
    /// (`Guard`), every match (`Endpoint(0)`: the caller knows the id) and every directory that
    /// leads to no match (`Unmanaged`).
    fn walk(&self, visit: &mut dyn FnMut(&Path, CgroupRole)) {
        if !is_dir(&self.guard) {
            return;
        }
        visit(&self.guard, CgroupRole::Guard);
        self.walk_below(&self.guard, 0, visit);
    }

    fn walk_below(&self, dir: &Path, depth: usize, visit: &mut dyn FnMut(&Path, CgroupRole)) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let last = depth + 1 == self.rest.len();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_dir(&path) {
                continue;
            }
            let name = entry.file_name();
            if !self.rest[depth].matches(&name.to_string_lossy()) {
                visit(&path, CgroupRole::Unmanaged);
            } else if last {
                visit(&path, CgroupRole::Endpoint(0));
            } else {
                visit(&path, CgroupRole::Guard);
                self.walk_below(&path, depth + 1, visit);
            }
        }
    }
}

/// A directory, not a symlink to one (cgroupfs has no symlinks; a link is not a cgroup).
fn is_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Options of `egret run` beside the config.
pub struct RunOptions {
    /// How often to print the connections counted since the last report; `None`: never.
    pub report_every: Option<std::time::Duration>,
    /// How often to look for edited files (new cgroups wake it at once).
    pub poll_every: std::time::Duration,
    /// The deny log's rate limits.
    pub deny_log: crate::telemetry::denylog::Limits,
}

/// Runs local mode until the process is stopped: this source, on a thread of its own, follows
/// the config and policy files and the workloads' cgroups, and feeds the shared runtime. A change
/// that does not load is reported and leaves the enforced policy as it was.
pub fn run(
    source: LocalSource,
    datapath: crate::datapath::Datapath,
    cgroup_root: &Path,
    options: &RunOptions,
) -> anyhow::Result<()> {
    let loaded = source.load().map_err(|problems| {
        for p in &problems {
            tracing::error!("{p}");
        }
        anyhow::anyhow!(
            "{} problem(s) in the config; nothing changed",
            problems.len()
        )
    })?;
    let config = loaded.config;
    let guard_problems = guard_problems(&config, cgroup_root);
    if !guard_problems.is_empty() {
        for p in &guard_problems {
            tracing::error!("{p}");
        }
        anyhow::bail!(
            "{} problem(s) in the config; nothing changed",
            guard_problems.len()
        );
    }
    let (events, receiver) = mpsc::channel();
    // Shown once the runtime has started serving metrics.
    let _ = events.send(SourceEvent::Rejections(rejections(
        &loaded.rejected,
        &loaded.kept,
    )));
    let first_plan = plan_cgroups(&config, cgroup_root);
    let _ = events.send(SourceEvent::Update(Box::new(Update {
        change: StateChange::World(loaded.world),
        options: compile_options(&config),
        cgroups: first_plan.clone(),
        since: None,
    })));
    let runtime_options = RuntimeOptions {
        metrics: config
            .metrics
            .as_ref()
            .map(|m| (m.address, m.series_limits())),
        report_every: options.report_every,
        tick: options.poll_every,
        health: None,
        waiting: None,
        pending_label: "pending",
        deny_log: options.deny_log,
    };
    // A new interface that a workload's `interfaces` names gets its TC programs at once: a link
    // change wakes the runtime, which resolves the names again.
    let links = events.clone();
    crate::netlink::spawn_watch(
        move || links.send(SourceEvent::Links).is_ok(),
        "new interfaces get their TC programs at the next poll",
    );
    // New cgroups wake the source at once; the poll is the backstop (and reads the files).
    let mut watch = crate::inotify::DirWatch::new()?;
    watch.watch_only(&watch_dirs(&config, cgroup_root));
    let root = cgroup_root.to_path_buf();
    let poll_every = options.poll_every;
    std::thread::Builder::new()
        .name("local-source".into())
        .spawn(move || {
            follow(
                &source, config, &root, watch, poll_every, first_plan, &events,
            )
        })?;
    crate::runtime::run(datapath, &receiver, runtime_options)?;
    Ok(())
}

fn compile_options(config: &Config) -> crate::policy::compile::CompileOptions {
    crate::policy::compile::CompileOptions {
        baseline: config.baseline,
        node: None,
        max_policy_entries: config.limits.max_policy_entries,
    }
}

/// The local source's loop: reads the files at the poll's pace, and the workloads' cgroups
/// whenever one appears or goes; sends what changed. Ends when the runtime hangs up.
fn follow(
    source: &LocalSource,
    mut config: Config,
    cgroup_root: &Path,
    mut watch: crate::inotify::DirWatch,
    poll_every: std::time::Duration,
    mut plan: CgroupPlan,
    events: &mpsc::Sender<SourceEvent>,
) {
    use std::time::Instant;
    let mut last_poll = Instant::now();
    loop {
        let woken = watch.wait(poll_every.saturating_sub(last_poll.elapsed()));
        let changed_at = Instant::now();
        // A cgroup event wakes the loop at once; the files are read at the poll's pace.
        let polled = if woken && last_poll.elapsed() < poll_every {
            None
        } else {
            last_poll = Instant::now();
            source.poll()
        };
        let sent = match polled {
            None => Ok(()),
            Some(Ok(loaded)) => {
                tracing::info!("reloaded config and policies");
                config = loaded.config;
                plan = plan_cgroups(&config, cgroup_root);
                events
                    .send(SourceEvent::Rejections(rejections(
                        &loaded.rejected,
                        &loaded.kept,
                    )))
                    .and_then(|()| {
                        events.send(SourceEvent::Update(Box::new(Update {
                            change: StateChange::World(loaded.world),
                            options: compile_options(&config),
                            cgroups: plan.clone(),
                            since: Some(changed_at),
                        })))
                    })
            }
            Some(Err(problems)) => {
                tracing::error!(
                    problems = problems.len(),
                    "reload rejected: the config does not load; the policy enforced before stays enforced"
                );
                events.send(SourceEvent::Rejections(rejections(&problems, &[])))
            }
        };
        let now = plan_cgroups(&config, cgroup_root);
        watch.watch_only(&watch_dirs(&config, cgroup_root));
        let sent = sent.and_then(|()| {
            if now == plan {
                Ok(())
            } else {
                plan = now.clone();
                events.send(SourceEvent::Cgroups(Box::new(now)))
            }
        });
        if sent.is_err() {
            return;
        }
    }
}

/// What a load rejected and kept, as the runtime shows it.
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::compile::{CompileOptions, compile};

    fn workload(cgroup: &str, pending: Pending) -> Workload {
        Workload {
            interfaces: Vec::new(),
            name: "svc".into(),
            namespace: "bars".into(),
            labels: BTreeMap::new(),
            cgroup: cgroup.into(),
            ips: Vec::new(),
            pending,
            ports: Vec::new(),
        }
    }

    /// A fake hierarchy: `dirs` are directories, `files` interface files, under a temp root.
    fn tree(name: &str, dirs: &[&str], files: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("egret-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in files {
            std::fs::write(root.join(f), "").unwrap();
        }
        root
    }

    #[test]
    fn globs_match_cgroup_directories_never_their_interface_files() {
        let root = tree(
            "glob",
            &[
                "system.slice/svc-1",
                "system.slice/svc-2/sub",
                "system.slice/sshd",
            ],
            &[
                "system.slice/cgroup.procs",
                "system.slice/svc-x.max",
                "system.slice/memory.max",
            ],
        );
        for (pattern, want) in [
            ("system.slice/svc-*", vec!["svc-1", "svc-2"]),
            ("system.slice/*", vec!["sshd", "svc-1", "svc-2"]),
            ("system.slice/svc-1", vec!["svc-1"]),
        ] {
            let p = CgroupPattern::of(&workload(pattern, Pending::Allow), &root).unwrap();
            let mut got: Vec<String> = p
                .matches()
                .iter()
                .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            got.sort();
            assert_eq!(got, want, "{pattern}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_fail_closed_pattern_guards_its_directory_and_leaves_the_rest_unmanaged() {
        let root = tree(
            "guard",
            &["apps/a/svc-1", "apps/a/other", "apps/b/svc-2", "apps/c"],
            &["apps/cgroup.procs"],
        );
        let p = CgroupPattern::of(&workload("apps/*/svc-*", Pending::Deny), &root).unwrap();
        assert_eq!(p.guard, root.join("apps"));
        let mut seen = Vec::new();
        p.walk(&mut |dir, role| {
            let rel = dir.strip_prefix(&root).unwrap().display().to_string();
            seen.push((rel, role));
        });
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("apps".into(), CgroupRole::Guard),
                ("apps/a".into(), CgroupRole::Guard),
                ("apps/a/other".into(), CgroupRole::Unmanaged),
                ("apps/a/svc-1".into(), CgroupRole::Endpoint(0)),
                ("apps/b".into(), CgroupRole::Guard),
                ("apps/b/svc-2".into(), CgroupRole::Endpoint(0)),
                ("apps/c".into(), CgroupRole::Guard),
            ]
        );
        // Never the whole host.
        let config = Config {
            baseline: Verdict::Allow,
            policies: Vec::new(),
            workloads: vec![workload("svc-*", Pending::Deny)],
            metrics: None,
            limits: Default::default(),
            maps: BTreeMap::new(),
        };
        assert_eq!(guard_problems(&config, &root).len(), 1);
        let _ = std::fs::remove_dir_all(&root);
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
    fn the_series_idle_time_comes_from_the_config_or_the_flag() {
        let dir = temp_dir("series-idle");
        let path = dir.join("egret.yaml");
        let limits = |metrics: &str, flags: LocalSource| {
            std::fs::write(&path, format!("{metrics}workloads: []\n")).unwrap();
            flags
                .load()
                .map(|l| l.config.metrics.map(|m| m.series_limits()))
                .map_err(|problems| problems[0].to_string())
        };
        let plain = || LocalSource::new(path.clone());
        let idle = |d: Option<Duration>| {
            Ok(Some(SeriesLimits {
                max_destinations: 1000,
                idle: d,
            }))
        };
        let address = "metrics: {address: 127.0.0.1:0}\n";
        assert_eq!(
            limits(address, plain()),
            idle(Some(Duration::from_secs(600)))
        );
        let two_seconds = "metrics: {address: 127.0.0.1:0, seriesIdle: 2s}\n";
        assert_eq!(
            limits(two_seconds, plain()),
            idle(Some(Duration::from_secs(2)))
        );
        // The flag overrides the config; `0` keeps series for ever.
        let flag = |idle: &str| plain().with_metrics(None, None, Some(idle.parse().unwrap()));
        assert_eq!(limits(two_seconds, flag("0")), idle(None));
        // An address given by flag alone brings the defaults, and the flag's idle time.
        let both = plain().with_metrics(
            Some("127.0.0.1:0".parse().unwrap()),
            None,
            Some("90s".parse().unwrap()),
        );
        assert_eq!(limits("", both), idle(Some(Duration::from_secs(90))));
        let bad = limits("metrics: {address: 127.0.0.1:0, seriesIdle: 10}\n", plain());
        assert!(
            bad.as_ref()
                .is_err_and(|e| e.contains("expected a number and a unit")),
            "{bad:?}"
        );
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
        assert_eq!(
            loaded.config.metrics.map(|m| m.series_limits()),
            Some(SeriesLimits::default())
        );
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
