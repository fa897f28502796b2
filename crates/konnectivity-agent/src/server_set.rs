//! The set of proxy-servers the agent holds streams to, kept by one loop (the reference's ClientSet "sync").
//!
//! The agent has one or more configured addresses (`--proxy-server-addresses`, or `--proxy-server-host:port`).
//! Each is a server or a load balancer in front of several. The loop keeps one [`Session`] per distinct server
//! ID. The goal is:
//!
//! 1. **Every address reaches a server whose stream is open.** An address without one is dialed, and redialed
//!    after errors with jittered exponential backoff (from `--sync-interval`, factor 1.5, up to
//!    `--sync-interval-cap`). Addresses are dialed concurrently, so an address that hangs holds up no other.
//!    If an address answers with a server the agent already holds a stream to (two addresses for one server),
//!    the new stream is closed and the address counts as reaching that server: one server counts once.
//! 2. **At least `servercount` distinct servers.** Once every address is served, and while fewer distinct
//!    servers are connected than the servers announce (the `servercount` header of the latest new server, at
//!    least 1), or always with `--sync-forever`, the addresses are dialed again every `--sync-interval`: a load
//!    balancer may lead to a server not seen yet. With one address this is exactly the reference's behaviour.
//!
//! Draining (or finishing) stops all dialing; a stream that opens meanwhile is closed at once.

use crate::config::AgentConfig;
use crate::dialer::{Dialer, Opened, Target};
use crate::error::AgentError;
use crate::handle::{AddressStatus, AgentHandle};
use crate::session::Session;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

impl Slot {
    /// A dial to this address failed: the error is kept for `/debug/connections`, and the next dial backs off
    /// (by half again each time, up to `cap`), unless the agent is draining. A server too busy to authenticate
    /// us now says when to come back (the gRPC retry pushback of an `Unavailable` status): then that delay is
    /// used instead (within `cap`), spread by up to half again, so that the agents it refused together do not
    /// all come back at the same instant; the backoff does not grow, as the server is up and answering.
    /// Otherwise `Unavailable` is spread that widely too: it is what a server under a reconnect storm answers.
    fn failed(&mut self, e: &AgentError, draining: bool, cap: Duration) {
        let (delay, grow) = match (retry_pushback(e), e) {
            (Some(after), _) => (jitter(after.clamp(MIN_PUSHBACK, cap.max(MIN_PUSHBACK)), 0.5), false),
            (None, AgentError::Stream { status, .. }) if status.code() == tonic::Code::Unavailable => {
                (jitter(self.backoff, 0.5), true)
            }
            (None, _) => (jitter(self.backoff, 0.1), true),
        };
        if draining {
            tracing::info!(address = %self.target.address, "{e} (draining: not retried)");
        } else {
            tracing::warn!(address = %self.target.address, "{e}; retrying in about {delay:?}");
        }
        self.last_error = Some(e.to_string());
        self.next_dial = Instant::now() + delay;
        if grow {
            self.backoff = self.backoff.mul_f64(1.5).min(cap);
        }
    }
}

/// The shortest retry delay a server's pushback can ask for (a server saying "now" is not retried in a loop).
const MIN_PUSHBACK: Duration = Duration::from_millis(100);

/// The delay a server asked for with an `Unavailable` refusal, if it did.
fn retry_pushback(e: &AgentError) -> Option<Duration> {
    let AgentError::Stream { status, .. } = e else { return None };
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let value = status.metadata().get(konnectivity_proto::names::RETRY_PUSHBACK_MS)?;
    value.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_millis)
}

/// What the loop knows about one address.
struct Slot {
    target: Target,
    /// Servers reached through this address (opened here, or found already connected) with an open stream.
    reached: Vec<String>,
    /// The next delay after an error.
    backoff: Duration,
    /// Not dialed before this.
    next_dial: Instant,
    dialing: bool,
    last_error: Option<String>,
}

fn jitter(d: Duration, factor: f64) -> Duration {
    d.mul_f64(1.0 + rand::rng().random_range(0.0..factor))
}

/// Keeps the agent's server streams until `shutdown`.
pub(crate) async fn sync_loop(
    dialer: Arc<Dialer>,
    targets: Vec<Target>,
    handle: AgentHandle,
    drain: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let config = dialer.config.clone();
    let metrics = handle.metrics().clone();
    let now = Instant::now();
    let mut slots: Vec<Slot> = targets
        .into_iter()
        .map(|target| Slot {
            target,
            reached: Vec::new(),
            backoff: config.sync_interval,
            next_dial: now,
            dialing: false,
            last_error: None,
        })
        .collect();
    let mut server_count: u32 = 1;
    let mut short_of_count_logged = false;
    let mut in_flight = FuturesUnordered::new();
    loop {
        let now = Instant::now();
        let stopping = drain.is_cancelled() || handle.finish.is_cancelled();
        let mut wake = now + jitter(config.sync_interval, 0.1);
        if !stopping {
            let live: HashSet<String> = handle.sessions.lock().keys().cloned().collect();
            for slot in &mut slots {
                slot.reached.retain(|id| live.contains(id));
            }
            let every_address_served = slots.iter().all(|s| !s.reached.is_empty());
            let target_count = crate::lease_counter::effective_count(
                config.lease_count.as_ref(),
                server_count,
                handle.lease_count.load(std::sync::atomic::Ordering::Relaxed),
            );
            let short_of_count = (live.len() as u64) < u64::from(target_count);
            if every_address_served && short_of_count && slots.len() > 1 && !short_of_count_logged {
                tracing::info!(
                    connected = live.len(),
                    server_count = target_count,
                    addresses = slots.len(),
                    "every proxy-server address is connected, but the servers announce more servers; dialing the \
                     addresses again every --sync-interval to find them (they may be load balancers)"
                );
            }
            short_of_count_logged = every_address_served && short_of_count;
            let explore = every_address_served && (config.sync_forever || short_of_count);
            for (index, slot) in slots.iter_mut().enumerate() {
                if slot.dialing || !(slot.reached.is_empty() || explore) {
                    continue;
                }
                if slot.next_dial > now {
                    wake = wake.min(slot.next_dial);
                    continue;
                }
                slot.dialing = true;
                let dialer = dialer.clone();
                let target = slot.target.clone();
                in_flight.push(async move { (index, dialer.open(&target).await) });
            }
        }
        metrics.known_server_count.set(f64::from(crate::lease_counter::effective_count(
            config.lease_count.as_ref(),
            server_count,
            handle.lease_count.load(std::sync::atomic::Ordering::Relaxed),
        )));
        publish(&handle, &slots);

        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some((index, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let slot = &mut slots[index];
                slot.dialing = false;
                let now = Instant::now();
                match result {
                    Ok(opened) => {
                        slot.backoff = config.sync_interval;
                        slot.last_error = None;
                        slot.next_dial = now + jitter(config.sync_interval, 0.1);
                        if drain.is_cancelled() || handle.finish.is_cancelled() {
                            tracing::info!(address = %slot.target.address, "draining; closing the stream just opened");
                            continue;
                        }
                        if let Some(count) = adopt(opened, slot, &config, &handle, &drain, &shutdown, &tracker) {
                            server_count = count;
                        }
                    }
                    Err(e) => {
                        metrics.server_connection_failures.with_label_values(&["to_server"]).inc();
                        metrics.server_dials.with_label_values(&["error"]).inc();
                        slot.failed(&e, drain.is_cancelled() || handle.finish.is_cancelled(), config.sync_interval_cap);
                    }
                }
            }
            _ = handle.session_ended.notified() => {}
            _ = drain.cancelled(), if !stopping => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Takes a newly opened stream: starts a session if its server is new (returning the `servercount` it
/// announced), or closes it if the agent already holds a stream to that server. Either way the address now
/// counts as reaching that server.
fn adopt(
    opened: Opened,
    slot: &mut Slot,
    config: &AgentConfig,
    handle: &AgentHandle,
    drain: &CancellationToken,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<u32> {
    let metrics = handle.metrics();
    let address = slot.target.address.to_string();
    let server_id = opened.server_id.clone();
    let mut sessions = handle.sessions.lock();
    if let Some(existing) = sessions.get(&server_id) {
        metrics.server_dials.with_label_values(&["duplicate"]).inc();
        if existing.address == address || slot.reached.contains(&server_id) {
            // The reference's case: a load balancer led to a server already connected.
            tracing::debug!(%address, %server_id, "already connected to this server; closing the duplicate");
        } else {
            tracing::info!(
                %address,
                %server_id,
                connected_through = %existing.address,
                "this address reaches a server already connected through another address; closing the new \
                 stream (the server counts once)"
            );
        }
        if !slot.reached.contains(&server_id) {
            slot.reached.push(server_id);
        }
        return None;
    }
    let session = Session::new(
        server_id.clone(),
        address.clone(),
        opened.outbound,
        shutdown.child_token(),
        metrics.clone(),
        config,
        opened.flow_control,
        handle.dials_received.clone(),
        tracker.clone(),
    );
    sessions.insert(server_id.clone(), session.clone());
    metrics.open_server_connections.set(sessions.len() as f64);
    metrics.server_dials.with_label_values(&["new_server"]).inc();
    let server_count = opened.server_count.max(1);
    tracing::info!(%address, %server_id, server_count, flow_control = opened.flow_control, "connected to proxy-server");
    slot.reached.push(server_id.clone());

    let sessions = handle.sessions.clone();
    let ended = handle.session_ended.clone();
    let metrics = metrics.clone();
    let drain = drain.clone();
    let finish = handle.finish.clone();
    let span = tracing::info_span!("server", server_id = %server_id, address = %address);
    tracker.spawn(
        async move {
            session.serve(opened.inbound, drain, finish).await;
            let mut sessions = sessions.lock();
            sessions.remove(&server_id);
            metrics.open_server_connections.set(sessions.len() as f64);
            drop(sessions);
            ended.notify_one();
        }
        .instrument(span),
    );
    Some(server_count)
}

/// Publishes each address's state for [`AgentHandle::addresses`] and `/debug/connections`.
fn publish(handle: &AgentHandle, slots: &[Slot]) {
    let statuses = slots
        .iter()
        .map(|s| AddressStatus {
            address: s.target.address.to_string(),
            servers: s.reached.clone(),
            dialing: s.dialing,
            last_error: s.last_error.clone(),
        })
        .collect();
    *handle.addresses.lock() = statuses;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: tonic::Code, pushback: Option<&str>) -> AgentError {
        let mut md = tonic::metadata::MetadataMap::new();
        if let Some(ms) = pushback {
            md.insert(konnectivity_proto::names::RETRY_PUSHBACK_MS, ms.parse().expect("ascii"));
        }
        AgentError::Stream { addr: "server:8091".into(), status: tonic::Status::with_metadata(code, "busy", md) }
    }

    #[test]
    fn a_server_s_retry_pushback_is_honoured_only_on_unavailable() {
        use tonic::Code::{Unauthenticated, Unavailable};
        assert_eq!(retry_pushback(&refused(Unavailable, Some("1500"))), Some(Duration::from_millis(1500)));
        assert_eq!(retry_pushback(&refused(Unavailable, Some("soon"))), None);
        assert_eq!(retry_pushback(&refused(Unavailable, None)), None);
        assert_eq!(retry_pushback(&refused(Unauthenticated, Some("1500"))), None);
    }
}
