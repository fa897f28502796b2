//! The audit log's three kinds of line, built from plain facts the tunnel table hands over (the audit log knows
//! nothing of the server's state). Nothing is built when the audit log is disabled.

use super::{AuditLog, ClientIdentity, CloseReason, DialFailure, Event, Record};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// An agent stream as the audit log names it: the ID it claimed, where it connected from, and who its
/// credential says it is. Built once per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AuditedAgent {
    /// The claimed agent ID.
    pub(crate) id: String,
    /// The agent's address.
    pub(crate) peer: String,
    /// `certificate`, `token` or `none`.
    pub(crate) credential: &'static str,
    /// The credential's name (certificate common name, token user name); empty if none.
    pub(crate) identity: String,
    /// The node the credential names, if any.
    pub(crate) node: Option<String>,
}

/// Who asked for a tunneled connection or dial, where to, and through which agent.
pub(crate) struct Tunneled<'a> {
    /// `grpc` or `http-connect`.
    pub(crate) mode: &'static str,
    pub(crate) client: &'a ClientIdentity,
    /// The destination as requested.
    pub(crate) destination: &'a str,
    /// The agent the dial was sent to, if it got that far.
    pub(crate) agent: Option<&'a Arc<AuditedAgent>>,
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
            agent: t.agent.cloned(),
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

    /// An agent stream refused for what it claimed (`reason`: a refusal label; `error`: what the agent was told).
    pub(crate) fn agent_refused(&self, agent: AuditedAgent, reason: &'static str, error: &str) {
        if self.enabled() {
            self.record_agent(super::AgentRecord { time: SystemTime::now(), agent, reason, error: error.to_string() });
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
