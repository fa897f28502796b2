//! Where a proxy-server's frontend listens, and how to reach it.

use crate::error::{DialError, DialFailureReason};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the proxy-server's frontend listens.
#[derive(Clone)]
pub enum ProxyAddress {
    /// A Unix socket path (no TLS), as kube-apiserver uses.
    Uds(PathBuf),
    /// TCP with mutual TLS.
    Tcp {
        /// Host to dial; also the TLS server name checked unless `server_name` is set.
        host: String,
        /// Port.
        port: u16,
        /// Client TLS configuration (CA, client certificate, ALPN h2).
        tls: Arc<rustls::ClientConfig>,
        /// Server name to verify, if not `host`.
        server_name: Option<String>,
    },
}

impl std::fmt::Debug for ProxyAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uds(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp { host, port, .. } => write!(f, "{host}:{port} (mTLS)"),
        }
    }
}

impl ProxyAddress {
    /// A TCP address with an mTLS client configuration built from PEM files.
    pub fn tcp_mtls(
        host: impl Into<String>,
        port: u16,
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, DialError> {
        let tls = konnectivity_transport::tls::client_config(
            ca,
            Some((cert, key)),
            &[konnectivity_transport::tls::ALPN_H2.to_vec()],
        )
        .map_err(|e| DialError::new(DialFailureReason::Unknown, e.to_string()))?;
        Ok(Self::Tcp { host: host.into(), port, tls, server_name: None })
    }
}
