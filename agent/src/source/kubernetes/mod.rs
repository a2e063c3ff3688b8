//! The Kubernetes source: watches of the API ([`watch`]) and the kubelet's pod cgroups on this
//! node ([`cgroups`]), turned into the node's state for the shared runtime; EgressPolicy status
//! and Events ([`status`]).
//!
//! The unit sent is the node's whole snapshot, debounced: a burst of API events costs one
//! compile and one write. While a watch is broken its store keeps the last state, so the last
//! good policy stays enforced, unchanged; `/healthz` fails only if a watch loop dies, and
//! `/readyz` waits for every watch's initial list and the first write.

pub mod cgroups;
pub mod status;
pub mod watch;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt as _};
use tokio::sync::Notify;

use self::{
    cgroups::Kubepods,
    status::{Election, StatusWriter},
    watch::{KINDS, Objects, Watches},
};
use crate::{
    datapath::Verdict,
    policy::{
        cluster::Cluster,
        compile::CompileOptions,
        model::{ObjectKind, World},
        services,
    },
    runtime::{CgroupPlan, SourceEvent, Update},
    sys,
};

/// How long the source waits for more API events after one before it takes a snapshot.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often watch health is reported, the status Lease renewed and the cgroup hierarchy
/// rescanned (the backstop of inotify).
const PERIOD: Duration = Duration::from_secs(5);

/// What pods egret does not know yet get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownPods {
    /// Not decided until their pod's policy is written.
    Allow,
    /// Denied (`EPERM`, counted as blocked under policy `pending`) until their pod's policy is
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
    /// The cgroup2 mount.
    pub cgroup_root: PathBuf,
}

/// The cluster state the compiler takes, from the watched objects; invalid objects are left
/// out and listed in `invalid` (a CRD's schema may be older than egret's checks).
pub fn world(objects: &Objects) -> World {
    let mut cluster = Cluster::default();
    for ns in &objects.namespaces {
        cluster
            .namespaces
            .insert(ns.name_any(), Arc::new(ns.clone()));
    }
    for pod in &objects.pods {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        cluster.pods.insert(key, Arc::new(pod.clone()));
    }
    for np in &objects.network_policies {
        let key = (np.namespace().unwrap_or_default(), np.name_any());
        cluster.network_policies.insert(key, Arc::new(np.clone()));
    }
    for ep in &objects.egress_policies {
        cluster
            .egress_policies
            .insert(ep.name_any(), Arc::new(ep.clone()));
    }
    let mut world = World::new(&cluster);
    world.services = services::from_objects(&objects.services, &objects.endpoint_slices);
    world
}

/// The cgroups of this node's pods, and (with `--unknown-pods deny`) the kubelet's directories
/// as guards, so that a pod cgroup egret has not written yet is denied.
pub fn plan(
    pods: &[Pod],
    node: &str,
    kubepods: Option<&Kubepods>,
    unknown: UnknownPods,
) -> CgroupPlan {
    plan_with(
        pods,
        node,
        kubepods,
        unknown,
        &|dir| match sys::cgroup_id(dir) {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::debug!(cgroup = %dir.display(), "{err}");
                None
            }
        },
    )
}

/// [`plan`] with the cgroup id lookup given (a fake hierarchy in tests).
fn plan_with(
    pods: &[Pod],
    node: &str,
    kubepods: Option<&Kubepods>,
    unknown: UnknownPods,
    cgroup_id: &dyn Fn(&std::path::Path) -> Option<u64>,
) -> CgroupPlan {
    let mut plan = CgroupPlan::default();
    let Some(kubepods) = kubepods else {
        return plan;
    };
    let on_disk = kubepods.pods();
    for pod in pods {
        let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        let Some(uid) = pod.metadata.uid.as_deref() else {
            continue;
        };
        let Some(dir) = on_disk.get(uid).filter(|_| on_node) else {
            continue;
        };
        if let Some(id) = cgroup_id(dir) {
            plan.workloads
                .entry((pod.namespace().unwrap_or_default(), pod.name_any()))
                .or_default()
                .insert(id);
        }
    }
    if unknown == UnknownPods::Deny {
        plan.guards
            .extend(kubepods.parents().iter().filter_map(|p| cgroup_id(p)));
    }
    plan
}

/// Problems of invalid EgressPolicies, by name, for their status.
fn egress_problems(world: &World) -> BTreeMap<String, String> {
    world
        .invalid
        .iter()
        .filter(|i| i.object.kind == ObjectKind::EgressPolicy)
        .map(|i| (i.object.name.clone(), format!("{}: {}", i.field, i.message)))
        .collect()
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

/// Every object the compiler needs, listed once (for `egret explain` against a cluster).
pub async fn list(client: &Client) -> Result<Objects, ClientError> {
    async fn all<K>(client: &Client, kind: &'static str) -> Result<Vec<K>, ClientError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: kube::Api<K> = kube::Api::all(client.clone());
        api.list(&kube::api::ListParams::default())
            .await
            .map(|list| list.items)
            .map_err(|source| ClientError::List { kind, source })
    }
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    let egress: kube::Api<crate::policy::crd::EgressPolicy> = kube::Api::all(client.clone());
    let params = kube::api::ListParams::default();
    Ok(Objects {
        pods: all(client, "Pod").await?,
        namespaces: namespaces
            .list(&params)
            .await
            .map_err(|source| ClientError::List {
                kind: "Namespace",
                source,
            })?
            .items,
        network_policies: all(client, "NetworkPolicy").await?,
        egress_policies: egress
            .list(&params)
            .await
            .map_err(|source| ClientError::List {
                kind: "EgressPolicy",
                source,
            })?
            .items,
        services: all(client, "Service").await?,
        endpoint_slices: all(client, "EndpointSlice").await?,
    })
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
    let election = Election::new(client.clone(), &options.namespace, &options.identity);
    let mut writer = StatusWriter::new(client, &options.node);
    let compile_options = CompileOptions {
        baseline: options.baseline,
        node: Some(options.node.clone()),
    };
    let mut period = tokio::time::interval(PERIOD);
    let mut listed = false;
    let mut pods: Vec<Pod> = Vec::new();
    let mut last_plan = None;
    let mut leader = false;
    let mut pending_status: Option<(
        Vec<crate::policy::crd::EgressPolicy>,
        BTreeMap<String, String>,
    )> = None;
    loop {
        let (mut state, mut cgroups, mut periodic) = (false, false, false);
        tokio::select! {
            () = watches.changed() => state = true,
            () = cgroups_changed.notified() => cgroups = true,
            _ = period.tick() => periodic = true,
        }
        if state {
            // More events of the same burst go into the same snapshot.
            tokio::time::sleep(DEBOUNCE).await;
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
            if events.send(SourceEvent::Waiting(None)).is_err() {
                return;
            }
        }
        let sent = if state {
            let (objects, since) = watches.snapshot();
            let world = world(&objects);
            for invalid in &world.invalid {
                tracing::warn!("rejected: {invalid}");
            }
            let kubepods = Kubepods::find(&options.cgroup_root);
            let plan = plan(
                &objects.pods,
                &options.node,
                kubepods.as_ref(),
                options.unknown_pods,
            );
            pods = objects.pods;
            pending_status = Some((objects.egress_policies, egress_problems(&world)));
            last_plan = Some(plan.clone());
            events.send(SourceEvent::Update(Box::new(Update {
                world,
                options: compile_options.clone(),
                cgroups: plan,
                since,
            })))
        } else if cgroups || periodic {
            let kubepods = Kubepods::find(&options.cgroup_root);
            let plan = plan(
                &pods,
                &options.node,
                kubepods.as_ref(),
                options.unknown_pods,
            );
            if last_plan.as_ref() == Some(&plan) {
                Ok(())
            } else {
                last_plan = Some(plan.clone());
                events.send(SourceEvent::Cgroups(plan))
            }
        } else {
            Ok(())
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
        if leader
            && let Some((policies, problems)) = pending_status.take()
            && let Err(err) = writer.write(&policies, &problems).await
        {
            tracing::warn!("EgressPolicy status: {err:#}; retried at the next change");
            pending_status = Some((policies, problems));
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
        let objects = Objects {
            pods: vec![pod(
                "a",
                "web",
                "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01",
                "n1",
            )],
            egress_policies: vec![
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy",
                    "metadata": {"name": "bad"},
                    "spec": {"priority": 5000, "subject": {"podSelector": {}}, "rules": []}
                }))
                .unwrap(),
            ],
            services: vec![
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "dns", "namespace": "kube-system"},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}
                }))
                .unwrap(),
            ],
            ..Objects::default()
        };
        let world = world(&objects);
        assert_eq!(world.pods.len(), 1);
        assert_eq!(world.pods[0].node.as_deref(), Some("n1"));
        assert_eq!(world.services.len(), 1);
        assert!(world.egress_policies.is_empty(), "priority 5000 is invalid");
        let problems = egress_problems(&world);
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
        let pods = [pod("a", "web", here, "n1"), pod("a", "db", there, "n2")];
        // Inode numbers stand in for cgroup ids (on cgroup2 they are the same thing).
        let inode = |dir: &std::path::Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let web_dir = &kubepods.pods()[here];
        let allow = plan_with(&pods, "n1", Some(&kubepods), UnknownPods::Allow, &inode);
        assert_eq!(
            allow.workloads,
            BTreeMap::from([(
                ("a".to_owned(), "web".to_owned()),
                std::collections::BTreeSet::from([inode(web_dir).unwrap()])
            )]),
            "only this node's pod, by its uid's cgroup"
        );
        assert!(allow.guards.is_empty());
        let deny = plan_with(&pods, "n1", Some(&kubepods), UnknownPods::Deny, &inode);
        let parents: std::collections::BTreeSet<u64> =
            kubepods.parents().iter().filter_map(|p| inode(p)).collect();
        assert_eq!(
            deny.guards, parents,
            "kubepods.slice and the Burstable slice"
        );
        assert_eq!(deny.guards.len(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }
}
