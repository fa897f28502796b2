//! Why a dial or a tunnel set-up failed, with the reference client's reason names.

/// Why a dial failed, with the reference client's reason names (its `dial_failure_total` labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailureReason {
    /// Anything else.
    Unknown,
    /// No answer within [`crate::DIAL_TIMEOUT`] (or the caller's timeout).
    Timeout,
    /// The caller gave up.
    Context,
    /// The server or agent answered with an error (refused, unreachable, no agent, …).
    Endpoint,
    /// The server closed the dial.
    DialClosed,
    /// The tunnel closed while dialing, or was closed before.
    TunnelClosed,
    /// A second dial on a single-use tunnel.
    TunnelStarted,
    /// The stream could not be opened.
    StreamSetup,
}

impl DialFailureReason {
    /// The reference's label for this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Timeout => "timeout",
            Self::Context => "context",
            Self::Endpoint => "endpoint",
            Self::DialClosed => "dialclosed",
            Self::TunnelClosed => "tunnelclosed",
            Self::TunnelStarted => "tunnelstarted",
            Self::StreamSetup => "streamsetup",
        }
    }
}

/// A failed dial or tunnel set-up.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    /// Why, as a reason label.
    pub reason: DialFailureReason,
    /// What happened, in words (for `Endpoint`, the agent's or server's own text).
    pub message: String,
}

impl DialError {
    pub(crate) fn new(reason: DialFailureReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}
