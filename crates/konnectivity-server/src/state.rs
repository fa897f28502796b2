//! The server's shared tunnel state: pending dials (keyed by dial ID), the frontends waiting on them, and how
//! packets are handed to a frontend without letting one slow frontend hold up an agent's stream for long.

use crate::backend::{Backend, BackendManager};
use crate::metrics::{DialFailureReason, Segment, ServerMetrics};
use konnectivity_proto::Packet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long an agent stream's reader waits for one frontend whose queue is full before giving that frontend
/// up (its connection is closed). This bounds how long a frontend that stopped reading can stall the other
/// connections on the same agent stream, where the agent is a Go peer without per-connection flow control.
pub const FRONTEND_STALL_LIMIT: Duration = Duration::from_secs(5);

/// Packets queued towards one frontend stream.
pub const FRONTEND_QUEUE_PACKETS: usize = 64;

/// One frontend stream (a `/ProxyService/Proxy` call).
pub(crate) struct Frontend {
    pub(crate) serial: u64,
    tx: mpsc::Sender<Result<Packet, Status>>,
    /// Connections established for this frontend: (agent stream, connect ID). The agent loop adds them; the
    /// frontend's own task reads them to check DATA and to clean up when the stream ends.
    pub(crate) established: Mutex<Vec<(Arc<Backend>, i64)>>,
    /// Cancelled when the frontend stream has ended (or is being ended by [`Frontend::abort`]).
    pub(crate) closed: CancellationToken,
    /// The status the response stream ends with, if it is ended by us with an error.
    final_status: Mutex<Option<Status>>,
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
}

impl Frontend {
    pub(crate) fn new(serial: u64, tx: mpsc::Sender<Result<Packet, Status>>) -> Arc<Self> {
        Arc::new(Self {
            serial,
            tx,
            established: Mutex::new(Vec::new()),
            closed: CancellationToken::new(),
            final_status: Mutex::new(None),
        })
    }

    /// Ends the frontend's stream now with `status` (what is still queued is dropped). Used when a packet
    /// that must reach the frontend cannot be queued: ending the stream is the one signal that always arrives.
    pub(crate) fn abort(&self, status: Status) {
        self.final_status.lock().get_or_insert(status);
        self.closed.cancel();
    }

    /// The status to end the response stream with, once `closed` has fired.
    pub(crate) fn take_final_status(&self) -> Option<Status> {
        self.final_status.lock().take()
    }

    /// Queues a packet that must arrive (a close or an error); if the queue is full, the stream is ended
    /// with `fallback` instead, so the frontend never waits for a packet that was dropped.
    pub(crate) fn send_or_abort(&self, packet: Packet, fallback: Status, metrics: &ServerMetrics) {
        let packet_type = packet.type_name();
        match self.tx.try_send(Ok(packet)) {
            Ok(()) => metrics.packet(Segment::ToClient, packet_type),
            Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => self.abort(fallback),
        }
    }

    /// Queues a packet without waiting; used where waiting is never right (control packets during cleanup):
    /// if the queue is full the send moves to its own task.
    pub(crate) fn send_control(&self, packet: Packet, metrics: &ServerMetrics) {
        metrics.packet(Segment::ToClient, packet.type_name());
        match self.tx.try_send(Ok(packet)) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(packet)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send_timeout(packet, FRONTEND_STALL_LIMIT).await;
                });
            }
        }
    }

    /// Queues a packet, waiting at most [`FRONTEND_STALL_LIMIT`] when the frontend is behind.
    /// `agent_gone` resolves when the agent stream this packet came from has died: waiting ends at once then,
    /// so the agent's death is noticed (and reported to every frontend) without delay.
    pub(crate) async fn deliver(
        &self,
        packet: Packet,
        metrics: &ServerMetrics,
        agent_gone: impl std::future::Future<Output = ()>,
    ) -> Delivery {
        let packet_type = packet.type_name();
        match self.tx.try_send(Ok(packet)) {
            Ok(()) => {
                metrics.packet(Segment::ToClient, packet_type);
                Delivery::Queued
            }
            Err(TrySendError::Closed(_)) => Delivery::Gone,
            Err(TrySendError::Full(packet)) => {
                metrics.full_receive_channel("Connect", 1.0);
                let r = tokio::select! {
                    r = self.tx.send_timeout(packet, FRONTEND_STALL_LIMIT) => r,
                    _ = self.closed.cancelled() => Err(SendTimeoutError::Closed(Ok(Packet::drain()))),
                    _ = agent_gone => Err(SendTimeoutError::Closed(Ok(Packet::drain()))),
                };
                metrics.full_receive_channel("Connect", -1.0);
                match r {
                    Ok(()) => {
                        metrics.packet(Segment::ToClient, packet_type);
                        Delivery::Queued
                    }
                    Err(SendTimeoutError::Closed(_)) => Delivery::Gone,
                    Err(SendTimeoutError::Timeout(_)) => Delivery::Stalled,
                }
            }
        }
    }

    /// Forgets an established connection (it was closed).
    pub(crate) fn forget(&self, backend_serial: u64, connect_id: i64) {
        self.established.lock().retain(|(b, id)| !(b.serial == backend_serial && *id == connect_id));
    }

    /// Whether this frontend owns connection `connect_id` on the agent stream `backend_serial`.
    pub(crate) fn owns(&self, backend_serial: u64, connect_id: i64) -> bool {
        self.established.lock().iter().any(|(b, id)| b.serial == backend_serial && *id == connect_id)
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
    pending: Mutex<HashMap<i64, PendingDial>>,
    serials: AtomicU64,
}

impl Tunnels {
    pub(crate) fn new(backends: BackendManager, metrics: ServerMetrics) -> Self {
        Self { backends, metrics, pending: Mutex::new(HashMap::new()), serials: AtomicU64::new(1) }
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

    /// Fails a pending dial: counts the reason and tells the frontend, with `error` as the DIAL_RSP error.
    pub(crate) fn fail_dial(&self, random: i64, dial: &PendingDial, reason: DialFailureReason, error: &str) {
        self.metrics.dial_failure(reason);
        tracing::debug!(random, address = %dial.address, agent_id = %dial.backend.agent_id, "dial failed: {error}");
        dial.frontend.send_control(Packet::dial_response(random, 0, error), &self.metrics);
    }

    /// Number of dials waiting for an agent's answer.
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.lock().len()
    }
}
