//! The small HTTP/1.1 server behind the health, readiness and metrics ports.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A response body.
pub type Body = Full<Bytes>;

/// Answers one request; cheap and synchronous (health checks and metric scrapes).
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Body> + Send + Sync>;

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// The text exposition of a Prometheus registry (format 0.0.4, as client_golang serves it).
pub fn metrics(registry: &prometheus::Registry) -> Response<Body> {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}"));
    }
    let mut resp = Response::new(Full::new(Bytes::from(buf)));
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

/// A redirect (the agent's admin `/metrics` answers 301 to the health port, as the reference does).
pub fn redirect(location: &str) -> Response<Body> {
    let mut resp = text(StatusCode::MOVED_PERMANENTLY, "");
    if let Ok(v) = http::HeaderValue::from_str(location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// Serves `handler` on `listener` until `shutdown`; connections are tracked by `tracker` and closed gracefully.
pub fn serve(listener: TcpListener, handler: Handler, shutdown: CancellationToken, tracker: &TaskTracker) {
    let conn_tracker = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("http endpoint accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            conn_tracker.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = handler(&req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(1 << 20)
                    .serve_connection(TokioIo::new(tcp), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                    }
                }
            });
        }
    });
}

/// A JSON response.
pub fn json(value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}
