//! The agent's configuration, as the library takes it.

use std::path::PathBuf;
use std::time::Duration;

/// One proxy-server address the agent dials: a host (name or IP literal) and a port. The host is also the TLS
/// server name checked against the server's certificate, and a name is resolved again at every dial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// The server's agent port.
    pub port: u16,
}

impl ServerAddress {
    /// An address from its parts.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self { host: host.into(), port }
    }

    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            rest.split_once("]:").ok_or_else(|| format!("{text:?}: want [IPv6]:port"))?
        } else {
            let (host, port) =
                text.rsplit_once(':').ok_or_else(|| format!("{text:?}: missing port (want host:port)"))?;
            if host.contains(':') {
                return Err(format!("{text:?}: an IPv6 address needs brackets, as in [{host}]:{port}"));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(format!("{text:?}: missing host"));
        }
        if text.starts_with('[') && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{text:?}: {host:?} is not an IPv6 address"));
        }
        let port: u16 = port.parse().map_err(|_| format!("{text:?}: invalid port {port:?}"))?;
        if port == 0 {
            return Err(format!("{text:?}: port must be greater than 0"));
        }
        Ok(Self::new(host, port))
    }
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&konnectivity_transport::listen::join_host_port(&self.host, self.port))
    }
}

/// Everything `proxy-agent` needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Proxy-server addresses to dial (at least one). The agent keeps one stream to every distinct server
    /// they reach (see `docs/deployment.md`); an address may also be a load balancer in front of several.
    pub servers: Vec<ServerAddress>,
    /// CA for the server's certificate.
    pub ca_cert: PathBuf,
    /// Optional client certificate and key (mTLS).
    pub agent_cert: Option<(PathBuf, PathBuf)>,
    /// Extra ALPN protocols offered before `h2`.
    pub alpn_protos: Vec<String>,
    /// How often `ca_cert` and `agent_cert` are checked for changes (new connections use changed files);
    /// zero never reloads them.
    pub tls_reload_interval: Duration,
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
    /// How long a keepalive ping may go unanswered before the server connection is dropped (and redialed).
    pub keepalive_timeout: Duration,
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
    pub egress_policy: std::sync::Arc<konnectivity_egress_policy::EgressPolicy>,
    /// After a drain starts, how long open connections may take to end before the agent closes them and
    /// stops. `None`: no limit (the agent stops once they have ended, or when its shutdown token fires).
    pub drain_timeout: Option<Duration>,
    /// While draining, how long the agent must have had no dial and no connection before it stops by itself.
    /// A server still sends dials to a draining agent when it has no other agent, so leaving at the first idle
    /// moment would fail them. Zero: stop as soon as nothing is open. `drain_timeout` still bounds the drain.
    pub drain_idle_period: Duration,
    /// A ServiceAccount token file, sent as `authorization: Bearer <token>` on every connect (re-read each time:
    /// projected tokens rotate).
    pub service_account_token_path: Option<PathBuf>,
    /// Count servers from their Leases instead of (or besides) the servers' `servercount` header.
    pub lease_count: Option<LeaseCountConfig>,
}

/// Counting proxy-servers from their Leases (`--count-server-leases`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCountConfig {
    /// kubeconfig for kube-apiserver; `None` uses the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the server Leases.
    pub namespace: String,
    /// Label selector of the server Leases (`k=v,k=v`).
    pub selector: String,
    /// `--server-count-source=max`: the larger of the lease count and the servers' `servercount`; otherwise
    /// the lease count alone.
    pub source_max: bool,
    /// How often the valid Leases are counted again from the watched cache (no request is sent for it).
    pub poll_interval: Duration,
}

/// The default `--drain-timeout`: under Kubernetes' default termination grace period (30 s), so that the agent
/// closes what is left itself, with an error each frontend sees, before the kubelet's SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// The default `--drain-idle-period`. Long enough that a dial a server sent just before it read the DRAIN, or
/// the next of a caller's requests while this is the last agent a server has (a single-agent cluster, a
/// `destHost` node whose replacement agent is not up yet), still finds the agent; short enough that an idle
/// agent is gone well within the default `--drain-timeout` and the pod's default 30 s grace period.
pub const DEFAULT_DRAIN_IDLE_PERIOD: Duration = Duration::from_secs(5);

impl AgentConfig {
    /// A configuration with the reference's defaults, dialing one server address.
    pub fn new(server_host: impl Into<String>, server_port: u16, ca_cert: PathBuf) -> Self {
        Self {
            servers: vec![ServerAddress::new(server_host, server_port)],
            ca_cert,
            agent_cert: None,
            alpn_protos: Vec::new(),
            tls_reload_interval: konnectivity_transport::tls_reload::DEFAULT_RELOAD_INTERVAL,
            agent_id: uuid::Uuid::new_v4().to_string(),
            agent_identifiers: String::new(),
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            sync_forever: false,
            keepalive_time: Duration::from_secs(3600),
            keepalive_timeout: Duration::from_secs(20),
            xfr_channel_size: 150,
            dial_timeout: Duration::from_secs(5),
            health: Some((String::new(), 8093)),
            admin: Some(("127.0.0.1".into(), 8094)),
            enable_profiling: false,
            egress_policy: std::sync::Arc::new(konnectivity_egress_policy::EgressPolicy::allow_all()),
            drain_timeout: Some(DEFAULT_DRAIN_TIMEOUT),
            drain_idle_period: DEFAULT_DRAIN_IDLE_PERIOD,
            service_account_token_path: None,
            lease_count: None,
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
    use super::{ServerAddress, validate_identifiers};

    #[test]
    fn server_addresses() {
        let ok = |s: &str| ServerAddress::parse(s).expect(s);
        assert_eq!(ok("konnectivity.example:8091"), ServerAddress::new("konnectivity.example", 8091));
        assert_eq!(ok(" 10.0.0.1:8132"), ServerAddress::new("10.0.0.1", 8132));
        assert_eq!(ok("[fd00::1]:8091"), ServerAddress::new("fd00::1", 8091));
        assert_eq!(ok("[fd00::1]:8091").to_string(), "[fd00::1]:8091");
        assert_eq!(ok("a:1").to_string(), "a:1");
        for bad in ["nohost", ":8091", "a:0", "a:x", "a:70000", "fd00::1:8091", "[fd00::1]", "[node]:1", "[]:1"] {
            assert!(ServerAddress::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(ServerAddress::parse("fd00::1:8091").unwrap_err().contains("brackets"));
    }

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
