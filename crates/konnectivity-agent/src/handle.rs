//! [`AgentHandle`]: a view of a running agent's server streams, for readiness, drain, tests and debugging. The
//! server set (`server_set`) owns what it shows and is the only writer.

use crate::metrics::AgentMetrics;
use crate::session::Session;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One configured server address, as [`AgentHandle::addresses`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressStatus {
    /// The address as configured (`host:port`, `[v6]:port`).
    pub address: String,
    /// IDs of the servers reached through it whose stream is open (several if it is a load balancer).
    pub servers: Vec<String>,
    /// Whether a dial to it is in progress.
    pub dialing: bool,
    /// Why its latest dial failed, if it did (cleared by the next success).
    pub last_error: Option<String>,
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
    /// DIAL_REQs received over every server stream since the start: a drain tells from it that a dial came
    /// and went between two of its looks at [`AgentHandle::connections_in_progress`].
    pub(crate) dials_received: Arc<AtomicU64>,
    pub(crate) metrics: AgentMetrics,
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
    /// DIAL_REQs received from any server since the agent started.
    pub fn dials_received(&self) -> u64 {
        self.dials_received.load(Ordering::SeqCst)
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
    /// Ends every server stream cleanly: each session queues its DRAIN (if it has not yet), then what is queued
    /// for its server is still delivered, then the stream is half-closed, and the session ends when the server
    /// closes its side. No new stream is opened. Used at the end of a drain, so that the last bytes of the last
    /// connections are not lost on exit and every server has read the DRAIN before the stream ends.
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
