//! kube-rs 5 against the test API server, as egret's agent will use it: watchers and
//! reflectors through a paginated initial list, watch events, bookmarks, and the re-list
//! after the server drops every watch and compacts its history (410 Gone); Leases, Events and
//! the status subresource of a custom resource.

#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use egret_test_apiserver::{ApiServer, Config, RequestRecord};
use futures_util::StreamExt as _;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod, events::v1::Event};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams, WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use serde_json::{Value, json};

fn start(bookmark_interval: Duration) -> ApiServer {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let config = Config {
        bookmark_interval,
        ..Config::default()
    };
    ApiServer::start(listen, config).expect("server starts")
}

async fn client(server: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

fn pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }))
    .expect("pod")
}

/// Seeds namespace `shop` with `n` pods.
fn seed_pods(server: &ApiServer, n: usize) {
    let mut yaml = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i:02}, namespace: shop, labels: {{app: a}}}}\n\
             status: {{podIP: 10.0.0.{i}}}\n"
        ));
    }
    server.seed(&yaml).expect("seed");
}

/// Waits up to 20 s for `check`, then fails with `what`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// (name, resourceVersion, labels) of every pod the reflector holds, sorted.
fn cached(store: &Store<Pod>) -> Vec<(String, String, Value)> {
    let mut pods: Vec<_> = store
        .state()
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.metadata.resource_version.clone().unwrap_or_default(),
                json!(p.metadata.labels),
            )
        })
        .collect();
    pods.sort_by(|a, b| a.0.cmp(&b.0));
    pods
}

/// The same for the pods the server stores.
fn stored(server: &ApiServer) -> Vec<(String, String, Value)> {
    let mut pods: Vec<_> = server
        .objects("", "pods")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["metadata"].get("labels").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    pods.sort_by(|a, b| a.0.cmp(&b.0));
    pods
}

fn pod_requests(server: &ApiServer, verb: &str) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.verb == verb && r.resource == "pods" && r.api_group.is_empty())
        .collect()
}

/// A reflector over all pods, listing in pages of `page_size`, driven on a task.
fn reflect(client: &Client, page_size: u32) -> Store<Pod> {
    let (reader, writer) = reflector::store();
    let api: Api<Pod> = Api::all(client.clone());
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().page_size(page_size)).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_lists_in_pages_follows_events_and_relists_after_410() {
    let server = start(Duration::from_secs(60));
    seed_pods(&server, 23);
    let client = client(&server).await;
    let reader = reflect(&client, 5);
    within("the initial list", reader.wait_until_ready())
        .await
        .expect("store ready");
    assert_eq!(cached(&reader), stored(&server));
    assert_eq!(reader.state().len(), 23);

    // 23 pods in pages of 5: five list calls, chained by continue tokens, then a watch from
    // the list's version with bookmarks.
    let lists = pod_requests(&server, "list");
    assert_eq!(lists.len(), 5, "{lists:?}");
    assert!(lists.iter().all(|r| r.query.contains("limit=5")));
    assert_eq!(
        lists
            .iter()
            .filter(|r| r.query.contains("continue="))
            .count(),
        4
    );
    eventually("the watch", || !pod_requests(&server, "watch").is_empty()).await;
    let watch = &pod_requests(&server, "watch")[0];
    assert!(
        watch.query.contains("allowWatchBookmarks=true"),
        "{watch:?}"
    );

    // Create, update and delete through the API reach the store through the watch.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.create(&PostParams::default(), &pod("new", json!({"app": "b"})))
        .await
        .expect("create");
    pods.patch(
        "pod-00",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "changed"}}})),
    )
    .await
    .expect("patch");
    pods.delete("pod-01", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the watch events in the store", || {
        cached(&reader) == stored(&server)
    })
    .await;
    assert!(
        cached(&reader)
            .iter()
            .any(|(n, _, l)| n == "pod-00" && l["app"] == "changed")
    );
    assert!(!cached(&reader).iter().any(|(n, _, _)| n == "pod-01"));

    // The server drops every watch; while the watcher reconnects, pods change and the history
    // is compacted, so its resume gets 410 Gone and it must re-list.
    let lists_before = pod_requests(&server, "list").len();
    server.hold_watches(true);
    server.drop_watches();
    pods.create(&PostParams::default(), &pod("late", json!({"app": "c"})))
        .await
        .expect("create");
    pods.delete("pod-02", &DeleteParams::default())
        .await
        .expect("delete");
    pods.patch(
        "pod-03",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "moved"}}})),
    )
    .await
    .expect("patch");
    server.compact();
    server.hold_watches(false);
    eventually("the re-listed store", || cached(&reader) == stored(&server)).await;
    assert!(
        pod_requests(&server, "list").len() > lists_before,
        "the watcher did not re-list after 410"
    );
    let names: Vec<String> = cached(&reader).into_iter().map(|(n, _, _)| n).collect();
    assert!(names.contains(&"late".to_owned()) && !names.contains(&"pod-02".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_get_bookmarks_and_the_watcher_resumes_from_them() {
    let server = start(Duration::from_millis(200));
    seed_pods(&server, 3);
    let client = client(&server).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease = |name: &str| -> Lease {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"holderIdentity": "a"}}))
            .expect("lease")
    };

    // A raw watch: events for pods, and bookmarks that move past writes to other kinds.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let from = server.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(30), &from)
        .await
        .expect("watch")
        .boxed();
    pods.create(&PostParams::default(), &pod("w", json!({})))
        .await
        .expect("create");
    let created = leases
        .create(&PostParams::default(), &lease("other"))
        .await
        .expect("lease");
    let lease_rv: u64 = created
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("lease version");
    let mut added = false;
    loop {
        let event = within("a bookmark", stream.next())
            .await
            .expect("stream open")
            .expect("event");
        match event {
            WatchEvent::Added(p) => added |= p.metadata.name.as_deref() == Some("w"),
            WatchEvent::Bookmark(b) => {
                let rv: u64 = b
                    .metadata
                    .resource_version
                    .parse()
                    .expect("numeric version");
                if rv >= lease_rv {
                    break;
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(added, "no ADDED event before the bookmark");

    // A watch from a compacted version ends with an ERROR event carrying 410.
    server.compact();
    let mut stale = pods
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();
    match within("the 410", stale.next()).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // The watcher keeps its version current through bookmarks: after writes to other kinds,
    // a compaction and a dropped watch, it resumes without 410 and without a re-list.
    let reader = reflect(&client, 500);
    within("the initial list", reader.wait_until_ready())
        .await
        .expect("store ready");
    for i in 0..3 {
        leases
            .create(&PostParams::default(), &lease(&format!("l{i}")))
            .await
            .expect("lease");
    }
    let current = server.resource_version();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let lists_before = pod_requests(&server, "list").len();
    let watches_before = pod_requests(&server, "watch").len();
    server.compact();
    server.drop_watches();
    eventually("the resumed watch", || {
        pod_requests(&server, "watch").len() > watches_before
    })
    .await;
    let resumed = pod_requests(&server, "watch").pop().expect("watch");
    assert!(
        resumed
            .query
            .contains(&format!("resourceVersion={current}")),
        "resumed from a version other than the last bookmark: {resumed:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pod_requests(&server, "list").len(),
        lists_before,
        "re-listed needlessly"
    );
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_events_and_custom_resource_status() {
    let server = start(Duration::from_secs(60));
    let client = client(&server).await;

    // A Lease as leader election uses it: create, replace with the current version, and a
    // replace from a stale copy is 409 Conflict.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "egret-status-writer"},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15},
    }))
    .expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    let mut taken = created.clone();
    taken.spec.as_mut().expect("spec").holder_identity = Some("node-b".into());
    let replaced = leases
        .replace("egret-status-writer", &PostParams::default(), &taken)
        .await
        .expect("replace");
    assert_eq!(
        replaced.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("node-b")
    );
    match leases
        .replace("egret-status-writer", &PostParams::default(), &created)
        .await
    {
        Err(kube::Error::Api(status)) => assert!(status.is_conflict(), "{status:?}"),
        other => panic!("stale replace: {other:?}"),
    }
    match leases.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(status)) => assert!(status.is_already_exists(), "{status:?}"),
        other => panic!("second create: {other:?}"),
    }
    match leases.get("missing").await {
        Err(kube::Error::Api(status)) => assert!(status.is_not_found(), "{status:?}"),
        other => panic!("get of a missing lease: {other:?}"),
    }
    // Server-side apply, as kube-rs sends it: a field this manager applied and no longer
    // applies goes; a field another write set stays.
    let apply = |spec: Value| {
        let leases = leases.clone();
        async move {
            leases
                .patch(
                    "egret-status-writer",
                    &PatchParams::apply("egret").force(),
                    &Patch::Apply(json!({
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": "egret-status-writer"},
                        "spec": spec,
                    })),
                )
                .await
                .expect("apply")
        }
    };
    let stored = || {
        server
            .object(
                "coordination.k8s.io",
                "leases",
                "default",
                "egret-status-writer",
            )
            .expect("lease stored")
    };
    apply(json!({"holderIdentity": "node-c", "leaseTransitions": 3})).await;
    assert_eq!(stored()["spec"]["holderIdentity"], "node-c");
    assert_eq!(stored()["spec"]["leaseTransitions"], 3);
    assert_eq!(stored()["spec"]["leaseDurationSeconds"], 15);
    apply(json!({"holderIdentity": "node-d"})).await;
    assert_eq!(stored()["spec"]["holderIdentity"], "node-d");
    assert!(
        stored()["spec"].get("leaseTransitions").is_none(),
        "{}",
        stored()
    );
    assert_eq!(stored()["spec"]["leaseDurationSeconds"], 15);

    // An events.k8s.io/v1 Event for a rejected policy.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "bad-policy."},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Invalid", "type": "Warning", "action": "Validate",
        "reportingController": "egret.dev/agent", "reportingInstance": "node-a",
        "regarding": {"apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy", "name": "bad"},
        "note": "spec.rules[0].to: Required value",
    }))
    .expect("event");
    let made = events
        .create(&PostParams::default(), &event)
        .await
        .expect("create event");
    let name = made.metadata.name.expect("generated name");
    assert!(
        name.starts_with("bad-policy.") && name.len() == "bad-policy.".len() + 5,
        "{name}"
    );
    assert!(
        server
            .object("events.k8s.io", "events", "default", &name)
            .is_some()
    );

    // The EgressPolicy CRD, then status writes through the status subresource.
    let crd = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/crds/egresspolicy.yaml"),
    )
    .expect("CRD manifest");
    server.seed(&crd).expect("CRD");
    let gvk = GroupVersionKind::gvk("egret.dev", "v1alpha1", "EgressPolicy");
    let policies: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "egresspolicies"),
    );
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy",
        "metadata": {"name": "p"},
        "spec": {"priority": 1, "subject": {"podSelector": {}}, "rules": []},
        "status": {"ignored": true},
    }))
    .expect("policy");
    let created = policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create");
    assert!(
        created.data.get("status").is_none(),
        "create kept the status"
    );
    let condition = json!({"type": "Accepted", "status": "False", "reason": "Invalid",
                           "message": "spec.rules: empty", "observedGeneration": 1,
                           "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let with_status = policies
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [condition]}, "spec": {"priority": 9}})),
        )
        .await
        .expect("patch status");
    assert_eq!(
        with_status.data["status"]["conditions"][0]["reason"],
        "Invalid"
    );
    assert_eq!(
        with_status.data["spec"]["priority"], 1,
        "status patch changed the spec"
    );
    assert_eq!(with_status.metadata.generation, Some(1));
    let bumped = policies
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"priority": 2}})),
        )
        .await
        .expect("patch spec");
    assert_eq!(bumped.metadata.generation, Some(2));
    assert_eq!(bumped.data["status"]["conditions"][0]["reason"], "Invalid");
    match policies
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"priority": 3}})),
        )
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 415, "{status:?}"),
        other => panic!("strategic patch of a custom resource: {other:?}"),
    }
    let requests = server.requests();
    let status_write = requests
        .iter()
        .find(|r| r.verb == "patch" && r.subresource == "status")
        .expect("status patch logged");
    assert_eq!(
        (
            status_write.api_group.as_str(),
            status_write.resource.as_str(),
            status_write.name.as_str()
        ),
        ("egret.dev", "egresspolicies", "p")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_and_metadata_watchers() {
    let server = start(Duration::from_secs(60));
    seed_pods(&server, 4);
    let client = client(&server).await;
    let api: Api<Pod> = Api::all(client.clone());

    // A streaming list: the initial state arrives over the watch, ended by the bookmark
    // annotated `k8s.io/initial-events-end`; no list call at all.
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().streaming_lists();
    tokio::spawn(
        reflector(writer, watcher(api.clone(), config).default_backoff()).for_each(|_| async {}),
    );
    within("the streamed initial state", reader.wait_until_ready())
        .await
        .expect("store ready");
    assert_eq!(cached(&reader), stored(&server));
    assert!(pod_requests(&server, "list").is_empty());
    let first = &pod_requests(&server, "watch")[0];
    assert!(first.query.contains("sendInitialEvents=true"), "{first:?}");

    // A metadata watcher gets PartialObjectMetadata and follows label changes.
    let (meta, writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let metadata_api: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
    tokio::spawn(
        reflector(
            writer,
            watcher(metadata_api, watcher::Config::default()).default_backoff(),
        )
        .for_each(|_| async {}),
    );
    within("the metadata list", meta.wait_until_ready())
        .await
        .expect("store ready");
    assert_eq!(meta.state().len(), 4);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.patch(
        "pod-00",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "relabelled"}}})),
    )
    .await
    .expect("patch");
    eventually("the label change in both stores", || {
        cached(&reader) == stored(&server)
            && meta.state().iter().any(|p| {
                p.metadata.name.as_deref() == Some("pod-00")
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app"))
                        .map(String::as_str)
                        == Some("relabelled")
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_continue_tokens_until_compaction_expires_them() {
    let server = start(Duration::from_secs(60));
    seed_pods(&server, 5);
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client, "shop");
    let first = pods
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().expect("continue token");
    // Changes between pages do not show: every page is read at the first page's version.
    pods.create(&PostParams::default(), &pod("zz-late", json!({})))
        .await
        .expect("create");
    pods.delete("pod-04", &DeleteParams::default())
        .await
        .expect("delete");
    pods.patch(
        "pod-02",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "changed"}}})),
    )
    .await
    .expect("patch");
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    let names: Vec<String> = second
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["pod-02", "pod-03"]);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    server.compact();
    match pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (410, "Expired"),
                "{status:?}"
            );
        }
        other => panic!("continue after compaction: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watches_see_objects_leave_and_enter() {
    let server = start(Duration::from_secs(60));
    seed_pods(&server, 2);
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client, "shop");
    let from = server.resource_version().to_string();
    let mut stream = pods
        .watch(
            &WatchParams::default()
                .labels("app=a")
                .timeout(30)
                .disable_bookmarks(),
            &from,
        )
        .await
        .expect("watch")
        .boxed();
    let relabel = |app: &'static str| {
        let pods = pods.clone();
        async move {
            pods.patch(
                "pod-00",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"app": app}}})),
            )
            .await
            .expect("patch")
        }
    };
    relabel("b").await; // leaves the selection
    relabel("c").await; // still outside: nothing
    relabel("a").await; // enters again
    pods.patch(
        "pod-01",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
    )
    .await
    .expect("patch");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = within("the selector's events", stream.next())
            .await
            .expect("stream open")
            .expect("event");
        seen.push(match event {
            WatchEvent::Added(p) => format!("ADDED {}", p.metadata.name.unwrap_or_default()),
            WatchEvent::Modified(p) => format!("MODIFIED {}", p.metadata.name.unwrap_or_default()),
            WatchEvent::Deleted(p) => format!("DELETED {}", p.metadata.name.unwrap_or_default()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, ["DELETED pod-00", "ADDED pod-00", "MODIFIED pod-01"]);
}
