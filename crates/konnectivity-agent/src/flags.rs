//! `proxy-agent` command-line flags: the reference's names, defaults and Go syntax, validated into an
//! [`AgentConfig`]. Flags whose feature is not built yet are refused at start with "not supported yet".

use crate::config::{AgentConfig, LeaseCountConfig, ServerAddress, validate_identifiers};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use konnectivity_process::effective_flags::EffectiveFlags;
pub use konnectivity_process::flags::FlagError;
use konnectivity_process::flags::{KlogFlags, go_duration};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Konnectivity proxy-agent (konnectivity-rs): runs in the cluster network, dials out to the proxy-server and
/// opens the cluster connections the server asks for.
#[derive(Debug, Clone, Parser)]
#[command(name = "proxy-agent", version, about, long_about = None)]
pub struct AgentFlags {
    /// Client certificate presented to the proxy-server (mTLS).
    #[arg(long, default_value = "")]
    pub agent_cert: String,
    /// Key of --agent-cert.
    #[arg(long, default_value = "")]
    pub agent_key: String,
    /// CA that the proxy-server's certificate must chain to (required).
    #[arg(long, default_value = "")]
    pub ca_cert: String,
    /// Path of a ServiceAccount token sent as a bearer token (re-read at every connect).
    #[arg(long, default_value = "")]
    pub service_account_token_path: String,
    /// Proxy-server host to dial (also the TLS server name checked). With --proxy-server-addresses, used only
    /// if given explicitly (it is then dialed too).
    #[arg(long, default_value = "127.0.0.1")]
    pub proxy_server_host: String,
    /// Proxy-server agent port (see --proxy-server-host).
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// Proxy-server addresses to dial, without a load balancer: host:port or [IPv6]:port, comma-separated or
    /// repeated. The agent keeps one stream to every distinct server they reach (two addresses reaching one
    /// server count once), redials each address that drops with the usual backoff, and resolves names again at
    /// every dial (a name with several addresses is tried in random order, like a load balancer). Each host is
    /// the TLS name checked against that server's certificate. Replaces --proxy-server-host/-port unless those
    /// are given too. konnectivity-rs only.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    pub proxy_server_addresses: Vec<String>,
    /// Extra ALPN protocols to offer before h2 (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub alpn_proto: Vec<String>,
    /// Health port bind host; empty binds all interfaces.
    #[arg(long, default_value = "")]
    pub health_server_host: String,
    /// Health port (/healthz, /readyz, /ready, /metrics).
    #[arg(long, default_value_t = 8093)]
    pub health_server_port: u16,
    /// Admin port (/metrics redirects to the health port).
    #[arg(long, default_value_t = 8094)]
    pub admin_server_port: u16,
    /// Admin bind address.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    /// Serve profiling endpoints on the admin port.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_profiling: bool,
    /// Contention profiling (requires --enable-profiling).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_contention_profiling: bool,
    /// This agent's ID (default: $PROXY_AGENT_ID, else a random UUID).
    #[arg(long, env = "PROXY_AGENT_ID")]
    pub agent_id: Option<String>,
    /// URL-encoded identifiers for routing: host=, ipv4=, ipv6=, cidr=, default-route=.
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,
    /// Pause between connection rounds, and the first reconnect delay.
    #[arg(long, value_parser = go_duration, default_value = "1s")]
    pub sync_interval: Duration,
    /// Interval of the connection health probe.
    #[arg(long, value_parser = go_duration, default_value = "1s")]
    pub probe_interval: Duration,
    /// Longest reconnect delay (exponential backoff with jitter up to this).
    #[arg(long, value_parser = go_duration, default_value = "10s")]
    pub sync_interval_cap: Duration,
    /// Keep dialing every interval to discover new servers.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub sync_forever: bool,
    /// gRPC keepalive ping interval (servers refuse more often than every 30s).
    #[arg(long, value_parser = go_duration, default_value = "1h0m0s")]
    pub keepalive_time: Duration,
    /// How long a keepalive ping may go unanswered before the agent drops that server connection and dials
    /// again: a server that vanished without FIN or RST (a half-open connection) is noticed within
    /// --keepalive-time plus this. konnectivity-rs only; the reference uses gRPC's fixed 20s.
    #[arg(long, value_parser = go_duration, default_value = "20s")]
    pub keepalive_timeout: Duration,
    /// Packets queued towards one endpoint connection. Must be > 0.
    #[arg(long, default_value_t = 150)]
    pub xfr_channel_size: i64,
    /// Deprecated; no effect.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", hide = true)]
    pub warn_on_channel_limit: bool,
    /// Count proxy-servers from their Leases.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub count_server_leases: bool,
    /// Namespace of the server Leases.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Label selector of the server Leases.
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// Label selector of the server Leases (newer spelling of --lease-label).
    #[arg(long)]
    pub lease_label_selector: Option<String>,
    /// How to combine server counts: default or max.
    #[arg(long, default_value = "default")]
    pub server_count_source: String,
    /// How often the valid server Leases are counted again from the agent's watched cache, since a lease expires
    /// without any event (ours). No request is sent for it: the agent LISTs the Leases once and then WATCHes them,
    /// as the reference's informer does.
    #[arg(long, value_parser = go_duration, default_value = "5s")]
    pub lease_poll_interval: Duration,
    /// kubeconfig for the Lease client (empty: in-cluster).
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// Content type the reference asks kube-apiserver for; accepted for compatibility (JSON is always used).
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
    /// Egress policy file (JSON; see docs/security.md), checked after names are resolved. Default: all.
    #[arg(long, default_value = "")]
    pub egress_policy_file: String,
    /// After the first SIGTERM/SIGINT (which sends DRAIN to every server), how long open connections may run
    /// before the agent closes them, with an error their clients see, and exits; it exits earlier once none has
    /// been left for --drain-idle-period. 0: no limit (a second signal still exits at once). Keep it below the pod's
    /// terminationGracePeriodSeconds. konnectivity-rs only; the reference waits for a second signal.
    #[arg(long, value_parser = go_duration, default_value = "25s")]
    pub drain_timeout: Duration,
    /// While draining, how long the agent must have carried no dial and no connection before it exits by
    /// itself. Servers still send dials to a draining agent when it is the only one they have (a single-agent
    /// cluster, or the only --agent-identifiers match for a node whose new agent is not up yet), so leaving at
    /// the first idle moment would fail them with "No agent available"; the period starts again after each
    /// one. The 5s default outlasts a dial sent while the DRAIN was on its way and the gaps between a caller's
    /// requests, and still lets an idle agent go well before the default --drain-timeout (25s), which bounds
    /// the whole drain. 0: exit as soon as nothing is open. konnectivity-rs only.
    #[arg(long, value_parser = go_duration, default_value = "5s")]
    pub drain_idle_period: Duration,
    /// klog flags.
    #[command(flatten)]
    pub klog: KlogFlags,
    /// Whether --proxy-server-host or --proxy-server-port was given on the command line (not defaulted): with
    /// --proxy-server-addresses, that address is then dialed too. Set by [`AgentFlags::parse_args`].
    #[arg(skip)]
    pub host_port_given: bool,
}

impl AgentFlags {
    /// Parses a command line (after [`konnectivity_process::flags::normalize_args`]), noting which flags were
    /// given rather than defaulted where that matters.
    pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Self, clap::Error> {
        Self::parse_with_effective(args).map(|(flags, _)| flags)
    }

    /// [`AgentFlags::parse_args`], with every flag's effective value for the start-up log.
    pub fn parse_with_effective(args: impl IntoIterator<Item = String>) -> Result<(Self, EffectiveFlags), clap::Error> {
        let command = Self::command();
        let matches = command.clone().try_get_matches_from(args)?;
        let mut flags = Self::from_arg_matches(&matches)?;
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        flags.host_port_given = given("proxy_server_host") || given("proxy_server_port");
        Ok((flags, EffectiveFlags::new(&command, &matches)))
    }

    /// The addresses to dial: --proxy-server-addresses (plus --proxy-server-host:port if given explicitly),
    /// else --proxy-server-host:port. Listed twice means dialed once.
    fn server_addresses(&self) -> Result<Vec<ServerAddress>, FlagError> {
        let listed: Vec<&str> =
            self.proxy_server_addresses.iter().map(|a| a.trim()).filter(|a| !a.is_empty()).collect();
        let mut addresses = Vec::new();
        if listed.is_empty() || self.host_port_given {
            if self.proxy_server_port == 0 {
                return Err(FlagError::Invalid("--proxy-server-port must be greater than 0".into()));
            }
            if self.proxy_server_host.is_empty() {
                return Err(FlagError::Invalid("--proxy-server-host must not be empty".into()));
            }
            let host = self.proxy_server_host.trim_start_matches('[').trim_end_matches(']');
            addresses.push(ServerAddress::new(host, self.proxy_server_port));
        }
        for text in listed {
            let address =
                ServerAddress::parse(text).map_err(|e| FlagError::Invalid(format!("--proxy-server-addresses: {e}")))?;
            if addresses.contains(&address) {
                tracing::warn!(%address, "proxy-server address listed twice; dialing it once");
            } else {
                addresses.push(address);
            }
        }
        Ok(addresses)
    }

    /// Validates the flags as the reference does and builds the configuration.
    pub fn into_config(self) -> Result<AgentConfig, FlagError> {
        let invalid = |m: String| FlagError::Invalid(m);
        self.klog.check()?;
        if self.ca_cert.is_empty() {
            return Err(invalid("--ca-cert is required: the CA that signed the proxy-server's certificate".into()));
        }
        if self.agent_cert.is_empty() != self.agent_key.is_empty() {
            return Err(invalid("--agent-cert and --agent-key go together".into()));
        }
        let servers = self.server_addresses()?;
        if self.sync_interval > self.sync_interval_cap {
            return Err(invalid(format!(
                "--sync-interval ({:?}) must not exceed --sync-interval-cap ({:?})",
                self.sync_interval, self.sync_interval_cap
            )));
        }
        if self.sync_interval.is_zero() {
            return Err(invalid("--sync-interval must be greater than 0".into()));
        }
        if self.xfr_channel_size <= 0 {
            return Err(invalid(format!("--xfr-channel-size must be greater than 0, got {}", self.xfr_channel_size)));
        }
        validate_identifiers(&self.agent_identifiers).map_err(|e| invalid(format!("--agent-identifiers: {e}")))?;
        if !self.service_account_token_path.is_empty() && !Path::new(&self.service_account_token_path).exists() {
            return Err(invalid(format!(
                "--service-account-token-path {:?}: no such file",
                self.service_account_token_path
            )));
        }
        let source_max = match self.server_count_source.as_str() {
            "" | "default" => false,
            "max" => true,
            other => return Err(invalid(format!("--server-count-source must be 'default' or 'max', got {other:?}"))),
        };
        konnectivity_process::flags::check_kube_client(&self.kubeconfig, &self.kube_api_content_type)?;
        let lease_selector = self.lease_label_selector.clone().unwrap_or_else(|| self.lease_label.clone());
        if self.count_server_leases && lease_selector.trim().is_empty() {
            return Err(invalid("--lease-label-selector (or --lease-label) must not be empty".into()));
        }
        if self.lease_poll_interval < Duration::from_millis(100) {
            return Err(invalid(format!(
                "--lease-poll-interval must be at least 100ms, got {:?}",
                self.lease_poll_interval
            )));
        }
        if self.enable_contention_profiling {
            if !self.enable_profiling {
                return Err(invalid("--enable-contention-profiling requires --enable-profiling".into()));
            }
            tracing::warn!(
                "--enable-contention-profiling has no effect here: there is no Go block profile; CPU profiles are served"
            );
        }
        if self.keepalive_timeout.is_zero() {
            return Err(invalid("--keepalive-timeout must be greater than 0".into()));
        }
        if self.keepalive_time < Duration::from_secs(30) {
            tracing::warn!(
                "--keepalive-time below 30s: Go proxy-servers answer such pings with GOAWAY (too_many_pings)"
            );
        }
        let mut config = AgentConfig::new(self.proxy_server_host, self.proxy_server_port, PathBuf::from(self.ca_cert));
        config.servers = servers;
        config.drain_timeout = (!self.drain_timeout.is_zero()).then_some(self.drain_timeout);
        if config.drain_timeout.is_some_and(|t| self.drain_idle_period >= t) {
            tracing::warn!(
                "--drain-idle-period ({:?}) is not shorter than --drain-timeout ({:?}): a draining agent stays until \
                 --drain-timeout even when idle",
                self.drain_idle_period,
                self.drain_timeout
            );
        }
        config.drain_idle_period = self.drain_idle_period;
        config.service_account_token_path =
            (!self.service_account_token_path.is_empty()).then(|| PathBuf::from(&self.service_account_token_path));
        if self.count_server_leases {
            config.lease_count = Some(LeaseCountConfig {
                kubeconfig: (!self.kubeconfig.is_empty()).then(|| PathBuf::from(&self.kubeconfig)),
                namespace: self.lease_namespace.clone(),
                selector: lease_selector.trim().to_string(),
                source_max,
                poll_interval: self.lease_poll_interval,
            });
        }
        if !self.agent_cert.is_empty() {
            config.agent_cert = Some((PathBuf::from(self.agent_cert), PathBuf::from(self.agent_key)));
        }
        config.alpn_protos = self.alpn_proto.into_iter().filter(|p| !p.is_empty()).collect();
        if let Some(id) = self.agent_id.filter(|id| !id.is_empty()) {
            config.agent_id = id;
        }
        config.agent_identifiers = self.agent_identifiers;
        config.sync_interval = self.sync_interval;
        config.sync_interval_cap = self.sync_interval_cap;
        config.sync_forever = self.sync_forever;
        config.keepalive_time = self.keepalive_time;
        config.keepalive_timeout = self.keepalive_timeout;
        config.xfr_channel_size = usize::try_from(self.xfr_channel_size).unwrap_or(150);
        config.health = Some((self.health_server_host, self.health_server_port));
        config.admin = Some((self.admin_bind_address, self.admin_server_port));
        config.enable_profiling = self.enable_profiling;
        config.egress_policy = konnectivity_egress_policy::EgressPolicy::from_flag(&self.egress_policy_file)
            .map_err(|e| FlagError::invalid(e.to_string()))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_DRAIN_IDLE_PERIOD, DEFAULT_DRAIN_TIMEOUT};

    fn parse(args: &[&str]) -> Result<AgentConfig, String> {
        let mut all = vec!["proxy-agent".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let all = konnectivity_process::flags::normalize_args(all);
        AgentFlags::parse_args(all).map_err(|e| e.to_string())?.into_config().map_err(|e| e.to_string())
    }

    fn addresses(c: &AgentConfig) -> Vec<String> {
        c.servers.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn server_addresses_and_drain_timings() {
        let c = parse(&["--ca-cert=/ca"]).expect("defaults");
        assert_eq!(addresses(&c), ["127.0.0.1:8091"]);
        assert_eq!(c.drain_timeout, Some(DEFAULT_DRAIN_TIMEOUT));
        let c = parse(&["--ca-cert=/ca", "--proxy-server-addresses=a:1,[::1]:2", "--proxy-server-addresses=b:3"])
            .expect("list");
        assert_eq!(addresses(&c), ["a:1", "[::1]:2", "b:3"]);
        // Given explicitly, --proxy-server-host/-port is dialed too; a duplicate is dialed once.
        let c = parse(&["--ca-cert=/ca", "--proxy-server-host=lb", "--proxy-server-addresses=a:1,lb:8091,a:1"])
            .expect("both");
        assert_eq!(addresses(&c), ["lb:8091", "a:1"]);
        let c = parse(&["--ca-cert=/ca", "--proxy-server-port=9000", "--proxy-server-addresses=a:1"]).expect("port");
        assert_eq!(addresses(&c), ["127.0.0.1:9000", "a:1"]);
        let c = parse(&["--ca-cert=/ca", "--proxy-server-host=::1"]).expect("v6 host");
        assert_eq!(addresses(&c), ["[::1]:8091"]);
        assert!(parse(&["--ca-cert=/ca", "--proxy-server-addresses=fd00::1:80"]).unwrap_err().contains("brackets"));
        assert!(parse(&["--ca-cert=/ca", "--proxy-server-addresses=a"]).unwrap_err().contains("missing port"));
        assert!(parse(&["--ca-cert=/ca", "--proxy-server-port=0"]).unwrap_err().contains("greater than 0"));
        let c = parse(&["--ca-cert=/ca", "--drain-timeout=1m30s"]).expect("drain");
        assert_eq!(c.drain_timeout, Some(Duration::from_secs(90)));
        assert_eq!(parse(&["--ca-cert=/ca", "--drain-timeout=0"]).expect("no limit").drain_timeout, None);
        assert_eq!(c.drain_idle_period, DEFAULT_DRAIN_IDLE_PERIOD);
        let c = parse(&["--ca-cert=/ca", "--drain-idle-period=250ms"]).expect("idle period");
        assert_eq!(c.drain_idle_period, Duration::from_millis(250));
        assert_eq!(parse(&["--ca-cert=/ca", "--drain-idle-period=0"]).expect("none").drain_idle_period, Duration::ZERO);
    }

    #[test]
    fn reference_command_line_parses() {
        let c = parse(&[
            "--ca-cert=/ca",
            "--agent-cert=/c",
            "--agent-key=/k",
            "--proxy-server-host=konnectivity.example",
            "--proxy-server-port=8132",
            "--agent-id=a1",
            "--agent-identifiers=host=node1&ipv4=10.1.2.3",
            "--sync-interval=2s",
            "--sync-interval-cap=1m0s",
            "--sync-forever=true",
            "--alpn-proto=konnectivity",
            "--v=4",
        ])
        .expect("parses");
        assert_eq!(c.agent_id, "a1");
        assert_eq!(addresses(&c), ["konnectivity.example:8132"]);
        assert_eq!(c.sync_interval_cap, Duration::from_secs(60));
        assert!(c.sync_forever);
        assert_eq!(c.alpn_protos, ["konnectivity"]);
    }

    #[test]
    fn bad_flags_are_explained() {
        assert!(parse(&[]).unwrap_err().contains("--ca-cert is required"));
        assert!(
            parse(&["--ca-cert=/ca", "--agent-identifiers=zone=a"])
                .unwrap_err()
                .contains("unknown agent identifier key")
        );
        assert!(parse(&["--ca-cert=/ca", "--sync-interval=20s"]).unwrap_err().contains("must not exceed"));
        assert!(
            parse(&["--ca-cert=/ca", "--service-account-token-path=/nonexistent/t"])
                .unwrap_err()
                .contains("no such file")
        );
        assert!(parse(&["--ca-cert=/ca", "--server-count-source=min"]).unwrap_err().contains("'default' or 'max'"));
        assert!(parse(&["--ca-cert=/ca", "--kubeconfig=/nonexistent/kc"]).unwrap_err().contains("no such file"));
    }

    #[test]
    fn lease_counting_flags() {
        let c = parse(&["--ca-cert=/ca"]).expect("defaults");
        assert_eq!(c.lease_count, None);
        let c = parse(&["--ca-cert=/ca", "--count-server-leases", "--server-count-source=max", "--lease-namespace=ns"])
            .expect("leases");
        let l = c.lease_count.expect("lease counting on");
        assert!(l.source_max);
        assert_eq!((l.namespace.as_str(), l.selector.as_str()), ("ns", "k8s-app=konnectivity-server"));
        assert_eq!(l.kubeconfig, None);
        let c = parse(&["--ca-cert=/ca", "--count-server-leases", "--lease-label-selector=app=x"]).expect("selector");
        assert_eq!(c.lease_count.expect("on").selector, "app=x");
        assert!(
            parse(&["--ca-cert=/ca", "--count-server-leases", "--lease-label="])
                .unwrap_err()
                .contains("must not be empty")
        );
    }

    #[test]
    fn keepalive_timeout() {
        assert_eq!(parse(&["--ca-cert=/ca"]).expect("defaults").keepalive_timeout, Duration::from_secs(20));
        let c = parse(&["--ca-cert=/ca", "--keepalive-time=1s", "--keepalive-timeout=2s"]).expect("set");
        assert_eq!((c.keepalive_time, c.keepalive_timeout), (Duration::from_secs(1), Duration::from_secs(2)));
        assert!(parse(&["--ca-cert=/ca", "--keepalive-timeout=0s"]).unwrap_err().contains("greater than 0"));
    }
}
