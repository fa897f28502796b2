//! A running agent: its health and admin endpoints, the [`AgentHandle`] view of its server streams, and the
//! tasks that keep them (`server_set`) and drain them (`drain`).

use crate::config::AgentConfig;
use crate::dialer::{Dialer, HEADER_TIMEOUT, Target};
use crate::metrics::AgentMetrics;
use crate::server_set::AddressStatus;
use crate::session::Session;
use http::StatusCode;
use konnectivity_transport::http_endpoints::{self, Handler};
use konnectivity_transport::listen::{self, ListenError};
use konnectivity_transport::tls::{self, ClientTlsSpec, TlsError};
use konnectivity_transport::tls_reload::{self, ReloadOptions};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the agent could not start, or why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A health or admin listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The metrics registry refused a metric.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// Connecting to the server failed.
    #[error("connecting to proxy-server {addr}: {cause}")]
    Connect {
        /// The server address.
        addr: String,
        /// Why, with every underlying cause (tonic's own text is only "transport error").
        cause: String,
    },
    /// The server refused or broke the stream.
    #[error("opening the tunnel stream to {addr}: {status}")]
    Stream {
        /// The server address.
        addr: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The server sent no response headers in time.
    #[error("proxy-server {0} sent no response headers within {HEADER_TIMEOUT:?}")]
    HeaderTimeout(String),
    /// The server's headers were missing or malformed.
    #[error("proxy-server {addr}: {what}")]
    BadHeaders {
        /// The server address.
        addr: String,
        /// What was wrong.
        what: String,
    },
}

/// A view of a running agent, for readiness and tests.
#[derive(Clone)]
pub struct AgentHandle {
    /// One session per distinct server ID.
    pub(crate) sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    /// What each configured address last reached, as the server set publishes it.
    pub(crate) addresses: Arc<Mutex<Vec<AddressStatus>>>,
    /// Notified when a session ends, so that the server set redials without waiting for its timer.
    pub(crate) session_ended: Arc<Notify>,
    /// Cancelled by [`AgentHandle::finish`]: every server stream is ended cleanly.
    pub(crate) finish: CancellationToken,
    pub(crate) agent_id: Arc<str>,
    /// Valid proxy-server leases last counted (0: not counting, or no good list yet).
    pub(crate) lease_count: Arc<std::sync::atomic::AtomicU32>,
    metrics: AgentMetrics,
}

impl AgentHandle {
    /// IDs of the servers the agent holds a stream to.
    pub fn connected_servers(&self) -> Vec<String> {
        self.sessions.lock().keys().cloned().collect()
    }
    /// Endpoint connections open, over every server stream.
    pub fn endpoint_connections(&self) -> usize {
        self.sessions.lock().values().map(|s| s.connection_count()).sum()
    }
    /// Dials in flight plus connections not yet closed towards their server, over every server stream: what
    /// a drain waits for.
    pub fn connections_in_progress(&self) -> usize {
        self.sessions.lock().values().map(|s| s.in_progress()).sum()
    }
    /// Each configured server address: the servers it reached whose stream is open, and its last error.
    pub fn addresses(&self) -> Vec<AddressStatus> {
        self.addresses.lock().clone()
    }
    /// Closes every connection and dial on every server stream, with `reason` as the error their frontends
    /// get (the end of a drain that timed out).
    pub(crate) fn close_all(&self, reason: &str) {
        for session in self.sessions.lock().values() {
            session.close_all(reason);
        }
    }
    /// Whether the agent is connected to at least one server.
    pub fn ready(&self) -> bool {
        !self.sessions.lock().is_empty()
    }
    /// Ends every server stream cleanly: what is already queued for a server is still delivered, then the
    /// stream is half-closed, and the session ends when the server closes its side. No new stream is opened.
    /// Used at the end of a drain, so that the last bytes of the last connections are not lost on exit.
    pub fn finish(&self) {
        self.finish.cancel();
    }

    /// Server streams and their connections, as `/debug/connections` on the admin port shows them.
    pub fn debug_connections(&self) -> serde_json::Value {
        let servers: Vec<_> = self.sessions.lock().values().map(|s| s.debug_view()).collect();
        let addresses: Vec<_> = self
            .addresses
            .lock()
            .iter()
            .map(|a| {
                serde_json::json!({
                    "address": a.address,
                    "servers": a.servers,
                    "dialing": a.dialing,
                    "last_error": a.last_error,
                })
            })
            .collect();
        serde_json::json!({ "agent_id": &*self.agent_id, "addresses": addresses, "servers": servers })
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }
}

/// A started agent.
pub struct RunningAgent {
    /// The health port, if enabled.
    pub health_addr: Option<SocketAddr>,
    /// The admin port, if enabled.
    pub admin_addr: Option<SocketAddr>,
    handle: AgentHandle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl RunningAgent {
    /// A view of the agent's state.
    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// Waits until the agent has stopped: after the shutdown token is cancelled, or by itself at the end of a
    /// drain. Returns how many of its tasks had not finished within 5 s (0 after a clean stop; tests assert it).
    pub async fn wait(self) -> usize {
        self.shutdown.cancelled().await;
        self.tracker.close();
        match tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = self.tracker.len();
                tracing::warn!("{left} tasks did not finish within 5s; stopping anyway");
                left
            }
        }
    }
}

/// Starts an agent. `drain` asks it to drain: send DRAIN to its servers, open no new server stream, and stop
/// by itself once its connections have ended (or at `drain_timeout`, closing the rest). `shutdown` stops it
/// at once.
pub async fn start(
    config: AgentConfig,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    crate::config::validate_identifiers(&config.agent_identifiers).map_err(AgentError::Config)?;
    if config.servers.is_empty() {
        return Err(AgentError::Config("no proxy-server address to dial".into()));
    }
    let targets = config.servers.iter().cloned().map(Target::new).collect::<Result<Vec<_>, _>>()?;
    let mut alpn: Vec<Vec<u8>> = config.alpn_protos.iter().map(|p| p.as_bytes().to_vec()).collect();
    alpn.push(tls::ALPN_H2.to_vec());
    let tls_spec = ClientTlsSpec { ca: config.ca_cert.clone(), identity: config.agent_cert.clone(), alpn };

    // The agent's own stop: the caller's shutdown, or the end of a drain.
    let shutdown = shutdown.child_token();
    let metrics = AgentMetrics::new()?;
    let tracker = TaskTracker::new();
    // The CA and client certificate files are watched: new connections use rotated ones.
    let tls_config = tls_reload::watch_client(
        "agent client",
        tls_spec,
        ReloadOptions { interval: config.tls_reload_interval, on_reload: Some(metrics.tls_reload_hook()) },
        &shutdown,
        &tracker,
    )?;
    let handle = AgentHandle {
        sessions: Arc::new(Mutex::new(HashMap::new())),
        addresses: Arc::new(Mutex::new(Vec::new())),
        session_ended: Arc::new(Notify::new()),
        finish: CancellationToken::new(),
        agent_id: config.agent_id.as_str().into(),
        lease_count: Arc::new(std::sync::atomic::AtomicU32::new(0)),
        metrics: metrics.clone(),
    };
    if let Some(leases) = &config.lease_count {
        let kube_config = konnectivity_kube::Config::load(leases.kubeconfig.as_deref())
            .map_err(|e| AgentError::Config(format!("--count-server-leases: {e}")))?;
        tracing::info!(server = %kube_config.server, source = %kube_config.source, namespace = %leases.namespace,
            selector = %leases.selector, "counting proxy-servers from their leases");
        let client = konnectivity_kube::Client::new(kube_config, 0.0, 0)
            .map_err(|e| AgentError::Config(format!("--count-server-leases: {e}")))?;
        tracker.spawn(crate::lease_counter::run(
            client,
            leases.clone(),
            metrics.clone(),
            handle.lease_count.clone(),
            handle.session_ended.clone(),
            shutdown.clone(),
        ));
    }

    let health_addr = match &config.health {
        Some((bind, port)) => {
            let listener = listen::bind_tcp(bind, *port).await?;
            let addr =
                listener.local_addr().map_err(|source| ListenError::Tcp { addr: "health".into(), cause: source })?;
            let h = handle.clone();
            let handler: Handler = Arc::new(move |req| {
                http_endpoints::ready(match req.uri().path() {
                    "/healthz" => http_endpoints::text(StatusCode::OK, "ok"),
                    "/readyz" | "/ready" => readyz(
                        &h,
                        req.uri()
                            .query()
                            .is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose="))),
                    ),
                    "/metrics" => http_endpoints::metrics(h.metrics().registry()),
                    _ => http_endpoints::text(StatusCode::NOT_FOUND, "404 page not found\n"),
                })
            });
            http_endpoints::serve(listener, handler, shutdown.clone(), &tracker);
            Some(addr)
        }
        None => None,
    };
    let admin_addr = match &config.admin {
        Some((bind, port)) => {
            let listener = listen::bind_tcp(bind, *port).await?;
            let addr =
                listener.local_addr().map_err(|source| ListenError::Tcp { addr: "admin".into(), cause: source })?;
            let health_port = health_addr.map(|a| a.port());
            let h = handle.clone();
            let profiling = config.enable_profiling;
            let handler: Handler = Arc::new(move |req| match (req.uri().path(), health_port) {
                ("/debug/pprof/profile", _) if profiling => http_endpoints::cpu_profile(req.uri().query()),
                ("/debug/connections", _) => http_endpoints::ready(http_endpoints::json(&h.debug_connections())),
                ("/metrics", Some(port)) => {
                    // As the reference: metrics live on the health port; point there.
                    let host =
                        req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
                    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
                    http_endpoints::ready(http_endpoints::redirect(&format!("http://{host}:{port}/metrics")))
                }
                _ => http_endpoints::ready(http_endpoints::text(StatusCode::NOT_FOUND, "404 page not found\n")),
            });
            http_endpoints::serve(listener, handler, shutdown.clone(), &tracker);
            Some(addr)
        }
        None => None,
    };

    let drain_timeout = config.drain_timeout;
    let dialer = Arc::new(Dialer { config: Arc::new(config), tls: tls_config });
    tracker.spawn(crate::server_set::sync_loop(
        dialer,
        targets,
        handle.clone(),
        drain.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    tracker.spawn(crate::drain::drain_then_stop(handle.clone(), drain, drain_timeout, shutdown.clone()));
    Ok(RunningAgent { health_addr, admin_addr, handle, tracker, shutdown })
}

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, drain: CancellationToken, shutdown: CancellationToken) -> Result<(), AgentError> {
    start(config, drain, shutdown).await?.wait().await;
    Ok(())
}

fn readyz(handle: &AgentHandle, verbose: bool) -> http::Response<http_endpoints::Body> {
    let connected = handle.ready();
    let server_line = if connected {
        "[+]server-connected ok".to_string()
    } else {
        "[-]server-connected failed: no servers connected".to_string()
    };
    if connected {
        if verbose {
            http_endpoints::text(StatusCode::OK, format!("[+]ping ok\n{server_line}\nreadyz check passed\n"))
        } else {
            http_endpoints::text(StatusCode::OK, "ok")
        }
    } else {
        http_endpoints::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[+]ping ok\n{server_line}\nreadyz check failed\n"),
        )
    }
}
