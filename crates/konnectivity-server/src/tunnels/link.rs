//! One established connection's own state, shared by its frontend's session (uploads), the agent stream's reader
//! (downloads) and the tunnel table (which owns its entry): byte counts, flow-control credit, close cause.

use crate::audit::{ClientIdentity, CloseReason, Closed, Tunneled};
use crate::backend::stream::Backend;
use konnectivity_proto::flow::{self, CreditMeter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::Semaphore;

/// One established connection.
pub(crate) struct Link {
    pub(crate) backend: Arc<Backend>,
    pub(crate) connect_id: i64,
    /// The dial this connection came from, and where it goes (for `/debug/connections` and the audit log).
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
    close_reason: OnceLock<CloseReason>,
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
        mode: &'static str,
        client: ClientIdentity,
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
            mode,
            client,
            close_reason: OnceLock::new(),
            upload_window,
            download_credit: CreditMeter::default(),
        })
    }

    /// Records why the connection is being closed, unless a cause was recorded already.
    pub(crate) fn closing_because(&self, reason: CloseReason) {
        let _ = self.close_reason.set(reason);
    }

    /// The frontend took `len` bytes of this connection off its queue: returns credit to a flow-controlled
    /// agent once enough was consumed.
    pub(crate) fn delivered(&self, len: usize) {
        self.to_frontend.fetch_add(len as u64, Ordering::Relaxed);
        if self.backend.flow_control
            && let Some(credit) = self.download_credit.consumed(flow::cost(len))
        {
            self.backend.send_control(konnectivity_proto::Packet::window_update(self.connect_id, credit));
        }
    }

    /// What the audit log says about this connection.
    pub(crate) fn audited(&self) -> Tunneled<'_> {
        Tunneled {
            mode: self.mode,
            client: &self.client,
            destination: &self.address,
            agent: Some(&self.backend.audited),
            dial_id: self.dial_id,
        }
    }

    /// How the connection ended, for the audit log: the cause recorded, or `otherwise` if none was.
    pub(crate) fn closed<'a>(&self, otherwise: CloseReason, error: &'a str) -> Closed<'a> {
        Closed {
            reason: *self.close_reason.get_or_init(|| otherwise),
            error,
            bytes_client_to_target: self.to_agent.load(Ordering::Relaxed),
            bytes_target_to_client: self.relayed_to_frontend.load(Ordering::Relaxed),
            open_for: self.established.elapsed(),
        }
    }
}
