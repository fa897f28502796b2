//! The `process_*` metrics that client_golang's process collector exports (and so the reference's
//! `/metrics`), read from /proc at scrape time, and `tokio_alive_tasks`, our counterpart of Go's
//! `go_goroutines`: the tasks alive in the runtime that serves the scrape.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, Opts};

/// A collector of this process's CPU time, memory, descriptors and start time.
pub struct ProcessMetrics {
    cpu: prometheus::Counter,
    open_fds: Gauge,
    max_fds: Gauge,
    virtual_memory: Gauge,
    virtual_memory_max: Gauge,
    resident_memory: Gauge,
    start_time: Gauge,
    alive_tasks: Gauge,
    descs: Vec<Desc>,
}

impl ProcessMetrics {
    /// Creates the collector; register it with `Registry::register(Box::new(..))`.
    pub fn new() -> Result<Self, prometheus::Error> {
        let cpu = prometheus::Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))?;
        let open_fds = Gauge::with_opts(Opts::new("process_open_fds", "Number of open file descriptors."))?;
        let max_fds = Gauge::with_opts(Opts::new("process_max_fds", "Maximum number of open file descriptors."))?;
        let virtual_memory =
            Gauge::with_opts(Opts::new("process_virtual_memory_bytes", "Virtual memory size in bytes."))?;
        let virtual_memory_max = Gauge::with_opts(Opts::new(
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes.",
        ))?;
        let resident_memory =
            Gauge::with_opts(Opts::new("process_resident_memory_bytes", "Resident memory size in bytes."))?;
        let start_time = Gauge::with_opts(Opts::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        ))?;
        let alive_tasks = Gauge::with_opts(Opts::new(
            "tokio_alive_tasks",
            "Number of tasks alive in the async runtime serving this endpoint (konnectivity-rs; the Go reference's counterpart is go_goroutines).",
        ))?;
        let mut descs = Vec::new();
        for c in
            [&open_fds, &max_fds, &virtual_memory, &virtual_memory_max, &resident_memory, &start_time, &alive_tasks]
        {
            descs.extend(c.desc().into_iter().cloned());
        }
        descs.extend(cpu.desc().into_iter().cloned());
        let this = Self {
            cpu,
            open_fds,
            max_fds,
            virtual_memory,
            virtual_memory_max,
            resident_memory,
            start_time,
            alive_tasks,
            descs,
        };
        if let Some(start) = start_time_seconds() {
            this.start_time.set(start);
        }
        Ok(this)
    }
}

/// Clock ticks per second of /proc times (USER_HZ, 100 on every Linux architecture).
const TICKS: f64 = 100.0;
/// Page size for /proc/self/stat's rss (4 KiB on the platforms we build for).
const PAGE: f64 = 4096.0;

fn stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn start_time_seconds() -> Option<f64> {
    let fields = stat_fields()?;
    let start_ticks: f64 = fields.get(19)?.parse().ok()?;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    Some(btime + start_ticks / TICKS)
}

fn limit(name: &str) -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let soft = line[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" { Some(f64::from(u32::MAX) * f64::from(u32::MAX)) } else { soft.parse().ok() }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(f) = stat_fields() {
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // Fields after the command name: utime 11, stime 12, vsize 20, rss 21 (0-based).
            let cpu = (num(11) + num(12)) / TICKS;
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            self.virtual_memory.set(num(20));
            self.resident_memory.set(num(21) * PAGE);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as f64);
        }
        if let Some(v) = limit("Max open files") {
            self.max_fds.set(v);
        }
        if let Some(v) = limit("Max address space") {
            self.virtual_memory_max.set(v);
        }
        // The scrape is served by the process's runtime; a gather from outside any runtime omits the gauge.
        let in_runtime = tokio::runtime::Handle::try_current().ok();
        if let Some(handle) = &in_runtime {
            self.alive_tasks.set(handle.metrics().num_alive_tasks() as f64);
        }
        let mut out = Vec::new();
        if in_runtime.is_some() {
            out.extend(self.alive_tasks.collect());
        }
        for g in [
            &self.open_fds,
            &self.max_fds,
            &self.resident_memory,
            &self.start_time,
            &self.virtual_memory,
            &self.virtual_memory_max,
        ] {
            out.extend(g.collect());
        }
        out.extend(self.cpu.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(ProcessMetrics::new().expect("collector"))).expect("register");
        let families = registry.gather();
        let value = |name: &str| {
            families.iter().find(|f| f.name() == name).map(|f| {
                let m = &f.get_metric()[0];
                if f.get_field_type() == prometheus::proto::MetricType::GAUGE {
                    m.get_gauge().get_value()
                } else {
                    m.get_counter().get_value()
                }
            })
        };
        assert!(value("process_resident_memory_bytes").unwrap_or(0.0) > 1e6);
        assert!(value("process_open_fds").unwrap_or(0.0) >= 3.0);
        assert!(value("process_start_time_seconds").unwrap_or(0.0) > 1.6e9);
        assert!(value("process_max_fds").unwrap_or(0.0) >= 1024.0);
        assert!(value("process_cpu_seconds_total").is_some());
        assert_eq!(value("tokio_alive_tasks"), None, "no runtime here, so no task gauge");
    }

    #[tokio::test]
    async fn counts_the_runtime_tasks() {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(ProcessMetrics::new().expect("collector"))).expect("register");
        let alive = || {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == "tokio_alive_tasks")
                .map(|f| f.get_metric()[0].get_gauge().get_value())
        };
        let before = alive().expect("tokio_alive_tasks inside a runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(alive(), Some(before + 1.0));
        drop(tx);
        task.await.expect("task");
        assert_eq!(alive(), Some(before));
    }
}
