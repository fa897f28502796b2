//! Agent drain, in-process: a draining agent that is the only one left still serves new dials and leaves only
//! after `--drain-idle-period` of quiet; with another agent, new dials go there; and however quickly an idle
//! agent ends its drain, every server reads its DRAIN before the stream ends.
//! (Draining with the real binary and SIGTERM, and `--drain-timeout`, are in `ha`.)

use konnectivity_it::stack::{AgentRun, Frontend, ServerRun, Stack, assert_settled, dials};
use konnectivity_it::targets::http_target;
use konnectivity_it::{eventually, http};
use std::time::{Duration, Instant};

/// `GET /success` through `server`, which must succeed.
async fn get_success(stack: &Stack, server: &ServerRun, host: &str) {
    let tunnel = stack.tunnel(server).await.expect("tunnel");
    let conn = tunnel.dial(host).await.expect("dial");
    let (status, body) = http::get(conn, host, "/success").await.expect("get");
    assert_eq!((status, &body[..]), (200, &b"success"[..]));
}

/// DRAIN packets `server` has read from agents (its `stream_packets_total{segment="from_agent"}`).
fn drains_read(server: &ServerRun) -> u64 {
    let samples = konnectivity_it::metrics::samples(
        server.handle.metrics().registry(),
        "konnectivity_network_proxy_server_stream_packets_total",
    );
    let label = |m: &prometheus::proto::Metric, name: &str| {
        m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string())
    };
    samples
        .iter()
        .filter(|m| label(m, "segment").as_deref() == Some("from_agent"))
        .filter(|m| label(m, "packet_type").as_deref() == Some("DRAIN"))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn draining(server: &ServerRun, agent_id: &str) -> bool {
    server.handle.agents().iter().any(|a| a.agent_id == agent_id && a.draining)
}

/// Waits (polling every 20 ms, up to `within`) until `agent` has stopped by itself; returns when it had.
async fn stopped_within(agent: &AgentRun, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if agent.has_stopped() {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_draining_agent_alone_serves_new_dials_and_leaves_after_its_quiet_period() {
    const IDLE: Duration = Duration::from_millis(1500);
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut config = stack.agent_config(server.agent_addr);
    config.agent_id = "only-agent".into();
    config.drain_idle_period = IDLE;
    config.drain_timeout = Some(Duration::from_secs(60));
    let agent = stack.start_agent(config).await.expect("agent");
    eventually!(10, server.handle.ready() && agent.handle.ready(), "agent did not connect");

    // The reference's TestProxyHandle_AfterDrain: a dial right after the drain starts, while the agent is idle.
    agent.drain.cancel();
    let drained_at = Instant::now();
    get_success(&stack, &server, &host).await;
    eventually!(5, draining(&server, "only-agent"), "the server never saw the DRAIN");

    // Requests keep coming, with pauses shorter than the quiet period: each starts it again, so the agent
    // stays well past one period after the drain began, serving every one (it is all the server has).
    let mut served = 1;
    let mut last_end = Instant::now();
    while drained_at.elapsed() < IDLE * 2 {
        tokio::time::sleep(IDLE / 3).await;
        assert!(!agent.has_stopped(), "the agent left {:?} after its last request", last_end.elapsed());
        get_success(&stack, &server, &host).await;
        last_end = Instant::now();
        served += 1;
    }
    assert_eq!(dials(&agent), served, "every request went through the draining agent");
    assert!(draining(&server, "only-agent"), "the draining agent left the server while requests came");

    // Then nothing more: it leaves by itself, one quiet period after the last request.
    let stopped_at = stopped_within(&agent, IDLE + Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the agent did not leave within {IDLE:?} + 5s of quiet"));
    let quiet = stopped_at - last_end;
    eprintln!("drained agent left {quiet:?} after its last request ({:?} after the drain began)", drained_at.elapsed());
    // (Its last connection may close a moment before the client has read the end of the answer.)
    assert!(quiet + Duration::from_millis(100) >= IDLE, "left after only {quiet:?} of quiet");
    assert!(quiet < IDLE + Duration::from_secs(3), "left only after {quiet:?} of quiet");
    assert_eq!(drains_read(&server), 1);
    eventually!(5, server.handle.agent_count() == 0, "the server still lists the agent");
    assert_settled(&server, None).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn with_another_agent_new_dials_skip_the_draining_one_which_leaves_when_quiet() {
    const IDLE: Duration = Duration::from_millis(1000);
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut a = stack.agent_config(server.agent_addr);
    a.agent_id = "agent-a".into();
    a.drain_idle_period = IDLE;
    let a = stack.start_agent(a).await.expect("agent A");
    let mut b = stack.agent_config(server.agent_addr);
    b.agent_id = "agent-b".into();
    let b = stack.start_agent(b).await.expect("agent B");
    eventually!(10, server.handle.agent_count() == 2 && a.handle.ready() && b.handle.ready(), "agents");

    a.drain.cancel();
    let drained_at = Instant::now();
    eventually!(5, draining(&server, "agent-a"), "the server never saw A's DRAIN");
    let (a_before, b_before) = (dials(&a), dials(&b));
    for _ in 0..10 {
        get_success(&stack, &server, &host).await;
    }
    assert_eq!((dials(&a), dials(&b)), (a_before, b_before + 10), "a new dial went to the draining agent");

    // B's traffic is not A's: A leaves once it has been quiet for its period, while B serves on.
    let stopped_at = stopped_within(&a, IDLE + Duration::from_secs(5)).await.expect("A did not leave when quiet");
    eprintln!("A left {:?} after its drain began", stopped_at - drained_at);
    eventually!(5, server.handle.agent_count() == 1, "the server still lists A");
    get_success(&stack, &server, &host).await;
    assert_eq!(dials(&b), b_before + 11);
    assert_settled(&server, Some(&b)).await;
    a.stop().await;
    b.stop().await;
    server.stop().await;
}

/// An idle agent with no quiet period ends its streams right after it starts draining: the race between
/// queuing DRAIN and ending the stream, which the session that owns the stream now decides. Two servers, 30
/// agents one after the other: each server reads every DRAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_reads_drain_before_an_idle_agent_ends_its_stream_30_times() {
    const ROUNDS: u64 = 30;
    let stack = Stack::new().expect("pki");
    let mut servers = Vec::new();
    for id in ["server-1", "server-2"] {
        let mut config = stack.server_config(Frontend::TcpMtls);
        config.server_id = id.into();
        config.server_count = 2;
        config.agent_bind = "127.0.0.1".into();
        config.agent_port = 0;
        servers.push(stack.start_server(config).await.expect("server"));
    }
    let addresses: Vec<_> =
        servers.iter().map(|s| konnectivity_agent::ServerAddress::new("127.0.0.1", s.agent_addr.port())).collect();
    let started = Instant::now();
    for round in 1..=ROUNDS {
        let mut config = stack.agent_config(servers[0].agent_addr);
        config.servers = addresses.clone();
        config.agent_id = format!("agent-{round}");
        config.drain_idle_period = Duration::ZERO;
        let agent = stack.start_agent(config).await.expect("agent");
        eventually!(
            10,
            agent.handle.connected_servers().len() == 2 && servers.iter().all(|s| s.handle.agent_count() == 1),
            "round {round}: agent reached {:?}",
            agent.handle.addresses()
        );
        agent.drain.cancel();
        stopped_within(&agent, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("round {round}: the idle agent did not stop after its drain"));
        for (n, server) in servers.iter().enumerate() {
            eventually!(
                5,
                drains_read(server) == round,
                "round {round}: server-{} read {} DRAINs, not {round}",
                n + 1,
                drains_read(server)
            );
            eventually!(5, server.handle.agent_count() == 0, "round {round}: the server still lists the agent");
        }
        agent.stop().await;
    }
    eprintln!("{ROUNDS} idle agents drained, each DRAIN read by both servers, in {:?}", started.elapsed());
    for server in servers {
        assert_settled(&server, None).await;
        server.stop().await;
    }
}
