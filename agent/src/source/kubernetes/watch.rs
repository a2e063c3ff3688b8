//! The agent's view of the cluster: one kube-runtime watcher per kind it needs, each re-listing
//! on its own after an error or a `410 Gone` (with kube's default backoff).
//!
//! Each object is validated once, when it arrives, and kept only as the compiler reads it: a pod
//! as its [`PodInfo`] with its uid and node, a policy as its model, a Service or EndpointSlice
//! cut down. The [`View`] records which pods changed and whether anything else did, so that a
//! pod's churn costs an incremental compile of what it touches, not a rebuild of the cluster;
//! an update that changes nothing the compiler reads (a pod's conditions, a resourceVersion)
//! costs nothing. A re-list replaces a kind's objects only once it is complete, and while a
//! watch is broken its kind keeps the last state it had, so the last good policy stays
//! enforced, unchanged.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::{
    pipeline::StateChange,
    policy::{
        crd::EgressPolicy,
        model::{
            EgressPol, FieldError, InvalidPolicy, Labels, NetPol, ObjectKind, ObjectRef, PodInfo,
            World,
        },
        services, validate,
    },
};

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
    /// Objects kept.
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

/// (namespace, name); the namespace is empty for cluster-scoped kinds.
pub type Key = (String, String);

/// A pod as the agent keeps it: the compiler's model, and what finds its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub uid: Option<String>,
    pub node: Option<String>,
    pub model: Result<PodInfo, InvalidPolicy>,
}

/// An EgressPolicy as the agent keeps it: the object (its status is written back) and its
/// model.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressEntry {
    pub object: Arc<EgressPolicy>,
    pub model: Result<EgressPol, InvalidPolicy>,
}

/// One kind's objects: the live set, and a re-list in progress.
#[derive(Debug)]
pub struct Kept<V> {
    live: BTreeMap<Key, V>,
    relist: Option<BTreeMap<Key, V>>,
}

impl<V> Default for Kept<V> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relist: None,
        }
    }
}

impl<V> Kept<V> {
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.live.iter()
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        self.live.get(key)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// What a changed object means for the next compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// One pod: an incremental compile.
    Pod,
    /// A policy, namespace or Service: the whole cluster is compiled again.
    Cluster,
    /// Only an EgressPolicy's status: written again, nothing compiled.
    Status,
}

/// What changed since the last [`View::take`].
#[derive(Debug, Default)]
struct Dirty {
    pods: BTreeSet<Key>,
    cluster: bool,
    status: bool,
    /// When the oldest change not taken yet arrived.
    since: Option<Instant>,
}

/// What changed since the last take, for the compiler and the status writer.
#[derive(Debug, Default)]
pub struct Taken {
    /// `None`: nothing to compile.
    pub change: Option<StateChange>,
    /// EgressPolicy objects or problems changed: write their statuses.
    pub status: bool,
    /// When the oldest change it includes arrived.
    pub since: Option<Instant>,
}

/// Everything the watches keep, and what changed since the compiler last took it.
#[derive(Debug, Default)]
pub struct View {
    pub pods: Kept<PodEntry>,
    pub namespaces: Kept<Result<Labels, InvalidPolicy>>,
    pub network_policies: Kept<Result<Option<NetPol>, InvalidPolicy>>,
    pub egress_policies: Kept<EgressEntry>,
    pub services: Kept<Arc<Service>>,
    pub endpoint_slices: Kept<Arc<EndpointSlice>>,
    dirty: Dirty,
}

impl View {
    /// Applies one watcher event of kind `K`; true if it changed anything the agent acts on.
    pub fn apply<K: Watched>(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Apply(object) => {
                let (key, kept) = K::keep(object);
                let old = K::kept(self).live.insert(key.clone(), kept);
                self.note::<K>(&key, old)
            }
            watcher::Event::Delete(object) => {
                let key = key_of(&object);
                let old = K::kept(self).live.remove(&key);
                self.note::<K>(&key, old)
            }
            watcher::Event::Init => {
                K::kept(self).relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let (key, kept) = K::keep(object);
                K::kept(self)
                    .relist
                    .get_or_insert_default()
                    .insert(key, kept);
                false
            }
            watcher::Event::InitDone => {
                let kept = K::kept(self);
                let listed = kept.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut kept.live, listed);
                let keys: BTreeSet<Key> = old.keys().chain(kept.live.keys()).cloned().collect();
                let mut old = old;
                let mut changed = false;
                for key in keys {
                    changed |= self.note::<K>(&key, old.remove(&key));
                }
                changed
            }
        }
    }

    /// Records what replacing `old` with the kept object at `key` (if any) means.
    fn note<K: Watched>(&mut self, key: &Key, old: Option<K::Kept>) -> bool {
        let new = K::kept(self).live.get(key);
        if old.as_ref() == new {
            return false;
        }
        match K::touches(old.as_ref(), new) {
            Touch::Pod => {
                self.dirty.pods.insert(key.clone());
            }
            Touch::Cluster => self.dirty.cluster = true,
            Touch::Status => {}
        }
        // A changed object whose status egret writes may need it written again, whatever
        // changed in it.
        self.dirty.status |= K::WRITES_STATUS;
        self.dirty.since.get_or_insert_with(Instant::now);
        true
    }

    /// Marks everything changed (the next take compiles the whole cluster and writes every
    /// status).
    pub fn touch_all(&mut self) {
        self.dirty.cluster = true;
        self.dirty.status = true;
    }

    /// What changed since the last take: the whole cluster when anything but pods changed,
    /// else the pods that did.
    pub fn take(&mut self) -> Taken {
        let dirty = std::mem::take(&mut self.dirty);
        let change = if dirty.cluster {
            Some(StateChange::World(self.world()))
        } else if dirty.pods.is_empty() {
            None
        } else {
            let mut upsert = Vec::new();
            let mut remove = Vec::new();
            for key in dirty.pods {
                match self.pods.get(&key).map(|p| &p.model) {
                    Some(Ok(pod)) => upsert.push(pod.clone()),
                    _ => remove.push(key),
                }
            }
            Some(StateChange::Pods { upsert, remove })
        };
        Taken {
            change,
            status: dirty.status,
            since: dirty.since,
        }
    }

    /// The validated cluster: every kept model, the Services with their endpoints, and every
    /// object left out as invalid.
    pub fn world(&self) -> World {
        let mut invalid = Vec::new();
        let namespaces = self
            .namespaces
            .iter()
            .filter_map(|((_, name), r)| {
                valid(r, &mut invalid).map(|labels| (name.clone(), Arc::new(labels)))
            })
            .collect();
        let pods = self
            .pods
            .iter()
            .filter_map(|(_, p)| valid(&p.model, &mut invalid).map(Arc::new))
            .collect();
        let network_policies = self
            .network_policies
            .iter()
            .filter_map(|(_, r)| valid(r, &mut invalid).flatten().map(Arc::new))
            .collect();
        let egress_policies = self
            .egress_policies
            .iter()
            .filter_map(|(_, e)| valid(&e.model, &mut invalid).map(Arc::new))
            .collect();
        let mut world =
            World::from_validated(namespaces, pods, network_policies, egress_policies, invalid);
        world.services = services::from_objects(
            self.services.iter().map(|(_, s)| s.as_ref()),
            self.endpoint_slices.iter().map(|(_, s)| s.as_ref()),
        );
        world
    }

    /// Every EgressPolicy as stored, and the problem of each invalid one (name -> message), for
    /// their status.
    pub fn egress_status(&self) -> (Vec<EgressPolicy>, BTreeMap<String, String>) {
        let policies = self
            .egress_policies
            .iter()
            .map(|(_, e)| e.object.as_ref().clone())
            .collect();
        let problems = self
            .egress_policies
            .iter()
            .filter_map(|((_, name), e)| {
                e.model
                    .as_ref()
                    .err()
                    .map(|i| (name.clone(), format!("{}: {}", i.field, i.message)))
            })
            .collect();
        (policies, problems)
    }

    /// Objects kept per kind.
    fn counts(&self) -> [(&'static str, usize); 6] {
        [
            ("Pod", self.pods.len()),
            ("Namespace", self.namespaces.len()),
            ("NetworkPolicy", self.network_policies.len()),
            ("EgressPolicy", self.egress_policies.len()),
            ("Service", self.services.len()),
            ("EndpointSlice", self.endpoint_slices.len()),
        ]
    }
}

/// A valid model's copy; an invalid one's rejection goes to `invalid`.
fn valid<T: Clone>(
    model: &Result<T, InvalidPolicy>,
    invalid: &mut Vec<InvalidPolicy>,
) -> Option<T> {
    match model {
        Ok(model) => Some(model.clone()),
        Err(rejection) => {
            invalid.push(rejection.clone());
            None
        }
    }
}

fn key_of<K: Resource>(object: &K) -> Key {
    (object.namespace().unwrap_or_default(), object.name_any())
}

fn rejected(kind: ObjectKind, (namespace, name): &Key, error: FieldError) -> InvalidPolicy {
    let FieldError { field, message } = error;
    InvalidPolicy {
        object: ObjectRef::new(kind, namespace, name),
        field,
        message,
    }
}

/// One watched kind: what the agent keeps of an object, where, and what a change means.
pub trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    /// As named in logs and metrics.
    const KIND: &'static str;
    /// egret writes this kind's status (EgressPolicy's `Accepted`).
    const WRITES_STATUS: bool = false;
    type Kept: Clone + PartialEq + Debug + Send + 'static;
    /// Validates and cuts down one object.
    fn keep(self) -> (Key, Self::Kept);
    fn kept(view: &mut View) -> &mut Kept<Self::Kept>;
    /// What `old` becoming `new` means (either `None`: added or deleted); they differ.
    fn touches(_old: Option<&Self::Kept>, _new: Option<&Self::Kept>) -> Touch {
        Touch::Cluster
    }
}

impl Watched for Pod {
    const KIND: &'static str = "Pod";
    type Kept = PodEntry;

    fn keep(self) -> (Key, PodEntry) {
        let key = key_of(&self);
        let model =
            validate::pod(&key.0, &key.1, &self).map_err(|e| rejected(ObjectKind::Pod, &key, e));
        let entry = PodEntry {
            uid: self.metadata.uid,
            node: self.spec.and_then(|s| s.node_name),
            model,
        };
        (key, entry)
    }

    fn kept(view: &mut View) -> &mut Kept<PodEntry> {
        &mut view.pods
    }

    fn touches(old: Option<&PodEntry>, new: Option<&PodEntry>) -> Touch {
        // An invalid pod is listed in the world's rejections: only a whole compile updates
        // them.
        let invalid = |p: Option<&PodEntry>| p.is_some_and(|p| p.model.is_err());
        if invalid(old) || invalid(new) {
            Touch::Cluster
        } else {
            Touch::Pod
        }
    }
}

impl Watched for Namespace {
    const KIND: &'static str = "Namespace";
    type Kept = Result<Labels, InvalidPolicy>;

    fn keep(self) -> (Key, Self::Kept) {
        let key = (String::new(), self.name_any());
        let labels = validate::namespace(&key.1, &self)
            .map_err(|e| rejected(ObjectKind::Namespace, &key, e));
        (key, labels)
    }

    fn kept(view: &mut View) -> &mut Kept<Self::Kept> {
        &mut view.namespaces
    }
}

impl Watched for NetworkPolicy {
    const KIND: &'static str = "NetworkPolicy";
    type Kept = Result<Option<NetPol>, InvalidPolicy>;

    fn keep(self) -> (Key, Self::Kept) {
        let key = key_of(&self);
        let model = validate::network_policy(&key.0, &key.1, &self)
            .map_err(|e| rejected(ObjectKind::NetworkPolicy, &key, e));
        (key, model)
    }

    fn kept(view: &mut View) -> &mut Kept<Self::Kept> {
        &mut view.network_policies
    }
}

impl Watched for EgressPolicy {
    const KIND: &'static str = "EgressPolicy";
    const WRITES_STATUS: bool = true;
    type Kept = EgressEntry;

    fn keep(mut self) -> (Key, EgressEntry) {
        let key = (String::new(), self.name_any());
        let model = validate::egress_policy(&key.1, &self)
            .map_err(|e| rejected(ObjectKind::EgressPolicy, &key, e));
        slim_meta(&mut self);
        let entry = EgressEntry {
            object: Arc::new(self),
            model,
        };
        (key, entry)
    }

    fn kept(view: &mut View) -> &mut Kept<EgressEntry> {
        &mut view.egress_policies
    }

    fn touches(old: Option<&EgressEntry>, new: Option<&EgressEntry>) -> Touch {
        match (old, new) {
            (Some(old), Some(new)) if old.model == new.model => Touch::Status,
            _ => Touch::Cluster,
        }
    }
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    type Kept = Arc<Service>;

    fn keep(mut self) -> (Key, Arc<Service>) {
        slim_meta(&mut self);
        (key_of(&self), Arc::new(self))
    }

    fn kept(view: &mut View) -> &mut Kept<Arc<Service>> {
        &mut view.services
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    type Kept = Arc<EndpointSlice>;

    fn keep(mut self) -> (Key, Arc<EndpointSlice>) {
        slim_meta(&mut self);
        (key_of(&self), Arc::new(self))
    }

    fn kept(view: &mut View) -> &mut Kept<Arc<EndpointSlice>> {
        &mut view.endpoint_slices
    }
}

/// Drops what no compile reads from an object's metadata: managed fields, annotations (the
/// last-applied one alone can be larger than the rest of the object) and the resourceVersion
/// (so that an update that changes nothing else compares equal).
fn slim_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.resource_version = None;
}

/// The running watches.
pub struct Watches {
    view: Arc<Mutex<View>>,
    health: Arc<WatchHealth>,
    changed: Arc<Notify>,
}

impl Watches {
    /// Starts every watch on the current tokio runtime.
    pub fn start(client: &Client) -> Self {
        let watches = Self {
            view: Arc::default(),
            health: Arc::default(),
            changed: Arc::default(),
        };
        watches.spawn::<Pod>(Api::all(client.clone()));
        watches.spawn::<Namespace>(Api::all(client.clone()));
        watches.spawn::<NetworkPolicy>(Api::all(client.clone()));
        watches.spawn::<EgressPolicy>(Api::all(client.clone()));
        watches.spawn::<Service>(Api::all(client.clone()));
        watches.spawn::<EndpointSlice>(Api::all(client.clone()));
        watches
    }

    /// Waits for the next change (returns at once if one came since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The watches' state.
    pub fn health(&self) -> &Arc<WatchHealth> {
        &self.health
    }

    /// The view, locked (briefly: every watch waits on it).
    pub fn view(&self) -> MutexGuard<'_, View> {
        let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        for (kind, count) in view.counts() {
            self.health.update(kind, |h| h.objects = count);
        }
        view
    }

    /// Spawns the watch of one kind.
    fn spawn<K>(&self, api: Api<K>)
    where
        K: Watched,
        K::DynamicType: Default,
    {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let view = Arc::clone(&self.view);
        let health = Arc::clone(&self.health);
        let changed = Arc::clone(&self.changed);
        health.update(K::KIND, |h| h.alive = true);
        tokio::spawn(async move {
            follow(stream, &view, &health, &changed).await;
            health.update(K::KIND, |h| h.alive = false);
            tracing::error!(kind = K::KIND, "watch loop ended; /healthz fails");
        });
    }
}

/// Drives one watch into the view: records health, and notifies on every change. Takes any
/// stream of watcher events, so tests can feed it `stream::iter(...)`.
pub async fn follow<K: Watched>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    view: &Mutex<View>,
    health: &WatchHealth,
    changed: &Notify,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                let text = err.to_string();
                tracing::warn!(kind = K::KIND, error = %text, "watch failed; backing off, then resuming or re-listing (the last state stays enforced)");
                health.update(K::KIND, |h| {
                    h.restarts += 1;
                    h.last_error = Some(text);
                });
                continue;
            }
        };
        let listed = matches!(event, watcher::Event::InitDone);
        let change = view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(event);
        if listed {
            health.update(K::KIND, |h| {
                h.listed = true;
                h.last_error = None;
            });
            tracing::debug!(kind = K::KIND, "listed");
        }
        if change || listed {
            changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;

    fn pod(name: &str, app: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": "ns", "uid": "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01",
                "labels": {"app": app, "pod-template-hash": "5d8f"},
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

    fn policy(name: &str, port: i64) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                     "egress": [{"ports": [{"port": port}]}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_is_kept_as_the_compiler_reads_it() {
        let (key, entry) = pod("web-1", "web").keep();
        assert_eq!(key, ("ns".to_owned(), "web-1".to_owned()));
        assert_eq!(entry.node.as_deref(), Some("node-1"));
        assert_eq!(
            entry.uid.as_deref(),
            Some("6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01")
        );
        let info = entry.model.unwrap();
        assert_eq!(info.labels["app"], "web");
        assert_eq!(info.workload, "web", "the ReplicaSet's Deployment");
        assert_eq!(info.ips, ["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(
            (info.ports[0].name.as_str(), info.ports[0].number),
            ("http", 8080)
        );
    }

    #[test]
    fn pod_changes_are_incremental_and_status_only_updates_cost_nothing() {
        let mut view = View::default();
        assert!(view.apply(watcher::Event::Apply(pod("a", "web"))));
        assert!(view.apply(watcher::Event::Apply(pod("b", "web"))));
        let taken = view.take();
        let Some(StateChange::Pods { upsert, remove }) = taken.change else {
            panic!("pods only: {taken:?}");
        };
        assert_eq!(upsert.len(), 2);
        assert!(remove.is_empty() && taken.since.is_some() && !taken.status);

        // A new condition, a new resourceVersion: nothing the compiler reads.
        let mut same = pod("a", "web");
        same.metadata.resource_version = Some("99".into());
        same.status.as_mut().unwrap().conditions = None;
        assert!(!view.apply(watcher::Event::Apply(same)));
        assert!(view.take().change.is_none());

        assert!(view.apply(watcher::Event::Apply(pod("a", "db"))));
        assert!(view.apply(watcher::Event::Delete(pod("b", "web"))));
        let Some(StateChange::Pods { upsert, remove }) = view.take().change else {
            panic!("pods only");
        };
        assert_eq!(upsert[0].labels["app"], "db");
        assert_eq!(remove, [("ns".to_owned(), "b".to_owned())]);

        // A policy: the whole cluster.
        assert!(view.apply(watcher::Event::Apply(policy("p", 53))));
        let Some(StateChange::World(world)) = view.take().change else {
            panic!("a policy compiles the cluster");
        };
        assert_eq!(world.pods.len(), 1);
        assert_eq!(world.network_policies.len(), 1);
        // The same policy with a new resourceVersion: nothing.
        let mut again = policy("p", 53);
        again.metadata.resource_version = Some("2".into());
        assert!(!view.apply(watcher::Event::Apply(again)));
    }

    #[test]
    fn invalid_objects_are_left_out_and_named() {
        let mut view = View::default();
        view.apply(watcher::Event::Apply(policy("bad", 70_000)));
        view.apply(watcher::Event::Apply(policy("good", 53)));
        let world = view.world();
        assert_eq!(world.network_policies.len(), 1);
        assert_eq!(
            world
                .invalid
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "NetworkPolicy ns/bad: spec.egress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
            ]
        );
    }

    #[test]
    fn a_relist_replaces_a_kind_only_when_complete_and_reports_what_it_changed() {
        let mut view = View::default();
        view.apply(watcher::Event::Apply(pod("a", "web")));
        view.apply(watcher::Event::Apply(pod("b", "web")));
        let _ = view.take();
        // A re-list after a 410: "a" unchanged, "b" gone, "c" new.
        assert!(!view.apply(watcher::Event::<Pod>::Init));
        assert!(!view.apply(watcher::Event::InitApply(pod("a", "web"))));
        assert!(!view.apply(watcher::Event::InitApply(pod("c", "web"))));
        assert_eq!(
            view.pods.len(),
            2,
            "the last state until the list completes"
        );
        assert!(view.pods.get(&("ns".into(), "b".into())).is_some());
        assert!(view.apply(watcher::Event::<Pod>::InitDone));
        let Some(StateChange::Pods { upsert, remove }) = view.take().change else {
            panic!("pods only");
        };
        assert_eq!(
            upsert.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(remove, [("ns".to_owned(), "b".to_owned())]);
    }

    #[tokio::test]
    async fn changes_notify_and_errors_count_as_restarts_without_touching_readiness() {
        let health = WatchHealth::default();
        let changed = Notify::new();
        let view = Mutex::new(View::default());
        let events: Vec<watcher::Result<watcher::Event<Pod>>> = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("a", "web"))),
            Ok(watcher::Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(watcher::Event::Apply(pod("b", "web"))),
        ];
        follow(stream::iter(events), &view, &health, &changed).await;
        let pods = &health.snapshot()["Pod"];
        assert!(pods.listed);
        assert_eq!(pods.restarts, 1);
        assert!(
            pods.last_error.is_some(),
            "the last error is kept for /readyz"
        );
        assert_eq!(view.lock().unwrap().pods.len(), 2);
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
            stream::iter(events),
            &Mutex::new(View::default()),
            &health,
            &Notify::new(),
        )
        .await;
        assert!(!health.snapshot()["Pod"].listed);
        assert!(!health.all_listed());
        assert_eq!(health.snapshot()["Pod"].restarts, 3);
    }
}
