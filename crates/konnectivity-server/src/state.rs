//! The server's shared tunnel state: pending dials (keyed by dial ID), the frontends waiting on them, and how
//! packets are handed to a frontend without letting one slow frontend hold up an agent's stream for long.

use crate::audit::{AuditLog, ClientIdentity, CloseReason, DialAttempt, DialFailure};
use crate::backend::{Backend, BackendManager};
use crate::metrics::{DialFailureReason, Segment, ServerMetrics};
use konnectivity_proto::Packet;
use konnectivity_proto::flow::{self, CreditMeter};
use konnectivity_proto::names::{BACKEND_DIAL_TIMEOUT, NO_AGENT_AVAILABLE};
use konnectivity_proto::packet;
use konnectivity_transport::budget::QueueBudget;
use konnectivity_transport::egress_policy::{EgressPolicy, Verdict};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long an agent stream's reader waits for one frontend that is behind before giving that frontend
/// up (its connection is closed). Only agents without flow control (Go agents) can make it wait: with our
/// agents each connection's window bounds its queue, and the reader never waits.
pub const FRONTEND_STALL_LIMIT: Duration = Duration::from_secs(5);

/// Cost units queued towards one frontend before the reader waits (agents without flow control).
pub const FRONTEND_QUEUE_LIMIT: usize = 4 << 20;

/// One established connection, as its frontend and its agent stream both see it.
pub(crate) struct Link {
    pub(crate) backend: Arc<Backend>,
    pub(crate) connect_id: i64,
    /// The dial this connection came from, and where it goes (for `/debug/connections`).
    pub(crate) dial_id: i64,
    pub(crate) address: String,
    pub(crate) established: Instant,
    /// Bytes handed to the frontend, and sent to the agent.
    pub(crate) to_frontend: AtomicU64,
    pub(crate) to_agent: AtomicU64,
    /// Bytes from the agent queued towards the frontend: final once the agent's CLOSE_RSP is read, unlike
    /// `to_frontend`, which grows as the frontend takes them (the audit log's target-to-client count).
    pub(crate) relayed_to_frontend: AtomicU64,
    /// The frontend's protocol and client, for the audit log.
    pub(crate) mode: &'static str,
    pub(crate) client: ClientIdentity,
    /// Why the connection is being closed, set by whoever starts the close (the first cause wins).
    pub(crate) close_reason: OnceLock<CloseReason>,
    /// Credit for sending this connection's DATA to the agent (flow-controlled agents only).
    pub(crate) upload_window: Option<Arc<Semaphore>>,
    /// Counts what the frontend consumed, to return credit to the agent.
    download_credit: CreditMeter,
}

impl Link {
    pub(crate) fn new(
        backend: Arc<Backend>,
        connect_id: i64,
        dial_id: i64,
        address: String,
        frontend: &Frontend,
    ) -> Arc<Self> {
        let upload_window = backend.flow_control.then(|| Arc::new(Semaphore::new(flow::WINDOW as usize)));
        Arc::new(Self {
            backend,
            connect_id,
            dial_id,
            address,
            established: Instant::now(),
            to_frontend: AtomicU64::new(0),
            to_agent: AtomicU64::new(0),
            relayed_to_frontend: AtomicU64::new(0),
            mode: frontend.kind,
            client: frontend.client.clone(),
            close_reason: OnceLock::new(),
            upload_window,
            download_credit: CreditMeter::default(),
        })
    }

    /// Records why the connection is being closed, unless a cause was recorded already.
    pub(crate) fn closing_because(&self, reason: CloseReason) {
        let _ = self.close_reason.set(reason);
    }
}

/// A packet queued for a frontend, with when it was queued.
pub(crate) type Queued = (Instant, Packet);

/// One frontend stream (a `/ProxyService/Proxy` call).
pub(crate) struct Frontend {
    pub(crate) serial: u64,
    /// `grpc` or `http-connect`.
    pub(crate) kind: &'static str,
    /// Who the client is (for the audit log and logs).
    pub(crate) client: ClientIdentity,
    /// Packets for the frontend, each with when it was queued (for `frontend_write_duration_seconds`).
    tx: mpsc::UnboundedSender<Queued>,
    /// What `tx` holds, in flow-control cost units. Bounded by the connection's window (flow-controlled
    /// agents) or by [`FRONTEND_QUEUE_LIMIT`] (others).
    budget: QueueBudget,
    /// Connections established for this frontend. The agent loop adds them; the frontend's own task reads them
    /// to check DATA and to clean up when the stream ends.
    pub(crate) links: Mutex<Vec<Arc<Link>>>,
    /// The last connections of this frontend that were closed (agent stream serial, connect ID), at most
    /// [`RECENTLY_CLOSED`]: DATA the frontend sent for one before it read the close is dropped quietly.
    recently_closed: Mutex<std::collections::VecDeque<(u64, i64)>>,
    /// Cancelled when the frontend stream has ended (or is being ended by [`Frontend::abort`]).
    pub(crate) closed: CancellationToken,
    /// The status the response stream ends with, if it is ended by us with an error.
    final_status: Mutex<Option<Status>>,
}

/// How many closed connections a frontend remembers (kube-apiserver uses one stream per connection).
const RECENTLY_CLOSED: usize = 8;

/// What happened to a packet handed to a frontend.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued.
    Queued,
    /// The frontend stream has ended.
    Gone,
    /// The frontend did not drain its queue within [`FRONTEND_STALL_LIMIT`].
    Stalled,
    /// The agent's connection died while the packet waited for room: not the frontend's fault; the agent's
    /// cleanup closes the connection towards the frontend ("agent … disconnected").
    AgentGone,
}

impl Frontend {
    pub(crate) fn new(
        serial: u64,
        kind: &'static str,
        client: ClientIdentity,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let frontend = Arc::new(Self {
            serial,
            kind,
            client,
            tx,
            budget: QueueBudget::default(),
            links: Mutex::new(Vec::new()),
            recently_closed: Mutex::new(std::collections::VecDeque::new()),
            closed: CancellationToken::new(),
            final_status: Mutex::new(None),
        });
        (frontend, rx)
    }

    /// Ends the frontend's stream now with `status` (what is still queued is dropped).
    pub(crate) fn abort(&self, status: Status) {
        self.final_status.lock().get_or_insert(status);
        self.closed.cancel();
    }

    /// The status to end the response stream with, once `closed` has fired.
    pub(crate) fn take_final_status(&self) -> Option<Status> {
        self.final_status.lock().take()
    }

    /// Queues a control packet (never waits: control packets are small and bounded in number).
    pub(crate) fn send_control(&self, packet: Packet, metrics: &ServerMetrics) {
        metrics.packet(Segment::ToClient, packet.r#type);
        let _ = self.tx.send((Instant::now(), packet));
    }

    /// Queues a DATA packet from the agent. With a flow-controlled agent this never waits (the window bounds
    /// the queue); otherwise it waits at most [`FRONTEND_STALL_LIMIT`] for the frontend to make room.
    /// `agent_gone` ends the wait at once when the agent's connection dies.
    pub(crate) async fn deliver_data(
        &self,
        packet: Packet,
        flow_controlled: bool,
        metrics: &ServerMetrics,
        agent_gone: impl std::future::Future<Output = ()>,
    ) -> Delivery {
        let cost = data_cost(&packet);
        if flow_controlled && self.budget.queued() + cost > 2 * flow::WINDOW as usize {
            // The agent negotiated flow control and then overran its credit: it is not a peer we can trust
            // with this connection. Treat it like a frontend that stopped reading (the connection is closed).
            tracing::warn!("agent overran its flow-control window; closing the connection");
            return Delivery::Stalled;
        }
        if !flow_controlled && self.budget.queued() + cost > FRONTEND_QUEUE_LIMIT {
            metrics.full_receive_channel("Connect", 1.0);
            let (room, agent_died) = tokio::select! {
                r = self.budget.wait_below(FRONTEND_QUEUE_LIMIT, FRONTEND_STALL_LIMIT) => (r, false),
                _ = self.closed.cancelled() => (false, false),
                _ = agent_gone => (false, true),
            };
            metrics.full_receive_channel("Connect", -1.0);
            if self.closed.is_cancelled() {
                return Delivery::Gone;
            }
            if agent_died {
                return Delivery::AgentGone;
            }
            if !room {
                return Delivery::Stalled;
            }
        }
        self.budget.add(cost);
        metrics.packet(Segment::ToClient, packet.r#type);
        match self.tx.send((Instant::now(), packet)) {
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::Gone,
        }
    }

    /// Called as the gRPC layer takes a packet off the queue: frees its budget and, for flow-controlled
    /// agents, returns credit once enough was consumed.
    pub(crate) fn on_sent(&self, packet: &Packet, queued_at: Instant, tunnels: &Tunnels) {
        tunnels.metrics.observe_frontend_write(queued_at.elapsed().as_secs_f64());
        let Some(packet::Payload::Data(data)) = &packet.payload else { return };
        let cost = flow::cost(data.data.len());
        self.budget.release(cost as usize);
        let link = self.links.lock().iter().find(|l| l.connect_id == data.connect_id).cloned();
        if let Some(link) = &link {
            link.to_frontend.fetch_add(data.data.len() as u64, Ordering::Relaxed);
        }
        tunnels.metrics.bytes_to_frontend(data.data.len());
        if let Some(link) = link
            && link.backend.flow_control
            && let Some(credit) = link.download_credit.consumed(cost)
        {
            link.backend.send_control(Packet::window_update(link.connect_id, credit), tunnels);
        }
    }

    /// Forgets an established connection (it was closed).
    pub(crate) fn forget(&self, backend_serial: u64, connect_id: i64) {
        let mut links = self.links.lock();
        let before = links.len();
        links.retain(|l| !(l.backend.serial == backend_serial && l.connect_id == connect_id));
        if links.len() < before {
            let mut closed = self.recently_closed.lock();
            if closed.len() == RECENTLY_CLOSED {
                closed.pop_front();
            }
            closed.push_back((backend_serial, connect_id));
        }
    }

    /// Whether this frontend owned connection `connect_id` on `backend_serial` until it was closed lately.
    pub(crate) fn closed_lately(&self, backend_serial: u64, connect_id: i64) -> bool {
        self.recently_closed.lock().contains(&(backend_serial, connect_id))
    }

    /// This frontend's link for connection `connect_id` on the agent stream `backend_serial`, if it owns it.
    pub(crate) fn link(&self, backend_serial: u64, connect_id: i64) -> Option<Arc<Link>> {
        self.links.lock().iter().find(|l| l.backend.serial == backend_serial && l.connect_id == connect_id).cloned()
    }

    /// Cost units queued towards this frontend.
    pub(crate) fn queued(&self) -> usize {
        self.budget.queued()
    }

    /// Whether this frontend owns connection `connect_id` on the agent stream `backend_serial`.
    pub(crate) fn owns(&self, backend_serial: u64, connect_id: i64) -> bool {
        self.link(backend_serial, connect_id).is_some()
    }
}

fn data_cost(packet: &Packet) -> usize {
    match &packet.payload {
        Some(packet::Payload::Data(d)) => flow::cost(d.data.len()) as usize,
        _ => 0,
    }
}

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
}

/// A dial sent to an agent and not yet answered.
pub(crate) struct PendingDial {
    pub(crate) frontend: Arc<Frontend>,
    pub(crate) backend: Arc<Backend>,
    pub(crate) started: Instant,
    pub(crate) address: String,
}

/// State shared by every frontend and agent stream of one server.
pub(crate) struct Tunnels {
    pub(crate) backends: BackendManager,
    pub(crate) metrics: ServerMetrics,
    /// Checked before a dial is sent (the agent checks again after resolving names).
    policy: Arc<EgressPolicy>,
    pending: Mutex<HashMap<i64, PendingDial>>,
    serials: AtomicU64,
    pub(crate) audit: AuditLog,
    /// The server's shutdown token: closes and failures while it is cancelled are the shutdown's doing.
    stopping: CancellationToken,
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
            backends,
            metrics,
            policy,
            pending: Mutex::new(HashMap::new()),
            serials: AtomicU64::new(1),
            audit,
            stopping,
        }
    }

    /// `reason`, unless the server is stopping (then that is the reason).
    pub(crate) fn close_reason(&self, reason: CloseReason) -> CloseReason {
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

    /// Audits the failure of a dial that was pending.
    pub(crate) fn audit_pending_failed(&self, random: i64, dial: &PendingDial, failure: DialFailure, error: &str) {
        let attempt = DialAttempt { frontend: &dial.frontend, address: &dial.address, random, started: dial.started };
        self.audit.dial_failed(&attempt, Some(&dial.backend), self.dial_failure(failure), error);
    }

    /// A process-unique serial for a stream.
    pub(crate) fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a pending dial; false if the dial ID is already in use (it is then left alone).
    pub(crate) fn add_pending(&self, random: i64, dial: PendingDial) -> bool {
        let mut pending = self.pending.lock();
        if pending.contains_key(&random) {
            return false;
        }
        dial.backend.pending.lock().insert(random);
        pending.insert(random, dial);
        self.metrics.set_pending_dials(pending.len());
        true
    }

    /// Removes a pending dial if `accept` agrees it is the one meant (the answer came from its agent stream,
    /// or the cancel from its frontend); an answer from anyone else leaves it in place.
    pub(crate) fn take_pending(&self, random: i64, accept: impl FnOnce(&PendingDial) -> bool) -> Option<PendingDial> {
        let mut pending = self.pending.lock();
        if !pending.get(&random).is_some_and(accept) {
            return None;
        }
        let dial = pending.remove(&random)?;
        dial.backend.pending.lock().remove(&random);
        self.metrics.set_pending_dials(pending.len());
        Some(dial)
    }

    /// Fails a pending dial: counts and audits the reason and tells the frontend, with `error` as the DIAL_RSP
    /// error.
    pub(crate) fn fail_dial(&self, random: i64, dial: &PendingDial, reason: DialFailureReason, error: &str) {
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
        dial.frontend.send_control(Packet::dial_response(random, 0, error), &self.metrics);
    }

    /// Picks an agent for `frontend`'s dial to `address`, records the pending dial and sends the DIAL_REQ
    /// (within `send_timeout`, if set). On failure the pending dial is gone again and the reason counted.
    pub(crate) async fn start_dial(
        &self,
        frontend: &Arc<Frontend>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, DialStartError> {
        let started = Instant::now();
        let result = self.send_dial(frontend, address, random, send_timeout).await;
        if let Err((e, backend)) = &result {
            let failure = match e {
                DialStartError::NoAgent => DialFailure::NoAgent,
                DialStartError::DuplicateId => DialFailure::DuplicateDialId,
                DialStartError::Timeout => DialFailure::Timeout,
                DialStartError::AgentGone(_) => DialFailure::AgentDisconnected,
                DialStartError::Denied(_) => DialFailure::Denied,
            };
            let attempt = DialAttempt { frontend, address, random, started };
            self.audit.dial_failed(&attempt, backend.as_deref(), self.dial_failure(failure), &e.message());
        }
        result.map_err(|(e, _)| e)
    }

    /// [`Tunnels::start_dial`] without the audit; a failure comes with the agent picked, if one was.
    async fn send_dial(
        &self,
        frontend: &Arc<Frontend>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, (DialStartError, Option<Arc<Backend>>)> {
        let host = crate::routing::dial_host(address);
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
        let pending = PendingDial {
            frontend: frontend.clone(),
            backend: backend.clone(),
            started: Instant::now(),
            address: address.to_string(),
        };
        if !self.add_pending(random, pending) {
            // Not sent: the agent has nothing to do with it.
            return Err((DialStartError::DuplicateId, None));
        }
        if backend.closed.is_cancelled() {
            // The agent went away between the pick and the record: its cleanup, which fails every dial pending
            // on it, may have run already, and this dial would wait for an answer that cannot come.
            let me = frontend.serial;
            if self.take_pending(random, |d| d.frontend.serial == me).is_none() {
                // The cleanup got it first and has already told the frontend.
                return Ok(backend);
            }
            self.metrics.dial_failure(DialFailureReason::BackendClose);
            let error = format!("agent {} disconnected", backend.agent_id);
            return Err((DialStartError::AgentGone(error), Some(backend)));
        }
        tracing::debug!(random, %address, agent_id = %backend.agent_id, "dialing");
        let send = backend.send(Packet::dial_request(address, random), self);
        let sent = match send_timeout {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| true).and_then(|r| r.map_err(|_| false)),
            None => send.await.map_err(|_| false),
        };
        match sent {
            Ok(()) => Ok(backend),
            Err(timed_out) => {
                let me = frontend.serial;
                self.take_pending(random, |d| d.frontend.serial == me);
                if timed_out {
                    self.metrics.dial_failure(DialFailureReason::BackendDialTimeout);
                    Err((DialStartError::Timeout, Some(backend)))
                } else {
                    self.metrics.dial_failure(DialFailureReason::BackendClose);
                    let error = format!("agent {} disconnected", backend.agent_id);
                    Err((DialStartError::AgentGone(error), Some(backend)))
                }
            }
        }
    }

    /// Abandons `frontend`'s pending dial `random` (the frontend cancelled or went away). The agent is told
    /// with DIAL_CLS, which the reference does not do: our agent stops the dial; a Go agent ignores it, and
    /// its late DIAL_RSP is answered with CLOSE_REQ. Returns whether the dial was still pending.
    pub(crate) fn abandon_dial(&self, frontend: &Frontend, random: i64, failure: DialFailure) -> bool {
        let me = frontend.serial;
        match self.take_pending(random, |d| d.frontend.serial == me) {
            Some(dial) => {
                self.metrics.dial_failure(DialFailureReason::FrontendClose);
                self.audit_pending_failed(random, &dial, failure, "");
                dial.backend.send_control(Packet::close_dial(random), self);
                true
            }
            None => false,
        }
    }

    /// A frontend is gone: its pending dials are abandoned and its connections closed on the agent, for
    /// `reason` (unless they recorded a cause already).
    pub(crate) fn frontend_ended(
        &self,
        frontend: &Frontend,
        dials: impl IntoIterator<Item = i64>,
        reason: CloseReason,
    ) {
        frontend.closed.cancel();
        for random in dials {
            self.abandon_dial(frontend, random, DialFailure::FrontendGone);
        }
        let reason = self.close_reason(reason);
        let links: Vec<_> = frontend.links.lock().drain(..).collect();
        for link in links {
            let still_ours = matches!(
                link.backend.conns.lock().get(&link.connect_id),
                Some(crate::backend::ConnState::Open { frontend: f, .. }) if f.serial == frontend.serial
            );
            if still_ours {
                link.backend.close_conn(link.connect_id, reason, self);
            }
        }
    }

    /// The pending dials, for `/debug/connections`.
    pub(crate) fn pending_snapshot(&self) -> Vec<serde_json::Value> {
        self.pending
            .lock()
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

    /// Number of dials waiting for an agent's answer.
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.lock().len()
    }

    /// (dial ID, agent stream serial, frontend serial) of every pending dial, for the fuzzing harness.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn pending_owners(&self) -> Vec<(i64, u64, u64)> {
        self.pending.lock().iter().map(|(r, d)| (*r, d.backend.serial, d.frontend.serial)).collect()
    }
}
