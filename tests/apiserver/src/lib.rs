//! An in-memory Kubernetes API server for egret's end-to-end tests. kubectl and kube-rs talk
//! to it over plain HTTP on loopback as to a real server: discovery and OpenAPI, the verbs on
//! built-in kinds and on any CRD applied through it, label and field selectors, pagination,
//! watches with bookmarks and 410 Gone, the status subresource. Tests start it in-process
//! ([`ApiServer::start`]) and read the objects and the request log it recorded; the
//! `egret-test-apiserver` binary serves the same for manual runs.

pub mod discovery;
pub mod patch;
pub mod resource;
pub mod schema;
pub mod selector;
mod server;
pub mod status;
pub mod store;
mod table;
mod watch;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
pub use server::{Config, RequestRecord};
use server::{State, lock};
pub use status::ApiError;
use store::{Store, WriteOptions};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// What can go wrong starting or seeding the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tokio runtime could not be built.
    #[error("failed to start the server's runtime")]
    Runtime {
        #[source]
        io_error: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        io_error: std::io::Error,
    },
    /// A seed file could not be read.
    #[error("failed to read seed file {}", path.display())]
    ReadSeed {
        path: PathBuf,
        #[source]
        io_error: std::io::Error,
    },
    /// A seed file held an object the API refused.
    #[error("seed file {} holds an object the API refuses", path.display())]
    Seed {
        path: PathBuf,
        #[source]
        api_error: ApiError,
    },
    /// The kubeconfig could not be written.
    #[error("failed to write kubeconfig {}", path.display())]
    WriteKubeconfig {
        path: PathBuf,
        #[source]
        io_error: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A running server; dropping it stops it.
pub struct ApiServer {
    state: Arc<State>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApiServer {
    /// Starts serving on `listen` (port 0 picks a free one) on a runtime of its own, so sync
    /// and async tests alike can use it.
    pub fn start(listen: SocketAddr, config: Config) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver")
            .enable_all()
            .build()
            .map_err(|io_error| Error::Runtime { io_error })?;
        let bind = |io_error| Error::Bind {
            addr: listen,
            io_error,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let state = Arc::new(State::new(config, addr.to_string()));
        let serving = Arc::clone(&state);
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, serving).await,
                Err(e) => tracing::error!(error = %e, "failed to register the listener"),
            }
        });
        info!(%addr, "test API server listening");
        Ok(Self {
            state,
            addr,
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points kubectl and kube-rs at this server.
    pub fn kubeconfig(&self) -> String {
        kubeconfig(&self.url())
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig()).map_err(|io_error| Error::WriteKubeconfig {
            path: path.to_owned(),
            io_error,
        })
    }

    /// Every API request served so far, in order (the test hooks excluded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Ends every open watch, as a restarting API server or a broken connection does.
    pub fn drop_watches(&self) {
        self.state.drop_watches.send_modify(|g| *g += 1);
    }

    /// Forgets the change history: a watch from any earlier resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        lock(&self.state.store).compact();
    }

    /// While held, new watches wait before they start; writes meanwhile and a compaction
    /// then put every reconnecting client behind the history.
    pub fn hold_watches(&self, hold: bool) {
        self.state.hold_watches.send_replace(hold);
    }

    /// The resource (plural, as `pods`) of each watch waiting while watches are held: a test
    /// that held and dropped them knows from it that a client's watch is no longer open.
    pub fn held_watches(&self) -> Vec<String> {
        lock(&self.state.held_watches).clone()
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state.store).resource_version()
    }

    /// One stored object (`namespace` empty for cluster-scoped kinds).
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = lock(&self.state.store);
        let t = store
            .types()
            .iter()
            .find(|t| t.group == group && t.plural == plural)?
            .clone();
        store.get(&t, namespace, name).ok()
    }

    /// Every stored object of a kind, in key order.
    pub fn objects(&self, group: &str, plural: &str) -> Vec<Value> {
        let store = lock(&self.state.store);
        store
            .types()
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
            .map(|t| store.list(&t, None))
            .unwrap_or_default()
    }

    /// Creates or replaces the objects of a multi-document YAML text (namespaces and CRDs
    /// first), writing each `status` through the status subresource, as a controller would.
    pub fn seed(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        seed(&mut lock(&self.state.store), yaml)
    }

    /// Seeds every `.yaml`/`.yml`/`.json` file of a directory, in name order.
    pub fn seed_dir(&self, dir: &Path) -> Result<usize> {
        let read = |io_error| Error::ReadSeed {
            path: dir.to_owned(),
            io_error,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        files.sort();
        let mut text = String::new();
        for path in &files {
            let content = std::fs::read_to_string(path).map_err(|io_error| Error::ReadSeed {
                path: path.clone(),
                io_error,
            })?;
            text.push_str("\n---\n");
            text.push_str(&content);
        }
        let objects = self.seed(&text).map_err(|api_error| Error::Seed {
            path: dir.to_owned(),
            api_error,
        })?;
        Ok(objects.len())
    }

    /// Blocks the calling (non-async) thread until Ctrl-C.
    pub fn wait_for_ctrl_c(&self) -> std::io::Result<()> {
        match &self.runtime {
            Some(rt) => rt.block_on(tokio::signal::ctrl_c()),
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Not `drop(runtime)`: that blocks, which panics inside an async test.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(server::handle(state, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A kubeconfig for `server` (plain HTTP needs no TLS settings).
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: egret-test
  cluster:
    server: {server}
users:
- name: egret-test
  user: {{}}
contexts:
- name: egret-test
  context:
    cluster: egret-test
    user: egret-test
    namespace: default
current-context: egret-test
preferences: {{}}
"
    )
}

/// Creates or replaces the objects of a YAML text; see [`ApiServer::seed`].
pub(crate) fn seed(store: &mut Store, yaml: &str) -> Result<Vec<Value>, ApiError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?;
        match value {
            Value::Null => {}
            Value::Object(_) if value.get("kind").and_then(Value::as_str) == Some("List") => {
                docs.extend(value["items"].as_array().cloned().unwrap_or_default());
            }
            other => docs.push(other),
        }
    }
    let rank = |v: &Value| match v.get("kind").and_then(Value::as_str) {
        Some("Namespace") => 0,
        Some("CustomResourceDefinition") => 1,
        _ => 2,
    };
    docs.sort_by_key(rank);
    let mut out = Vec::new();
    for doc in docs {
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let t = store
            .types()
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(format!("no kind {kind:?} is served in {api_version:?}"))
            })?;
        let namespace = if t.namespaced {
            doc.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ns = t.namespaced.then_some(namespace.as_str());
        let mut stored = match store.get(&t, &namespace, &name) {
            Ok(_) => {
                let mut body = doc.clone();
                if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                store.update(&t, &namespace, &name, body, None, WriteOptions::default())?
            }
            Err(_) => store.create(&t, ns, doc.clone(), WriteOptions::default())?,
        };
        if t.status
            && let Some(status) = doc.get("status")
        {
            let mut body = stored.clone();
            body["status"] = status.clone();
            let name = body
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            stored = store.update(
                &t,
                &namespace,
                &name,
                body,
                Some("status"),
                WriteOptions::default(),
            )?;
        }
        out.push(stored);
    }
    Ok(out)
}
