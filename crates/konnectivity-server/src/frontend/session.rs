//! What the two frontends (gRPC and HTTP CONNECT) share: one frontend stream's life in the tunnel table, from
//! its dial to its end. The frontends differ only in framing: how a dial is asked for and answered, and how bytes
//! arrive and leave. Everything else is here: the dial and its deadline, uploads with flow-control credit and
//! byte accounting, closes, and the frontend's end (its [`FrontendGuard`], dropped with the session).

use crate::audit::{ClientIdentity, CloseReason, DialFailure};
use crate::backend::stream::Backend;
use crate::tunnels::link::Link;
use crate::tunnels::queue::{FrontendQueue, Queued};
use crate::tunnels::table::{DialStartError, FrontendGuard, Tunnels};
use bytes::Bytes;
use konnectivity_proto::{Packet, flow};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
// The dial deadlines are on tokio's clock, the one their timer runs on: with std's, a test clock (paused tokio
// time) would fire the timer before the deadline looked passed, and the loop would spin until it did.
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How an upload went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upload {
    /// Handed to the agent stream.
    Sent,
    /// The agent stream has ended (its cleanup tells the frontend with CLOSE_RSP).
    AgentGone,
    /// The frontend has ended (or was ended) while the upload waited for credit.
    FrontendGone,
    /// The framing gave up waiting for credit (an HTTP CONNECT client hung up and the endpoint read nothing).
    GaveUp,
}

/// One frontend stream.
pub(crate) struct Session {
    guard: FrontendGuard,
    tunnels: Arc<Tunnels>,
    backend_dial_timeout: Option<Duration>,
    /// The agent stream this frontend dialed through (its latest dial's).
    backend: Option<Arc<Backend>>,
    /// Dial IDs this stream sent, with when each must be answered by.
    dials: Vec<(i64, Option<Instant>)>,
}

impl Session {
    /// Opens a frontend stream of protocol `kind` in the tunnel table; the receiver is its queue's far end.
    pub(crate) fn open(
        tunnels: &Arc<Tunnels>,
        kind: &'static str,
        client: ClientIdentity,
        backend_dial_timeout: Option<Duration>,
    ) -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (guard, rx) = tunnels.open_frontend(kind, client);
        let session = Self { guard, tunnels: tunnels.clone(), backend_dial_timeout, backend: None, dials: Vec::new() };
        (session, rx)
    }

    /// The queue towards the frontend.
    pub(crate) fn queue(&self) -> &Arc<FrontendQueue> {
        self.guard.queue()
    }

    /// The server's tunnel state.
    pub(crate) fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// The agent stream of the latest dial that reached an agent.
    pub(crate) fn backend(&self) -> Option<&Arc<Backend>> {
        self.backend.as_ref()
    }

    /// Queues a control packet for the frontend.
    pub(crate) fn reply(&self, packet: Packet) {
        self.queue().send_control(packet);
    }

    /// Why the frontend ends, when the session is dropped (default: [`CloseReason::FrontendEnded`]).
    pub(crate) fn ending_because(&mut self, reason: CloseReason) {
        self.guard.ending_because(reason);
    }

    /// Sends a dial to an agent (see [`Tunnels::start_dial`]); its answer arrives on the queue.
    pub(crate) async fn dial(&mut self, address: &str, random: i64) -> Result<Arc<Backend>, DialStartError> {
        let deadline = self.backend_dial_timeout.map(|t| Instant::now() + t);
        let backend = self.tunnels.start_dial(self.guard.queue(), address, random, self.backend_dial_timeout).await?;
        self.dials.push((random, deadline));
        self.backend = Some(backend.clone());
        Ok(backend)
    }

    /// The frontend cancelled its dial `random` (DIAL_CLS).
    pub(crate) fn cancel_dial(&mut self, random: i64) {
        if self.dials.iter().any(|(r, _)| *r == random) {
            self.tunnels.abandon_dial(self.guard.queue(), random, DialFailure::ClientCancelled);
            self.dials.retain(|(r, _)| *r != random);
        }
    }

    /// The earliest dial deadline still to come, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.dials.iter().filter_map(|(_, d)| *d).min()
    }

    /// Fails the dials whose `--backend-dial-timeout` passed (the frontend gets a DIAL_RSP error, the agent a
    /// DIAL_CLS). Answered or not, a passed deadline no longer applies: every one is cleared, since a stream may
    /// reuse a dial ID after its first dial timed out, and a passed deadline left in the list would fire the
    /// timer again at once, forever (the loop spun a core; found by the `server_state` fuzz target).
    pub(crate) fn expire_dials(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (random, deadline) in &mut self.dials {
            if deadline.take_if(|d| *d <= now).is_some() {
                expired.push(*random);
            }
        }
        for random in expired {
            self.tunnels.expire_dial(self.guard.queue(), random);
        }
    }

    /// This frontend's connection `connect_id` on its agent stream, if it owns it.
    pub(crate) fn link(&self, connect_id: i64) -> Option<Arc<Link>> {
        let backend = self.backend.as_ref()?;
        self.tunnels.frontend_link(self.guard.queue().serial, backend.serial, connect_id)
    }

    /// Whether this frontend owned connection `connect_id` until it was closed lately.
    pub(crate) fn closed_lately(&self, connect_id: i64) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|b| self.tunnels.closed_lately(self.guard.queue().serial, b.serial, connect_id))
    }

    /// Closes this frontend's connection `connect_id` on the agent (the frontend broke the protocol, or its
    /// connection must go).
    pub(crate) fn close_conn(&self, connect_id: i64, reason: CloseReason) {
        if let Some(backend) = &self.backend {
            self.tunnels.close_conn(backend, connect_id, reason);
        }
    }

    /// The frontend asked to close `link` (CLOSE_REQ). The request goes behind the data already queued for the
    /// agent; the connection's entry stays until the agent's CLOSE_RSP, which is relayed to the frontend.
    pub(crate) async fn close_request(&self, link: &Link) {
        link.closing_because(CloseReason::ClientClosed);
        let _ = link.backend.send(Packet::close_request(link.connect_id)).await;
    }

    /// Sends the frontend's bytes of connection `connect_id` to the agent: with a flow-controlled agent, first
    /// waits for the connection's credit (this connection only), until the agent or the frontend ends or
    /// `give_up` resolves.
    pub(crate) async fn upload(
        &self,
        link: Option<&Arc<Link>>,
        connect_id: i64,
        data: Bytes,
        give_up: impl Future<Output = ()>,
    ) -> Upload {
        let Some(backend) = &self.backend else { return Upload::AgentGone };
        if let Some(window) = link.and_then(|l| l.upload_window.as_ref()) {
            let cost = flow::cost(data.len());
            if window.available_permits() < cost as usize {
                self.tunnels.metrics.flow_control_wait();
            }
            tokio::select! {
                biased;
                permit = window.acquire_many(cost) => match permit {
                    Ok(p) => p.forget(),
                    // The window is never closed; if it were, no credit could come.
                    Err(_) => return Upload::GaveUp,
                },
                _ = backend.closed.cancelled() => return Upload::AgentGone,
                // The frontend went away while its upload waited (e.g. into an endpoint that stopped reading): its
                // stream's end may never be read, so stop here.
                _ = self.guard.queue().closed.cancelled() => return Upload::FrontendGone,
                _ = give_up => return Upload::GaveUp,
            }
        }
        let len = data.len();
        if backend.send(Packet::data(connect_id, data)).await.is_err() {
            return Upload::AgentGone;
        }
        if let Some(link) = link {
            link.to_agent.fetch_add(len as u64, Ordering::Relaxed);
        }
        self.tunnels.metrics.bytes_to_agent(len);
        Upload::Sent
    }
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
