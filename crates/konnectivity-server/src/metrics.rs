//! The server's Prometheus metrics: names, types, labels, buckets and HELP text as the reference has them
//! (`pkg/server/metrics`), in a registry of their own so several servers can run in one process (tests).

use konnectivity_process::metric_set::MetricSet;
use konnectivity_proto::names::METRICS_NAMESPACE;
use konnectivity_proto::packet_counters::PacketCounters;
use prometheus::{Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};

const LATENCY_BUCKETS: [f64; 9] = [0.000001, 0.00001, 0.0001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5];

/// `dial_failure_count` reasons.
#[derive(Debug, Clone, Copy)]
pub enum DialFailureReason {
    /// No agent could take the dial.
    NoAgent,
    /// The agent answered with an error.
    ErrorResponse,
    /// A DIAL_RSP matched no pending dial.
    UnrecognizedResponse,
    /// The DIAL_RSP could not be forwarded to the frontend.
    SendResponse,
    /// The agent's stream ended while the dial was pending.
    BackendClose,
    /// `--backend-dial-timeout` expired.
    BackendDialTimeout,
    /// The frontend gave up (DIAL_CLS or stream end) before the answer.
    FrontendClose,
}

impl DialFailureReason {
    fn label(self) -> &'static str {
        match self {
            Self::NoAgent => "no_agent",
            Self::ErrorResponse => "error_response",
            Self::UnrecognizedResponse => "unrecognized_response",
            Self::SendResponse => "send_rsp",
            Self::BackendClose => "backend_close",
            Self::BackendDialTimeout => "backend_dial_timeout",
            Self::FrontendClose => "frontend_close",
        }
    }
}

/// Where a packet was seen, the `segment` label.
#[derive(Debug, Clone, Copy)]
pub enum Segment {
    /// Received from a frontend.
    FromClient,
    /// Sent to a frontend.
    ToClient,
    /// Received from an agent.
    FromAgent,
    /// Sent to an agent.
    ToAgent,
}

/// Segment labels, indexed by `Segment as usize`.
const SEGMENTS: [&str; 4] = ["from_client", "to_client", "from_agent", "to_agent"];

impl Segment {
    fn label(self) -> &'static str {
        match self {
            Self::FromClient => "from_client",
            Self::ToClient => "to_client",
            Self::FromAgent => "from_agent",
            Self::ToAgent => "to_agent",
        }
    }
}

/// The server's metrics.
#[derive(Clone)]
pub struct ServerMetrics {
    set: MetricSet,
    dial_duration: Histogram,
    frontend_write_duration: Histogram,
    grpc_connections: GaugeVec,
    http_connections: Gauge,
    ready_backend_connections: Gauge,
    ready_backends: GaugeVec,
    pending_dials: Gauge,
    established: Gauge,
    full_receive_channels: GaugeVec,
    dial_failures: IntCounterVec,
    stream_packets: std::sync::Arc<PacketCounters>,
    stream_errors: IntCounterVec,
    tunnel_bytes_to_frontend: IntCounter,
    tunnel_bytes_to_agent: IntCounter,
    frontend_stall_closes: IntCounter,
    flow_control_waits: IntCounter,
    tls_handshake_failures: IntCounterVec,
    tls_reloads: IntCounterVec,
    egress_denials: IntCounter,
    audit_events: IntCounterVec,
    audit_dropped: IntCounterVec,
    pub(crate) culled_leases: IntCounter,
    pub(crate) lease_delete_latency: HistogramVec,
    pub(crate) lease_delete_total: IntCounterVec,
    pub(crate) lease_list_latency: HistogramVec,
    pub(crate) lease_list_total: IntCounterVec,
    pub(crate) agent_auth: IntCounterVec,
    agent_identity_refusals: IntCounterVec,
}

impl ServerMetrics {
    /// Creates the metrics in a fresh registry. Names, HELP texts, labels and buckets are the reference's
    /// (typos included), except the konnectivity-rs additions marked below. (One long list on purpose: every
    /// metric's spelling in one place, in the reference's order, is what keeps them checkable against it.)
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = MetricSet::new(METRICS_NAMESPACE, "server");
        let lease_by_code = &["http_status_code"];
        let lease_by_code_and_reason = &["http_status_code", "reason"];
        m.collector(Box::new(konnectivity_process::process_metrics::ProcessMetrics::new()?))?;
        // konnectivity-rs addition: bytes carried, by direction.
        let tunnel_bytes = m.counter_vec(
            "tunnel_bytes_total",
            "Bytes carried through tunnels, by direction: to_frontend (agent to frontend) or to_agent (frontend to agent).",
            &["direction"],
        )?;
        Ok(Self {
            dial_duration: m.histogram(
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
                Some(&LATENCY_BUCKETS),
            )?,
            frontend_write_duration: m.histogram(
                "frontend_write_duration_seconds",
                "Latency of write to the frontend in seconds",
                Some(&LATENCY_BUCKETS),
            )?,
            grpc_connections: m.gauge_vec(
                "grpc_connections",
                "Number of current grpc connections, partitioned by service method.",
                &["service_method"],
            )?,
            http_connections: m.gauge("http_connections", "Number of current HTTP CONNECT connections")?,
            ready_backend_connections: m.gauge(
                "ready_backend_connections",
                "Number of konnectivity agent connected to the proxy server. DEPRECATED, please use ready_backends",
            )?,
            ready_backends: m.gauge_vec(
                "ready_backends",
                "Number of konnectivity agent connected to the proxy server",
                &["proxy_strategy"],
            )?,
            pending_dials: m.gauge("pending_backend_dials", "Current number of pending backend dial requests")?,
            established: m.gauge(
                "established_connections",
                "Current number of established end-to-end connections (post-dial).",
            )?,
            full_receive_channels: m.gauge_vec(
                "full_receive_channels",
                "Number of current connections blocked by a full receive channel, partitioned by service method.",
                &["service_method"],
            )?,
            dial_failures: m.counter_vec(
                "dial_failure_count",
                "Number of dial failures observed. Multiple failures can occur for a single dial request.",
                &["reason"],
            )?,
            stream_packets: std::sync::Arc::new(PacketCounters::new(
                m.counter_vec(
                    "stream_packets_total",
                    "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
                    &["segment", "packet_type"],
                )?,
                &SEGMENTS,
            )),
            stream_errors: m.counter_vec(
                "stream_errors_total",
                "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
                &["segment", "code", "packet_type"],
            )?,
            // Lease metrics, as the reference registers them (moved by the lease controller's garbage collection).
            culled_leases: m.counter(
                "culled_leases_count",
                "Count of expired leases that the lease garbage collection controller has culled.",
            )?,
            lease_delete_latency: m.histogram_vec(
                "lease_delete_latency_seconds",
                "Latency of lease deletion calls by the garbage collection controller in seconds.",
                None,
                lease_by_code,
            )?,
            lease_delete_total: m.counter_vec(
                "lease_delete_total",
                "Count of lease delection calls by the garbage collection controller. Labeled by HTTP status code and reason.",
                lease_by_code_and_reason,
            )?,
            lease_list_latency: m.histogram_vec(
                "lease_list_latency_seconds",
                "Latency of lease list calls by the garbage collection controller in seconds.",
                None,
                lease_by_code,
            )?,
            lease_list_total: m.counter_vec(
                "lease_list_total",
                "Count of lease deletion calls by the garbage collection controller. Labeled by HTTP status code and reason.",
                lease_by_code_and_reason,
            )?,
            // konnectivity-rs additions from here on (not in the reference).
            // Exported once token auth has seen an agent.
            agent_auth: m.counter_vec(
                "agent_authentications_total",
                "Agent token authentications, by result: ok (TokenReview accepted), cached (a recent or concurrent review of the same token reused), denied, throttled (too many reviews at once: told to retry), error (kube-apiserver unreachable or failing).",
                &["result"],
            )?,
            // Exported once an agent has been refused.
            agent_identity_refusals: m.counter_vec(
                "agent_identity_refusals_total",
                "Agent streams refused because their credential does not allow what they claim, by reason (no_node_identity, ambiguous_identity, unknown_node, host, address, cidr, default_route, agent_id_taken, agent_id_limit, node_lookup_error).",
                &["reason"],
            )?,
            tunnel_bytes_to_frontend: tunnel_bytes.with_label_values(&["to_frontend"]),
            tunnel_bytes_to_agent: tunnel_bytes.with_label_values(&["to_agent"]),
            frontend_stall_closes: m.counter(
                "frontend_stall_closes_total",
                "Connections closed because their frontend did not read for the stall limit (agents without flow control).",
            )?,
            flow_control_waits: m.counter(
                "flow_control_waits_total",
                "Times frontend data waited for its connection's flow-control credit from the agent.",
            )?,
            tls_handshake_failures: m.counter_vec(
                "tls_handshake_failures_total",
                "Failed TLS handshakes, by listener (agent, frontend) and reason.",
                &["listener", "reason"],
            )?,
            tls_reloads: m.counter_vec(
                "tls_reloads_total",
                "Reloads of certificate, key and CA files after they changed on disk, by listener (agent, frontend) and result: success (new handshakes use them) or failure (unreadable or unusable; the previous ones stay in use).",
                &["listener", "result"],
            )?,
            egress_denials: m.counter(
                "egress_policy_denials_total",
                "Dials refused by the egress policy before being sent to an agent.",
            )?,
            // Families without samples are not exported: these appear only when the audit log is enabled.
            audit_events: m.counter_vec(
                "audit_events_total",
                "Audit log events, by event (open, dial_failed, close, agent_refused), including those that could not be written.",
                &["event"],
            )?,
            audit_dropped: m.counter_vec(
                "audit_events_dropped_total",
                "Audit log lines lost, by reason: queue_full (the writer fell behind), write_error (the output failed), closed (after stop).",
                &["reason"],
            )?,
            set: m,
        })
    }

    /// The registry to expose on `/metrics`.
    pub fn registry(&self) -> &Registry {
        self.set.registry()
    }

    pub(crate) fn observe_dial(&self, seconds: f64) {
        self.dial_duration.observe(seconds);
    }
    pub(crate) fn bytes_to_frontend(&self, n: usize) {
        self.tunnel_bytes_to_frontend.inc_by(n as u64);
    }
    pub(crate) fn bytes_to_agent(&self, n: usize) {
        self.tunnel_bytes_to_agent.inc_by(n as u64);
    }
    pub(crate) fn egress_denied(&self) {
        self.egress_denials.inc();
    }
    /// The audit log's counters (creating their series, so they export as 0 from the start).
    pub(crate) fn audit_counters(&self) -> crate::audit::AuditCounters {
        let event = |e: &str| self.audit_events.with_label_values(&[e]);
        let dropped = |r: &str| self.audit_dropped.with_label_values(&[r]);
        crate::audit::AuditCounters {
            open: event("open"),
            dial_failed: event("dial_failed"),
            close: event("close"),
            agent_refused: event("agent_refused"),
            dropped_queue_full: dropped("queue_full"),
            dropped_write_error: dropped("write_error"),
            dropped_closed: dropped("closed"),
        }
    }
    /// Counts an agent stream refused for what it claimed.
    pub(crate) fn identity_refusal(&self, reason: &str) {
        self.agent_identity_refusals.with_label_values(&[reason]).inc();
    }
    /// Agent streams refused for `reason` so far.
    pub fn identity_refusals(&self, reason: &str) -> u64 {
        self.agent_identity_refusals.with_label_values(&[reason]).get()
    }
    pub(crate) fn frontend_stall_close(&self) {
        self.frontend_stall_closes.inc();
    }
    pub(crate) fn flow_control_wait(&self) {
        self.flow_control_waits.inc();
    }
    /// A hook for the TLS listeners, counting failed handshakes of `listener`.
    pub(crate) fn handshake_failure_hook(
        &self,
        listener: &'static str,
    ) -> konnectivity_transport::listen::HandshakeFailureHook {
        let vec = self.tls_handshake_failures.clone();
        std::sync::Arc::new(move |reason| vec.with_label_values(&[listener, reason]).inc())
    }
    /// A hook for the TLS file watchers, counting reloads of `listener`'s files.
    pub(crate) fn tls_reload_hook(&self, listener: &'static str) -> konnectivity_transport::tls_reload::ReloadHook {
        let vec = self.tls_reloads.clone();
        std::sync::Arc::new(move |result| vec.with_label_values(&[listener, result.label()]).inc())
    }
    /// TLS reloads of `listener` with `result` (`success` or `failure`) so far.
    pub fn tls_reloads(&self, listener: &str, result: &str) -> u64 {
        self.tls_reloads.with_label_values(&[listener, result]).get()
    }
    /// Failed TLS handshakes of `listener` with `reason` so far.
    pub fn tls_handshake_failures(&self, listener: &str, reason: &str) -> u64 {
        self.tls_handshake_failures.with_label_values(&[listener, reason]).get()
    }
    pub(crate) fn observe_frontend_write(&self, seconds: f64) {
        self.frontend_write_duration.observe(seconds);
    }
    /// Counts one gRPC stream of `method` (`Connect`, `Proxy`) in `grpc_connections` until the guard drops.
    pub(crate) fn grpc_connection(&self, method: &str) -> GaugeGuard {
        GaugeGuard::new(self.grpc_connections.with_label_values(&[method]))
    }
    /// Counts one HTTP CONNECT connection in `http_connections` until the guard drops.
    pub(crate) fn http_connection(&self) -> GaugeGuard {
        GaugeGuard::new(self.http_connections.clone())
    }
    pub(crate) fn set_ready_backends(&self, strategy: &str, n: usize) {
        self.ready_backends.with_label_values(&[strategy]).set(n as f64);
        self.ready_backend_connections.set(n as f64);
    }
    pub(crate) fn set_pending_dials(&self, n: usize) {
        self.pending_dials.set(n as f64);
    }
    pub(crate) fn established(&self, delta: f64) {
        self.established.add(delta);
    }
    pub(crate) fn full_receive_channel(&self, method: &str, delta: f64) {
        self.full_receive_channels.with_label_values(&[method]).add(delta);
    }
    pub(crate) fn dial_failure(&self, reason: DialFailureReason) {
        self.dial_failures.with_label_values(&[reason.label()]).inc();
    }
    /// Counts a packet of PacketType number `packet_type` (`Packet::r#type`).
    pub(crate) fn packet(&self, segment: Segment, packet_type: i32) {
        self.stream_packets.inc(segment as usize, packet_type);
    }
    pub(crate) fn stream_error(&self, segment: Segment, code: tonic::Code, packet_type: &str) {
        self.stream_errors
            .with_label_values(&[segment.label(), konnectivity_proto::names::grpc_code_name(code), packet_type])
            .inc();
    }

    /// Current `established_connections`, for tests and the debug view.
    pub fn established_connections(&self) -> f64 {
        self.established.get()
    }
    /// Current `pending_backend_dials`.
    pub fn pending_backend_dials(&self) -> f64 {
        self.pending_dials.get()
    }
    /// `dial_failure_count` for a reason.
    pub fn dial_failures(&self, reason: DialFailureReason) -> u64 {
        self.dial_failures.with_label_values(&[reason.label()]).get()
    }
    /// `flow_control_waits_total`.
    pub fn flow_control_waits(&self) -> u64 {
        self.flow_control_waits.get()
    }
}

/// Holds a gauge one higher for as long as it lives (a stream or connection counted however it ends).
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
