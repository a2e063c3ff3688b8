//! The Kubernetes source: watches of the API ([`watch`]) and the kubelet's pod cgroups on this
//! node ([`cgroups`]), turned into the node's state for the shared runtime; EgressPolicy status
//! and Events ([`status`]).
//!
//! Changes are debounced: a burst of API events costs one compile and one write. Pod changes
//! alone are sent as such, for an incremental compile; any other change sends the whole
//! validated cluster. While a watch is broken its kind keeps the last state, so the last good
//! policy stays enforced, unchanged; `/healthz` fails only if a watch loop dies, and
//! `/readyz` waits for every watch's initial list and the first write.

pub mod cgroups;
pub mod status;
pub mod veth;
pub mod watch;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use tokio::sync::Notify;

use self::{
    cgroups::Kubepods,
    status::{Election, StatusWriter},
    watch::{KINDS, Kept, PodEntry, Taken, View, Watches},
};
use crate::{
    datapath::{Verdict, tc::WorkloadInterfaces},
    netlink,
    pipeline::StateChange,
    policy::compile::CompileOptions,
    runtime::{CgroupPlan, SourceEvent, Update},
    sys,
};

/// How long the API must be quiet after an event before the source takes the change: a burst
/// (a rollout, a re-list) costs one compile and one write...
pub const QUIET: Duration = Duration::from_millis(20);
/// ...but a steady stream of events delays a write by at most this.
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(200);
/// How often watch health is reported, the status Lease renewed and the cgroup hierarchy
/// rescanned (the backstop of inotify).
const PERIOD: Duration = Duration::from_secs(5);
/// How soon a pod whose veth was not found is looked up again.
const LOOK_AGAIN: Duration = Duration::from_millis(100);

/// What pods egret does not know yet get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownPods {
    /// Not decided until their pod's policy is written.
    Allow,
    /// Denied (`EPERM`, counted as blocked under policy `unknown-pod`) until their pod's policy is
    /// written: the kubelet's pod directories become guards.
    Deny,
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// This node's name: only its pods become endpoints.
    pub node: String,
    /// The agent's own namespace (the status Lease lives there).
    pub namespace: String,
    /// This agent's identity in the Lease election (its pod's name, else the node's).
    pub identity: String,
    pub baseline: Verdict,
    pub unknown_pods: UnknownPods,
    /// Most policy entries one policy may need for this node's pods.
    pub max_policy_entries: usize,
    /// Names or globs of the pods' node-side veths: only these are held pending.
    pub pod_veths: Vec<String>,
    /// The cgroup2 mount.
    pub cgroup_root: PathBuf,
    /// The agent's own pod cgroup ([`own_cgroup`]), found once at start: never enforced.
    pub own_cgroup: Option<u64>,
}

/// A pod of this node whose cgroup exists: what finds its veth.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub key: (String, String),
    pub cgroup: PathBuf,
    pub addresses: Vec<std::net::IpAddr>,
    pub host_network: bool,
}

/// The pod cgroups of this node, as [`Veths::look_up`] needs them.
#[derive(Clone, Debug, Default)]
pub struct LocalPods {
    /// Those of known pods.
    pub pods: Vec<LocalPod>,
    /// Pod cgroups of no known pod (the kubelet made them before the watch delivered their
    /// Pod), and those of pods whose object fails validation (no model). Such a pod may
    /// already run, and its veth is among the unclaimed ones, so each counts as a pod whose
    /// veth is not found.
    pub unknown: usize,
}

/// The cgroups of this node's pods, and (with `--unknown-pods deny`) the kubelet's directories
/// as guards, so that a pod cgroup egret has not written yet is denied; with the pods found.
/// `own` (the agent's own pod cgroup) is never enforced: it is planned unmanaged.
pub fn plan(
    pods: &Kept<PodEntry>,
    node: &str,
    kubepods: Option<&Kubepods>,
    unknown: UnknownPods,
    own: Option<u64>,
) -> (CgroupPlan, LocalPods) {
    plan_with(
        pods,
        node,
        kubepods,
        unknown,
        own,
        &|dir| match sys::cgroup_id(dir) {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::debug!(cgroup = %dir.display(), "{err}");
                None
            }
        },
    )
}

/// The kubelet's pod cgroup this process runs in, found by its pid among the pods' cgroups
/// (the DaemonSet shares the host's pid namespace): the agent never enforces on itself, so that
/// a strict cluster (baseline deny, unknown pods denied) cannot lock it out of the API, also
/// when a rolling update starts it in a pod no agent has written yet.
pub fn own_cgroup(kubepods: &Kubepods) -> Option<PathBuf> {
    let pid = std::process::id();
    kubepods
        .pods()
        .into_values()
        .find(|dir| veth::holds_pid(dir, pid))
}

/// [`plan`] with the cgroup id lookup given (a fake hierarchy in tests).
fn plan_with(
    pods: &Kept<PodEntry>,
    node: &str,
    kubepods: Option<&Kubepods>,
    unknown: UnknownPods,
    own: Option<u64>,
    cgroup_id: &dyn Fn(&std::path::Path) -> Option<u64>,
) -> (CgroupPlan, LocalPods) {
    let mut plan = CgroupPlan::default();
    let mut local = LocalPods::default();
    let Some(kubepods) = kubepods else {
        return (plan, local);
    };
    let mut on_disk = kubepods.pods();
    for (key, pod) in pods.iter() {
        if pod.node.as_deref() != Some(node) {
            continue;
        }
        let Some(dir) = pod.uid.as_deref().and_then(|uid| on_disk.remove(uid)) else {
            continue;
        };
        if let Some(id) = cgroup_id(&dir) {
            if Some(id) == own {
                plan.unmanaged.insert(id);
                continue;
            }
            plan.workloads.entry(key.clone()).or_default().insert(id);
            match &pod.model {
                Ok(model) => local.pods.push(LocalPod {
                    key: key.clone(),
                    cgroup: dir,
                    addresses: model.ips.clone(),
                    host_network: model.host_network,
                }),
                // A Pod that fails validation has no model: whether it is a hostNetwork one, and
                // its addresses, are not known, so its veth is not looked up. It runs all the
                // same, and its veth is among the unclaimed ones: it counts as unknown.
                Err(_) => local.unknown += 1,
            }
        }
    }
    // What is left is no known pod's. A cgroup gone meanwhile (no id) is no pod's any more;
    // the agent's own pod is known before its first plan, but is never held either way.
    local.unknown += on_disk
        .values()
        .filter(|dir| cgroup_id(dir).is_some_and(|id| Some(id) != own))
        .count();
    if unknown == UnknownPods::Deny {
        plan.guards
            .extend(kubepods.parents().iter().filter_map(|p| cgroup_id(p)));
    }
    (plan, local)
}

/// The packet level of this node's pods, as [`Veths::look_up`] finds it.
#[derive(Debug, Default)]
pub struct PodInterfaces {
    /// Each pod's node-side veths (its TC programs); none for a pod whose veth is not found
    /// (not started yet, or a network that is no veth): its raw, ping and SCTP sockets are
    /// refused until it is (fail closed).
    pub by_pod: std::collections::BTreeMap<(String, String), WorkloadInterfaces>,
    /// While a pod of the node has no veth found yet (no process, a process still in the
    /// host's namespace, no veth in its namespace yet, a cgroup whose Pod the watch has not
    /// delivered, or a Pod that fails validation), every container veth of the node that no known pod claims: the pod's veth
    /// may be among them, and its first process could send `AF_PACKET` frames that no socket
    /// hook sees. TC programs drop all but link traffic on them until the pod is found.
    pub pending: BTreeSet<u32>,
    /// Pods whose veth could not be looked up yet: the source looks again soon.
    pub unresolved: usize,
    /// Why pods' veths cannot be looked up at all as the agent runs (no hostPID, a capability
    /// missing), for `/readyz` and `egret_pod_veth_lookup_failing`; `None` when they can.
    pub cannot_look: Option<String>,
}

/// A pod's cgroup and the node-side veths found for it: (index, name).
type Found = (PathBuf, Vec<(u32, String)>);

/// How a pod's network is found: [`veth::pod_network`], a fake in tests.
type FindPodNetwork<'a> =
    dyn Fn(&std::path::Path, &[netlink::Link]) -> Result<veth::PodNetwork, veth::VethError> + 'a;

/// What finds each local pod's node-side veth, with what it found: a pod is looked up again only
/// when its veth is gone or was not found (entering a pod's namespace costs a thread and a
/// netlink dump).
#[derive(Debug)]
pub struct Veths {
    /// Only pods with at least one veth found: an empty result is looked up again.
    found: std::collections::HashMap<(String, String), Found>,
    /// Which veths may be a pod's ([`AgentOptions::pod_veths`]).
    candidates: Vec<glob::Pattern>,
}

impl Veths {
    pub fn new(pod_veths: &[String]) -> Self {
        let candidates = pod_veths
            .iter()
            .filter_map(|p| match glob::Pattern::new(p) {
                Ok(glob) => Some(glob),
                Err(err) => {
                    tracing::warn!(pattern = %p, "--pod-veths: not a name or glob: {err}");
                    None
                }
            })
            .collect();
        Self {
            found: std::collections::HashMap::new(),
            candidates,
        }
    }

    /// The packet level of `local`. A hostNetwork pod keeps the socket hooks only.
    pub fn look_up(&mut self, local: &LocalPods) -> PodInterfaces {
        self.look_up_with(local, &netlink::links, &veth::pod_network)
    }

    /// [`Self::look_up`] with the kernel's answers given (fakes in tests).
    fn look_up_with(
        &mut self,
        local: &LocalPods,
        links: &dyn Fn() -> std::io::Result<Vec<netlink::Link>>,
        pod_network: &FindPodNetwork<'_>,
    ) -> PodInterfaces {
        let ours = links().unwrap_or_else(|err| {
            tracing::warn!(
                "cannot list this node's interfaces: {err}; pods' raw sockets are refused"
            );
            Vec::new()
        });
        let still_there = |veths: &[(u32, String)]| {
            veths.iter().all(|(index, name)| {
                ours.iter()
                    .any(|l| l.index == *index && &l.name == name && l.is_container_veth())
            })
        };
        let mut out = PodInterfaces {
            unresolved: local.unknown,
            ..PodInterfaces::default()
        };
        let mut failed = Vec::new();
        let mut cannot_look = Vec::new();
        let mut claimed = BTreeSet::new();
        let mut keep = std::collections::HashMap::new();
        for pod in local.pods.iter().filter(|p| !p.host_network) {
            let cached = self
                .found
                .remove(&pod.key)
                .filter(|(cgroup, veths)| *cgroup == pod.cgroup && still_there(veths));
            let veths = match cached {
                Some((_, veths)) => Some(veths),
                None => match pod_network(&pod.cgroup, &ours) {
                    Ok(veth::PodNetwork::Veths(veths)) if !veths.is_empty() => Some(veths),
                    // Not found yet, all three looked up again: no process yet; its process
                    // still in the host's namespace while a runtime sets up the sandbox (the
                    // model says this pod is no hostNetwork one); or its namespace, made
                    // before the CNI moved the veth in, has none yet.
                    Ok(
                        veth::PodNetwork::NotStarted
                        | veth::PodNetwork::Host
                        | veth::PodNetwork::Veths(_),
                    ) => None,
                    Err(err) => {
                        let message = format!("{}/{}: {}", pod.key.0, pod.key.1, chain(&err));
                        if err.is_setup() {
                            cannot_look.push(message);
                        } else {
                            failed.push(message);
                        }
                        None
                    }
                },
            };
            let patterns = match veths {
                Some(veths) => {
                    claimed.extend(veths.iter().map(|(index, _)| *index));
                    let names = veths.iter().map(|(_, name)| name.clone()).collect();
                    keep.insert(pod.key.clone(), (pod.cgroup.clone(), veths));
                    names
                }
                None => {
                    out.unresolved += 1;
                    Vec::new()
                }
            };
            out.by_pod.insert(
                pod.key.clone(),
                WorkloadInterfaces {
                    patterns,
                    addresses: pod.addresses.clone(),
                },
            );
        }
        self.found = keep;
        if out.unresolved > 0 {
            out.pending = ours
                .iter()
                .filter(|l| l.is_container_veth() && !claimed.contains(&l.index))
                .filter(|l| self.candidates.iter().any(|glob| glob.matches(&l.name)))
                .map(|l| l.index)
                .collect();
        }
        if let Some(first) = failed.first() {
            // Loud: without its veth a pod's packet-level sockets are refused, and its frames
            // only pass link traffic.
            tracing::warn!(pods = failed.len(), first = %first, "cannot find pods' veths: no TC programs for them");
        }
        // Logged by the source when it changes: it stays while the agent runs as it does.
        out.cannot_look = cannot_look.first().map(|first| match cannot_look.len() {
            1 => first.clone(),
            n => format!("{first} (and {} more pods)", n - 1),
        });
        out
    }
}

/// `err` and its causes, as one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A client from `kubeconfig`, else as kube infers one (`$KUBECONFIG` or `~/.kube/config`,
/// else the in-cluster service account).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::Kubeconfig {
                    path: path.into(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.into(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| ClientError::Infer { source })?,
    };
    Client::try_from(config).map_err(|source| ClientError::Client { source })
}

/// Errors of connecting to the API; each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to read kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("found no Kubernetes config ($KUBECONFIG, ~/.kube/config or in-cluster)")]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("failed to create a Kubernetes client")]
    Client {
        #[source]
        source: kube::Error,
    },
    #[error("failed to list {kind}")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// Every object the compiler needs, listed once and kept as the agent keeps them (for
/// `egret explain` against a cluster).
pub async fn list(client: &Client) -> Result<View, ClientError> {
    async fn all<K>(client: &Client, view: &mut View) -> Result<(), ClientError>
    where
        K: watch::Watched,
        K::DynamicType: Default,
    {
        let api: kube::Api<K> = kube::Api::all(client.clone());
        let list = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|source| ClientError::List {
                kind: K::KIND,
                source,
            })?;
        for object in list.items {
            view.apply(kube::runtime::watcher::Event::Apply(object));
        }
        Ok(())
    }
    let mut view = View::default();
    all::<Pod>(client, &mut view).await?;
    all::<k8s_openapi::api::core::v1::Namespace>(client, &mut view).await?;
    all::<k8s_openapi::api::networking::v1::NetworkPolicy>(client, &mut view).await?;
    all::<crate::policy::crd::EgressPolicy>(client, &mut view).await?;
    all::<k8s_openapi::api::core::v1::Service>(client, &mut view).await?;
    all::<k8s_openapi::api::discovery::v1::EndpointSlice>(client, &mut view).await?;
    Ok(view)
}

/// Runs the source until the runtime hangs up: watches, cgroups, status.
pub async fn run(
    watches: Watches,
    client: Client,
    options: AgentOptions,
    events: mpsc::Sender<SourceEvent>,
) {
    let cgroups_changed = Arc::new(Notify::new());
    spawn_cgroup_watch(options.cgroup_root.clone(), Arc::clone(&cgroups_changed));
    spawn_link_watch(Arc::clone(&cgroups_changed));
    let election = Election::new(client.clone(), &options.namespace, &options.identity);
    let mut writer = StatusWriter::new(client, &options.node);
    let compile_options = CompileOptions {
        baseline: options.baseline,
        node: Some(options.node.clone()),
        max_policy_entries: options.max_policy_entries,
    };
    let mut period = tokio::time::interval(PERIOD);
    // While a pod's veth cannot be looked up yet, it is looked up again at this pace: until then
    // the node's unclaimed veths pass link traffic only.
    let mut soon = tokio::time::interval(LOOK_AGAIN);
    soon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unresolved = false;
    let mut veths = Veths::new(&options.pod_veths);
    let mut plan_pending = BTreeSet::new();
    let mut cannot_look = None;
    let mut listed = false;
    let mut last_plan = None;
    let mut leader = false;
    let mut status_due = false;
    loop {
        let (mut state, mut cgroups, mut periodic) = (false, false, false);
        tokio::select! {
            () = watches.changed() => state = true,
            () = cgroups_changed.notified() => cgroups = true,
            _ = period.tick() => periodic = true,
            _ = soon.tick(), if unresolved => cgroups = true,
        }
        if state {
            // More events of the same burst go into the same compile.
            let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
            loop {
                let quiet = tokio::time::sleep(QUIET);
                tokio::select! {
                    () = watches.changed() => {}
                    () = quiet => break,
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
        }
        let health = watches.health();
        if !listed {
            let missing: Vec<&str> = KINDS
                .iter()
                .copied()
                .filter(|k| !health.snapshot().get(k).is_some_and(|h| h.listed))
                .collect();
            if !missing.is_empty() {
                let waiting = format!("waiting for the initial list of {}", missing.join(", "));
                if events.send(SourceEvent::Waiting(Some(waiting))).is_err() {
                    return;
                }
                continue;
            }
            listed = true;
            state = true;
            watches.view().touch_all();
            if events.send(SourceEvent::Waiting(None)).is_err() {
                return;
            }
        }
        // The view stays locked (every watch waits) only while the change and plan are taken.
        let (taken, plan) = {
            let mut view = watches.view();
            let taken = if state { view.take() } else { Taken::default() };
            let plan = (state || cgroups || periodic).then(|| {
                let kubepods = Kubepods::find(&options.cgroup_root);
                plan(
                    &view.pods,
                    &options.node,
                    kubepods.as_ref(),
                    options.unknown_pods,
                    options.own_cgroup,
                )
            });
            (taken, plan)
        };
        // Veths are looked up with the view unlocked: it enters each pod's namespace.
        let plan = if let Some((mut plan, local)) = plan {
            let found = veths.look_up(&local);
            if found.pending != plan_pending {
                tracing::info!(unresolved = found.unresolved, interfaces = ?found.pending,
                    "unclaimed veths pass link traffic only until every started pod's veth is found");
                plan_pending.clone_from(&found.pending);
            }
            if found.cannot_look != cannot_look {
                // Logged when it starts and ends; `/readyz` follows every change of its text (a
                // pod more or less).
                match (&cannot_look, &found.cannot_look) {
                    // Every started pod's veth stays unfound, so every unclaimed container veth
                    // stays pending: pods' frames pass link traffic only.
                    (None, Some(why)) => tracing::error!(
                        reason = %why,
                        "cannot find pods' veths: their raw, ping and SCTP sockets are refused and unclaimed veths pass link traffic only"
                    ),
                    (Some(_), None) => tracing::info!("pods' veths can be found again"),
                    _ => {}
                }
                cannot_look.clone_from(&found.cannot_look);
                if events
                    .send(SourceEvent::VethLookup(found.cannot_look.clone()))
                    .is_err()
                {
                    return;
                }
            }
            plan.interfaces = found.by_pod;
            plan.pending_interfaces = found.pending;
            unresolved = found.unresolved > 0;
            Some(plan)
        } else {
            None
        };
        status_due |= taken.status;
        let sent = match (taken.change, plan) {
            (Some(change), Some(plan)) => {
                if let StateChange::World(world) = &change {
                    for invalid in &world.invalid {
                        tracing::warn!("rejected: {invalid}");
                    }
                }
                last_plan = Some(plan.clone());
                events.send(SourceEvent::Update(Box::new(Update {
                    change,
                    options: compile_options.clone(),
                    cgroups: plan,
                    since: taken.since,
                })))
            }
            (None, Some(plan)) if last_plan.as_ref() != Some(&plan) => {
                last_plan = Some(plan.clone());
                events.send(SourceEvent::Cgroups(Box::new(plan)))
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
        if periodic {
            for (kind, h) in health.snapshot() {
                let event = SourceEvent::Watch {
                    kind,
                    restarts: h.restarts,
                    objects: h.objects,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
            leader = match election.hold().await {
                Ok(held) => held,
                Err(err) => {
                    tracing::warn!("status Lease: {err:#}");
                    false
                }
            };
        }
        if leader && status_due {
            let (policies, problems) = watches.view().egress_status();
            match writer.write(&policies, &problems).await {
                Ok(_) => status_due = false,
                Err(err) => {
                    tracing::warn!("EgressPolicy status: {err:#}; retried at the next change");
                }
            }
        }
    }
}

/// Follows the kubelet's pod directories with inotify, on a thread of its own: a new pod cgroup
/// wakes the source at once. The periodic rescan covers what inotify cannot (the kubelet
/// creating `kubepods` after egret started).
fn spawn_cgroup_watch(cgroup_root: PathBuf, changed: Arc<Notify>) {
    let spawned = std::thread::Builder::new()
        .name("pod-cgroups".into())
        .spawn(move || {
            let mut watch = match crate::inotify::DirWatch::new() {
                Ok(watch) => watch,
                Err(err) => {
                    tracing::warn!("no inotify ({err}); pod cgroups are rescanned periodically");
                    return;
                }
            };
            loop {
                let dirs = Kubepods::find(&cgroup_root)
                    .map(|k| k.parents())
                    .unwrap_or_else(|| vec![cgroup_root.clone()]);
                watch.watch_only(&dirs);
                if watch.wait(Duration::from_secs(1)) {
                    changed.notify_one();
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("no pod cgroup watch ({err}); pod cgroups are rescanned periodically");
    }
}

/// Follows this namespace's links with rtnetlink, on a thread of its own: a new veth (a pod's
/// network being made) wakes the source at once, so that it is pending before the pod's first
/// process runs.
fn spawn_link_watch(changed: Arc<Notify>) {
    netlink::spawn_watch(
        move || {
            changed.notify_one();
            true
        },
        "veths are found at the periodic rescan",
    );
}

/// The watch state as `/healthz` sees it: an error names the watches whose loop ended.
pub fn health_check(health: Arc<watch::WatchHealth>) -> crate::telemetry::server::HealthCheck {
    Box::new(move || {
        let dead = health.dead();
        if dead.is_empty() {
            Ok(())
        } else {
            Err(format!("watch loop ended: {}", dead.join(", ")))
        }
    })
}

/// The agent's identity for the Lease: its pod's name when it runs in one, else the node's.
pub fn identity(node: &str) -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| node.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(namespace: &str, name: &str, uid: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIP": "10.0.0.9"}
        }))
        .unwrap()
    }

    #[test]
    fn objects_become_the_world_with_services_and_invalid_policies_left_out() {
        use kube::runtime::watcher::Event;
        let mut view = View::default();
        view.apply(Event::Apply(pod(
            "a",
            "web",
            "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01",
            "n1",
        )));
        view.apply(Event::Apply(
            serde_json::from_value::<crate::policy::crd::EgressPolicy>(serde_json::json!({
                "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy",
                "metadata": {"name": "bad"},
                "spec": {"priority": 5000, "subject": {"podSelector": {}}, "rules": []}
            }))
            .unwrap(),
        ));
        view.apply(Event::Apply(
            serde_json::from_value::<k8s_openapi::api::core::v1::Service>(serde_json::json!({
                "metadata": {"name": "dns", "namespace": "kube-system"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}
            }))
            .unwrap(),
        ));
        let world = view.world();
        assert_eq!(world.pods.len(), 1);
        assert_eq!(world.pods[0].node.as_deref(), Some("n1"));
        assert_eq!(world.services.len(), 1);
        assert!(world.egress_policies.is_empty(), "priority 5000 is invalid");
        let (policies, problems) = view.egress_status();
        assert_eq!(policies.len(), 1, "an invalid policy still gets its status");
        assert!(problems["bad"].contains("priority"), "{problems:?}");
    }

    #[test]
    fn only_this_nodes_pods_get_cgroups_and_unknown_pods_meet_a_guard() {
        let root = std::env::temp_dir().join(format!("egret-plan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let here = "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01";
        let there = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        for uid in [here, there] {
            std::fs::create_dir_all(root.join(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            )))
            .unwrap();
        }
        let kubepods = Kubepods::find(&root).unwrap();
        let mut view = View::default();
        for pod in [pod("a", "web", here, "n1"), pod("a", "db", there, "n2")] {
            view.apply(kube::runtime::watcher::Event::Apply(pod));
        }
        let pods = &view.pods;
        // Inode numbers stand in for cgroup ids (on cgroup2 they are the same thing).
        let inode = |dir: &std::path::Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let web_dir = &kubepods.pods()[here];
        let (allow, local) = plan_with(
            pods,
            "n1",
            Some(&kubepods),
            UnknownPods::Allow,
            None,
            &inode,
        );
        assert_eq!(local.pods.len(), 1, "the pod on this node, for its veth");
        assert_eq!(local.pods[0].cgroup, *web_dir);
        assert_eq!(
            local.unknown, 1,
            "db's cgroup is here but its Pod says another node: no known pod of this node"
        );
        assert_eq!(
            allow.workloads,
            BTreeMap::from([(
                ("a".to_owned(), "web".to_owned()),
                std::collections::BTreeSet::from([inode(web_dir).unwrap()])
            )]),
            "only this node's pod, by its uid's cgroup"
        );
        assert!(allow.guards.is_empty());
        let (deny, _) = plan_with(pods, "n1", Some(&kubepods), UnknownPods::Deny, None, &inode);
        let parents: std::collections::BTreeSet<u64> =
            kubepods.parents().iter().filter_map(|p| inode(p)).collect();
        assert_eq!(
            deny.guards, parents,
            "kubepods.slice and the Burstable slice"
        );
        assert_eq!(deny.guards.len(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_pod_cgroup_the_watch_has_not_delivered_counts_as_unresolved() {
        let root = std::env::temp_dir().join(format!("egret-unknown-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let known = "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01";
        let early = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        let own = "11111111-2222-3333-4444-555555555555";
        for uid in [known, early, own] {
            std::fs::create_dir_all(root.join(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            )))
            .unwrap();
        }
        let kubepods = Kubepods::find(&root).unwrap();
        let mut view = View::default();
        view.apply(kube::runtime::watcher::Event::Apply(pod(
            "a", "web", known, "n1",
        )));
        let inode = |dir: &std::path::Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let own_id = inode(&kubepods.pods()[own]);
        let (_, local) = plan_with(
            &view.pods,
            "n1",
            Some(&kubepods),
            UnknownPods::Allow,
            own_id,
            &inode,
        );
        assert_eq!(local.pods.len(), 1);
        assert_eq!(
            local.unknown, 1,
            "the early pod's cgroup, not the agent's own"
        );
        let mut veths = Veths::new(&["*".to_owned()]);
        let found = veths.look_up_with(&local, &|| Ok(links()), &|_, _| {
            Ok(veth::PodNetwork::Veths(vec![(10, "veth-web".into())]))
        });
        assert_eq!(found.unresolved, 1, "web is found, the early pod is not");
        assert_eq!(
            found.pending,
            BTreeSet::from([11]),
            "the unclaimed veth may be the early pod's"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_pod_that_fails_validation_counts_as_unresolved_while_its_cgroup_exists() {
        let root = std::env::temp_dir().join(format!("egret-invalid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let valid = "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01";
        let broken = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        let dir = |uid: &str| {
            root.join(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
        };
        for uid in [valid, broken] {
            std::fs::create_dir_all(dir(uid)).unwrap();
        }
        let mut view = View::default();
        view.apply(kube::runtime::watcher::Event::Apply(pod(
            "a", "web", valid, "n1",
        )));
        let mut bad = pod("a", "bad", broken, "n1");
        bad.status.as_mut().unwrap().pod_ip = Some("not-an-ip".into());
        view.apply(kube::runtime::watcher::Event::Apply(bad));
        assert!(
            view.pods
                .iter()
                .any(|(k, p)| k.1 == "bad" && p.model.is_err())
        );
        let inode = |dir: &std::path::Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let planned = |view: &View| {
            let kubepods = Kubepods::find(&root).unwrap();
            plan_with(
                &view.pods,
                "n1",
                Some(&kubepods),
                UnknownPods::Allow,
                None,
                &inode,
            )
        };
        let (cgroups, local) = planned(&view);
        assert!(
            cgroups
                .workloads
                .contains_key(&("a".to_owned(), "bad".to_owned())),
            "its cgroup is still planned"
        );
        assert_eq!(local.pods.len(), 1, "only web's veth is looked up");
        assert_eq!(local.unknown, 1, "the invalid pod counts as unknown");
        let mut veths = Veths::new(&["*".to_owned()]);
        let found = veths.look_up_with(&local, &|| Ok(links()), &|_, _| {
            Ok(veth::PodNetwork::Veths(vec![(10, "veth-web".into())]))
        });
        assert_eq!(found.unresolved, 1, "web is found, the invalid pod is not");
        assert_eq!(
            found.pending,
            BTreeSet::from([11]),
            "the unclaimed veth may be the invalid pod's: its frames pass link traffic only"
        );
        // Its cgroup gone (the pod ended), nothing is held any more.
        std::fs::remove_dir(dir(broken)).unwrap();
        let (_, local) = planned(&view);
        assert_eq!(local.unknown, 0);
        let found = veths.look_up_with(&local, &|| Ok(links()), &|_, _| {
            Ok(veth::PodNetwork::Veths(vec![(10, "veth-web".into())]))
        });
        assert_eq!(found.unresolved, 0);
        assert!(found.pending.is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A node with two container veths: 10 (`veth-web`) and 11 (`veth-other`).
    fn links() -> Vec<netlink::Link> {
        [(10, "veth-web"), (11, "veth-other")]
            .into_iter()
            .map(|(index, name)| netlink::Link {
                index,
                name: name.into(),
                peer: Some(2),
                kind: Some("veth".into()),
                peer_netns: Some(1),
            })
            .collect()
    }

    fn web(host_network: bool) -> LocalPods {
        LocalPods {
            pods: vec![LocalPod {
                key: ("a".into(), "web".into()),
                cgroup: "/sys/fs/cgroup/kubepods.slice/web".into(),
                addresses: vec!["198.51.100.10".parse().unwrap()],
                host_network,
            }],
            unknown: 0,
        }
    }

    #[test]
    fn a_pod_without_a_veth_yet_is_looked_up_again_until_its_veth_is_found() {
        use std::cell::{Cell, RefCell};
        let answers = RefCell::new(vec![
            veth::PodNetwork::NotStarted,
            // The runtime's first process, before it entered the pod's namespace.
            veth::PodNetwork::Host,
            // The pod's namespace before the CNI moved its veth in.
            veth::PodNetwork::Veths(Vec::new()),
            veth::PodNetwork::Veths(vec![(10, "veth-web".into())]),
        ]);
        let lookups = Cell::new(0);
        let pod_network = |_: &std::path::Path, _: &[netlink::Link]| {
            lookups.set(lookups.get() + 1);
            Ok(answers.borrow_mut().remove(0))
        };
        let mut veths = Veths::new(&["*".to_owned()]);
        for round in 0..3 {
            let found = veths.look_up_with(&web(false), &|| Ok(links()), &pod_network);
            assert_eq!(found.unresolved, 1, "round {round}");
            assert_eq!(
                found.pending,
                BTreeSet::from([10, 11]),
                "round {round}: every unclaimed veth is held"
            );
            assert!(
                found.by_pod[&("a".to_owned(), "web".to_owned())]
                    .patterns
                    .is_empty(),
                "round {round}: its raw sockets are refused meanwhile"
            );
        }
        let found = veths.look_up_with(&web(false), &|| Ok(links()), &pod_network);
        assert_eq!(found.unresolved, 0);
        assert!(found.pending.is_empty(), "all found: nothing held");
        assert_eq!(
            found.by_pod[&("a".to_owned(), "web".to_owned())].patterns,
            ["veth-web"]
        );
        // Found stays found: no fifth lookup while the veth is there.
        let again = veths.look_up_with(&web(false), &|| Ok(links()), &pod_network);
        assert_eq!(again.unresolved, 0);
        assert_eq!(lookups.get(), 4);
    }

    #[test]
    fn a_host_network_pod_keeps_the_socket_hooks_only_and_holds_nothing() {
        let mut veths = Veths::new(&["*".to_owned()]);
        let found = veths.look_up_with(&web(true), &|| Ok(links()), &|_, _| {
            panic!("a hostNetwork pod is not looked up")
        });
        assert_eq!(found.unresolved, 0);
        assert!(found.by_pod.is_empty() && found.pending.is_empty());
    }

    #[test]
    fn a_lookup_the_agent_cannot_make_is_reported_and_holds_the_veths() {
        let mut veths = Veths::new(&["*".to_owned()]);
        let found = veths.look_up_with(&web(false), &|| Ok(links()), &|cgroup, _| {
            Err(veth::VethError::OtherPidNamespace {
                cgroup: cgroup.into(),
            })
        });
        assert_eq!(found.unresolved, 1);
        assert_eq!(found.pending, BTreeSet::from([10, 11]), "fail closed");
        let why = found.cannot_look.expect("reported");
        assert!(
            why.starts_with("a/web: ") && why.contains("hostPID"),
            "{why}"
        );
        // A failure of this pod alone (a netlink error) is no setup problem.
        let found = veths.look_up_with(&web(false), &|| Ok(links()), &|_, _| {
            Err(veth::VethError::Links {
                pid: 7,
                source: std::io::Error::from_raw_os_error(libc::ENOBUFS),
            })
        });
        assert_eq!(found.cannot_look, None);
        assert_eq!(found.unresolved, 1);
    }
}
