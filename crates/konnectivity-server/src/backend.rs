//! Agent streams (`/AgentService/Connect`): one [`Backend`] per stream, the manager that picks one for a dial,
//! and the loop that reads an agent's packets.
//!
//! The loop never writes to a frontend socket itself: it queues packets on the frontend's own queue, so one
//! slow frontend costs the others on this agent at most [`crate::state::FRONTEND_STALL_LIMIT`], once.

use crate::audit::{CloseReason, DialFailure};
use crate::metrics::{DialFailureReason, Segment};
use crate::state::{Delivery, Frontend, Link, Tunnels};
use futures_util::{Stream, StreamExt};
use konnectivity_proto::flow;
use konnectivity_proto::names::{AGENT_ID, AGENT_IDENTIFIERS, SERVER_COUNT, SERVER_ID};
use konnectivity_proto::{Packet, PacketKind, agent::AgentService};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Packets queued towards one agent stream.
pub const AGENT_QUEUE_PACKETS: usize = 256;

/// When an agent opens a stream while the server still holds an older one of the same agent ID, the older one
/// is probed (a `CLOSE_REQ` for connection ID 0, which every agent answers with a `CLOSE_RSP`); if nothing at
/// all arrives on it within this time it is dead (a half-open connection the agent has already given up on)
/// and is dropped, so dials stop going to it. Without this, a server whose keepalive is off (the reference's
/// default is 1 h) kept routing every dial for that agent to the dead stream, since the first stream of an
/// agent ID is the one used.
pub const STALE_STREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection ID the liveness probe closes: agents count theirs from 1, so it is never open.
const PROBE_CONNECT_ID: i64 = 0;

/// What an agent advertised in its `agentidentifiers` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentIdentifiers {
    /// `host` values.
    pub hosts: Vec<String>,
    /// `ipv4` values.
    pub ipv4: Vec<String>,
    /// `ipv6` values.
    pub ipv6: Vec<String>,
    /// `cidr` values.
    pub cidrs: Vec<String>,
    /// `default-route` (only the first value counts, as in the reference).
    pub default_route: bool,
}

impl AgentIdentifiers {
    /// Parses the URL-query form. Unknown keys are ignored, as the reference server does.
    pub fn parse(query: &str) -> Self {
        let mut ids = Self::default();
        let mut saw_default_route = false;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "host" => ids.hosts.push(v.into_owned()),
                "ipv4" => ids.ipv4.push(v.into_owned()),
                "ipv6" => ids.ipv6.push(v.into_owned()),
                "cidr" => ids.cidrs.push(v.into_owned()),
                "default-route" if !saw_default_route => {
                    saw_default_route = true;
                    ids.default_route = v.parse().unwrap_or(false);
                }
                _ => {}
            }
        }
        ids
    }
}

/// A connection as the server tracks it on an agent stream.
pub(crate) enum ConnState {
    /// Established and owned by a live frontend.
    Open {
        /// The frontend stream it belongs to.
        frontend: Arc<Frontend>,
        /// Its flow-control state.
        link: Arc<Link>,
    },
    /// Its frontend is gone; CLOSE_REQ was sent and the agent's CLOSE_RSP is awaited. DATA is dropped.
    Closing {
        /// Its state until then (byte counts and close reason for the audit log).
        link: Arc<Link>,
    },
}

impl ConnState {
    /// The connection's link, whatever its state.
    pub(crate) fn link(&self) -> &Arc<Link> {
        match self {
            Self::Open { link, .. } | Self::Closing { link } => link,
        }
    }
}

/// One agent stream.
pub struct Backend {
    pub(crate) serial: u64,
    pub(crate) agent_id: String,
    pub(crate) identifiers: AgentIdentifiers,
    pub(crate) peer: String,
    pub(crate) connected_at: Instant,
    /// Both ends negotiated per-connection flow control (the agent is konnectivity-rs).
    pub(crate) flow_control: bool,
    to_agent: mpsc::Sender<Packet>,
    draining: AtomicBool,
    pub(crate) conns: Mutex<HashMap<i64, ConnState>>,
    pub(crate) pending: Mutex<HashSet<i64>>,
    /// Cancelled when the stream has ended (or the server stops).
    pub(crate) closed: CancellationToken,
    /// Cancelled when the agent's connection itself has died: noticed even while the reader is busy.
    transport_closed: CancellationToken,
    /// Cancelling it closes the agent's connection at once (TLS connections; a token nothing watches otherwise).
    abort: CancellationToken,
    /// Packets read from the agent so far (the stale-stream probe compares it).
    packets_in: AtomicU64,
}

/// The agent connection under a stream, as far as the stream needs it.
#[derive(Default)]
pub(crate) struct AgentTransport {
    /// Cancelled when the connection has died.
    pub(crate) closed: CancellationToken,
    /// Cancel to close the connection at once.
    pub(crate) abort: CancellationToken,
}

impl Backend {
    /// A new agent stream's state, and the receiving end of its queue towards the agent.
    pub(crate) fn new(
        serial: u64,
        agent_id: String,
        identifiers: AgentIdentifiers,
        peer: String,
        flow_control: bool,
        closed: CancellationToken,
        transport: AgentTransport,
    ) -> (Arc<Self>, mpsc::Receiver<Packet>) {
        let (to_agent, rx) = mpsc::channel(AGENT_QUEUE_PACKETS);
        let backend = Arc::new(Backend {
            serial,
            agent_id,
            identifiers,
            peer,
            connected_at: Instant::now(),
            flow_control,
            to_agent,
            draining: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
            closed,
            transport_closed: transport.closed,
            abort: transport.abort,
            packets_in: AtomicU64::new(0),
        });
        (backend, rx)
    }

    /// Sends a packet to the agent, waiting for room; fails if the stream has ended.
    pub(crate) async fn send(&self, packet: Packet, tunnels: &Tunnels) -> Result<(), Status> {
        let packet_type = packet.r#type;
        tokio::select! {
            r = self.to_agent.send(packet) => r.map_err(|_| Status::unavailable("agent stream closed"))?,
            _ = self.closed.cancelled() => return Err(Status::unavailable("agent stream closed")),
        }
        tunnels.metrics.packet(Segment::ToAgent, packet_type);
        Ok(())
    }

    /// Sends a control packet from a context that must not wait (the agent's own reader): if the queue is
    /// full, the send moves to a task of its own.
    pub(crate) fn send_control(&self, packet: Packet, tunnels: &Tunnels) {
        tunnels.metrics.packet(Segment::ToAgent, packet.r#type);
        if let Err(mpsc::error::TrySendError::Full(packet)) = self.to_agent.try_send(packet) {
            let tx = self.to_agent.clone();
            let closed = self.closed.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tx.send(packet) => {}
                    _ = closed.cancelled() => {}
                }
            });
        }
    }

    /// Connections open on this stream (the load that least-loaded selection compares).
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.lock().len()
    }

    /// Whether the agent said it is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the connection `connect_id` closing (for `reason`, unless it has a cause already) and asks the
    /// agent to close it.
    pub(crate) fn close_conn(&self, connect_id: i64, reason: CloseReason, tunnels: &Tunnels) {
        let owner = {
            let mut conns = self.conns.lock();
            let Some(state) = conns.get_mut(&connect_id) else {
                drop(conns);
                self.send_control(Packet::close_request(connect_id), tunnels);
                return;
            };
            let link = state.link().clone();
            link.closing_because(reason);
            match std::mem::replace(state, ConnState::Closing { link }) {
                ConnState::Open { frontend, .. } => Some(frontend),
                ConnState::Closing { .. } => None,
            }
        };
        // The frontend no longer owns it: the agent's CLOSE_RSP for a closing connection is not relayed (nor
        // forgotten there), so a link left in the frontend's list would outlive the connection, and the frontend
        // would still "own" its ID if the agent ever reused it (found by the fuzzing harness's checks).
        if let Some(frontend) = owner {
            frontend.forget(self.serial, connect_id);
        }
        self.send_control(Packet::close_request(connect_id), tunnels);
    }
}

/// The connected agents, and the strategies that pick one for a dial (see [`crate::routing`]).
pub struct BackendManager {
    inner: Mutex<ManagerInner>,
    metrics: crate::metrics::ServerMetrics,
    strategies: Vec<crate::routing::Strategy>,
}

#[derive(Default)]
struct ManagerInner {
    /// Streams by agent ID; the first one is used, as in the reference.
    by_agent: HashMap<String, Vec<Arc<Backend>>>,
    /// Agent IDs, for random choice.
    ids: Vec<String>,
}

impl BackendManager {
    pub(crate) fn new(metrics: crate::metrics::ServerMetrics, strategies: Vec<crate::routing::Strategy>) -> Self {
        let this = Self { inner: Mutex::new(ManagerInner::default()), metrics, strategies };
        this.publish(&ManagerInner::default());
        this
    }

    /// Updates `ready_backends{proxy_strategy}` (agents each strategy could use) and the deprecated
    /// `ready_backend_connections` (the first strategy's count).
    fn publish(&self, inner: &ManagerInner) {
        for strategy in self.strategies.iter().rev() {
            let n = inner.by_agent.values().filter_map(|s| s.first()).filter(|b| strategy.serves(b)).count();
            self.metrics.set_ready_backends(strategy.name(), n);
        }
    }

    pub(crate) fn add(&self, backend: Arc<Backend>) {
        let mut inner = self.inner.lock();
        let streams = inner.by_agent.entry(backend.agent_id.clone()).or_default();
        streams.push(backend.clone());
        if streams.len() == 1 {
            inner.ids.push(backend.agent_id.clone());
        }
        self.publish(&inner);
    }

    fn remove(&self, backend: &Backend) {
        let mut inner = self.inner.lock();
        let Some(streams) = inner.by_agent.get_mut(&backend.agent_id) else { return };
        streams.retain(|b| b.serial != backend.serial);
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
            inner.ids.iter().filter_map(|id| inner.by_agent.get(id).and_then(|s| s.first()).cloned()).collect()
        };
        crate::routing::pick(&self.strategies, &agents, address)
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
    fn older_streams(&self, backend: &Backend) -> Vec<Arc<Backend>> {
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
    async fn probe(&self, old: Arc<Backend>, tunnels: &Tunnels) {
        let before = old.packets_in.load(Ordering::Relaxed);
        old.send_control(Packet::close_request(PROBE_CONNECT_ID), tunnels);
        tokio::select! {
            _ = tokio::time::sleep(STALE_STREAM_PROBE_TIMEOUT) => {}
            _ = old.closed.cancelled() => return,
        }
        if old.packets_in.load(Ordering::Relaxed) != before {
            return;
        }
        tracing::warn!(
            agent_id = %old.agent_id,
            peer = %old.peer,
            "the agent opened a new stream and its older one answered nothing within {STALE_STREAM_PROBE_TIMEOUT:?}: \
             it is dead (half-open); dropping it, with its connections and dials"
        );
        old.closed.cancel();
        old.abort.cancel();
    }
}

/// The `/AgentService/Connect` service.
pub(crate) struct AgentEndpoint {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) server_id: String,
    pub(crate) server_count: u32,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// ServiceAccount token authentication, when enabled.
    pub(crate) auth: Option<Arc<crate::auth::TokenAuthenticator>>,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

fn one_value<'a>(md: &'a tonic::metadata::MetadataMap, key: &str) -> Result<Option<&'a str>, usize> {
    let values: Vec<_> = md.get_all(key).iter().collect();
    match values.as_slice() {
        [] => Ok(None),
        [v] => Ok(v.to_str().ok()),
        more => Err(more.len()),
    }
}

#[tonic::async_trait]
impl AgentService for AgentEndpoint {
    type ConnectStream = PacketStream;

    async fn connect(&self, request: Request<Streaming<Packet>>) -> Result<Response<Self::ConnectStream>, Status> {
        let md = request.metadata();
        let agent_id = match one_value(md, AGENT_ID) {
            Ok(Some(id)) if !id.is_empty() => id.to_string(),
            Ok(_) => return Err(Status::invalid_argument("expected one agent ID in the context, got 0")),
            Err(n) => return Err(Status::invalid_argument(format!("expected one agent ID in the context, got {n}"))),
        };
        let identifiers = match one_value(md, AGENT_IDENTIFIERS) {
            Ok(v) => AgentIdentifiers::parse(v.unwrap_or("")),
            Err(n) => {
                return Err(Status::invalid_argument(format!(
                    "expected at most one set of agent identifiers, got {n}"
                )));
            }
        };
        let info = request.extensions().get::<konnectivity_transport::listen::TlsConnectInfo>();
        let peer = info.map(|i| i.remote_addr.to_string()).unwrap_or_else(|| "unknown".into());
        if let Some(auth) = &self.auth {
            match auth.authenticate(md).await {
                Ok(username) => tracing::debug!(%agent_id, %peer, %username, "agent authenticated by token"),
                Err(status) => {
                    tracing::warn!(%agent_id, %peer, error = %status.message(), "agent authentication failed");
                    return Err(status);
                }
            }
        }
        let transport = info
            .map(|i| AgentTransport { closed: i.transport_closed.clone(), abort: i.abort.clone() })
            .unwrap_or_default();

        let flow_control = md.get(flow::METADATA_KEY).and_then(|v| v.to_str().ok()) == Some(flow::VERSION);
        let closed = self.shutdown.child_token();
        let (backend, rx) = Backend::new(
            self.tunnels.next_serial(),
            agent_id.clone(),
            identifiers,
            peer.clone(),
            flow_control,
            closed.clone(),
            transport,
        );
        self.tunnels.backends.add(backend.clone());
        for old in self.tunnels.backends.older_streams(&backend) {
            let tunnels = self.tunnels.clone();
            self.tracker.spawn(async move { tunnels.backends.probe(old, &tunnels).await });
        }
        self.tunnels.metrics.grpc_connections("Connect", 1.0);
        tracing::info!(%agent_id, %peer, flow_control, "agent connected");

        let inbound = request.into_inner();
        let tunnels = self.tunnels.clone();
        let span = tracing::info_span!("agent", agent_id = %agent_id, peer = %peer);
        self.tracker.spawn(serve_agent(backend, inbound, tunnels).instrument(span));

        let outbound = ReceiverStream::new(rx).map(Ok).take_until(closed.cancelled_owned());
        let mut response = Response::new(Box::pin(outbound) as PacketStream);
        // Go agents block on these headers before anything else; tonic sends them as soon as we return.
        response.metadata_mut().insert(
            SERVER_ID,
            self.server_id.parse().map_err(|_| Status::internal("server ID is not a valid header value"))?,
        );
        response.metadata_mut().insert(SERVER_COUNT, self.server_count.into());
        if flow_control {
            response
                .metadata_mut()
                .insert(flow::METADATA_KEY, tonic::metadata::MetadataValue::from_static(flow::VERSION));
        }
        Ok(response)
    }
}

/// Reads an agent's stream until it ends, then cleans up after it. `inbound` is the gRPC request stream (or, in
/// the fuzzing harness, packets fed to it directly).
pub(crate) async fn serve_agent(
    backend: Arc<Backend>,
    mut inbound: impl Stream<Item = Result<Packet, Status>> + Unpin,
    tunnels: Arc<Tunnels>,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.next() => m.transpose(),
            _ = backend.closed.cancelled() => break,
            _ = backend.transport_closed.cancelled() => {
                tracing::info!("agent connection lost");
                break;
            }
        };
        match msg {
            Ok(Some(packet)) => {
                backend.packets_in.fetch_add(1, Ordering::Relaxed);
                handle_agent_packet(&backend, packet, &tunnels).await
            }
            Ok(None) => {
                tracing::info!("agent stream ended");
                break;
            }
            Err(status) => {
                tunnels.metrics.stream_error(Segment::FromAgent, status.code(), "Unknown");
                tracing::info!("agent stream failed: {}", status.message());
                break;
            }
        }
    }
    agent_gone(&backend, &tunnels);
}

async fn handle_agent_packet(backend: &Arc<Backend>, packet: Packet, tunnels: &Tunnels) {
    let packet_type = packet.type_name();
    tunnels.metrics.packet(Segment::FromAgent, packet.r#type);
    let kind = match packet.kind() {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("dropping malformed packet from agent: {e}");
            return;
        }
    };
    match kind {
        PacketKind::DialResponse(rsp) => {
            let random = rsp.random;
            let Some(dial) = tunnels.take_pending(random, |d| d.backend.serial == backend.serial) else {
                tunnels.metrics.dial_failure(DialFailureReason::UnrecognizedResponse);
                tracing::debug!(random, connect_id = rsp.connect_id, "DIAL_RSP matches no pending dial");
                if rsp.connect_id != 0 {
                    backend.send_control(Packet::close_request(rsp.connect_id), tunnels);
                }
                return;
            };
            tunnels.metrics.observe_dial(dial.started.elapsed().as_secs_f64());
            if !rsp.error.is_empty() || rsp.connect_id == 0 {
                let error =
                    if rsp.error.is_empty() { "agent answered the dial without a connection ID" } else { &rsp.error };
                tunnels.fail_dial(random, &dial, DialFailureReason::ErrorResponse, error);
                return;
            }
            let connect_id = rsp.connect_id;
            if dial.frontend.closed.is_cancelled() {
                tunnels.metrics.dial_failure(DialFailureReason::SendResponse);
                tunnels.audit_pending_failed(random, &dial, DialFailure::FrontendGone, "");
                backend.send_control(Packet::close_request(connect_id), tunnels);
                return;
            }
            let link = {
                let mut conns = backend.conns.lock();
                if conns.contains_key(&connect_id) {
                    drop(conns);
                    tracing::warn!(connect_id, "agent reused a live connection ID; refusing the dial");
                    tunnels.fail_dial(random, &dial, DialFailureReason::ErrorResponse, "agent reused a connection ID");
                    return;
                }
                let link = Link::new(backend.clone(), connect_id, random, dial.address.clone(), &dial.frontend);
                dial.frontend.links.lock().push(link.clone());
                conns.insert(connect_id, ConnState::Open { frontend: dial.frontend.clone(), link: link.clone() });
                link
            };
            // Its close can only be audited later: by this same loop (CLOSE_RSP, or the stream's end).
            tunnels.audit.connection_opened(&link, dial.started.elapsed());
            tunnels.metrics.established(1.0);
            tracing::debug!(random, connect_id, address = %dial.address, "connection established");
            dial.frontend.send_control(Packet::dial_response(random, connect_id, ""), &tunnels.metrics);
            if dial.frontend.closed.is_cancelled() {
                // The frontend ended while we answered; its cleanup may have run before the link existed.
                tunnels.metrics.dial_failure(DialFailureReason::SendResponse);
                backend.close_conn(connect_id, CloseReason::FrontendEnded, tunnels);
            }
        }
        PacketKind::Data(data) => {
            let connect_id = data.connect_id;
            let open = match backend.conns.lock().get(&connect_id) {
                Some(ConnState::Open { frontend, link }) => Some((frontend.clone(), link.clone())),
                Some(ConnState::Closing { .. }) => return,
                None => None,
            };
            let Some((frontend, link)) = open else {
                tracing::debug!(connect_id, "DATA for unknown connection; asking the agent to close it");
                backend.send_control(Packet::close_request(connect_id), tunnels);
                return;
            };
            let len = data.data.len() as u64;
            let packet = Packet::data(connect_id, data.data);
            let agent_gone = backend.transport_closed.cancelled();
            match frontend.deliver_data(packet, backend.flow_control, &tunnels.metrics, agent_gone).await {
                Delivery::Queued => {
                    link.relayed_to_frontend.fetch_add(len, Ordering::Relaxed);
                }
                Delivery::Gone => backend.close_conn(connect_id, CloseReason::FrontendEnded, tunnels),
                // The stream's reader stops next, and its cleanup tells this frontend the agent disconnected.
                Delivery::AgentGone => {}
                Delivery::Stalled => {
                    tunnels.metrics.frontend_stall_close();
                    tracing::warn!(connect_id, "frontend stopped reading; closing its connection");
                    backend.close_conn(connect_id, CloseReason::FrontendStalled, tunnels);
                    frontend.abort(Status::resource_exhausted(format!(
                        "frontend did not read for {:?}; connection {connect_id} closed",
                        crate::state::FRONTEND_STALL_LIMIT
                    )));
                }
            }
        }
        PacketKind::CloseResponse(rsp) => {
            let removed = backend.conns.lock().remove(&rsp.connect_id);
            match removed {
                Some(state) => {
                    tunnels.metrics.established(-1.0);
                    tunnels.audit.connection_closed(state.link(), CloseReason::AgentClosed, &rsp.error);
                    if let ConnState::Open { frontend, .. } = state {
                        frontend.forget(backend.serial, rsp.connect_id);
                        frontend.send_control(Packet::close_response(rsp.connect_id, rsp.error), &tunnels.metrics);
                    }
                }
                None => tracing::debug!(connect_id = rsp.connect_id, "CLOSE_RSP for unknown connection"),
            }
        }
        PacketKind::WindowUpdate { connect_id, credit } => {
            if let Some(ConnState::Open { link, .. }) = backend.conns.lock().get(&connect_id)
                && let Some(window) = &link.upload_window
            {
                window.add_permits(credit as usize);
            }
        }
        PacketKind::CloseDial(cls) => {
            if let Some(dial) = tunnels.take_pending(cls.random, |d| d.backend.serial == backend.serial) {
                tunnels.audit_pending_failed(cls.random, &dial, DialFailure::AgentCancelled, "");
                dial.frontend.send_control(Packet::close_dial(cls.random), &tunnels.metrics);
            }
        }
        PacketKind::Drain => {
            tracing::info!("agent is draining");
            backend.draining.store(true, Ordering::Relaxed);
        }
        PacketKind::DialRequest(_) | PacketKind::CloseRequest(_) => {
            tracing::warn!("unexpected {packet_type} from agent; ignored");
        }
    }
}

/// Cleans up after an agent stream: every connection on it is closed towards its frontend, and every dial
/// pending on it fails now (the reference leaves those to time out).
fn agent_gone(backend: &Arc<Backend>, tunnels: &Tunnels) {
    tunnels.backends.remove(backend);
    backend.closed.cancel();
    tunnels.metrics.grpc_connections("Connect", -1.0);
    let conns: Vec<_> = backend.conns.lock().drain().collect();
    tunnels.metrics.established(-(conns.len() as f64));
    let reason = tunnels.close_reason(CloseReason::AgentDisconnected);
    for (connect_id, state) in conns {
        let error = format!("agent {} disconnected", backend.agent_id);
        tunnels.audit.connection_closed(state.link(), reason, &error);
        if let ConnState::Open { frontend, .. } = state {
            frontend.forget(backend.serial, connect_id);
            frontend.send_control(Packet::close_response(connect_id, error), &tunnels.metrics);
        }
    }
    let randoms: Vec<i64> = backend.pending.lock().iter().copied().collect();
    for random in randoms {
        if let Some(dial) = tunnels.take_pending(random, |d| d.backend.serial == backend.serial) {
            let error = format!("agent {} disconnected before answering the dial", backend.agent_id);
            tunnels.fail_dial(random, &dial, DialFailureReason::BackendClose, &error);
        }
    }
    tracing::info!(agent_id = %backend.agent_id, "agent disconnected; its connections and dials are closed");
}
