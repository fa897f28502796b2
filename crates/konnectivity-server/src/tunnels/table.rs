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
use crate::metrics::{DialFailureReason, GaugeGuard, ServerMetrics};
use crate::routing::dial_host;
use crate::tunnels::link::Link;
use crate::tunnels::queue::{FrontendQueue, Queued};
use konnectivity_egress_policy::{EgressPolicy, Verdict};
use konnectivity_proto::names::{BACKEND_DIAL_TIMEOUT, NO_AGENT_AVAILABLE};
use konnectivity_proto::{DialResponse, Packet};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How many closed connections a frontend remembers (kube-apiserver uses one stream per connection): DATA the
/// frontend sent for one of them before it read the close is dropped quietly.
const RECENTLY_CLOSED: usize = 8;

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
            agent_id: Some(&self.backend.agent_id),
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

    /// Starts an agent stream: routable from now on, and the guard its reader holds until it ends.
    pub(crate) fn attach_agent(self: &Arc<Self>, backend: Arc<Backend>) -> AgentGuard {
        self.table.lock().agents.insert(backend.serial, AgentIndex::default());
        self.backends.add(backend.clone());
        let gauge = self.metrics.grpc_connection("Connect");
        AgentGuard { tunnels: self.clone(), backend, _gauge: gauge }
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

    // ---- dials ----

    /// Picks an agent for `frontend`'s dial to `address`, records the pending dial and sends the DIAL_REQ
    /// (within `send_timeout`, if set). On failure the pending dial is gone again and the reason counted and
    /// audited. `Ok` also when the agent went away meanwhile and its cleanup has already answered the frontend.
    pub(crate) async fn start_dial(
        &self,
        frontend: &Arc<FrontendQueue>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, DialStartError> {
        let started = Instant::now();
        let result = self.send_dial(frontend, address, random, send_timeout).await;
        if let Err((e, backend)) = &result {
            let attempt = Tunneled {
                mode: frontend.kind,
                client: &frontend.client,
                destination: address,
                agent_id: backend.as_ref().map(|b| b.agent_id.as_str()),
                dial_id: random,
            };
            self.audit.dial_failed(&attempt, self.dial_failure(e.audited_as()), &e.message(), started.elapsed());
        }
        result.map_err(|(e, _)| e)
    }

    /// [`Tunnels::start_dial`] without the audit; a failure comes with the agent picked, if one was.
    async fn send_dial(
        &self,
        frontend: &Arc<FrontendQueue>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, (DialStartError, Option<Arc<Backend>>)> {
        let host = dial_host(address);
        let port = address.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0);
        if let Verdict::Deny(reason) = self.policy.check_before_resolution(host, port) {
            self.metrics.egress_denied();
            tracing::info!(%address, "dial refused: {reason}");
            return Err((DialStartError::Denied(reason), None));
        }
        let Some(backend) = self.backends.pick(address) else {
            self.metrics.dial_failure(DialFailureReason::NoAgent);
            tracing::info!(%address, "dial failed: {NO_AGENT_AVAILABLE}");
            return Err((DialStartError::NoAgent, None));
        };
        let agent_gone = || {
            self.metrics.dial_failure(DialFailureReason::BackendClose);
            let error = format!("agent {} disconnected", backend.agent_id);
            Err((DialStartError::AgentGone(error), Some(backend.clone())))
        };
        {
            let mut table = self.table.lock();
            if table.pending.contains_key(&random) {
                // Not sent: the agent has nothing to do with it.
                return Err((DialStartError::DuplicateId, None));
            }
            let Table { frontends, agents, pending, .. } = &mut *table;
            let (Some(f), Some(a)) = (frontends.get_mut(&frontend.serial), agents.get_mut(&backend.serial)) else {
                // The agent went away between the pick and now (its cleanup has run), or the frontend has
                // (its task is ending): the dial would wait for an answer that cannot come.
                return agent_gone();
            };
            f.dials.insert(random);
            a.dials.insert(random);
            let dial = PendingDial {
                frontend: frontend.clone(),
                backend: backend.clone(),
                started: Instant::now(),
                address: address.to_string(),
            };
            pending.insert(random, dial);
            self.set_pending_gauge(&table);
        }
        tracing::debug!(random, %address, agent_id = %backend.agent_id, "dialing");
        let send = backend.send(Packet::dial_request(address, random));
        let sent = match send_timeout {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| true).and_then(|r| r.map_err(|_| false)),
            None => send.await.map_err(|_| false),
        };
        let Err(timed_out) = sent else { return Ok(backend) };
        let me = frontend.serial;
        let taken = {
            let mut table = self.table.lock();
            let taken = table.take_pending(random, |d| d.frontend.serial == me).is_some();
            self.set_pending_gauge(&table);
            taken
        };
        if !taken {
            // The agent's cleanup got it first and has already told the frontend.
            return Ok(backend);
        }
        if timed_out {
            self.metrics.dial_failure(DialFailureReason::BackendDialTimeout);
            Err((DialStartError::Timeout, Some(backend)))
        } else {
            agent_gone()
        }
    }

    /// An agent answered a dial: the connection is established for the frontend that asked, or the answer is
    /// passed on as the dial's failure, or (no such dial, its frontend gone) the agent is told to close.
    pub(crate) fn dial_answered(&self, backend: &Arc<Backend>, rsp: &DialResponse) {
        let random = rsp.random;
        let connect_id = rsp.connect_id;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.backend.serial == backend.serial) else {
            drop(table);
            self.metrics.dial_failure(DialFailureReason::UnrecognizedResponse);
            tracing::debug!(random, connect_id, "DIAL_RSP matches no pending dial");
            if connect_id != 0 {
                backend.send_control(Packet::close_request(connect_id));
            }
            return;
        };
        self.set_pending_gauge(&table);
        self.metrics.observe_dial(dial.started.elapsed().as_secs_f64());
        if !rsp.error.is_empty() || connect_id == 0 {
            let error =
                if rsp.error.is_empty() { "agent answered the dial without a connection ID" } else { &rsp.error };
            self.fail_dial(random, &dial, DialFailureReason::ErrorResponse, error);
            return;
        }
        let key = (backend.serial, connect_id);
        if dial.frontend.closed.is_cancelled() || !table.frontends.contains_key(&dial.frontend.serial) {
            self.metrics.dial_failure(DialFailureReason::SendResponse);
            self.audit_pending_failed(random, &dial, DialFailure::FrontendGone, "");
            backend.send_control(Packet::close_request(connect_id));
            return;
        }
        if table.conns.contains_key(&key) {
            tracing::warn!(connect_id, "agent reused a live connection ID; refusing the dial");
            self.fail_dial(random, &dial, DialFailureReason::ErrorResponse, "agent reused a connection ID");
            return;
        }
        let link = Link::new(
            backend.clone(),
            connect_id,
            random,
            dial.address.clone(),
            dial.frontend.kind,
            dial.frontend.client.clone(),
        );
        table.conns.insert(key, Conn { link: link.clone(), owner: Some(dial.frontend.clone()) });
        if let Some(f) = table.frontends.get_mut(&dial.frontend.serial) {
            f.conns.insert(key);
        }
        if let Some(a) = table.agents.get_mut(&backend.serial) {
            a.conns.insert(connect_id);
            backend.set_connection_count(a.conns.len());
        }
        drop(table);
        self.metrics.established(1.0);
        self.audit.connection_opened(&link.audited(), connect_id, dial.started.elapsed());
        tracing::debug!(random, connect_id, address = %dial.address, "connection established");
        dial.frontend.send_control(Packet::dial_response(random, connect_id, ""));
    }

    /// Abandons `frontend`'s pending dial `random` (the frontend cancelled it). The agent is told with DIAL_CLS,
    /// which the reference does not do: our agent stops the dial; a Go agent ignores it, and its late DIAL_RSP
    /// is answered with CLOSE_REQ. Returns whether the dial was still pending.
    pub(crate) fn abandon_dial(&self, frontend: &FrontendQueue, random: i64, failure: DialFailure) -> bool {
        let me = frontend.serial;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.frontend.serial == me) else { return false };
        self.set_pending_gauge(&table);
        drop(table);
        self.metrics.dial_failure(DialFailureReason::FrontendClose);
        self.audit_pending_failed(random, &dial, failure, "");
        dial.backend.send_control(Packet::close_dial(random));
        true
    }

    /// `frontend`'s dial `random` passed its `--backend-dial-timeout`: it fails towards the frontend and the
    /// agent is told to stop (DIAL_CLS). Returns whether it was still pending.
    pub(crate) fn expire_dial(&self, frontend: &FrontendQueue, random: i64) -> bool {
        let me = frontend.serial;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.frontend.serial == me) else { return false };
        self.set_pending_gauge(&table);
        drop(table);
        self.fail_dial(random, &dial, DialFailureReason::BackendDialTimeout, BACKEND_DIAL_TIMEOUT);
        dial.backend.send_control(Packet::close_dial(random));
        true
    }

    /// The agent cancelled a dial it had been sent (DIAL_CLS): the frontend is told the same way.
    pub(crate) fn agent_cancelled_dial(&self, backend: &Backend, random: i64) {
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.backend.serial == backend.serial) else { return };
        self.set_pending_gauge(&table);
        drop(table);
        self.audit_pending_failed(random, &dial, DialFailure::AgentCancelled, "");
        dial.frontend.send_control(Packet::close_dial(random));
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

    // ---- views ----

    /// Number of dials waiting for an agent's answer.
    pub(crate) fn pending_count(&self) -> usize {
        self.table.lock().pending.len()
    }

    /// Connections established (including ones whose close is in progress).
    pub(crate) fn connection_count(&self) -> usize {
        self.table.lock().conns.len()
    }

    /// The pending dials, for `/debug/connections`.
    pub(crate) fn pending_snapshot(&self) -> Vec<serde_json::Value> {
        self.table
            .lock()
            .pending
            .iter()
            .map(|(random, d)| {
                serde_json::json!({
                    "dial_id": random,
                    "address": d.address,
                    "agent_id": d.backend.agent_id,
                    "age_seconds": d.started.elapsed().as_secs_f64(),
                    "frontend": d.frontend.kind,
                })
            })
            .collect()
    }

    /// The connections, for `/debug/connections`.
    pub(crate) fn connections_snapshot(&self) -> Vec<serde_json::Value> {
        self.table
            .lock()
            .conns
            .iter()
            .map(|((_, connect_id), conn)| match &conn.owner {
                Some(frontend) => serde_json::json!({
                    "agent_id": conn.link.backend.agent_id,
                    "connect_id": connect_id,
                    "dial_id": conn.link.dial_id,
                    "address": conn.link.address,
                    "frontend": frontend.kind,
                    "state": "open",
                    "age_seconds": conn.link.established.elapsed().as_secs_f64(),
                    "bytes_to_frontend": conn.link.to_frontend.load(Ordering::Relaxed),
                    "bytes_to_agent": conn.link.to_agent.load(Ordering::Relaxed),
                    "queued_bytes": frontend.queued(),
                }),
                None => serde_json::json!({
                    "agent_id": conn.link.backend.agent_id, "connect_id": connect_id, "state": "closing"
                }),
            })
            .collect()
    }

    /// Checks that the table's indexes agree with each other; panics naming the first disagreement (for the
    /// fuzzing harness and tests). Returns (pending dials, connections).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_consistency(&self) -> (usize, usize) {
        let t = self.table.lock();
        for (random, d) in &t.pending {
            let f = t.frontends.get(&d.frontend.serial);
            assert!(f.is_some_and(|f| f.dials.contains(random)), "dial {random} pending for a frontend that is gone");
            let a = t.agents.get(&d.backend.serial);
            assert!(
                a.is_some_and(|a| a.dials.contains(random)),
                "dial {random} pending on an agent stream that is gone"
            );
        }
        for (serial, f) in &t.frontends {
            for random in &f.dials {
                assert!(
                    t.pending.get(random).is_some_and(|d| d.frontend.serial == *serial),
                    "frontend {serial} lists dial {random} not pending for it"
                );
            }
            for key in &f.conns {
                let owner = t.conns.get(key).and_then(|c| c.owner.as_ref()).map(|o| o.serial);
                assert_eq!(owner, Some(*serial), "frontend {serial} lists connection {key:?} it does not own");
            }
        }
        for (serial, a) in &t.agents {
            for random in &a.dials {
                assert!(
                    t.pending.get(random).is_some_and(|d| d.backend.serial == *serial),
                    "agent stream {serial} lists dial {random} not pending on it"
                );
            }
            for id in &a.conns {
                assert!(
                    t.conns.contains_key(&(*serial, *id)),
                    "agent stream {serial} lists connection {id} it does not have"
                );
            }
        }
        for ((serial, id), conn) in &t.conns {
            let a = t.agents.get(serial);
            assert!(
                a.is_some_and(|a| a.conns.contains(id)),
                "connection {id} of agent stream {serial}, which is gone or does not list it"
            );
            assert_eq!(
                conn.link.backend.connection_count(),
                a.map_or(0, |a| a.conns.len()),
                "connection count of agent stream {serial}"
            );
            if let Some(owner) = &conn.owner {
                let f = t.frontends.get(&owner.serial);
                assert!(
                    f.is_some_and(|f| f.conns.contains(&(*serial, *id))),
                    "connection {id} of agent stream {serial} is open but its frontend does not list it"
                );
            }
        }
        (t.pending.len(), t.conns.len())
    }

    /// Whether the table still knows frontend `serial` / agent stream `serial` (for the fuzzing harness).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn knows_stream(&self, serial: u64) -> bool {
        let t = self.table.lock();
        t.frontends.contains_key(&serial) || t.agents.contains_key(&serial)
    }
}
