//! The agent's configuration, as the library takes it.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `proxy-agent` needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Proxy-server host (name or IP) to dial; also the TLS server name checked.
    pub server_host: String,
    /// Proxy-server agent port.
    pub server_port: u16,
    /// CA for the server's certificate.
    pub ca_cert: PathBuf,
    /// Optional client certificate and key (mTLS).
    pub agent_cert: Option<(PathBuf, PathBuf)>,
    /// Extra ALPN protocols offered before `h2`.
    pub alpn_protos: Vec<String>,
    /// This agent's ID.
    pub agent_id: String,
    /// URL-query encoded identifiers (validated).
    pub agent_identifiers: String,
    /// First reconnect delay, and the pause between sync rounds.
    pub sync_interval: Duration,
    /// Longest reconnect delay.
    pub sync_interval_cap: Duration,
    /// Keep dialing on every interval to discover new servers.
    pub sync_forever: bool,
    /// gRPC keepalive ping interval (servers refuse more often than every 30s).
    pub keepalive_time: Duration,
    /// Packets queued towards one endpoint connection.
    pub xfr_channel_size: usize,
    /// How long a dial to an endpoint may take.
    pub dial_timeout: Duration,
    /// Health port bind address and port; `None` disables it.
    pub health: Option<(String, u16)>,
    /// Admin port bind address and port; `None` disables it.
    pub admin: Option<(String, u16)>,
    /// Serve `/debug/pprof/profile` on the admin port.
    pub enable_profiling: bool,
    /// Egress policy checked against every address a dial resolves to (default: allow everything).
    pub egress_policy: std::sync::Arc<konnectivity_transport::egress_policy::EgressPolicy>,
}

impl AgentConfig {
    /// A configuration with the reference's defaults.
    pub fn new(server_host: impl Into<String>, server_port: u16, ca_cert: PathBuf) -> Self {
        Self {
            server_host: server_host.into(),
            server_port,
            ca_cert,
            agent_cert: None,
            alpn_protos: Vec::new(),
            agent_id: uuid::Uuid::new_v4().to_string(),
            agent_identifiers: String::new(),
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            sync_forever: false,
            keepalive_time: Duration::from_secs(3600),
            xfr_channel_size: 150,
            dial_timeout: Duration::from_secs(5),
            health: Some((String::new(), 8093)),
            admin: Some(("127.0.0.1".into(), 8094)),
            enable_profiling: false,
            egress_policy: std::sync::Arc::new(konnectivity_transport::egress_policy::EgressPolicy::allow_all()),
        }
    }
}

/// Checks `--agent-identifiers`: URL-query syntax with the keys `host`, `ipv4`, `ipv6`, `cidr` and
/// `default-route`, and values of the right shape.
pub fn validate_identifiers(query: &str) -> Result<(), String> {
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let ok = match k.as_ref() {
            "host" => !v.is_empty(),
            "ipv4" => v.parse::<std::net::Ipv4Addr>().is_ok(),
            "ipv6" => v.parse::<std::net::Ipv6Addr>().is_ok(),
            "cidr" => v.split_once('/').is_some_and(|(ip, bits)| {
                ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 128)
            }),
            "default-route" => v.parse::<bool>().is_ok(),
            other => {
                return Err(format!(
                    "unknown agent identifier key {other:?} (want host, ipv4, ipv6, cidr or default-route)"
                ));
            }
        };
        if !ok {
            return Err(format!("invalid value {v:?} for agent identifier {k:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_identifiers;

    #[test]
    fn identifiers() {
        assert!(validate_identifiers("").is_ok());
        assert!(
            validate_identifiers("host=node1&ipv4=10.0.0.1&ipv6=%3A%3A1&cidr=10.0.0.0/8&default-route=true").is_ok()
        );
        assert!(validate_identifiers("zone=a").unwrap_err().contains("unknown agent identifier key"));
        assert!(validate_identifiers("ipv4=300.1.1.1").unwrap_err().contains("invalid value"));
        assert!(validate_identifiers("default-route=maybe").is_err());
    }
}
