//! The gRPC frontend (`/ProxyService/Proxy`): one task per stream, driving the dial and relaying DATA to the
//! agent. Packets from the agent reach the stream through its own queue (see [`crate::state::Frontend`]).

use crate::audit::{ClientIdentity, CloseReason, DialFailure};
use crate::backend::Backend;
use crate::metrics::{DialFailureReason, Segment};
use crate::state::{DialStartError, Frontend, Tunnels};
use futures_util::{Stream, StreamExt};
use konnectivity_proto::names::{
    BACKEND_DIAL_TIMEOUT, BACKEND_NOT_INITIALIZED, BACKEND_UNINITIALIZED, MISMATCHED_CONNECTION_IDS,
};
use konnectivity_proto::{Packet, PacketKind, proxy::ProxyService};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
// The dial deadlines are on tokio's clock, the one their timer runs on: with std's, a test clock (paused tokio
// time) would fire the timer before the deadline looked passed, and the loop would spin until it did.
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// The `/ProxyService/Proxy` service.
pub(crate) struct ProxyEndpoint {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) backend_dial_timeout: Option<Duration>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl ProxyService for ProxyEndpoint {
    type ProxyStream = PacketStream;

    async fn proxy(&self, request: Request<Streaming<Packet>>) -> Result<Response<Self::ProxyStream>, Status> {
        let user_agent = request.metadata().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let client = ClientIdentity::of_request(&request);
        let (frontend, rx) = Frontend::new(self.tunnels.next_serial(), "grpc", client);
        let stream_end = frontend.closed.clone();
        let span = tracing::debug_span!("frontend", serial = frontend.serial, client = %frontend.client, %user_agent);
        let shutdown = self.shutdown.clone();
        let final_frontend = frontend.clone();
        let session_frontend = frontend.clone();
        let tunnels = self.tunnels.clone();
        let timeout = self.backend_dial_timeout;
        self.tracker.spawn(serve_frontend(tunnels, frontend, timeout, request.into_inner(), shutdown).instrument(span));
        let (sent_frontend, tunnels) = (session_frontend, self.tunnels.clone());
        // hyper drops the response stream when the client resets the stream or its connection ends: the frontend
        // is gone then, even if its session is not reading its stream (it waits for an agent's credit).
        let gone = sent_frontend.closed.clone().drop_guard();
        let outbound = UnboundedReceiverStream::new(rx)
            .map(move |(queued_at, packet)| {
                let _ = &gone;
                // The gRPC layer took this packet: free its budget, return flow-control credit.
                sent_frontend.on_sent(&packet, queued_at, &tunnels);
                Ok(packet)
            })
            .take_until(stream_end.cancelled_owned())
            .chain(
                futures_util::stream::once(async move { final_frontend.take_final_status() })
                    .filter_map(|s| std::future::ready(s.map(Err))),
            );
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Reads a frontend's stream until it ends (or the server stops), then abandons its dials and closes its
/// connections. `inbound` is the gRPC request stream (or, in the fuzzing harness, packets fed to it directly).
pub(crate) async fn serve_frontend(
    tunnels: Arc<Tunnels>,
    frontend: Arc<Frontend>,
    backend_dial_timeout: Option<Duration>,
    inbound: impl Stream<Item = Result<Packet, Status>> + Unpin,
    shutdown: CancellationToken,
) {
    let session = FrontendSession {
        frontend,
        tunnels,
        backend_dial_timeout,
        backend: None,
        dials: Vec::new(),
        connect_id: 0,
        stopped: false,
    };
    session.run(inbound, shutdown).await;
}

struct FrontendSession {
    frontend: Arc<Frontend>,
    tunnels: Arc<Tunnels>,
    backend_dial_timeout: Option<Duration>,
    /// The agent stream this frontend dialed through.
    backend: Option<Arc<Backend>>,
    /// Dial IDs this stream sent, with when each must be answered by.
    dials: Vec<(i64, Option<Instant>)>,
    /// The connect ID of this stream's DATA, fixed by the first DATA packet.
    connect_id: i64,
    /// After a close or a protocol error the stream's packets are read and dropped until it ends.
    stopped: bool,
}

impl FrontendSession {
    async fn run(
        mut self,
        mut inbound: impl Stream<Item = Result<Packet, Status>> + Unpin,
        shutdown: CancellationToken,
    ) {
        self.tunnels.metrics.grpc_connections("Proxy", 1.0);
        loop {
            let deadline = self.dials.iter().filter_map(|(_, d)| *d).min();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = timer => self.expire_dials(),
                msg = inbound.next() => match msg.transpose() {
                    Ok(Some(packet)) => self.handle(packet).await,
                    Ok(None) => break,
                    Err(status) => {
                        self.tunnels.metrics.stream_error(Segment::FromClient, status.code(), "Unknown");
                        tracing::debug!("frontend stream ended: {}", status.message());
                        // Tell the frontend why, if it is still listening (e.g. its message was too large).
                        self.frontend.abort(Status::new(status.code(), format!("frontend stream failed: {}", status.message())));
                        break;
                    }
                },
            }
        }
        self.cleanup();
    }

    fn reply(&self, packet: Packet) {
        self.frontend.send_control(packet, &self.tunnels.metrics);
    }

    async fn handle(&mut self, packet: Packet) {
        let packet_type = packet.type_name();
        self.tunnels.metrics.packet(Segment::FromClient, packet.r#type);
        let kind = match packet.kind() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("dropping malformed packet from frontend: {e}");
                return;
            }
        };
        if self.stopped {
            tracing::trace!("dropping {packet_type} on a stopped stream");
            return;
        }
        match kind {
            PacketKind::DialRequest(req) => self.dial(req).await,
            PacketKind::Data(data) => {
                let Some(backend) = self.backend.clone() else {
                    self.reply(Packet::close_response(data.connect_id, BACKEND_NOT_INITIALIZED));
                    self.stopped = true;
                    return;
                };
                if data.connect_id == 0 {
                    tracing::debug!("dropping DATA without a connection ID");
                    return;
                }
                if self.connect_id == 0 && self.frontend.owns(backend.serial, data.connect_id) {
                    self.connect_id = data.connect_id;
                }
                if self.connect_id == 0 && self.frontend.closed_lately(backend.serial, data.connect_id) {
                    // The connection was closed (by its endpoint, its agent's death, the server) before this
                    // frontend's first DATA for it arrived; the frontend has its CLOSE_RSP queued already, so
                    // the DATA is dropped (not taken for another stream's ID: no "mismatched connection IDs").
                    tracing::debug!(
                        connect_id = data.connect_id,
                        "dropping DATA for a connection closed before its first DATA"
                    );
                    return;
                }
                if data.connect_id != self.connect_id {
                    // Either a second ID on one stream or an ID this stream never dialed: close ours, and
                    // never touch a connection that belongs to another frontend.
                    tracing::warn!(first = self.connect_id, got = data.connect_id, "mismatched connection IDs");
                    for id in [self.connect_id, data.connect_id].into_iter().filter(|id| *id != 0) {
                        if self.frontend.owns(backend.serial, id) {
                            backend.close_conn(id, CloseReason::ProtocolError, &self.tunnels);
                        }
                        self.reply(Packet::close_response(id, MISMATCHED_CONNECTION_IDS));
                    }
                    self.stopped = true;
                    return;
                }
                let link = self.frontend.link(backend.serial, data.connect_id);
                if let Some(link) = &link {
                    link.to_agent.fetch_add(data.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                self.tunnels.metrics.bytes_to_agent(data.data.len());
                if let Some(window) = link.and_then(|l| l.upload_window.clone()) {
                    // Flow-controlled agent: wait for credit for this connection only.
                    let cost = konnectivity_proto::flow::cost(data.data.len());
                    if window.available_permits() < cost as usize {
                        self.tunnels.metrics.flow_control_wait();
                    }
                    let permit = tokio::select! {
                        p = window.acquire_many(cost) => p,
                        _ = backend.closed.cancelled() => { self.stopped = true; return; }
                        // The frontend went away while its upload waited (e.g. into an endpoint that stopped
                        // reading): its stream's end may never be read, so stop here.
                        _ = self.frontend.closed.cancelled() => { self.stopped = true; return; }
                    };
                    match permit {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                }
                if backend.send(Packet::data(data.connect_id, data.data), &self.tunnels).await.is_err() {
                    // The agent stream ended; its cleanup tells this frontend with CLOSE_RSP.
                    self.stopped = true;
                }
            }
            PacketKind::CloseRequest(req) => {
                let Some(backend) = self.backend.clone() else {
                    self.reply(Packet::close_response(req.connect_id, BACKEND_UNINITIALIZED));
                    return;
                };
                if let Some(link) = self.frontend.link(backend.serial, req.connect_id) {
                    link.closing_because(CloseReason::ClientClosed);
                    // The entry stays until the agent's CLOSE_RSP, which is relayed to this frontend.
                    let _ = backend.send(Packet::close_request(req.connect_id), &self.tunnels).await;
                    self.stopped = true;
                } else {
                    self.reply(Packet::close_response(req.connect_id, "Unknown connectID"));
                }
            }
            PacketKind::CloseDial(cls) => {
                if self.dials.iter().any(|(r, _)| *r == cls.random) {
                    self.tunnels.abandon_dial(&self.frontend, cls.random, DialFailure::ClientCancelled);
                    self.dials.retain(|(r, _)| *r != cls.random);
                }
            }
            PacketKind::DialResponse(_)
            | PacketKind::CloseResponse(_)
            | PacketKind::Drain
            | PacketKind::WindowUpdate { .. } => {
                tracing::warn!("unexpected {packet_type} from frontend; ignored");
            }
        }
    }

    async fn dial(&mut self, req: konnectivity_proto::DialRequest) {
        let random = req.random;
        let deadline = self.backend_dial_timeout.map(|t| Instant::now() + t);
        match self.tunnels.start_dial(&self.frontend, &req.address, random, self.backend_dial_timeout).await {
            Ok(backend) => {
                self.dials.push((random, deadline));
                self.backend = Some(backend);
            }
            Err(e) => {
                self.reply(Packet::dial_response(random, 0, e.message()));
                // As the reference: a stream whose dial found no agent is done.
                self.stopped = matches!(e, DialStartError::NoAgent);
            }
        }
    }

    /// Fails dials whose `--backend-dial-timeout` passed.
    fn expire_dials(&mut self) {
        let now = Instant::now();
        let me = self.frontend.serial;
        // Answered or not, a passed deadline no longer applies: every one is cleared. A stream may reuse a dial
        // ID after its first dial timed out, and a passed deadline left in the list would fire the timer again at
        // once, forever (the loop spun a core; found by the `server_state` fuzz target).
        let mut expired = Vec::new();
        for (random, deadline) in &mut self.dials {
            if deadline.take_if(|d| *d <= now).is_some() {
                expired.push(*random);
            }
        }
        for random in expired {
            if let Some(dial) = self.tunnels.take_pending(random, |d| d.frontend.serial == me) {
                self.tunnels.fail_dial(random, &dial, DialFailureReason::BackendDialTimeout, BACKEND_DIAL_TIMEOUT);
                dial.backend.send_control(Packet::close_dial(random), &self.tunnels);
            }
        }
    }

    /// The stream ended: abandon its pending dials and close its connections on the agent.
    fn cleanup(self) {
        self.tunnels.frontend_ended(&self.frontend, self.dials.iter().map(|(r, _)| *r), CloseReason::FrontendEnded);
        self.tunnels.metrics.grpc_connections("Proxy", -1.0);
    }
}
