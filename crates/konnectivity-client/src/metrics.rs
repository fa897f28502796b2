//! The client library's metrics, as the reference's konnectivity-client has them (kube-apiserver exports them):
//! `konnectivity_network_proxy_client_{dial_failure_total, client_connections, stream_packets_total,
//! stream_errors_total}`. They are process-wide, like the reference's, and counted whether or not a registry
//! exports them; call [`register`] to export them.

use konnectivity_proto::names::METRICS_NAMESPACE;
use konnectivity_proto::packet_counters::PacketCounters;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use std::sync::OnceLock;

const SUBSYSTEM: &str = "client";

pub(crate) struct ClientMetrics {
    pub(crate) dial_failures: IntCounterVec,
    pub(crate) connections: GaugeVec,
    stream_packets_vec: IntCounterVec,
    pub(crate) stream_packets: PacketCounters,
    pub(crate) stream_errors: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(METRICS_NAMESPACE).subsystem(SUBSYSTEM)
}

fn build() -> Result<ClientMetrics, prometheus::Error> {
    let stream_packets_vec = IntCounterVec::new(
        opts(
            "stream_packets_total",
            "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        ),
        &["segment", "packet_type"],
    )?;
    Ok(ClientMetrics {
        dial_failures: IntCounterVec::new(
            opts("dial_failure_total", "Number of dial failures observed, by reason (example: remote endpoint error)"),
            &["reason"],
        )?,
        connections: GaugeVec::new(
            opts("client_connections", "Number of open client connections, by status (Example: dialing)"),
            &["status"],
        )?,
        stream_packets: PacketCounters::new(stream_packets_vec.clone(), &["from_client", "to_client"]),
        stream_packets_vec,
        stream_errors: IntCounterVec::new(
            opts(
                "stream_errors_total",
                "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
            ),
            &["segment", "code", "packet_type"],
        )?,
    })
}

/// The process-wide metrics, if they could be created (they always can: the names are constants).
pub(crate) fn get() -> Option<&'static ClientMetrics> {
    static METRICS: OnceLock<Option<ClientMetrics>> = OnceLock::new();
    METRICS.get_or_init(|| build().ok()).as_ref()
}

/// Adds the client metrics to `registry` (as the reference's `RegisterMetrics`).
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = get().ok_or_else(|| prometheus::Error::Msg("client metrics unavailable".into()))?;
    registry.register(Box::new(m.dial_failures.clone()))?;
    registry.register(Box::new(m.connections.clone()))?;
    registry.register(Box::new(m.stream_packets_vec.clone()))?;
    registry.register(Box::new(m.stream_errors.clone()))?;
    Ok(())
}

/// Counts a packet sent to the server.
pub(crate) fn sent(packet_type: i32) {
    if let Some(m) = get() {
        m.stream_packets.inc(0, packet_type);
    }
}

/// Counts a packet received from the server.
pub(crate) fn received(packet_type: i32) {
    if let Some(m) = get() {
        m.stream_packets.inc(1, packet_type);
    }
}

/// Counts a failed dial.
pub(crate) fn dial_failed(reason: &str) {
    if let Some(m) = get() {
        m.dial_failures.with_label_values(&[reason]).inc();
    }
}

/// Keeps `client_connections{status}` up while alive.
pub(crate) struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    pub(crate) fn new(status: &'static str) -> Self {
        if let Some(m) = get() {
            m.connections.with_label_values(&[status]).inc();
        }
        Self(status)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        if let Some(m) = get() {
            m.connections.with_label_values(&[self.0]).dec();
        }
    }
}
