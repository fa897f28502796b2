//! A real Kubernetes control plane in two isolated networks, for end-to-end tests.
//!
//! ```text
//!   control netns                                   cluster netns
//!   ─────────────                                   ─────────────
//!   etcd        127.0.0.1:2379                      proxy-agent ──dials──▶ 198.19.255.1:8132
//!   kube-apiserver :6443 ── egress selector ──▶     kubelet-like HTTPS  198.18.0.10:10250
//!   proxy-server  (UDS or mTLS TCP frontend,        "pod" HTTP          198.18.1.20:8080
//!                  agent port :8132)                admission webhook   198.18.1.30:8443
//!   decoys on 198.18.0.10, .1.20, .1.30  (the same addresses, counting every hit)
//!          198.19.255.1/30 ◀──────── veth ────────▶ 198.19.255.2/30
//! ```
//!
//! The control network has no route to the cluster addresses: they exist there too, as decoys. Whatever
//! kube-apiserver reaches in the cluster, it reaches through the tunnel, or it hits a decoy (and the test fails).
//!
//! kube-apiserver, kubectl and etcd are the real binaries, built from the Go module proxy by
//! `controlplane/build.sh`; proxy-server and proxy-agent are this workspace's binaries.

mod api;
mod binaries;
mod config_files;
mod endpoints;
mod fixture;
mod pki;
mod probes;

pub use binaries::{Binaries, interop_bin, workspace_bin};
pub use fixture::ControlPlane;
pub use pki::ClusterPki;
pub use probes::{metric, plain_get};

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize};

/// The control side of the veth link: where agents (and the agent-side kubeconfig) reach the control plane.
pub const CONTROL_LINK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The cluster side of the veth link.
pub const CLUSTER_LINK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// The node's InternalIP: the kubelet-like server in the cluster, a decoy in the control network.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The "pod" behind the test Service.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
/// The admission webhook's pod.
pub const WEBHOOK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
/// Kubelet port.
pub const KUBELET_PORT: u16 = 10250;
/// The pod's HTTP port.
pub const POD_PORT: u16 = 8080;
/// The webhook's HTTPS port.
pub const WEBHOOK_PORT: u16 = 8443;
/// kube-apiserver's secure port (in the control network).
pub const KAS_PORT: u16 = 6443;
/// proxy-server's agent port.
pub const AGENT_PORT: u16 = 8132;
/// proxy-server's mTLS TCP frontend (HTTPConnect over TCP mode), on the control loopback.
pub const FRONTEND_PORT: u16 = 8131;
/// proxy-server admin (metrics) port, control loopback.
pub const SERVER_ADMIN_PORT: u16 = 8133;
/// proxy-server health port, control loopback.
pub const SERVER_HEALTH_PORT: u16 = 8134;
/// proxy-agent admin (metrics) port, cluster loopback.
pub const AGENT_ADMIN_PORT: u16 = 8094;
/// proxy-agent health port, cluster loopback.
pub const AGENT_HEALTH_PORT: u16 = 8093;
/// The Node object the fixture creates.
pub const NODE_NAME: &str = "node-1";
/// The ServiceAccount issuer (and default API audience) of the fixture's kube-apiserver.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How kube-apiserver reaches proxy-server (one `cluster` egress selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressMode {
    /// proxyProtocol GRPC over the Unix socket.
    GrpcUds,
    /// proxyProtocol HTTPConnect over the Unix socket.
    ConnectUds,
    /// proxyProtocol HTTPConnect over TCP with mutual TLS.
    ConnectMtls,
}

/// Agents authenticate with ServiceAccount tokens instead of client certificates.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// `--agent-namespace`.
    pub namespace: String,
    /// `--agent-service-account`.
    pub service_account: String,
    /// `--authentication-audience`.
    pub audience: String,
}

impl Default for TokenAuth {
    fn default() -> Self {
        Self {
            namespace: "kube-system".into(),
            service_account: "konnectivity-agent".into(),
            audience: "system:konnectivity-server".into(),
        }
    }
}

/// What the fixture starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// How kube-apiserver reaches proxy-server.
    pub mode: EgressMode,
    /// Extra proxy-server flags.
    pub server_args: Vec<String>,
    /// Start a proxy-agent in the cluster network (and wait until the server has it).
    pub agent: bool,
    /// Extra proxy-agent flags.
    pub agent_args: Vec<String>,
    /// Token authentication of agents (the server gets the admin kubeconfig for its TokenReviews; the agent a
    /// token from the TokenRequest API for that service account and audience, and no client certificate).
    pub token_auth: Option<TokenAuth>,
}

impl Options {
    /// One server, one agent, the given mode, no extra flags.
    pub fn new(mode: EgressMode) -> Self {
        Self { mode, server_args: Vec::new(), agent: true, agent_args: Vec::new(), token_auth: None }
    }
}

/// Hit counters of the in-cluster endpoints and of the decoys.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests the kubelet-like server answered.
    pub kubelet_requests: AtomicU64,
    /// Log-follow streams open now on the kubelet-like server.
    pub log_streams_open: AtomicUsize,
    /// Lines those streams have written.
    pub log_lines: AtomicU64,
    /// Requests the pod answered.
    pub pod_requests: AtomicU64,
    /// AdmissionReviews the webhook answered.
    pub webhook_reviews: AtomicU64,
    /// Connections the decoys in the control network accepted (must stay 0).
    pub decoy_hits: AtomicU64,
}
