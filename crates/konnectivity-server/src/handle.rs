//! [`ServerHandle`]: a cheap, read-only view of a running server, for readiness, tests and `/debug/connections`.

use crate::backend::identifiers::AgentIdentifiers;
use crate::metrics::ServerMetrics;
use crate::tunnels::table::Tunnels;
use std::sync::Arc;
use std::time::Duration;

/// A cheap view of a running server's state, for readiness, tests and debugging.
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) server_id: Arc<str>,
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
        self.tunnels.connection_count()
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
                identity: b.identity.identity.to_string(),
                connected_for: b.connected_at.elapsed(),
                draining: b.is_draining(),
                connections: b.connection_count(),
            })
            .collect()
    }
    /// Agents, pending dials and connections, as `/debug/connections` on the admin port shows them.
    pub fn debug_connections(&self) -> serde_json::Value {
        use serde_json::json;
        let agents: Vec<_> = self
            .tunnels
            .backends
            .all()
            .iter()
            .map(|b| {
                json!({
                    "agent_id": b.agent_id,
                    "peer": b.peer,
                    "credential": {
                        "kind": b.audited.credential,
                        "name": b.audited.identity,
                        "node": b.audited.node,
                        "bound": b.identity.owns_agent_ids && b.audited.node.is_some(),
                    },
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
                    "connections": b.connection_count(),
                })
            })
            .collect();
        json!({
            "server_id": &*self.server_id,
            "agents": agents,
            "pending_dials": self.tunnels.pending_snapshot(),
            "connections": self.tunnels.connections_snapshot(),
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
    pub identifiers: AgentIdentifiers,
    /// Its address.
    pub peer: String,
    /// Who its credential says it is (e.g. `certificate "system:node:node-a" (node node-a)`).
    pub identity: String,
    /// How long the stream has been up.
    pub connected_for: Duration,
    /// Whether it sent DRAIN.
    pub draining: bool,
    /// Connections open on it.
    pub connections: usize,
}
