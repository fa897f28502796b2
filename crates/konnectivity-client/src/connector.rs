//! A `tower::Service<http::Uri>` connector (feature `connector`), so that hyper-util's legacy `Client`, and the
//! clients built on it, send their requests through a proxy-server: each new connection of the pool is a dial
//! of an [`EgressDialer`] to the URI's host and port.
//!
//! The connector gives plain byte streams. For `https://` URIs, wrap it in a TLS connector (for example
//! hyper-rustls's `HttpsConnector`), which takes any `Service<Uri>` whose connections are `Read + Write +
//! Connection`, as these are.

use crate::egress_dialer::{EgressConn, EgressDialer};
use crate::error::{DialError, DialFailureReason};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Dials each connection of an HTTP client through a proxy-server.
#[derive(Debug, Clone)]
pub struct TunnelConnector {
    dialer: Arc<EgressDialer>,
}

impl TunnelConnector {
    /// A connector that dials with `dialer`.
    pub fn new(dialer: EgressDialer) -> Self {
        Self { dialer: Arc::new(dialer) }
    }
}

/// `host:port` of a URI, the port defaulting by scheme (80 for `http`, 443 for `https`).
pub fn uri_target(uri: &http::Uri) -> Result<String, DialError> {
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| DialError::new(DialFailureReason::Unknown, format!("no host in {uri}")))?;
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, Some("http") | None) => 80,
        (None, Some(other)) => {
            return Err(DialError::new(DialFailureReason::Unknown, format!("no port in {uri} (scheme {other})")));
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(konnectivity_transport::listen::join_host_port(host, port))
}

impl tower::Service<http::Uri> for TunnelConnector {
    type Response = TokioIo<EgressConn>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        // Every call opens its own tunnel or CONNECT request: nothing to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let target = uri_target(&uri)?;
            Ok(TokioIo::new(dialer.dial(&target).await?))
        })
    }
}

impl Connection for EgressConn {
    fn connected(&self) -> Connected {
        // Not a proxy in hyper's sense: requests use origin form, as to the target itself.
        Connected::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_uris() {
        for (uri, want) in [
            ("http://10.0.0.5:8080/x", "10.0.0.5:8080"),
            ("http://svc.ns/", "svc.ns:80"),
            ("https://svc.ns/", "svc.ns:443"),
            ("http://[::1]:81/", "[::1]:81"),
        ] {
            let uri: http::Uri = uri.parse().expect("uri");
            assert_eq!(uri_target(&uri).expect("target"), want);
        }
        let uri: http::Uri = "/relative".parse().expect("uri");
        assert!(uri_target(&uri).is_err());
    }
}
