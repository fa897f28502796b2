//! The audit log's three kinds of line, built from plain facts the tunnel table hands over (the audit log knows
//! nothing of the server's state). Nothing is built when the audit log is disabled.

use super::{AuditLog, ClientIdentity, CloseReason, DialFailure, Event, Record};
use std::time::{Duration, SystemTime};

/// Who asked for a tunneled connection or dial, where to, and through which agent.
pub(crate) struct Tunneled<'a> {
    /// `grpc` or `http-connect`.
    pub(crate) mode: &'static str,
    pub(crate) client: &'a ClientIdentity,
    /// The destination as requested.
    pub(crate) destination: &'a str,
    /// The agent the dial was sent to, if it got that far.
    pub(crate) agent_id: Option<&'a str>,
    /// The dial ID.
    pub(crate) dial_id: i64,
}

/// How an opened connection ended.
pub(crate) struct Closed<'a> {
    pub(crate) reason: CloseReason,
    /// What the close carried (empty: nothing).
    pub(crate) error: &'a str,
    pub(crate) bytes_client_to_target: u64,
    pub(crate) bytes_target_to_client: u64,
    /// Since the connection opened.
    pub(crate) open_for: Duration,
}

impl AuditLog {
    fn line(&self, t: &Tunneled<'_>, event: Event, connect_id: Option<i64>) -> Record {
        Record {
            time: SystemTime::now(),
            event,
            mode: t.mode,
            client: t.client.clone(),
            destination: t.destination.to_string(),
            agent_id: t.agent_id.map(str::to_string),
            dial_id: t.dial_id,
            connect_id,
            reason: None,
            error: None,
            bytes_client_to_target: 0,
            bytes_target_to_client: 0,
            duration: Duration::ZERO,
        }
    }

    /// An established connection (`dial_duration`: from the dial's start to the agent's answer).
    pub(crate) fn connection_opened(&self, t: &Tunneled<'_>, connect_id: i64, dial_duration: Duration) {
        if self.enabled() {
            self.record(Record { duration: dial_duration, ..self.line(t, Event::Open, Some(connect_id)) });
        }
    }

    /// The end of a connection, once nothing more can move on it (so its byte counts are final).
    pub(crate) fn connection_closed(&self, t: &Tunneled<'_>, connect_id: i64, closed: &Closed<'_>) {
        if self.enabled() {
            self.record(Record {
                reason: Some(closed.reason.as_str()),
                error: (!closed.error.is_empty()).then(|| closed.error.to_string()),
                bytes_client_to_target: closed.bytes_client_to_target,
                bytes_target_to_client: closed.bytes_target_to_client,
                duration: closed.open_for,
                ..self.line(t, Event::Close, Some(connect_id))
            });
        }
    }

    /// A dial that produced no connection (`error`: the text the client got; `since`: since the dial started).
    pub(crate) fn dial_failed(&self, t: &Tunneled<'_>, failure: DialFailure, error: &str, since: Duration) {
        if self.enabled() {
            self.record(Record {
                reason: Some(failure.as_str()),
                error: (!error.is_empty()).then(|| error.to_string()),
                duration: since,
                ..self.line(t, Event::DialFailed, None)
            });
        }
    }
}
