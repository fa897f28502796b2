//! Our server and the Go one behind one load balancer, and our agent draining from the Go server.

use super::*;

#[tokio::test]
async fn mixed_ha_pair_behind_a_load_balancer_every_agent_reaches_every_server() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let stack = Stack::new().expect("pki");
    // Our server on a TCP frontend (the Go one has the socket), both told there are two servers.
    let mut config = stack.server_config(Frontend::TcpMtls);
    config.server_id = "rust-server".into();
    config.server_count = 2;
    let rust_server = stack.start_server(config).await.expect("our server");
    let go = go_server_with(&stack, "grpc", false, 2);
    wait_ready_healthz(go.health_port, &go.proc).await;
    let lb = konnectivity_it::targets::tcp_balancer(vec![
        rust_server.agent_addr,
        format!("127.0.0.1:{}", go.agent_port).parse().expect("addr"),
    ])
    .await
    .expect("balancer");

    let mut agent_config = stack.agent_config(lb.addr);
    agent_config.agent_id = "rust-agent".into();
    let rust_agent = stack.start_agent(agent_config).await.expect("our agent");
    let (go_agent, go_agent_health) = go_agent(&stack, lb.addr.port(), "go-agent", "");

    konnectivity_it::eventually!(
        30,
        rust_agent.handle.connected_servers().len() == 2,
        "our agent reaches {:?}",
        rust_agent.handle.connected_servers()
    );
    konnectivity_it::eventually!(
        30,
        rust_server.handle.agent_count() == 2,
        "our server has {:?}",
        rust_server.handle.agents().iter().map(|a| a.agent_id.clone()).collect::<Vec<_>>()
    );
    konnectivity_it::eventually!(
        30,
        metric(go.health_port, "konnectivity_network_proxy_server_ready_backend_connections").await == Some(2.0),
        "Go server: {}",
        go.proc.log_tail(LOG_TAIL)
    );
    konnectivity_it::eventually!(
        30,
        metric(go_agent_health, "konnectivity_network_proxy_agent_open_server_connections").await == Some(2.0),
        "Go agent: {}",
        go_agent.log_tail(LOG_TAIL)
    );
    let mut servers = rust_agent.handle.connected_servers();
    servers.sort();
    assert_eq!(servers, ["go-server", "rust-server"]);

    // Both servers serve dials (each may pick either agent).
    for _ in 0..4 {
        rust_client_cell(&stack.proxy_address(&rust_server).expect("addr"), false, &host).await;
        let out = go_client(
            "grpc-client",
            &[format!("--uds={}", stack.uds.display()), format!("--target={host}"), "--path=/success".into()],
        )
        .await;
        assert_eq!(out, "success");
    }
    assert_settled(&rust_server, None).await;
    drop(go_agent);
    rust_agent.stop().await;
    rust_server.stop().await;
}

#[tokio::test]
async fn our_agent_drains_from_the_go_server_on_sigterm() {
    const BIG: usize = 1 << 30;
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let stack = Stack::new().expect("pki");
    let go = go_server(&stack, "grpc");
    wait_ready_healthz(go.health_port, &go.proc).await;

    // Our agent as a real process, so the signal path is the binary's.
    let health = free_port();
    let mut ours = ChildProcess::spawn_logged(
        "proxy-agent",
        Command::new(crate::faults::binary("proxy-agent")).args(stack.agent_process_flags(go.agent_port)).args([
            "--agent-id=rust-agent".into(),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={health}"),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
            // The 1 GiB transfer below must not be cut by the default 25s.
            "--drain-timeout=5m".into(),
        ]),
        stack.dir().join("rust-agent.log"),
    )
    .expect("spawn our agent");
    wait_ready(go.health_port, &go.proc).await;

    // An in-flight transfer, necessarily through our agent (the only one yet), read continuously: the Go
    // server reads an agent's packets in order, so an unread connection would hold up the DRAIN too.
    let tunnel = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
    let mut inflight = tunnel.dial(&host).await.expect("dial");
    inflight
        .write_all(format!("GET /bytes/{BIG} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        let _tunnel = tunnel;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            inflight.read_exact(&mut byte).await.expect("head");
            head.push(byte[0]);
        }
        let mut hash = konnectivity_it::targets::StreamHash::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = inflight.read(&mut buf).await.expect("in-flight read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            seen.store(hash.len, std::sync::atomic::Ordering::Relaxed);
        }
        (hash.len, hash.hex())
    });
    konnectivity_it::eventually!(15, progress.load(std::sync::atomic::Ordering::Relaxed) > 0, "transfer did not start");

    let (go_agent, _) = go_agent(&stack, go.agent_port, "go-agent", "");
    konnectivity_it::eventually!(
        30,
        metric(go.health_port, "konnectivity_network_proxy_server_ready_backend_connections").await == Some(2.0),
        "the Go server does not have both agents; Go agent's log:\n{}",
        go_agent.log_tail(LOG_TAIL)
    );

    let dial_count = "konnectivity_network_proxy_agent_dial_duration_seconds_count";
    let dials_before = metric(health, dial_count).await.expect("our agent's metrics");
    // SIGTERM: our agent sends DRAIN; the Go server logs that it marked the backend draining.
    ours.terminate();
    konnectivity_it::eventually!(
        30,
        go.proc.log().contains("marked backend as draining"),
        "the Go server never saw DRAIN; its log:\n{}",
        go.proc.log_tail(LOG_TAIL)
    );

    // New dials go to the other agent.
    for _ in 0..10 {
        let t = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
        let conn = t.dial(&host).await.expect("dial during drain");
        assert_eq!(http::get(conn, &host, "/success").await.expect("get").0, 200);
    }
    assert_eq!(metric(health, dial_count).await, Some(dials_before), "a new dial went to the draining agent");

    // The in-flight transfer was still running across the drain, and completes through the draining agent.
    assert!(!reader.is_finished(), "the transfer ended before the drain; the test proves nothing");
    let (len, sha) =
        tokio::time::timeout(Duration::from_secs(120), reader).await.expect("transfer finished").expect("reader");
    assert_eq!(len, BIG, "in-flight transfer cut by the drain");
    assert_eq!(sha, konnectivity_it::targets::pattern_sha256(BIG), "in-flight transfer damaged by the drain");

    // With nothing left to carry, our agent exits by itself (the reference needs a second signal).
    let exited = ours.exit_within(Duration::from_secs(10)).await;
    let status = exited.unwrap_or_else(|| panic!("our agent did not exit after draining; log:\n{}", ours.log()));
    assert!(status.success(), "agent exit status {status:?}");
    drop(go_agent);
}
