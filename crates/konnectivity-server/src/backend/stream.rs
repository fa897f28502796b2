//! One agent stream (`/AgentService/Connect`) as the rest of the server sees it: who the agent is, and the queue
//! of packets towards it. What is tunneled over the stream is the tunnel table's (`crate::tunnels`).

use crate::audit::AuditedAgent;
use crate::backend::identifiers::AgentIdentifiers;
use crate::identity::StreamIdentity;
use crate::metrics::{Segment, ServerMetrics};
use konnectivity_proto::Packet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Packets queued towards one agent stream.
pub const AGENT_QUEUE_PACKETS: usize = 256;

/// The agent connection under a stream, as far as the stream needs it.
#[derive(Default)]
pub(crate) struct AgentTransport {
    /// Cancelled when the connection has died.
    pub(crate) closed: CancellationToken,
    /// Cancel to close the connection at once.
    pub(crate) abort: CancellationToken,
}

/// Who an agent stream belongs to and how it was opened.
pub(crate) struct AgentStreamInfo {
    /// A process-unique serial.
    pub(crate) serial: u64,
    pub(crate) agent_id: String,
    pub(crate) identifiers: AgentIdentifiers,
    /// The agent's address, for logs and the audit log.
    pub(crate) peer: String,
    /// Both ends negotiated per-connection flow control (the agent is konnectivity-rs).
    pub(crate) flow_control: bool,
    /// The fingerprint of the egress policy the agent says it enforces after resolving names, if any.
    pub(crate) egress_policy: Option<String>,
    /// Who its credential says it is, and what that lets it hold.
    pub(crate) identity: std::sync::Arc<StreamIdentity>,
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
    /// The fingerprint of the egress policy the agent enforces, if it advertised one.
    pub(crate) egress_policy: Option<String>,
    /// Who its credential says it is, and what that lets it hold.
    pub(crate) identity: std::sync::Arc<StreamIdentity>,
    /// How the audit log names it.
    pub(crate) audited: std::sync::Arc<AuditedAgent>,
    to_agent: mpsc::Sender<Packet>,
    draining: AtomicBool,
    /// Connections open on the stream: the tunnel table's count, mirrored here (written by it alone) so that
    /// routing can compare loads without taking the table's lock.
    open_connections: AtomicUsize,
    /// Cancelled when the stream has ended (or the server stops).
    pub(crate) closed: CancellationToken,
    /// Cancelled when the agent's connection itself has died: noticed even while the reader is busy.
    pub(crate) transport_closed: CancellationToken,
    /// Cancelling it closes the agent's connection at once (TLS connections; a token nothing watches otherwise).
    abort: CancellationToken,
    /// Packets read from the agent so far (the stale-stream probe compares it).
    packets_in: AtomicU64,
    metrics: ServerMetrics,
    /// Where a control packet that found the queue full waits for room (so that the leak checks see it).
    tracker: TaskTracker,
}

impl Backend {
    /// A new agent stream's state, and the receiving end of its queue towards the agent.
    pub(crate) fn new(
        info: AgentStreamInfo,
        closed: CancellationToken,
        transport: AgentTransport,
        metrics: ServerMetrics,
        tracker: TaskTracker,
    ) -> (std::sync::Arc<Self>, mpsc::Receiver<Packet>) {
        let (to_agent, rx) = mpsc::channel(AGENT_QUEUE_PACKETS);
        let audited = std::sync::Arc::new(info.identity.audited(&info.agent_id, &info.peer));
        let backend = std::sync::Arc::new(Backend {
            serial: info.serial,
            agent_id: info.agent_id,
            identifiers: info.identifiers,
            peer: info.peer,
            connected_at: Instant::now(),
            flow_control: info.flow_control,
            egress_policy: info.egress_policy,
            identity: info.identity,
            audited,
            to_agent,
            draining: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            closed,
            transport_closed: transport.closed,
            abort: transport.abort,
            packets_in: AtomicU64::new(0),
            metrics,
            tracker,
        });
        (backend, rx)
    }

    /// Sends a packet to the agent, waiting for room; fails if the stream has ended.
    pub(crate) async fn send(&self, packet: Packet) -> Result<(), Status> {
        let packet_type = packet.r#type;
        tokio::select! {
            r = self.to_agent.send(packet) => r.map_err(|_| Status::unavailable("agent stream closed"))?,
            _ = self.closed.cancelled() => return Err(Status::unavailable("agent stream closed")),
        }
        self.metrics.packet(Segment::ToAgent, packet_type);
        Ok(())
    }

    /// Sends a control packet from a context that must not wait (the agent's own reader, a cleanup): if the
    /// queue is full, the send moves to a tracked task of its own, which gives up when the stream ends.
    pub(crate) fn send_control(&self, packet: Packet) {
        self.metrics.packet(Segment::ToAgent, packet.r#type);
        if let Err(mpsc::error::TrySendError::Full(packet)) = self.to_agent.try_send(packet) {
            let tx = self.to_agent.clone();
            let closed = self.closed.clone();
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = tx.send(packet) => {}
                    _ = closed.cancelled() => {}
                }
            });
        }
    }

    /// Connections open on this stream (the load that least-loaded selection compares).
    pub(crate) fn connection_count(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Records the stream's connection count (the tunnel table, which owns the connections, calls this).
    pub(crate) fn set_connection_count(&self, n: usize) {
        self.open_connections.store(n, Ordering::Relaxed);
    }

    /// Whether the agent said it is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The agent sent DRAIN.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Counts a packet read from the agent (what the stale-stream probe watches).
    pub(crate) fn packet_read(&self) {
        self.packets_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Packets read from the agent so far.
    pub(crate) fn packets_read(&self) -> u64 {
        self.packets_in.load(Ordering::Relaxed)
    }

    /// Ends the stream and closes the agent's connection at once (it was found dead).
    pub(crate) fn abort(&self) {
        self.closed.cancel();
        self.abort.cancel();
    }
}
