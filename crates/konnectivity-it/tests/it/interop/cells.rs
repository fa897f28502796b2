//! The interop matrix: the Go agent under our server, our agent under the Go server, the Go clients and
//! kube-apiserver's egress selector through our stack, in both modes and over both transports.

use super::*;

#[tokio::test]
async fn go_agent_serves_our_server_in_both_modes() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    for (frontend, connect_mode) in [(Frontend::Uds, false), (Frontend::ConnectUds, true)] {
        let stack = Stack::new().expect("pki");
        let server = stack.start_server(stack.server_config(frontend)).await.expect("server");
        let (agent, _) = go_agent(&stack, server.agent_addr.port(), "go-agent-1", "host=node-a&ipv4=127.0.0.1");
        konnectivity_it::eventually!(
            30,
            server.handle.ready(),
            "Go agent did not connect; log:\n{}",
            agent.log_tail(LOG_TAIL)
        );
        let agents = server.handle.agents();
        assert_eq!(agents[0].agent_id, "go-agent-1");
        assert_eq!(agents[0].identifiers.hosts, ["node-a"]);
        assert_eq!(agents[0].identifiers.ipv4, ["127.0.0.1"]);

        let proxy = stack.proxy_address(&server).expect("addr");
        rust_client_cell(&proxy, connect_mode, &host).await;
        go_client_download(&stack, &host, connect_mode).await;
        // The Go agent's dial error text reaches our clients.
        let err = refused_dial_error(&proxy, connect_mode).await;
        assert!(err.contains("connection refused"), "{err}");
        assert_settled(&server, None).await;
        drop(agent);
        konnectivity_it::eventually!(10, !server.handle.ready(), "server still lists the killed Go agent");
        server.stop().await;
    }
}

#[tokio::test]
async fn our_agent_serves_the_go_server_in_both_modes() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    for (mode, connect_mode) in [("grpc", false), ("http-connect", true)] {
        let stack = Stack::new().expect("pki");
        let server = go_server(&stack, mode);
        let mut config = stack.agent_config(format!("127.0.0.1:{}", server.agent_port).parse().expect("addr"));
        config.sync_interval = Duration::from_millis(200);
        let agent = stack.start_agent(config).await.expect("agent");
        wait_ready(server.health_port, &server.proc).await;
        konnectivity_it::eventually!(15, agent.handle.ready(), "our agent did not connect to the Go server");
        assert_eq!(agent.handle.connected_servers(), ["go-server"]);

        let proxy = ProxyAddress::Uds(stack.uds.clone());
        rust_client_cell(&proxy, connect_mode, &host).await;
        go_client_download(&stack, &host, connect_mode).await;
        if !connect_mode {
            let uds = stack.uds.display().to_string();
            let echo = go_client(
                "grpc-client",
                &[
                    format!("--uds={uds}"),
                    format!("--target={host}"),
                    "--mode=http".into(),
                    "--path=/success".into(),
                    "--count=5".into(),
                ],
            )
            .await;
            assert_eq!(echo, "success".repeat(5));
            // kube-apiserver's own egress path (GRPC over UDS) through the Go server to our agent.
            assert_eq!(egress_sha256(&egress_uds(&stack, "GRPC"), &host).await, want_sha());
        }
        let err = refused_dial_error(&proxy, connect_mode).await;
        assert!(err.contains("connection refused"), "our agent's error text did not reach the client: {err}");
        konnectivity_it::eventually!(
            10,
            agent.handle.endpoint_connections() == 0,
            "agent still holds endpoint connections"
        );
        konnectivity_it::eventually!(10, target.open_connections() == 0, "target still has connections");
        agent.stop().await;
        drop(server);
    }
}

#[tokio::test]
async fn go_clients_and_the_egress_selector_through_our_stack() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();

    // gRPC over UDS: kube-apiserver's konnectivity-client, and the egress selector (GRPC/UDS).
    let stack = Stack::new().expect("pki");
    let (server, agent) = konnectivity_it::stack::server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let uds = stack.uds.display().to_string();
    let out = go_client(
        "grpc-client",
        &[format!("--uds={uds}"), format!("--target={host}"), "--path=/success".into(), "--count=3".into()],
    )
    .await;
    assert_eq!(out, "successsuccesssuccess");
    let out = go_client(
        "grpc-client",
        &[format!("--uds={uds}"), format!("--target={host}"), "--mode=sha256".into(), format!("--path=/bytes/{SIZE}")],
    )
    .await;
    assert_eq!(out, want_sha());
    // Raw bytes both ways: the Go client writes 3 MB as one DATA packet and checks the echo itself.
    let echo = konnectivity_it::targets::echo_target("127.0.0.1:0").await.expect("echo");
    let out = go_client(
        "grpc-client",
        &[format!("--uds={uds}"), format!("--target={}", echo.addr), "--mode=echo".into(), "--size=3000000".into()],
    )
    .await;
    assert!(out.starts_with("3000000 "), "{out}");
    let config = egress_uds(&stack, "GRPC");
    let out = go_client(
        "egress-client",
        &[
            format!("--config={}", config.display()),
            format!("--url=http://{host}/bytes/{SIZE}"),
            "--sha256".into(),
            "--count=2".into(),
        ],
    )
    .await;
    assert_eq!(out, format!("{}\n{}", want_sha(), want_sha()));
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let refused = closed.addr.to_string();
    let err =
        go_client_error("grpc-client", &[format!("--uds={uds}"), format!("--target={refused}"), "--fail-fast".into()])
            .await;
    assert!(err.contains("connection refused"), "{err}");
    // The reference client works against us too.
    let out = tokio::process::Command::new(go_bin("proxy-test-client"))
        .args([
            format!("--proxy-uds={uds}"),
            "--proxy-host=".into(),
            "--proxy-port=0".into(),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={}", target.addr.port()),
            "--request-path=success".into(),
        ])
        .output()
        .await
        .expect("run reference test client");
    assert!(out.status.success(), "reference proxy-test-client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("success"));
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;

    // gRPC over mTLS TCP with the Go client.
    let stack = Stack::new().expect("pki");
    let (server, agent) = konnectivity_it::stack::server_and_agent(&stack, Frontend::TcpMtls).await.expect("stack");
    let konnectivity_server::FrontendAddr::Tcp(addr) = server.frontend_addr.clone() else { panic!("tcp") };
    let tls_args = |extra: &[String]| {
        let mut a = vec![
            format!("--tcp=127.0.0.1:{}", addr.port()),
            format!("--ca-cert={}", stack.pki.ca.display()),
            format!("--client-cert={}", stack.pki.client_cert.display()),
            format!("--client-key={}", stack.pki.client_key.display()),
            format!("--target={host}"),
        ];
        a.extend_from_slice(extra);
        a
    };
    let out = go_client("grpc-client", &tls_args(&["--mode=sha256".into(), format!("--path=/bytes/{SIZE}")])).await;
    assert_eq!(out, want_sha());
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;

    // HTTP CONNECT: the egress selector over UDS and over mTLS TCP.
    for frontend in [Frontend::ConnectUds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (server, agent) = konnectivity_it::stack::server_and_agent(&stack, frontend).await.expect("stack");
        let config = match &server.frontend_addr {
            konnectivity_server::FrontendAddr::Uds(_) => egress_uds(&stack, "HTTPConnect"),
            konnectivity_server::FrontendAddr::Tcp(a) => {
                let body = format!(
                    "    proxyProtocol: HTTPConnect\n    transport:\n      tcp:\n        url: https://localhost:{}\n        tlsConfig:\n          caBundle: {}\n          clientCert: {}\n          clientKey: {}",
                    a.port(),
                    stack.pki.ca.display(),
                    stack.pki.client_cert.display(),
                    stack.pki.client_key.display()
                );
                egress_config(&stack, "egress-httpconnect-tcp.yaml", &body)
            }
        };
        let out = go_client(
            "egress-client",
            &[format!("--config={}", config.display()), format!("--url=http://{host}/success")],
        )
        .await;
        assert_eq!(out, "success", "{frontend:?}");
        assert_eq!(egress_sha256(&config, &host).await, want_sha(), "{frontend:?}");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn egress_selector_over_tcp_mtls_through_the_go_server_and_our_agent() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let stack = Stack::new().expect("pki");
    let server = go_server_with(&stack, "http-connect", true, 1);
    let agent = stack
        .start_agent(stack.agent_config(format!("127.0.0.1:{}", server.agent_port).parse().expect("addr")))
        .await
        .expect("agent");
    wait_ready(server.health_port, &server.proc).await;
    let port = server.frontend_port.expect("tcp frontend");
    let body = format!(
        "    proxyProtocol: HTTPConnect\n    transport:\n      tcp:\n        url: https://localhost:{port}\n        tlsConfig:\n          caBundle: {}\n          clientCert: {}\n          clientKey: {}",
        stack.pki.ca.display(),
        stack.pki.client_cert.display(),
        stack.pki.client_key.display()
    );
    let config = egress_config(&stack, "egress-httpconnect-tcp.yaml", &body);
    let out =
        go_client("egress-client", &[format!("--config={}", config.display()), format!("--url=http://{host}/success")])
            .await;
    assert_eq!(out, "success");
    assert_eq!(egress_sha256(&config, &host).await, want_sha());
    // And our CONNECT client over the Go server's mTLS TCP frontend.
    let proxy = ProxyAddress::tcp_mtls("localhost", port, &stack.pki.ca, &stack.pki.client_cert, &stack.pki.client_key)
        .expect("tls");
    rust_client_cell(&proxy, true, &host).await;
    konnectivity_it::eventually!(
        10,
        agent.handle.endpoint_connections() == 0,
        "agent still holds endpoint connections"
    );
    agent.stop().await;
}
