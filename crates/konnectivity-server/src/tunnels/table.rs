//! The tunnel table: every dial sent to an agent and not yet answered, and every established connection, looked
//! up from the frontend side (which dials and connections a frontend stream owns) and from the agent side (which
//! ones ride an agent stream). This module alone changes it, through the transitions below: a dial opened,
//! answered, cancelled or expired; a connection closed by either side; a frontend or an agent stream gone.
//!
//! Cleanup follows ownership: a frontend's task holds a [`FrontendGuard`] and an agent stream's reader an
//! [`AgentGuard`]; dropping one (a return, an error, a panic, a cancelled task) runs the transition that removes
//! everything of that stream, so no exit path can leave an entry behind.

use crate::audit::{AuditLog, ClientIdentity, CloseReason, DialFailure, Tunneled};
use crate::backend::manager::BackendManager;
use crate::backend::stream::Backend;
use crate::identity::Refusal;
use crate::metrics::{DialFailureReason, GaugeGuard, ServerMetrics};
use crate::tunnels::link::Link;
use crate::tunnels::queue::{FrontendQueue, Queued};
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_proto::Packet;
use konnectivity_proto::names::{BACKEND_DIAL_TIMEOUT, NO_AGENT_AVAILABLE};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How many closed connections a frontend remembers (kube-apiserver uses one stream per connection): DATA the
/// frontend sent for one of them before it read the close is dropped quietly.
const RECENTLY_CLOSED: usize = 8;

mod dials;
mod views;

/// A connection's key: (agent stream serial, connect ID). Connect IDs are the agent's, unique per stream.
type ConnKey = (u64, i64);

/// Why a dial could not be handed to an agent.
#[derive(Debug)]
pub(crate) enum DialStartError {
    /// No agent is connected.
    NoAgent,
    /// The frontend reused a dial ID that is still pending.
    DuplicateId,
    /// The DIAL_REQ could not be sent within `--backend-dial-timeout`.
    Timeout,
    /// The agent's stream ended first.
    AgentGone(String),
    /// The egress policy refuses the destination.
    Denied(String),
}

impl DialStartError {
    /// The text a frontend gets.
    pub(crate) fn message(&self) -> String {
        match self {
            Self::NoAgent => NO_AGENT_AVAILABLE.to_string(),
            Self::DuplicateId => "dial ID already in use".to_string(),
            Self::Timeout => BACKEND_DIAL_TIMEOUT.to_string(),
            Self::AgentGone(m) | Self::Denied(m) => m.clone(),
        }
    }

    fn audited_as(&self) -> DialFailure {
        match self {
            Self::NoAgent => DialFailure::NoAgent,
            Self::DuplicateId => DialFailure::DuplicateDialId,
            Self::Timeout => DialFailure::Timeout,
            Self::AgentGone(_) => DialFailure::AgentDisconnected,
            Self::Denied(_) => DialFailure::Denied,
        }
    }
}

/// Where DATA from an agent goes.
pub(crate) enum Route {
    /// To this frontend, for this connection.
    Open { frontend: Arc<FrontendQueue>, link: Arc<Link> },
    /// The connection is closing (its frontend is gone): the data is dropped.
    Closing,
    /// No such connection on the stream.
    Unknown,
}

/// A dial sent to an agent and not yet answered.
struct PendingDial {
    frontend: Arc<FrontendQueue>,
    backend: Arc<Backend>,
    started: Instant,
    address: String,
}

impl PendingDial {
    fn audited(&self, random: i64) -> Tunneled<'_> {
        Tunneled {
            mode: self.frontend.kind,
            client: &self.frontend.client,
            destination: &self.address,
            agent: Some(&self.backend.audited),
            dial_id: random,
        }
    }
}

/// An established connection's entry. `owner` is the frontend it belongs to; `None` once that frontend is gone
/// (CLOSE_REQ was sent and the agent's CLOSE_RSP is awaited; its DATA is dropped meanwhile).
struct Conn {
    link: Arc<Link>,
    owner: Option<Arc<FrontendQueue>>,
}

/// A frontend's dials and connections.
#[derive(Default)]
struct FrontendIndex {
    dials: HashSet<i64>,
    conns: HashSet<ConnKey>,
    recently_closed: VecDeque<ConnKey>,
}

/// An agent stream's dials and connections.
#[derive(Default)]
struct AgentIndex {
    dials: HashSet<i64>,
    conns: HashSet<i64>,
}

#[derive(Default)]
struct Table {
    /// By dial ID (the frontend's `random`).
    pending: HashMap<i64, PendingDial>,
    conns: HashMap<ConnKey, Conn>,
    /// By frontend serial; present from the frontend's start to its end.
    frontends: HashMap<u64, FrontendIndex>,
    /// By agent stream serial; present from the stream's start to its end.
    agents: HashMap<u64, AgentIndex>,
}

impl Table {
    /// Removes a pending dial if `accept` agrees it is the one meant, from every index.
    fn take_pending(&mut self, random: i64, accept: impl FnOnce(&PendingDial) -> bool) -> Option<PendingDial> {
        if !self.pending.get(&random).is_some_and(accept) {
            return None;
        }
        let dial = self.pending.remove(&random)?;
        if let Some(f) = self.frontends.get_mut(&dial.frontend.serial) {
            f.dials.remove(&random);
        }
        if let Some(a) = self.agents.get_mut(&dial.backend.serial) {
            a.dials.remove(&random);
        }
        Some(dial)
    }

    /// Removes a connection from the frontend that owns it (remembering it there as recently closed).
    fn disown(&mut self, key: ConnKey, owner: &FrontendQueue) {
        let Some(f) = self.frontends.get_mut(&owner.serial) else { return };
        if f.conns.remove(&key) {
            if f.recently_closed.len() == RECENTLY_CLOSED {
                f.recently_closed.pop_front();
            }
            f.recently_closed.push_back(key);
        }
    }

    /// Removes a connection from every index.
    fn remove_conn(&mut self, key: ConnKey) -> Option<Conn> {
        let conn = self.conns.remove(&key)?;
        if let Some(owner) = &conn.owner {
            self.disown(key, owner);
        }
        if let Some(a) = self.agents.get_mut(&key.0) {
            a.conns.remove(&key.1);
            conn.link.backend.set_connection_count(a.conns.len());
        }
        Some(conn)
    }
}

/// State shared by every frontend and agent stream of one server.
pub(crate) struct Tunnels {
    table: Mutex<Table>,
    pub(crate) backends: BackendManager,
    pub(crate) metrics: ServerMetrics,
    /// Checked before a dial is sent (the agent checks again after resolving names).
    policy: Arc<EgressPolicy>,
    /// The policy's fingerprint, which agents that enforce it advertise.
    policy_fingerprint: String,
    serials: AtomicU64,
    pub(crate) audit: AuditLog,
    /// The server's shutdown token: closes and failures while it is cancelled are the shutdown's doing.
    stopping: CancellationToken,
}

/// Held by a frontend's task for as long as the frontend lives; dropping it ends the frontend in the table: its
/// pending dials are abandoned (DIAL_CLS to the agent) and its connections closed (CLOSE_REQ), for the reason
/// given to [`FrontendGuard::ending_because`] (by default, [`CloseReason::FrontendEnded`]).
pub(crate) struct FrontendGuard {
    tunnels: Arc<Tunnels>,
    queue: Arc<FrontendQueue>,
    reason: CloseReason,
}

impl FrontendGuard {
    /// The frontend's queue.
    pub(crate) fn queue(&self) -> &Arc<FrontendQueue> {
        &self.queue
    }

    /// Why the frontend ends, when it does (the last call wins).
    pub(crate) fn ending_because(&mut self, reason: CloseReason) {
        self.reason = reason;
    }
}

impl Drop for FrontendGuard {
    fn drop(&mut self) {
        self.tunnels.frontend_gone(&self.queue, self.reason);
    }
}

/// Held by an agent stream's reader for as long as the stream lives; dropping it ends the stream in the table:
/// its connections are closed towards their frontends and its pending dials fail at once.
pub(crate) struct AgentGuard {
    tunnels: Arc<Tunnels>,
    backend: Arc<Backend>,
    _gauge: GaugeGuard,
}

impl AgentGuard {
    /// The agent stream.
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.tunnels.agent_gone(&self.backend);
    }
}

impl Tunnels {
    pub(crate) fn new(
        backends: BackendManager,
        metrics: ServerMetrics,
        policy: Arc<EgressPolicy>,
        audit: AuditLog,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            backends,
            metrics,
            policy_fingerprint: policy.fingerprint(),
            policy,
            serials: AtomicU64::new(1),
            audit,
            stopping,
        }
    }

    /// A process-unique serial for a stream.
    pub(crate) fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed)
    }

    /// `reason`, unless the server is stopping (then that is the reason).
    fn close_reason(&self, reason: CloseReason) -> CloseReason {
        if self.stopping.is_cancelled() { CloseReason::ServerShutdown } else { reason }
    }

    /// `failure`, unless the server is stopping and it is the stop's doing.
    fn dial_failure(&self, failure: DialFailure) -> DialFailure {
        match failure {
            DialFailure::FrontendGone | DialFailure::AgentDisconnected if self.stopping.is_cancelled() => {
                DialFailure::ServerShutdown
            }
            f => f,
        }
    }

    fn audit_pending_failed(&self, random: i64, dial: &PendingDial, failure: DialFailure, error: &str) {
        self.audit.dial_failed(&dial.audited(random), self.dial_failure(failure), error, dial.started.elapsed());
    }

    /// Fails a pending dial that was taken out of the table: counts and audits the reason and tells the frontend,
    /// with `error` as the DIAL_RSP error.
    fn fail_dial(&self, random: i64, dial: &PendingDial, reason: DialFailureReason, error: &str) {
        self.metrics.dial_failure(reason);
        let failure = match reason {
            DialFailureReason::NoAgent => DialFailure::NoAgent,
            DialFailureReason::BackendDialTimeout => DialFailure::Timeout,
            DialFailureReason::BackendClose => DialFailure::AgentDisconnected,
            DialFailureReason::FrontendClose | DialFailureReason::SendResponse => DialFailure::FrontendGone,
            DialFailureReason::ErrorResponse | DialFailureReason::UnrecognizedResponse => DialFailure::DialError,
        };
        self.audit_pending_failed(random, dial, failure, error);
        tracing::debug!(random, address = %dial.address, agent_id = %dial.backend.agent_id, "dial failed: {error}");
        dial.frontend.send_control(Packet::dial_response(random, 0, error));
    }

    fn set_pending_gauge(&self, table: &Table) {
        self.metrics.set_pending_dials(table.pending.len());
    }

    // ---- frontends ----

    /// Starts a frontend stream of protocol `kind`: its queue, and the guard its task holds until it ends.
    pub(crate) fn open_frontend(
        self: &Arc<Self>,
        kind: &'static str,
        client: ClientIdentity,
    ) -> (FrontendGuard, mpsc::UnboundedReceiver<Queued>) {
        let (queue, rx) = FrontendQueue::new(self.next_serial(), kind, client, self.metrics.clone());
        self.table.lock().frontends.insert(queue.serial, FrontendIndex::default());
        (FrontendGuard { tunnels: self.clone(), queue, reason: CloseReason::FrontendEnded }, rx)
    }

    /// A frontend is gone: its pending dials are abandoned and its connections closed on the agent, for
    /// `reason` (unless they recorded a cause already).
    fn frontend_gone(&self, frontend: &FrontendQueue, reason: CloseReason) {
        frontend.closed.cancel();
        let reason = self.close_reason(reason);
        let mut table = self.table.lock();
        let Some(index) = table.frontends.remove(&frontend.serial) else { return };
        for random in index.dials {
            if let Some(dial) = table.take_pending(random, |_| true) {
                self.metrics.dial_failure(DialFailureReason::FrontendClose);
                self.audit_pending_failed(random, &dial, DialFailure::FrontendGone, "");
                dial.backend.send_control(Packet::close_dial(random));
            }
        }
        self.set_pending_gauge(&table);
        for key in index.conns {
            if let Some(conn) = table.conns.get_mut(&key)
                && conn.owner.as_ref().is_some_and(|o| o.serial == frontend.serial)
            {
                conn.owner = None;
                conn.link.closing_because(reason);
                conn.link.backend.send_control(Packet::close_request(key.1));
            }
        }
    }

    // ---- agent streams ----

    /// Starts an agent stream: routable from now on, and the guard its reader holds until it ends; or not, if
    /// its identity may not hold its agent ID (see `BackendManager::add`).
    pub(crate) fn attach_agent(self: &Arc<Self>, backend: Arc<Backend>) -> Result<AgentGuard, Refusal> {
        self.table.lock().agents.insert(backend.serial, AgentIndex::default());
        if let Err(refusal) = self.backends.add(backend.clone()) {
            self.table.lock().agents.remove(&backend.serial);
            return Err(refusal);
        }
        let gauge = self.metrics.grpc_connection("Connect");
        Ok(AgentGuard { tunnels: self.clone(), backend, _gauge: gauge })
    }

    /// An agent stream is gone: every connection on it is closed towards its frontend, and every dial pending
    /// on it fails now (the reference leaves those to time out).
    fn agent_gone(&self, backend: &Arc<Backend>) {
        self.backends.remove(backend);
        backend.closed.cancel();
        let reason = self.close_reason(CloseReason::AgentDisconnected);
        let error = format!("agent {} disconnected", backend.agent_id);
        let mut table = self.table.lock();
        let Some(index) = table.agents.remove(&backend.serial) else { return };
        for connect_id in index.conns {
            let Some(conn) = table.remove_conn((backend.serial, connect_id)) else { continue };
            self.metrics.established(-1.0);
            self.audit.connection_closed(&conn.link.audited(), connect_id, &conn.link.closed(reason, &error));
            if let Some(owner) = conn.owner {
                owner.send_control(Packet::close_response(connect_id, error.clone()));
            }
        }
        backend.set_connection_count(0);
        let dial_error = format!("agent {} disconnected before answering the dial", backend.agent_id);
        for random in index.dials {
            if let Some(dial) = table.take_pending(random, |_| true) {
                self.fail_dial(random, &dial, DialFailureReason::BackendClose, &dial_error);
            }
        }
        self.set_pending_gauge(&table);
        drop(table);
        tracing::info!(agent_id = %backend.agent_id, "agent disconnected; its connections and dials are closed");
    }

    // ---- connections ----

    /// Where DATA for `connect_id` on agent stream `backend_serial` goes.
    pub(crate) fn route(&self, backend_serial: u64, connect_id: i64) -> Route {
        match self.table.lock().conns.get(&(backend_serial, connect_id)) {
            Some(Conn { link, owner: Some(frontend) }) => {
                Route::Open { frontend: frontend.clone(), link: link.clone() }
            }
            Some(Conn { owner: None, .. }) => Route::Closing,
            None => Route::Unknown,
        }
    }

    /// The connection `connect_id` on agent stream `backend_serial`, if frontend `frontend_serial` owns it.
    pub(crate) fn frontend_link(
        &self,
        frontend_serial: u64,
        backend_serial: u64,
        connect_id: i64,
    ) -> Option<Arc<Link>> {
        match self.table.lock().conns.get(&(backend_serial, connect_id)) {
            Some(Conn { link, owner: Some(o) }) if o.serial == frontend_serial => Some(link.clone()),
            _ => None,
        }
    }

    /// Whether frontend `frontend_serial` owned connection `connect_id` on `backend_serial` until it was closed
    /// lately.
    pub(crate) fn closed_lately(&self, frontend_serial: u64, backend_serial: u64, connect_id: i64) -> bool {
        self.table
            .lock()
            .frontends
            .get(&frontend_serial)
            .is_some_and(|f| f.recently_closed.contains(&(backend_serial, connect_id)))
    }

    /// Marks the connection `connect_id` closing (for `reason`, unless it has a cause already), takes it from its
    /// frontend, and asks the agent to close it. Its entry stays until the agent's CLOSE_RSP.
    pub(crate) fn close_conn(&self, backend: &Backend, connect_id: i64, reason: CloseReason) {
        let key = (backend.serial, connect_id);
        let mut table = self.table.lock();
        if let Some(conn) = table.conns.get_mut(&key) {
            conn.link.closing_because(reason);
            // The frontend no longer owns it: the agent's CLOSE_RSP for a closing connection is not relayed, and
            // the frontend must not "own" its ID if the agent ever reused it (found by the fuzzing harness).
            if let Some(owner) = conn.owner.take() {
                table.disown(key, &owner);
            }
        }
        drop(table);
        backend.send_control(Packet::close_request(connect_id));
    }

    /// The agent closed connection `connect_id` (CLOSE_RSP): it leaves the table, its close is audited, and its
    /// frontend, if it still has one, is told.
    pub(crate) fn agent_closed(&self, backend: &Backend, connect_id: i64, error: String) {
        let removed = self.table.lock().remove_conn((backend.serial, connect_id));
        let Some(conn) = removed else {
            tracing::debug!(connect_id, "CLOSE_RSP for unknown connection");
            return;
        };
        self.metrics.established(-1.0);
        self.audit.connection_closed(
            &conn.link.audited(),
            connect_id,
            &conn.link.closed(CloseReason::AgentClosed, &error),
        );
        if let Some(owner) = conn.owner {
            owner.send_control(Packet::close_response(connect_id, error));
        }
    }

    /// Credit from the agent for sending more of connection `connect_id` (flow-controlled agents).
    pub(crate) fn window_update(&self, backend_serial: u64, connect_id: i64, credit: u32) {
        if let Route::Open { link, .. } = self.route(backend_serial, connect_id)
            && let Some(window) = &link.upload_window
        {
            window.add_permits(credit as usize);
        }
    }
}
