//! The small HTTP/1.1 server behind the health, readiness and metrics ports, and the two endpoint sets both
//! binaries serve on it: the health port (`/healthz`, `/readyz`, `/metrics`) and the admin port
//! (`/debug/connections`, `/debug/pprof/profile`, `/metrics`).

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use konnectivity_transport::listen::{self, ListenError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A response body.
pub type Body = Full<Bytes>;

/// The response a handler produces, possibly later (a CPU profile takes seconds).
pub type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>;

/// Answers one request.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Reply + Send + Sync>;

/// A response available now.
pub fn ready(resp: Response<Body>) -> Reply {
    Box::pin(std::future::ready(resp))
}

/// `/debug/pprof/profile?seconds=N`: a CPU profile of N seconds (default 30, at most 300) in pprof's format.
pub fn cpu_profile(query: Option<&str>) -> Reply {
    let seconds = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("seconds="))).map(|v| v.parse::<u64>());
    let seconds = match seconds {
        None => 30,
        Some(Ok(s)) if (1..=crate::profiling::MAX_SECONDS).contains(&s) => s,
        Some(_) => {
            return ready(text(
                StatusCode::BAD_REQUEST,
                format!("seconds must be between 1 and {}\n", crate::profiling::MAX_SECONDS),
            ));
        }
    };
    Box::pin(async move {
        match crate::profiling::cpu_profile(std::time::Duration::from_secs(seconds)).await {
            Ok(bytes) => {
                let mut resp = Response::new(Full::new(Bytes::from(bytes)));
                resp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
                resp.headers_mut().insert(
                    http::header::CONTENT_DISPOSITION,
                    http::HeaderValue::from_static("attachment; filename=\"profile\""),
                );
                resp
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    })
}

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
                    let reply = handler(&req);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
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

/// What a binary's health and admin ports show.
#[derive(Clone)]
pub struct Endpoints {
    /// The registry `/metrics` encodes.
    pub registry: prometheus::Registry,
    /// The `/readyz` answer; its argument says whether `?verbose` was asked for.
    pub readyz: Arc<dyn Fn(bool) -> Response<Body> + Send + Sync>,
    /// The `/debug/connections` document.
    pub debug_connections: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Whether `/debug/pprof/profile` is served (`--enable-profiling`).
    pub profiling: bool,
}

impl Endpoints {
    /// The health port: `/healthz`, `/readyz` (and `/ready`), `/metrics`.
    pub fn health(&self) -> Handler {
        let this = self.clone();
        Arc::new(move |req| {
            ready(match req.uri().path() {
                "/healthz" => text(StatusCode::OK, "ok"),
                "/readyz" | "/ready" => {
                    let verbose = req
                        .uri()
                        .query()
                        .is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose=")));
                    (this.readyz)(verbose)
                }
                "/metrics" => metrics(&this.registry),
                _ => not_found(),
            })
        })
    }

    /// The admin port: `/debug/connections`, `/debug/pprof/profile` when profiling is on, and `/metrics`, served
    /// here or, with `metrics_on_port` (the agent, as the reference's), a redirect to that port's `/metrics`.
    pub fn admin(&self, metrics_on_port: Option<u16>) -> Handler {
        let this = self.clone();
        Arc::new(move |req| match (req.uri().path(), metrics_on_port) {
            ("/debug/pprof/profile", _) if this.profiling => cpu_profile(req.uri().query()),
            ("/debug/connections", _) => ready(json(&(this.debug_connections)())),
            ("/metrics", None) => ready(metrics(&this.registry)),
            ("/metrics", Some(port)) => {
                let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
                let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
                ready(redirect(&format!("http://{host}:{port}/metrics")))
            }
            _ => ready(not_found()),
        })
    }
}

/// Where a binary's health and admin ports listen: `(bind address, port)`, `None` when off.
pub struct Ports<'a> {
    /// The health port.
    pub health: Option<&'a (String, u16)>,
    /// The admin port.
    pub admin: Option<&'a (String, u16)>,
    /// The admin port's `/metrics` redirects to the health port's (the agent, as the reference's) instead of
    /// serving them itself.
    pub admin_redirects_metrics: bool,
}

/// The addresses the health and admin ports are bound to.
pub struct BoundPorts {
    /// The health port, if on.
    pub health: Option<SocketAddr>,
    /// The admin port, if on.
    pub admin: Option<SocketAddr>,
}

impl Endpoints {
    /// Binds the health and admin ports that are on and serves them until `shutdown`.
    pub async fn serve(
        &self,
        ports: Ports<'_>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<BoundPorts, ListenError> {
        let health = match ports.health {
            Some((bind, port)) => {
                Some(listen_and_serve("health", bind, *port, self.health(), shutdown.clone(), tracker).await?)
            }
            None => None,
        };
        let redirect = health.filter(|_| ports.admin_redirects_metrics).map(|a| a.port());
        let admin = match ports.admin {
            Some((bind, port)) => {
                Some(listen_and_serve("admin", bind, *port, self.admin(redirect), shutdown.clone(), tracker).await?)
            }
            None => None,
        };
        Ok(BoundPorts { health, admin })
    }
}

/// Go's 404 answer.
fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// Binds `bind:port` (`bind` empty: every interface) and serves `handler` there until `shutdown`; `what` names
/// the port in errors and logs. Returns the bound address.
pub async fn listen_and_serve(
    what: &str,
    bind: &str,
    port: u16,
    handler: Handler,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, ListenError> {
    let listener = listen::bind_tcp(bind, port).await?;
    let addr = listener.local_addr().map_err(|cause| ListenError::Tcp { addr: what.to_string(), cause })?;
    serve(listener, handler, shutdown, tracker);
    tracing::info!(%addr, "{what} endpoints listening");
    Ok(addr)
}
