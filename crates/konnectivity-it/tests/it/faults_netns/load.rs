//! Scenarios 6–8: load and misbehaving peers (a dial storm, stalled readers, frontends that vanish mid-dial).

use super::fabric::{
    BLACKHOLE_IP, Fabric, Options, SLOW_PORT, STALLED_PORT, TARGET_IP, blackhole_addr, echo_addr, http_addr,
    refused_addr, report, require_fabric,
};
use super::traffic::*;
use konnectivity_client::Tunnel;
use konnectivity_it::controlplane::workspace_bin;
use konnectivity_it::targets::pattern_sha256;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// 6. A dial storm: 10 000 dials, 200 at a time, to good, refused and blackholed targets.

const STORM_DIALS: usize = 10_000;
const STORM_CONCURRENCY: usize = 200;
/// The server's --backend-dial-timeout in this scenario.
const STORM_DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Every dial must end (connected or with an error) within this time.
const STORM_DIAL_BOUND: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Outcomes {
    ok: AtomicUsize,
    refused: AtomicUsize,
    timeout: AtomicUsize,
    other_error: AtomicUsize,
    hung: AtomicUsize,
    latencies: std::sync::Mutex<[Vec<Duration>; 3]>,
    errors: std::sync::Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_storm_every_dial_ends_and_nothing_is_left() {
    require_fabric();
    let tag = "dial-storm";
    let options = Options {
        server_args: vec![format!("--backend-dial-timeout={}s", STORM_DIAL_TIMEOUT.as_secs()), "--v=1".into()],
        ..Options::default()
    };
    let mut f = Fabric::start(tag, options).await.unwrap();
    let baseline = f.baseline().await.unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..STORM_CONCURRENCY {
        let (proxy, outcomes, next) = (f.proxy(), outcomes.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let tunnel = Tunnel::connect(&proxy).await.expect("tunnel");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= STORM_DIALS {
                    return;
                }
                // 70% good, 15% refused, 15% blackholed.
                let class = match i % 20 {
                    0..=13 => 0,
                    14..=16 => 1,
                    _ => 2,
                };
                let target = [echo_addr(), refused_addr(), blackhole_addr()][class].clone();
                let t0 = Instant::now();
                let r = tokio::time::timeout(STORM_DIAL_BOUND, async {
                    let mut conn = tunnel.dial(&target).await?;
                    echo_roundtrip(&mut conn, Duration::from_secs(5)).await.map_err(|e| {
                        konnectivity_client::DialError {
                            reason: konnectivity_client::DialFailureReason::Unknown,
                            message: format!("echo: {e}"),
                        }
                    })?;
                    Ok::<_, konnectivity_client::DialError>(())
                })
                .await;
                outcomes.latencies.lock().unwrap()[class].push(t0.elapsed());
                match r {
                    Ok(Ok(())) => outcomes.ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(e)) if e.message.contains("connection refused") => {
                        outcomes.refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(Err(e)) if e.message.contains("timeout") || e.message.contains("timed out") => {
                        outcomes.timeout.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(Err(e)) => {
                        outcomes.errors.lock().unwrap().push(format!("{target}: {e}"));
                        outcomes.other_error.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => outcomes.hung.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let took = started.elapsed();
    let o = &outcomes;
    let lat = o.latencies.lock().unwrap().clone();
    let show = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        format!("p50 {:.0?} p99 {:.0?} max {:.0?}", percentile(&v, 0.5), percentile(&v, 0.99), percentile(&v, 1.0))
    };
    report(
        tag,
        "10000 dials",
        format!(
            "{took:.1?}; ok {}, refused {}, timeout {}, other error {}, hung {}; latency good {} / refused {} / blackholed {}",
            o.ok.load(Ordering::Relaxed),
            o.refused.load(Ordering::Relaxed),
            o.timeout.load(Ordering::Relaxed),
            o.other_error.load(Ordering::Relaxed),
            o.hung.load(Ordering::Relaxed),
            show(&lat[0]),
            show(&lat[1]),
            show(&lat[2]),
        ),
    );
    let errors = o.errors.lock().unwrap().clone();
    assert_eq!(o.hung.load(Ordering::Relaxed), 0, "dials hung past {STORM_DIAL_BOUND:?}");
    assert_eq!(o.refused.load(Ordering::Relaxed), STORM_DIALS * 3 / 20, "refused dials");
    assert_eq!(o.timeout.load(Ordering::Relaxed), STORM_DIALS * 3 / 20, "blackholed dials; other errors: {errors:?}");
    assert_eq!(
        o.ok.load(Ordering::Relaxed),
        STORM_DIALS * 14 / 20,
        "good dials; errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    f.assert_settled(baseline, FD_SLACK, SETTLE).await.unwrap();
    f.shutdown();
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Slow and stalled readers at both ends beside a normal transfer.

/// RSS growth either process may show while the stalled connections sit (each is bounded by a 4 MiB window
/// per direction).
const STALL_RSS_BOUND: u64 = 96 << 20;
/// After the stalled connections' frontends go away, everything must be gone within this: an upload stuck
/// behind a target that never reads cannot carry its close in-band, so the client library closes its tunnel by
/// force after its close timeout (10 s), and the agent cuts the endpoint off after its stall limit (5 s).
const STALL_SETTLE: Duration = Duration::from_secs(25);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_slow_readers_block_no_one_and_leave_nothing() {
    require_fabric();
    let tag = "stalled-readers";
    let mut f = Fabric::start(tag, Options::default()).await.unwrap();
    let baseline = f.baseline().await.unwrap();
    let (_, _, alone) = download_hashed(&f, 16 << 20, Duration::from_secs(60)).await.unwrap();
    let rss_before = f.rss();

    let host = http_addr();
    // A frontend that stops reading, and one that reads slowly.
    let (stalled_tunnel, mut stalled_frontend) = f.dial(&host, Duration::from_secs(5)).await.unwrap();
    stalled_frontend
        .write_all(format!("GET /bytes/{ENDLESS} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (slow_tunnel, mut slow_frontend) = f.dial(&host, Duration::from_secs(5)).await.unwrap();
    slow_frontend.write_all(format!("GET /bytes/{ENDLESS} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let slow_reader = tokio::spawn(async move {
        let _t = slow_tunnel;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !matches!(slow_frontend.read(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // A target that stops reading, and one that reads slowly: writers push as fast as the tunnel takes.
    let mut writers = Vec::new();
    let written = Arc::new(AtomicU64::new(0));
    for port in [STALLED_PORT, SLOW_PORT] {
        let (tunnel, mut conn) = f.dial(&format!("{TARGET_IP}:{port}"), Duration::from_secs(5)).await.unwrap();
        let written = written.clone();
        writers.push(tokio::spawn(async move {
            let _t = tunnel;
            let chunk = vec![7u8; 64 * 1024];
            while conn.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    // Until they are backed up: the stalled frontend's queue on the server holds a good part of its window, and the
    // writers have pushed more than the targets' socket buffers take.
    let max_queued = |debug: &serde_json::Value| {
        debug["connections"].as_array().into_iter().flatten().filter_map(|c| c["queued_bytes"].as_u64()).max()
    };
    let backed_up = async || {
        let queued = max_queued(&f.server_debug().await.unwrap()).unwrap_or(0);
        (queued, written.load(Ordering::Relaxed))
    };
    konnectivity_it::eventually!(
        30,
        matches!(backed_up().await, (queued, pushed) if queued >= 1 << 20 && pushed >= 16 << 20),
        "not backed up: (frontend queue, bytes written) {:?}",
        backed_up().await
    );

    // The normal transfer and echo round trips, beside them.
    let (sha, len, beside) = download_hashed(&f, 16 << 20, Duration::from_secs(60)).await.unwrap();
    assert_eq!((len, sha), (16 << 20, pattern_sha256(16 << 20)));
    let (_t, mut echo) = f.dial(&echo_addr(), Duration::from_secs(5)).await.unwrap();
    let mut rtts = Vec::new();
    for _ in 0..20 {
        rtts.push(echo_roundtrip(&mut echo, Duration::from_secs(2)).await.unwrap());
    }
    rtts.sort();
    drop(echo);
    let rss_during = f.rss();
    let debug = f.server_debug().await.unwrap();
    let max_queued = max_queued(&debug).unwrap_or(0);
    let open = debug["connections"].as_array().map_or(0, Vec::len);
    report(
        tag,
        "16 MiB transfer alone / beside 4 stalled or slow connections",
        format!(
            "{alone:.2?} / {beside:.2?}; echo RTT p50 {:.1?} max {:.1?}",
            percentile(&rtts, 0.5),
            percentile(&rtts, 1.0)
        ),
    );
    report(
        tag,
        "while stalled",
        format!(
            "{open} connections kept open, largest frontend queue {max_queued} bytes, {} MiB pushed into the stalled \
             targets; RSS server {} -> {} MiB, agent {} -> {} MiB",
            written.load(Ordering::Relaxed) >> 20,
            rss_before.0 >> 20,
            rss_during.0 >> 20,
            rss_before.1 >> 20,
            rss_during.1 >> 20
        ),
    );
    assert!(beside < alone * 3 + Duration::from_secs(3), "head-of-line blocking: {beside:?} vs {alone:?} alone");
    assert!(percentile(&rtts, 1.0) < Duration::from_millis(500), "echo round trips stalled: {rtts:?}");
    assert!(rss_during.0 < rss_before.0 + STALL_RSS_BOUND, "server RSS grew to {}", rss_during.0);
    assert!(rss_during.1 < rss_before.1 + STALL_RSS_BOUND, "agent RSS grew to {}", rss_during.1);

    // They go away: nothing is left.
    drop(stalled_frontend);
    drop(stalled_tunnel);
    slow_reader.abort();
    for w in writers {
        w.abort();
    }
    let gone = Instant::now();
    f.assert_settled(baseline, FD_SLACK, STALL_SETTLE).await.unwrap();
    report(tag, "settled after the stalled connections went away in", format!("{:.2?}", gone.elapsed()));
    f.shutdown();
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Frontends that vanish while the agent is still dialing a blackholed target.

/// The agent's own dial timeout (5 s); nothing may be pending on either side after it, plus slack.
const VANISH_BOUND: Duration = Duration::from_secs(7);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_vanishing_mid_dial_leave_no_pending_dial() {
    require_fabric();
    let tag = "vanishing-frontends";
    // No server-side dial timeout: only the frontends' going away can end these dials on the server.
    let options = Options { server_args: vec!["--backend-dial-timeout=0s".into()], ..Options::default() };
    let mut f = Fabric::start(tag, options).await.unwrap();
    let baseline = f.baseline().await.unwrap();
    // Half give up in-process (the client library sends DIAL_CLS), half are processes killed with SIGKILL.
    let mut dials = Vec::new();
    for _ in 0..25 {
        let proxy = f.proxy();
        dials.push(tokio::spawn(async move {
            let t = Tunnel::connect_single_use(&proxy).await.expect("tunnel");
            let _ = t.dial(&blackhole_addr()).await;
        }));
    }
    let mut clients = Vec::new();
    // ChildProcess stops them when dropped, should the test fail before it does.
    let client_bin = workspace_bin("proxy-test-client").unwrap();
    for i in 0..25 {
        let args = [
            format!("--proxy-uds={}", f.uds.display()),
            "--mode=grpc".into(),
            format!("--request-host={BLACKHOLE_IP}"),
            "--request-port=80".into(),
        ];
        let log = f.dir.path().join(format!("test-client-{i}.log"));
        clients.push(
            f.control
                .spawn_process("proxy-test-client", std::process::Command::new(&client_bin).args(&args), log)
                .unwrap(),
        );
    }
    let pending = async || f.server_metric("konnectivity_network_proxy_server_pending_backend_dials").await.unwrap();
    konnectivity_it::eventually!(10, pending().await >= 50.0, "only {} dials pending", pending().await);
    let dialing = f.leftovers().await.unwrap().agent_dials_debug;
    report(tag, "dials in flight on the agent before the frontends vanish", dialing);
    for d in &dials {
        d.abort();
    }
    for c in &mut clients {
        c.kill();
    }
    let vanished = Instant::now();
    let mut server_clear = None;
    let mut agent_clear = None;
    while vanished.elapsed() < VANISH_BOUND && (server_clear.is_none() || agent_clear.is_none()) {
        let left = f.leftovers().await.unwrap();
        if server_clear.is_none() && left.pending_metric == 0.0 && left.pending_debug == 0 {
            server_clear = Some(vanished.elapsed());
        }
        if agent_clear.is_none() && left.agent_dials_debug == 0 {
            agent_clear = Some(vanished.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server_clear = server_clear.unwrap_or_else(|| panic!("server dials still pending\n{}", f.logs()));
    let agent_clear = agent_clear.unwrap_or_else(|| panic!("agent dials still in flight\n{}", f.logs()));
    report(tag, "no pending dial on the server after", format!("{server_clear:.2?}"));
    report(tag, "no dial in flight on the agent after", format!("{agent_clear:.2?}"));
    f.assert_settled(baseline, FD_SLACK, SETTLE).await.unwrap();
    f.shutdown();
}
