//! Watch streams: the events since a resourceVersion (or the current state first), filtered
//! by namespace and selectors, with BOOKMARKs, `sendInitialEvents`, timeouts, and an ERROR
//! event carrying 410 Gone for a version older than the history.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Response, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::warn;

use crate::{
    selector::{FieldSelector, LabelSelector},
    server::{Body, Call, Config, State, Target, error_response, lock, partial, selectors},
    status::ApiError,
    store::{EventType, WatchEvent, object_key},
    table,
};

/// What one watch selects and how it shows objects.
struct WatchFilter {
    target: Target,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<String>,
    metadata_only: bool,
    columns: Vec<table::Column>,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        let (ns, name) = object_key(obj);
        self.target.namespace.as_ref().is_none_or(|n| *n == ns)
            && self.target.name.as_ref().is_none_or(|n| *n == name)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    fn line(&self, event_type: &str, obj: Value) -> Bytes {
        let obj = self.target.present(obj);
        let object = match &self.table {
            _ if self.metadata_only => partial(&obj),
            Some(include) => table::table(
                std::slice::from_ref(&obj),
                json!({}),
                include,
                &self.columns,
            ),
            None => obj,
        };
        let mut line =
            serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// The event this watch sends for a change, if any: an object that stops matching the
    /// selectors is DELETED for it, one that starts matching is ADDED.
    fn render(&self, event: &WatchEvent) -> Option<Bytes> {
        if event.group != self.target.t.group || event.plural != self.target.t.plural {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.old.as_ref().is_some_and(|o| self.matches(o));
        let event_type = match (event.event_type, before, now) {
            (EventType::Added | EventType::Deleted, _, false) => return None,
            (EventType::Added, _, true) => "ADDED",
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            (EventType::Modified, false, false) => return None,
        };
        Some(self.line(event_type, event.object.clone()))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({
            "kind": self.target.t.kind,
            "apiVersion": self.target.t.api_version(&self.target.version),
            "metadata": metadata,
        });
        let mut line =
            serde_json::to_vec(&json!({"type": "BOOKMARK", "object": obj})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// A watch waiting while watches are held: listed in [`State::held_watches`] until dropped.
struct Held<'a> {
    state: &'a State,
    resource: String,
}

impl<'a> Held<'a> {
    fn new(state: &'a State, resource: &str) -> Self {
        lock(&state.held_watches).push(resource.to_owned());
        Self {
            state,
            resource: resource.to_owned(),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.state.held_watches);
        if let Some(i) = held.iter().position(|r| *r == self.resource) {
            held.remove(i);
        }
    }
}

fn error_line(e: &ApiError) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": "ERROR", "object": e.to_status()})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Starts a watch: a streamed 200 whose lines are watch events, as the real server sends
/// them (a too-old resourceVersion is an ERROR event carrying a 410 `Status`).
pub(crate) async fn start(state: &Arc<State>, call: &Call, target: &Target) -> Response<Body> {
    let (labels, fields) = match selectors(call, &target.t) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let mut target = Target {
        t: target.t.clone(),
        version: target.version.clone(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: None,
        watch_path: true,
    };
    if target.name.is_none() {
        target.name = fields.name().map(str::to_owned);
    }
    let columns = {
        let store = lock(&state.store);
        table::columns(&target.t, store.crd(&target.t))
    };
    let filter = WatchFilter {
        target,
        labels,
        fields,
        table: call
            .wants_table()
            .then(|| call.param("includeObject").unwrap_or("Metadata").to_owned()),
        metadata_only: call.metadata_only(),
        columns,
    };
    let bookmarks = call.flag("allowWatchBookmarks");
    let send_initial = call.flag("sendInitialEvents");
    let timeout = call
        .param("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from: Option<u64> = match call.param("resourceVersion") {
        None | Some("0") => None,
        Some(v) => match v.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resourceVersion {v:?}"
                )));
            }
        },
    };

    // Wait while a test holds new watches back, listed as held meanwhile (also when the client
    // gives up waiting and this future is dropped).
    let mut hold = state.hold_watches.subscribe();
    if *hold.borrow_and_update() {
        let _held = Held::new(state, &filter.target.t.plural);
        while *hold.borrow_and_update() {
            if hold.changed().await.is_err() {
                break;
            }
        }
    }

    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let drop_rx = state.drop_watches.subscribe();
    let start = {
        let store = lock(&state.store);
        let events = store.subscribe();
        let current = store.resource_version();
        match from.filter(|_| !send_initial) {
            Some(rv) => match store.history_since(rv) {
                Ok(backlog) => Ok((backlog, Vec::new(), rv, events)),
                Err(e) => Err(e),
            },
            None => {
                let initial = store
                    .list(&filter.target.t, filter.target.namespace.as_deref())
                    .into_iter()
                    .filter(|o| filter.matches(o))
                    .collect();
                Ok((Vec::new(), initial, current, events))
            }
        }
    };
    let config = state.config.clone();
    let store_state = Arc::clone(state);
    match start {
        Err(e) => {
            // The real server answers 200 and reports the expiry as the stream's only event.
            let _ = tx.try_send(error_line(&e));
        }
        Ok((backlog, initial, rv, events)) => {
            tokio::spawn(async move {
                let w = Watch {
                    filter,
                    tx,
                    events,
                    drop_rx,
                    state: store_state,
                    last_rv: rv,
                };
                w.run(
                    backlog,
                    initial,
                    send_initial && bookmarks,
                    bookmarks,
                    timeout,
                    config,
                )
                .await;
            });
        }
    }
    let stream = tokio_stream_from(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A receiver as a stream (what `tokio-stream`'s wrapper does, without the dependency).
fn tokio_stream_from(rx: mpsc::Receiver<Bytes>) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

/// One open watch.
struct Watch {
    filter: WatchFilter,
    tx: mpsc::Sender<Bytes>,
    events: broadcast::Receiver<Arc<WatchEvent>>,
    drop_rx: watch::Receiver<u64>,
    state: Arc<State>,
    last_rv: u64,
}

impl Watch {
    /// Sends an event if it is new to this watch; false when the client is gone.
    async fn deliver(&mut self, event: &WatchEvent) -> bool {
        if event.rv <= self.last_rv {
            return true;
        }
        self.last_rv = event.rv;
        match self.filter.render(event) {
            Some(line) => self.tx.send(line).await.is_ok(),
            None => true,
        }
    }

    async fn run(
        mut self,
        backlog: Vec<Arc<WatchEvent>>,
        initial: Vec<Value>,
        initial_events_end: bool,
        bookmarks: bool,
        timeout: Duration,
        config: Config,
    ) {
        for obj in initial {
            if self.tx.send(self.filter.line("ADDED", obj)).await.is_err() {
                return;
            }
        }
        if initial_events_end
            && self
                .tx
                .send(self.filter.bookmark(self.last_rv, true))
                .await
                .is_err()
        {
            return;
        }
        for event in backlog {
            if !self.deliver(&event).await {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(config.bookmark_interval);
        ticks.reset();
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = self.drop_rx.changed() => return,
                () = self.tx.closed() => return,
                received = self.events.recv() => match received {
                    Ok(event) => {
                        if !self.deliver(&event).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.expire().await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticks.tick(), if bookmarks => {
                    if !self.bookmark().await {
                        return;
                    }
                }
            }
        }
    }

    /// A watch too slow to keep up is ended with 410, as the real server ends it, and the
    /// client re-lists.
    async fn expire(&mut self) {
        warn!(resource = %self.filter.target.t.plural, "watch fell behind; ending it with 410");
        let e = ApiError::expired(format!("too old resource version: {}", self.last_rv));
        let _ = self.tx.send(error_line(&e)).await;
    }

    /// Sends a BOOKMARK at the store's current version, after every event up to it.
    async fn bookmark(&mut self) -> bool {
        // Events are broadcast under the store lock, so all up to `current` are queued now.
        let current = lock(&self.state.store).resource_version();
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    if !self.deliver(&event).await {
                        return false;
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.expire().await;
                    return false;
                }
                Err(broadcast::error::TryRecvError::Closed) => return false,
            }
        }
        self.last_rv = self.last_rv.max(current);
        self.tx
            .send(self.filter.bookmark(self.last_rv, false))
            .await
            .is_ok()
    }
}
