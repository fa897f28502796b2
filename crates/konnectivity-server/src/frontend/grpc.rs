//! The gRPC frontend (`/ProxyService/Proxy`): one task per stream reads the frontend's packets and drives its
//! [`Session`]; packets from the agent reach the stream through the session's queue, which the gRPC layer drains.

use crate::audit::{ClientIdentity, CloseReason};
use crate::credentials::ClientAllowList;
use crate::frontend::session::{self, Session, Upload};
use crate::metrics::Segment;
use crate::tunnels::table::{DialStartError, Tunnels};
use futures_util::{Stream, StreamExt};
use konnectivity_proto::names::{BACKEND_NOT_INITIALIZED, BACKEND_UNINITIALIZED, MISMATCHED_CONNECTION_IDS};
use konnectivity_proto::{Packet, PacketKind, proxy::ProxyService};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// The `/ProxyService/Proxy` service.
pub(crate) struct ProxyEndpoint {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) backend_dial_timeout: Option<Duration>,
    /// Which mTLS clients may open streams.
    pub(crate) allowed: Arc<ClientAllowList>,
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
        if let Err(why) = self.allowed.admits(client.certs()) {
            tracing::warn!(%client, "frontend client refused: {why}");
            return Err(Status::permission_denied(format!("client not allowed: {why}")));
        }
        let (session, rx) = Session::open(&self.tunnels, "grpc", client, self.backend_dial_timeout);
        let queue = session.queue().clone();
        let span = tracing::debug_span!("frontend", serial = queue.serial, client = %queue.client, %user_agent);
        self.tracker.spawn(serve(session, request.into_inner(), self.shutdown.clone()).instrument(span));
        // hyper drops the response stream when the client resets the stream or its connection ends: the frontend
        // is gone then, even if its session is not reading its stream (it waits for an agent's credit).
        let gone = queue.closed.clone().drop_guard();
        let (sent, last) = (queue.clone(), queue.clone());
        let outbound = UnboundedReceiverStream::new(rx)
            .map(move |queued| {
                let _ = &gone;
                // The gRPC layer took this packet: free its budget, move its connection's counts and credit.
                sent.on_sent(&queued);
                Ok(queued.packet)
            })
            .take_until(queue.closed.clone().cancelled_owned())
            .chain(
                futures_util::stream::once(async move { last.take_final_status() })
                    .filter_map(|s| std::future::ready(s.map(Err))),
            );
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Reads a frontend's stream until it ends (or the server stops); the session's end then abandons its dials and
/// closes its connections. `inbound` is the gRPC request stream (or, in the fuzzing harness, packets fed to it
/// directly).
pub(crate) async fn serve(
    session: Session,
    mut inbound: impl Stream<Item = Result<Packet, Status>> + Unpin,
    shutdown: CancellationToken,
) {
    let _gauge = session.tunnels().metrics.grpc_connection("Proxy");
    let mut stream = GrpcStream { session, connect_id: 0, stopped: false };
    loop {
        let deadline = stream.session.next_deadline();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = session::sleep_until(deadline) => stream.session.expire_dials(),
            msg = inbound.next() => match msg.transpose() {
                Ok(Some(packet)) => stream.handle(packet).await,
                Ok(None) => break,
                Err(status) => {
                    stream.session.tunnels().metrics.stream_error(Segment::FromClient, status.code(), "Unknown");
                    tracing::debug!("frontend stream ended: {}", status.message());
                    // Tell the frontend why, if it is still listening (e.g. its message was too large).
                    let status = Status::new(status.code(), format!("frontend stream failed: {}", status.message()));
                    stream.session.queue().abort(status);
                    break;
                }
            },
        }
    }
}

/// The gRPC framing of one frontend stream.
struct GrpcStream {
    session: Session,
    /// The connect ID of this stream's DATA, fixed by the first DATA packet.
    connect_id: i64,
    /// After a close or a protocol error the stream's packets are read and dropped until it ends.
    stopped: bool,
}

impl GrpcStream {
    async fn handle(&mut self, packet: Packet) {
        let packet_type = packet.type_name();
        self.session.tunnels().metrics.packet(Segment::FromClient, packet.r#type);
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
            PacketKind::DialRequest(req) => {
                if let Err(e) = self.session.dial(&req.address, req.random).await {
                    self.session.reply(Packet::dial_response(req.random, 0, e.message()));
                    // As the reference: a stream whose dial found no agent is done.
                    self.stopped = matches!(e, DialStartError::NoAgent);
                }
            }
            PacketKind::Data(data) => self.data(data.connect_id, data.data).await,
            PacketKind::CloseRequest(req) => {
                if self.session.backend().is_none() {
                    self.session.reply(Packet::close_response(req.connect_id, BACKEND_UNINITIALIZED));
                    return;
                }
                match self.session.link(req.connect_id) {
                    Some(link) => {
                        self.session.close_request(&link).await;
                        self.stopped = true;
                    }
                    None => self.session.reply(Packet::close_response(req.connect_id, "Unknown connectID")),
                }
            }
            PacketKind::CloseDial(cls) => self.session.cancel_dial(cls.random),
            PacketKind::DialResponse(_)
            | PacketKind::CloseResponse(_)
            | PacketKind::Drain
            | PacketKind::WindowUpdate { .. } => {
                tracing::warn!("unexpected {packet_type} from frontend; ignored");
            }
        }
    }

    async fn data(&mut self, connect_id: i64, data: bytes::Bytes) {
        if self.session.backend().is_none() {
            self.session.reply(Packet::close_response(connect_id, BACKEND_NOT_INITIALIZED));
            self.stopped = true;
            return;
        }
        if connect_id == 0 {
            tracing::debug!("dropping DATA without a connection ID");
            return;
        }
        if self.connect_id == 0 {
            if self.session.link(connect_id).is_some() {
                self.connect_id = connect_id;
            } else if self.session.closed_lately(connect_id) {
                // The connection was closed (by its endpoint, its agent's death, the server) before this
                // frontend's first DATA for it arrived; the frontend has its CLOSE_RSP queued already, so the DATA
                // is dropped (not taken for another stream's ID: no "mismatched connection IDs").
                tracing::debug!(connect_id, "dropping DATA for a connection closed before its first DATA");
                return;
            }
        }
        if connect_id != self.connect_id {
            // Either a second ID on one stream or an ID this stream never dialed: close ours, and never touch a
            // connection that belongs to another frontend.
            tracing::warn!(first = self.connect_id, got = connect_id, "mismatched connection IDs");
            for id in [self.connect_id, connect_id].into_iter().filter(|id| *id != 0) {
                if self.session.link(id).is_some() {
                    self.session.close_conn(id, CloseReason::ProtocolError);
                }
                self.session.reply(Packet::close_response(id, MISMATCHED_CONNECTION_IDS));
            }
            self.stopped = true;
            return;
        }
        // Looked up again for every packet: once the connection is closed there is no credit to wait for.
        let link = self.session.link(connect_id);
        // A gRPC frontend gives up waiting for credit only when its stream ends.
        let upload = self.session.upload(link.as_ref(), connect_id, data, std::future::pending()).await;
        if upload != Upload::Sent {
            // The agent stream ended (its cleanup tells this frontend with CLOSE_RSP), or the frontend did.
            self.stopped = true;
        }
    }
}
