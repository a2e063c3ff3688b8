//! A minimal HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`. Scrapes are rare and
//! small, so one thread answering one request per connection is enough, and pulls in no
//! async runtime.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use super::Telemetry;

/// What the server answers from.
pub struct Shared {
    pub telemetry: Mutex<Telemetry>,
    /// Set after the first successful policy write: `/readyz` answers 200 from then on.
    pub ready: AtomicBool,
}

/// Listens on `addr` and answers in a background thread; returns the bound address (useful
/// with port 0).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(err) = answer(stream, &shared) {
                    tracing::debug!("metrics request: {err}");
                }
            }
        })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let text = shared
                .telemetry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .encode();
            ("200 OK", "text/plain; version=0.0.4", text)
        }
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if shared.ready.load(Ordering::SeqCst) => {
            // Ready: policy is enforced. Rejected files and objects are the detail: the rest
            // is enforced and a rejected object keeps its last valid version.
            let telemetry = shared.telemetry.lock().unwrap_or_else(|e| e.into_inner());
            let rejections = telemetry.rejections();
            let body = if rejections.is_empty() {
                "ready\n".to_owned()
            } else {
                format!(
                    "ready; the last load rejected {} file(s) or object(s):\n{}\n",
                    rejections
                        .iter()
                        .filter(|m| !m.contains("keeps its last valid version"))
                        .count(),
                    rejections.join("\n")
                )
            };
            ("200 OK", "text/plain", body)
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "no policy written yet\n".to_owned(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_health_and_readiness() {
        let shared = Arc::new(Shared {
            telemetry: Mutex::new(Telemetry::new(10).unwrap()),
            ready: AtomicBool::new(false),
        });
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&shared)).unwrap();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        shared.ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        shared.telemetry.lock().unwrap().rejected(
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
        shared.telemetry.lock().unwrap().sync_failed();
        let metrics = get(addr, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("egret_policy_sync_errors_total 1"),
            "{metrics}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }
}
