//! A running agent: its health and admin endpoints, the [`AgentHandle`] view of its server streams, and the
//! tasks that keep them (`server_set`) and drain them (`drain`).

use crate::config::AgentConfig;
use crate::dialer::{Dialer, Target};
use crate::error::AgentError;
use crate::handle::AgentHandle;
use crate::metrics::AgentMetrics;
use http::StatusCode;
use konnectivity_process::http_endpoints::{self, Endpoints, Ports};
use konnectivity_transport::tls::{self, ClientTlsSpec};
use konnectivity_transport::tls_reload::{self, ReloadOptions};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Starts an agent. `drain` asks it to drain: send DRAIN to its servers, open no new server stream, keep
/// answering the dials servers still send it, and stop by itself once it has carried nothing for
/// `drain_idle_period` (or at `drain_timeout`, closing the rest). `shutdown` stops it at once.
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
        dials_received: Arc::new(std::sync::atomic::AtomicU64::new(0)),
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

    let h = handle.clone();
    let readyz = move |verbose| readyz(&h, verbose);
    let h = handle.clone();
    let endpoints = Endpoints {
        registry: metrics.registry().clone(),
        readyz: Arc::new(readyz),
        debug_connections: Arc::new(move || h.debug_connections()),
        profiling: config.enable_profiling,
    };
    // As the reference's: the admin port's /metrics redirects to the health port's.
    let ports = Ports { health: config.health.as_ref(), admin: config.admin.as_ref(), admin_redirects_metrics: true };
    let bound = endpoints.serve(ports, &shutdown, &tracker).await?;

    let timing = crate::drain::DrainTiming { timeout: config.drain_timeout, idle_period: config.drain_idle_period };
    let dialer = Arc::new(Dialer { config: Arc::new(config), tls: tls_config });
    tracker.spawn(crate::server_set::sync_loop(
        dialer,
        targets,
        handle.clone(),
        drain.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    tracker.spawn(crate::drain::drain_then_stop(handle.clone(), drain, timing, shutdown.clone()));
    Ok(RunningAgent { health_addr: bound.health, admin_addr: bound.admin, handle, tracker, shutdown })
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
