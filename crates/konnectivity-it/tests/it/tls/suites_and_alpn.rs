//! `--cipher-suites` on both listeners, and the agent's `--alpn-proto` through ALPN-aware balancers.

use super::*;

#[tokio::test]
async fn cipher_suites_restrict_tls12_on_both_listeners() {
    let stack = Stack::new().expect("pki");
    let pki = OwnPki::new(stack.dir()); // rcgen keys are ECDSA P-256: the ECDSA suites apply
    let mut config = pki.server_config(&stack, Frontend::TcpMtls);
    config.cipher_suites = CipherSuites::parse(&["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"])
        .expect("cipher suites");
    let server = stack.start_server(config).await.expect("server");
    let frontend = frontend_tcp(&server.frontend_addr);
    let probe = Probe::trusting(&pki.ca.pem()).presenting(&pki.agent);
    for (listener, addr) in [("agent", server.agent_addr), ("frontend", frontend)] {
        let refused = probe.clone().tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]).run(addr).await;
        let err = refused.expect_err("a TLS 1.2 client offering only a suite not allowed was accepted");
        assert!(err.contains("HandshakeFailure"), "{listener}: {err}");
        konnectivity_it::eventually!(
            5,
            server.handle.metrics().tls_handshake_failures(listener, "protocol") == 1,
            "{listener}: the refusal was not counted"
        );
        let ok = probe.clone().tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]).run(addr).await;
        assert_eq!(ok.expect("allowed suite").suite, rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
        // The client's preference does not matter: only the allowed suite can be picked.
        let both = probe.clone().tls12_with(&[
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ]);
        let ok = both.run(addr).await.expect("a client offering the allowed suite among others");
        assert_eq!(ok.suite, rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
        // TLS 1.3 is not restricted (as in Go): its default suite is negotiated, not only the one named.
        let ok = probe.run(addr).await.expect("TLS 1.3 client");
        assert_eq!(ok.suite, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    }
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.ca_cert = pki.ca_file.clone();
    agent_config.agent_cert = Some(pki.agent_files.clone());
    let agent = stack.start_agent(agent_config).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent refused");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn unsupported_cipher_suite_names_stop_the_server_at_start() {
    let dir = konnectivity_testkit::TempDir::new("cipher-flags").expect("dir");
    let run = |suites: &str| {
        let out = std::process::Command::new(crate::faults::binary("proxy-server"))
            .args([
                &format!("--uds-name={}", dir.path().join("s.sock").display()),
                "--server-port=0",
                "--cluster-cert=/nonexistent/c.crt",
                "--cluster-key=/nonexistent/c.key",
                &format!("--cipher-suites={suites}"),
            ])
            .env("RUST_LOG", "off")
            .output()
            .expect("run proxy-server");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    for (name, why) in [
        ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "CBC mode"),
        ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", "3DES"),
        ("TLS_RSA_WITH_AES_128_GCM_SHA256", "RSA key exchange"),
    ] {
        let (code, stderr) = run(&format!("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,{name}"));
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(stderr.contains(&format!("--cipher-suites: cipher suite {name} is not supported ({why}")), "{stderr}");
        assert!(
            stderr.contains("supported TLS 1.2 suites: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "),
            "the error does not list what is supported: {stderr}"
        );
    }
    let (code, stderr) = run("ECDHE-RSA-AES128-GCM-SHA256");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown cipher suite \"ECDHE-RSA-AES128-GCM-SHA256\""), "{stderr}");
    // Supported names pass the flag check: the server goes on to read its (missing) certificate files.
    let (code, stderr) = run("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,TLS_AES_128_GCM_SHA256");
    assert_ne!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/c.crt"), "{stderr}");
}

#[tokio::test]
async fn agent_offers_alpn_proto_before_h2_through_an_alpn_router() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let router = AlpnRouter::start("konnectivity", server.agent_addr).await;
    let mut config = stack.agent_config(server.agent_addr);
    config.servers = vec![ServerAddress::new("127.0.0.1", router.addr.port())];
    config.alpn_protos = vec!["konnectivity".into()];
    let agent = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not get through the router");
    assert_eq!(router.offered()[0], ["konnectivity", "h2"]);
    let target = echo_target("127.0.0.1:0").await.expect("echo");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    echo(&mut tunnel.dial(&target.addr.to_string()).await.expect("dial"), b"through the router").await;
    drop(tunnel);
    agent.stop().await;

    // Without --alpn-proto the router sends the agent elsewhere (here: nowhere).
    let mut config = stack.agent_config(server.agent_addr);
    config.servers = vec![ServerAddress::new("127.0.0.1", router.addr.port())];
    let plain = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(5, router.offered().len() >= 3, "the agent did not retry");
    assert!(router.offered()[1..].iter().all(|o| o == &["h2"]), "{:?}", router.offered());
    assert_eq!(server.handle.agent_count(), 0, "the agent without the ALPN protocol got through");
    plain.stop().await;
    assert_settled(&server, None).await;
    server.stop().await;
}

/// As grpc-go (the reference agent, `TestCustomALPN`): whatever protocol the agent offered that the peer picks,
/// it speaks HTTP/2 on it. A balancer that terminates TLS and picks the custom protocol then works.
#[tokio::test]
async fn agent_speaks_h2_over_a_custom_alpn_picked_by_a_terminating_balancer() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let backend_tls = tls::client_config(
        &stack.pki.ca,
        Some((&stack.pki.agent_cert, &stack.pki.agent_key)),
        &[tls::ALPN_H2.to_vec()],
    )
    .expect("balancer client tls");
    let balancer = TerminatingBalancer::start(
        "konnectivity",
        &stack.pki.server_cert,
        &stack.pki.server_key,
        server.agent_addr,
        backend_tls,
    )
    .await;
    let mut config = stack.agent_config(server.agent_addr);
    config.servers = vec![ServerAddress::new("127.0.0.1", balancer.addr.port())];
    config.alpn_protos = vec!["konnectivity".into()];
    let agent = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not get through the balancer");
    assert_eq!(balancer.negotiated.lock().expect("lock")[0].as_deref(), Some("konnectivity"));
    let target = echo_target("127.0.0.1:0").await.expect("echo");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    echo(&mut tunnel.dial(&target.addr.to_string()).await.expect("dial"), b"over a custom ALPN").await;
    drop(tunnel);
    agent.stop().await;
    server.stop().await;
}
