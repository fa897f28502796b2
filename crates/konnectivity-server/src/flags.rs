//! `proxy-server` command-line flags: the reference's names, defaults and Go syntax, validated into a
//! [`ServerConfig`]. Flags whose feature is not built yet are accepted by the parser and refused at start
//! with "not supported yet", never silently ignored.

use crate::config::{
    AgentAuthConfig, AuditConfig, AuditOutput, FrontendListen, FrontendMode, KubeClientConfig, LeaseConfig,
    ServerConfig, SharedClientCa,
};
use crate::routing::Strategy;
use clap::{ArgAction, Parser};
pub use konnectivity_process::flags::FlagError;
use konnectivity_process::flags::{KlogFlags, go_duration};
use std::path::PathBuf;
use std::time::Duration;
pub use token_auth::TokenReviewFlags;

mod token_auth;

mod identity;
pub use identity::IdentityFlags;

/// Konnectivity proxy-server (konnectivity-rs): accepts cluster-bound connections from kube-apiserver and
/// carries them over tunnels that proxy-agents in the cluster network open to it.
#[derive(Debug, Clone, Parser)]
#[command(name = "proxy-server", version, about, long_about = None)]
pub struct ServerFlags {
    /// Frontend protocol: 'grpc' or 'http-connect'.
    #[arg(long, default_value = "grpc")]
    pub mode: String,
    /// Serve the frontend on this unix socket instead of TCP (then --server-port must be 0).
    #[arg(long, default_value = "")]
    pub uds_name: String,
    /// Delete an existing file at --uds-name before listening.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub delete_existing_uds_file: bool,
    /// Frontend TCP port (mTLS). Must be 0 with --uds-name.
    #[arg(long, default_value_t = 8090)]
    pub server_port: u16,
    /// Frontend bind address; empty binds all interfaces.
    #[arg(long, default_value = "")]
    pub server_bind_address: String,
    /// Frontend TLS certificate (TCP mode).
    #[arg(long, default_value = "")]
    pub server_cert: String,
    /// Frontend TLS key (TCP mode).
    #[arg(long, default_value = "")]
    pub server_key: String,
    /// CA that frontend client certificates must chain to (required in TCP mode: mTLS).
    #[arg(long, default_value = "")]
    pub server_ca_cert: String,
    /// gRPC keepalive ping interval on frontend connections.
    #[arg(long, value_parser = go_duration, default_value = "1h0m0s")]
    pub frontend_keepalive_time: Duration,
    /// Port agents connect to (always TLS).
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    /// Agent listener bind address; empty binds all interfaces.
    #[arg(long, default_value = "")]
    pub agent_bind_address: String,
    /// Agent-port TLS certificate.
    #[arg(long, default_value = "")]
    pub cluster_cert: String,
    /// Agent-port TLS key.
    #[arg(long, default_value = "")]
    pub cluster_key: String,
    /// If set, agents must present a client certificate signed by this CA (mTLS).
    #[arg(long, default_value = "")]
    pub cluster_ca_cert: String,
    /// gRPC keepalive ping interval on agent connections.
    #[arg(long, value_parser = go_duration, default_value = "1h0m0s")]
    pub keepalive_time: Duration,
    /// How long a keepalive ping on an agent connection may go unanswered before the server drops that agent
    /// (closing its connections and failing its dials): an agent that vanished without FIN or RST is noticed
    /// within --keepalive-time plus this. konnectivity-rs only; the reference uses gRPC's fixed 20s.
    #[arg(long, value_parser = go_duration, default_value = "20s")]
    pub keepalive_timeout: Duration,
    /// Size of the per-stream receive queues (packets). Must be > 0.
    #[arg(long, default_value_t = 10)]
    pub xfr_channel_size: i64,
    /// Fail a dial the agent did not take or answer within this time; 0 waits forever.
    #[arg(long, value_parser = go_duration, default_value = "0s")]
    pub backend_dial_timeout: Duration,
    /// Ordered, comma-separated agent-selection strategies: default, destHost, defaultRoute, destCIDR (ours).
    #[arg(long, default_value = "default")]
    pub proxy_strategies: String,
    /// This server's unique ID (default: $PROXY_SERVER_ID, else a random UUID).
    #[arg(long, env = "PROXY_SERVER_ID")]
    pub server_id: Option<String>,
    /// Number of proxy-server instances agents should connect to (1 unless HA).
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,
    /// Expected agent namespace for ServiceAccount token authentication.
    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    /// Expected agent service account for token authentication.
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    /// Expected token audience for agent authentication.
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    /// Reuse a successful TokenReview of the same token for up to this long, never past the token's expiry;
    /// 0 reviews every agent connection, as the reference (ours).
    #[arg(long, value_parser = go_duration, default_value = "1m0s")]
    pub authentication_cache_ttl: Duration,
    /// kubeconfig for the TokenReview and Lease clients (empty: in-cluster).
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// Maximum QPS of the Kubernetes client.
    #[arg(long, default_value_t = 0.0)]
    pub kubeconfig_qps: f32,
    /// Maximum burst of the Kubernetes client.
    #[arg(long, default_value_t = 0)]
    pub kubeconfig_burst: i32,
    /// Content type the reference asks kube-apiserver for; accepted for compatibility (this server always uses
    /// JSON for its few, small requests).
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
    /// The TokenReviews' own rate limit (ours).
    #[command(flatten)]
    pub token_review: TokenReviewFlags,
    /// TLS 1.2 cipher suites allowed on the agent port and the TCP frontend: Go names, as in tls.CipherSuites()
    /// (comma-separated or repeated). Empty allows every suite below. Supported: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    /// TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    /// TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    /// TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 (the ChaCha20 ones also without the _SHA256 suffix). Suites Go
    /// has but rustls does not (CBC, 3DES, RC4, RSA key exchange) stop the server at start. No effect on TLS 1.3,
    /// whose three suites are always enabled (TLS 1.3 names are accepted and ignored, as in Go).
    #[arg(long, value_delimiter = ',', value_name = "strings")]
    pub cipher_suites: Vec<String>,
    /// Minimum TLS version: VersionTLS12 or VersionTLS13 (empty: TLS 1.2).
    #[arg(long, default_value = "")]
    pub tls_min_version: String,
    /// Health port (/healthz, /readyz, /ready, /metrics).
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    /// Health bind address; empty binds all interfaces.
    #[arg(long, default_value = "")]
    pub health_bind_address: String,
    /// Admin port (/metrics).
    #[arg(long, default_value_t = 8095)]
    pub admin_port: u16,
    /// Admin bind address.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    /// Serve profiling endpoints on the admin port.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_profiling: bool,
    /// Contention profiling (requires --enable-profiling).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_contention_profiling: bool,
    /// Publish and garbage-collect proxy-server Leases.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_lease_controller: bool,
    /// Namespace of the Lease objects.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Labels of the Lease objects (k=v,k=v).
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// How long this server's Lease stays valid without renewal (ours; the reference fixes 30s).
    #[arg(long, value_parser = go_duration, default_value = "30s")]
    pub lease_duration: Duration,
    /// How often this server renews its Lease (ours; the reference fixes 15s).
    #[arg(long, value_parser = go_duration, default_value = "15s")]
    pub lease_renew_interval: Duration,
    /// How often expired Leases with --lease-label are garbage-collected (ours; the reference fixes 15s).
    #[arg(long, value_parser = go_duration, default_value = "15s")]
    pub lease_gc_interval: Duration,
    /// How long a stop may wait for open connections before cutting them (0: a short default).
    #[arg(long, value_parser = go_duration, default_value = "0s")]
    pub graceful_shutdown_timeout: Duration,
    /// Deprecated and without effect, as in the reference.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", hide = true)]
    pub warn_on_channel_limit: bool,
    /// Egress policy file (JSON; see docs/security.md): which destinations dials may reach. Default: all.
    #[arg(long, default_value = "")]
    pub egress_policy_file: String,
    /// TLS handshakes in progress at once at most, per TLS listener (the agent port, and the frontend over
    /// TCP). Beyond it nothing more is accepted until one finishes: new connections wait in the kernel's listen
    /// backlog, so a flood of slow or bogus clients cannot take every descriptor or core (ours; the reference
    /// has no bound).
    #[arg(long, default_value_t = konnectivity_transport::listen::DEFAULT_MAX_HANDSHAKES, value_name = "n")]
    pub max_concurrent_handshakes: usize,
    /// TLS handshakes in progress at once at most from one IP address, per TLS listener; beyond it that address's
    /// new connections are closed at once (counted in tls_handshake_failures_total{reason="source_limit"}), so one
    /// client cannot hold every slot. Agents behind one NAT or an address-hiding load balancer share it (ours).
    #[arg(long, default_value_t = konnectivity_transport::listen::DEFAULT_MAX_HANDSHAKES_PER_SOURCE, value_name = "n")]
    pub max_concurrent_handshakes_per_source: usize,
    /// Comma-separated names of which a TCP frontend client's certificate must carry one (as its subject's common
    /// name or a DNS or URI subject alternative name), checked after the CA's verdict (--server-ca-cert): so that
    /// only kube-apiserver's client certificate opens tunnels, not every certificate the CA ever signed. Empty
    /// (the default, as the reference): any certificate of the frontend CA (ours).
    #[arg(long, default_value = "", value_name = "names")]
    pub frontend_client_names: String,
    /// When one certificate is in both --cluster-ca-cert (agents) and --server-ca-cert (frontend clients) and
    /// --frontend-client-names is empty, an agent's certificate can open tunnels through the frontend: warn (at
    /// start; the default), refuse (do not start), or allow (say nothing) (ours).
    #[arg(long, default_value = "warn", value_parser = ["warn", "refuse", "allow"], value_name = "warn|refuse|allow")]
    pub shared_client_ca: String,
    /// HTTP/2 streams one agent connection may have open at once; an agent needs one (ours; the reference has
    /// no bound).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_AGENT_STREAMS, value_name = "n")]
    pub max_agent_streams_per_connection: u32,
    /// HTTP/2 streams one gRPC frontend connection may have open at once (kube-apiserver opens one connection
    /// per tunnel; clients that multiplex tunnels on one connection need more) (ours).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_FRONTEND_STREAMS, value_name = "n")]
    pub max_frontend_streams_per_connection: u32,
    /// HTTP CONNECT connections (--mode=http-connect) handled at once at most, each one tunnel of kube-apiserver's
    /// from its request to its close. Beyond it nothing more is accepted until one ends; new connections wait in
    /// the listen backlog (ours; the reference has no bound).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_CONNECT_CONNECTIONS, value_name = "n")]
    pub max_connect_connections: usize,
    /// Audit log: one JSON line per tunneled connection opened, per dial that failed or was refused, and per
    /// connection closed (client identity, destination, agent, IDs, bytes each way, duration, close reason;
    /// never payload; format in docs/security.md). A file path (appended to, mode 0600, rotated by
    /// --audit-log-max-size), or '-' for standard output. Empty (the default): no audit log. Lines are written
    /// by a thread of their own and never slow traffic: if it falls behind or the disk fails, lines are dropped
    /// and counted in konnectivity_network_proxy_server_audit_events_dropped_total.
    #[arg(long, default_value = "", value_name = "path")]
    pub audit_log_path: String,
    /// Rotate the audit log file when a line would take it past this many megabytes (MiB): the file becomes
    /// <path>.1, older ones shift to <path>.2 and on. 0 never rotates. Not used for standard output.
    #[arg(long, default_value_t = 100, value_name = "MB")]
    pub audit_log_max_size: u64,
    /// Rotated audit log files to keep (<path>.1 newest, up to <path>.N); older ones are deleted. 0 keeps none:
    /// each rotation starts the file afresh.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub audit_log_max_backups: u32,
    /// Agent identity flags.
    #[command(flatten)]
    pub identity: IdentityFlags,
    /// klog flags.
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// Parses `k=v,k=v` (the reference's `--lease-label` format).
fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, FlagError> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(FlagError::invalid(format!("--lease-label: {pair:?} is not key=value")));
        };
        let (k, v) = (k.trim(), v.trim());
        let valid = |x: &str| x.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if k.is_empty() || !valid(k) || !valid(v) {
            return Err(FlagError::invalid(format!("--lease-label: {pair:?} is not a valid label")));
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

fn path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl ServerFlags {
    /// Validates the flags as the reference does and builds the configuration.
    pub fn into_config(self) -> Result<ServerConfig, FlagError> {
        self.klog.check()?;
        let mode = match self.mode.as_str() {
            "grpc" => FrontendMode::Grpc,
            "http-connect" => FrontendMode::HttpConnect,
            other => return Err(FlagError::invalid(format!("--mode must be 'grpc' or 'http-connect', got {other:?}"))),
        };
        if self.xfr_channel_size <= 0 {
            return Err(FlagError::invalid(format!(
                "--xfr-channel-size must be greater than 0, got {}",
                self.xfr_channel_size
            )));
        }
        if self.keepalive_timeout.is_zero() {
            return Err(FlagError::invalid("--keepalive-timeout must be greater than 0"));
        }
        let strategies = self.strategies()?;
        let token_auth = self.token_auth()?;
        konnectivity_process::flags::check_kube_client(&self.kubeconfig, &self.kube_api_content_type)?;
        let lease_labels = self.lease_labels()?;
        let (cipher_suites, tls_min_version) = self.tls()?;
        if self.enable_contention_profiling {
            if !self.enable_profiling {
                return Err(FlagError::invalid("--enable-contention-profiling requires --enable-profiling"));
            }
            tracing::warn!(
                "--enable-contention-profiling has no effect here: there is no Go block profile; CPU profiles are served"
            );
        }

        let frontend = self.frontend()?;
        let audit = self.audit()?;
        let agent_identity = self.identity.config()?;
        let (Some(cluster_cert), Some(cluster_key)) = (path(&self.cluster_cert), path(&self.cluster_key)) else {
            return Err(FlagError::invalid(
                "--cluster-cert and --cluster-key are required: the agent port always uses TLS",
            ));
        };
        if self.agent_port != 0 && (self.agent_port == self.health_port || self.agent_port == self.admin_port) {
            return Err(FlagError::invalid("--agent-port must differ from --health-port and --admin-port"));
        }
        let server_id = match self.server_id {
            Some(id) if !id.is_empty() => id,
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let mut config = ServerConfig::new(frontend, cluster_cert, cluster_key);
        config.mode = mode;
        config.agent_bind = self.agent_bind_address;
        config.agent_port = self.agent_port;
        config.cluster_ca = path(&self.cluster_ca_cert);
        config.server_id = server_id;
        config.server_count = self.server_count;
        config.keepalive_time = self.keepalive_time;
        config.keepalive_timeout = self.keepalive_timeout;
        config.frontend_keepalive_time = self.frontend_keepalive_time;
        config.backend_dial_timeout = (!self.backend_dial_timeout.is_zero()).then_some(self.backend_dial_timeout);
        config.health = Some((self.health_bind_address, self.health_port));
        config.admin = Some((self.admin_bind_address, self.admin_port));
        config.graceful_shutdown_timeout = self.graceful_shutdown_timeout;
        config.enable_profiling = self.enable_profiling;
        config.proxy_strategies = strategies;
        config.tls_min_version = tls_min_version;
        config.cipher_suites = cipher_suites;
        config.audit = audit;
        config.agent_identity = agent_identity;
        config.kube = KubeClientConfig {
            kubeconfig: path(&self.kubeconfig),
            qps: self.kubeconfig_qps,
            burst: self.kubeconfig_burst,
        };
        if token_auth {
            let mut auth =
                AgentAuthConfig::new(&self.agent_namespace, &self.agent_service_account, &self.authentication_audience);
            auth.cache_ttl = self.authentication_cache_ttl;
            (auth.review_qps, auth.review_burst) =
                (self.token_review.token_review_qps, self.token_review.token_review_burst);
            config.agent_auth = Some(auth);
        }
        if self.enable_lease_controller {
            let mut lease = LeaseConfig::new(&self.lease_namespace, lease_labels);
            lease.duration = self.lease_duration;
            lease.renew_interval = self.lease_renew_interval;
            lease.gc_interval = self.lease_gc_interval;
            config.lease = Some(lease);
        }
        for (flag, n) in [
            ("max-concurrent-handshakes", self.max_concurrent_handshakes),
            ("max-concurrent-handshakes-per-source", self.max_concurrent_handshakes_per_source),
            ("max-connect-connections", self.max_connect_connections),
            ("max-agent-streams-per-connection", self.max_agent_streams_per_connection as usize),
            ("max-frontend-streams-per-connection", self.max_frontend_streams_per_connection as usize),
        ] {
            if n == 0 {
                return Err(FlagError::invalid(format!("--{flag} must be greater than 0")));
            }
        }
        config.max_handshakes = self.max_concurrent_handshakes;
        config.max_connect_connections = self.max_connect_connections;
        config.max_handshakes_per_source = self.max_concurrent_handshakes_per_source;
        config.frontend_client_names = self
            .frontend_client_names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        config.shared_client_ca = match self.shared_client_ca.as_str() {
            "refuse" => SharedClientCa::Refuse,
            "allow" => SharedClientCa::Allow,
            _ => SharedClientCa::Warn,
        };
        config.max_agent_streams = self.max_agent_streams_per_connection;
        config.max_frontend_streams = self.max_frontend_streams_per_connection;
        config.egress_policy = konnectivity_egress_policy::EgressPolicy::from_flag(&self.egress_policy_file)
            .map_err(|e| FlagError::invalid(e.to_string()))?;
        Ok(config)
    }

    fn strategies(&self) -> Result<Vec<Strategy>, FlagError> {
        let mut strategies = Vec::new();
        for name in self.proxy_strategies.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match Strategy::parse(name) {
                Some(s) if !strategies.contains(&s) => strategies.push(s),
                Some(_) => return Err(FlagError::invalid(format!("--proxy-strategies lists {name} twice"))),
                None => {
                    return Err(FlagError::invalid(format!(
                        "unknown proxy strategy {name:?} (want default, destHost, defaultRoute or destCIDR)"
                    )));
                }
            }
        }
        if strategies.is_empty() {
            return Err(FlagError::invalid("--proxy-strategies must not be empty"));
        }
        Ok(strategies)
    }

    fn lease_labels(&self) -> Result<std::collections::BTreeMap<String, String>, FlagError> {
        if self.lease_label.trim().is_empty() {
            return Err(FlagError::invalid("--lease-label must not be empty"));
        }
        let lease_labels = parse_labels(&self.lease_label)?;
        for (flag, d) in [
            ("lease-duration", self.lease_duration),
            ("lease-renew-interval", self.lease_renew_interval),
            ("lease-gc-interval", self.lease_gc_interval),
        ] {
            if d < Duration::from_secs(1) {
                return Err(FlagError::invalid(format!("--{flag} must be at least 1s, got {d:?}")));
            }
        }
        if self.lease_renew_interval >= self.lease_duration {
            return Err(FlagError::invalid("--lease-renew-interval must be shorter than --lease-duration"));
        }
        Ok(lease_labels)
    }

    fn tls(
        &self,
    ) -> Result<(konnectivity_transport::tls::CipherSuites, konnectivity_transport::tls::MinVersion), FlagError> {
        let cipher_suites = konnectivity_transport::tls::CipherSuites::parse(&self.cipher_suites)
            .map_err(|e| FlagError::invalid(format!("--cipher-suites: {e}")))?;
        if cipher_suites.excludes_tls12() {
            tracing::warn!("--cipher-suites lists only TLS 1.3 suites: TLS 1.2 clients cannot connect");
        }
        let tls_min_version = match self.tls_min_version.as_str() {
            "" | "VersionTLS12" => konnectivity_transport::tls::MinVersion::Tls12,
            "VersionTLS13" => konnectivity_transport::tls::MinVersion::Tls13,
            "VersionTLS10" | "VersionTLS11" => {
                return Err(FlagError::invalid(format!(
                    "--tls-min-version={}: TLS below 1.2 is not offered by this server",
                    self.tls_min_version
                )));
            }
            other => return Err(FlagError::invalid(format!("--tls-min-version: unknown version {other:?}"))),
        };
        Ok((cipher_suites, tls_min_version))
    }

    fn frontend(&self) -> Result<FrontendListen, FlagError> {
        let frontend = if !self.uds_name.is_empty() {
            if self.server_port != 0 {
                return Err(FlagError::invalid(format!(
                    "--server-port must be 0 with --uds-name, got {}",
                    self.server_port
                )));
            }
            if !self.server_cert.is_empty() || !self.server_key.is_empty() || !self.server_ca_cert.is_empty() {
                return Err(FlagError::invalid(
                    "--server-cert, --server-key and --server-ca-cert must be empty with --uds-name",
                ));
            }
            FrontendListen::Uds { path: PathBuf::from(&self.uds_name), delete_existing: self.delete_existing_uds_file }
        } else {
            let (Some(cert), Some(key)) = (path(&self.server_cert), path(&self.server_key)) else {
                return Err(FlagError::invalid(
                    "the TCP frontend needs --server-cert and --server-key (or use --uds-name)",
                ));
            };
            let Some(ca) = path(&self.server_ca_cert) else {
                return Err(FlagError::invalid(
                    "the TCP frontend requires --server-ca-cert: clients must authenticate with mTLS",
                ));
            };
            FrontendListen::Tcp { bind: self.server_bind_address.clone(), port: self.server_port, cert, key, ca }
        };
        Ok(frontend)
    }

    fn audit(&self) -> Result<Option<AuditConfig>, FlagError> {
        Ok(match self.audit_log_path.as_str() {
            "" => None,
            "-" => Some(AuditConfig::new(AuditOutput::Stdout)),
            file => {
                let max_size = self.audit_log_max_size.checked_mul(1 << 20).ok_or_else(|| {
                    FlagError::invalid(format!("--audit-log-max-size={} is too large", self.audit_log_max_size))
                })?;
                let mut audit = AuditConfig::new(AuditOutput::File(PathBuf::from(file)));
                audit.max_size = max_size;
                audit.max_backups = self.audit_log_max_backups;
                Some(audit)
            }
        })
    }
}

#[cfg(test)]
mod tests;
