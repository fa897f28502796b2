//! The agent's Prometheus metrics, spelled as the reference's `pkg/agent/metrics`, in a registry of their own.

use konnectivity_process::metric_set::MetricSet;
use konnectivity_proto::names::METRICS_NAMESPACE;
use konnectivity_proto::packet_counters::PacketCounters;
use prometheus::{Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};

const LATENCY_BUCKETS: [f64; 7] = [0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0];

/// The agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    set: MetricSet,
    tls_reloads: IntCounterVec,
    pub(crate) dial_duration: Histogram,
    pub(crate) server_connection_failures: IntCounterVec,
    pub(crate) endpoint_dial_failures: IntCounterVec,
    pub(crate) open_server_connections: Gauge,
    pub(crate) known_server_count: Gauge,
    pub(crate) open_endpoint_connections: Gauge,
    stream_packets: std::sync::Arc<PacketCounters>,
    pub(crate) stream_errors: IntCounterVec,
    pub(crate) bytes_to_endpoint: IntCounter,
    pub(crate) bytes_to_server: IntCounter,
    pub(crate) flow_control_waits: IntCounter,
    pub(crate) egress_denials: IntCounter,
    pub(crate) server_dials: IntCounterVec,
    pub(crate) lease_lists: IntCounterVec,
    pub(crate) lease_watches: IntCounterVec,
    pub(crate) lease_list_latency: HistogramVec,
}

impl AgentMetrics {
    /// Creates the metrics in a fresh registry. Names, HELP texts, labels and buckets are the reference's,
    /// except the konnectivity-rs additions marked below.
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = MetricSet::new(METRICS_NAMESPACE, "agent");
        let by_code_and_reason = &["http_response_code", "reason"];
        m.collector(Box::new(konnectivity_process::process_metrics::ProcessMetrics::new()?))?;
        // The reference registers it and never increments it (its informer's calls are not counted); here every
        // WATCH request is counted by status, "error" when it could not be opened (ours).
        let lease_watches = m.counter_vec(
            "lease_watches_total",
            "Count of server lease watch calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
            by_code_and_reason,
        )?;
        // konnectivity-rs addition: bytes carried, by direction.
        let tunnel_bytes = m.counter_vec(
            "tunnel_bytes_total",
            "Bytes carried through tunnels, by direction: to_endpoint (server to endpoint) or to_server (endpoint to server).",
            &["direction"],
        )?;
        Ok(Self {
            lease_watches,
            dial_duration: m.histogram(
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
                Some(&LATENCY_BUCKETS),
            )?,
            server_connection_failures: m.counter_vec(
                "server_connection_failure_count",
                "Count of failures to send to or receive from the proxy server, labeled by the direction (from_server or to_server). DEPRECATED, please use stream_events_error_total",
                &["direction"],
            )?,
            endpoint_dial_failures: m.counter_vec(
                "endpoint_dial_failure_total",
                "Number of failures dialing the remote endpoint, by reason (example: timeout).",
                &["reason"],
            )?,
            open_server_connections: m
                .gauge("open_server_connections", "Current number of open server connections.")?,
            known_server_count: m
                .gauge("known_server_count", "Current number of servers agent is trying to connect to.")?,
            open_endpoint_connections: m
                .gauge("open_endpoint_connections", "Current number of open endpoint connections.")?,
            lease_lists: m.counter_vec(
                "lease_lists_total",
                "Count of server lease list calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
                by_code_and_reason,
            )?,
            lease_list_latency: m.histogram_vec(
                "lease_list_latency_seconds",
                "Latency of server lease listing in seconds",
                Some(&LATENCY_BUCKETS),
                &["http_response_code"],
            )?,
            stream_packets: std::sync::Arc::new(PacketCounters::new(
                m.counter_vec(
                    "stream_packets_total",
                    "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
                    &["segment", "packet_type"],
                )?,
                &["from_agent", "to_agent"],
            )),
            stream_errors: m.counter_vec(
                "stream_errors_total",
                "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
                &["segment", "code", "packet_type"],
            )?,
            // konnectivity-rs additions from here on (not in the reference).
            bytes_to_endpoint: tunnel_bytes.with_label_values(&["to_endpoint"]),
            bytes_to_server: tunnel_bytes.with_label_values(&["to_server"]),
            flow_control_waits: m.counter(
                "flow_control_waits_total",
                "Times endpoint data waited for its connection's flow-control credit from the server.",
            )?,
            egress_denials: m.counter(
                "egress_policy_denials_total",
                "Dials refused by the egress policy after resolving the destination.",
            )?,
            tls_reloads: m.counter_vec(
                "tls_reloads_total",
                "Reloads of the CA bundle and client certificate and key after they changed on disk, by result: success (new connections use them) or failure (unreadable or unusable; the previous ones stay in use).",
                &["result"],
            )?,
            server_dials: m.counter_vec(
                "server_dials_total",
                "Attempts to open a stream to a proxy-server address, by result: new_server, duplicate (the address reached a server the agent already holds a stream to; the new stream is closed) or error.",
                &["result"],
            )?,
            set: m,
        })
    }

    /// A hook for the TLS file watcher, counting reloads.
    pub(crate) fn tls_reload_hook(&self) -> konnectivity_transport::tls_reload::ReloadHook {
        let vec = self.tls_reloads.clone();
        std::sync::Arc::new(move |result| vec.with_label_values(&[result.label()]).inc())
    }
    /// TLS reloads with `result` (`success` or `failure`) so far.
    pub fn tls_reloads(&self, result: &str) -> u64 {
        self.tls_reloads.with_label_values(&[result]).get()
    }
    /// The registry to expose on `/metrics`.
    pub fn registry(&self) -> &Registry {
        self.set.registry()
    }

    /// Counts a packet sent to a server (PacketType number).
    pub(crate) fn sent(&self, packet_type: i32) {
        self.stream_packets.inc(0, packet_type);
    }
    /// Counts a packet received from a server (PacketType number).
    pub(crate) fn received(&self, packet_type: i32) {
        self.stream_packets.inc(1, packet_type);
    }

    /// Current `open_endpoint_connections`.
    pub fn open_endpoint_connections(&self) -> f64 {
        self.open_endpoint_connections.get()
    }
    /// How many server dials ended with `result` (`new_server`, `duplicate`, `error`).
    pub fn server_dials(&self, result: &str) -> u64 {
        self.server_dials.with_label_values(&[result]).get()
    }
    /// Current `open_server_connections`.
    pub fn open_server_connections(&self) -> f64 {
        self.open_server_connections.get()
    }
    /// `endpoint_dial_failure_total` for a reason (`timeout`, `unknown`).
    pub fn endpoint_dial_failures(&self, reason: &str) -> u64 {
        self.endpoint_dial_failures.with_label_values(&[reason]).get()
    }
}
