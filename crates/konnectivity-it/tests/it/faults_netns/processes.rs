//! Scenarios 4–5: the processes die (SIGKILL of either side, 50 agent restarts).

use super::fabric::{AgentKind, Fabric, Options, http_addr, report, require_fabric};
use super::traffic::*;
use konnectivity_client::Tunnel;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------------------
// 4. SIGKILL of the agent, then of the server, mid-transfer.

/// Frontends must see their transfers fail within this time of a SIGKILL (the kernel closes the dead process's
/// sockets, so the peer sees FIN or RST at once).
const KILL_FAIL_BOUND: Duration = Duration::from_secs(3);
/// The restarted agent (or the agent, to a restarted server) must be connected within this time.
const KILL_RECOVERY_BOUND: Duration = Duration::from_secs(8);

async fn sigkill(kind: AgentKind) -> anyhow::Result<()> {
    let tag = match kind {
        AgentKind::Ours => "sigkill",
        AgentKind::Go => "sigkill-go-agent",
    };
    let mut f = Fabric::start(tag, Options { agent: kind, ..Options::default() }).await?;
    let baseline = f.baseline().await?;

    // The agent dies.
    let downloads = [start_download(&f, ENDLESS).await?, start_download(&f, ENDLESS).await?];
    wait_progress(&downloads.iter().collect::<Vec<_>>(), 1 << 20, Duration::from_secs(10)).await?;
    f.kill_agent();
    let killed = Instant::now();
    for d in downloads {
        let (_, outcome) = ended_within(d, KILL_FAIL_BOUND).await?;
        report(
            tag,
            "transfer after agent SIGKILL",
            format!("failed after {:.2?}: {}", killed.elapsed(), describe(&outcome)),
        );
        // The error names the cause (with a Go agent, whose transfers have no flow control and so often wait
        // for room in the frontend's queue, it once blamed the frontend: "frontend did not read for 5s").
        let text = describe(&outcome);
        anyhow::ensure!(text.contains("disconnected"), "a transfer ended after the agent's death with {text}");
    }
    f.wait_backends(0, KILL_FAIL_BOUND).await?;
    f.assert_settled((baseline.0, usize::MAX / 2), FD_SLACK, SETTLE).await?;
    f.start_agent()?;
    let back = f.wait_backends(1, KILL_RECOVERY_BOUND).await?;
    report(tag, "restarted agent connected in", format!("{back:.2?}"));
    f.get_success(Duration::from_secs(5)).await?;
    let agent_fds = {
        f.assert_settled((baseline.0, usize::MAX / 2), FD_SLACK, SETTLE).await?;
        f.fds().1
    };

    // The server dies.
    let downloads = [start_download(&f, ENDLESS).await?, start_download(&f, ENDLESS).await?];
    wait_progress(&downloads.iter().collect::<Vec<_>>(), 1 << 20, Duration::from_secs(10)).await?;
    f.kill_server();
    let killed = Instant::now();
    for d in downloads {
        let (_, outcome) = ended_within(d, KILL_FAIL_BOUND).await?;
        report(
            tag,
            "transfer after server SIGKILL",
            format!("ended after {:.2?}: {}", killed.elapsed(), describe(&outcome)),
        );
        anyhow::ensure!(outcome.is_err(), "a transfer ended cleanly after the server's death");
    }
    if kind == AgentKind::Ours {
        // The agent closes what it had opened for the dead server's frontends.
        let deadline = Instant::now() + KILL_FAIL_BOUND;
        while f.agent_metric("konnectivity_network_proxy_agent_open_endpoint_connections").await? != 0.0 {
            anyhow::ensure!(Instant::now() < deadline, "agent kept endpoint connections of a dead server");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report(tag, "agent closed the dead server's endpoint connections after", format!("{:.2?}", killed.elapsed()));
    }
    f.start_server()?;
    let restarted = Instant::now();
    f.wait_server_up(Duration::from_secs(10)).await?;
    f.wait_backends(1, KILL_RECOVERY_BOUND).await?;
    report(tag, "agent back on the restarted server in", format!("{:.2?}", restarted.elapsed()));
    f.get_success(Duration::from_secs(5)).await?;
    if kind == AgentKind::Ours {
        // The restarted server's own baseline; the agent's must not have grown.
        let server_fds = konnectivity_it::steady(Duration::from_secs(2), || f.fds().0).await;
        f.assert_settled((server_fds, agent_fds), FD_SLACK, SETTLE).await?;
    } else {
        f.assert_settled((usize::MAX / 2, usize::MAX / 2), 0, SETTLE).await?;
    }
    f.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_agent_and_server_mid_transfer() {
    require_fabric();
    sigkill(AgentKind::Ours).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_go_agent() {
    require_fabric();
    sigkill(AgentKind::Go).await.unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// 5. The agent restarted 50 times (SIGTERM and SIGKILL in turn) under a light request loop.

const RESTARTS: usize = 50;
/// Each restarted agent must be connected within this time.
const RESTART_RECONNECT_BOUND: Duration = Duration::from_secs(8);
/// Every request of the loop must end within this time, successful or not.
const RESTART_REQUEST_BOUND: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_50_times_leaves_no_state_behind() {
    require_fabric();
    let tag = "restart-loop";
    let mut f = Fabric::start(tag, Options::default()).await.unwrap();
    let baseline = f.baseline().await.unwrap();
    let proxy = f.proxy();
    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, failed, hung) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let lp = {
        let (ok, failed, hung, stop) = (ok.clone(), failed.clone(), hung.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let host = http_addr();
                let r = tokio::time::timeout(RESTART_REQUEST_BOUND, async {
                    let t = Tunnel::connect_single_use(&proxy).await?;
                    let conn = t.dial(&host).await?;
                    let (status, _) = konnectivity_it::http::get(conn, &host, "/success").await?;
                    anyhow::ensure!(status == 200);
                    Ok::<_, anyhow::Error>(())
                })
                .await;
                match r {
                    Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(_)) => failed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => hung.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut reconnects = Vec::new();
    let mut server_fds_max = 0;
    let started = Instant::now();
    for i in 0..RESTARTS {
        let fab = &mut f;
        let agent = fab.agent.as_mut().expect("agent");
        if i % 2 == 0 {
            assert!(agent.stop(Duration::from_secs(10)), "agent did not exit on SIGTERM within 10 s");
        } else {
            agent.kill();
        }
        fab.agent = None;
        fab.wait_backends(0, Duration::from_secs(5)).await.unwrap();
        fab.start_agent().unwrap();
        reconnects.push(fab.wait_backends(1, RESTART_RECONNECT_BOUND).await.unwrap());
        // The server holds exactly one stream again, whatever became of the previous agent's.
        let peers = fab.agent_peers().await.unwrap();
        assert_eq!(peers.len(), 1, "after restart {i}: {peers:?}");
        server_fds_max = server_fds_max.max(fab.fds().0);
        // The scenario's pace: a moment of service between restarts.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    lp.await.unwrap();
    reconnects.sort();
    report(
        tag,
        "50 restarts",
        format!(
            "{elapsed:.1?}; reconnect p50 {:.0?}, max {:.0?}; requests ok {}, failed {}, hung {}; server fds max {} (baseline {})",
            percentile(&reconnects, 0.5),
            reconnects[reconnects.len() - 1],
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            hung.load(Ordering::Relaxed),
            server_fds_max,
            baseline.0
        ),
    );
    assert_eq!(hung.load(Ordering::Relaxed), 0, "requests hung past {RESTART_REQUEST_BOUND:?}");
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(server_fds_max <= baseline.0 + FD_SLACK + 4, "server fds grew to {server_fds_max}");
    f.assert_settled(baseline, FD_SLACK, SETTLE).await.unwrap();
    f.shutdown();
}
