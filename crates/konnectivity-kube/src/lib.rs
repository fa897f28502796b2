//! A small Kubernetes API client: just what proxy-server and proxy-agent need from kube-apiserver
//! (TokenReview for agent authentication, Leases for server counting, a Node's addresses for agent identity),
//! over HTTPS/1.1 with JSON.
//!
//! Credentials come from a kubeconfig file or the in-cluster service account ([`Config`]); requests are rate
//! limited like client-go (`--kubeconfig-qps`, `--kubeconfig-burst`), except that the wait for a slot is bounded
//! and counts towards the request's timeout ([`RequestLimits`]), and reuse a few keep-alive connections.
//! [`Client::with_limits`] gives one kind of request a budget of its own over the same connections.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, missing_docs)]

mod config;
mod exec;
pub mod lease;
mod limiter;
pub mod node;
pub mod token_review;
pub mod watch;

pub use config::{Config, IN_CLUSTER_DIR, Token};
pub use limiter::{RateLimiter, Reservation, Throttled};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or the exchange broke.
    #[error("{0}")]
    Transport(String),
    /// The server answered with an error status.
    #[error("{method} {path}: HTTP {code}: {message}")]
    Status {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// HTTP status code.
        code: u16,
        /// The Status message, or the body.
        message: String,
    },
    /// The client's own rate limit has no slot for the request within its `max_wait` ([`RequestLimits`]):
    /// nothing was sent.
    #[error("client-side rate limit: no request slot within {max_wait:?}; one may be free in {retry_after:?}")]
    Throttled {
        /// The longest wait allowed.
        max_wait: Duration,
        /// How much later a slot would be within reach.
        retry_after: Duration,
    },
    /// A response body was not what the API promises.
    #[error("decoding {what}: {cause}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        cause: String,
    },
}

impl KubeError {
    /// The HTTP status code, for errors the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

/// Timeout of one request, the wait for a rate-limit slot and the connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a client's requests are limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Requests per second on average (0: client-go's default, 5).
    pub qps: f32,
    /// Requests at once after a quiet spell (0: client-go's default, 10).
    pub burst: u32,
    /// The longest a request waits for a rate-limit slot; past it, it fails at once with
    /// [`KubeError::Throttled`] rather than queue behind callers that may have given up.
    pub max_wait: Duration,
    /// The deadline of a request from the moment it is made: the wait for a slot, connecting and the exchange.
    pub timeout: Duration,
}

impl RequestLimits {
    /// `qps` and `burst` (0: client-go's defaults), waiting for a slot for as long as the 30 s timeout allows.
    pub fn new(qps: f32, burst: u32) -> Self {
        Self { qps, burst, max_wait: REQUEST_TIMEOUT, timeout: REQUEST_TIMEOUT }
    }

    fn limiter(&self) -> Arc<RateLimiter> {
        Arc::new(RateLimiter::new(
            if self.qps > 0.0 { self.qps } else { 5.0 },
            if self.burst > 0 { self.burst } else { 10 },
        ))
    }
}

/// Idle keep-alive connections kept for reuse.
const MAX_IDLE: usize = 4;

/// The client. Cheap to clone; clones share the connections and the rate limit.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    limiter: Arc<RateLimiter>,
    limits: RequestLimits,
}

struct Inner {
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    authority: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.inner.config.server).finish()
    }
}

impl Client {
    /// A client for `config`, limited to `qps` requests per second with bursts of `burst` (0 for either
    /// means client-go's default: 5 and 10).
    pub fn new(config: Config, qps: f32, burst: i32) -> Result<Self, KubeError> {
        Self::with_config_and_limits(config, RequestLimits::new(qps, u32::try_from(burst).unwrap_or(0)))
    }

    /// A client sharing this one's configuration and connections, but with a rate limit of its own: one kind
    /// of request (TokenReviews) then never waits behind another (Leases), nor makes it wait.
    pub fn with_limits(&self, limits: RequestLimits) -> Self {
        Self { inner: self.inner.clone(), limiter: limits.limiter(), limits }
    }

    fn with_config_and_limits(config: Config, limits: RequestLimits) -> Result<Self, KubeError> {
        let (host, port) = config.host_port()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &config.ca_pem {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| KubeError::Config(format!("{}: bad CA certificate: {e}", config.source)))?;
                roots
                    .add(cert)
                    .map_err(|e| KubeError::Config(format!("{}: unusable CA certificate: {e}", config.source)))?;
            }
        }
        if roots.is_empty() {
            return Err(KubeError::Config(format!("{}: no CA certificate for the API server", config.source)));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &config.identity {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| KubeError::Config(format!("{}: bad client certificate: {e}", config.source)))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| KubeError::Config(format!("{}: bad client key: {e}", config.source)))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| KubeError::Config(format!("{}: client certificate: {e}", config.source)))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = config.tls_server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| KubeError::Config(format!("{}: server name {name:?}: {e}", config.source)))?;
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(Self {
            limiter: limits.limiter(),
            limits,
            inner: Arc::new(Inner {
                config,
                tls: Arc::new(tls),
                host,
                port,
                server_name,
                authority,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        &self.inner.config.server
    }

    /// Sends a request with an optional JSON body; any status is returned (see [`Client::call`] for one that
    /// maps error statuses to [`KubeError::Status`]).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, KubeError> {
        let RequestLimits { max_wait, timeout, .. } = self.limits;
        let deadline = tokio::time::Instant::now() + timeout;
        // Dropping this future (the caller gave up) while it waits gives the slot back.
        let slot = self
            .limiter
            .reserve(max_wait.min(timeout))
            .map_err(|t| KubeError::Throttled { max_wait: max_wait.min(timeout), retry_after: t.retry_after })?;
        let exchange = async {
            slot.wait().await;
            self.send(method.clone(), path, body).await
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(KubeError::Transport(format!("{method} {path}: no answer within {timeout:?}"))),
        }
    }

    /// Like [`Client::request`], but a status of 300 or more is an error carrying the API's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<&serde_json::Value>) -> Result<Bytes, KubeError> {
        let resp = self.request(method.clone(), path, body).await?;
        if resp.status >= 300 {
            let message = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).chars().take(300).collect());
            return Err(KubeError::Status {
                method: method.to_string(),
                path: path.to_string(),
                code: resp.status,
                message,
            });
        }
        Ok(resp.body)
    }

    /// A request with the client's headers and credentials.
    async fn build_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<http::Request<Full<Bytes>>, KubeError> {
        let inner = &self.inner;
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, &inner.authority)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, concat!("konnectivity-rs/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &inner.config.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", token.current().await?));
        }
        req.body(Full::new(body.map(|b| Bytes::from(b.to_string())).unwrap_or_default()))
            .map_err(|e| KubeError::Config(format!("{method} {path}: {e}")))
    }

    async fn send(&self, method: Method, path: &str, body: Option<&serde_json::Value>) -> Result<Response, KubeError> {
        let inner = &self.inner;
        let req = self.build_request(method.clone(), path, body).await?;
        let mut sender = match self.take_idle() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| KubeError::Transport(format!("{method} {path} to {}: {e}", inner.config.server)))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| KubeError::Transport(format!("{method} {path}: reading the response: {e}")))?
            .to_bytes();
        if sender.is_ready()
            && let Ok(mut idle) = inner.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(sender);
        }
        Ok(Response { status, body })
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.inner.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, KubeError> {
        let inner = &self.inner;
        let server = &inner.config.server;
        let tcp = tokio::net::TcpStream::connect((inner.host.as_str(), inner.port))
            .await
            .map_err(|e| KubeError::Transport(format!("connecting to {server}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(inner.tls.clone())
            .connect(inner.server_name.clone(), tcp)
            .await
            .map_err(|e| KubeError::Transport(format!("TLS handshake with {server}: {e}")))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| KubeError::Transport(format!("HTTP handshake with {server}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "kube-apiserver connection ended");
            }
        });
        Ok(sender)
    }
}
