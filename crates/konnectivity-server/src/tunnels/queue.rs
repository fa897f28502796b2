//! The queue towards one frontend stream (a `/ProxyService/Proxy` call or an HTTP CONNECT socket): packets from
//! agents wait here until the frontend's own task (or the gRPC layer) takes them, so an agent stream's reader
//! never writes to a frontend socket, and one slow frontend holds up an agent's stream for a bounded time only.

use crate::audit::ClientIdentity;
use crate::metrics::{Segment, ServerMetrics};
use crate::tunnels::link::Link;
use konnectivity_proto::flow::{self, QueueBudget};
use konnectivity_proto::{Packet, packet};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long an agent stream's reader waits for one frontend that is behind before giving that frontend
/// up (its connection is closed). Only agents without flow control (Go agents) can make it wait: with our
/// agents each connection's window bounds its queue, and the reader never waits.
pub const FRONTEND_STALL_LIMIT: Duration = Duration::from_secs(5);

/// Cost units queued towards one frontend before the reader waits (agents without flow control).
pub const FRONTEND_QUEUE_LIMIT: usize = 4 << 20;

/// A packet queued for a frontend: when it was queued (for `frontend_write_duration_seconds`), and for DATA the
/// connection it belongs to (whose counts and credit move when the frontend takes it).
pub(crate) struct Queued {
    pub(crate) at: Instant,
    pub(crate) packet: Packet,
    pub(crate) link: Option<Arc<Link>>,
}

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

/// One frontend stream's queue.
pub(crate) struct FrontendQueue {
    /// A process-unique serial (the tunnel table's key for this frontend).
    pub(crate) serial: u64,
    /// `grpc` or `http-connect`.
    pub(crate) kind: &'static str,
    /// Who the client is (for the audit log and logs).
    pub(crate) client: ClientIdentity,
    tx: mpsc::UnboundedSender<Queued>,
    /// What `tx` holds, in flow-control cost units. Bounded by the connection's window (flow-controlled
    /// agents) or by [`FRONTEND_QUEUE_LIMIT`] (others).
    budget: QueueBudget,
    /// Cancelled when the frontend stream has ended (or is being ended by [`FrontendQueue::abort`]).
    pub(crate) closed: CancellationToken,
    /// The status the response stream ends with, if it is ended by us with an error.
    final_status: Mutex<Option<Status>>,
    metrics: ServerMetrics,
}

impl FrontendQueue {
    pub(crate) fn new(
        serial: u64,
        kind: &'static str,
        client: ClientIdentity,
        metrics: ServerMetrics,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Self {
            serial,
            kind,
            client,
            tx,
            budget: QueueBudget::default(),
            closed: CancellationToken::new(),
            final_status: Mutex::new(None),
            metrics,
        });
        (queue, rx)
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
    pub(crate) fn send_control(&self, packet: Packet) {
        self.metrics.packet(Segment::ToClient, packet.r#type);
        let _ = self.tx.send(Queued { at: Instant::now(), packet, link: None });
    }

    /// Queues a DATA packet of `link` from the agent. With a flow-controlled agent this never waits (the window
    /// bounds the queue); otherwise it waits at most [`FRONTEND_STALL_LIMIT`] for the frontend to make room.
    /// `agent_gone` ends the wait at once when the agent's connection dies.
    pub(crate) async fn deliver_data(
        &self,
        packet: Packet,
        link: &Arc<Link>,
        agent_gone: impl std::future::Future<Output = ()>,
    ) -> Delivery {
        let cost = data_cost(&packet);
        let flow_controlled = link.backend.flow_control;
        if flow_controlled && self.budget.queued() + cost > 2 * flow::WINDOW as usize {
            // The agent negotiated flow control and then overran its credit: it is not a peer we can trust
            // with this connection. Treat it like a frontend that stopped reading (the connection is closed).
            tracing::warn!("agent overran its flow-control window; closing the connection");
            return Delivery::Stalled;
        }
        if !flow_controlled && self.budget.queued() + cost > FRONTEND_QUEUE_LIMIT {
            self.metrics.full_receive_channel("Connect", 1.0);
            let (room, agent_died) = tokio::select! {
                r = self.budget.wait_below(FRONTEND_QUEUE_LIMIT, FRONTEND_STALL_LIMIT) => (r, false),
                _ = self.closed.cancelled() => (false, false),
                _ = agent_gone => (false, true),
            };
            self.metrics.full_receive_channel("Connect", -1.0);
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
        self.metrics.packet(Segment::ToClient, packet.r#type);
        match self.tx.send(Queued { at: Instant::now(), packet, link: Some(link.clone()) }) {
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::Gone,
        }
    }

    /// Called as the frontend takes a packet off the queue: frees its budget and moves its connection's counts
    /// and credit.
    pub(crate) fn on_sent(&self, queued: &Queued) {
        self.metrics.observe_frontend_write(queued.at.elapsed().as_secs_f64());
        let Some(packet::Payload::Data(data)) = &queued.packet.payload else { return };
        self.budget.release(flow::cost(data.data.len()) as usize);
        self.metrics.bytes_to_frontend(data.data.len());
        if let Some(link) = &queued.link {
            link.delivered(data.data.len());
        }
    }

    /// Cost units queued towards this frontend.
    pub(crate) fn queued(&self) -> usize {
        self.budget.queued()
    }
}

fn data_cost(packet: &Packet) -> usize {
    match &packet.payload {
        Some(packet::Payload::Data(d)) => flow::cost(d.data.len()) as usize,
        _ => 0,
    }
}
