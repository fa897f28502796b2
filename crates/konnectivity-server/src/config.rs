//! The server's configuration, as the library takes it (the binary builds it from reference-compatible flags).

use std::path::PathBuf;
use std::time::Duration;

/// How many audit records may wait for the writer before new ones are dropped.
pub const DEFAULT_AUDIT_QUEUE_CAPACITY: usize = 8192;

/// How long an HTTP CONNECT tunnel whose client has hung up (its socket reports the peer's FIN or a reset) may
/// wait for the endpoint to take the client's remaining bytes before it is closed (the default of
/// [`ServerConfig::connect_hangup_grace`]). The bytes already read from the client are waiting for flow-control
/// credit, so the endpoint has not read for a while. A client that only shut down its sending side still has its
/// last bytes delivered while the endpoint makes progress within this time (the tunnel then closes, as on any
/// client EOF, like the reference's).
pub const DEFAULT_HANGUP_GRACE: Duration = Duration::from_secs(30);

/// Default bound on HTTP CONNECT connections handled at once: each is one tunnel of kube-apiserver's (an exec,
/// a log stream, a webhook call), so it is generous; what it prevents is a flood of idle sockets exhausting
/// descriptors and memory.
pub const DEFAULT_MAX_CONNECT_CONNECTIONS: usize = 16384;

/// One agent-selection strategy (`--proxy-strategies`); what each selects is `crate::routing`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Any agent.
    Default,
    /// Agents that advertise the destination host exactly (`host`, `ipv4` or `ipv6` identifier).
    DestHost,
    /// Agents that advertise `default-route=true`.
    DefaultRoute,
    /// Agents whose `cidr` identifiers contain the destination IP (most specific prefix first).
    DestCidr,
}

impl Strategy {
    /// Parses a `--proxy-strategies` name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::Default),
            "destHost" => Some(Self::DestHost),
            "defaultRoute" => Some(Self::DefaultRoute),
            "destCIDR" => Some(Self::DestCidr),
            _ => None,
        }
    }

    /// The name, as the `proxy_strategy` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::DestHost => "destHost",
            Self::DefaultRoute => "defaultRoute",
            Self::DestCidr => "destCIDR",
        }
    }
}

/// Default bound on HTTP/2 streams per agent connection: an agent holds one stream per connection; the slack
/// lets a reconnecting agent's new stream overlap a dying one.
pub const DEFAULT_MAX_AGENT_STREAMS: u32 = 4;

/// Default bound on HTTP/2 streams per gRPC frontend connection (hyper's own default).
pub const DEFAULT_MAX_FRONTEND_STREAMS: u32 = 1000;

/// What a server does when one CA signs both agent and frontend client certificates (and
/// [`ServerConfig::frontend_client_names`] does not tell them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedClientCa {
    /// Start, with a warning at start (the default: deployments moved from the reference often share one CA).
    Warn,
    /// Refuse to start.
    Refuse,
    /// Start without a word (the operator has accepted it).
    Allow,
}

/// Where the frontend (kube-apiserver side) listens.
#[derive(Debug, Clone)]
pub enum FrontendListen {
    /// A Unix socket, no TLS (the usual kube-apiserver set-up).
    Uds {
        /// Socket path.
        path: PathBuf,
        /// Remove an existing file at `path` first.
        delete_existing: bool,
    },
    /// TCP with mutual TLS: clients must present a certificate signed by `ca`.
    Tcp {
        /// Bind address; empty means all interfaces.
        bind: String,
        /// Port; 0 picks a free one.
        port: u16,
        /// Server certificate (PEM).
        cert: PathBuf,
        /// Server key (PEM).
        key: PathBuf,
        /// CA that client certificates must chain to.
        ca: PathBuf,
    },
}

/// The frontend protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendMode {
    /// gRPC `/ProxyService/Proxy` streams (kube-apiserver's `GRPC` egress).
    Grpc,
    /// HTTP/1.1 CONNECT (kube-apiserver's `HTTPConnect` egress).
    HttpConnect,
}

/// Where the audit log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    /// The process's standard output (logs go to stderr).
    Stdout,
    /// A file, appended to and rotated by size.
    File(PathBuf),
}

/// The audit log: one JSON line per tunneled connection opened, refused or failed, and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Where the lines go.
    pub output: AuditOutput,
    /// Rotate the file when it would grow past this many bytes; 0 never rotates. Ignored for stdout.
    pub max_size: u64,
    /// Rotated files kept (`<path>.1` newest … `<path>.N`); 0 keeps none.
    pub max_backups: u32,
    /// Records that may wait for the writer; beyond that they are dropped and counted.
    pub queue_capacity: usize,
}

impl AuditConfig {
    /// An audit log to `output` with the defaults of the flags (100 MiB files, 5 backups).
    pub fn new(output: AuditOutput) -> Self {
        Self { output, max_size: 100 << 20, max_backups: 5, queue_capacity: DEFAULT_AUDIT_QUEUE_CAPACITY }
    }
}

/// How the server reaches kube-apiserver (for TokenReviews and Leases).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeClientConfig {
    /// A kubeconfig file; `None` uses the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Requests per second (0: client-go's default, 5).
    pub qps: f32,
    /// Burst (0: client-go's default, 10).
    pub burst: i32,
}

/// Agent authentication by ServiceAccount token.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentAuthConfig {
    /// The agents' namespace.
    pub namespace: String,
    /// The agents' service account.
    pub service_account: String,
    /// The audience their tokens must be issued for.
    pub audience: String,
    /// How long a successful review is reused for the same token (never past the token's expiry); zero
    /// reviews every connection, as the reference does.
    pub cache_ttl: Duration,
    /// TokenReviews per second on average: a rate limit of their own, apart from the Leases'
    /// ([`KubeClientConfig`]'s), so that neither waits behind the other.
    pub review_qps: f32,
    /// TokenReviews at once after a quiet spell.
    pub review_burst: u32,
}

/// Default of `--token-review-qps`.
pub const DEFAULT_TOKEN_REVIEW_QPS: f32 = 50.0;
/// Default of `--token-review-burst`.
pub const DEFAULT_TOKEN_REVIEW_BURST: u32 = 100;

impl AgentAuthConfig {
    /// Token auth for `namespace`/`service_account` and `audience`, caching reviews for 60 s, with the default
    /// review rate limit (50/s, bursts of 100).
    pub fn new(namespace: &str, service_account: &str, audience: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            audience: audience.into(),
            cache_ttl: Duration::from_secs(60),
            review_qps: DEFAULT_TOKEN_REVIEW_QPS,
            review_burst: DEFAULT_TOKEN_REVIEW_BURST,
        }
    }
}

/// How agents' claims are tied to their credentials (`--agent-identity-mode`; docs/security.md, "Agent
/// identity").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// Bind agents whose credential names a node; take the others on trust, with a warning (the default).
    Auto,
    /// Every agent's credential must name a node, and the agent is held to it.
    Strict,
    /// Take every agent's claims on trust, as the reference does.
    Trust,
}

impl IdentityMode {
    /// Parses a `--agent-identity-mode` value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "strict" => Some(Self::Strict),
            "trust" => Some(Self::Trust),
            _ => None,
        }
    }
}

/// Default bound on the agent IDs one node identity may hold at once on a server: its agent, and the same
/// agent restarted under a new ID while the old stream is not yet known dead.
pub const DEFAULT_MAX_AGENT_IDS_PER_NODE: usize = 2;

/// Default time a node's addresses are reused for checking what its agents claim.
pub const DEFAULT_NODE_CACHE_TTL: Duration = Duration::from_secs(60);

/// Agent identity: what agents may claim, by the identity their credential proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentityConfig {
    /// How claims are tied to credentials.
    pub mode: IdentityMode,
    /// Distinct agent IDs a node identity's streams may hold at once; 0: no limit.
    pub max_agent_ids_per_node: usize,
    /// Distinct agent IDs a shared identity's streams (a credential naming no node) may hold at once; 0: no limit.
    pub max_agent_ids_per_shared_identity: usize,
    /// What node identities may claim beyond their own names and addresses (CIDRs, default route, host names).
    pub grants: crate::identity::grants::Grants,
    /// How long a node's addresses are reused; zero reads them for every stream that needs them.
    pub node_cache_ttl: Duration,
}

impl AgentIdentityConfig {
    /// `mode`, with the defaults of the flags.
    pub fn new(mode: IdentityMode) -> Self {
        Self {
            mode,
            max_agent_ids_per_node: DEFAULT_MAX_AGENT_IDS_PER_NODE,
            max_agent_ids_per_shared_identity: 0,
            grants: Default::default(),
            node_cache_ttl: DEFAULT_NODE_CACHE_TTL,
        }
    }
}

/// The lease controller: this server holds a Lease that agents count, and collects expired ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the leases.
    pub namespace: String,
    /// Labels on this server's lease; expired leases with these labels are collected.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Lease duration (reference: 30 s).
    pub duration: Duration,
    /// Renewal interval (reference: 15 s).
    pub renew_interval: Duration,
    /// Garbage-collection interval (reference: 15 s).
    pub gc_interval: Duration,
}

impl LeaseConfig {
    /// The reference's durations, in `namespace` with `labels`.
    pub fn new(namespace: &str, labels: std::collections::BTreeMap<String, String>) -> Self {
        Self {
            namespace: namespace.into(),
            labels,
            duration: Duration::from_secs(30),
            renew_interval: Duration::from_secs(15),
            gc_interval: Duration::from_secs(15),
        }
    }
}

/// Everything `proxy-server` needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The frontend protocol.
    pub mode: FrontendMode,
    /// The frontend listener.
    pub frontend: FrontendListen,
    /// Agent listener bind address; empty means all interfaces.
    pub agent_bind: String,
    /// Agent port; 0 picks a free one.
    pub agent_port: u16,
    /// Agent-port certificate and key.
    pub cluster_cert: PathBuf,
    /// Agent-port key.
    pub cluster_key: PathBuf,
    /// If set, agents must present a client certificate signed by this CA.
    pub cluster_ca: Option<PathBuf>,
    /// This server's ID, sent to agents.
    pub server_id: String,
    /// How many servers agents should connect to.
    pub server_count: u32,
    /// gRPC keepalive ping interval on agent connections.
    pub keepalive_time: Duration,
    /// How long a keepalive ping on an agent connection may go unanswered before that connection is dropped.
    pub keepalive_timeout: Duration,
    /// gRPC keepalive ping interval on frontend connections.
    pub frontend_keepalive_time: Duration,
    /// Fail a dial the agent has not answered (or could not be sent) within this time; `None` waits forever.
    pub backend_dial_timeout: Option<Duration>,
    /// HTTP CONNECT: how long a tunnel whose client has hung up may still wait for its endpoint to read the
    /// client's last bytes (an upload waiting for flow-control credit) before it is closed.
    pub connect_hangup_grace: Duration,
    /// Health port bind address and port (`/healthz`, `/readyz`, `/metrics`); `None` disables it.
    pub health: Option<(String, u16)>,
    /// Admin port bind address and port (`/metrics`); `None` disables it.
    pub admin: Option<(String, u16)>,
    /// How long a stop may take before connections are cut.
    pub graceful_shutdown_timeout: Duration,
    /// Serve `/debug/pprof/profile` on the admin port.
    pub enable_profiling: bool,
    /// Agent-selection strategies, tried in order.
    pub proxy_strategies: Vec<Strategy>,
    /// Lowest TLS version on the agent port and the TCP frontend.
    pub tls_min_version: konnectivity_transport::tls::MinVersion,
    /// TLS 1.2 cipher suites on the agent port and the TCP frontend (`--cipher-suites`; default: all of rustls's).
    pub cipher_suites: konnectivity_transport::tls::CipherSuites,
    /// TLS handshakes in progress at most, per TLS listener (agent port, TCP frontend); more wait in the backlog.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at most from one IP address, per TLS listener; beyond it its connections are
    /// closed at once.
    pub max_handshakes_per_source: usize,
    /// HTTP CONNECT connections handled at once at most; more wait in the backlog.
    pub max_connect_connections: usize,
    /// Names (certificate common name, DNS or URI SAN) of which a TCP frontend client's certificate must carry
    /// one; empty admits any certificate of the frontend CA.
    pub frontend_client_names: Vec<String>,
    /// What to do when the agent CA and the frontend CA bundles share a certificate and no client names are
    /// required there, so that an agent certificate could open tunnels through the frontend.
    pub shared_client_ca: SharedClientCa,
    /// HTTP/2 streams one agent connection may have open at once (an agent needs one).
    pub max_agent_streams: u32,
    /// HTTP/2 streams one gRPC frontend connection may have open at once (kube-apiserver opens a connection
    /// per tunnel; the client library's reusable tunnels multiplex).
    pub max_frontend_streams: u32,
    /// How often certificate, key and CA files are checked for changes (new handshakes use changed files);
    /// zero never reloads them.
    pub tls_reload_interval: Duration,
    /// Egress policy checked before each dial (default: allow everything, as the reference).
    pub egress_policy: std::sync::Arc<konnectivity_egress_policy::EgressPolicy>,
    /// The audit log, if enabled (off by default).
    pub audit: Option<AuditConfig>,
    /// How to reach kube-apiserver, when token auth or leases need it.
    pub kube: KubeClientConfig,
    /// Agent token authentication, if enabled.
    pub agent_auth: Option<AgentAuthConfig>,
    /// The lease controller, if enabled.
    pub lease: Option<LeaseConfig>,
    /// What agents may claim, by their credentials.
    pub agent_identity: AgentIdentityConfig,
}

impl ServerConfig {
    /// A configuration with the reference's defaults for everything but the listeners and certificates.
    pub fn new(frontend: FrontendListen, cluster_cert: PathBuf, cluster_key: PathBuf) -> Self {
        Self {
            mode: FrontendMode::Grpc,
            frontend,
            agent_bind: String::new(),
            agent_port: 8091,
            cluster_cert,
            cluster_key,
            cluster_ca: None,
            server_id: uuid::Uuid::new_v4().to_string(),
            server_count: 1,
            keepalive_time: Duration::from_secs(3600),
            keepalive_timeout: Duration::from_secs(20),
            frontend_keepalive_time: Duration::from_secs(3600),
            backend_dial_timeout: None,
            connect_hangup_grace: DEFAULT_HANGUP_GRACE,
            health: Some((String::new(), 8092)),
            admin: Some(("127.0.0.1".into(), 8095)),
            graceful_shutdown_timeout: Duration::ZERO,
            enable_profiling: false,
            proxy_strategies: vec![Strategy::Default],
            tls_min_version: konnectivity_transport::tls::MinVersion::Tls12,
            cipher_suites: konnectivity_transport::tls::CipherSuites::default(),
            tls_reload_interval: konnectivity_transport::tls_reload::DEFAULT_RELOAD_INTERVAL,
            max_handshakes: konnectivity_transport::listen::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: konnectivity_transport::listen::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_connect_connections: DEFAULT_MAX_CONNECT_CONNECTIONS,
            frontend_client_names: Vec::new(),
            shared_client_ca: SharedClientCa::Warn,
            max_agent_streams: DEFAULT_MAX_AGENT_STREAMS,
            max_frontend_streams: DEFAULT_MAX_FRONTEND_STREAMS,
            egress_policy: std::sync::Arc::new(konnectivity_egress_policy::EgressPolicy::allow_all()),
            audit: None,
            kube: KubeClientConfig::default(),
            agent_auth: None,
            lease: None,
            agent_identity: AgentIdentityConfig::new(IdentityMode::Auto),
        }
    }
}
