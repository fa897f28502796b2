//! High availability without a load balancer, and agent lifecycle: an agent given several server addresses
//! (`--proxy-server-addresses`), draining with the real `proxy-agent` binary and `--drain-timeout`, and how the
//! server treats draining and vanishing agents.

use konnectivity_agent::{AgentConfig, ServerAddress};
use konnectivity_client::Tunnel;
use konnectivity_it::fake_agent::FakeAgent;
use konnectivity_it::http;
use konnectivity_it::stack::{AgentRun, Frontend, ServerRun, Stack, assert_settled, dials};
use konnectivity_it::targets::{StreamHash, http_target, pattern_sha256};
use konnectivity_proto::{Packet, PacketKind};
use konnectivity_server::routing::Strategy;
use konnectivity_testkit::ChildProcess;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An agent configuration dialing every address in `servers`, fast reconnects as the stack's.
fn agent_for(stack: &Stack, servers: &[ServerAddress]) -> AgentConfig {
    let mut config = stack.agent_config(SocketAddr::from(([127, 0, 0, 1], servers[0].port)));
    config.servers = servers.to_vec();
    config
}

/// Starts a server with a TCP frontend (several servers cannot share the stack's socket path).
async fn tcp_server(stack: &Stack, id: &str, count: u32, bind: &str, port: u16) -> ServerRun {
    let mut config = stack.server_config(Frontend::TcpMtls);
    config.server_id = id.into();
    config.server_count = count;
    config.agent_bind = bind.into();
    config.agent_port = port;
    stack.start_server(config).await.expect("server")
}

async fn get_success(stack: &Stack, server: &ServerRun, host: &str) {
    let tunnel = stack.tunnel(server).await.expect("tunnel");
    let conn = tunnel.dial(host).await.expect("dial");
    let (status, body) = http::get(conn, host, "/success").await.expect("get");
    assert_eq!((status, &body[..]), (200, &b"success"[..]));
}

#[tokio::test]
async fn agent_with_three_addresses_connects_to_all_and_reconnects_to_a_restarted_one() {
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    // Three servers, each told there are three, no load balancer; one of them on IPv6 loopback.
    let a = tcp_server(&stack, "server-a", 3, "127.0.0.1", 0).await;
    let b = tcp_server(&stack, "server-b", 3, "127.0.0.1", 0).await;
    let c = tcp_server(&stack, "server-c", 3, "::1", 0).await;
    let addresses = [
        ServerAddress::new("127.0.0.1", a.agent_addr.port()),
        ServerAddress::new("localhost", b.agent_addr.port()),
        ServerAddress::new("::1", c.agent_addr.port()),
    ];
    let agent = stack.start_agent(agent_for(&stack, &addresses)).await.expect("agent");
    let started = Instant::now();
    konnectivity_it::eventually!(
        10,
        agent.handle.connected_servers().len() == 3 && a.handle.ready() && b.handle.ready() && c.handle.ready(),
        "agent reached {:?}",
        agent.handle.addresses()
    );
    eprintln!("connected to 3 servers in {:?}", started.elapsed());
    let status = agent.handle.addresses();
    let reached: Vec<_> = status.iter().map(|s| (s.address.as_str(), s.servers.clone())).collect();
    let port = |s: &ServerRun| s.agent_addr.port();
    assert_eq!(
        reached,
        [
            (format!("127.0.0.1:{}", port(&a)).as_str(), vec!["server-a".to_string()]),
            (format!("localhost:{}", port(&b)).as_str(), vec!["server-b".to_string()]),
            (format!("[::1]:{}", port(&c)).as_str(), vec!["server-c".to_string()]),
        ]
    );
    for server in [&a, &b, &c] {
        get_success(&stack, server, &host).await;
    }
    let metrics = agent.handle.metrics();
    assert_eq!((metrics.server_dials("new_server"), metrics.server_dials("duplicate")), (3, 0));
    assert_eq!(metrics.open_server_connections(), 3.0);

    // Server b goes away: the agent keeps the other two and redials b's address with its backoff.
    let b_port = b.agent_addr.port();
    b.stop().await;
    konnectivity_it::eventually!(
        10,
        agent.handle.connected_servers().len() == 2,
        "agent still lists {:?}",
        agent.handle.connected_servers()
    );
    konnectivity_it::eventually!(
        10,
        agent.handle.addresses()[1].last_error.is_some(),
        "no failed redial of b: {:?}",
        agent.handle.addresses()
    );
    for server in [&a, &c] {
        get_success(&stack, server, &host).await;
    }
    // The other addresses are not redialed meanwhile (each already reaches its server).
    let dials_while_down = metrics.server_dials("new_server") + metrics.server_dials("duplicate");
    assert_eq!(dials_while_down, 3);

    let restarted_at = Instant::now();
    let b = tcp_server(&stack, "server-b", 3, "127.0.0.1", b_port).await;
    konnectivity_it::eventually!(
        5,
        agent.handle.connected_servers().len() == 3 && b.handle.ready(),
        "agent did not reconnect to the restarted server: {:?}",
        agent.handle.addresses()
    );
    let reconnect = restarted_at.elapsed();
    eprintln!("reconnected to the restarted server in {reconnect:?}");
    // The backoff is capped at 500 ms here.
    assert!(reconnect < Duration::from_secs(3), "reconnect took {reconnect:?}");
    get_success(&stack, &b, &host).await;
    assert_eq!(agent.handle.addresses()[1].last_error, None);
    assert_eq!(metrics.server_dials("duplicate"), 0);

    for server in [&a, &b, &c] {
        assert_settled(server, None).await;
    }
    assert_settled(&a, Some(&agent)).await;
    agent.stop().await;
    for server in [a, b, c] {
        server.stop().await;
    }
}

#[tokio::test]
async fn two_addresses_reaching_one_server_count_once() {
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let server = tcp_server(&stack, "only-server", 1, "127.0.0.1", 0).await;
    let port = server.agent_addr.port();
    let addresses = [ServerAddress::new("127.0.0.1", port), ServerAddress::new("localhost", port)];
    let agent = stack.start_agent(agent_for(&stack, &addresses)).await.expect("agent");
    konnectivity_it::eventually!(
        10,
        agent.handle.addresses().iter().filter(|a| a.servers == ["only-server"]).count() == 2,
        "addresses: {:?}",
        agent.handle.addresses()
    );
    assert_eq!(agent.handle.connected_servers(), ["only-server"]);
    let metrics = agent.handle.metrics();
    assert_eq!((metrics.server_dials("new_server"), metrics.server_dials("duplicate")), (1, 1));
    // The duplicate stream was closed: the server holds one stream of this agent.
    konnectivity_it::eventually!(5, server.handle.agents().len() == 1, "server has {:?}", server.handle.agents());
    // And the agent does not keep redialing: both addresses are served, one server is all there is. (A deliberate
    // pause: nothing happening is what the test waits to see.)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!((metrics.server_dials("new_server"), metrics.server_dials("duplicate")), (1, 1));
    assert_eq!(metrics.open_server_connections(), 1.0);
    get_success(&stack, &server, &host).await;
    let debug = agent.handle.debug_connections();
    assert_eq!(debug["addresses"].as_array().map(|a| a.len()), Some(2), "{debug}");
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn an_address_that_hangs_delays_no_other() {
    let stack = Stack::new().expect("pki");
    // Accepts TCP (the kernel does, from the backlog) and never answers the TLS handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let server = tcp_server(&stack, "server-a", 2, "127.0.0.1", 0).await;
    let addresses = [
        ServerAddress::new("127.0.0.1", silent_addr.port()),
        ServerAddress::new("127.0.0.1", server.agent_addr.port()),
    ];
    let started = Instant::now();
    let agent = stack.start_agent(agent_for(&stack, &addresses)).await.expect("agent");
    // Within 8 s: well under the 10 s the hanging dial lasts, so a sequential dialer could not pass, with room for
    // a loaded CI machine (3 s was too tight there).
    // (The server registers the agent a moment before the agent records the server: wait for both.)
    konnectivity_it::eventually!(
        8,
        server.handle.ready() && agent.handle.connected_servers() == ["server-a"],
        "addresses: {:?}",
        agent.handle.addresses()
    );
    eprintln!("connected past a hanging address in {:?}", started.elapsed());
    let status = agent.handle.addresses();
    assert!(status[0].dialing && status[0].servers.is_empty(), "{status:?}");
    assert_eq!(agent.handle.connected_servers(), ["server-a"]);
    agent.stop().await;
    server.stop().await;
    drop(silent);
}

/// A `proxy-agent` process (ours), killed if the test ends first; its log in the stack's directory.
fn spawn_agent_process(stack: &Stack, agent_port: u16, id: &str, drain_timeout: &str, idle: &str) -> ChildProcess {
    let mut cmd = Command::new(crate::faults::binary("proxy-agent"));
    cmd.args([
        format!("--ca-cert={}", stack.pki.ca.display()),
        format!("--agent-cert={}", stack.pki.agent_cert.display()),
        format!("--agent-key={}", stack.pki.agent_key.display()),
        format!("--proxy-server-addresses=127.0.0.1:{agent_port}"),
        format!("--agent-id={id}"),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
        "--sync-interval=100ms".into(),
        "--sync-interval-cap=500ms".into(),
        format!("--drain-timeout={drain_timeout}"),
        format!("--drain-idle-period={idle}"),
        "--v=2".into(),
    ])
    .env("NO_COLOR", "1");
    ChildProcess::spawn_logged("proxy-agent", &mut cmd, stack.dir().join(format!("{id}.log")))
        .expect("spawn proxy-agent")
}

/// Sends `GET /bytes/{len}` on a fresh tunnel and reads the body in a task: the first `pause_at` bytes at once,
/// the rest after `go` is notified. Progress is visible in the returned counter; the task returns the body's
/// length and SHA-256, or the read error.
async fn transfer(
    stack: &Stack,
    server: &ServerRun,
    host: &str,
    len: usize,
    pause_at: usize,
    go: Arc<tokio::sync::Notify>,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Result<(usize, String), std::io::Error>>) {
    let tunnel: Tunnel = stack.tunnel(server).await.expect("tunnel");
    let mut conn = tunnel.dial(host).await.expect("dial");
    conn.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let progress = Arc::new(AtomicUsize::new(0));
    let seen = progress.clone();
    let task = tokio::spawn(async move {
        let _tunnel = tunnel;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).await?;
            head.push(byte[0]);
        }
        let mut hash = StreamHash::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut paused = false;
        loop {
            if !paused && hash.len >= pause_at {
                paused = true;
                go.notified().await;
            }
            let want = if paused { buf.len() } else { buf.len().min(pause_at - hash.len).max(1) };
            let n = conn.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok((hash.len, hash.hex()));
            }
            hash.update(&buf[..n]);
            seen.store(hash.len, Ordering::Relaxed);
        }
    });
    (progress, task)
}

#[tokio::test]
async fn draining_agent_finishes_its_transfer_new_dials_go_elsewhere_and_it_exits_by_itself() {
    const LEN: usize = 64 << 20;
    const PAUSE_AT: usize = 8 << 20;
    // Hashing 64 MiB takes a while in a debug build: off this (single-threaded) runtime, which also runs the
    // server, so that it does not delay the server while A's last packets arrive.
    let expected = tokio::task::spawn_blocking(|| pattern_sha256(LEN));
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut a = spawn_agent_process(&stack, server.agent_addr.port(), "agent-a", "1m", "1s");
    konnectivity_it::eventually!(15, server.handle.ready(), "agent A did not connect: {}", a.log());

    // The transfer necessarily goes through A (the only agent yet); its reader stops at 8 MiB until told.
    let go = Arc::new(tokio::sync::Notify::new());
    let (progress, reader) = transfer(&stack, &server, &host, LEN, PAUSE_AT, go.clone()).await;
    konnectivity_it::eventually!(15, progress.load(Ordering::Relaxed) >= PAUSE_AT, "transfer did not start");

    let mut b_config = stack.agent_config(server.agent_addr);
    b_config.agent_id = "agent-b".into();
    let b = stack.start_agent(b_config).await.expect("agent B");
    konnectivity_it::eventually!(10, server.handle.agent_count() == 2, "agent B did not connect");

    let sigterm_at = Instant::now();
    a.terminate();
    let a_draining = || server.handle.agents().iter().any(|i| i.agent_id == "agent-a" && i.draining);
    konnectivity_it::eventually!(10, a_draining(), "the server never saw A's DRAIN: {}", a.log());
    eprintln!("server saw DRAIN {:?} after SIGTERM", sigterm_at.elapsed());

    // New dials go to B.
    let before = dials(&b);
    for _ in 0..10 {
        get_success(&stack, &server, &host).await;
    }
    assert_eq!(dials(&b), before + 10, "a new dial went to the draining agent");

    // A is still there, serving the paused transfer, which then completes through it.
    assert!(a.try_wait().expect("try_wait").is_none(), "A exited with a transfer open: {}", a.log());
    assert!(!reader.is_finished(), "the transfer ended before the drain; the test proves nothing");
    assert!(a_draining(), "A left the server while its transfer was open");
    let resumed_at = Instant::now();
    go.notify_one();
    let (len, sha) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("transfer finished in time")
        .expect("reader task")
        .expect("transfer read");
    let done_at = Instant::now();
    assert_eq!(len, LEN, "in-flight transfer cut by the drain");
    assert_eq!(sha, expected.await.expect("hash task"), "in-flight transfer damaged by the drain");

    // With nothing left to carry, A exits by itself, cleanly, once it has been idle for its 1s quiet period.
    let (status, exited_at) = a
        .exit_within(Duration::from_secs(10))
        .await
        .map(|status| (status, Instant::now()))
        .unwrap_or_else(|| panic!("A did not exit within 10s of its last connection ending: {}", a.log()));
    assert!(status.success(), "A exited with {status}: {}", a.log());
    eprintln!(
        "drain: the remaining {} MiB took {:?}; A exited {:?} after the transfer ended, {:?} after SIGTERM",
        (LEN - PAUSE_AT) >> 20,
        done_at - resumed_at,
        exited_at.saturating_duration_since(done_at),
        exited_at - sigterm_at
    );
    let quiet = exited_at.saturating_duration_since(done_at);
    assert!(quiet >= Duration::from_millis(900) && quiet < Duration::from_secs(4), "A exited {quiet:?} after");
    konnectivity_it::eventually!(5, server.handle.agent_count() == 1, "the server still lists A");
    get_success(&stack, &server, &host).await;
    assert_settled(&server, Some(&b)).await;
    b.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn drain_timeout_closes_the_transfer_left_with_an_error_and_exits() {
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut a = spawn_agent_process(&stack, server.agent_addr.port(), "agent-a", "1s", "5s");
    konnectivity_it::eventually!(15, server.handle.ready(), "agent did not connect: {}", a.log());

    // A transfer that would run for a long time, read continuously.
    let go = Arc::new(tokio::sync::Notify::new());
    let (progress, reader) = transfer(&stack, &server, &host, 1 << 40, 0, go.clone()).await;
    go.notify_one();
    konnectivity_it::eventually!(15, progress.load(Ordering::Relaxed) > (1 << 20), "transfer did not start");

    let sigterm_at = Instant::now();
    a.terminate();
    let outcome = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the frontend hung: its transfer did not end within 10s of the drain timeout")
        .expect("reader task");
    let ended_at = Instant::now();
    let err = outcome.expect_err("the transfer ended cleanly, as if it were complete");
    assert!(err.to_string().contains("drain-timeout"), "unexpected error: {err}");
    let (status, exited_at) = a
        .exit_within(Duration::from_secs(10))
        .await
        .map(|status| (status, Instant::now()))
        .unwrap_or_else(|| panic!("A did not exit after its drain timeout: {}", a.log()));
    assert!(status.success(), "A exited with {status}: {}", a.log());
    let (cut, exited) = (ended_at - sigterm_at, exited_at - sigterm_at);
    eprintln!(
        "drain timeout 1s: transfer cut after {cut:?} ({} MiB read) with {err:?}; process exited after {exited:?}",
        progress.load(Ordering::Relaxed) >> 20
    );
    assert!(cut >= Duration::from_secs(1), "cut before the timeout: {cut:?}");
    assert!(exited >= Duration::from_secs(1) && exited < Duration::from_secs(5), "exited after {exited:?}");
    assert!(a.log().contains("closing them"), "{}", a.log());
    konnectivity_it::eventually!(5, !server.handle.ready(), "the server still lists the agent");
    assert_settled(&server, None).await;
    server.stop().await;
}

#[tokio::test]
async fn server_prefers_agents_not_draining_and_falls_back_to_draining_ones() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut a = FakeAgent::connect(&stack.pki, server.agent_addr, "fake-a").await.expect("fake a");
    let mut b = FakeAgent::connect(&stack.pki, server.agent_addr, "fake-b").await.expect("fake b");
    konnectivity_it::eventually!(10, server.handle.agent_count() == 2, "fake agents did not connect");
    a.to_server.send(Packet::drain()).await.expect("send DRAIN");
    konnectivity_it::eventually!(5, server.handle.agents().iter().any(|i| i.draining), "DRAIN not seen");

    // Every dial goes to B; B refuses each so that the caller returns.
    for _ in 0..10 {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        let dial = tokio::spawn(async move { tunnel.dial("10.0.0.1:80").await.map(|_| ()) });
        let packet = b.next().await.expect("B gets the dial");
        let Ok(PacketKind::DialRequest(req)) = packet.clone().kind() else {
            panic!("expected DIAL_REQ, got {packet:?}")
        };
        b.to_server.send(Packet::dial_response(req.random, 0, "refused by the test")).await.expect("answer");
        let err = dial.await.expect("dial task").expect_err("refused");
        assert!(err.to_string().contains("refused by the test"), "{err}");
    }
    // With B gone, the draining A is all there is, and gets the dial (its first packet: none came before).
    drop(b);
    konnectivity_it::eventually!(5, server.handle.agent_count() == 1, "B still listed");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let dial = tokio::spawn(async move { tunnel.dial("10.0.0.1:80").await.map(|_| ()) });
    let packet = a.next().await.expect("A gets the dial");
    let Ok(PacketKind::DialRequest(req)) = packet.clone().kind() else { panic!("expected DIAL_REQ, got {packet:?}") };
    a.to_server.send(Packet::dial_response(req.random, 0, "refused by A")).await.expect("answer");
    assert!(dial.await.expect("dial task").expect_err("refused").to_string().contains("refused by A"));
    assert_settled(&server, None).await;
    server.stop().await;
}

#[tokio::test]
async fn dial_pending_on_an_agent_that_disappears_fails_at_once() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut agent = FakeAgent::connect(&stack.pki, server.agent_addr, "silent").await.expect("fake agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "fake agent did not connect");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let dial = tokio::spawn(async move { tunnel.dial("10.0.0.1:80").await.map(|_| ()) });
    let packet = agent.next().await.expect("the dial reaches the agent");
    assert!(matches!(packet.clone().kind(), Ok(PacketKind::DialRequest(_))), "{packet:?}");
    assert_eq!(server.handle.pending_dials(), 1);
    // The agent goes away without answering (no --backend-dial-timeout is set).
    let gone_at = Instant::now();
    drop(agent);
    let err = tokio::time::timeout(Duration::from_secs(5), dial)
        .await
        .expect("the dial still waits for an agent that is gone")
        .expect("dial task")
        .expect_err("the dial cannot succeed");
    eprintln!("pending dial failed {:?} after its agent left: {err}", gone_at.elapsed());
    assert!(err.to_string().contains("disconnected before answering the dial"), "{err}");
    assert_settled(&server, None).await;
    server.stop().await;
}

#[tokio::test]
async fn dest_cidr_prefers_a_wider_prefix_over_a_draining_narrower_one() {
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let mut config = stack.server_config(Frontend::Uds);
    config.proxy_strategies = vec![Strategy::DestCidr];
    let server = stack.start_server(config).await.expect("server");
    let mut narrow = stack.agent_config(server.agent_addr);
    narrow.agent_id = "narrow".into();
    narrow.agent_identifiers = "cidr=127.0.0.1%2F32".into();
    narrow.drain_timeout = None;
    let narrow = stack.start_agent(narrow).await.expect("narrow agent");
    let mut wide = stack.agent_config(server.agent_addr);
    wide.agent_id = "wide".into();
    wide.agent_identifiers = "cidr=127.0.0.0%2F8".into();
    let wide = stack.start_agent(wide).await.expect("wide agent");
    konnectivity_it::eventually!(10, server.handle.agent_count() == 2, "agents did not connect");

    // The narrower prefix wins while it is not draining; hold one connection open on it.
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let held = tunnel.dial(&host).await.expect("dial");
    assert_eq!((dials(&narrow), dials(&wide)), (1, 0));
    narrow.drain.cancel();
    konnectivity_it::eventually!(5, server.handle.agents().iter().any(|i| i.draining), "DRAIN not seen");
    for _ in 0..3 {
        get_success(&stack, &server, &host).await;
    }
    assert_eq!((dials(&narrow), dials(&wide)), (1, 3));

    // Once its last connection closes, the draining in-process agent stops by itself.
    drop(held);
    drop(tunnel);
    konnectivity_it::eventually!(10, server.handle.agent_count() == 1, "the drained agent is still connected");
    narrow.stop().await;
    assert_settled(&server, Some(&wide)).await;
    wide.stop().await;
    server.stop().await;
}

/// The reference's HA set-up: servers behind one load-balanced address, agents told `--server-count`. The
/// agent redials the balancer until it holds every server; it follows a server going away and a new one coming.
#[tokio::test]
async fn agent_behind_a_load_balancer_reaches_every_server_and_follows_the_set() {
    let stack = Stack::new().expect("pki");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let s1 = tcp_server(&stack, "server-1", 3, "127.0.0.1", 0).await;
    let s2 = tcp_server(&stack, "server-2", 3, "127.0.0.1", 0).await;
    let s3 = tcp_server(&stack, "server-3", 3, "127.0.0.1", 0).await;
    let backends = std::sync::Arc::new(std::sync::Mutex::new(vec![s1.agent_addr, s2.agent_addr, s3.agent_addr]));
    let lb = konnectivity_it::targets::tcp_balancer_over(backends.clone()).await.expect("balancer");
    let agent = stack.start_agent(agent_for(&stack, &[ServerAddress::new("127.0.0.1", lb.addr.port())])).await;
    let agent = agent.expect("agent");
    let connected = |agent: &AgentRun| {
        let mut s = agent.handle.connected_servers();
        s.sort();
        s
    };
    let started = Instant::now();
    konnectivity_it::eventually!(10, connected(&agent).len() == 3, "agent reached {:?}", connected(&agent));
    eprintln!("reached 3 servers through the balancer in {:?}", started.elapsed());
    assert_eq!(agent.handle.metrics().open_server_connections(), 3.0);
    for server in [&s1, &s2, &s3] {
        get_success(&stack, server, &host).await;
    }

    // One server goes away (and out of the balancer): the agent keeps two, dials through them keep working.
    backends.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| *a != s3.agent_addr);
    s3.stop().await;
    konnectivity_it::eventually!(10, connected(&agent) == ["server-1", "server-2"], "agent: {:?}", connected(&agent));
    for server in [&s1, &s2] {
        get_success(&stack, server, &host).await;
    }

    // A fourth server joins the balancer: the agent, still short of three, finds it.
    let s4 = tcp_server(&stack, "server-4", 3, "127.0.0.1", 0).await;
    backends.lock().unwrap_or_else(|e| e.into_inner()).push(s4.agent_addr);
    let joined = Instant::now();
    konnectivity_it::eventually!(
        10,
        connected(&agent) == ["server-1", "server-2", "server-4"],
        "agent: {:?}",
        connected(&agent)
    );
    eprintln!("found the new server in {:?}", joined.elapsed());
    for server in [&s1, &s2, &s4] {
        get_success(&stack, server, &host).await;
    }
    for server in [&s1, &s2, &s4] {
        assert_settled(server, None).await;
    }
    assert_settled(&s1, Some(&agent)).await;
    agent.stop().await;
    for server in [s1, s2, s4] {
        server.stop().await;
    }
}
