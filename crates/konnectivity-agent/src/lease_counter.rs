//! Counting proxy-servers from their Leases (`--count-server-leases`): the agent LISTs the Leases matching the
//! selector once and then WATCHes them (konnectivity_kube::watch, as the reference's informer does), so at steady
//! state it holds one long-lived request on kube-apiserver and sends no periodic LIST. The count of valid leases
//! (renew time, or acquire time, plus duration, in the future) is taken from that cache on every change and every
//! `--lease-poll-interval`, since a lease expires without any event. Until the first good LIST, and whenever no
//! valid lease is left, the last good count stays; the count is never below 1.

use crate::config::LeaseCountConfig;
use crate::metrics::AgentMetrics;
use konnectivity_kube::Client;
use konnectivity_kube::watch::{LeaseReflector, LeaseSnapshot, Observation};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// Watches leases until `stop`, storing the count of valid ones in `count` (0 until the first good list).
pub(crate) async fn run(
    client: Client,
    config: LeaseCountConfig,
    metrics: AgentMetrics,
    count: Arc<AtomicU32>,
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let (reflector, mut snapshots) = LeaseReflector::new(client, &config.namespace, &config.selector);
    let observe = {
        let metrics = metrics.clone();
        move |o: Observation| observe(&metrics, o)
    };
    let reflecting = reflector.run(observe, stop.clone().cancelled_owned());
    let counting = async {
        let mut tick = tokio::time::interval(config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listed = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = snapshots.changed() => {
                    if r.is_err() {
                        return;
                    }
                    listed = true;
                }
            }
            if listed {
                let snapshot = snapshots.borrow_and_update().clone();
                recount(&config, &snapshot, &count, &changed);
            }
        }
    };
    tokio::select! {
        _ = reflecting => {}
        _ = counting => {}
        _ = stop.cancelled() => {}
    }
}

fn recount(config: &LeaseCountConfig, leases: &LeaseSnapshot, count: &AtomicU32, changed: &tokio::sync::Notify) {
    let now = SystemTime::now();
    let valid = leases.values().filter(|l| !l.is_expired(now)).count();
    let valid = u32::try_from(valid).unwrap_or(u32::MAX);
    if valid == 0 {
        if count.load(Ordering::Relaxed) != 0 {
            tracing::warn!(namespace = %config.namespace, selector = %config.selector,
                "no valid proxy-server lease; keeping the last count");
        }
        return;
    }
    let before = count.swap(valid, Ordering::Relaxed);
    if before != valid {
        tracing::info!(servers = valid, before, "proxy-server count from leases");
        changed.notify_one();
    }
}

/// Counts the reflector's calls in the reference's lease metrics, and logs failures.
fn observe(metrics: &AgentMetrics, o: Observation) {
    match o {
        Observation::Listed { status, latency } => {
            let code = status.to_string();
            let reason = if status == 200 { "" } else { "error" };
            metrics.lease_lists.with_label_values(&[code.as_str(), reason]).inc();
            metrics.lease_list_latency.with_label_values(&[code.as_str()]).observe(latency.as_secs_f64());
            if status != 200 {
                tracing::warn!(code, "listing proxy-server leases failed");
            }
        }
        Observation::Watched { status } => {
            let code = status.to_string();
            let reason = if status == 200 { "" } else { "error" };
            metrics.lease_watches.with_label_values(&[code.as_str(), reason]).inc();
            if status != 200 && status != 410 {
                tracing::warn!(code, "watching proxy-server leases failed");
            }
        }
        Observation::Failed(e) => {
            metrics.lease_lists.with_label_values(&["0", "transport"]).inc();
            tracing::warn!(error = %e, "listing or watching proxy-server leases failed");
        }
        Observation::WatchEnded { gone, reason } => {
            tracing::debug!(gone, %reason, "proxy-server lease watch ended");
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
