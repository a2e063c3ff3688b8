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
};

use serde::Deserialize;
use serde_json::json;

use crate::{
    datapath::{CgroupRole, EndpointId, Verdict},
    policy::{
        cluster::{Cluster, LoadError},
        model::World,
    },
    sys,
};

/// Errors of local mode; each names the file, and the object and field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("failed to read config {}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{}: {invalid}", path.as_deref().map_or_else(|| "<unknown file>".to_owned(), |p| p.display().to_string()))]
    Invalid {
        path: Option<PathBuf>,
        invalid: crate::policy::model::InvalidPolicy,
    },
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
    /// What a cgroup that matches `cgroup` gets before egret has written it (a service
    /// restarted by systemd gets a new cgroup). `allow` (default): its processes are not
    /// decided until egret sees it, within milliseconds (inotify). `deny`: fail closed, also
    /// while egret is not running: the directory the pattern starts in becomes a guard, and
    /// every cgroup below it that egret has not written yet is denied; cgroups there that match
    /// no workload are written as unmanaged (see `docs/datapath.md`).
    #[serde(default)]
    pub pending: Pending,
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

fn default_namespace() -> String {
    "default".into()
}

/// Everything one load produced.
pub struct Loaded {
    pub config: Config,
    pub world: World,
    /// Fingerprint of every file read, to notice edits.
    pub fingerprint: u64,
}

/// Reads the config and its policy files.
pub struct LocalSource {
    config_path: PathBuf,
    /// Command-line overrides of the config's `metrics` section.
    metrics_addr: Option<std::net::SocketAddr>,
    max_destination_series: Option<usize>,
}

impl LocalSource {
    pub fn new(config_path: PathBuf) -> Self {
        Self {
            config_path,
            metrics_addr: None,
            max_destination_series: None,
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

    /// Loads everything. `Err` holds every problem found; a caller that enforces already keeps
    /// what it enforces.
    pub fn load(&self) -> Result<Loaded, Vec<LocalError>> {
        let path = &self.config_path;
        let text = std::fs::read_to_string(path).map_err(|source| {
            vec![LocalError::ReadConfig {
                path: path.clone(),
                source,
            }]
        })?;
        let mut config: Config = serde_yaml::from_str(&text).map_err(|e| {
            vec![LocalError::Config {
                path: path.clone(),
                message: e.to_string(),
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
        // Taken before reading the policies: an edit during the load changes the fingerprint
        // the next poll sees, so it is not missed.
        let fingerprint = self.fingerprint(&config);
        let base = path.parent().unwrap_or(Path::new("."));
        let policy_paths: Vec<PathBuf> = config.policies.iter().map(|p| base.join(p)).collect();
        let (mut cluster, errors) = Cluster::load(&policy_paths);
        let mut problems: Vec<LocalError> = errors.into_iter().map(LocalError::from).collect();
        for w in &config.workloads {
            let pod = json!({
                "metadata": {"name": w.name, "namespace": w.namespace, "labels": w.labels},
                "status": {"podIPs": w.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()}
            });
            match serde_json::from_value(pod) {
                Ok(pod) => {
                    cluster
                        .pods
                        .insert((w.namespace.clone(), w.name.clone()), pod);
                }
                Err(e) => problems.push(LocalError::Config {
                    path: path.clone(),
                    message: format!("workload {}/{}: {e}", w.namespace, w.name),
                }),
            }
        }
        let world = World::new(&cluster);
        problems.extend(world.invalid.iter().map(|invalid| LocalError::Invalid {
            path: cluster.source_of(&invalid.object).cloned(),
            invalid: invalid.clone(),
        }));
        if problems.is_empty() {
            Ok(Loaded {
                config,
                world,
                fingerprint,
            })
        } else {
            Err(problems)
        }
    }

    /// Fingerprint of the config and policy files as they are now (cheap enough to poll).
    pub fn fingerprint(&self, config: &Config) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        if let Ok(text) = std::fs::read_to_string(&self.config_path) {
            text.hash(&mut hasher);
        }
        let base = self.config_path.parent().unwrap_or(Path::new("."));
        let paths: Vec<PathBuf> = config.policies.iter().map(|p| base.join(p)).collect();
        for file in Cluster::files(&paths) {
            if let Ok(content) = std::fs::read(&file) {
                file.hash(&mut hasher);
                content.hash(&mut hasher);
            }
        }
        hasher.finish()
    }
}

/// The cgroups of each workload as they exist now, and the guards of workloads that fail
/// closed: cgroup id -> role. A workload whose cgroup does not exist (yet) has none; a glob may
/// give several. Only directories match (a pattern ending in `/*` would otherwise match the
/// cgroup's interface files).
pub fn resolve_cgroups(
    config: &Config,
    endpoints: &BTreeMap<(String, String), EndpointId>,
    cgroup_root: &Path,
) -> BTreeMap<u64, CgroupRole> {
    let mut out = BTreeMap::new();
    for w in &config.workloads {
        let Some(endpoint) = endpoints.get(&(w.namespace.clone(), w.name.clone())) else {
            continue;
        };
        let Some(pattern) = CgroupPattern::of(w, cgroup_root) else {
            continue;
        };
        for dir in pattern.matches() {
            match sys::cgroup_id(&dir) {
                Ok(id) => {
                    out.insert(id, CgroupRole::Endpoint(*endpoint));
                }
                Err(err) => tracing::warn!(workload = %w.name, cgroup = %dir.display(), "{err}"),
            }
        }
    }
    // Guards: the walk below each fail-closed workload's guard directory, along its pattern.
    // A directory on the way to a match is a guard too (a cgroup created in it is pending);
    // one that leads to no match is unmanaged. Endpoints win over guards, guards over
    // unmanaged, whichever workload's walk found them.
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
            // Matches were resolved above; one without an endpoint (its workload did not
            // compile) stays pending under its guard.
            if matches!(role, CgroupRole::Endpoint(_)) {
                return;
            }
            let Ok(id) = sys::cgroup_id(dir) else { return };
            let entry = out.entry(id).or_insert(role);
            if rank(role) > rank(*entry) {
                *entry = role;
            }
        });
    }
    out
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

/// Which role wins when two walks meet the same cgroup.
fn rank(role: CgroupRole) -> u8 {
    match role {
        CgroupRole::Unmanaged => 0,
        CgroupRole::Guard => 1,
        CgroupRole::Endpoint(_) => 2,
    }
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

/// How often the run loop asks the kernel whether egret's links are attached and pinned.
const LINK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
            "{} problem(s) in the config or policies; nothing changed",
            problems.len()
        )
    })?;
    let compile_options = |config: &Config| crate::policy::compile::CompileOptions {
        baseline: config.baseline,
        node: None,
    };
    let mut config = loaded.config;
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
    let mut fingerprint = loaded.fingerprint;
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
    let mut pipeline =
        crate::pipeline::Pipeline::new(datapath, loaded.world, compile_options(&config))?;
    // New cgroups wake the loop at once; the poll is the backstop (and reads the files).
    let mut watch = crate::inotify::DirWatch::new()?;
    watch.watch_only(&watch_dirs(&config, cgroup_root));
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
    let mut last_poll = Instant::now();
    let mut last_link_check = Instant::now();
    let mut tc = crate::datapath::tc::TcAttachments::open(pipeline.datapath().pin_dir())?;
    loop {
        let woken = watch.wait(options.poll_every.saturating_sub(last_poll.elapsed()));
        let mut dirty = false;
        let now = if woken && last_poll.elapsed() < options.poll_every {
            // A cgroup event: the files are read at the next poll, as before.
            fingerprint
        } else {
            last_poll = Instant::now();
            source.fingerprint(&config)
        };
        if now != fingerprint {
            fingerprint = now;
            match source.load() {
                Ok(loaded) => {
                    config = loaded.config;
                    fingerprint = loaded.fingerprint;
                    pipeline.set_world_with(loaded.world, compile_options(&config));
                    dirty = true;
                    if let Some(shared) = &metrics {
                        shared
                            .telemetry
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .rejected(&BTreeMap::new());
                    }
                    tracing::info!("reloaded config and policies");
                }
                Err(problems) => {
                    for p in &problems {
                        tracing::error!("{p}");
                    }
                    if let Some(shared) = &metrics {
                        let mut by_reason = BTreeMap::new();
                        for p in &problems {
                            let reason = if matches!(p, LocalError::Invalid { .. }) {
                                "invalid"
                            } else {
                                "unreadable"
                            };
                            *by_reason.entry(reason).or_insert(0) += 1;
                        }
                        shared
                            .telemetry
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .rejected(&by_reason);
                    }
                    tracing::error!(
                        problems = problems.len(),
                        "reload rejected; the policy enforced before stays enforced"
                    );
                }
            }
        }
        let cgroups = resolve_cgroups(&config, &pipeline.compiled().endpoints, cgroup_root);
        watch.watch_only(&watch_dirs(&config, cgroup_root));
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
        if let Err(err) = tc.reconcile(&crate::datapath::tc::desired_for(
            config
                .workloads
                .iter()
                .map(|w| (&w.namespace, &w.name, &w.interfaces[..], &w.ips[..])),
            &pipeline.compiled().endpoints,
        )) {
            tracing::error!("failed to attach TC programs: {err:#}");
        }
        if let Some(shared) = &metrics {
            drain(shared, &pipeline);
        }
        // Pins someone removed come back, and the attached-programs gauge says what the kernel
        // reports, within a second, not only at the next policy write.
        if last_link_check.elapsed() >= LINK_CHECK_EVERY {
            last_link_check = Instant::now();
            let links = pipeline.datapath().check_links();
            if let Some(shared) = &metrics {
                shared
                    .telemetry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .attached(links.attached);
            }
        }
        if let Some(every) = options.report_every
            && last_report.elapsed() >= every
        {
            last_report = Instant::now();
            report.print(&pipeline);
        }
    }
}

/// What the deny log needs to name a source and a rule, as of the last enforced compile: every
/// id known, also of workloads and rules that are gone.
#[derive(Default)]
struct NameSnapshot {
    workloads: BTreeMap<EndpointId, (String, String)>,
    ids: crate::policy::ids::IdTable,
}

impl NameSnapshot {
    fn of(compiled: &crate::policy::compile::Compiled) -> Self {
        Self {
            workloads: labels(compiled)
                .into_iter()
                .map(|(id, s)| (id, (s.namespace, s.workload)))
                .collect(),
            ids: compiled.ids.clone(),
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
                            .ids
                            .origin(event.rule_id)
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
    telemetry.attached(pipeline.datapath().check_links().attached);
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
fn drain(shared: &crate::telemetry::server::Shared, pipeline: &crate::pipeline::Pipeline) {
    let counters = match pipeline.datapath().counters() {
        Ok(counters) => counters,
        Err(err) => {
            tracing::warn!("failed to read counters: {err}");
            return;
        }
    };
    let compiled = pipeline.compiled();
    let sources = labels(compiled);
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
        };
        assert_eq!(guard_problems(&config, &root).len(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn formats_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_516_980_123);
        assert_eq!(rfc3339(t), "2026-11-24T10:43:00.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
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
