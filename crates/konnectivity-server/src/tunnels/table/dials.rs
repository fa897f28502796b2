//! The tunnel table's dial transitions: a dial sent to an agent, answered (the connection is established),
//! cancelled by either side, expired, or failed.

use super::{Conn, DialStartError, PendingDial, Table, Tunnels};
use crate::audit::{DialFailure, Tunneled};
use crate::backend::stream::Backend;
use crate::metrics::DialFailureReason;
use crate::routing::dial_host;
use crate::tunnels::link::Link;
use crate::tunnels::queue::FrontendQueue;
use konnectivity_egress_policy::{DENIED, Verdict, unsafe_address_form};
use konnectivity_proto::names::{BACKEND_DIAL_TIMEOUT, NO_AGENT_AVAILABLE};
use konnectivity_proto::{DialResponse, Packet};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Tunnels {
    /// Picks an agent for `frontend`'s dial to `address`, records the pending dial and sends the DIAL_REQ
    /// (within `send_timeout`, if set). On failure the pending dial is gone again and the reason counted and
    /// audited. `Ok` also when the agent went away meanwhile and its cleanup has already answered the frontend.
    pub(crate) async fn start_dial(
        &self,
        frontend: &Arc<FrontendQueue>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, DialStartError> {
        let started = Instant::now();
        let result = self.send_dial(frontend, address, random, send_timeout).await;
        if let Err((e, backend)) = &result {
            let attempt = Tunneled {
                mode: frontend.kind,
                client: &frontend.client,
                destination: address,
                agent: backend.as_ref().map(|b| &b.audited),
                dial_id: random,
            };
            self.audit.dial_failed(&attempt, self.dial_failure(e.audited_as()), &e.message(), started.elapsed());
        }
        result.map_err(|(e, _)| e)
    }

    /// [`Tunnels::start_dial`] without the audit; a failure comes with the agent picked, if one was.
    async fn send_dial(
        &self,
        frontend: &Arc<FrontendQueue>,
        address: &str,
        random: i64,
        send_timeout: Option<Duration>,
    ) -> Result<Arc<Backend>, (DialStartError, Option<Arc<Backend>>)> {
        let denied = |reason: String, backend: Option<Arc<Backend>>| {
            self.metrics.egress_denied();
            tracing::info!(%address, "dial refused: {reason}");
            Err((DialStartError::Denied(reason), backend))
        };
        let mut needs_resolution = false;
        if !self.policy.allows_everything() {
            // Forms the agent's resolver would read as an address the policy never saw are refused here.
            if let Some(why) = unsafe_address_form(address) {
                return denied(format!("{DENIED}: {why}"), None);
            }
            let host = dial_host(address);
            let port = address.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0);
            let pre = self.policy.pre_check(host, port);
            if let Verdict::Deny(reason) = pre.verdict {
                return denied(reason, None);
            }
            needs_resolution = pre.needs_resolution;
        }
        let Some(backend) = self.backends.pick(address) else {
            self.metrics.dial_failure(DialFailureReason::NoAgent);
            tracing::info!(%address, "dial failed: {NO_AGENT_AVAILABLE}");
            return Err((DialStartError::NoAgent, None));
        };
        if needs_resolution && backend.egress_policy.as_deref() != Some(self.policy_fingerprint.as_str()) {
            // What the name resolves to decides, and only the agent resolves it: an agent that does not enforce
            // this same policy (a Go agent, or one with another policy file) may not be given it.
            let why = format!(
                "{DENIED}: the destination is a name the policy must check after resolution, and agent {} does \
                 not enforce this server's egress policy",
                backend.agent_id
            );
            return denied(why, Some(backend));
        }
        let agent_gone = || {
            self.metrics.dial_failure(DialFailureReason::BackendClose);
            let error = format!("agent {} disconnected", backend.agent_id);
            Err((DialStartError::AgentGone(error), Some(backend.clone())))
        };
        {
            let mut table = self.table.lock();
            if table.pending.contains_key(&random) {
                // Not sent: the agent has nothing to do with it.
                return Err((DialStartError::DuplicateId, None));
            }
            let Table { frontends, agents, pending, .. } = &mut *table;
            let (Some(f), Some(a)) = (frontends.get_mut(&frontend.serial), agents.get_mut(&backend.serial)) else {
                // The agent went away between the pick and now (its cleanup has run), or the frontend has
                // (its task is ending): the dial would wait for an answer that cannot come.
                return agent_gone();
            };
            f.dials.insert(random);
            a.dials.insert(random);
            let dial = PendingDial {
                frontend: frontend.clone(),
                backend: backend.clone(),
                started: Instant::now(),
                address: address.to_string(),
            };
            pending.insert(random, dial);
            self.set_pending_gauge(&table);
        }
        tracing::debug!(random, %address, agent_id = %backend.agent_id, "dialing");
        let send = backend.send(Packet::dial_request(address, random));
        let sent = match send_timeout {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| true).and_then(|r| r.map_err(|_| false)),
            None => send.await.map_err(|_| false),
        };
        let Err(timed_out) = sent else { return Ok(backend) };
        let me = frontend.serial;
        let taken = {
            let mut table = self.table.lock();
            let taken = table.take_pending(random, |d| d.frontend.serial == me).is_some();
            self.set_pending_gauge(&table);
            taken
        };
        if !taken {
            // The agent's cleanup got it first and has already told the frontend.
            return Ok(backend);
        }
        if timed_out {
            self.metrics.dial_failure(DialFailureReason::BackendDialTimeout);
            Err((DialStartError::Timeout, Some(backend)))
        } else {
            agent_gone()
        }
    }

    /// An agent answered a dial: the connection is established for the frontend that asked, or the answer is
    /// passed on as the dial's failure, or (no such dial, its frontend gone) the agent is told to close.
    pub(crate) fn dial_answered(&self, backend: &Arc<Backend>, rsp: &DialResponse) {
        let random = rsp.random;
        let connect_id = rsp.connect_id;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.backend.serial == backend.serial) else {
            drop(table);
            self.metrics.dial_failure(DialFailureReason::UnrecognizedResponse);
            tracing::debug!(random, connect_id, "DIAL_RSP matches no pending dial");
            if connect_id != 0 {
                backend.send_control(Packet::close_request(connect_id));
            }
            return;
        };
        self.set_pending_gauge(&table);
        self.metrics.observe_dial(dial.started.elapsed().as_secs_f64());
        if !rsp.error.is_empty() || connect_id == 0 {
            let error =
                if rsp.error.is_empty() { "agent answered the dial without a connection ID" } else { &rsp.error };
            self.fail_dial(random, &dial, DialFailureReason::ErrorResponse, error);
            return;
        }
        let key = (backend.serial, connect_id);
        if dial.frontend.closed.is_cancelled() || !table.frontends.contains_key(&dial.frontend.serial) {
            self.metrics.dial_failure(DialFailureReason::SendResponse);
            self.audit_pending_failed(random, &dial, DialFailure::FrontendGone, "");
            backend.send_control(Packet::close_request(connect_id));
            return;
        }
        if table.conns.contains_key(&key) {
            tracing::warn!(connect_id, "agent reused a live connection ID; refusing the dial");
            self.fail_dial(random, &dial, DialFailureReason::ErrorResponse, "agent reused a connection ID");
            return;
        }
        let link = Link::new(
            backend.clone(),
            connect_id,
            random,
            dial.address.clone(),
            dial.frontend.kind,
            dial.frontend.client.clone(),
        );
        table.conns.insert(key, Conn { link: link.clone(), owner: Some(dial.frontend.clone()) });
        if let Some(f) = table.frontends.get_mut(&dial.frontend.serial) {
            f.conns.insert(key);
        }
        if let Some(a) = table.agents.get_mut(&backend.serial) {
            a.conns.insert(connect_id);
            backend.set_connection_count(a.conns.len());
        }
        drop(table);
        self.metrics.established(1.0);
        self.audit.connection_opened(&link.audited(), connect_id, dial.started.elapsed());
        tracing::debug!(random, connect_id, address = %dial.address, "connection established");
        dial.frontend.send_control(Packet::dial_response(random, connect_id, ""));
    }

    /// Abandons `frontend`'s pending dial `random` (the frontend cancelled it). The agent is told with DIAL_CLS,
    /// which the reference does not do: our agent stops the dial; a Go agent ignores it, and its late DIAL_RSP
    /// is answered with CLOSE_REQ. Returns whether the dial was still pending.
    pub(crate) fn abandon_dial(&self, frontend: &FrontendQueue, random: i64, failure: DialFailure) -> bool {
        let me = frontend.serial;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.frontend.serial == me) else { return false };
        self.set_pending_gauge(&table);
        drop(table);
        self.metrics.dial_failure(DialFailureReason::FrontendClose);
        self.audit_pending_failed(random, &dial, failure, "");
        dial.backend.send_control(Packet::close_dial(random));
        true
    }

    /// `frontend`'s dial `random` passed its `--backend-dial-timeout`: it fails towards the frontend and the
    /// agent is told to stop (DIAL_CLS). Returns whether it was still pending.
    pub(crate) fn expire_dial(&self, frontend: &FrontendQueue, random: i64) -> bool {
        let me = frontend.serial;
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.frontend.serial == me) else { return false };
        self.set_pending_gauge(&table);
        drop(table);
        self.fail_dial(random, &dial, DialFailureReason::BackendDialTimeout, BACKEND_DIAL_TIMEOUT);
        dial.backend.send_control(Packet::close_dial(random));
        true
    }

    /// The agent cancelled a dial it had been sent (DIAL_CLS): the frontend is told the same way.
    pub(crate) fn agent_cancelled_dial(&self, backend: &Backend, random: i64) {
        let mut table = self.table.lock();
        let Some(dial) = table.take_pending(random, |d| d.backend.serial == backend.serial) else { return };
        self.set_pending_gauge(&table);
        drop(table);
        self.audit_pending_failed(random, &dial, DialFailure::AgentCancelled, "");
        dial.frontend.send_control(Packet::close_dial(random));
    }
}
