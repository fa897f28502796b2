//! Draining: after the first stop signal the agent sends DRAIN to every server (each session does, see
//! `Session::serve`), opens no new server stream, keeps serving the connections it has, and stops by itself
//! once none is left, or when `--drain-timeout` passes, closing the rest with an error their frontends see.
//! Either way the server streams are then ended cleanly, so no queued byte is lost on exit.

use crate::handle::AgentHandle;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the drain checks whether connections are left.
const POLL: Duration = Duration::from_millis(50);
/// After closing what the timeout left, how long their CLOSE_RSPs may take to be queued.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long the servers may take to end the streams after the agent half-closed them.
const STREAM_END_GRACE: Duration = Duration::from_secs(10);

/// Waits for `drain`, lets the connections end (or closes them at `timeout`), ends the server streams, then
/// cancels `stop`. Returns early if `stop` fires first.
pub(crate) async fn drain_then_stop(
    handle: AgentHandle,
    drain: CancellationToken,
    timeout: Option<Duration>,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = stop.cancelled() => return,
    }
    let started = Instant::now();
    let timeout_text = timeout.map_or_else(|| "none".to_string(), konnectivity_process::flags::format_go_duration);
    tracing::info!(
        connections = handle.connections_in_progress(),
        drain_timeout = %timeout_text,
        "draining: DRAIN sent to every server, no new server streams; waiting for open connections to end"
    );
    let deadline = timeout.map(|t| started + t);
    loop {
        let left = handle.connections_in_progress();
        if left == 0 {
            tracing::info!("drained in {:?}: no connection left", started.elapsed());
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                connections = left,
                "--drain-timeout ({timeout_text}) passed with {left} connections open; closing them"
            );
            let reason = format!(
                "agent {} is stopping: its --drain-timeout ({timeout_text}) passed with this connection open",
                handle.agent_id
            );
            handle.close_all(&reason);
            let closing = Instant::now();
            while handle.connections_in_progress() > 0 && closing.elapsed() < CLOSE_GRACE {
                tokio::select! {
                    _ = tokio::time::sleep(POLL / 5) => {}
                    _ = stop.cancelled() => return,
                }
            }
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
    }
    // Deliver what is still queued for the servers, half-close, and give them a moment to close their side.
    handle.finish();
    let ending = Instant::now();
    while !handle.connected_servers().is_empty() && ending.elapsed() < STREAM_END_GRACE {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
    }
    tracing::info!("stopping after a drain of {:?}", started.elapsed());
    stop.cancel();
}
