//! Building the audit records from the server's own state: a connection's [`Link`] for `open` and `close`, the
//! dial attempt for `dial_failed`. Nothing is built when the audit log is disabled.

use super::{AuditLog, CloseReason, DialFailure, Event, Record};
use crate::backend::Backend;
use crate::state::{Frontend, Link};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

/// A dial as its frontend asked for it.
pub(crate) struct DialAttempt<'a> {
    pub(crate) frontend: &'a Frontend,
    /// The destination as requested.
    pub(crate) address: &'a str,
    /// The dial ID.
    pub(crate) random: i64,
    pub(crate) started: Instant,
}

impl AuditLog {
    /// An established connection (`dial_duration`: from the dial's start to the agent's answer).
    pub(crate) fn connection_opened(&self, link: &Link, dial_duration: Duration) {
        if !self.enabled() {
            return;
        }
        self.record(Record {
            time: SystemTime::now(),
            event: Event::Open,
            mode: link.mode,
            client: link.client.clone(),
            destination: link.address.clone(),
            agent_id: Some(link.backend.agent_id.clone()),
            dial_id: link.dial_id,
            connect_id: Some(link.connect_id),
            reason: None,
            error: None,
            bytes_client_to_target: 0,
            bytes_target_to_client: 0,
            duration: dial_duration,
        });
    }

    /// The end of a connection, once its entry has left its agent stream's table (so its byte counts are
    /// final): the cause recorded on the link, or `otherwise` if none was; `error` is what the close carried.
    pub(crate) fn connection_closed(&self, link: &Link, otherwise: CloseReason, error: &str) {
        if !self.enabled() {
            return;
        }
        let reason = *link.close_reason.get_or_init(|| otherwise);
        self.record(Record {
            time: SystemTime::now(),
            event: Event::Close,
            mode: link.mode,
            client: link.client.clone(),
            destination: link.address.clone(),
            agent_id: Some(link.backend.agent_id.clone()),
            dial_id: link.dial_id,
            connect_id: Some(link.connect_id),
            reason: Some(reason.as_str()),
            error: (!error.is_empty()).then(|| error.to_string()),
            bytes_client_to_target: link.to_agent.load(Ordering::Relaxed),
            bytes_target_to_client: link.relayed_to_frontend.load(Ordering::Relaxed),
            duration: link.established.elapsed(),
        });
    }

    /// A dial that produced no connection; `agent` is the one it was sent to, if any, and `error` the text the
    /// client got.
    pub(crate) fn dial_failed(
        &self,
        attempt: &DialAttempt<'_>,
        agent: Option<&Backend>,
        failure: DialFailure,
        error: &str,
    ) {
        if !self.enabled() {
            return;
        }
        self.record(Record {
            time: SystemTime::now(),
            event: Event::DialFailed,
            mode: attempt.frontend.kind,
            client: attempt.frontend.client.clone(),
            destination: attempt.address.to_string(),
            agent_id: agent.map(|b| b.agent_id.clone()),
            dial_id: attempt.random,
            connect_id: None,
            reason: Some(failure.as_str()),
            error: (!error.is_empty()).then(|| error.to_string()),
            bytes_client_to_target: 0,
            bytes_target_to_client: 0,
            duration: attempt.started.elapsed(),
        });
    }
}
