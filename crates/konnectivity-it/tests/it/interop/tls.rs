//! ALPN and `--cipher-suites` against the reference.

use super::*;

/// ALPN and `--cipher-suites` against the reference: the Go server refuses clients without h2 as ours does, our
/// agent's `--alpn-proto` reaches it through an ALPN router, the Go agent's reaches ours, and the Go server's
/// `--cipher-suites` narrows TLS 1.2 as ours does.
#[tokio::test]
async fn alpn_and_cipher_suites_agree_with_the_reference() {
    use crate::tls::{AlpnRouter, Probe};
    use rustls::crypto::ring::cipher_suite as suite;
    let stack = Stack::new().expect("pki");
    let read = |p: &PathBuf| std::fs::read_to_string(p).expect("read pem");
    let identity = (read(&stack.pki.agent_cert), read(&stack.pki.agent_key));
    let probe = Probe::trusting(&read(&stack.pki.ca)).presenting(&identity);

    let go = go_server(&stack, "grpc");
    wait_ready_healthz(go.health_port, &go.proc).await;
    let go_agent_port: std::net::SocketAddr = format!("127.0.0.1:{}", go.agent_port).parse().expect("addr");
    let err = probe.clone().alpn(&["konnectivity"]).run(go_agent_port).await.expect_err("Go: no h2 offered");
    assert!(err.contains("NoApplicationProtocol"), "the Go server refused differently: {err}");
    probe.clone().alpn(&[]).run(go_agent_port).await.expect_err("Go: no ALPN at all");
    let ok = probe.clone().alpn(&["konnectivity", "h2"]).run(go_agent_port).await.expect("Go: h2 among others");
    assert_eq!(ok.alpn.as_deref(), Some(&b"h2"[..]));

    // Our agent, --alpn-proto=konnectivity, through an ALPN router to the Go server.
    let router = AlpnRouter::start("konnectivity", go_agent_port).await;
    let mut config = stack.agent_config(go_agent_port);
    config.servers = vec![konnectivity_agent::ServerAddress::new("127.0.0.1", router.addr.port())];
    config.alpn_protos = vec!["konnectivity".into()];
    let agent = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(15, agent.handle.ready(), "our agent did not reach the Go server via the router");
    assert_eq!(agent.handle.connected_servers(), ["go-server"]);
    assert_eq!(router.offered()[0], ["konnectivity", "h2"]);
    let target = konnectivity_it::targets::echo_target("127.0.0.1:0").await.expect("echo");
    let tunnel = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
    let mut conn = tunnel.dial(&target.addr.to_string()).await.expect("dial");
    conn.write_all(b"alpn").await.expect("write");
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"alpn");
    drop((conn, tunnel));
    agent.stop().await;
    drop(router);
    drop(go);

    // The Go agent, --alpn-proto=konnectivity, through an ALPN router to our server.
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let router = AlpnRouter::start("konnectivity", server.agent_addr).await;
    let args = [
        stack.agent_process_flags(router.addr.port()),
        vec![
            "--alpn-proto=konnectivity".into(),
            "--agent-id=go-alpn-agent".into(),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={}", free_port()),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
            "--v=2".into(),
        ],
    ]
    .concat();
    let go_agent = go_process("proxy-agent", &args, stack.dir().join("go-alpn-agent.log"));
    konnectivity_it::eventually!(
        15,
        server.handle.ready(),
        "the Go agent did not reach our server; log:\n{}",
        go_agent.log_tail(LOG_TAIL)
    );
    assert_eq!(router.offered()[0], ["konnectivity", "h2"], "the Go agent's ALPN list");
    drop(go_agent);
    drop(router);
    server.stop().await;

    // --cipher-suites on the Go server: the same outcomes as ours (tls::suites_and_alpn::cipher_suites_restrict_tls12_on_both_listeners).
    let (agent_port, health_port) = (free_port(), free_port());
    let mut args = go_server_flags(&stack, agent_port, health_port);
    args.extend([
        format!("--uds-name={}", stack.dir().join("cipher.sock").display()),
        "--server-port=0".into(),
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_AES_128_GCM_SHA256".into(),
    ]);
    let go = go_process("proxy-server", &args, stack.dir().join("go-cipher-server.log"));
    wait_ready_healthz(health_port, &go).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{agent_port}").parse().expect("addr");
    probe
        .clone()
        .tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256])
        .run(addr)
        .await
        .expect_err("Go: a suite not allowed");
    let ok = probe.clone().tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]).run(addr).await;
    assert_eq!(ok.expect("Go: the allowed suite").suite, rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
    let tls13 = probe.run(addr).await.expect("Go: TLS 1.3 is not restricted");
    assert!(format!("{:?}", tls13.suite).starts_with("TLS13_"), "{:?}", tls13.suite);
}
