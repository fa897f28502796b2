//! The lease controller (`--enable-lease-controller`): this server holds the Lease
//! `konnectivity-proxy-server-<server-id>` (renewed every `renew_interval`, valid for `duration`) so that agents
//! counting leases know how many servers there are, and every `gc_interval` it deletes expired leases with the
//! same labels (a server that died without cleaning up). At stop it deletes its own lease.

use crate::config::LeaseConfig;
use crate::metrics::ServerMetrics;
use konnectivity_kube::lease::{Lease, micro_time};
use konnectivity_kube::{Client, KubeError};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// The name of a server's lease.
pub fn lease_name(server_id: &str) -> String {
    format!("konnectivity-proxy-server-{server_id}")
}

/// `k=v,k=v` for a label map.
pub(crate) fn selector(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub(crate) struct LeaseController {
    client: Client,
    config: LeaseConfig,
    name: String,
    holder: String,
    metrics: ServerMetrics,
}

impl LeaseController {
    pub(crate) fn new(client: Client, config: LeaseConfig, server_id: &str, metrics: ServerMetrics) -> Self {
        Self { client, config, name: lease_name(server_id), holder: server_id.to_string(), metrics }
    }

    /// Holds and renews the lease and collects expired ones until `stop`, then deletes the lease.
    pub(crate) async fn run(self, stop: CancellationToken) {
        tracing::info!(lease = %self.name, namespace = %self.config.namespace, "lease controller started");
        let mut next_renew = Instant::now();
        let mut next_gc = Instant::now() + self.config.gc_interval;
        let mut failures = 0u32;
        loop {
            let wake = next_renew.min(next_gc);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if now >= next_renew {
                match self.renew().await {
                    Ok(()) => {
                        failures = 0;
                        next_renew = now + self.config.renew_interval;
                    }
                    Err(e) => {
                        failures += 1;
                        // Retry sooner than the renew interval, backing off, so a short API outage does not let
                        // the lease expire.
                        let retry =
                            Duration::from_millis(200 * 2u64.pow(failures.min(6))).min(self.config.renew_interval);
                        tracing::warn!(lease = %self.name, error = %e, ?retry, "could not renew the server lease");
                        next_renew = now + retry;
                    }
                }
            }
            if now >= next_gc {
                self.collect_garbage().await;
                next_gc = now + self.config.gc_interval;
            }
        }
        tracing::info!(lease = %self.name, "cleaning up the server lease");
        match self.client.delete_lease(&self.config.namespace, &self.name, None).await {
            Ok(200 | 202 | 404) => {}
            Ok(code) => tracing::error!(lease = %self.name, code, "could not delete the server lease"),
            Err(e) => tracing::error!(lease = %self.name, error = %e, "could not delete the server lease"),
        }
    }

    /// Creates the lease, or takes it over and renews it.
    async fn renew(&self) -> Result<(), KubeError> {
        let ns = &self.config.namespace;
        let now = micro_time(SystemTime::now());
        let duration = i64::try_from(self.config.duration.as_secs()).unwrap_or(i64::MAX);
        match self.client.get_lease(ns, &self.name).await? {
            None => {
                let mut lease = Lease::default();
                lease.metadata.name = self.name.clone();
                lease.metadata.labels = self.config.labels.clone();
                lease.spec.holder_identity = Some(self.holder.clone());
                lease.spec.lease_duration_seconds = Some(duration);
                lease.spec.acquire_time = Some(now.clone());
                lease.spec.renew_time = Some(now);
                self.client.create_lease(ns, &lease).await?;
                tracing::info!(lease = %self.name, "server lease created");
            }
            Some(mut lease) => {
                if lease.spec.holder_identity.as_deref() != Some(&self.holder) {
                    lease.spec.acquire_time = Some(now.clone());
                }
                lease.metadata.labels = self.config.labels.clone();
                lease.spec.holder_identity = Some(self.holder.clone());
                lease.spec.lease_duration_seconds = Some(duration);
                lease.spec.renew_time = Some(now);
                self.client.replace_lease(ns, &lease).await?;
            }
        }
        Ok(())
    }

    /// Deletes expired leases with our labels (only if unchanged since listed: a renewed one survives).
    async fn collect_garbage(&self) {
        let ns = &self.config.namespace;
        let start = Instant::now();
        let listed = self.client.list_leases(ns, &selector(&self.config.labels)).await;
        let latency = start.elapsed().as_secs_f64();
        let leases = match listed {
            Ok((200, leases)) => {
                self.metrics.lease_list_total.with_label_values(&["200", ""]).inc();
                self.metrics.lease_list_latency.with_label_values(&["200"]).observe(latency);
                leases
            }
            Ok((code, _)) => {
                let code = code.to_string();
                tracing::error!(code, "could not list leases to garbage collect");
                self.metrics.lease_list_total.with_label_values(&[code.as_str(), reason(&code)]).inc();
                self.metrics.lease_list_latency.with_label_values(&[code.as_str()]).observe(latency);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not list leases to garbage collect");
                return;
            }
        };
        let now = SystemTime::now();
        for lease in leases.iter().filter(|l| l.is_expired(now)) {
            let name = &lease.metadata.name;
            let start = Instant::now();
            let result = self.client.delete_lease(ns, name, lease.metadata.resource_version.as_deref()).await;
            let latency = start.elapsed().as_secs_f64();
            match result {
                Ok(code) => {
                    if code == 200 || code == 202 {
                        self.metrics.culled_leases.inc();
                        tracing::info!(lease = %name, "expired lease collected");
                    } else if code == 404 {
                        tracing::debug!(lease = %name, "expired lease was already deleted");
                    } else {
                        tracing::error!(lease = %name, code, "could not delete an expired lease");
                    }
                    let code = if code == 202 { "200".to_string() } else { code.to_string() };
                    let r = if code == "200" { "" } else { reason(&code) };
                    self.metrics.lease_delete_total.with_label_values(&[code.as_str(), r]).inc();
                    self.metrics.lease_delete_latency.with_label_values(&[code.as_str()]).observe(latency);
                }
                Err(e) => tracing::error!(lease = %name, error = %e, "could not delete an expired lease"),
            }
        }
    }
}

/// The Kubernetes Status reason for common codes (the reference labels its metrics with it).
fn reason(code: &str) -> &'static str {
    match code {
        "400" => "BadRequest",
        "401" => "Unauthorized",
        "403" => "Forbidden",
        "404" => "NotFound",
        "409" => "Conflict",
        "410" => "Expired",
        "422" => "Invalid",
        "429" => "TooManyRequests",
        "500" => "InternalError",
        "503" => "ServiceUnavailable",
        "504" => "Timeout",
        _ => "Unknown",
    }
}
