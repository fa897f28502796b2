//! Plain-HTTP probes of loopback ports inside a network namespace: a GET, and a Prometheus metric's value.

use crate::netns::NetNs;
use anyhow::{Context, bail};
use bytes::Bytes;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// `GET path` over plain HTTP on a loopback port inside `ns`.
pub async fn plain_get(ns: &NetNs, port: u16, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let tcp = ns.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(2)).await?;
    tokio::time::timeout(Duration::from_secs(5), crate::http::get(tcp, "127.0.0.1", path)).await?
}

/// Sum of all samples of metric `name` on a loopback admin port inside `ns`. `name` may carry one label
/// matcher, as in `foo_total{result="ok"}`: then only samples with that label are summed.
pub async fn metric(ns: &NetNs, port: u16, name: &str) -> anyhow::Result<f64> {
    let (name, label) = match name.split_once('{') {
        Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
        None => (name, None),
    };
    let (status, body) = plain_get(ns, port, "/metrics").await?;
    if status != 200 {
        bail!("GET /metrics on {port}: {status}");
    }
    let text = String::from_utf8_lossy(&body);
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(label) = label
            && !rest.split(' ').next().unwrap_or_default().contains(label)
        {
            continue;
        }
        let value = rest.rsplit(' ').next().unwrap_or_default().parse::<f64>()?;
        *sum.get_or_insert(0.0) += value;
    }
    sum.with_context(|| format!("metric {name} not exported on port {port}"))
}
