//! Starting and stopping a proxy-server: the tunnel state, the agent listener, the frontend listener, the
//! kube-apiserver clients (token reviews, leases), and the health and admin ports.

use crate::audit::AuditLog;
use crate::auth::TokenAuthenticator;
use crate::backend::manager::BackendManager;
use crate::backend::service::AgentEndpoint;
use crate::config::{FrontendListen, FrontendMode, IdentityMode, ServerConfig, SharedClientCa};
use crate::credentials::ClientAllowList;
use crate::frontend::listen::FrontendServing;
use crate::handle::ServerHandle;
use crate::identity::admission::Admission;
use crate::lease::LeaseController;
use crate::metrics::ServerMetrics;
use crate::tunnels::table::Tunnels;
use http::StatusCode;
use konnectivity_process::http_endpoints::{self, Endpoints, Ports};
use konnectivity_proto::agent::AgentServiceServer;
use konnectivity_transport::listen::{self, ListenError, TlsAccept};
use konnectivity_transport::tls::{ALPN_H2, ClientAuth, ServerTlsSpec, TlsError};
use konnectivity_transport::tls_reload::{self, ReloadOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// The configuration is unsafe or inconsistent.
    #[error("{0}")]
    Config(String),
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
    let (auth, kube) = start_kube_clients(&config, &metrics, &shutdown, &tracker)?;
    let admission = Arc::new(Admission::new(config.agent_identity.clone(), kube));
    let agent_addr = start_agent_listener(&config, &tunnels, (auth, admission), &shutdown, &tracker).await?;
    let frontend_addr = start_frontend(&config, &tunnels, &shutdown, &tracker).await?;

    let handle = ServerHandle { tunnels: tunnels.clone(), server_id: config.server_id.as_str().into() };
    let h = handle.clone();
    let readyz = move |_verbose| {
        if h.ready() {
            http_endpoints::text(StatusCode::OK, "ok")
        } else {
            http_endpoints::text(StatusCode::INTERNAL_SERVER_ERROR, "no connection to any proxy agent")
        }
    };
    let h = handle.clone();
    let endpoints = Endpoints {
        registry: metrics.registry().clone(),
        readyz: Arc::new(readyz),
        debug_connections: Arc::new(move || h.debug_connections()),
        profiling: config.enable_profiling,
    };
    let ports = Ports { health: config.health.as_ref(), admin: config.admin.as_ref(), admin_redirects_metrics: false };
    let bound = endpoints.serve(ports, &shutdown, &tracker).await?;

    Ok(RunningServer {
        frontend_addr,
        agent_addr,
        health_addr: bound.health,
        admin_addr: bound.admin,
        server_id: config.server_id,
        handle,
        tracker,
        grace: config.graceful_shutdown_timeout,
        shutdown,
    })
}

/// The token authenticator and the client agent identity reads nodes with.
type KubeClients = (Option<Arc<TokenAuthenticator>>, Option<konnectivity_kube::Client>);

/// The kube-apiserver client, when token auth or leases need it, or `--kubeconfig` is given for agent identity's
/// node reads: starts the lease controller, and returns the token authenticator and the client.
fn start_kube_clients(
    config: &ServerConfig,
    metrics: &ServerMetrics,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<KubeClients, ServerError> {
    let for_identity = config.agent_identity.mode != IdentityMode::Trust && config.kube.kubeconfig.is_some();
    if config.agent_auth.is_none() && config.lease.is_none() && !for_identity {
        return Ok((None, None));
    }
    let kube_config = konnectivity_kube::Config::load(config.kube.kubeconfig.as_deref())?;
    tracing::info!(server = %kube_config.server, source = %kube_config.source, "kube-apiserver client");
    let client = konnectivity_kube::Client::new(kube_config, config.kube.qps, config.kube.burst)?;
    if let Some(lease) = &config.lease {
        let controller = LeaseController::new(client.clone(), lease.clone(), &config.server_id, metrics.clone());
        tracker.spawn(controller.run(shutdown.clone()));
    }
    let auth = config.agent_auth.as_ref().map(|a| {
        tracing::info!(namespace = %a.namespace, service_account = %a.service_account, audience = %a.audience,
            "agents authenticate with ServiceAccount tokens");
        Arc::new(TokenAuthenticator::new(client.clone(), a.clone(), metrics.agent_auth.clone()))
    });
    Ok((auth, Some(client)))
}

/// Binds the agent port (always TLS; mTLS when a cluster CA is configured) and serves `/AgentService/Connect`
/// on it. Its files are watched: new handshakes use rotated certificates, established streams are untouched.
async fn start_agent_listener(
    config: &ServerConfig,
    tunnels: &Arc<Tunnels>,
    (auth, admission): (Option<Arc<TokenAuthenticator>>, Arc<Admission>),
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, ServerError> {
    let client_auth = config.cluster_ca.clone().map(ClientAuth::Require).unwrap_or(ClientAuth::None);
    let agent_tls = tls_reload::watch_server(
        "agent listener",
        tls_spec(config, &config.cluster_cert, &config.cluster_key, client_auth, &[ALPN_H2]),
        ReloadOptions {
            interval: config.tls_reload_interval,
            on_reload: Some(tunnels.metrics.tls_reload_hook("agent")),
        },
        shutdown,
        tracker,
    )?;
    let listener = listen::bind_tcp(&config.agent_bind, config.agent_port).await?;
    let agent_addr =
        listener.local_addr().map_err(|source| ListenError::Tcp { addr: "agent".into(), cause: source })?;
    let incoming = listen::tls_incoming(
        listener,
        agent_tls,
        shutdown.clone(),
        tracker.clone(),
        tls_accept(config, tunnels, "agent"),
    );
    let service = AgentServiceServer::new(AgentEndpoint {
        tunnels: tunnels.clone(),
        server_id: config.server_id.clone(),
        server_count: config.server_count,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        auth,
        admission,
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_time))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(Some(config.max_agent_streams))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .add_service(service);
    let token = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, token.cancelled_owned()).await {
            tracing::error!("agent gRPC server: {e}");
        }
    });
    tracing::info!(%agent_addr, mtls = config.cluster_ca.is_some(), "listening for agents");
    Ok(agent_addr)
}

/// Binds the frontend listener (UDS or mTLS TCP) and serves the configured protocol on it.
async fn start_frontend(
    config: &ServerConfig,
    tunnels: &Arc<Tunnels>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<FrontendAddr, ServerError> {
    let serving = FrontendServing {
        tunnels: tunnels.clone(),
        mode: config.mode,
        backend_dial_timeout: config.backend_dial_timeout,
        hangup_grace: config.connect_hangup_grace,
        keepalive_time: config.frontend_keepalive_time,
        max_connect_handlers: config.max_connect_connections,
        max_streams: config.max_frontend_streams,
        allowed: Arc::new(ClientAllowList::new(config.frontend_client_names.clone())),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    match &config.frontend {
        FrontendListen::Uds { path, delete_existing } => {
            let listener = listen::bind_uds(path, *delete_existing)?;
            serving.serve(UnixListenerStream::new(listener));
            tracing::info!(path = %path.display(), mode = ?config.mode, "listening for frontends on unix socket");
            Ok(FrontendAddr::Uds(path.clone()))
        }
        FrontendListen::Tcp { bind, port, cert, key, ca } => {
            check_client_cas(config, ca)?;
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
            let accept = tls_accept(config, tunnels, "frontend");
            serving.serve(listen::tls_incoming(listener, tls, shutdown.clone(), tracker.clone(), accept));
            tracing::info!(%addr, mode = ?config.mode, "listening for frontends on TCP with mTLS");
            Ok(FrontendAddr::Tcp(addr))
        }
    }
}

/// Warns (or, with `--shared-client-ca=refuse`, refuses to start) when one certificate is in both the agent CA
/// and the frontend CA bundles and nothing else tells agents and frontend clients apart: any agent's certificate
/// would then open tunnels through the frontend. `--frontend-client-names` (clients must carry one of those
/// names) resolves it.
fn check_client_cas(config: &ServerConfig, frontend_ca: &std::path::Path) -> Result<(), ServerError> {
    let Some(agent_ca) = &config.cluster_ca else { return Ok(()) };
    let agent = konnectivity_transport::tls::load_certs(agent_ca)?;
    let frontend = konnectivity_transport::tls::load_certs(frontend_ca)?;
    if !agent.iter().any(|c| frontend.contains(c)) {
        return Ok(());
    }
    let what = format!(
        "--cluster-ca-cert {} and --server-ca-cert {} share a certificate: agent certificates would be accepted by \
         the frontend",
        agent_ca.display(),
        frontend_ca.display()
    );
    if !config.frontend_client_names.is_empty() {
        tracing::info!("{what}; only clients named in --frontend-client-names are admitted there");
        return Ok(());
    }
    match config.shared_client_ca {
        SharedClientCa::Allow => Ok(()),
        SharedClientCa::Warn => {
            tracing::warn!(
                "{what}: any agent credential can open tunnels through the frontend. Set --frontend-client-names to \
                 the frontend clients' certificate names (or sign them with another CA); --shared-client-ca=refuse \
                 makes this fatal, --shared-client-ca=allow silences it"
            );
            Ok(())
        }
        SharedClientCa::Refuse => Err(ServerError::Config(format!(
            "{what}; set --frontend-client-names to the frontend clients' certificate names (or sign them with \
             another CA), or accept it with --shared-client-ca=warn or allow"
        ))),
    }
}

/// How the TLS listener `what` accepts: its handshake failures counted, its handshakes bounded.
fn tls_accept(config: &ServerConfig, tunnels: &Tunnels, what: &'static str) -> TlsAccept {
    TlsAccept {
        what,
        on_failure: Some(tunnels.metrics.handshake_failure_hook(what)),
        max_handshakes: config.max_handshakes,
        max_per_source: config.max_handshakes_per_source,
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

/// Runs a server until `shutdown` is cancelled and it has stopped.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
