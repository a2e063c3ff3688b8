//! The agent's view of the cluster: one kube-runtime watcher and reflector store per kind it
//! needs, each re-listing on its own after an error or a `410 Gone` (with kube's default
//! backoff), and one notification when anything changed. While a watch is broken its store keeps
//! the last state it had, so the last good policy stays enforced, unchanged.
//!
//! Pods are the one kind whose count grows with the cluster; each is cut down to the fields the
//! compiler reads before it is stored ([`slim_pod`]), so memory stays bounded.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::policy::crd::EgressPolicy;

/// The kinds watched, as named in logs and metrics.
pub const KINDS: [&str; 6] = [
    "Pod",
    "Namespace",
    "NetworkPolicy",
    "EgressPolicy",
    "Service",
    "EndpointSlice",
];

/// One watch's state, for `/readyz`, `/healthz` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindHealth {
    /// The initial list (or a re-list) completed at least once.
    pub listed: bool,
    /// The watch loop runs (it only stops if its task ends, which it should not).
    pub alive: bool,
    /// Errors after which the watcher backed off and resumed or re-listed.
    pub restarts: u64,
    /// Objects in the store.
    pub objects: usize,
    /// The last error, for the readiness detail.
    pub last_error: Option<String>,
}

/// Every watch's state.
#[derive(Debug, Default)]
pub struct WatchHealth {
    kinds: Mutex<BTreeMap<&'static str, KindHealth>>,
}

impl WatchHealth {
    fn update(&self, kind: &'static str, f: impl FnOnce(&mut KindHealth)) {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        f(kinds.entry(kind).or_default());
    }

    /// A copy of every watch's state.
    pub fn snapshot(&self) -> BTreeMap<&'static str, KindHealth> {
        self.kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every watch has listed at least once.
    pub fn all_listed(&self) -> bool {
        let kinds = self.snapshot();
        KINDS.iter().all(|k| kinds.get(k).is_some_and(|h| h.listed))
    }

    /// The watches whose loop has died.
    pub fn dead(&self) -> Vec<&'static str> {
        let kinds = self.snapshot();
        KINDS
            .iter()
            .copied()
            .filter(|k| kinds.get(k).is_some_and(|h| !h.alive))
            .collect()
    }
}

/// Everything the watches hold now, as plain objects.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
    pub egress_policies: Vec<EgressPolicy>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}

/// The running watches.
pub struct Watches {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    network_policies: Store<NetworkPolicy>,
    egress_policies: Store<EgressPolicy>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    health: Arc<WatchHealth>,
    changed: Arc<Notify>,
    /// When the oldest change not yet taken by [`Self::snapshot`] arrived.
    pending_since: Arc<Mutex<Option<Instant>>>,
}

impl Watches {
    /// Starts every watch on the current tokio runtime.
    pub fn start(client: &Client) -> Self {
        let health = Arc::new(WatchHealth::default());
        let changed = Arc::new(Notify::new());
        let pending_since = Arc::new(Mutex::new(None));
        let shared = Shared {
            health: Arc::clone(&health),
            changed: Arc::clone(&changed),
            pending_since: Arc::clone(&pending_since),
        };
        Self {
            pods: shared.spawn("Pod", Api::all(client.clone()), slim_pod),
            namespaces: shared.spawn("Namespace", Api::all(client.clone()), slim_meta),
            network_policies: shared.spawn("NetworkPolicy", Api::all(client.clone()), slim_meta),
            egress_policies: shared.spawn("EgressPolicy", Api::all(client.clone()), slim_meta),
            services: shared.spawn("Service", Api::all(client.clone()), slim_meta),
            endpoint_slices: shared.spawn("EndpointSlice", Api::all(client.clone()), slim_meta),
            health,
            changed,
            pending_since,
        }
    }

    /// Waits for the next change (returns at once if one came since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The watches' state.
    pub fn health(&self) -> &Arc<WatchHealth> {
        &self.health
    }

    /// Everything the stores hold, and when the oldest change it includes arrived.
    pub fn snapshot(&self) -> (Objects, Option<Instant>) {
        let since = self
            .pending_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let objects = Objects {
            pods: owned(&self.pods),
            namespaces: owned(&self.namespaces),
            network_policies: owned(&self.network_policies),
            egress_policies: owned(&self.egress_policies),
            services: owned(&self.services),
            endpoint_slices: owned(&self.endpoint_slices),
        };
        for (kind, count) in [
            ("Pod", objects.pods.len()),
            ("Namespace", objects.namespaces.len()),
            ("NetworkPolicy", objects.network_policies.len()),
            ("EgressPolicy", objects.egress_policies.len()),
            ("Service", objects.services.len()),
            ("EndpointSlice", objects.endpoint_slices.len()),
        ] {
            self.health.update(kind, |h| h.objects = count);
        }
        (objects, since)
    }
}

fn owned<K: Clone + kube::runtime::reflector::Lookup + 'static>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|k| (**k).clone()).collect()
}

/// What every watch task shares.
struct Shared {
    health: Arc<WatchHealth>,
    changed: Arc<Notify>,
    pending_since: Arc<Mutex<Option<Instant>>>,
}

impl Shared {
    /// Spawns the watch of one kind; returns its store.
    fn spawn<K>(&self, kind: &'static str, api: Api<K>, slim: fn(&mut K)) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (store, writer) = reflector::store();
        let stream = events(api, writer, slim);
        let health = Arc::clone(&self.health);
        let changed = Arc::clone(&self.changed);
        let pending_since = Arc::clone(&self.pending_since);
        health.update(kind, |h| h.alive = true);
        tokio::spawn(async move {
            follow(kind, stream, &health, &changed, &pending_since).await;
            health.update(kind, |h| h.alive = false);
            tracing::error!(kind, "watch loop ended; /healthz fails");
        });
        store
    }
}

/// The reflected watch of one kind, cut down by `slim`.
fn events<K>(
    api: Api<K>,
    writer: Writer<K>,
    slim: fn(&mut K),
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
}

/// Drives one reflected watch: records health, and notifies on every change. Takes any stream
/// of watcher events, so tests can feed it `stream::iter(...)`.
pub async fn follow<K>(
    kind: &'static str,
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    health: &WatchHealth,
    changed: &Notify,
    pending_since: &Mutex<Option<Instant>>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::InitDone) => {
                health.update(kind, |h| {
                    h.listed = true;
                    h.last_error = None;
                });
                tracing::debug!(kind, "listed");
                true
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => false,
            Err(err) => {
                let text = err.to_string();
                tracing::warn!(kind, error = %text, "watch failed; backing off, then resuming or re-listing (the last state stays enforced)");
                health.update(kind, |h| {
                    h.restarts += 1;
                    h.last_error = Some(text);
                });
                false
            }
        };
        if change {
            pending_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(Instant::now);
            changed.notify_one();
        }
    }
}

/// Drops what no compile reads from any object's metadata: managed fields and annotations (the
/// last-applied one alone can be larger than the rest of the object).
fn slim_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// Cuts a pod down to what the compiler and the cgroup lookup read: identity, labels, owners,
/// node, host networking, container port names and numbers, addresses and phase.
pub fn slim_pod(pod: &mut Pod) {
    slim_meta(pod);
    if let Some(spec) = pod.spec.take() {
        let containers = spec
            .containers
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name,
                ports: c.ports,
                ..Default::default()
            })
            .collect();
        pod.spec = Some(PodSpec {
            containers,
            node_name: spec.node_name,
            host_network: spec.host_network,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": "ns", "uid": "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000)},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "u", "controller": true}]
            },
            "spec": {
                "nodeName": "node-1",
                "hostNetwork": false,
                "containers": [{
                    "name": "web", "image": "nginx", "command": ["nginx"], "env": [{"name": "A", "value": "B"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }],
                "volumes": [{"name": "data", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "web", "image": "nginx", "imageID": "sha", "ready": true, "restartCount": 0}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_slim_pod_keeps_what_the_compiler_reads_and_nothing_else() {
        let mut p = pod("web-1");
        let before = serde_json::to_string(&p).unwrap().len();
        slim_pod(&mut p);
        let after = serde_json::to_string(&p).unwrap().len();
        assert!(after * 10 < before, "{before} -> {after} bytes");
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "web");
        assert_eq!(
            p.metadata.owner_references.as_ref().unwrap()[0].name,
            "web-5d8f"
        );
        assert!(p.metadata.annotations.is_none() && p.metadata.managed_fields.is_none());
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        let ports = spec.containers[0].ports.as_ref().unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].container_port),
            (Some("http"), 8080)
        );
        assert!(spec.containers[0].image.is_none() && spec.volumes.is_none());
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        assert!(status.conditions.is_none());
    }

    #[tokio::test]
    async fn changes_notify_and_errors_count_as_restarts_without_touching_readiness() {
        let health = WatchHealth::default();
        let changed = Notify::new();
        let pending = Mutex::new(None);
        let events: Vec<watcher::Result<watcher::Event<Pod>>> = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("a"))),
            Ok(watcher::Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(watcher::Event::Apply(pod("b"))),
        ];
        follow("Pod", stream::iter(events), &health, &changed, &pending).await;
        let pods = &health.snapshot()["Pod"];
        assert!(pods.listed);
        assert_eq!(pods.restarts, 1);
        assert!(
            pods.last_error.is_some(),
            "the last error is kept for /readyz"
        );
        assert!(pending.lock().unwrap().is_some());
        // A notification is waiting.
        tokio::time::timeout(std::time::Duration::from_millis(100), changed.notified())
            .await
            .expect("notified");
    }

    #[tokio::test]
    async fn a_watch_that_only_fails_never_lists() {
        let health = WatchHealth::default();
        let events: Vec<watcher::Result<watcher::Event<Pod>>> = (0..3)
            .map(|_| Err(watcher::Error::NoResourceVersion))
            .collect();
        follow(
            "Pod",
            stream::iter(events),
            &health,
            &Notify::new(),
            &Mutex::new(None),
        )
        .await;
        assert!(!health.snapshot()["Pod"].listed);
        assert!(!health.all_listed());
        assert_eq!(health.snapshot()["Pod"].restarts, 3);
    }
}
