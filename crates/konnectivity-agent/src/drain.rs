//! Draining: after the first stop signal the agent sends DRAIN to every server (each session does, see
//! `Session::serve`), opens no new server stream, keeps serving the connections it has and the dials servers
//! still send it (a server does when it has no other agent), and stops by itself once it has carried nothing
//! for `--drain-idle-period`, or when `--drain-timeout` passes, closing the rest with an error their
//! frontends see. Either way the server streams are then ended cleanly, DRAIN first, so no queued byte is
//! lost on exit.

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

/// How long a drain may last, and how long it must have been idle to end early.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainTiming {
    /// `--drain-timeout`: the hard end of the drain (`None`: no limit).
    pub(crate) timeout: Option<Duration>,
    /// `--drain-idle-period`: no dial and no connection for this long ends the drain.
    pub(crate) idle_period: Duration,
}

/// Why the wait for the connections to end stopped.
enum Waited {
    /// Nothing was open for the idle period.
    Idle,
    /// Nothing was open and no server stream was left, so no dial could come (none is opened while draining).
    NoServer,
    /// The drain timeout passed with this many dials and connections open.
    TimedOut(usize),
    /// The agent was stopped meanwhile.
    Stopped,
}

/// Waits for `drain`, then for the agent to be idle for `timing.idle_period` (or closes what is open at
/// `timing.timeout`), ends the server streams, then cancels `stop`. Returns early if `stop` fires first.
pub(crate) async fn drain_then_stop(
    handle: AgentHandle,
    drain: CancellationToken,
    timing: DrainTiming,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = stop.cancelled() => return,
    }
    let started = Instant::now();
    let timeout_text =
        timing.timeout.map_or_else(|| "none".to_string(), konnectivity_process::flags::format_go_duration);
    tracing::info!(
        connections = handle.connections_in_progress(),
        drain_timeout = %timeout_text,
        drain_idle_period = %konnectivity_process::flags::format_go_duration(timing.idle_period),
        "draining: DRAIN sent to every server, no new server streams; still serving open connections and new \
         dials until idle for --drain-idle-period"
    );
    let deadline = timing.timeout.map(|t| started + t);
    match wait_until_idle(&handle, timing.idle_period, deadline, &stop).await {
        Waited::Stopped => return,
        Waited::Idle => tracing::info!("drained in {:?}: nothing open for {:?}", started.elapsed(), timing.idle_period),
        Waited::NoServer => {
            tracing::info!("drained in {:?}: nothing open and no server stream left", started.elapsed())
        }
        Waited::TimedOut(0) => tracing::info!("--drain-timeout ({timeout_text}) passed with nothing open"),
        Waited::TimedOut(left) => {
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
        }
    }
    // Each session queues its DRAIN if it has not yet, delivers what is still queued, half-closes; the servers
    // then close their side.
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

/// Polls until no dial or connection has been open for `idle_period`, or `deadline` passes, or `stop` fires.
/// A dial that came and went between two polls still counts: the count of DIAL_REQs received moved.
async fn wait_until_idle(
    handle: &AgentHandle,
    idle_period: Duration,
    deadline: Option<Instant>,
    stop: &CancellationToken,
) -> Waited {
    let mut dials_seen = handle.dials_received();
    let mut idle_since = Instant::now();
    loop {
        let now = Instant::now();
        let open = handle.connections_in_progress();
        let dials = handle.dials_received();
        if open > 0 || dials != dials_seen {
            dials_seen = dials;
            idle_since = now;
        } else if now.duration_since(idle_since) >= idle_period {
            return Waited::Idle;
        } else if handle.connected_servers().is_empty() {
            return Waited::NoServer;
        }
        if deadline.is_some_and(|d| now >= d) {
            return Waited::TimedOut(open);
        }
        let mut wake = now + POLL;
        if open == 0 {
            wake = wake.min(idle_since + idle_period);
        }
        if let Some(d) = deadline {
            wake = wake.min(d);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.cancelled() => return Waited::Stopped,
        }
    }
}
