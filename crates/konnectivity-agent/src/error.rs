//! Why the agent could not start, or why one attempt to open a server stream failed.

use konnectivity_transport::listen::ListenError;
use konnectivity_transport::tls::TlsError;

/// Why the agent could not start, or why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A health or admin listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The metrics registry refused a metric.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// Connecting to the server failed.
    #[error("connecting to proxy-server {addr}: {cause}")]
    Connect {
        /// The server address.
        addr: String,
        /// Why, with every underlying cause (tonic's own text is only "transport error").
        cause: String,
    },
    /// The server refused or broke the stream.
    #[error("opening the tunnel stream to {addr}: {status}")]
    Stream {
        /// The server address.
        addr: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The server sent no response headers in time.
    #[error("proxy-server {addr} sent no response headers within {after:?}")]
    HeaderTimeout {
        /// The server address.
        addr: String,
        /// How long the agent waited.
        after: std::time::Duration,
    },
    /// The server's headers were missing or malformed.
    #[error("proxy-server {addr}: {what}")]
    BadHeaders {
        /// The server address.
        addr: String,
        /// What was wrong.
        what: String,
    },
}
