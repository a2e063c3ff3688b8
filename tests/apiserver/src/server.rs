//! The HTTP side: routes of the real server (`/api/v1/namespaces/{ns}/pods/{name}/status`,
//! `/apis/{group}/{version}/...`, `/watch/` paths and `?watch=true`), the verbs on them (watch
//! streams live in `watch.rs`), the request log, and the test hooks under `/egret-test/`.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tracing::debug;

use crate::{
    discovery,
    patch::PatchKind,
    resource::ResourceType,
    selector::{FieldSelector, LabelSelector},
    status::ApiError,
    store::{Store, WriteOptions, object_key},
    table,
};

/// Largest request body accepted (the real server's limit is 3 MiB per object).
const MAX_BODY: usize = 16 << 20;

/// Tunables of a server.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often a watch that asked for bookmarks gets one (the real server sends them about
    /// once a minute).
    pub bookmark_interval: Duration,
    /// Events kept for watches to resume from; older versions get 410 Gone.
    pub history_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(60),
            history_limit: 100_000,
        }
    }
}

/// One API request as RBAC sees it: the verb, the resource and its coordinates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `deletecollection`
    /// for resource requests; the lowercase HTTP method for others (discovery, OpenAPI).
    pub verb: String,
    /// API group (`""` for the core group).
    pub api_group: String,
    /// Plural resource (`pods`), empty for a non-resource request.
    pub resource: String,
    /// `status` for the status subresource, else empty.
    pub subresource: String,
    /// Namespace, empty for cluster-scoped and all-namespace requests.
    pub namespace: String,
    /// Object name, empty for collections.
    pub name: String,
    /// The client's `User-Agent`.
    pub user_agent: String,
    /// The request path, the `nonResourceURL` of a non-resource request.
    pub path: String,
    /// The query string, as sent (`limit=500&continue=...`).
    pub query: String,
    /// HTTP status answered.
    pub code: u16,
}

/// Shared by every connection.
pub(crate) struct State {
    pub(crate) store: Mutex<Store>,
    pub(crate) requests: Mutex<Vec<RequestRecord>>,
    /// Bumped to end every open watch.
    pub(crate) drop_watches: watch::Sender<u64>,
    /// While true, new watches wait before they start (so a test can make writes and compact
    /// while clients reconnect).
    pub(crate) hold_watches: watch::Sender<bool>,
    /// The resource (plural) of each watch waiting while held.
    pub(crate) held_watches: Mutex<Vec<String>>,
    pub(crate) config: Config,
    pub(crate) address: String,
}

/// A poisoned lock only means another request panicked; the data is still consistent
/// enough for a test server, and one failed test should not cascade into all.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    pub(crate) fn new(config: Config, address: String) -> Self {
        let (events, _) = broadcast::channel(65_536);
        Self {
            store: Mutex::new(Store::new(config.history_limit, events)),
            requests: Mutex::new(Vec::new()),
            drop_watches: watch::channel(0).0,
            hold_watches: watch::channel(false).0,
            held_watches: Mutex::new(Vec::new()),
            config,
            address,
        }
    }
}

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

pub(crate) fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// The parts of a request the handlers read.
pub(crate) struct Call {
    method: Method,
    path: String,
    raw_query: String,
    query: HashMap<String, String>,
    accept: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

impl Call {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun") == Some("All")
    }

    fn write_options(&self) -> WriteOptions<'_> {
        WriteOptions {
            dry_run: self.dry_run(),
            strict: self.param("fieldValidation") == Some("Strict"),
            field_manager: self.param("fieldManager"),
        }
    }

    pub(crate) fn wants_table(&self) -> bool {
        self.accept.contains("as=Table")
    }

    /// `Accept: ...;as=PartialObjectMetadata[List]`: kube-rs's metadata watchers ask for
    /// objects reduced to their metadata.
    pub(crate) fn metadata_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }

    /// The body as JSON (or YAML, which JSON is a subset of); protobuf is refused with 415,
    /// which is what a server without the protobuf codec for a kind answers.
    fn body_value(&self) -> Result<Value, ApiError> {
        if self.content_type.contains("protobuf") {
            return Err(ApiError::unsupported_media_type(&self.content_type));
        }
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        if self.content_type.contains("yaml") {
            return serde_yaml::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Serves one HTTP request.
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "failed to read the body: {e}"
            )));
        }
    };
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let call = Call {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        raw_query: parts.uri.query().unwrap_or_default().to_owned(),
        query: form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect(),
        accept: header(header::ACCEPT),
        content_type: header(header::CONTENT_TYPE),
        user_agent: header(header::USER_AGENT),
        body,
    };
    if let Some(hook) = call.path.strip_prefix("/egret-test/") {
        return admin(&state, hook, &call);
    }
    let (response, record) = route(&state, &call).await;
    debug!(
        method = %call.method,
        path = %call.path,
        query = ?parts.uri.query(),
        code = response.status().as_u16(),
        "request"
    );
    lock(&state.requests).push(RequestRecord {
        code: response.status().as_u16(),
        ..record
    });
    response
}

/// The test hooks: request log, dropping watches, compaction, holding watches, seeding.
fn admin(state: &Arc<State>, hook: &str, call: &Call) -> Response<Body> {
    match (&call.method, hook) {
        (&Method::GET, "requests") => {
            let requests = lock(&state.requests).clone();
            json_response(200, &serde_json::to_value(requests).unwrap_or_default())
        }
        (&Method::DELETE, "requests") => {
            lock(&state.requests).clear();
            json_response(200, &json!({}))
        }
        (&Method::POST, "drop-watches") => {
            state.drop_watches.send_modify(|g| *g += 1);
            json_response(200, &json!({}))
        }
        (&Method::POST, "compact") => {
            let mut store = lock(&state.store);
            store.compact();
            json_response(
                200,
                &json!({"resourceVersion": store.resource_version().to_string()}),
            )
        }
        (&Method::POST, "hold-watches") => {
            let hold = call.param("hold") != Some("false");
            state.hold_watches.send_replace(hold);
            json_response(200, &json!({"hold": hold}))
        }
        (&Method::POST, "seed") => {
            let text = String::from_utf8_lossy(&call.body);
            match crate::seed(&mut lock(&state.store), &text) {
                Ok(objects) => json_response(200, &json!({"objects": objects.len()})),
                Err(e) => error_response(&e),
            }
        }
        _ => error_response(&ApiError::no_route(&call.path)),
    }
}

/// A non-resource request's log entry.
fn non_resource(call: &Call) -> RequestRecord {
    RequestRecord {
        verb: call.method.as_str().to_lowercase(),
        api_group: String::new(),
        resource: String::new(),
        subresource: String::new(),
        namespace: String::new(),
        name: String::new(),
        user_agent: call.user_agent.clone(),
        path: call.path.clone(),
        query: call.raw_query.clone(),
        code: 0,
    }
}

async fn route(state: &Arc<State>, call: &Call) -> (Response<Body>, RequestRecord) {
    let segments: Vec<&str> = call.path.split('/').filter(|s| !s.is_empty()).collect();
    let record = non_resource(call);
    let found = |v: Option<Value>| match v {
        Some(v) => json_response(200, &v),
        None => error_response(&ApiError::no_route(&call.path)),
    };
    if call.method != Method::GET
        && !matches!(
            segments.as_slice(),
            ["api", _, _, ..] | ["apis", _, _, _, ..]
        )
    {
        return (
            error_response(&ApiError::method_not_allowed(call.method.as_str())),
            record,
        );
    }
    let response = match segments.as_slice() {
        ["version"] => json_response(200, &discovery::version()),
        ["healthz" | "readyz" | "livez"] => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        ["api"] => json_response(200, &discovery::core_versions(&state.address)),
        ["apis"] => json_response(200, &discovery::group_list(lock(&state.store).types())),
        ["apis", group] => found(discovery::group(lock(&state.store).types(), group)),
        ["api", version] => found(discovery::resource_list(
            lock(&state.store).types(),
            "",
            version,
        )),
        ["apis", group, version] => found(discovery::resource_list(
            lock(&state.store).types(),
            group,
            version,
        )),
        ["openapi", "v3"] => {
            let store = lock(&state.store);
            json_response(
                200,
                &discovery::openapi_index(store.types(), store.types_generation()),
            )
        }
        ["openapi", "v3", rest @ ..] => found(discovery::openapi_document(
            lock(&state.store).types(),
            &rest.join("/"),
        )),
        ["api", version, rest @ ..] => return resource(state, call, "", version, rest).await,
        ["apis", group, version, rest @ ..] => {
            return resource(state, call, group, version, rest).await;
        }
        _ => error_response(&ApiError::no_route(&call.path)),
    };
    (response, record)
}

/// A resource URL, parsed.
pub(crate) struct Target {
    pub(crate) t: ResourceType,
    pub(crate) version: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
    pub(crate) watch_path: bool,
}

impl Target {
    fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// The object as the requested version presents it.
    pub(crate) fn present(&self, mut obj: Value) -> Value {
        if obj.is_object() {
            obj["apiVersion"] = json!(self.t.api_version(&self.version));
        }
        obj
    }
}

fn parse_target(store: &Store, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let (namespace, rest): (Option<String>, Vec<&str>) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if store
                .find_type(group, version, plural)
                .is_some_and(|t| t.namespaced) =>
        {
            let rest = std::iter::once(*plural)
                .chain(tail.iter().copied())
                .collect();
            (Some((*ns).to_owned()), rest)
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    let t = store.find_type(group, version, plural)?;
    if namespace.is_some() && !t.namespaced {
        return None;
    }
    if subresource
        .as_deref()
        .is_some_and(|s| s != "status" || !t.status)
    {
        return None;
    }
    Some(Target {
        t,
        version: version.to_owned(),
        namespace,
        name,
        subresource,
        watch_path,
    })
}

async fn resource(
    state: &Arc<State>,
    call: &Call,
    group: &str,
    version: &str,
    rest: &[&str],
) -> (Response<Body>, RequestRecord) {
    let mut record = non_resource(call);
    let target = parse_target(&lock(&state.store), group, version, rest);
    let Some(target) = target else {
        return (error_response(&ApiError::no_route(&call.path)), record);
    };
    let watching = target.watch_path || call.flag("watch");
    let verb = match (&call.method, target.name.is_some()) {
        (&Method::GET, _) if watching => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        // The all-namespaces path of a namespaced kind serves only list and watch.
        (&Method::DELETE, false) if !target.t.namespaced || target.namespace.is_some() => {
            "deletecollection"
        }
        _ => {
            return (
                error_response(&ApiError::method_not_allowed(call.method.as_str())),
                record,
            );
        }
    };
    record = RequestRecord {
        verb: verb.to_owned(),
        api_group: target.t.group.clone(),
        resource: target.t.plural.clone(),
        subresource: target.subresource.clone().unwrap_or_default(),
        namespace: target.namespace().to_owned(),
        name: target.name.clone().unwrap_or_default(),
        ..record
    };
    // A list or watch pinned to one name by `fieldSelector=metadata.name=` is authorized as a
    // request for that name, as the real server's RequestInfo resolves it.
    if record.name.is_empty()
        && matches!(verb, "list" | "watch")
        && let Ok((_, fields)) = selectors(call, &target.t)
        && let Some(name) = fields.name()
    {
        record.name = name.to_owned();
    }
    let result = match verb {
        "watch" => return (crate::watch::start(state, call, &target).await, record),
        "get" => {
            let store = lock(&state.store);
            let columns = table::columns(&target.t, store.crd(&target.t));
            store
                .get(
                    &target.t,
                    target.namespace(),
                    target.name.as_deref().unwrap_or_default(),
                )
                .map(|o| (200, respond_object(call, &target, o, &columns)))
        }
        "list" => list(state, call, &target).map(|v| (200, v)),
        "create" => create(state, call, &target).map(|v| (201, v)),
        "update" => update(state, call, &target).map(|v| (200, v)),
        "patch" => patch(state, call, &target),
        "delete" => delete(state, call, &target).map(|v| (200, v)),
        _ => delete_collection(state, call, &target).map(|v| (200, v)),
    };
    let response = match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    };
    (response, record)
}

/// An object reduced to its metadata, as `PartialObjectMetadata`.
pub(crate) fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// One object, as a table when kubectl asks for one, or only its metadata.
fn respond_object(call: &Call, target: &Target, obj: Value, columns: &[table::Column]) -> Value {
    let obj = target.present(obj);
    if call.metadata_only() {
        return partial(&obj);
    }
    if call.wants_table() {
        let rv = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion")});
        table::table(
            &[obj],
            rv,
            call.param("includeObject").unwrap_or("Metadata"),
            columns,
        )
    } else {
        obj
    }
}

pub(crate) fn selectors(
    call: &Call,
    t: &ResourceType,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(
        call.param("fieldSelector").unwrap_or_default(),
        t.field_labels(),
    )
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// Encodes a continue token: the list's version and the last key served, hex-encoded.
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    format!("{rv}\0{namespace}\0{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.split('\0');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_owned(), parts.next()?.to_owned()))
}

/// A list, paginated with `limit` and `continue` as the real server does.
fn list(state: &Arc<State>, call: &Call, target: &Target) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(call, &target.t)?;
    let limit: usize = call
        .param("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let store = lock(&state.store);
    let (rv, after) = match call.param("continue") {
        Some(token) => {
            let (rv, ns, name) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if rv < store.oldest() {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns, name)))
        }
        None => (store.resource_version(), None),
    };
    let mut items = Vec::new();
    let mut remaining = 0usize;
    for obj in store
        .range_at(&target.t, target.namespace.as_deref(), after.as_ref(), rv)
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
    {
        if limit == 0 || items.len() < limit {
            items.push(target.present(obj.into_owned()));
        } else {
            remaining += 1;
        }
    }
    let columns = table::columns(&target.t, store.crd(&target.t));
    drop(store);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0 {
        let (ns, name) = items.last().map(object_key).unwrap_or_default();
        metadata["continue"] = json!(encode_continue(rv, &ns, &name));
        metadata["remainingItemCount"] = json!(remaining);
    }
    if call.metadata_only() {
        return Ok(json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "items": items.iter().map(partial).collect::<Vec<_>>(),
        }));
    }
    if call.wants_table() {
        return Ok(table::table(
            &items,
            metadata,
            call.param("includeObject").unwrap_or("Metadata"),
            &columns,
        ));
    }
    Ok(json!({
        "kind": format!("{}List", target.t.kind),
        "apiVersion": target.t.api_version(&target.version),
        "metadata": metadata,
        "items": items,
    }))
}

fn create(state: &Arc<State>, call: &Call, target: &Target) -> Result<Value, ApiError> {
    if target.subresource.is_some() {
        return Err(ApiError::method_not_allowed("POST"));
    }
    if target.t.namespaced && target.namespace.is_none() {
        return Err(ApiError::no_route(&call.path));
    }
    let body = call.body_value()?;
    lock(&state.store)
        .create(
            &target.t,
            target.namespace.as_deref(),
            body,
            call.write_options(),
        )
        .map(|o| target.present(o))
}

fn update(state: &Arc<State>, call: &Call, target: &Target) -> Result<Value, ApiError> {
    let body = call.body_value()?;
    lock(&state.store)
        .update(
            &target.t,
            target.namespace(),
            target.name.as_deref().unwrap_or_default(),
            body,
            target.subresource.as_deref(),
            call.write_options(),
        )
        .map(|o| target.present(o))
}

fn patch(state: &Arc<State>, call: &Call, target: &Target) -> Result<(u16, Value), ApiError> {
    let kind = PatchKind::from_content_type(&call.content_type)
        .ok_or_else(|| ApiError::unsupported_media_type(&call.content_type))?;
    let body: Value = match kind {
        PatchKind::Apply => {
            if call.param("fieldManager").is_none() {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            serde_yaml::from_slice(&call.body)
                .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?
        }
        _ => serde_json::from_slice(&call.body)
            .map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?,
    };
    let name = target.name.as_deref().unwrap_or_default();
    let mut store = lock(&state.store);
    let existed = store.get(&target.t, target.namespace(), name).is_ok();
    let obj = store.patch(
        &target.t,
        target.namespace(),
        name,
        kind,
        &body,
        target.subresource.as_deref(),
        call.write_options(),
    )?;
    Ok((if existed { 200 } else { 201 }, target.present(obj)))
}

/// `DeleteOptions` from the body (or none).
fn delete_options(call: &Call) -> Result<Value, ApiError> {
    call.body_value()
}

fn delete(state: &Arc<State>, call: &Call, target: &Target) -> Result<Value, ApiError> {
    if target.subresource.is_some() {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    let options = delete_options(call)?;
    let dry_run = call.dry_run()
        || options
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    lock(&state.store)
        .delete(
            &target.t,
            target.namespace(),
            target.name.as_deref().unwrap_or_default(),
            options.get("preconditions"),
            dry_run,
        )
        .map(|o| target.present(o))
}

fn delete_collection(state: &Arc<State>, call: &Call, target: &Target) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(call, &target.t)?;
    let mut store = lock(&state.store);
    let mut deleted = Vec::new();
    for obj in store.list(&target.t, target.namespace.as_deref()) {
        if labels.matches(&obj) && fields.matches(&obj) {
            let (ns, name) = object_key(&obj);
            deleted.push(target.present(store.delete(
                &target.t,
                &ns,
                &name,
                None,
                call.dry_run(),
            )?));
        }
    }
    Ok(json!({
        "kind": format!("{}List", target.t.kind),
        "apiVersion": target.t.api_version(&target.version),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": deleted,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::object_rv;

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "shop", "web-1");
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            decode_continue(&token),
            Some((42, "shop".to_owned(), "web-1".to_owned()))
        );
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn object_rv_reads_the_version() {
        assert_eq!(
            object_rv(&json!({"metadata": {"resourceVersion": "17"}})),
            17
        );
    }
}
