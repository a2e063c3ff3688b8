//! What `/metrics`, `/healthz` and `/readyz` answer, from the state a run loop shares; the HTTP
//! side is [`super::http`].

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{Telemetry, http::Endpoints};

/// A check of the process's own loops (the Kubernetes watches): `Err` says which died.
pub type HealthCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the server answers from.
pub struct Shared {
    pub telemetry: Mutex<Telemetry>,
    /// Set after the first successful policy write: `/readyz` answers 200 from then on, unless
    /// `waiting` says what else it waits for.
    pub ready: AtomicBool,
    /// What readiness still waits for besides the first write (a watch's initial list).
    pub waiting: Mutex<Option<String>>,
    /// Why the last policy write failed, while it is the last: not ready until one succeeds.
    pub write_error: Mutex<Option<String>>,
    /// `None`: the process has no loop that can die on its own.
    pub health: Option<HealthCheck>,
}

impl Shared {
    pub fn new(telemetry: Telemetry) -> Self {
        Self {
            telemetry: Mutex::new(telemetry),
            ready: AtomicBool::new(false),
            waiting: Mutex::new(None),
            write_error: Mutex::new(None),
            health: None,
        }
    }

    /// The telemetry, also after a thread panicked holding it (counters stay usable).
    pub fn telemetry(&self) -> std::sync::MutexGuard<'_, Telemetry> {
        self.telemetry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Endpoints for Shared {
    fn metrics(&self) -> String {
        self.telemetry().encode()
    }

    fn health(&self) -> Result<String, String> {
        match &self.health {
            Some(check) => check()
                .map(|()| "ok\n".into())
                .map_err(|e| format!("{e}\n")),
            None => Ok("ok\n".into()),
        }
    }

    fn readiness(&self) -> Result<String, String> {
        if let Some(waiting) = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            return Err(format!("not ready: {waiting}\n"));
        }
        let written = self.ready.load(Ordering::SeqCst);
        if let Some(error) = self
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            // Also before this process wrote anything: a restarted agent whose first write
            // failed leaves what the previous one wrote.
            return Err(format!(
                "not ready: the last policy write failed ({error}); {}\n",
                if written {
                    "the policy written before it stays enforced"
                } else {
                    "whatever a previous agent wrote stays enforced"
                }
            ));
        }
        if !written {
            return Err("no policy written yet\n".into());
        }
        let telemetry = self.telemetry();
        // Not ready, as a failed write: no pod's veth is found, so every pod's frames pass link
        // traffic only, and a DaemonSet rollout should stop at the first such node.
        if let Some(problem) = telemetry.veth_lookup_problem() {
            return Err(format!(
                "not ready: pods' veths cannot be found ({problem}); their raw, ping and SCTP sockets are refused and unclaimed container veths pass link traffic only\n"
            ));
        }
        // Ready: policy is enforced. Rejected files and objects are the detail: the rest is
        // enforced and a rejected object keeps its last valid version.
        let rejections: Vec<&String> = telemetry
            .rejections()
            .iter()
            .chain(telemetry.over_budget_messages())
            .collect();
        Ok(if rejections.is_empty() {
            "ready\n".to_owned()
        } else {
            format!(
                "ready; the last load rejected {} file(s) or object(s):\n{}\n",
                rejections
                    .iter()
                    .filter(|m| !m.contains("keeps its last valid version"))
                    .count(),
                rejections
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }
}

/// Listens on `addr` and answers on a thread of its own; returns the bound address (useful
/// with port 0).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    super::http::serve_on_thread(addr, shared)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_health_and_readiness() {
        let mut shared =
            Shared::new(Telemetry::new(crate::telemetry::SeriesLimits::default()).unwrap());
        let alive = Arc::new(AtomicBool::new(true));
        let check = Arc::clone(&alive);
        shared.health = Some(Box::new(move || {
            if check.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("watch of Pod ended".into())
            }
        }));
        *shared.waiting.lock().unwrap() = Some("watch of Pod has not listed".into());
        let shared = Arc::new(shared);
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&shared)).unwrap();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        let waiting = get(addr, "/readyz");
        assert!(
            waiting.starts_with("HTTP/1.1 503") && waiting.contains("Pod has not listed"),
            "{waiting}"
        );
        *shared.waiting.lock().unwrap() = None;
        assert!(
            get(addr, "/readyz").starts_with("HTTP/1.1 503"),
            "no write yet"
        );
        shared.ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        shared.telemetry().rejected(
            &std::collections::BTreeMap::from([("invalid", 1)]),
            vec![
                "p.yaml document 0: NetworkPolicy x/y: spec: Required value: spec is required"
                    .into(),
            ],
        );
        let ready = get(addr, "/readyz");
        assert!(
            ready.starts_with("HTTP/1.1 200")
                && ready.contains(
                    "rejected 1 file(s) or object(s):\np.yaml document 0: NetworkPolicy x/y"
                ),
            "{ready}"
        );
        shared
            .telemetry()
            .veth_lookup(Some("app/web: the agent needs hostPID".into()));
        let blind = get(addr, "/readyz");
        assert!(
            blind.starts_with("HTTP/1.1 503") && blind.contains("needs hostPID"),
            "{blind}"
        );
        assert!(
            get(addr, "/metrics").contains("egret_pod_veth_lookup_failing 1"),
            "the gauge says it too"
        );
        shared.telemetry().veth_lookup(None);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        shared.telemetry().sync_failed();
        let metrics = get(addr, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("egret_policy_sync_errors_total 1"),
            "{metrics}"
        );
        alive.store(false, Ordering::SeqCst);
        let health = get(addr, "/healthz");
        assert!(
            health.starts_with("HTTP/1.1 503") && health.contains("Pod ended"),
            "{health}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }
}
