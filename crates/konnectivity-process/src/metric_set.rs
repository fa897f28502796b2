//! Creating a component's Prometheus metrics: each one made with the component's namespace and subsystem and
//! registered in its registry in one call, so a metric's name, HELP text, labels and buckets sit in one place.

use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// A registry and the `namespace_subsystem_` prefix of the metrics made in it.
#[derive(Clone)]
pub struct MetricSet {
    registry: Registry,
    namespace: &'static str,
    subsystem: &'static str,
}

impl MetricSet {
    /// A fresh registry (one per server or agent, so several can run in one process) for
    /// `namespace_subsystem_*` metrics.
    pub fn new(namespace: &'static str, subsystem: &'static str) -> Self {
        Self { registry: Registry::new(), namespace, subsystem }
    }

    /// The registry, as `/metrics` encodes it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace(self.namespace).subsystem(self.subsystem)
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> prometheus::Result<M> {
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    /// A counter.
    pub fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::with_opts(self.opts(name, help))?)
    }

    /// A counter family with these labels.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(self.opts(name, help), labels)?)
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.register(Gauge::with_opts(self.opts(name, help))?)
    }

    /// A gauge family with these labels.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
        self.register(GaugeVec::new(self.opts(name, help), labels)?)
    }

    /// A histogram; `buckets` `None` means Prometheus' default buckets.
    pub fn histogram(&self, name: &str, help: &str, buckets: Option<&[f64]>) -> prometheus::Result<Histogram> {
        self.register(Histogram::with_opts(self.histogram_opts(name, help, buckets))?)
    }

    /// A histogram family with these labels.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: Option<&[f64]>,
        labels: &[&str],
    ) -> prometheus::Result<HistogramVec> {
        self.register(HistogramVec::new(self.histogram_opts(name, help, buckets), labels)?)
    }

    fn histogram_opts(&self, name: &str, help: &str, buckets: Option<&[f64]>) -> HistogramOpts {
        let opts = HistogramOpts::from(self.opts(name, help));
        match buckets {
            Some(b) => opts.buckets(b.to_vec()),
            None => opts,
        }
    }

    /// Registers a collector made elsewhere (the process metrics).
    pub fn collector(&self, collector: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_registered_once() {
        let set = MetricSet::new("ns", "sub");
        let c = set.counter("things_total", "Things.").expect("counter");
        c.inc();
        let h = set.histogram_vec("lat_seconds", "Latency.", Some(&[0.1, 1.0]), &["code"]).expect("histogram");
        h.with_label_values(&["200"]).observe(0.5);
        let names: Vec<String> = set.registry().gather().iter().map(|f| f.name().to_string()).collect();
        assert_eq!(names, ["ns_sub_lat_seconds", "ns_sub_things_total"]);
        assert!(set.counter("things_total", "Again.").is_err(), "a second registration of a name must fail");
    }
}
