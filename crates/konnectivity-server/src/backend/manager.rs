//! The connected agents: their streams by agent ID, the strategies that pick one for a dial
//! ([`crate::routing`]), and the probe that finds an agent's dead older stream.

use crate::backend::stream::Backend;
use crate::identity::{Refusal, RefusalReason};
use crate::metrics::ServerMetrics;
use crate::routing::{self, Strategy};
use konnectivity_proto::Packet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// When an agent opens a stream while the server still holds an older one of the same agent ID, the older one
/// is probed (a `CLOSE_REQ` for connection ID 0, which every agent answers with a `CLOSE_RSP`); if nothing at
/// all arrives on it within this time it is dead (a half-open connection the agent has already given up on)
/// and is dropped, so dials stop going to it. Without this, a server whose keepalive is off (the reference's
/// default is 1 h) kept routing every dial for that agent to the dead stream, since the first stream of an
/// agent ID is the one used.
pub const STALE_STREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection ID the liveness probe closes: agents count theirs from 1, so it is never open.
const PROBE_CONNECT_ID: i64 = 0;

/// Up to this many agents, a dial with the default strategy goes to the least loaded of all of them; beyond it,
/// to the less loaded of two drawn at random ("power of two choices"), which balances almost as well and costs
/// the same with 10 agents or 10,000: scanning every agent on every dial put an O(agents) walk (hashing every
/// agent ID, cloning every handle, three vectors) under the manager's lock, 1.5x the reference's dial p50 with
/// 5,000 agents (docs/scale.md).
const SCAN_UP_TO: usize = 16;
/// Random draws made to find two agents that are not draining before falling back to the full scan.
const MAX_DRAWS: usize = 8;

/// The connected agents, and the strategies that pick one for a dial (see [`crate::routing`]).
pub struct BackendManager {
    inner: Mutex<ManagerInner>,
    metrics: ServerMetrics,
    strategies: Vec<Strategy>,
}

#[derive(Default)]
struct ManagerInner {
    /// Streams by agent ID; the first one is used, as in the reference.
    by_agent: HashMap<String, Vec<Arc<Backend>>>,
    /// Agent IDs, for random choice.
    ids: Vec<String>,
    /// By identity key: the agent IDs its live streams hold, with their stream counts.
    by_identity: HashMap<String, HashMap<String, usize>>,
}

impl ManagerInner {
    /// The less loaded of two agents drawn at random among those not draining; `None` when the draws find
    /// fewer than one such (most agents draining: the full scan decides, falling back to draining ones).
    fn two_choices(&self) -> Option<Arc<Backend>> {
        use rand::Rng;
        let mut rng = rand::rng();
        let mut best: Option<&Arc<Backend>> = None;
        let mut found = 0;
        for _ in 0..MAX_DRAWS {
            let id = &self.ids[rng.random_range(0..self.ids.len())];
            let Some(agent) = self.by_agent.get(id).and_then(|s| s.first()) else { continue };
            if agent.is_draining() {
                continue;
            }
            if best.is_none_or(|b| agent.connection_count() < b.connection_count()) {
                best = Some(agent);
            }
            found += 1;
            if found == 2 {
                break;
            }
        }
        best.cloned()
    }
}

impl BackendManager {
    pub(crate) fn new(metrics: ServerMetrics, strategies: Vec<crate::routing::Strategy>) -> Self {
        let this = Self { inner: Mutex::new(ManagerInner::default()), metrics, strategies };
        this.publish(&ManagerInner::default());
        this
    }

    /// Updates `ready_backends{proxy_strategy}` (agents each strategy could use) and the deprecated
    /// `ready_backend_connections` (the first strategy's count).
    fn publish(&self, inner: &ManagerInner) {
        for strategy in self.strategies.iter().rev() {
            let n = inner.by_agent.values().filter_map(|s| s.first()).filter(|b| routing::serves(*strategy, b)).count();
            self.metrics.set_ready_backends(strategy.name(), n);
        }
    }

    /// Registers a stream, unless its identity may not hold its agent ID: one held by a live stream of another
    /// identity (when identities own their agent IDs), or a new one past the identity's cap. Checked and taken
    /// under one lock, so that racing streams cannot both pass.
    pub(crate) fn add(&self, backend: Arc<Backend>) -> Result<(), Refusal> {
        let mut inner = self.inner.lock();
        let identity = &backend.identity;
        let held = inner.by_identity.get(&identity.key);
        let holds_id = held.is_some_and(|ids| ids.contains_key(&backend.agent_id));
        if let Some(other) = inner.by_agent.get(&backend.agent_id).and_then(|streams| {
            streams
                .iter()
                .find(|b| b.identity.key != identity.key && (identity.owns_agent_ids || b.identity.owns_agent_ids))
        }) {
            return Err(Refusal::new(
                RefusalReason::AgentIdTaken,
                format!(
                    "agent ID {:?} is held by a connected agent of another identity ({}); agent {} may not claim it",
                    backend.agent_id, other.identity.identity, identity.identity
                ),
            ));
        }
        let cap = identity.max_agent_ids;
        if !holds_id && cap > 0 && held.map_or(0, HashMap::len) >= cap {
            return Err(Refusal::new(
                RefusalReason::AgentIdLimit,
                format!(
                    "agent {} already holds {cap} agent IDs on this server, as many as it may; agent ID {:?} refused",
                    identity.identity, backend.agent_id
                ),
            ));
        }
        *inner.by_identity.entry(identity.key.clone()).or_default().entry(backend.agent_id.clone()).or_default() += 1;
        let streams = inner.by_agent.entry(backend.agent_id.clone()).or_default();
        streams.push(backend.clone());
        if streams.len() == 1 {
            inner.ids.push(backend.agent_id.clone());
        }
        self.publish(&inner);
        Ok(())
    }

    pub(crate) fn remove(&self, backend: &Backend) {
        let mut inner = self.inner.lock();
        let Some(streams) = inner.by_agent.get_mut(&backend.agent_id) else { return };
        let before = streams.len();
        streams.retain(|b| b.serial != backend.serial);
        if streams.len() < before
            && let Some(ids) = inner.by_identity.get_mut(&backend.identity.key)
        {
            if let Some(n) = ids.get_mut(&backend.agent_id) {
                *n -= 1;
                if *n == 0 {
                    ids.remove(&backend.agent_id);
                }
            }
            if ids.is_empty() {
                inner.by_identity.remove(&backend.identity.key);
            }
        }
        let Some(streams) = inner.by_agent.get_mut(&backend.agent_id) else { return };
        if streams.is_empty() {
            inner.by_agent.remove(&backend.agent_id);
            inner.ids.retain(|id| id != &backend.agent_id);
        }
        self.publish(&inner);
    }

    /// Picks an agent for a dial to `address` (see [`crate::routing`]); the first stream of each agent ID is
    /// the one used, as in the reference.
    pub(crate) fn pick(&self, address: &str) -> Option<Arc<Backend>> {
        let agents: Vec<Arc<Backend>> = {
            let inner = self.inner.lock();
            // The default strategy serves every agent, so the strategies after it never decide.
            if self.strategies.first() == Some(&Strategy::Default)
                && inner.ids.len() > SCAN_UP_TO
                && let Some(agent) = inner.two_choices()
            {
                return Some(agent);
            }
            inner.ids.iter().filter_map(|id| inner.by_agent.get(id).and_then(|s| s.first()).cloned()).collect()
        };
        routing::pick(&self.strategies, &agents, address)
    }

    /// Number of distinct agents connected.
    pub fn agent_count(&self) -> usize {
        self.inner.lock().ids.len()
    }

    /// Every connected agent stream.
    pub(crate) fn all(&self) -> Vec<Arc<Backend>> {
        self.inner.lock().by_agent.values().flatten().cloned().collect()
    }

    /// The other streams of `backend`'s agent ID, older than it.
    pub(crate) fn older_streams(&self, backend: &Backend) -> Vec<Arc<Backend>> {
        let inner = self.inner.lock();
        inner
            .by_agent
            .get(&backend.agent_id)
            .map(|s| s.iter().filter(|b| b.serial < backend.serial).cloned().collect())
            .unwrap_or_default()
    }

    /// Probes `old` (an older stream of an agent that just opened another): drops it if nothing arrives on it
    /// within [`STALE_STREAM_PROBE_TIMEOUT`]. Probes of one stream started close together do not disturb each
    /// other: each compares the stream's packet count with its own starting point.
    pub(crate) async fn probe(old: Arc<Backend>) {
        let before = old.packets_read();
        old.send_control(Packet::close_request(PROBE_CONNECT_ID));
        tokio::select! {
            _ = tokio::time::sleep(STALE_STREAM_PROBE_TIMEOUT) => {}
            _ = old.closed.cancelled() => return,
        }
        if old.packets_read() != before {
            return;
        }
        tracing::warn!(
            agent_id = %old.agent_id,
            peer = %old.peer,
            "the agent opened a new stream and its older one answered nothing within {STALE_STREAM_PROBE_TIMEOUT:?}: \
             it is dead (half-open); dropping it, with its connections and dials"
        );
        old.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::identifiers::AgentIdentifiers;
    use crate::backend::stream::{AgentStreamInfo, AgentTransport};
    use crate::identity::{AgentIdentity, StreamIdentity};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    fn manager_with(n: usize) -> (BackendManager, Vec<Arc<Backend>>) {
        let metrics = ServerMetrics::new().expect("metrics");
        let manager = BackendManager::new(metrics.clone(), vec![Strategy::Default]);
        let agents: Vec<_> = (0..n)
            .map(|i| {
                let info = AgentStreamInfo {
                    serial: i as u64,
                    agent_id: format!("agent-{i}"),
                    identifiers: AgentIdentifiers::default(),
                    peer: "test".into(),
                    flow_control: false,
                    egress_policy: None,
                    identity: StreamIdentity::trusted(AgentIdentity::anonymous()),
                };
                let (backend, _rx) = Backend::new(
                    info,
                    CancellationToken::new(),
                    AgentTransport::default(),
                    metrics.clone(),
                    TaskTracker::new(),
                );
                manager.add(backend.clone()).expect("added");
                backend
            })
            .collect();
        (manager, agents)
    }

    #[test]
    fn many_agents_two_choices_prefer_the_less_loaded_and_skip_draining_ones() {
        let (manager, agents) = manager_with(100);
        // Half the agents carry 10 connections: two random draws land on an idle one 3 times in 4.
        for a in agents.iter().step_by(2) {
            a.set_connection_count(10);
        }
        let picks = 2000;
        let idle =
            (0..picks).filter(|_| manager.pick("10.0.0.1:443").is_some_and(|a| a.connection_count() == 0)).count();
        assert!(idle > picks * 65 / 100 && idle < picks * 85 / 100, "{idle} of {picks} picks went to idle agents");

        // Draining agents are skipped while others remain...
        for a in agents.iter().skip(1) {
            a.set_draining();
        }
        for _ in 0..50 {
            let a = manager.pick("10.0.0.1:443").expect("an agent");
            assert_eq!(a.agent_id, "agent-0", "the one agent not draining");
        }
        // ...and used when every agent drains (the fallback of the full scan).
        agents[0].set_draining();
        assert!(manager.pick("10.0.0.1:443").is_some_and(|a| a.is_draining()));
    }

    #[test]
    fn few_agents_the_least_loaded_of_all() {
        let (manager, agents) = manager_with(SCAN_UP_TO);
        for (i, a) in agents.iter().enumerate() {
            a.set_connection_count(if i == 7 { 0 } else { 5 });
        }
        for _ in 0..50 {
            assert_eq!(manager.pick("10.0.0.1:443").expect("an agent").agent_id, "agent-7");
        }
    }
}
