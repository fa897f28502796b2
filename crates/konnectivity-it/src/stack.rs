//! A real proxy-server and proxy-agent on loopback, in-process, on free ports and a temporary socket.

use konnectivity_agent::{AgentConfig, AgentHandle};
use konnectivity_client::{ProxyAddress, Tunnel};
use konnectivity_server::{FrontendAddr, FrontendListen, ServerConfig, ServerHandle};
use konnectivity_testkit::TempDir;
use konnectivity_testkit::pki::Pki;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which frontend listener the server gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// gRPC on a Unix socket.
    Uds,
    /// gRPC on TCP with mTLS on loopback.
    TcpMtls,
    /// HTTP CONNECT on a Unix socket.
    ConnectUds,
    /// HTTP CONNECT on TCP with mTLS on loopback.
    ConnectTcpMtls,
}

/// A running server. [`ServerRun::stop`] stops it and checks that nothing of it is left; dropped without that
/// (a test that failed first), it is told to stop all the same.
pub struct ServerRun {
    /// Its state.
    pub handle: ServerHandle,
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    /// Where the frontend listens.
    pub frontend_addr: FrontendAddr,
    /// The health port.
    pub health_addr: Option<SocketAddr>,
    /// The admin port.
    pub admin_addr: Option<SocketAddr>,
    stop: CancellationToken,
    task: Option<JoinHandle<usize>>,
}

impl ServerRun {
    /// Stops the server, waits until it has, and checks that every one of its tasks ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let left = self.task.take().expect("stopped once").await.expect("server task");
        assert_eq!(left, 0, "{left} server tasks were still running after the stop");
    }
}

impl Drop for ServerRun {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A running agent. [`AgentRun::stop`] stops it and checks that nothing of it is left; dropped without that (a
/// test that failed first), it is told to stop all the same.
pub struct AgentRun {
    /// Its state.
    pub handle: AgentHandle,
    /// The health port.
    pub health_addr: Option<SocketAddr>,
    /// The admin port.
    pub admin_addr: Option<SocketAddr>,
    /// Asks it to drain.
    pub drain: CancellationToken,
    stop: CancellationToken,
    task: Option<JoinHandle<usize>>,
}

impl AgentRun {
    /// Whether the agent has stopped (by itself, at the end of a drain, since nothing else stops it before
    /// [`AgentRun::stop`]).
    pub fn has_stopped(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the agent, waits until it has, and checks that every one of its tasks ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let left = self.task.take().expect("stopped once").await.expect("agent task");
        assert_eq!(left, 0, "{left} agent tasks were still running after the stop");
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A throwaway PKI and the places a server and agent of a test live.
pub struct Stack {
    /// The certificates.
    pub pki: Pki,
    /// The frontend socket path (UDS mode).
    pub uds: PathBuf,
    dir: TempDir,
}

impl Stack {
    /// Creates the PKI in a fresh temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = TempDir::new("konnectivity-it")?;
        let pki = Pki::generate(dir.path())?;
        let uds = dir.path().join("konnectivity-server.socket");
        Ok(Self { pki, uds, dir })
    }

    /// The temporary directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A server configuration on free loopback ports, with an mTLS agent port.
    pub fn server_config(&self, frontend: Frontend) -> ServerConfig {
        let listen = match frontend {
            Frontend::Uds | Frontend::ConnectUds => {
                FrontendListen::Uds { path: self.uds.clone(), delete_existing: true }
            }
            Frontend::TcpMtls | Frontend::ConnectTcpMtls => FrontendListen::Tcp {
                bind: "127.0.0.1".into(),
                port: 0,
                cert: self.pki.server_cert.clone(),
                key: self.pki.server_key.clone(),
                ca: self.pki.ca.clone(),
            },
        };
        let mut c = ServerConfig::new(listen, self.pki.server_cert.clone(), self.pki.server_key.clone());
        if matches!(frontend, Frontend::ConnectUds | Frontend::ConnectTcpMtls) {
            c.mode = konnectivity_server::FrontendMode::HttpConnect;
        }
        c.agent_bind = "127.0.0.1".into();
        c.agent_port = 0;
        c.cluster_ca = Some(self.pki.ca.clone());
        c.health = Some(("127.0.0.1".into(), 0));
        c.admin = Some(("127.0.0.1".into(), 0));
        c.graceful_shutdown_timeout = Duration::from_secs(2);
        c
    }

    /// Starts a server with `config`.
    pub async fn start_server(&self, config: ServerConfig) -> anyhow::Result<ServerRun> {
        let stop = CancellationToken::new();
        let running = konnectivity_server::start(config, stop.clone()).await?;
        Ok(ServerRun {
            handle: running.handle(),
            agent_addr: running.agent_addr,
            frontend_addr: running.frontend_addr.clone(),
            health_addr: running.health_addr,
            admin_addr: running.admin_addr,
            stop,
            task: Some(tokio::spawn(running.wait())),
        })
    }

    /// An agent configuration for a server's agent port, with a client certificate and fast reconnects.
    pub fn agent_config(&self, agent_addr: SocketAddr) -> AgentConfig {
        let mut c = AgentConfig::new("127.0.0.1", agent_addr.port(), self.pki.ca.clone());
        c.agent_cert = Some((self.pki.agent_cert.clone(), self.pki.agent_key.clone()));
        c.sync_interval = Duration::from_millis(100);
        c.sync_interval_cap = Duration::from_millis(500);
        // A drained agent leaves soon after its last connection (tests of the idle period set their own).
        c.drain_idle_period = Duration::from_millis(200);
        c.health = Some(("127.0.0.1".into(), 0));
        c.admin = Some(("127.0.0.1".into(), 0));
        c
    }

    /// The flags a `proxy-agent` process (ours or the Go reference) needs to reach a server's agent port on
    /// loopback with this stack's CA and agent certificate.
    pub fn agent_process_flags(&self, agent_port: u16) -> Vec<String> {
        vec![
            format!("--ca-cert={}", self.pki.ca.display()),
            format!("--agent-cert={}", self.pki.agent_cert.display()),
            format!("--agent-key={}", self.pki.agent_key.display()),
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={agent_port}"),
        ]
    }

    /// Starts an agent with `config`.
    pub async fn start_agent(&self, config: AgentConfig) -> anyhow::Result<AgentRun> {
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let running = konnectivity_agent::start(config, drain.clone(), stop.clone()).await?;
        Ok(AgentRun {
            handle: running.handle(),
            health_addr: running.health_addr,
            admin_addr: running.admin_addr,
            drain,
            stop,
            task: Some(tokio::spawn(running.wait())),
        })
    }

    /// The client-side address of a server's frontend.
    pub fn proxy_address(&self, server: &ServerRun) -> anyhow::Result<ProxyAddress> {
        Ok(match &server.frontend_addr {
            FrontendAddr::Uds(p) => ProxyAddress::Uds(p.clone()),
            FrontendAddr::Tcp(a) => ProxyAddress::tcp_mtls(
                a.ip().to_string(),
                a.port(),
                &self.pki.ca,
                &self.pki.client_cert,
                &self.pki.client_key,
            )?,
        })
    }

    /// A single-use tunnel to a server.
    pub async fn tunnel(&self, server: &ServerRun) -> anyhow::Result<Tunnel> {
        Ok(Tunnel::connect_single_use(&self.proxy_address(server)?).await?)
    }
}

/// How many dials an agent made (its `dial_duration_seconds` count).
pub fn dials(agent: &AgentRun) -> u64 {
    let registry = agent.handle.metrics().registry();
    let samples = crate::metrics::samples(registry, "konnectivity_network_proxy_agent_dial_duration_seconds");
    samples.first().map(|m| m.get_histogram().get_sample_count()).unwrap_or(0)
}

/// Starts a server (with `frontend`) and an agent, and waits until the agent is connected.
pub async fn server_and_agent(stack: &Stack, frontend: Frontend) -> anyhow::Result<(ServerRun, AgentRun)> {
    let server = stack.start_server(stack.server_config(frontend)).await?;
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(server.handle.ready() && agent.handle.ready()) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("agent did not connect within 10s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((server, agent))
}

/// Waits until server and agent hold no dial and no connection; panics with what is left otherwise.
pub async fn assert_settled(server: &ServerRun, agent: Option<&AgentRun>) {
    let left = || {
        let metrics = server.handle.metrics();
        (
            server.handle.pending_dials(),
            server.handle.established_connections(),
            metrics.pending_backend_dials(),
            metrics.established_connections(),
            agent.map(|a| a.handle.endpoint_connections()).unwrap_or(0),
            agent.map(|a| a.handle.metrics().open_endpoint_connections()).unwrap_or(0.0),
        )
    };
    crate::eventually!(
        10,
        left() == (0, 0, 0.0, 0.0, 0, 0.0),
        "not settled: (server pending dials, established connections, their gauges; agent endpoint connections, \
         its gauge) = {:?}",
        left()
    );
}
