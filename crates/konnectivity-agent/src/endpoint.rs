//! Dialing endpoints in the cluster network: `host:port` split as Go's net package does, names resolved and every
//! resolved address checked against the egress policy, and failures worded as Go's net package words them
//! (frontends, and the HTTP CONNECT status mapping, match on that text).

use konnectivity_egress_policy::{EgressPolicy, Verdict};
use std::io;
use std::time::Duration;
use tokio::net::TcpStream;

/// Why a dial to an endpoint failed; the text is what Go's net package would say, because frontends (and
/// the HTTP CONNECT status mapping) match on it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialFailure {
    /// The dial did not complete in time.
    #[error("dial tcp {0}: i/o timeout")]
    Timeout(String),
    /// The name did not resolve.
    #[error("dial tcp: lookup {0}: no such host")]
    NoSuchHost(String),
    /// Connecting failed (`text` is Go's errno text).
    #[error("dial tcp {addr}: connect: {text}")]
    Connect { addr: String, text: String },
    /// Anything else, already worded as Go would.
    #[error("{0}")]
    Other(String),
    /// The server cancelled the dial (DIAL_CLS) or the session ended.
    #[error("dial cancelled")]
    Cancelled,
    /// The egress policy refused the destination.
    #[error("{0}")]
    Denied(String),
}

fn go_errno_text(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset by peer".into(),
        HostUnreachable => "no route to host".into(),
        NetworkUnreachable => "network is unreachable".into(),
        NetworkDown => "network is down".into(),
        AddrNotAvailable => "cannot assign requested address".into(),
        PermissionDenied => "permission denied".into(),
        _ => {
            // Fall back to the OS text without Rust's " (os error N)" suffix, lower-cased as Go prints it.
            let s = e.to_string();
            let s = s.split(" (os error").next().unwrap_or(&s);
            s.to_lowercase()
        }
    }
}

pub(crate) async fn dial_tcp(
    address: &str,
    timeout: Duration,
    policy: &EgressPolicy,
) -> Result<TcpStream, DialFailure> {
    let attempt = async {
        let (host, port) = split_host_port(address)
            .ok_or_else(|| DialFailure::Other(format!("dial tcp: address {address}: missing port in address")))?;
        let port: u16 =
            port.parse().map_err(|_| DialFailure::Other(format!("dial tcp: address {address}: invalid port")))?;
        // What the policy can decide from the name alone is decided before asking any resolver.
        if let Verdict::Deny(reason) = policy.check_before_resolution(host, port) {
            return Err(DialFailure::Denied(reason));
        }
        let resolved: Vec<_> = match tokio::net::lookup_host(address).await {
            Ok(a) => a.collect(),
            Err(_) => return Err(DialFailure::NoSuchHost(host.to_string())),
        };
        if resolved.is_empty() {
            return Err(DialFailure::NoSuchHost(host.to_string()));
        }
        // Only addresses the policy allows are dialed: a name resolving into a denied range is refused here,
        // where the resolution happens.
        let mut denied = None;
        let addrs: Vec<_> = resolved
            .into_iter()
            .filter(|a| match policy.check_resolved(host, a.ip(), port) {
                Verdict::Allow => true,
                Verdict::Deny(reason) => {
                    denied.get_or_insert(reason);
                    false
                }
            })
            .collect();
        if addrs.is_empty() {
            return Err(DialFailure::Denied(denied.unwrap_or_default()));
        }
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    konnectivity_transport::listen::tune_tcp(&s);
                    return Ok(s);
                }
                Err(e) => last = Some(DialFailure::Connect { addr: addr.to_string(), text: go_errno_text(&e) }),
            }
        }
        Err(last.unwrap_or_else(|| DialFailure::Other(format!("dial tcp {address}: no address"))))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialFailure::Timeout(address.to_string())),
    }
}

fn split_host_port(address: &str) -> Option<(&str, &str)> {
    if let Some(rest) = address.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    let (host, port) = address.rsplit_once(':')?;
    if host.contains(':') {
        return None; // an IPv6 literal needs brackets
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a:80"), Some(("a", "80")));
        assert_eq!(split_host_port("[::1]:443"), Some(("::1", "443")));
        assert_eq!(split_host_port("::1:443"), None);
        assert_eq!(split_host_port("nohost"), None);
    }

    #[tokio::test]
    async fn refused_dial_reads_like_go() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let err =
            dial_tcp(&addr.to_string(), Duration::from_secs(5), &EgressPolicy::allow_all()).await.expect_err("refused");
        assert_eq!(err.to_string(), format!("dial tcp {addr}: connect: connection refused"));
    }
}
