//! The objects, as JSON, under one global resourceVersion counter (as etcd's revision), with
//! the history of changes watches replay from and the server-set metadata of each write.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::{
    patch::{self, PatchKind},
    resource::{self, ResourceType},
    schema,
    status::ApiError,
};

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The watch event `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    /// The resourceVersion the change was written at.
    pub rv: u64,
    /// API group of the object.
    pub group: String,
    /// Plural resource name of the object.
    pub plural: String,
    /// What happened.
    pub event_type: EventType,
    /// The object after the change (before it, for a deletion, with the deletion's version).
    pub object: Value,
    /// The object before the change, so a filtered watch can tell an object that stopped
    /// matching its selector (sent as DELETED) from one that started (ADDED).
    pub old: Option<Value>,
}

type ObjectKey = (String, String);

/// How a write is made, from the request's query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions<'a> {
    /// `dryRun=All`: checked and answered, not stored.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: a custom resource with fields its schema does not know is
    /// refused instead of pruned.
    pub strict: bool,
    /// `fieldManager`: whose applied configuration a server-side apply replaces.
    pub field_manager: Option<&'a str>,
}

/// (group, plural, namespace, name, field manager and subresource) of an applied
/// configuration.
type AppliedKey = (String, String, String, String, String);

/// The in-memory "etcd".
pub struct Store {
    rv: u64,
    /// Every event with a version above this one is in `history`; a watch from an older
    /// version gets 410 Gone.
    oldest: u64,
    types: Vec<ResourceType>,
    types_generation: u64,
    objects: HashMap<(String, String), BTreeMap<ObjectKey, Value>>,
    history: VecDeque<Arc<WatchEvent>>,
    history_limit: usize,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// The last configuration each field manager applied to each object.
    applied: HashMap<AppliedKey, Value>,
    next_ip: u32,
    random: std::hash::RandomState,
    ids: u64,
}

/// `metadata` of an object, created when missing.
fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Just made an object above.
        _ => unreachable!("metadata is an object"),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The store key of an object: (namespace, name).
pub fn object_key(obj: &Value) -> ObjectKey {
    let field = |f: &str| meta_str(obj, f).unwrap_or_default().to_owned();
    (field("namespace"), field("name"))
}

/// The object's resourceVersion as a number.
pub fn object_rv(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The current time as the API writes timestamps (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_rfc3339(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for any date after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` back to seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// The object without `metadata` (and without `status` for kinds with the subresource): a
/// change here bumps `metadata.generation`.
fn generation_part(t: &ResourceType, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        if t.status {
            m.remove("status");
        }
    }
    v
}

impl Store {
    /// A store with the namespaces every cluster has.
    pub fn new(history_limit: usize, events: broadcast::Sender<Arc<WatchEvent>>) -> Self {
        let mut store = Self {
            rv: 0,
            oldest: 0,
            types: resource::builtins(),
            types_generation: 1,
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            events,
            applied: HashMap::new(),
            next_ip: 1,
            random: std::hash::RandomState::new(),
            ids: 0,
        };
        let namespaces = store.types[0].clone();
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"metadata": {"name": ns}});
            // A fresh store holds none of these names, so creation cannot fail.
            let _ = store.create(&namespaces, None, obj, WriteOptions::default());
        }
        store
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch may start from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// Served types.
    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    /// Bumped whenever a CRD adds, changes or removes a type (the OpenAPI hash).
    pub fn types_generation(&self) -> u64 {
        self.types_generation
    }

    /// The type served at `group/version` as `plural`.
    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| {
                t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
            })
            .cloned()
    }

    fn random_u64(&mut self) -> u64 {
        self.ids += 1;
        let mut h = self.random.build_hasher();
        h.write_u64(self.ids);
        h.finish()
    }

    fn uid(&mut self) -> String {
        let (a, b) = (self.random_u64(), self.random_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    /// Drops the history: a watch from any version before the current one gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
    }

    /// The events after `rv`, or 410 when the history no longer reaches back that far.
    pub fn history_since(&self, rv: u64) -> Result<Vec<Arc<WatchEvent>>, ApiError> {
        if rv < self.oldest {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.oldest
            )));
        }
        Ok(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Subscribes to future events; call while holding the store so none slips between a
    /// watch's replay and its subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    fn bucket(&self, t: &ResourceType) -> Option<&BTreeMap<ObjectKey, Value>> {
        self.objects.get(&(t.group.clone(), t.plural.clone()))
    }

    /// One object.
    pub fn get(&self, t: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.bucket(t)
            .and_then(|b| b.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(t, name))
    }

    /// Objects of a type in key order (namespace, name), as etcd lists them, in one
    /// namespace or all.
    pub fn list(&self, t: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
        self.bucket(t)
            .map(|b| {
                b.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Objects of a type after `after` in key order, in one namespace or all, without
    /// copying them (a paginated list of 10,000 pods reads one page's worth).
    pub fn range<'a>(
        &'a self,
        t: &ResourceType,
        namespace: Option<&'a str>,
        after: Option<&ObjectKey>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let start = match after {
            Some(key) => std::ops::Bound::Excluded(key.clone()),
            None => std::ops::Bound::Unbounded,
        };
        self.bucket(t)
            .into_iter()
            .flat_map(move |b| b.range((start.clone(), std::ops::Bound::Unbounded)))
            .filter(move |((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v)
    }

    /// Like [`Self::range`], but as the objects stood at version `rv`: changes since are rolled
    /// back from the history, so the pages of one list show one snapshot, as etcd serves
    /// them. The caller makes sure the history reaches back to `rv`.
    pub fn range_at<'a>(
        &'a self,
        t: &ResourceType,
        namespace: Option<&'a str>,
        after: Option<&ObjectKey>,
        rv: u64,
    ) -> Vec<Cow<'a, Value>> {
        let mut rolled_back: BTreeMap<ObjectKey, Option<Value>> = BTreeMap::new();
        for event in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if event.group == t.group && event.plural == t.plural {
                let before = match event.event_type {
                    EventType::Added => None,
                    EventType::Modified | EventType::Deleted => event.old.clone(),
                };
                rolled_back.insert(object_key(&event.object), before);
            }
        }
        if rolled_back.is_empty() {
            return self.range(t, namespace, after).map(Cow::Borrowed).collect();
        }
        let mut view: BTreeMap<ObjectKey, Cow<'a, Value>> = self
            .range(t, namespace, after)
            .map(|v| (object_key(v), Cow::Borrowed(v)))
            .collect();
        for (key, before) in rolled_back {
            if after.is_some_and(|a| key <= *a) || namespace.is_some_and(|n| n != key.0) {
                continue;
            }
            match before {
                Some(v) => view.insert(key, Cow::Owned(v)),
                None => view.remove(&key),
            };
        }
        view.into_values().collect()
    }

    /// Records a change: bumps the version, stores or removes the object, keeps the event
    /// for watches and broadcasts it.
    fn commit(
        &mut self,
        t: &ResourceType,
        key: ObjectKey,
        event_type: EventType,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        meta(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let bucket = self
            .objects
            .entry((t.group.clone(), t.plural.clone()))
            .or_default();
        // The stored object before the change: watches compare it with their selectors, and
        // a continued list rolls back to it.
        let old = if event_type == EventType::Deleted {
            bucket.remove(&key)
        } else {
            bucket.insert(key, object.clone())
        };
        let event = Arc::new(WatchEvent {
            rv: self.rv,
            group: t.group.clone(),
            plural: t.plural.clone(),
            event_type,
            object: object.clone(),
            old,
        });
        self.history.push_back(Arc::clone(&event));
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.rv;
            }
        }
        // No receiver is not an error: nobody watches.
        let _ = self.events.send(event);
        object
    }

    fn namespace_for(
        &self,
        t: &ResourceType,
        url_namespace: Option<&str>,
        obj: &Value,
    ) -> Result<String, ApiError> {
        if !t.namespaced {
            return Ok(String::new());
        }
        let body = meta_str(obj, "namespace").filter(|n| !n.is_empty());
        let ns = match (url_namespace, body) {
            (Some(u), Some(b)) if u != b => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(u), _) => u,
            (None, Some(b)) => b,
            (None, None) => "default",
        };
        Ok(ns.to_owned())
    }

    /// Creates an object, as POST does.
    pub fn create(
        &mut self,
        t: &ResourceType,
        url_namespace: Option<&str>,
        mut obj: Value,
        opts: WriteOptions<'_>,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        }
        obj["kind"] = json!(t.kind);
        obj["apiVersion"] = json!(t.api_version(t.storage_version()));
        let namespace = self.namespace_for(t, url_namespace, &obj)?;
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => match meta_str(&obj, "generateName") {
                Some(prefix) => {
                    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                    let mut r = self.random_u64();
                    let mut name = prefix.to_owned();
                    for _ in 0..5 {
                        name.push(char::from(ALPHABET[(r % 27) as usize]));
                        r /= 27;
                    }
                    name
                }
                None => {
                    return Err(ApiError::invalid(
                        t,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if t.namespaced
            && !self
                .objects
                .get(&(String::new(), "namespaces".to_owned()))
                .is_some_and(|b| b.contains_key(&(String::new(), namespace.clone())))
        {
            return Err(ApiError::namespace_not_found(&namespace));
        }
        let key = (namespace.clone(), name.clone());
        if self.bucket(t).is_some_and(|b| b.contains_key(&key)) {
            return Err(ApiError::already_exists(t, &name));
        }
        if t.status
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        let uid = self.uid();
        let m = meta(&mut obj);
        m.insert("name".into(), json!(name));
        if t.namespaced {
            m.insert("namespace".into(), json!(namespace));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("resourceVersion");
        m.remove("selfLink");
        let declared = self.apply_defaults(t, &mut obj)?;
        self.check_custom(t, &name, &mut obj, opts)?;
        if opts.dry_run {
            return Ok(obj);
        }
        if let Some(declared) = declared {
            self.register(declared);
        }
        Ok(self.commit(t, key, EventType::Added, obj))
    }

    /// Fields the real server fills in on create; for a CRD, the type it declares.
    fn apply_defaults(
        &mut self,
        t: &ResourceType,
        obj: &mut Value,
    ) -> Result<Option<ResourceType>, ApiError> {
        let name = meta_str(obj, "name").unwrap_or_default().to_owned();
        match (t.group.as_str(), t.plural.as_str()) {
            ("", "namespaces") => {
                let m = meta(obj);
                if !m.get("labels").is_some_and(Value::is_object) {
                    m.insert("labels".into(), json!({}));
                }
                m["labels"]["kubernetes.io/metadata.name"] = json!(name);
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
            ("", "pods") => {
                obj["status"] = json!({"phase": "Pending"});
            }
            ("", "services") => self.default_service(t, obj)?,
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let declared =
                    resource::from_crd(obj).map_err(|m| ApiError::invalid(t, &name, &m))?;
                if let Some(other) = self
                    .types
                    .iter()
                    .find(|o| o.group == declared.group && o.plural == declared.plural && !o.custom)
                {
                    return Err(ApiError::invalid(
                        t,
                        &name,
                        &format!(
                            "spec.names.plural: Invalid value: {:?}: built in",
                            other.plural
                        ),
                    ));
                }
                obj["status"] = json!({
                    "acceptedNames": obj.pointer("/spec/names").cloned().unwrap_or(json!({})),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now_rfc3339()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now_rfc3339()},
                    ],
                    "storedVersions": [declared.storage_version()],
                });
                return Ok(Some(declared));
            }
            _ => {}
        }
        Ok(None)
    }

    /// A ClusterIP from 10.96.0.0/16 unless one is given (or the Service is headless or an
    /// ExternalName), and the port defaults. A given ClusterIP another Service holds is
    /// refused, as the real allocator refuses it.
    fn default_service(&mut self, t: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
        if !obj.get("spec").is_some_and(Value::is_object) {
            obj["spec"] = json!({});
        }
        let used: Vec<String> = self
            .bucket(t)
            .map(|b| {
                b.values()
                    .filter_map(|s| s.pointer("/spec/clusterIP").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let name = meta_str(obj, "name").unwrap_or_default().to_owned();
        let spec = &mut obj["spec"];
        let kind = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_owned();
        spec["type"] = json!(kind);
        if kind != "ExternalName" {
            let ip = match spec.get("clusterIP").and_then(Value::as_str) {
                Some("None") => "None".to_owned(),
                Some(ip) if !ip.is_empty() => {
                    if used.iter().any(|u| u == ip) {
                        return Err(ApiError::invalid(
                            t,
                            &name,
                            &format!(
                                "spec.clusterIPs: Invalid value: [\"{ip}\"]: failed to allocate IP {ip}: provided IP is already allocated"
                            ),
                        ));
                    }
                    ip.to_owned()
                }
                _ => loop {
                    let n = self.next_ip;
                    self.next_ip = self.next_ip % 65_533 + 1;
                    let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
                    if !used.contains(&ip) {
                        break ip;
                    }
                },
            };
            spec["clusterIP"] = json!(ip);
            if !spec.get("clusterIPs").is_some_and(Value::is_array) {
                spec["clusterIPs"] = json!([ip]);
            }
        }
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            // Items that are not objects are left for the client to see as stored.
            for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                port.entry("protocol").or_insert_with(|| json!("TCP"));
                if !port.contains_key("targetPort")
                    && let Some(p) = port.get("port").cloned()
                {
                    port.insert("targetPort".into(), p);
                }
            }
        }
        obj["status"] = json!({"loadBalancer": {}});
        Ok(())
    }

    /// The CustomResourceDefinition that declares a custom type.
    pub fn crd(&self, t: &ResourceType) -> Option<&Value> {
        if !t.custom {
            return None;
        }
        self.objects
            .get(&(
                "apiextensions.k8s.io".to_owned(),
                "customresourcedefinitions".to_owned(),
            ))
            .and_then(|b| b.get(&(String::new(), format!("{}.{}", t.plural, t.group))))
    }

    /// Applies the CRD's schema to a custom resource: prune (or refuse, under
    /// `fieldValidation=Strict`) unknown fields, fill in defaults, validate.
    fn check_custom(
        &self,
        t: &ResourceType,
        name: &str,
        obj: &mut Value,
        opts: WriteOptions<'_>,
    ) -> Result<(), ApiError> {
        if !t.custom {
            return Ok(());
        }
        let crd_name = format!("{}.{}", t.plural, t.group);
        let schema = self
            .objects
            .get(&(
                "apiextensions.k8s.io".to_owned(),
                "customresourcedefinitions".to_owned(),
            ))
            .and_then(|b| b.get(&(String::new(), crd_name)))
            .and_then(|crd| crd.pointer("/spec/versions"))
            .and_then(Value::as_array)
            .and_then(|versions| {
                versions
                    .iter()
                    .find(|v| v.get("name").and_then(Value::as_str) == Some(t.storage_version()))
            })
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"));
        let Some(schema) = schema else {
            return Ok(());
        };
        let outcome = schema::apply(schema, obj);
        if opts.strict && !outcome.pruned.is_empty() {
            let fields: Vec<String> = outcome
                .pruned
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                fields.join(", "),
                kind = t.kind,
                version = t.storage_version(),
            )));
        }
        if outcome.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_fields(t, name, &outcome.errors))
        }
    }

    fn register(&mut self, declared: ResourceType) {
        self.types
            .retain(|o| !(o.custom && o.group == declared.group && o.plural == declared.plural));
        self.types.push(declared);
        self.types_generation += 1;
    }

    /// Replaces an object, as PUT does (on the main resource or its `status`).
    pub fn update(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        opts: WriteOptions<'_>,
    ) -> Result<Value, ApiError> {
        let old = self.get(t, namespace, name)?;
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        }
        if let Some(body_name) = meta_str(&obj, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta_str(&obj, "resourceVersion")
            && !rv.is_empty()
            && rv != meta_str(&old, "resourceVersion").unwrap_or_default()
        {
            return Err(ApiError::stale(t, name));
        }
        if let Some(uid) = meta_str(&obj, "uid")
            && !uid.is_empty()
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                t,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        let new = self.merge_subresource(t, &old, obj, subresource);
        self.write(t, namespace, name, old, new, opts)
    }

    /// The object a write to `subresource` (or to the main resource) makes of `old`.
    fn merge_subresource(
        &self,
        t: &ResourceType,
        old: &Value,
        mut new: Value,
        subresource: Option<&str>,
    ) -> Value {
        match subresource {
            Some(_) => {
                let mut merged = old.clone();
                match new.get("status") {
                    Some(s) => merged["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut merged {
                            m.remove("status");
                        }
                    }
                }
                merged
            }
            None => {
                if t.status
                    && let Value::Object(m) = &mut new
                {
                    match old.get("status") {
                        Some(s) => {
                            m.insert("status".into(), s.clone());
                        }
                        None => {
                            m.remove("status");
                        }
                    }
                }
                new
            }
        }
    }

    /// Stores `new` over `old`, keeping the server-owned metadata and bumping the generation
    /// when the spec changed; an unchanged object is not written (no new version), and an
    /// object being deleted goes once its last finalizer is removed.
    fn write(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        old: Value,
        mut new: Value,
        opts: WriteOptions<'_>,
    ) -> Result<Value, ApiError> {
        new["kind"] = json!(t.kind);
        new["apiVersion"] = json!(t.api_version(t.storage_version()));
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        let m = meta(&mut new);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(field) {
                Some(v) => {
                    m.insert(field.into(), v.clone());
                }
                None => {
                    m.remove(field);
                }
            }
        }
        if generation_part(t, &old) != generation_part(t, &new) {
            let generation = old_meta
                .get("generation")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                + 1;
            meta(&mut new).insert("generation".into(), json!(generation));
        }
        let declared =
            if t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions" {
                Some(resource::from_crd(&new).map_err(|m| ApiError::invalid(t, name, &m))?)
            } else {
                None
            };
        self.check_custom(t, name, &mut new, opts)?;
        if new == old || opts.dry_run {
            return Ok(new);
        }
        let finalizing = new.pointer("/metadata/deletionTimestamp").is_some()
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        if let Some(declared) = declared {
            self.register(declared);
        }
        let key = (namespace.to_owned(), name.to_owned());
        if finalizing {
            return Ok(self.remove(t, key, new));
        }
        Ok(self.commit(t, key, EventType::Modified, new))
    }

    /// Patches an object, as PATCH does; server-side apply creates a missing one.
    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per part of the PATCH request"
    )]
    pub fn patch(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        subresource: Option<&str>,
        opts: WriteOptions<'_>,
    ) -> Result<Value, ApiError> {
        let applied_key = (
            t.group.clone(),
            t.plural.clone(),
            namespace.to_owned(),
            name.to_owned(),
            format!(
                "{}/{}",
                opts.field_manager.unwrap_or_default(),
                subresource.unwrap_or_default()
            ),
        );
        let old = match self.get(t, namespace, name) {
            Ok(old) => old,
            Err(e) if kind == PatchKind::Apply && subresource.is_none() => {
                let mut obj = body.clone();
                if !obj.is_object() {
                    return Err(e);
                }
                meta(&mut obj).insert("name".into(), json!(name));
                let ns = t.namespaced.then_some(namespace);
                let created = self.create(t, ns, obj, opts)?;
                if !opts.dry_run {
                    self.applied.insert(applied_key, body.clone());
                }
                return Ok(created);
            }
            Err(e) => return Err(e),
        };
        if kind == PatchKind::Strategic && t.custom {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json (not supported for custom resources)",
            ));
        }
        let mut doc = old.clone();
        let result = match kind {
            PatchKind::Merge => {
                patch::merge(&mut doc, body);
                Ok(())
            }
            PatchKind::Json => patch::json_patch(&mut doc, body),
            PatchKind::Strategic => patch::strategic(&mut doc, body, &t.kind),
            PatchKind::Apply => patch::apply(
                &mut doc,
                body,
                self.applied.get(&applied_key),
                &t.kind,
                t.custom,
            ),
        };
        result.map_err(|m| ApiError::invalid(t, name, &m))?;
        if !doc.is_object() {
            return Err(ApiError::bad_request("the patch does not leave an object"));
        }
        // A patch that sets the resourceVersion makes it a precondition, as on the real
        // server.
        if meta_str(&doc, "resourceVersion") != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(t, name));
        }
        if meta_str(&doc, "name") != Some(name) {
            return Err(ApiError::bad_request(
                "metadata.name cannot be changed by a patch",
            ));
        }
        let new = self.merge_subresource(t, &old, doc, subresource);
        let written = self.write(t, namespace, name, old, new, opts)?;
        if kind == PatchKind::Apply && !opts.dry_run {
            self.applied.insert(applied_key, body.clone());
        }
        Ok(written)
    }

    /// Removes an object for good, with its contents (a namespace's objects, a CRD's
    /// custom resources and its type).
    fn remove(&mut self, t: &ResourceType, key: ObjectKey, object: Value) -> Value {
        self.applied.retain(|(group, plural, ns, name, _), _| {
            !(*group == t.group && *plural == t.plural && *ns == key.0 && *name == key.1)
        });
        if t.group.is_empty() && t.plural == "namespaces" {
            let namespaced: Vec<ResourceType> = self
                .types
                .iter()
                .filter(|t| t.namespaced)
                .cloned()
                .collect();
            for inner in namespaced {
                for obj in self.list(&inner, Some(&key.1)) {
                    let name = meta_str(&obj, "name").unwrap_or_default().to_owned();
                    self.commit(&inner, (key.1.clone(), name), EventType::Deleted, obj);
                }
            }
        }
        if t.group == "apiextensions.k8s.io"
            && t.plural == "customresourcedefinitions"
            && let Ok(declared) = resource::from_crd(&object)
        {
            if let Some(served) = self
                .types
                .iter()
                .find(|o| o.custom && o.group == declared.group && o.plural == declared.plural)
                .cloned()
            {
                for obj in self.list(&served, None) {
                    let ns = meta_str(&obj, "namespace").unwrap_or_default().to_owned();
                    let name = meta_str(&obj, "name").unwrap_or_default().to_owned();
                    self.commit(&served, (ns, name), EventType::Deleted, obj);
                }
            }
            self.types.retain(|o| {
                !(o.custom && o.group == declared.group && o.plural == declared.plural)
            });
            self.types_generation += 1;
        }
        self.commit(t, key, EventType::Deleted, object)
    }

    /// Deletes an object, as DELETE does: preconditions (`uid`, `resourceVersion`) are
    /// checked; an object with finalizers only gets its `deletionTimestamp`.
    pub fn delete(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        preconditions: Option<&Value>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let old = self.get(t, namespace, name)?;
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = preconditions
                .and_then(|p| p.get(field))
                .and_then(Value::as_str)
                && Some(want) != meta_str(&old, field)
            {
                return Err(ApiError::conflict(
                    t,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {want}, {label} in object meta: {}",
                        meta_str(&old, field).unwrap_or_default()
                    ),
                ));
            }
        }
        if dry_run {
            return Ok(old);
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let key = (namespace.to_owned(), name.to_owned());
        if has_finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            let m = meta(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            return Ok(self.commit(t, key, EventType::Modified, new));
        }
        Ok(self.remove(t, key, old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WriteOptions<'static> = WriteOptions {
        dry_run: false,
        strict: false,
        field_manager: None,
    };

    fn store() -> Store {
        Store::new(1000, broadcast::channel(16).0)
    }

    fn ty(store: &Store, group: &str, plural: &str) -> ResourceType {
        store
            .types()
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
            .expect("built-in type")
    }

    #[test]
    fn every_write_takes_the_next_global_version() {
        let mut s = store();
        let pods = ty(&s, "", "pods");
        let leases = ty(&s, "coordination.k8s.io", "leases");
        let start = s.resource_version();
        let a = s
            .create(
                &pods,
                Some("default"),
                json!({"metadata": {"name": "a"}}),
                W,
            )
            .expect("create");
        let b = s
            .create(
                &leases,
                Some("default"),
                json!({"metadata": {"name": "l"}}),
                W,
            )
            .expect("create");
        assert_eq!(object_rv(&a), start + 1);
        assert_eq!(object_rv(&b), start + 2);
        assert_eq!(a["metadata"]["namespace"], "default");
        assert_eq!(a["metadata"]["generation"], 1);
        assert!(a["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        let err = s
            .create(
                &pods,
                Some("default"),
                json!({"metadata": {"name": "a"}}),
                W,
            )
            .expect_err("exists");
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        let err = s
            .create(&pods, Some("nope"), json!({"metadata": {"name": "a"}}), W)
            .expect_err("no namespace");
        assert_eq!((err.code, err.reason), (404, "NotFound"));
    }

    #[test]
    fn stale_update_conflicts_and_noop_keeps_version() {
        let mut s = store();
        let pods = ty(&s, "", "pods");
        let a = s
            .create(
                &pods,
                Some("default"),
                json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
                W,
            )
            .expect("create");
        let mut changed = a.clone();
        changed["spec"]["x"] = json!(2);
        let b = s
            .update(&pods, "default", "a", changed.clone(), None, W)
            .expect("update");
        assert_eq!(object_rv(&b), object_rv(&a) + 1);
        assert_eq!(b["metadata"]["generation"], 2);
        // `changed` still carries a's version: stale.
        let err = s
            .update(&pods, "default", "a", changed, None, W)
            .expect_err("stale");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let same = s
            .update(&pods, "default", "a", b.clone(), None, W)
            .expect("no-op");
        assert_eq!(object_rv(&same), object_rv(&b));
    }

    #[test]
    fn status_subresource_splits_writes_and_generation() {
        let mut s = store();
        let pods = ty(&s, "", "pods");
        let a = s
            .create(
                &pods,
                Some("default"),
                json!({"metadata": {"name": "a"}, "spec": {"x": 1},
                                                    "status": {"podIP": "10.0.0.1"}}),
                W,
            )
            .expect("create");
        // Create drops the status, as for real pods.
        assert_eq!(a["status"], json!({"phase": "Pending"}));
        let mut st = a.clone();
        st["status"] = json!({"podIP": "10.0.0.2"});
        st["spec"]["x"] = json!(99);
        let b = s
            .update(&pods, "default", "a", st, Some("status"), W)
            .expect("status");
        assert_eq!(b["status"]["podIP"], "10.0.0.2");
        assert_eq!(b["spec"]["x"], 1, "status write changed the spec");
        assert_eq!(
            b["metadata"]["generation"], 1,
            "status write bumped the generation"
        );
        let mut main = b.clone();
        main["status"] = json!({"podIP": "1.1.1.1"});
        main["metadata"]["labels"] = json!({"a": "b"});
        let c = s
            .update(&pods, "default", "a", main, None, W)
            .expect("update");
        assert_eq!(
            c["status"]["podIP"], "10.0.0.2",
            "main write changed the status"
        );
        assert_eq!(
            c["metadata"]["generation"], 1,
            "metadata change bumped the generation"
        );
        assert!(object_rv(&c) > object_rv(&b));
    }

    #[test]
    fn history_and_compaction() {
        let mut s = store();
        let pods = ty(&s, "", "pods");
        let v0 = s.resource_version();
        s.create(
            &pods,
            Some("default"),
            json!({"metadata": {"name": "a"}}),
            W,
        )
        .expect("create");
        s.delete(&pods, "default", "a", None, false)
            .expect("delete");
        let events = s.history_since(v0).expect("history");
        let kinds: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
        assert_eq!(kinds, [EventType::Added, EventType::Deleted]);
        assert_eq!(object_rv(&events[1].object), v0 + 2);
        s.compact();
        let err = s.history_since(v0).expect_err("compacted");
        assert_eq!(err.code, 410);
        assert!(
            s.history_since(s.resource_version())
                .expect("current")
                .is_empty()
        );
    }

    #[test]
    fn history_limit_moves_the_oldest_version() {
        let mut s = Store::new(2, broadcast::channel(16).0);
        let pods = ty(&s, "", "pods");
        let v0 = s.resource_version();
        for name in ["a", "b", "c"] {
            s.create(
                &pods,
                Some("default"),
                json!({"metadata": {"name": name}}),
                W,
            )
            .expect("create");
        }
        assert_eq!(s.history_since(v0).expect_err("trimmed").code, 410);
        assert_eq!(s.history_since(v0 + 1).expect("kept").len(), 2);
    }

    #[test]
    fn delete_preconditions_and_finalizers() {
        let mut s = store();
        let cms = ty(&s, "", "configmaps");
        let a = s
            .create(
                &cms,
                Some("default"),
                json!({"metadata": {"name": "a", "finalizers": ["x/y"]}}),
                W,
            )
            .expect("create");
        let err = s
            .delete(&cms, "default", "a", Some(&json!({"uid": "other"})), false)
            .expect_err("uid precondition");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let pending = s
            .delete(
                &cms,
                "default",
                "a",
                Some(&json!({"uid": a["metadata"]["uid"]})),
                false,
            )
            .expect("delete");
        assert!(pending["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(&cms, "default", "a").is_ok(), "finalizer kept it");
        s.patch(
            &cms,
            "default",
            "a",
            PatchKind::Merge,
            &json!({"metadata": {"finalizers": null}}),
            None,
            W,
        )
        .expect("patch");
        assert_eq!(s.get(&cms, "default", "a").expect_err("gone").code, 404);
    }

    #[test]
    fn services_get_free_cluster_ips() {
        let mut s = store();
        let svc = ty(&s, "", "services");
        let fixed = s
            .create(
                &svc,
                Some("default"),
                json!({"metadata": {"name": "dns"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 53, "protocol": "UDP"}]}}),
                W,
            )
            .expect("create");
        assert_eq!(fixed["spec"]["ports"][0]["targetPort"], 53);
        let auto = s
            .create(
                &svc,
                Some("default"),
                json!({"metadata": {"name": "web"}}),
                W,
            )
            .expect("create");
        assert_eq!(
            auto["spec"]["clusterIP"], "10.96.0.2",
            "skips the address dns holds"
        );
        assert_eq!(auto["spec"]["type"], "ClusterIP");
        let err = s
            .create(
                &svc,
                Some("default"),
                json!({"metadata": {"name": "dup"},
                "spec": {"clusterIP": "10.96.0.2"}}),
                W,
            )
            .expect_err("taken");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        assert!(
            err.message.contains("provided IP is already allocated"),
            "{}",
            err.message
        );
        let headless = s
            .create(
                &svc,
                Some("default"),
                json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}),
                W,
            )
            .expect("create");
        assert_eq!(headless["spec"]["clusterIP"], "None");
    }

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_796_191_541), "2026-12-02T06:05:41Z");
        assert_eq!(parse_rfc3339("2026-12-02T06:05:41Z"), Some(1_796_191_541));
    }
}
