//! One agent-to-server stream: the receive loop and the endpoint connections it opened.
//!
//! Connect IDs are allocated per stream from 1, as in the reference. Each endpoint connection runs in its own
//! task with its own bounded queue; the receive loop only queues, so a slow endpoint holds up the others for
//! at most [`ENDPOINT_STALL_LIMIT`], after which that one connection is closed.

use crate::endpoint::{DialFailure, dial_tcp};
use crate::metrics::AgentMetrics;
use bytes::{Bytes, BytesMut};
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_proto::flow::QueueBudget;
use konnectivity_proto::flow::{self, CreditMeter};
use konnectivity_proto::names::{UNKNOWN_CONNECT_ID, UNRECOGNIZED_CONNECT_ID};
use konnectivity_proto::{Packet, PacketKind};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long the receive loop waits for one endpoint whose queue is full before closing that connection.
pub const ENDPOINT_STALL_LIMIT: Duration = Duration::from_secs(5);

/// Size of the buffer endpoint bytes are read into (the reference reads 4 KiB at a time).
const READ_BUFFER: usize = 64 * 1024;

/// An endpoint connection as the receive loop sees it.
struct EndpointConn {
    /// Bytes for the endpoint. Dropping the sender lets the writer drain what is queued and finish, which
    /// is how a CLOSE_REQ closes the connection.
    to_endpoint: mpsc::UnboundedSender<Bytes>,
    /// State the connection's own task shares with the receive loop.
    shared: Arc<ConnShared>,
    /// Stops the connection at once (an endpoint that stopped reading, or a close that could not drain).
    kill: CancellationToken,
}

/// What the receive loop and a connection's task both use.
pub(crate) struct ConnShared {
    /// What `to_endpoint` holds, in flow-control cost units.
    budget: QueueBudget,
    /// Credit for sending this connection's DATA to the server (flow-controlled streams only).
    send_window: Option<Semaphore>,
    /// Where it goes and since when, and bytes each way (for `/debug/connections`).
    pub(crate) address: String,
    pub(crate) dial_id: i64,
    pub(crate) started: Instant,
    pub(crate) from_server: AtomicU64,
    pub(crate) to_server: AtomicU64,
}

impl ConnShared {
    /// Bytes queued towards the endpoint.
    pub(crate) fn queued(&self) -> usize {
        self.budget.queued()
    }
}

/// The sending half of a server stream, as the session gets it.
pub(crate) struct Outbound {
    /// Packets for the server.
    pub(crate) to_server: mpsc::Sender<Packet>,
    /// Half-closes the stream once what is queued in `to_server` is sent; only [`Session::serve`] fires it.
    /// (Dropping every sender ends the stream too, as when an opened stream is not kept.)
    pub(crate) end: CancellationToken,
}

impl Outbound {
    /// A sending half with room for `queue` packets, and the request stream gRPC sends from it: once `end`
    /// fires, that stream still yields everything queued before, then ends (a clean half-close) instead of
    /// being dropped mid-queue.
    pub(crate) fn channel(queue: usize) -> (Self, impl futures_util::Stream<Item = Packet> + Send + 'static) {
        let (to_server, rx) = mpsc::channel(queue);
        let end = CancellationToken::new();
        let packets = futures_util::stream::unfold((rx, end.clone(), false), |(mut rx, end, mut closing)| async move {
            if !closing {
                tokio::select! {
                    biased;
                    m = rx.recv() => return m.map(|m| (m, (rx, end, closing))),
                    _ = end.cancelled() => {
                        // Closed first, then emptied: what was queued before `end` fired is all sent.
                        rx.close();
                        closing = true;
                    }
                }
            }
            rx.recv().await.map(|m| (m, (rx, end, closing)))
        });
        (Self { to_server, end }, packets)
    }
}

/// One server stream's state.
pub(crate) struct Session {
    pub(crate) server_id: String,
    /// The configured address this stream was opened through.
    pub(crate) address: String,
    to_server: mpsc::Sender<Packet>,
    /// Half-closes the stream (see [`Outbound::end`]): fired by the receive loop, after its DRAIN is queued.
    end_outbound: CancellationToken,
    conns: Mutex<HashMap<i64, EndpointConn>>,
    /// Dials in flight by dial ID, so a DIAL_CLS can stop them.
    dials: Mutex<HashMap<i64, CancellationToken>>,
    next_connect_id: AtomicI64,
    /// Dials and connections whose task is still running: from the DIAL_REQ until its DIAL_RSP error or the
    /// connection's CLOSE_RSP is queued. The agent's drain waits for this to reach zero.
    in_progress: AtomicUsize,
    /// DIAL_REQs received, over every stream of the agent (the drain's sign of activity).
    dials_received: Arc<AtomicU64>,
    /// Set by [`Session::close_all`]: the error every connection still open (or opening) is closed with.
    closing_reason: OnceLock<String>,
    /// Cancelled when the stream ends: every connection on it stops.
    pub(crate) closed: CancellationToken,
    metrics: AgentMetrics,
    dial_timeout: Duration,
    /// Checked against every address a dial resolves to.
    policy: Arc<EgressPolicy>,
    /// Cost units queued towards one endpoint before the receive loop waits (servers without flow control).
    endpoint_queue_limit: usize,
    /// Both ends negotiated per-connection flow control (the server is konnectivity-rs).
    flow_control: bool,
    tracker: TaskTracker,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        server_id: String,
        address: String,
        outbound: Outbound,
        closed: CancellationToken,
        metrics: AgentMetrics,
        config: &crate::AgentConfig,
        flow_control: bool,
        dials_received: Arc<AtomicU64>,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            server_id,
            address,
            to_server: outbound.to_server,
            end_outbound: outbound.end,
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            next_connect_id: AtomicI64::new(1),
            in_progress: AtomicUsize::new(0),
            dials_received,
            closing_reason: OnceLock::new(),
            closed,
            metrics,
            dial_timeout: config.dial_timeout,
            policy: config.egress_policy.clone(),
            // The reference queues --xfr-channel-size packets of up to 4 KiB; we count bytes, with room for as many
            // of our larger reads.
            endpoint_queue_limit: config.xfr_channel_size.max(1).saturating_mul(READ_BUFFER / 4),
            flow_control,
            tracker,
        })
    }

    /// Endpoint connections open on this stream.
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.lock().len()
    }

    /// Dials in flight and connections not yet closed towards the server.
    pub(crate) fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::SeqCst)
    }

    /// Closes every connection on this stream, and any that is still being dialed, telling the server
    /// `reason` as the CLOSE_RSP (or DIAL_RSP) error so that each frontend sees an error, not a clean end.
    pub(crate) fn close_all(&self, reason: &str) {
        let _ = self.closing_reason.set(reason.to_string());
        for conn in self.conns.lock().values() {
            conn.kill.cancel();
        }
        for dial in self.dials.lock().values() {
            dial.cancel();
        }
    }

    /// This stream and its connections, for `/debug/connections`.
    pub(crate) fn debug_view(&self) -> serde_json::Value {
        let connections: Vec<_> = self
            .conns
            .lock()
            .iter()
            .map(|(connect_id, c)| {
                let s = &c.shared;
                serde_json::json!({
                    "connect_id": connect_id,
                    "dial_id": s.dial_id,
                    "address": s.address,
                    "age_seconds": s.started.elapsed().as_secs_f64(),
                    "bytes_from_server": s.from_server.load(Ordering::Relaxed),
                    "bytes_to_server": s.to_server.load(Ordering::Relaxed),
                    "queued_bytes": s.queued(),
                })
            })
            .collect();
        serde_json::json!({
            "server_id": self.server_id,
            "address": self.address,
            "flow_control": self.flow_control,
            "dials_in_flight": self.dials.lock().len(),
            "connections": connections,
        })
    }

    /// Sends a packet to the server; false once the stream is gone.
    async fn send(&self, packet: Packet) -> bool {
        let packet_type = packet.r#type;
        let sent = tokio::select! {
            r = self.to_server.send(packet) => r.is_ok(),
            _ = self.closed.cancelled() => false,
        };
        if sent {
            self.metrics.sent(packet_type);
        }
        sent
    }

    /// Sends a control packet from the receive loop without waiting there.
    fn send_control(self: &Arc<Self>, packet: Packet) {
        self.metrics.sent(packet.r#type);
        if let Err(TrySendError::Full(packet)) = self.to_server.try_send(packet) {
            let me = self.clone();
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = me.to_server.send(packet) => {}
                    _ = me.closed.cancelled() => {}
                }
            });
        }
    }

    /// Queues DRAIN for the server without waiting in the receive loop; `queued` fires once it is in the
    /// stream's queue (or the stream is gone), so that the stream is half-closed only after it.
    fn queue_drain(self: &Arc<Self>, queued: &CancellationToken) {
        tracing::info!("sending DRAIN to server");
        let packet = Packet::drain();
        let packet_type = packet.r#type;
        match self.to_server.try_send(packet) {
            Ok(()) => {
                self.metrics.sent(packet_type);
                queued.cancel();
            }
            Err(TrySendError::Closed(_)) => queued.cancel(),
            Err(TrySendError::Full(packet)) => {
                let me = self.clone();
                let queued = queued.clone();
                self.tracker.spawn(async move {
                    me.send(packet).await;
                    queued.cancel();
                });
            }
        }
    }

    /// Reads the server's packets until the stream ends, then stops every connection on it.
    ///
    /// This loop owns the stream's end: on `drain` it queues DRAIN; on `finish` (the end of a drain) it queues
    /// DRAIN if it has not yet, and half-closes the stream only once the DRAIN is queued, so every server reads
    /// DRAIN before the agent's stream ends. It then reads on until the server closes its side.
    pub(crate) async fn serve(
        self: Arc<Self>,
        mut inbound: impl futures_util::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
        drain: CancellationToken,
        finish: CancellationToken,
    ) {
        let drain_queued = CancellationToken::new();
        let mut drain_started = false;
        let mut finishing = false;
        loop {
            let msg = tokio::select! {
                _ = self.closed.cancelled() => break,
                _ = drain.cancelled(), if !drain_started => {
                    drain_started = true;
                    self.queue_drain(&drain_queued);
                    continue;
                }
                _ = finish.cancelled(), if !finishing => {
                    finishing = true;
                    if !drain_started {
                        drain_started = true;
                        self.queue_drain(&drain_queued);
                    }
                    continue;
                }
                _ = drain_queued.cancelled(), if finishing && !self.end_outbound.is_cancelled() => {
                    tracing::debug!("DRAIN queued; half-closing the stream once the queue is sent");
                    self.end_outbound.cancel();
                    continue;
                }
                m = futures_util::StreamExt::next(&mut inbound) => m.transpose(),
            };
            match msg {
                Ok(Some(packet)) => self.handle(packet).await,
                Ok(None) => {
                    tracing::info!("server closed the stream");
                    break;
                }
                Err(status) => {
                    self.metrics.server_connection_failures.with_label_values(&["from_server"]).inc();
                    self.metrics
                        .stream_errors
                        .with_label_values(&[
                            "to_agent",
                            konnectivity_proto::names::grpc_code_name(status.code()),
                            "Unknown",
                        ])
                        .inc();
                    tracing::info!("server stream failed: {}", status.message());
                    break;
                }
            }
        }
        self.closed.cancel();
        let dropped = {
            let mut conns = self.conns.lock();
            let n = conns.len();
            conns.clear();
            n
        };
        tracing::info!(server_id = %self.server_id, connections = dropped, "stream ended; its connections are closed");
    }

    async fn handle(self: &Arc<Self>, packet: Packet) {
        let packet_type = packet.type_name();
        self.metrics.received(packet.r#type);
        let kind = match packet.kind() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("dropping malformed packet from server: {e}");
                return;
            }
        };
        match kind {
            PacketKind::DialRequest(req) => {
                self.dials_received.fetch_add(1, Ordering::SeqCst);
                let connect_id = self.next_connect_id.fetch_add(1, Ordering::Relaxed);
                let cancel = self.closed.child_token();
                if self.closing_reason.get().is_some() {
                    cancel.cancel();
                }
                self.in_progress.fetch_add(1, Ordering::SeqCst);
                self.dials.lock().insert(req.random, cancel.clone());
                let span = tracing::debug_span!("conn", connect_id, dial_id = req.random, address = %req.address);
                self.tracker.spawn(
                    self.clone().dial(req.random, req.address, req.protocol, connect_id, cancel).instrument(span),
                );
            }
            PacketKind::Data(data) => {
                let connect_id = data.connect_id;
                let conn = self.conns.lock().get(&connect_id).map(|c| (c.to_endpoint.clone(), c.shared.clone()));
                let Some((tx, shared)) = conn else {
                    self.send_control(Packet::close_response(connect_id, UNRECOGNIZED_CONNECT_ID));
                    return;
                };
                if data.data.is_empty() {
                    return;
                }
                let cost = flow::cost(data.data.len()) as usize;
                shared.from_server.fetch_add(data.data.len() as u64, Ordering::Relaxed);
                self.metrics.bytes_to_endpoint.inc_by(data.data.len() as u64);
                let budget = &shared.budget;
                let queued = if self.flow_control {
                    // The server may not exceed the window; if it does, it is not our peer any more.
                    budget.queued() + cost <= 2 * flow::WINDOW as usize
                } else if budget.queued() + cost > self.endpoint_queue_limit {
                    tokio::select! {
                        room = budget.wait_below(self.endpoint_queue_limit, ENDPOINT_STALL_LIMIT) => room,
                        _ = self.closed.cancelled() => return,
                    }
                } else {
                    true
                };
                if queued {
                    budget.add(cost);
                    // A closed receiver means the connection is closing; its CLOSE_RSP follows.
                    let _ = tx.send(data.data);
                } else {
                    tracing::warn!(
                        connect_id,
                        "endpoint stopped reading (or the server overran its window); closing the connection"
                    );
                    if let Some(conn) = self.conns.lock().remove(&connect_id) {
                        conn.kill.cancel();
                    }
                }
            }
            PacketKind::CloseRequest(req) => {
                let Some(conn) = self.conns.lock().remove(&req.connect_id) else {
                    self.send_control(Packet::close_response(req.connect_id, UNKNOWN_CONNECT_ID));
                    return;
                };
                // Dropping the sender lets the writer deliver what is queued and finish; an endpoint that
                // does not take it within the stall limit is cut off.
                let kill = conn.kill;
                drop(conn.to_endpoint);
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(ENDPOINT_STALL_LIMIT) => kill.cancel(),
                        _ = kill.cancelled() => {}
                    }
                });
            }
            PacketKind::CloseDial(cls) => {
                // The reference agent ignores DIAL_CLS; we stop the dial so no socket is opened for nobody.
                if let Some(cancel) = self.dials.lock().remove(&cls.random) {
                    cancel.cancel();
                }
            }
            PacketKind::WindowUpdate { connect_id, credit } => {
                if let Some(window) = self.conns.lock().get(&connect_id).and_then(|c| c.shared.send_window.as_ref()) {
                    window.add_permits(credit as usize);
                }
            }
            PacketKind::DialResponse(_) | PacketKind::CloseResponse(_) | PacketKind::Drain => {
                tracing::warn!("unexpected {packet_type} from server; ignored");
            }
        }
    }

    /// One dial and then its connection, to the end; counted in `in_progress` (from the DIAL_REQ) until then.
    async fn dial(
        self: Arc<Self>,
        random: i64,
        address: String,
        protocol: String,
        connect_id: i64,
        cancel: CancellationToken,
    ) {
        self.dial_and_pipe(random, address, protocol, connect_id, cancel).await;
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
    }

    async fn dial_and_pipe(
        self: &Arc<Self>,
        random: i64,
        address: String,
        protocol: String,
        connect_id: i64,
        cancel: CancellationToken,
    ) {
        let started = Instant::now();
        let result = if protocol != "tcp" && !protocol.is_empty() {
            Err(DialFailure::Other(format!("dial {protocol} {address}: unknown network {protocol}")))
        } else {
            tokio::select! {
                r = dial_tcp(&address, self.dial_timeout, &self.policy) => r,
                _ = cancel.cancelled() => Err(DialFailure::Cancelled),
            }
        };
        self.dials.lock().remove(&random);
        let stream = match result {
            Ok(s) => s,
            Err(DialFailure::Cancelled) => {
                tracing::debug!("dial cancelled");
                if let Some(reason) = self.closing_reason.get() {
                    self.send(Packet::dial_response(random, 0, reason.as_str())).await;
                }
                return;
            }
            Err(failure) => {
                if matches!(failure, DialFailure::Denied(_)) {
                    self.metrics.egress_denials.inc();
                }
                let reason = if matches!(failure, DialFailure::Timeout(_)) { "timeout" } else { "unknown" };
                self.metrics.endpoint_dial_failures.with_label_values(&[reason]).inc();
                let text = failure.to_string();
                tracing::debug!("dial failed: {text}");
                self.send(Packet::dial_response(random, 0, text)).await;
                return;
            }
        };
        self.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
        let (to_endpoint, from_server) = mpsc::unbounded_channel();
        let kill = self.closed.child_token();
        let shared = Arc::new(ConnShared {
            budget: QueueBudget::default(),
            send_window: self.flow_control.then(|| Semaphore::new(flow::WINDOW as usize)),
            address: address.clone(),
            dial_id: random,
            started: Instant::now(),
            from_server: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
        });
        self.conns.lock().insert(connect_id, EndpointConn { to_endpoint, shared: shared.clone(), kill: kill.clone() });
        if self.closing_reason.get().is_some() {
            // `close_all` ran between the dial and the registration: this one closes at once too.
            kill.cancel();
        }
        self.metrics.open_endpoint_connections.inc();
        if !self.send(Packet::dial_response(random, connect_id, "")).await {
            self.conns.lock().remove(&connect_id);
            self.metrics.open_endpoint_connections.dec();
            return;
        }
        tracing::debug!("connected");
        self.pipe(stream, connect_id, from_server, &shared, &kill).await;
        kill.cancel();
        self.metrics.open_endpoint_connections.dec();
    }

    /// Moves bytes both ways until the endpoint closes, the server asks to close, or the stream ends.
    async fn pipe(
        self: &Arc<Self>,
        stream: TcpStream,
        connect_id: i64,
        mut from_server: mpsc::UnboundedReceiver<Bytes>,
        shared: &ConnShared,
        kill: &CancellationToken,
    ) {
        let (mut rd, mut wr) = stream.into_split();
        let writer = async {
            let credit = CreditMeter::default();
            while let Some(bytes) = from_server.recv().await {
                wr.write_all(&bytes).await?;
                let cost = flow::cost(bytes.len());
                shared.budget.release(cost as usize);
                if self.flow_control
                    && let Some(c) = credit.consumed(cost)
                {
                    self.send(Packet::window_update(connect_id, c)).await;
                }
            }
            Ok::<_, io::Error>(())
        };
        let reader = async {
            let mut buf = BytesMut::with_capacity(READ_BUFFER);
            loop {
                if buf.capacity() < READ_BUFFER / 4 {
                    buf.reserve(READ_BUFFER);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        let chunk = buf.split().freeze();
                        if let Some(window) = &shared.send_window {
                            if window.available_permits() < flow::cost(chunk.len()) as usize {
                                self.metrics.flow_control_waits.inc();
                            }
                            // Wait for the server's credit for this connection only.
                            match window.acquire_many(flow::cost(chunk.len())).await {
                                Ok(permit) => permit.forget(),
                                Err(_) => return Ok(()),
                            }
                        }
                        let len = chunk.len() as u64;
                        if !self.send(Packet::data(connect_id, chunk)).await {
                            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "server stream closed"));
                        }
                        shared.to_server.fetch_add(len, Ordering::Relaxed);
                        self.metrics.bytes_to_server.inc_by(len);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let why = tokio::select! {
            r = reader => match r { Ok(()) => "endpoint closed".to_string(), Err(e) => format!("endpoint read: {e}") },
            r = writer => match r { Ok(()) => "close requested".to_string(), Err(e) => format!("endpoint write: {e}") },
            _ = kill.cancelled() => "stopped".to_string(),
        };
        self.conns.lock().remove(&connect_id);
        tracing::debug!("connection closed: {why}");
        if !self.closed.is_cancelled() {
            let error = match (kill.is_cancelled(), self.closing_reason.get()) {
                (true, Some(reason)) => reason.as_str(),
                _ => "",
            };
            self.send(Packet::close_response(connect_id, error)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    /// A session whose outbound half is the request stream the dialer would give gRPC, over a queue of `queue`
    /// packets; the stream is returned with it.
    fn session(queue: usize) -> (Arc<Session>, impl futures_util::Stream<Item = Packet>, TaskTracker) {
        let (outbound, packets) = Outbound::channel(queue);
        let config = crate::AgentConfig::new("127.0.0.1", 1, "unused-ca.crt".into());
        let tracker = TaskTracker::new();
        let session = Session::new(
            "server".into(),
            "127.0.0.1:1".into(),
            outbound,
            CancellationToken::new(),
            AgentMetrics::new().expect("metrics"),
            &config,
            false,
            Default::default(),
            tracker.clone(),
        );
        (session, packets, tracker)
    }

    /// The end of a drain right after its start (an idle agent with no idle period), with the stream's queue
    /// empty or full: the stream still carries DRAIN, after what was queued before it, and only then ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_reaches_the_server_before_the_stream_ends() {
        for round in 0..200 {
            let full = round % 2 == 1;
            let (session, outbound, tracker) = session(1);
            if full {
                // DRAIN then waits for room, off the receive loop.
                session.to_server.try_send(Packet::data(1, Bytes::from_static(b"queued"))).expect("room for one");
            }
            let (server, inbound) = mpsc::unbounded_channel::<Result<Packet, tonic::Status>>();
            let (drain, finish) = (CancellationToken::new(), CancellationToken::new());
            tracker.spawn(session.clone().serve(UnboundedReceiverStream::new(inbound), drain.clone(), finish.clone()));
            // Half the rounds: `finish` alone (a drain this session's loop never saw) must send DRAIN too.
            if round % 4 < 2 {
                drain.cancel();
            }
            finish.cancel();
            let sent: Vec<Packet> = tokio::time::timeout(Duration::from_secs(5), outbound.collect())
                .await
                .unwrap_or_else(|_| panic!("round {round}: the outbound stream did not end"));
            let kinds: Vec<&str> = sent.iter().map(Packet::type_name).collect();
            let expected: &[&str] = if full { &["DATA", "DRAIN"] } else { &["DRAIN"] };
            assert_eq!(kinds, expected, "round {round}");
            // The server closes its side: the session ends, and nothing of it is left.
            drop(server);
            tracker.close();
            tokio::time::timeout(Duration::from_secs(5), tracker.wait())
                .await
                .unwrap_or_else(|_| panic!("round {round}: {} session tasks left", tracker.len()));
        }
    }
}
