//! Starting and stopping a proxy-server: listeners, the two gRPC services, health and admin ports.

use crate::audit::{AuditLog, ClientIdentity};
use crate::auth::TokenAuthenticator;
use crate::backend::{AgentEndpoint, BackendManager};
use crate::config::{FrontendListen, FrontendMode, ServerConfig};
use crate::connect::ConnectFrontend;
use crate::frontend::ProxyEndpoint;
use crate::lease::LeaseController;
use crate::metrics::ServerMetrics;
use crate::state::Tunnels;
use futures_util::StreamExt;
use http::StatusCode;
use konnectivity_proto::agent::AgentServiceServer;
use konnectivity_proto::proxy::ProxyServiceServer;
use konnectivity_transport::h2_authority::AuthorityFix;
use konnectivity_transport::http_endpoints::{self, Handler};
use konnectivity_transport::listen::{self, ListenError};
use konnectivity_transport::tls::{ALPN_H2, ClientAuth, ServerTlsSpec, TlsError};
use konnectivity_transport::tls_reload::{self, ReloadOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The metrics registry refused a metric (a programming error).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The audit log could not be opened, or its writer not started.
    #[error("{0}")]
    Audit(std::io::Error),
    /// The Kubernetes client (token auth, leases) could not be set up.
    #[error(transparent)]
    Kube(#[from] konnectivity_kube::KubeError),
    /// A gRPC server failed.
    #[error("{what} gRPC server: {source}")]
    Grpc {
        /// Which one.
        what: &'static str,
        /// The error.
        source: tonic::transport::Error,
    },
}

/// Where a running server's frontend listens.
#[derive(Debug, Clone)]
pub enum FrontendAddr {
    /// The Unix socket path.
    Uds(PathBuf),
    /// The TCP address.
    Tcp(SocketAddr),
}

/// A started server. Dropping it does not stop it: cancel the token given to [`start`] and await [`wait`].
///
/// [`wait`]: RunningServer::wait
pub struct RunningServer {
    /// Where the frontend listens.
    pub frontend_addr: FrontendAddr,
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    /// The health port, if enabled.
    pub health_addr: Option<SocketAddr>,
    /// The admin port, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The server's ID.
    pub server_id: String,
    handle: ServerHandle,
    tracker: TaskTracker,
    grace: Duration,
    shutdown: CancellationToken,
}

/// A cheap view of a running server's state, for readiness, tests and debugging.
#[derive(Clone)]
pub struct ServerHandle {
    tunnels: Arc<Tunnels>,
    server_id: Arc<str>,
}

impl ServerHandle {
    /// Number of distinct agents connected.
    pub fn agent_count(&self) -> usize {
        self.tunnels.backends.agent_count()
    }
    /// Dials sent to agents and not yet answered.
    pub fn pending_dials(&self) -> usize {
        self.tunnels.pending_count()
    }
    /// Connections established through agents (including ones whose close is in progress).
    pub fn established_connections(&self) -> usize {
        self.tunnels.backends.all().iter().map(|b| b.conns.lock().len()).sum()
    }
    /// The agent streams connected now.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.tunnels
            .backends
            .all()
            .iter()
            .map(|b| AgentInfo {
                agent_id: b.agent_id.clone(),
                identifiers: b.identifiers.clone(),
                peer: b.peer.clone(),
                connected_for: b.connected_at.elapsed(),
                draining: b.is_draining(),
                connections: b.conns.lock().len(),
            })
            .collect()
    }
    /// Agents, pending dials and connections, as `/debug/connections` on the admin port shows them.
    pub fn debug_connections(&self) -> serde_json::Value {
        use crate::backend::ConnState;
        use serde_json::json;
        use std::sync::atomic::Ordering;
        let backends = self.tunnels.backends.all();
        let agents: Vec<_> = backends
            .iter()
            .map(|b| {
                json!({
                    "agent_id": b.agent_id,
                    "peer": b.peer,
                    "identifiers": {
                        "host": b.identifiers.hosts,
                        "ipv4": b.identifiers.ipv4,
                        "ipv6": b.identifiers.ipv6,
                        "cidr": b.identifiers.cidrs,
                        "default_route": b.identifiers.default_route,
                    },
                    "connected_seconds": b.connected_at.elapsed().as_secs_f64(),
                    "draining": b.is_draining(),
                    "flow_control": b.flow_control,
                    "connections": b.conns.lock().len(),
                })
            })
            .collect();
        let mut connections = Vec::new();
        for b in &backends {
            for (connect_id, state) in b.conns.lock().iter() {
                connections.push(match state {
                    ConnState::Open { frontend, link } => json!({
                        "agent_id": b.agent_id,
                        "connect_id": connect_id,
                        "dial_id": link.dial_id,
                        "address": link.address,
                        "frontend": frontend.kind,
                        "state": "open",
                        "age_seconds": link.established.elapsed().as_secs_f64(),
                        "bytes_to_frontend": link.to_frontend.load(Ordering::Relaxed),
                        "bytes_to_agent": link.to_agent.load(Ordering::Relaxed),
                        "queued_bytes": frontend.queued(),
                    }),
                    ConnState::Closing { .. } => {
                        json!({ "agent_id": b.agent_id, "connect_id": connect_id, "state": "closing" })
                    }
                });
            }
        }
        json!({
            "server_id": &*self.server_id,
            "agents": agents,
            "pending_dials": self.tunnels.pending_snapshot(),
            "connections": connections,
        })
    }
    /// The server's metrics.
    pub fn metrics(&self) -> &ServerMetrics {
        &self.tunnels.metrics
    }
    /// Whether the server can serve dials (an agent is connected).
    pub fn ready(&self) -> bool {
        self.agent_count() > 0
    }
}

/// One connected agent stream, as [`ServerHandle::agents`] reports it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// The agent's ID.
    pub agent_id: String,
    /// What it advertised.
    pub identifiers: crate::AgentIdentifiers,
    /// Its address.
    pub peer: String,
    /// How long the stream has been up.
    pub connected_for: Duration,
    /// Whether it sent DRAIN.
    pub draining: bool,
    /// Connections open on it.
    pub connections: usize,
}

impl RunningServer {
    /// A view of the server's state.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Waits until the server has stopped (after the shutdown token is cancelled), cutting whatever is left
    /// once the graceful-shutdown timeout has passed. Returns how many of its tasks had not finished by then
    /// (0 after a clean stop; tests assert it).
    pub async fn wait(self) -> usize {
        self.shutdown.cancelled().await;
        self.tracker.close();
        let grace = if self.grace.is_zero() { Duration::from_secs(5) } else { self.grace };
        let left = match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = self.tracker.len();
                tracing::warn!("{left} tasks did not finish within {grace:?}; stopping anyway");
                left
            }
        };
        // Every connection's last event is recorded by now: write what is queued, then stop the writer.
        self.handle.tunnels.audit.stop(AUDIT_FLUSH_LIMIT).await;
        if let FrontendAddr::Uds(path) = &self.frontend_addr {
            let _ = std::fs::remove_file(path);
        }
        left
    }
}

/// How long a stopping server waits for the audit log writer to write what is queued.
const AUDIT_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Starts a server: binds every listener, then serves until `shutdown` is cancelled.
pub async fn start(config: ServerConfig, shutdown: CancellationToken) -> Result<RunningServer, ServerError> {
    let metrics = ServerMetrics::new()?;
    let backends = BackendManager::new(metrics.clone(), config.proxy_strategies.clone());
    // If starting fails later, dropping the log closes its queue and the writer thread ends by itself.
    let audit = match &config.audit {
        Some(audit) => {
            AuditLog::start(audit, &config.server_id, metrics.audit_counters()).map_err(ServerError::Audit)?
        }
        None => AuditLog::disabled(),
    };
    let tunnels =
        Arc::new(Tunnels::new(backends, metrics.clone(), config.egress_policy.clone(), audit, shutdown.clone()));
    let tracker = TaskTracker::new();

    // kube-apiserver, for TokenReviews and Leases.
    let kube = if config.agent_auth.is_some() || config.lease.is_some() {
        let kube_config = konnectivity_kube::Config::load(config.kube.kubeconfig.as_deref())?;
        tracing::info!(server = %kube_config.server, source = %kube_config.source, "kube-apiserver client");
        Some(konnectivity_kube::Client::new(kube_config, config.kube.qps, config.kube.burst)?)
    } else {
        None
    };
    let auth = match (&config.agent_auth, &kube) {
        (Some(a), Some(client)) => {
            tracing::info!(namespace = %a.namespace, service_account = %a.service_account, audience = %a.audience,
                "agents authenticate with ServiceAccount tokens");
            Some(Arc::new(TokenAuthenticator::new(client.clone(), a.clone(), metrics.agent_auth.clone())))
        }
        _ => None,
    };
    if let (Some(lease), Some(client)) = (&config.lease, &kube) {
        let controller = LeaseController::new(client.clone(), lease.clone(), &config.server_id, metrics.clone());
        tracker.spawn(controller.run(shutdown.clone()));
    }

    // Agent port: always TLS; mTLS when a cluster CA is configured.
    // Its files are watched: new handshakes use rotated certificates, established streams are untouched.
    let client_auth = config.cluster_ca.clone().map(ClientAuth::Require).unwrap_or(ClientAuth::None);
    let agent_tls = tls_reload::watch_server(
        "agent listener",
        tls_spec(&config, &config.cluster_cert, &config.cluster_key, client_auth, &[ALPN_H2]),
        ReloadOptions { interval: config.tls_reload_interval, on_reload: Some(metrics.tls_reload_hook("agent")) },
        &shutdown,
        &tracker,
    )?;
    let agent_listener = listen::bind_tcp(&config.agent_bind, config.agent_port).await?;
    let agent_addr =
        agent_listener.local_addr().map_err(|source| ListenError::Tcp { addr: "agent".into(), cause: source })?;
    let agent_incoming = listen::tls_incoming(
        agent_listener,
        agent_tls,
        shutdown.clone(),
        tracker.clone(),
        "agent",
        Some(metrics.handshake_failure_hook("agent")),
    );
    let agent_service = AgentServiceServer::new(AgentEndpoint {
        tunnels: tunnels.clone(),
        server_id: config.server_id.clone(),
        server_count: config.server_count,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        auth,
    });
    let agent_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_time))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .add_service(agent_service);
    let token = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = agent_server.serve_with_incoming_shutdown(agent_incoming, token.cancelled_owned()).await {
            tracing::error!("agent gRPC server: {e}");
        }
    });
    tracing::info!(%agent_addr, mtls = config.cluster_ca.is_some(), "listening for agents");

    let frontend_addr = start_frontend(&config, &tunnels, &shutdown, &tracker).await?;

    let handle = ServerHandle { tunnels: tunnels.clone(), server_id: config.server_id.as_str().into() };
    let health_addr = match &config.health {
        Some((bind, port)) => {
            let listener = listen::bind_tcp(bind, *port).await?;
            let addr =
                listener.local_addr().map_err(|source| ListenError::Tcp { addr: "health".into(), cause: source })?;
            let h = handle.clone();
            let handler: Handler = Arc::new(move |req| {
                http_endpoints::ready(match req.uri().path() {
                    "/healthz" => http_endpoints::text(StatusCode::OK, "ok"),
                    "/readyz" | "/ready" => {
                        if h.ready() {
                            http_endpoints::text(StatusCode::OK, "ok")
                        } else {
                            http_endpoints::text(StatusCode::INTERNAL_SERVER_ERROR, "no connection to any proxy agent")
                        }
                    }
                    "/metrics" => http_endpoints::metrics(h.metrics().registry()),
                    _ => http_endpoints::text(StatusCode::NOT_FOUND, "404 page not found\n"),
                })
            });
            http_endpoints::serve(listener, handler, shutdown.clone(), &tracker);
            tracing::info!(%addr, "health endpoints listening");
            Some(addr)
        }
        None => None,
    };
    let admin_addr = match &config.admin {
        Some((bind, port)) => {
            let listener = listen::bind_tcp(bind, *port).await?;
            let addr =
                listener.local_addr().map_err(|source| ListenError::Tcp { addr: "admin".into(), cause: source })?;
            let h = handle.clone();
            let profiling = config.enable_profiling;
            let handler: Handler = Arc::new(move |req| match req.uri().path() {
                "/metrics" => http_endpoints::ready(http_endpoints::metrics(h.metrics().registry())),
                "/debug/connections" => http_endpoints::ready(http_endpoints::json(&h.debug_connections())),
                "/debug/pprof/profile" if profiling => http_endpoints::cpu_profile(req.uri().query()),
                _ => http_endpoints::ready(http_endpoints::text(StatusCode::NOT_FOUND, "404 page not found\n")),
            });
            http_endpoints::serve(listener, handler, shutdown.clone(), &tracker);
            tracing::info!(%addr, "admin endpoints listening");
            Some(addr)
        }
        None => None,
    };

    Ok(RunningServer {
        frontend_addr,
        agent_addr,
        health_addr,
        admin_addr,
        server_id: config.server_id,
        handle,
        tracker,
        grace: config.graceful_shutdown_timeout,
        shutdown,
    })
}

/// Binds the frontend listener (UDS or mTLS TCP) and serves the configured protocol on it.
async fn start_frontend(
    config: &ServerConfig,
    tunnels: &Arc<Tunnels>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<FrontendAddr, ServerError> {
    let grpc = || {
        let service = ProxyServiceServer::new(ProxyEndpoint {
            tunnels: tunnels.clone(),
            backend_dial_timeout: config.backend_dial_timeout,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        });
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.frontend_keepalive_time))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .add_service(service)
    };
    let connect = Arc::new(ConnectFrontend {
        tunnels: tunnels.clone(),
        backend_dial_timeout: config.backend_dial_timeout,
        hangup_grace: config.connect_hangup_grace,
        shutdown: shutdown.clone(),
    });
    let token = shutdown.clone();
    match &config.frontend {
        FrontendListen::Uds { path, delete_existing } => {
            let listener = listen::bind_uds(path, *delete_existing)?;
            let incoming = UnixListenerStream::new(listener);
            match config.mode {
                FrontendMode::Grpc => {
                    let router = grpc();
                    // grpc-go sends the percent-encoded socket path as :authority, which h2 refuses.
                    let incoming = incoming.map(|r| r.map(AuthorityFix::new));
                    tracker.spawn(async move {
                        if let Err(e) = router.serve_with_incoming_shutdown(incoming, token.cancelled_owned()).await {
                            tracing::error!("frontend gRPC server: {e}");
                        }
                    });
                }
                FrontendMode::HttpConnect => serve_connect(
                    incoming.map(|r| {
                        r.map(|s| {
                            let client = ClientIdentity::unix(&s);
                            (s, client)
                        })
                    }),
                    connect,
                    token,
                    tracker,
                ),
            }
            tracing::info!(path = %path.display(), mode = ?config.mode, "listening for frontends on unix socket");
            Ok(FrontendAddr::Uds(path.clone()))
        }
        FrontendListen::Tcp { bind, port, cert, key, ca } => {
            // HTTP CONNECT is HTTP/1.1 only, as in the reference (which disables h2 there).
            let alpn: &[&[u8]] = match config.mode {
                FrontendMode::Grpc => &[ALPN_H2],
                FrontendMode::HttpConnect => &[b"http/1.1"],
            };
            let tls = tls_reload::watch_server(
                "frontend listener",
                tls_spec(config, cert, key, ClientAuth::Require(ca.clone()), alpn),
                ReloadOptions {
                    interval: config.tls_reload_interval,
                    on_reload: Some(tunnels.metrics.tls_reload_hook("frontend")),
                },
                shutdown,
                tracker,
            )?;
            let listener = listen::bind_tcp(bind, *port).await?;
            let addr =
                listener.local_addr().map_err(|source| ListenError::Tcp { addr: "frontend".into(), cause: source })?;
            let incoming = listen::tls_incoming(
                listener,
                tls,
                shutdown.clone(),
                tracker.clone(),
                "frontend",
                Some(tunnels.metrics.handshake_failure_hook("frontend")),
            );
            match config.mode {
                FrontendMode::Grpc => {
                    let router = grpc();
                    tracker.spawn(async move {
                        if let Err(e) = router.serve_with_incoming_shutdown(incoming, token.cancelled_owned()).await {
                            tracing::error!("frontend gRPC server: {e}");
                        }
                    });
                }
                FrontendMode::HttpConnect => serve_connect(
                    incoming.map(|r| {
                        r.map(|c| {
                            let client = ClientIdentity::tls(c.info());
                            (c, client)
                        })
                    }),
                    connect,
                    token,
                    tracker,
                ),
            }
            tracing::info!(%addr, mode = ?config.mode, "listening for frontends on TCP with mTLS");
            Ok(FrontendAddr::Tcp(addr))
        }
    }
}

/// A TLS listener's spec: its files, and the configured TLS versions and cipher suites.
fn tls_spec(
    config: &ServerConfig,
    cert: &std::path::Path,
    key: &std::path::Path,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> ServerTlsSpec {
    let mut spec = ServerTlsSpec::new(cert, key, client_auth, alpn);
    spec.min_version = config.tls_min_version;
    spec.cipher_suites = config.cipher_suites.clone();
    spec
}

/// Runs one CONNECT handler task per accepted connection until `shutdown`.
fn serve_connect<S, IO>(
    mut incoming: S,
    frontend: Arc<ConnectFrontend>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) where
    S: futures_util::Stream<Item = std::io::Result<(IO, ClientIdentity)>> + Send + Unpin + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + konnectivity_transport::listen::SocketFd
        + Unpin
        + Send
        + 'static,
{
    let handlers = tracker.clone();
    tracker.spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = incoming.next() => n,
            };
            match next {
                Some(Ok((io, peer))) => {
                    let span = tracing::debug_span!("connect", %peer);
                    handlers.spawn(frontend.clone().handle(io, peer).instrument(span));
                }
                Some(Err(e)) => {
                    tracing::warn!("frontend accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => return,
            }
        }
    });
}

/// Runs a server until `shutdown` is cancelled and it has stopped.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
