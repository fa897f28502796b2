//! Counting proxy-servers from their Leases (`--count-server-leases`): every `--lease-poll-interval` the agent
//! lists the Leases matching the selector and counts those still valid (renew time, or acquire time, plus
//! duration, in the future). A failed list keeps the last good count, and the count is never below 1.

use crate::config::LeaseCountConfig;
use crate::metrics::AgentMetrics;
use konnectivity_kube::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// Lists leases until `stop`, storing the count of valid ones in `count` (0 until the first good list).
pub(crate) async fn run(
    client: Client,
    config: LeaseCountConfig,
    metrics: AgentMetrics,
    count: Arc<AtomicU32>,
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        let start = Instant::now();
        let result = client.list_leases(&config.namespace, &config.selector).await;
        let latency = start.elapsed().as_secs_f64();
        match result {
            Ok((200, leases)) => {
                metrics.lease_lists.with_label_values(&["200", ""]).inc();
                metrics.lease_list_latency.with_label_values(&["200"]).observe(latency);
                let now = SystemTime::now();
                let valid = leases.iter().filter(|l| !l.is_expired(now)).count();
                let valid = u32::try_from(valid).unwrap_or(u32::MAX);
                if valid == 0 {
                    tracing::warn!(namespace = %config.namespace, selector = %config.selector,
                        "no valid proxy-server lease; keeping the last count");
                } else {
                    let before = count.swap(valid, Ordering::Relaxed);
                    if before != valid {
                        tracing::info!(servers = valid, before, "proxy-server count from leases");
                        changed.notify_one();
                    }
                }
            }
            Ok((code, _)) => {
                let code = code.to_string();
                metrics.lease_lists.with_label_values(&[code.as_str(), "error"]).inc();
                metrics.lease_list_latency.with_label_values(&[code.as_str()]).observe(latency);
                tracing::warn!(code, namespace = %config.namespace, "listing proxy-server leases failed");
            }
            Err(e) => {
                metrics.lease_lists.with_label_values(&["0", "transport"]).inc();
                tracing::warn!(error = %e, "listing proxy-server leases failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(config.poll_interval) => {}
        }
    }
}

/// The server count the agent aims for, from the servers' announced count and the lease count (0: unknown).
pub(crate) fn effective_count(config: Option<&LeaseCountConfig>, announced: u32, leases: u32) -> u32 {
    let count = match config {
        None => announced,
        Some(_) if leases == 0 => announced,
        Some(c) if c.source_max => leases.max(announced),
        Some(_) => leases,
    };
    count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_combine_as_the_reference() {
        let mut c = LeaseCountConfig {
            kubeconfig: None,
            namespace: "kube-system".into(),
            selector: "k8s-app=konnectivity-server".into(),
            source_max: false,
            poll_interval: Duration::from_secs(5),
        };
        assert_eq!(effective_count(None, 3, 5), 3);
        assert_eq!(effective_count(Some(&c), 3, 5), 5, "leases alone");
        assert_eq!(effective_count(Some(&c), 3, 2), 2);
        assert_eq!(effective_count(Some(&c), 3, 0), 3, "no good list yet: the announced count");
        c.source_max = true;
        assert_eq!(effective_count(Some(&c), 3, 2), 3);
        assert_eq!(effective_count(Some(&c), 3, 5), 5);
        assert_eq!(effective_count(None, 0, 0), 1);
    }
}
