//! Reading policy input: files or directories holding any mix of Namespace, Pod, NetworkPolicy
//! and EgressPolicy documents (multi-document files, and `kind: List` as `kubectl get -o yaml`
//! prints it), read to validated models.
//!
//! Reading is bounded and never blocks: only regular files and directories are read (checked
//! with `stat`, then again with `fstat` on a descriptor opened `O_NONBLOCK`), each file and
//! each directory has a size cap, directory cycles are cut, and the YAML parser runs with depth,
//! node and alias budgets. Each document is decoded strictly (unknown fields are errors, as
//! `kubectl apply` makes them) and validated (`validate.rs`) on its own: one bad object
//! rejects one object. Documents are parsed one at a time, and of each only its validated model
//! is kept (the decoded object and its YAML value are dropped as soon as it is checked), so a
//! load holds the input and one model per object, not several copies of every object.
//! [`PolicyStore`] keeps, across reloads, the last valid version of an object whose new version
//! is rejected, as the API server keeps the stored object when an update is refused.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    hash::{Hash as _, Hasher as _},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;

use super::{
    crd::EgressPolicy,
    model::{EgressPol, Labels, NetPol, ObjectKind, ObjectRef, PodInfo, World},
    validate,
};

/// The API server's default limit on a request body (`MaxRequestBodyBytes`, 3 MiB): no object
/// it accepts is larger, so neither is a file egret reads by default.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 3 * 1024 * 1024;
/// Default cap on all files read under one directory given as a policy path.
pub const DEFAULT_MAX_DIRECTORY_BYTES: u64 = 32 * 1024 * 1024;
/// Nesting of sequences and mappings in one document; Kubernetes objects need about 15.
pub const MAX_YAML_DEPTH: usize = 64;
/// Alias (`*ref`) uses in one document; Kubernetes YAML rarely has any.
pub const MAX_YAML_ALIASES: usize = 1_000;
/// Events an alias may replay in one document: what stops an alias bomb ("billion laughs").
pub const MAX_YAML_REPLAYED_EVENTS: usize = 100_000;
/// Nodes (scalars, sequences, mappings) in one document.
pub const MAX_YAML_NODES: usize = 250_000;
/// Directory levels below a policy path.
pub const MAX_DIRECTORY_DEPTH: usize = 32;

/// Size limits of one read of the policy paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest file read.
    pub max_file_bytes: u64,
    /// Most bytes read under one directory given as a policy path.
    pub max_directory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_directory_bytes: DEFAULT_MAX_DIRECTORY_BYTES,
        }
    }
}

/// Kubernetes objects built in memory, keyed by (namespace, name) or name: what
/// [`World::new`] validates (the synthetic benchmark cluster, the property tests). Files are
/// not read into one: [`load`] and [`PolicyStore`] keep only each object's validated model.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub network_policies: BTreeMap<(String, String), NetworkPolicy>,
    pub egress_policies: BTreeMap<String, EgressPolicy>,
}

/// A document in a file; `item` is the index in a `kind: List`. The path is shared by every
/// document of the file: the store keeps one location per object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub path: Arc<Path>,
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.path.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// One accepted object as the compiler reads it: its validated model, and nothing of the
/// document it came from. Shared: the store keeps it across reloads and every world built
/// from the store points at it.
#[derive(Clone, Debug)]
pub enum Model {
    Namespace(Arc<Labels>),
    Pod(Arc<PodInfo>),
    /// `None`: valid, but not an egress policy (its policyTypes lack Egress); it still holds
    /// its name.
    NetworkPolicy(Option<Arc<NetPol>>),
    EgressPolicy(Arc<EgressPol>),
}

/// A document decoded into its Kubernetes type: alive only until it is validated.
enum Decoded {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    EgressPolicy(Box<EgressPolicy>),
}

/// Something that could not be read or was rejected. Each names the file (and document), the
/// object where there is one, the field, the offending value and the rule.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: failed to read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not read: it is a {file_type}; only regular files and directories are read", path.display())]
    NotRegular {
        path: PathBuf,
        file_type: &'static str,
    },
    #[error("{}: not read: {size} bytes is over the limit of {limit} bytes per file", path.display())]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: not read: the files under {} would exceed the limit of {limit} bytes per directory", path.display(), directory.display())]
    DirectoryTooLarge {
        path: PathBuf,
        directory: PathBuf,
        limit: u64,
    },
    #[error("{}: not read: directory cycle: it is {}, which is already being read", path.display(), ancestor.display())]
    Cycle { path: PathBuf, ancestor: PathBuf },
    #[error("{}: not read: more than {MAX_DIRECTORY_DEPTH} directory levels", path.display())]
    TooDeep { path: PathBuf },
    #[error("{}: not UTF-8: invalid byte at offset {offset}", path.display())]
    Encoding { path: PathBuf, offset: usize },
    #[error("{location}: not valid YAML: {message}")]
    Yaml { location: Location, message: String },
    #[error("{location}: {object}: {field}: {detail}")]
    Decode {
        location: Location,
        /// Kind, namespace and name as far as the document gives them.
        object: String,
        /// The field decoding stopped at.
        field: String,
        detail: String,
    },
    #[error(
        "{location}: unsupported kind `{kind}` (apiVersion `{api_version}`): egret reads v1 Namespace and Pod, networking.k8s.io/v1 NetworkPolicy and egret.dev/v1alpha1 EgressPolicy"
    )]
    UnknownKind {
        location: Location,
        kind: String,
        api_version: String,
    },
    #[error("{location}: {object}: {field}: {message}")]
    Invalid {
        location: Location,
        object: ObjectRef,
        field: String,
        message: String,
    },
    #[error("{location}: {object}: metadata.name: Duplicate value: {:?}: also defined at {other}; neither copy is applied", object.name)]
    Duplicate {
        location: Location,
        object: ObjectRef,
        other: Location,
    },
    #[error("{location}: {object}: metadata.name: Duplicate value: {:?}: {owner} has the same namespace and name; this document is not applied (a workload's labels, addresses and named ports are set in the config)", object.name)]
    Reserved {
        location: Location,
        object: ObjectRef,
        /// Who holds the name, e.g. `workload shop/web of egret.yaml (workloads[0])`.
        owner: String,
    },
}

impl LoadError {
    /// `unreadable` (the file or document could not be read or decoded) or `invalid` (it
    /// decoded but breaks a rule): the `reason` label of the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } | Self::Duplicate { .. } | Self::Reserved { .. } => "invalid",
            _ => "unreadable",
        }
    }

    /// The object it is about, where the document names one.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            Self::Invalid { object, .. }
            | Self::Duplicate { object, .. }
            | Self::Reserved { object, .. } => Some(object),
            _ => None,
        }
    }
}

/// The content of one file, or why it was not read.
#[derive(Debug)]
pub struct FileRead {
    pub path: PathBuf,
    pub content: Result<String, LoadError>,
}

/// Every file under the policy paths, read once: what a load parses and what the poll
/// compares, so an edit between the two cannot be missed.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub files: Vec<FileRead>,
    /// Directories and entries that could not be read.
    pub errors: Vec<LoadError>,
}

impl Snapshot {
    /// Reads every `.yaml`, `.yml` and `.json` file under `paths` (files, or directories
    /// walked in name order, following symlinks but never around a cycle).
    pub fn read(paths: &[PathBuf], limits: Limits) -> Self {
        let mut snapshot = Self::default();
        for path in paths {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => {
                    let mut budget = limits.max_directory_bytes;
                    let mut walk = Walk {
                        top: path,
                        limits,
                        budget: &mut budget,
                        ancestors: Vec::new(),
                        snapshot: &mut snapshot,
                    };
                    walk.directory(path, &meta);
                }
                Ok(_) => {
                    let content = read_file(path, limits.max_file_bytes, None);
                    snapshot.files.push(FileRead {
                        path: path.clone(),
                        content,
                    });
                }
                Err(source) => snapshot.errors.push(LoadError::Read {
                    path: path.clone(),
                    source,
                }),
            }
        }
        snapshot
    }

    /// A hash of every path, content and read error: it changes when a file is added, edited
    /// or removed, readable or not.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for file in &self.files {
            file.path.hash(&mut hasher);
            match &file.content {
                Ok(text) => text.hash(&mut hasher),
                Err(err) => err.to_string().hash(&mut hasher),
            }
        }
        for err in &self.errors {
            err.to_string().hash(&mut hasher);
        }
        hasher.finish()
    }
}

struct Walk<'a> {
    top: &'a Path,
    limits: Limits,
    budget: &'a mut u64,
    /// (device, inode) and path of each directory being read, outermost first.
    ancestors: Vec<((u64, u64), PathBuf)>,
    snapshot: &'a mut Snapshot,
}

fn is_policy_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

impl Walk<'_> {
    fn directory(&mut self, dir: &Path, meta: &std::fs::Metadata) {
        let id = (meta.dev(), meta.ino());
        if let Some((_, ancestor)) = self.ancestors.iter().find(|(a, _)| *a == id) {
            self.snapshot.errors.push(LoadError::Cycle {
                path: dir.into(),
                ancestor: ancestor.clone(),
            });
            return;
        }
        if self.ancestors.len() >= MAX_DIRECTORY_DEPTH {
            self.snapshot
                .errors
                .push(LoadError::TooDeep { path: dir.into() });
            return;
        }
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(source) => {
                self.snapshot.errors.push(LoadError::Read {
                    path: dir.into(),
                    source,
                });
                return;
            }
        };
        entries.sort();
        self.ancestors.push((id, dir.into()));
        for entry in entries {
            // `stat` follows symlinks and never blocks, whatever the file is.
            match std::fs::metadata(&entry) {
                Ok(meta) if meta.is_dir() => self.directory(&entry, &meta),
                Ok(_) if is_policy_file(&entry) => {
                    let content = read_file(
                        &entry,
                        self.limits.max_file_bytes,
                        Some((self.top, self.limits.max_directory_bytes, &mut *self.budget)),
                    );
                    self.snapshot.files.push(FileRead {
                        path: entry,
                        content,
                    });
                }
                Ok(_) => {}
                // A broken name that looks like policy, or a symlink loop whatever its name,
                // is reported; other unreadable entries are not policy.
                Err(source)
                    if is_policy_file(&entry) || source.raw_os_error() == Some(libc::ELOOP) =>
                {
                    self.snapshot.files.push(FileRead {
                        path: entry.clone(),
                        content: Err(LoadError::Read {
                            path: entry,
                            source,
                        }),
                    });
                }
                Err(_) => {}
            }
        }
        self.ancestors.pop();
    }
}

fn file_type_name(file_type: std::fs::FileType) -> Option<&'static str> {
    if file_type.is_file() {
        None
    } else if file_type.is_fifo() {
        Some("FIFO")
    } else if file_type.is_socket() {
        Some("socket")
    } else if file_type.is_char_device() {
        Some("character device")
    } else if file_type.is_block_device() {
        Some("block device")
    } else if file_type.is_dir() {
        Some("directory")
    } else {
        Some("special file")
    }
}

/// Reads one regular file, at most `max` bytes, and at most what is left of its directory's
/// budget. Never blocks: the type is checked before opening (`stat`) and after (`fstat`, in
/// case the name was swapped), and the open is `O_NONBLOCK`.
#[expect(
    clippy::result_large_err,
    reason = "one error per rejected file, never on a hot path; boxing would only add noise"
)]
pub fn read_file(
    path: &Path,
    max: u64,
    directory: Option<(&Path, u64, &mut u64)>,
) -> Result<String, LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if let Some(file_type) = file_type_name(meta.file_type()) {
        return Err(LoadError::NotRegular {
            path: path.into(),
            file_type,
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if let Some(file_type) = file_type_name(meta.file_type()) {
        return Err(LoadError::NotRegular {
            path: path.into(),
            file_type,
        });
    }
    if meta.len() > max {
        return Err(LoadError::FileTooLarge {
            path: path.into(),
            size: meta.len(),
            limit: max,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte past the cap tells a file that grew after `fstat` from one that did not.
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    let size = bytes.len() as u64;
    if size > max {
        return Err(LoadError::FileTooLarge {
            path: path.into(),
            size,
            limit: max,
        });
    }
    if let Some((top, limit, budget)) = directory {
        if size > *budget {
            return Err(LoadError::DirectoryTooLarge {
                path: path.into(),
                directory: top.into(),
                limit,
            });
        }
        *budget -= size;
    }
    String::from_utf8(bytes).map_err(|e| LoadError::Encoding {
        path: path.into(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// One document (or List item) as read: the object it names, if it names one, and its model
/// or why it was rejected.
#[derive(Debug)]
pub struct Parsed {
    pub location: Location,
    pub key: Option<ObjectRef>,
    pub result: Result<Model, LoadError>,
}

/// The documents of a YAML stream, one at a time: `(index, first line, text)`. Split here
/// rather than by the parser, so a syntax error rejects its own document and not the ones
/// after it.
struct Documents<'a> {
    text: &'a str,
    lines: std::iter::Enumerate<std::str::SplitInclusive<'a, char>>,
    /// Start and first line of the document being read.
    start: usize,
    first_line: usize,
    /// Where the next line starts.
    offset: usize,
    /// Whether the document being read was opened by `---` (then it counts even if empty).
    explicit: bool,
    /// Documents returned so far.
    count: usize,
    /// Whether the text after the last separator was looked at.
    done: bool,
}

impl<'a> Documents<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            lines: text.split_inclusive('\n').enumerate(),
            start: 0,
            first_line: 0,
            offset: 0,
            explicit: false,
            count: 0,
            done: false,
        }
    }

    fn found(&mut self, first_line: usize, body: &'a str) -> (usize, usize, &'a str) {
        self.count += 1;
        (self.count - 1, first_line, body)
    }
}

impl<'a> Iterator for Documents<'a> {
    type Item = (usize, usize, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        for (line_no, line) in self.lines.by_ref() {
            let bare = line.trim_end_matches(['\n', '\r']);
            let separator = bare == "---"
                || bare.starts_with("--- ")
                || bare.starts_with("---\t")
                || bare == "...";
            let offset = self.offset;
            self.offset += line.len();
            if !separator {
                continue;
            }
            let body = &self.text[self.start..offset];
            let first_line = self.first_line;
            let counts = self.explicit || has_content(body);
            self.explicit = bare != "...";
            // The separator line may carry content (`--- {a: b}`): keep it in the document,
            // minus the marker.
            self.start = offset + if bare == "..." { line.len() } else { 3 };
            self.first_line = line_no;
            if counts {
                return Some(self.found(first_line, body));
            }
        }
        if self.done {
            return None;
        }
        self.done = true;
        let body = &self.text[self.start..];
        (self.explicit || has_content(body)).then(|| self.found(self.first_line, body))
    }
}

fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
    })
}

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_YAML_DEPTH;
    budget.max_aliases = MAX_YAML_ALIASES;
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_documents = 1;
    budget.max_reader_input_bytes =
        Some(usize::try_from(DEFAULT_MAX_FILE_BYTES).unwrap_or(usize::MAX));
    let mut aliases = serde_saphyr::options::AliasLimits::default();
    aliases.max_total_replayed_events = MAX_YAML_REPLAYED_EVENTS;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits = aliases;
    // YAML 1.2, as Kubernetes reads it: `y`, `yes`, `on` are strings, not booleans.
    options.strict_booleans = true;
    options
}

/// Parses one YAML (or JSON) text into its objects, one document at a time, handing each to
/// `each` as soon as it is validated; `path` only names them.
pub fn parse(path: &Path, text: &str, each: &mut impl FnMut(Parsed)) {
    let path: Arc<Path> = path.into();
    for (index, first_line, body) in Documents::new(text) {
        let location = Location {
            path: Arc::clone(&path),
            document: index,
            item: None,
        };
        let value =
            match serde_saphyr::from_str_with_options::<serde_json::Value>(body, yaml_options()) {
                Ok(serde_json::Value::Null) => continue,
                Ok(value) => value,
                Err(err) => {
                    each(Parsed {
                        location: location.clone(),
                        key: None,
                        result: Err(LoadError::Yaml {
                            location,
                            message: file_line(&one_line(&err.to_string()), first_line),
                        }),
                    });
                    continue;
                }
            };
        let is_list = value.get("kind").and_then(|k| k.as_str()) == Some("List");
        if is_list {
            let items = match value {
                serde_json::Value::Object(mut map) => map.remove("items"),
                _ => None,
            };
            let items = match items {
                Some(serde_json::Value::Array(items)) => items,
                _ => Vec::new(),
            };
            for (i, item) in items.into_iter().enumerate() {
                let location = Location {
                    item: Some(i),
                    ..location.clone()
                };
                each(parse_object(location, item));
            }
        } else {
            each(parse_object(location, value));
        }
    }
}

/// The parser's message on one line, without the snippet of the input it renders below
/// (`--> <input>:4:2 | ...`): the location is already in the message.
fn one_line(message: &str) -> String {
    let message = message.split(" --> ").next().unwrap_or(message);
    let message = message.split("\n -->").next().unwrap_or(message);
    let message = message.split("\n-->").next().unwrap_or(message);
    message
        .trim_start_matches("error: ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The parser counts lines from the start of the document; a person counts them from the
/// start of the file: `line 2 column 7: ...` becomes `line 14 column 7: ...`.
fn file_line(message: &str, first_line: usize) -> String {
    let Some(rest) = message.strip_prefix("line ") else {
        return message.to_owned();
    };
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    match rest[..digits].parse::<usize>() {
        Ok(line) => format!("line {}{}", line + first_line, &rest[digits..]),
        Err(_) => message.to_owned(),
    }
}

fn string_at<'a>(value: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(serde_json::Value::as_str)
}

#[expect(
    clippy::result_large_err,
    reason = "one error per rejected document, never on a hot path; boxing would only add noise"
)]
fn parse_object(location: Location, value: serde_json::Value) -> Parsed {
    let kind = string_at(&value, &["kind"]).unwrap_or_default().to_owned();
    let api_version = string_at(&value, &["apiVersion"])
        .unwrap_or_default()
        .to_owned();
    let object_kind = match kind.as_str() {
        "Namespace" => Some((ObjectKind::Namespace, "v1")),
        "Pod" => Some((ObjectKind::Pod, "v1")),
        "NetworkPolicy" => Some((ObjectKind::NetworkPolicy, "networking.k8s.io/v1")),
        "EgressPolicy" => Some((ObjectKind::EgressPolicy, "egret.dev/v1alpha1")),
        _ => None,
    };
    let name = string_at(&value, &["metadata", "name"]).map(str::to_owned);
    let namespace = string_at(&value, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_owned();
    let namespace = namespace.as_str();
    let key = match (object_kind, &name) {
        (Some((k, _)), Some(name)) => Some(ObjectRef::new(k, namespace, name)),
        _ => None,
    };
    let Some((object_kind, _)) = object_kind.filter(|(_, want)| *want == api_version) else {
        return Parsed {
            key: key.clone(),
            result: Err(LoadError::UnknownKind {
                location: location.clone(),
                kind,
                api_version,
            }),
            location,
        };
    };
    let described = match &key {
        Some(key) => key.to_string(),
        None => format!("{kind} <unnamed>"),
    };
    let mut value = value;
    if let Some(map) = value.as_object_mut() {
        // Checked above; the typed objects need not see them (EgressPolicy's would not know
        // them as fields).
        map.remove("apiVersion");
        map.remove("kind");
    }
    let decode_error = |(field, detail): (String, String)| LoadError::Decode {
        location: location.clone(),
        object: described.clone(),
        field,
        detail,
    };
    let decoded = match object_kind {
        ObjectKind::Namespace => decode::<Namespace>(value).map(|o| Decoded::Namespace(o.into())),
        ObjectKind::Pod => decode::<Pod>(value).map(|o| Decoded::Pod(o.into())),
        ObjectKind::NetworkPolicy => {
            decode::<NetworkPolicy>(value).map(|o| Decoded::NetworkPolicy(o.into()))
        }
        ObjectKind::EgressPolicy => {
            decode::<EgressPolicy>(value).map(|o| Decoded::EgressPolicy(o.into()))
        }
    }
    .map_err(decode_error);
    // The decoded object ends here: only its model (or why it has none) goes on.
    let result = decoded.and_then(|object| {
        let Some(key) = &key else {
            return Err(LoadError::Invalid {
                location: location.clone(),
                object: ObjectRef::new(object_kind, namespace, "<unnamed>"),
                field: "metadata.name".into(),
                message: "Required value: name or generateName is required".into(),
            });
        };
        check(&object, key).map_err(|e| LoadError::Invalid {
            location: location.clone(),
            object: key.clone(),
            field: e.field,
            message: e.message,
        })
    });
    Parsed {
        location,
        key,
        result,
    }
}

/// Validates one object under its key (`validate.rs`, the same checks `World::new` makes) and
/// converts it to its model.
fn check(object: &Decoded, key: &ObjectRef) -> validate::FieldResult<Model> {
    let namespace = key.namespace.as_deref().unwrap_or_default();
    Ok(match object {
        Decoded::Namespace(ns) => Model::Namespace(validate::namespace(&key.name, ns)?.into()),
        Decoded::Pod(pod) => Model::Pod(validate::pod(namespace, &key.name, pod)?.into()),
        Decoded::NetworkPolicy(np) => {
            Model::NetworkPolicy(validate::network_policy(namespace, &key.name, np)?.map(Arc::new))
        }
        Decoded::EgressPolicy(ep) => {
            Model::EgressPolicy(validate::egress_policy(&key.name, ep)?.into())
        }
    })
}

/// Renders a serde_ignored path as a field path: `spec.egress[0].tos`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    match path {
        serde_ignored::Path::Root => String::new(),
        serde_ignored::Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        serde_ignored::Path::Map { parent, key } => {
            let parent = field_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Decodes strictly: a type error names its field, and so does an unknown field (the API
/// server's strict field validation, `kubectl apply`'s default).
fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, (String, String)> {
    let mut unknown: Vec<String> = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
    let result = {
        let de = serde_ignored::Deserializer::new(value, &mut note);
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    };
    match result {
        Err(err) => Err((track.path().to_string(), err.to_string())),
        Ok(_) if !unknown.is_empty() => Err((
            unknown.swap_remove(0),
            "unknown field (strict decoding, as `kubectl apply` validates)".into(),
        )),
        Ok(object) => Ok(object),
    }
}

/// Objects enforced from the files, kept across reloads: an object whose new version is
/// rejected keeps its last valid one; an object whose file is gone goes. Only models are kept.
#[derive(Debug, Default)]
pub struct PolicyStore {
    accepted: BTreeMap<ObjectRef, (Location, Model)>,
}

/// What one load produced; [`PolicyStore::world`] gives what to enforce.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every problem, in file order.
    pub rejected: Vec<LoadError>,
    /// Objects enforced in their last valid version because the new one was rejected (or its
    /// file could not be read), with where that version was read.
    pub kept: Vec<(ObjectRef, Location)>,
}

/// The first document of one load that names an object.
struct First {
    location: Location,
    /// Its model; `None` if it was rejected.
    model: Option<Model>,
}

/// One load in progress: what each object's documents gave so far.
struct Pass<'a> {
    reserved: &'a BTreeMap<ObjectRef, String>,
    seen: BTreeMap<ObjectRef, First>,
    /// Where each later document naming an object in `seen` was read: it and the first are all
    /// duplicates. Apart from `seen`, where every object would carry room for a list.
    again: BTreeMap<ObjectRef, Vec<Location>>,
    rejected: Vec<LoadError>,
    /// Files that could not be read whole: objects last read from them and not seen now are
    /// kept, since the file may still hold them.
    tainted: BTreeSet<PathBuf>,
}

impl<'a> Pass<'a> {
    fn new(reserved: &'a BTreeMap<ObjectRef, String>, rejected: Vec<LoadError>) -> Self {
        Self {
            reserved,
            seen: BTreeMap::new(),
            again: BTreeMap::new(),
            rejected,
            tainted: BTreeSet::new(),
        }
    }

    /// Takes one document as it is parsed. Its problems are recorded now (they are sorted at
    /// the end), so of an object only the model and the places it was read stay.
    fn note(&mut self, parsed: Parsed) {
        let Parsed {
            location,
            key,
            result,
        } = parsed;
        let Some(key) = key else {
            self.tainted.insert(location.path.to_path_buf());
            if let Err(err) = result {
                self.rejected.push(err);
            }
            return;
        };
        // A document that names what another source holds is refused for that alone.
        if let Some(owner) = self.reserved.get(&key) {
            self.rejected.push(LoadError::Reserved {
                location,
                object: key,
                owner: owner.clone(),
            });
            return;
        }
        let model = match result {
            Ok(model) => Some(model),
            Err(err) => {
                self.rejected.push(err);
                None
            }
        };
        match self.seen.entry(key) {
            Entry::Vacant(entry) => {
                entry.insert(First { location, model });
            }
            Entry::Occupied(entry) => self
                .again
                .entry(entry.key().clone())
                .or_default()
                .push(location),
        }
    }
}

impl PolicyStore {
    /// Parses and validates `snapshot` against what is enforced now. `reserved` names objects
    /// another source holds (local workloads are Pods): a document with one of those keys is
    /// rejected. Each file's text is dropped once its documents are models.
    pub fn load(&mut self, snapshot: Snapshot, reserved: &BTreeMap<ObjectRef, String>) -> Outcome {
        let Snapshot { files, errors } = snapshot;
        let mut pass = Pass::new(reserved, errors);
        for FileRead { path, content } in files {
            match content {
                Ok(text) => parse(&path, &text, &mut |parsed| pass.note(parsed)),
                Err(err) => {
                    pass.tainted.insert(path);
                    pass.rejected.push(err);
                }
            }
        }
        self.finish(pass)
    }

    /// Loads one YAML text as the only file; `path` only names it.
    fn load_text(&mut self, path: &Path, text: &str) -> Outcome {
        let none = BTreeMap::new();
        let mut pass = Pass::new(&none, Vec::new());
        parse(path, text, &mut |parsed| pass.note(parsed));
        self.finish(pass)
    }

    /// Decides each object of a finished pass: its new model, its last valid one, or none.
    fn finish(&mut self, pass: Pass<'_>) -> Outcome {
        let Pass {
            reserved,
            seen,
            mut again,
            mut rejected,
            tainted,
        } = pass;
        // Listed in key order (`seen`'s), then packed into the map: one grown an entry at a
        // time keeps its nodes about half full, one built from a sorted list fills them.
        let mut accepted = Vec::with_capacity(seen.len());
        let mut kept = Vec::new();
        let keep = |key: &ObjectRef,
                    accepted: &mut Vec<(ObjectRef, (Location, Model))>,
                    kept: &mut Vec<(ObjectRef, Location)>| {
            if let Some((location, model)) = self.accepted.get(key) {
                accepted.push((key.clone(), (location.clone(), model.clone())));
                kept.push((key.clone(), location.clone()));
            }
        };
        for (key, First { location, model }) in seen {
            if let Some(others) = again.remove(&key) {
                // Each names another: the first the second, every later one the first.
                if let Some(second) = others.first() {
                    rejected.push(LoadError::Duplicate {
                        location: location.clone(),
                        object: key.clone(),
                        other: second.clone(),
                    });
                }
                for other in others {
                    rejected.push(LoadError::Duplicate {
                        location: other,
                        object: key.clone(),
                        other: location.clone(),
                    });
                }
                keep(&key, &mut accepted, &mut kept);
                continue;
            }
            match model {
                Some(model) => accepted.push((key, (location, model))),
                None => keep(&key, &mut accepted, &mut kept),
            }
        }
        let mut still_there = Vec::new();
        for (key, (location, _)) in &self.accepted {
            if tainted.contains(&*location.path)
                && !reserved.contains_key(key)
                && accepted.binary_search_by(|(k, _)| k.cmp(key)).is_err()
            {
                keep(key, &mut still_there, &mut kept);
            }
        }
        accepted.append(&mut still_there);
        self.accepted = accepted.into_iter().collect();
        rejected.sort_by_key(sort_key);
        Outcome { rejected, kept }
    }

    /// The accepted objects as a [`World`], sharing their models.
    pub fn world(&self) -> World {
        self.world_with(Vec::new())
    }

    /// The accepted objects and `pods` (local workloads, Pods no document may name) as a
    /// [`World`], sharing their models.
    pub fn world_with(&self, mut pods: Vec<Arc<PodInfo>>) -> World {
        let mut namespaces = BTreeMap::new();
        let mut network_policies = Vec::new();
        let mut egress_policies = Vec::new();
        for (key, (_, model)) in &self.accepted {
            match model {
                Model::Namespace(labels) => {
                    namespaces.insert(key.name.clone(), Arc::clone(labels));
                }
                Model::Pod(pod) => pods.push(Arc::clone(pod)),
                Model::NetworkPolicy(Some(np)) => network_policies.push(Arc::clone(np)),
                Model::NetworkPolicy(None) => {}
                Model::EgressPolicy(ep) => egress_policies.push(Arc::clone(ep)),
            }
        }
        World::from_validated(
            namespaces,
            pods,
            network_policies,
            egress_policies,
            Vec::new(),
        )
    }
}

/// Messages sort by file and document, so a person reads them in file order.
fn sort_key(err: &LoadError) -> (PathBuf, usize, Option<usize>, String) {
    let location = match err {
        LoadError::Yaml { location, .. }
        | LoadError::Decode { location, .. }
        | LoadError::UnknownKind { location, .. }
        | LoadError::Invalid { location, .. }
        | LoadError::Duplicate { location, .. }
        | LoadError::Reserved { location, .. } => Some(location),
        _ => None,
    };
    match location {
        Some(l) => (l.path.to_path_buf(), l.document, l.item, err.to_string()),
        None => {
            let path = match err {
                LoadError::Read { path, .. }
                | LoadError::NotRegular { path, .. }
                | LoadError::FileTooLarge { path, .. }
                | LoadError::DirectoryTooLarge { path, .. }
                | LoadError::Cycle { path, .. }
                | LoadError::TooDeep { path }
                | LoadError::Encoding { path, .. } => path.clone(),
                _ => PathBuf::new(),
            };
            (path, 0, None, err.to_string())
        }
    }
}

/// Reads and validates every file under `paths` once (no earlier state): what `egret explain`
/// and a first `egret run` load see. Returns what loaded and every problem.
pub fn load(paths: &[PathBuf], limits: Limits) -> (World, Vec<LoadError>) {
    let mut store = PolicyStore::default();
    let outcome = store.load(Snapshot::read(paths, limits), &BTreeMap::new());
    (store.world(), outcome.rejected)
}

/// Reads and validates the documents of one YAML text; `path` only names them in errors.
pub fn load_yaml(path: &Path, text: &str) -> (World, Vec<LoadError>) {
    let mut store = PolicyStore::default();
    let outcome = store.load_text(path, text);
    (store.world(), outcome.rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_multi_document_yaml_and_lists_and_reports_bad_documents() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  status: {podIP: 192.0.2.1}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec:
  podSelector: {}
  egress:
  - ports: [{port: [1, 2]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
"#;
        let (world, errors) = load_yaml(Path::new("cluster.yaml"), text);
        assert_eq!(world.namespaces.len(), 1);
        assert_eq!(world.pods.len(), 1);
        assert!(world.network_policies.is_empty());
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with(
                "cluster.yaml document 2: NetworkPolicy x/broken: spec.egress[0].ports[0].port: "
            ),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].starts_with("cluster.yaml document 3: unsupported kind `Deployment`"),
            "{}",
            messages[1]
        );
    }

    #[test]
    fn a_syntax_error_rejects_only_its_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
        let (world, errors) = load_yaml(Path::new("f.yaml"), text);
        assert_eq!(
            world.namespaces.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "{errors:?}"
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("f.yaml document 1: not valid YAML: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn yaml_errors_give_the_line_in_the_file() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: [Namespace\n";
        let (_, errors) = load_yaml(Path::new("f.yaml"), text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with(
                "f.yaml document 1: not valid YAML: line 6 column 7: unclosed bracket"
            ),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn documents_split_at_separators_keeping_marker_lines_and_explicit_empty_ones() {
        fn split(text: &str) -> Vec<(usize, usize, &str)> {
            Documents::new(text).collect()
        }
        assert_eq!(
            split("a: 1\n---\nb: 2\n...\n--- {c: 3}\n---\n# only comment\n"),
            [
                (0, 0, "a: 1\n"),
                (1, 1, "\nb: 2\n"),
                (2, 4, " {c: 3}\n"),
                (3, 5, "\n# only comment\n"),
            ]
        );
        assert_eq!(split("# header\n\n"), []);
        assert_eq!(split("---\n"), [(0, 0, "\n")]);
    }

    fn namespace_doc(name: &str, team: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n"
        )
    }

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            files: files
                .iter()
                .map(|(path, text)| FileRead {
                    path: PathBuf::from(path),
                    content: Ok((*text).to_owned()),
                })
                .collect(),
            errors: Vec::new(),
        }
    }

    fn team(store: &PolicyStore, ns: &str) -> Option<String> {
        store
            .world()
            .namespace_labels(ns)
            .and_then(|l| l.get("team").cloned())
    }

    #[test]
    fn a_rejected_update_keeps_the_last_valid_version_and_a_removed_file_drops_it() {
        let mut store = PolicyStore::default();
        let none = BTreeMap::new();
        let a = namespace_doc("a", "one");
        let out = store.load(snapshot(&[("a.yaml", &a)]), &none);
        assert!(out.rejected.is_empty());
        assert_eq!(team(&store, "a").as_deref(), Some("one"));

        let bad = namespace_doc("a", "Bad Value!");
        let b = namespace_doc("b", "two");
        let out = store.load(snapshot(&[("a.yaml", &bad), ("b.yaml", &b)]), &none);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(team(&store, "a").as_deref(), Some("one"), "kept");
        assert_eq!(team(&store, "b").as_deref(), Some("two"), "the rest loads");
        assert_eq!(out.kept.len(), 1);

        // Unreadable now: what it held stays.
        let mut unreadable = snapshot(&[("b.yaml", &b)]);
        unreadable.files.push(FileRead {
            path: "a.yaml".into(),
            content: Err(LoadError::Read {
                path: "a.yaml".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
        });
        let out = store.load(unreadable, &none);
        assert_eq!(team(&store, "a").as_deref(), Some("one"));
        assert!(
            out.rejected[0].to_string().contains("Input/output error"),
            "{}",
            out.rejected[0]
        );

        // Removed: gone.
        let out = store.load(snapshot(&[("b.yaml", &b)]), &none);
        assert!(out.rejected.is_empty());
        assert!(!store.world().namespaces.contains_key("a"));
    }

    #[test]
    fn duplicates_name_both_places_and_the_enforced_copy_stays() {
        let mut store = PolicyStore::default();
        let none = BTreeMap::new();
        let one = namespace_doc("a", "one");
        store.load(snapshot(&[("1.yaml", &one)]), &none);
        let two = namespace_doc("a", "two");
        let out = store.load(snapshot(&[("1.yaml", &one), ("2.yaml", &two)]), &none);
        let messages: Vec<String> = out.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "1.yaml document 0: Namespace a: metadata.name: Duplicate value: \"a\": also defined at 2.yaml document 0; neither copy is applied",
                "2.yaml document 0: Namespace a: metadata.name: Duplicate value: \"a\": also defined at 1.yaml document 0; neither copy is applied",
            ]
        );
        assert_eq!(team(&store, "a").as_deref(), Some("one"));
        // A third copy names the first, as the second does.
        let three = namespace_doc("a", "three");
        let out = store.load(
            snapshot(&[("1.yaml", &one), ("2.yaml", &two), ("3.yaml", &three)]),
            &none,
        );
        let others: Vec<String> = out
            .rejected
            .iter()
            .map(|e| {
                e.to_string()
                    .split("also defined at ")
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            others,
            [
                "2.yaml document 0; neither copy is applied",
                "1.yaml document 0; neither copy is applied",
                "1.yaml document 0; neither copy is applied",
            ]
        );
        assert_eq!(team(&store, "a").as_deref(), Some("one"));
        // New duplicates: neither wins.
        let mut fresh = PolicyStore::default();
        fresh.load(snapshot(&[("1.yaml", &one), ("2.yaml", &two)]), &none);
        assert!(fresh.world().namespaces.is_empty());
    }
}
