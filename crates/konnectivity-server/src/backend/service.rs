//! The `/AgentService/Connect` service: accepting an agent stream (identity, authentication, what its credential
//! lets it claim, negotiated flow control, the response headers Go agents wait for), and the loop that reads the
//! agent's packets.
//!
//! The loop never writes to a frontend socket itself: it queues packets on the frontend's own queue, so one slow
//! frontend costs the others on this agent at most [`crate::tunnels::queue::FRONTEND_STALL_LIMIT`], once.

use crate::audit::CloseReason;
use crate::auth::TokenAuthenticator;
use crate::backend::identifiers::AgentIdentifiers;
use crate::backend::manager::BackendManager;
use crate::backend::stream::{AgentStreamInfo, AgentTransport, Backend};
use crate::credentials::CertNames;
use crate::identity::admission::Admission;
use crate::identity::{AgentIdentity, Credential, Refusal, RefusalReason};
use crate::metrics::Segment;
use crate::tunnels::queue::{Delivery, FRONTEND_STALL_LIMIT};
use crate::tunnels::table::{AgentGuard, Route, Tunnels};
use futures_util::{Stream, StreamExt};
use konnectivity_proto::flow;
use konnectivity_proto::names::{AGENT_ID, AGENT_IDENTIFIERS, EGRESS_POLICY, SERVER_COUNT, SERVER_ID};
use konnectivity_proto::{Packet, PacketKind, agent::AgentService};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// The `/AgentService/Connect` service.
pub(crate) struct AgentEndpoint {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) server_id: String,
    pub(crate) server_count: u32,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// ServiceAccount token authentication, when enabled.
    pub(crate) auth: Option<Arc<TokenAuthenticator>>,
    /// What agents may claim, by their credentials.
    pub(crate) admission: Arc<Admission>,
}

impl AgentEndpoint {
    /// Refuses an agent stream for what it claimed: counted, audited, logged; the status the agent gets.
    fn refuse(&self, refusal: Refusal, agent_id: &str, peer: &str, identity: &AgentIdentity) -> Status {
        self.tunnels.metrics.identity_refusal(refusal.reason.as_str());
        self.tunnels.audit.agent_refused(identity.audited(agent_id, peer), refusal.reason.as_str(), &refusal.message);
        tracing::warn!(%agent_id, %peer, %identity, reason = refusal.reason.as_str(), "agent refused: {}",
            refusal.message);
        refusal.status()
    }
}

/// The identity a client certificate chain (leaf first) proves; if it names several nodes, the refusal and
/// the identity without a node (which trust mode, checking nothing, takes).
fn certificate_identity(
    certs: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<AgentIdentity, (Refusal, AgentIdentity)> {
    let Some(names) = certs.first().and_then(CertNames::of) else {
        // The TLS layer verified it, so this is not expected: a certificate without names we can read.
        return Ok(AgentIdentity { credential: Credential::Certificate, name: String::new(), node: None });
    };
    AgentIdentity::of_certificate(&names).map_err(|ambiguous| {
        let refusal = Refusal::new(
            RefusalReason::AmbiguousIdentity,
            format!("the agent's client certificate names several nodes {:?}", ambiguous.0),
        );
        let name = names.all().next().unwrap_or_default().to_string();
        (refusal, AgentIdentity { credential: Credential::Certificate, name, node: None })
    })
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
        let identity = if let Some(auth) = &self.auth {
            match auth.authenticate(md, info.map(|i| i.remote_addr.ip())).await {
                Ok(identity) => {
                    tracing::debug!(%agent_id, %peer, %identity, "agent authenticated by token");
                    identity
                }
                Err(status) => {
                    tracing::warn!(%agent_id, %peer, error = %status.message(), "agent authentication failed");
                    return Err(status);
                }
            }
        } else {
            match info.and_then(|i| i.peer_certs.as_deref()).map(|certs| certificate_identity(certs)) {
                Some(Ok(identity)) => identity,
                Some(Err((_, identity))) if self.admission.trusts_every_claim() => identity,
                Some(Err((refusal, identity))) => return Err(self.refuse(refusal, &agent_id, &peer, &identity)),
                None => AgentIdentity::anonymous(),
            }
        };
        let identity = match self.admission.admit(identity.clone(), &identifiers).await {
            Ok(bound) => bound,
            Err(refusal) => return Err(self.refuse(refusal, &agent_id, &peer, &identity)),
        };
        let transport = info
            .map(|i| AgentTransport { closed: i.transport_closed.clone(), abort: i.abort.clone() })
            .unwrap_or_default();

        let flow_control = md.get(flow::METADATA_KEY).and_then(|v| v.to_str().ok()) == Some(flow::VERSION);
        let closed = self.shutdown.child_token();
        let info = AgentStreamInfo {
            serial: self.tunnels.next_serial(),
            agent_id: agent_id.clone(),
            identifiers,
            peer: peer.clone(),
            flow_control,
            egress_policy: md.get(EGRESS_POLICY).and_then(|v| v.to_str().ok()).map(str::to_string),
            identity,
        };
        let (backend, rx) =
            Backend::new(info, closed.clone(), transport, self.tunnels.metrics.clone(), self.tracker.clone());
        let guard = match self.tunnels.attach_agent(backend.clone()) {
            Ok(guard) => guard,
            Err(refusal) => {
                let identity = backend.identity.identity.clone();
                closed.cancel();
                return Err(self.refuse(refusal, &agent_id, &peer, &identity));
            }
        };
        for old in self.tunnels.backends.older_streams(&backend) {
            self.tracker.spawn(BackendManager::probe(old));
        }
        tracing::info!(%agent_id, %peer, flow_control, identity = %backend.identity.identity, "agent connected");

        let span = tracing::info_span!("agent", agent_id = %agent_id, peer = %peer);
        self.tracker.spawn(serve_agent(guard, request.into_inner(), self.tunnels.clone()).instrument(span));

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

/// Reads an agent's stream until it ends; dropping `guard` then cleans up after it. `inbound` is the gRPC
/// request stream (or, in the fuzzing harness, packets fed to it directly).
pub(crate) async fn serve_agent(
    guard: AgentGuard,
    mut inbound: impl Stream<Item = Result<Packet, Status>> + Unpin,
    tunnels: Arc<Tunnels>,
) {
    let backend = guard.backend().clone();
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
                backend.packet_read();
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
        PacketKind::DialResponse(rsp) => tunnels.dial_answered(backend, &rsp),
        PacketKind::Data(data) => {
            let connect_id = data.connect_id;
            let (frontend, link) = match tunnels.route(backend.serial, connect_id) {
                Route::Open { frontend, link } => (frontend, link),
                Route::Closing => return,
                Route::Unknown => {
                    tracing::debug!(connect_id, "DATA for unknown connection; asking the agent to close it");
                    backend.send_control(Packet::close_request(connect_id));
                    return;
                }
            };
            let len = data.data.len() as u64;
            let packet = Packet::data(connect_id, data.data);
            match frontend.deliver_data(packet, &link, backend.transport_closed.cancelled()).await {
                Delivery::Queued => {
                    link.relayed_to_frontend.fetch_add(len, Ordering::Relaxed);
                }
                Delivery::Gone => tunnels.close_conn(backend, connect_id, CloseReason::FrontendEnded),
                // The stream's reader stops next, and its cleanup tells this frontend the agent disconnected.
                Delivery::AgentGone => {}
                Delivery::Stalled => {
                    tunnels.metrics.frontend_stall_close();
                    tracing::warn!(connect_id, "frontend stopped reading; closing its connection");
                    tunnels.close_conn(backend, connect_id, CloseReason::FrontendStalled);
                    frontend.abort(Status::resource_exhausted(format!(
                        "frontend did not read for {FRONTEND_STALL_LIMIT:?}; connection {connect_id} closed"
                    )));
                }
            }
        }
        PacketKind::CloseResponse(rsp) => tunnels.agent_closed(backend, rsp.connect_id, rsp.error),
        PacketKind::WindowUpdate { connect_id, credit } => tunnels.window_update(backend.serial, connect_id, credit),
        PacketKind::CloseDial(cls) => tunnels.agent_cancelled_dial(backend, cls.random),
        PacketKind::Drain => {
            tracing::info!("agent is draining");
            backend.set_draining();
        }
        PacketKind::DialRequest(_) | PacketKind::CloseRequest(_) => {
            tracing::warn!("unexpected {packet_type} from agent; ignored");
        }
    }
}
