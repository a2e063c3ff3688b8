//! The HTTP side of `/metrics`, `/healthz` and `/readyz`: hyper on tokio, one task per
//! connection, so an idle or slow client holds only its own connection. (A server that answers
//! one connection at a time lets twenty idle clients delay `/healthz` until the kubelet restarts
//! the agent.) A client gets [`HEADER_TIMEOUT`] to send its request head, then is dropped.

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};

/// How long a client may take to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints answer; implemented by the telemetry a run loop shares.
pub trait Endpoints: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Whether the process works (every loop it depends on runs), and why not.
    fn health(&self) -> Result<String, String>;
    /// Whether the node is enforced as configured, with detail either way.
    fn readiness(&self) -> Result<String, String>;
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, endpoints: Arc<dyn Endpoints>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "metrics server failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = Arc::clone(&endpoints);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let endpoints = Arc::clone(&endpoints);
                async move { Ok::<_, Infallible>(answer(&request, endpoints.as_ref())) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(err) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %err, "metrics connection ended");
            }
        });
    }
}

/// Binds `addr` now (so the caller learns the port at once) and serves on a thread of its own
/// with a small tokio runtime: for a caller that has none (local mode).
pub fn serve_on_thread(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, endpoints).await,
                    Err(err) => tracing::error!(error = %err, "metrics server failed to start"),
                }
            });
        })?;
    Ok(local)
}

/// Binds `addr` on the caller's tokio runtime and serves in a task; returns the bound address.
pub async fn spawn(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, endpoints));
    Ok(local)
}

fn answer<B>(request: &Request<B>, endpoints: &dyn Endpoints) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let state = |result: Result<String, String>| match result {
        Ok(detail) => text(StatusCode::OK, "text/plain", detail),
        Err(detail) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", detail),
    };
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            endpoints.metrics(),
        ),
        "/healthz" => state(endpoints.health()),
        "/readyz" => state(endpoints.readiness()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        sync::atomic::{AtomicBool, Ordering},
        time::Instant,
    };

    use super::*;

    struct Fake {
        ready: AtomicBool,
    }

    impl Endpoints for Fake {
        fn metrics(&self) -> String {
            "egret_up 1\n".into()
        }
        fn health(&self) -> Result<String, String> {
            Ok("ok\n".into())
        }
        fn readiness(&self) -> Result<String, String> {
            if self.ready.load(Ordering::SeqCst) {
                Ok("ready\n".into())
            } else {
                Err("not ready: waiting for the first policy write\n".into())
            }
        }
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    #[test]
    fn idle_and_slow_clients_do_not_delay_others() {
        let fake = Arc::new(Fake {
            ready: AtomicBool::new(false),
        });
        let addr = serve_on_thread("127.0.0.1:0".parse().unwrap(), fake.clone()).unwrap();
        // Twenty clients that connect and say nothing, and five that send half a request.
        let mut idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for _ in 0..5 {
            let mut slow = TcpStream::connect(addr).unwrap();
            slow.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
            idle.push(slow);
        }
        let start = Instant::now();
        let health = get(addr, "/healthz");
        let took = start.elapsed();
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        // The old one-connection-at-a-time server answered after every idle client had timed
        // out (2 s each, 50 s here); this one answers at once. The bound is generous for a loaded machine.
        assert!(
            took < Duration::from_secs(5),
            "/healthz took {took:?} behind idle clients"
        );
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        fake.ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics");
        assert!(metrics.contains("egret_up 1"), "{metrics}");
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
        drop(idle);
    }
}
