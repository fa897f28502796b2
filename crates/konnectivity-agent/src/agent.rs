//! The agent's connection manager: dials the proxy-server, keeps one [`Session`] per distinct server ID until
//! it holds as many as the servers announce (`servercount`), reconnects with jittered exponential backoff, and
//! serves health and admin endpoints.

use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::session::Session;
use http::StatusCode;
use hyper_util::rt::TokioIo;
use konnectivity_proto::agent::AgentServiceClient;
use konnectivity_proto::names::{AGENT_ID, AGENT_IDENTIFIERS, SERVER_COUNT, SERVER_ID};
use konnectivity_proto::{Packet, flow};
use konnectivity_transport::error_chain::error_chain;
use konnectivity_transport::http_endpoints::{self, Handler};
use konnectivity_transport::listen::{self, ListenError};
use konnectivity_transport::tls::{self, TlsError};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long the agent waits for a server's response headers (the reference waits forever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Packets queued towards one server stream.
const SERVER_QUEUE_PACKETS: usize = 256;

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
    sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    /// Cancelled by [`AgentHandle::finish`]: every server stream is ended cleanly.
    finish: CancellationToken,
    agent_id: Arc<str>,
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
        serde_json::json!({ "agent_id": &*self.agent_id, "servers": servers })
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

    /// Waits until the agent has stopped (after the shutdown token is cancelled). Returns how many of its
    /// tasks had not finished within 5 s (0 after a clean stop; tests assert it).
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

/// Starts an agent. `drain` asks it to send DRAIN to its servers and stop opening new streams; `shutdown`
/// stops it.
pub async fn start(
    config: AgentConfig,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    crate::config::validate_identifiers(&config.agent_identifiers).map_err(AgentError::Config)?;
    let mut alpn: Vec<Vec<u8>> = config.alpn_protos.iter().map(|p| p.as_bytes().to_vec()).collect();
    alpn.push(tls::ALPN_H2.to_vec());
    let identity = config.agent_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let tls_config = tls::client_config(&config.ca_cert, identity, &alpn)?;
    let server_name = rustls_pki_types::ServerName::try_from(config.server_host.clone())
        .map_err(|e| AgentError::Config(format!("--proxy-server-host {:?}: {e}", config.server_host)))?;

    let metrics = AgentMetrics::new()?;
    let tracker = TaskTracker::new();
    let handle = AgentHandle {
        sessions: Arc::new(Mutex::new(HashMap::new())),
        finish: CancellationToken::new(),
        agent_id: config.agent_id.as_str().into(),
        metrics: metrics.clone(),
    };

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

    let dialer = Dialer { config: Arc::new(config), tls: tls_config, server_name, metrics: metrics.clone() };
    tracker.spawn(sync_loop(dialer, handle.clone(), drain, shutdown.clone(), tracker.clone()));
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

struct Dialer {
    config: Arc<AgentConfig>,
    tls: Arc<rustls::ClientConfig>,
    server_name: rustls_pki_types::ServerName<'static>,
    metrics: AgentMetrics,
}

/// An open stream, before it is known whether its server is new.
struct Opened {
    server_id: String,
    flow_control: bool,
    server_count: u32,
    to_server: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
}

impl Dialer {
    fn addr(&self) -> String {
        listen::join_host_port(&self.config.server_host, self.config.server_port)
    }

    async fn open(&self, finish: &CancellationToken) -> Result<Opened, AgentError> {
        let addr = self.addr();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone());
        let server_name = self.server_name.clone();
        let target = addr.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            let server_name = server_name.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                konnectivity_transport::listen::tune_tcp(&tcp);
                let stream = tls.connect(server_name, tcp).await?;
                if stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
                    return Err(std::io::Error::other("server did not negotiate ALPN h2"));
                }
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| AgentError::Connect { addr: addr.clone(), cause: error_chain(&e) })?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(self.config.keepalive_time)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| AgentError::Connect { addr: addr.clone(), cause: error_chain(&e) })?;
        let mut client = AgentServiceClient::new(channel).max_decoding_message_size(4 << 20);

        let (to_server, rx) = mpsc::channel(SERVER_QUEUE_PACKETS);
        let mut request = tonic::Request::new(outbound_until_finished(rx, finish.clone()));
        let bad = |what: String| AgentError::BadHeaders { addr: addr.clone(), what };
        let md = request.metadata_mut();
        md.insert(
            AGENT_ID,
            self.config
                .agent_id
                .parse()
                .map_err(|_| AgentError::Config("--agent-id is not a valid header value".into()))?,
        );
        md.insert(
            AGENT_IDENTIFIERS,
            self.config
                .agent_identifiers
                .parse()
                .map_err(|_| AgentError::Config("--agent-identifiers is not a valid header value".into()))?,
        );
        md.insert(flow::METADATA_KEY, tonic::metadata::MetadataValue::from_static(flow::VERSION));
        let response = match tokio::time::timeout(HEADER_TIMEOUT, client.connect(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => return Err(AgentError::Stream { addr, status }),
            Err(_) => return Err(AgentError::HeaderTimeout(addr)),
        };
        let header = |key: &str| -> Result<String, AgentError> {
            let values: Vec<_> = response.metadata().get_all(key).iter().collect();
            match values.as_slice() {
                [v] => v.to_str().map(str::to_string).map_err(|_| bad(format!("header {key} is not text"))),
                other => Err(bad(format!("expected one {key} header, got {}", other.len()))),
            }
        };
        let server_id = header(SERVER_ID)?;
        let server_count: u32 =
            header(SERVER_COUNT)?.parse().map_err(|_| bad(format!("{SERVER_COUNT} is not a number")))?;
        let flow_control =
            response.metadata().get(flow::METADATA_KEY).and_then(|v| v.to_str().ok()) == Some(flow::VERSION);
        Ok(Opened { server_id, flow_control, server_count, to_server, inbound: response.into_inner() })
    }
}

/// The packets for one server as a request stream that, once `finish` fires, still yields what is queued and
/// then ends (a clean half-close), instead of being dropped mid-queue.
fn outbound_until_finished(
    rx: mpsc::Receiver<Packet>,
    finish: CancellationToken,
) -> impl futures_util::Stream<Item = Packet> + Send + 'static {
    futures_util::stream::unfold((rx, finish, false), |(mut rx, finish, mut closing)| async move {
        if !closing {
            tokio::select! {
                biased;
                m = rx.recv() => return m.map(|m| (m, (rx, finish, closing))),
                _ = finish.cancelled() => {
                    rx.close();
                    closing = true;
                }
            }
        }
        rx.recv().await.map(|m| (m, (rx, finish, closing)))
    })
}

fn jitter(d: Duration, factor: f64) -> Duration {
    d.mul_f64(1.0 + rand::rng().random_range(0.0..factor))
}

async fn sync_loop(
    dialer: Dialer,
    handle: AgentHandle,
    drain: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let config = dialer.config.clone();
    let mut server_count: u32 = 1;
    let mut backoff = config.sync_interval;
    loop {
        dialer.metrics.known_server_count.set(f64::from(server_count));
        let connected = handle.sessions.lock().len() as u32;
        let want_more =
            !drain.is_cancelled() && !handle.finish.is_cancelled() && (config.sync_forever || connected < server_count);
        let pause = if want_more {
            match dialer.open(&handle.finish).await {
                Ok(opened) => {
                    backoff = config.sync_interval;
                    server_count = opened.server_count.max(1);
                    let mut sessions = handle.sessions.lock();
                    if sessions.contains_key(&opened.server_id) {
                        tracing::debug!(server_id = %opened.server_id, "already connected to this server; closing the duplicate");
                    } else {
                        let session = Session::new(
                            opened.server_id.clone(),
                            opened.to_server,
                            shutdown.child_token(),
                            dialer.metrics.clone(),
                            &config,
                            opened.flow_control,
                            tracker.clone(),
                        );
                        sessions.insert(opened.server_id.clone(), session.clone());
                        dialer.metrics.open_server_connections.set(sessions.len() as f64);
                        tracing::info!(server_id = %opened.server_id, server_count, flow_control = opened.flow_control, "connected to proxy-server");
                        let sessions = handle.sessions.clone();
                        let metrics = dialer.metrics.clone();
                        let drain = drain.clone();
                        let span = tracing::info_span!("server", server_id = %opened.server_id);
                        tracker.spawn(
                            async move {
                                let server_id = session.server_id.clone();
                                session.serve(opened.inbound, drain).await;
                                let mut sessions = sessions.lock();
                                sessions.remove(&server_id);
                                metrics.open_server_connections.set(sessions.len() as f64);
                            }
                            .instrument(span),
                        );
                    }
                    jitter(config.sync_interval, 0.1)
                }
                Err(e) => {
                    dialer.metrics.server_connection_failures.with_label_values(&["to_server"]).inc();
                    tracing::warn!("{e}; retrying in about {backoff:?}");
                    let pause = jitter(backoff, 0.1);
                    backoff = backoff.mul_f64(1.5).min(config.sync_interval_cap);
                    pause
                }
            }
        } else {
            jitter(config.sync_interval, 0.1)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
