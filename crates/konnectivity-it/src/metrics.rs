//! Reading a server's or agent's Prometheus registry, in-process.

use prometheus::Registry;
use prometheus::proto::Metric;

/// The samples of the metric family `name` (none when it is not registered or has no sample yet).
pub fn samples(registry: &Registry, name: &str) -> Vec<Metric> {
    registry.gather().into_iter().find(|f| f.name() == name).map(|f| f.get_metric().to_vec()).unwrap_or_default()
}

/// The sample of the metric family `name` that has a label whose value is `value`.
pub fn labelled(registry: &Registry, name: &str, value: &str) -> Option<Metric> {
    samples(registry, name).into_iter().find(|m| m.get_label().iter().any(|l| l.value() == value))
}
