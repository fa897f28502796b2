//! Certificates, keys and CA bundles rotated on disk, on the server and on the agent.

use super::*;

/// Server certificates, keys and the client CA bundle are rotated on disk: new handshakes on both listeners use
/// them at once, streams opened before carry on, and a broken update changes nothing but the failure counter.
#[tokio::test]
async fn server_certificates_rotate_on_disk_without_dropping_streams() {
    let stack = Stack::new().expect("pki");
    let ca1 = Ca::new("CA one").expect("ca");
    let ca2 = Ca::new("CA two").expect("ca");
    let s1 = ca1.leaf(&Leaf::server("proxy-server").serial(1)).expect("s1");
    let agent = ca1.leaf(&Leaf::client("proxy-agent")).expect("agent");
    let client = ca1.leaf(&Leaf::client("kube-apiserver")).expect("client");
    let mut secret = SecretDir::new(
        &stack.dir().join("server-secret"),
        &[("tls.crt", &s1.0), ("tls.key", &s1.1), ("ca.crt", &ca1.pem())],
    )
    .expect("secret");
    let mut config = stack.server_config(Frontend::TcpMtls);
    (config.cluster_cert, config.cluster_key) = (secret.path("tls.crt"), secret.path("tls.key"));
    config.cluster_ca = Some(secret.path("ca.crt"));
    if let FrontendListen::Tcp { cert, key, ca, .. } = &mut config.frontend {
        (*cert, *key, *ca) = (secret.path("tls.crt"), secret.path("tls.key"), secret.path("ca.crt"));
    }
    config.tls_reload_interval = RELOAD;
    let server = stack.start_server(config).await.expect("server");
    let frontend = frontend_tcp(&server.frontend_addr);
    let ca1_file = write(stack.dir(), "ca1.crt", &ca1.pem());
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.ca_cert = ca1_file.clone();
    agent_config.agent_cert = Some((write(stack.dir(), "a.crt", &agent.0), write(stack.dir(), "a.key", &agent.1)));
    let agent_run = stack.start_agent(agent_config).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");

    // A stream through the TCP frontend and the agent, opened before any rotation.
    let target = echo_target("127.0.0.1:0").await.expect("echo");
    let proxy = ProxyAddress::tcp_mtls(
        "127.0.0.1",
        frontend.port(),
        &ca1_file,
        &write(stack.dir(), "c.crt", &client.0),
        &write(stack.dir(), "c.key", &client.1),
    )
    .expect("proxy address");
    let tunnel = Tunnel::connect_single_use(&proxy).await.expect("tunnel");
    let mut old_stream = tunnel.dial(&target.addr.to_string()).await.expect("dial");
    echo(&mut old_stream, b"before rotation").await;
    let rotated_at = Instant::now();

    let probe = Probe::trusting(&ca1.pem()).presenting(&agent);
    for addr in [server.agent_addr, frontend] {
        assert_eq!(probe.run(addr).await.expect("probe").peer, der(&s1.0));
    }

    // 1. A new certificate and key from the same CA (a new serial).
    let s2 = ca1.leaf(&Leaf::server("proxy-server").serial(2)).expect("s2");
    secret.publish(&[("tls.crt", &s2.0), ("tls.key", &s2.1), ("ca.crt", &ca1.pem())]).expect("publish");
    let metrics = server.handle.metrics();
    konnectivity_it::eventually!(
        5,
        metrics.tls_reloads("agent", "success") == 1 && metrics.tls_reloads("frontend", "success") == 1,
        "rotation not picked up"
    );
    for addr in [server.agent_addr, frontend] {
        assert_eq!(probe.run(addr).await.expect("probe").peer, der(&s2.0), "{addr} still presents the old cert");
    }
    echo(&mut old_stream, b"after the new certificate").await;

    // 2. A CA bundle with both CAs: clients with certificates from the new CA get in too.
    let ca2_client = ca2.leaf(&Leaf::client("proxy-agent-2")).expect("ca2 client");
    let probe2 = Probe::trusting(&ca1.pem()).presenting(&ca2_client);
    assert!(probe2.run(server.agent_addr).await.is_err(), "a CA-two client was accepted before the bundle changed");
    let bundle = format!("{}{}", ca1.pem(), ca2.pem());
    secret.publish(&[("tls.crt", &s2.0), ("tls.key", &s2.1), ("ca.crt", &bundle)]).expect("publish");
    konnectivity_it::eventually!(5, metrics.tls_reloads("agent", "success") == 2, "bundle not picked up");
    konnectivity_it::eventually!(5, metrics.tls_reloads("frontend", "success") == 2, "bundle not picked up");
    for addr in [server.agent_addr, frontend] {
        probe2.run(addr).await.expect("a CA-two client is refused after the bundle change");
        probe.run(addr).await.expect("a CA-one client is refused after the bundle change");
    }
    echo(&mut old_stream, b"after the new bundle").await;

    // 3. Broken updates: a key that does not match the certificate, then a certificate that does not parse.
    let s3 = ca1.leaf(&Leaf::server("proxy-server").serial(3)).expect("s3");
    secret.publish(&[("tls.crt", &s3.0), ("tls.key", &s2.1), ("ca.crt", &bundle)]).expect("publish");
    konnectivity_it::eventually!(
        5,
        metrics.tls_reloads("agent", "failure") == 1 && metrics.tls_reloads("frontend", "failure") == 1,
        "a mismatched key was not counted as a failed reload"
    );
    secret.publish(&[("tls.crt", "not a certificate"), ("tls.key", &s2.1), ("ca.crt", &bundle)]).expect("publish");
    konnectivity_it::eventually!(
        5,
        metrics.tls_reloads("agent", "failure") == 2 && metrics.tls_reloads("frontend", "failure") == 2,
        "an unparsable certificate was not counted as a failed reload"
    );
    for addr in [server.agent_addr, frontend] {
        assert_eq!(probe.run(addr).await.expect("probe").peer, der(&s2.0), "a broken update replaced the cert");
    }
    assert_eq!(metrics.tls_reloads("agent", "success"), 2);
    echo(&mut old_stream, b"after broken updates").await;

    // The agent's stream is the one from before the rotations.
    let since_rotation = rotated_at.elapsed();
    let agents = server.handle.agents();
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected_for > since_rotation, "the agent reconnected");
    drop(old_stream);
    drop(tunnel);
    assert_settled(&server, Some(&agent_run)).await;
    agent_run.stop().await;
    server.stop().await;
}

/// The agent's CA bundle and client certificate are rotated on disk; a new connection uses them: a server that
/// only trusts the new CA and presents a certificate from it accepts the agent.
#[tokio::test]
async fn agent_certificate_and_ca_rotate_on_disk() {
    let stack = Stack::new().expect("pki");
    let ca1 = Ca::new("CA one").expect("ca");
    let ca2 = Ca::new("CA two").expect("ca");
    let s1 = ca1.leaf(&Leaf::server("proxy-server")).expect("s1");
    let a1 = ca1.leaf(&Leaf::client("proxy-agent")).expect("a1");
    let dir = stack.dir();
    let mut config = stack.server_config(Frontend::Uds);
    config.cluster_cert = write(dir, "s1.crt", &s1.0);
    config.cluster_key = write(dir, "s1.key", &s1.1);
    config.cluster_ca = Some(write(dir, "ca1.crt", &ca1.pem()));
    let server = stack.start_server(config).await.expect("server");
    let port = server.agent_addr.port();
    let mut secret =
        SecretDir::new(&dir.join("agent-secret"), &[("tls.crt", &a1.0), ("tls.key", &a1.1), ("ca.crt", &ca1.pem())])
            .expect("secret");
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.ca_cert = secret.path("ca.crt");
    agent_config.agent_cert = Some((secret.path("tls.crt"), secret.path("tls.key")));
    agent_config.tls_reload_interval = RELOAD;
    let agent = stack.start_agent(agent_config).await.expect("agent");
    konnectivity_it::eventually!(10, agent.handle.ready(), "agent did not connect");

    // The agent gets a certificate from CA two, and trusts both CAs.
    let a2 = ca2.leaf(&Leaf::client("proxy-agent")).expect("a2");
    let bundle = format!("{}{}", ca1.pem(), ca2.pem());
    secret.publish(&[("tls.crt", &a2.0), ("tls.key", &a2.1), ("ca.crt", &bundle)]).expect("publish");
    konnectivity_it::eventually!(5, agent.handle.metrics().tls_reloads("success") == 1, "agent did not reload");
    assert!(agent.handle.ready(), "the reload dropped the agent's stream");

    // The server moves to CA two only (its certificate and the CA it checks agents against).
    server.stop().await;
    let s2 = ca2.leaf(&Leaf::server("proxy-server")).expect("s2");
    let mut config = stack.server_config(Frontend::Uds);
    config.agent_port = port;
    config.cluster_cert = write(dir, "s2.crt", &s2.0);
    config.cluster_key = write(dir, "s2.key", &s2.1);
    config.cluster_ca = Some(write(dir, "ca2.crt", &ca2.pem()));
    let server = stack.start_server(config).await.expect("server on the same port");
    assert!(
        Probe::trusting(&bundle).presenting(&a1).run(server.agent_addr).await.is_err(),
        "the new server accepts the old agent certificate"
    );
    konnectivity_it::eventually!(10, server.handle.ready(), "the agent did not reconnect with its new files");

    // A broken update on the agent's side keeps what it has: it still reconnects with it.
    secret.publish(&[("tls.crt", "garbage"), ("tls.key", &a2.1), ("ca.crt", &bundle)]).expect("publish");
    konnectivity_it::eventually!(5, agent.handle.metrics().tls_reloads("failure") == 1, "broken file not counted");
    let config = {
        let mut c = stack.server_config(Frontend::Uds);
        c.agent_port = port;
        c.cluster_cert = dir.join("s2.crt");
        c.cluster_key = dir.join("s2.key");
        c.cluster_ca = Some(dir.join("ca2.crt"));
        c
    };
    server.stop().await;
    let server = stack.start_server(config).await.expect("server on the same port");
    konnectivity_it::eventually!(10, server.handle.ready(), "the agent lost its working files to a broken update");
    assert_eq!(agent.handle.metrics().tls_reloads("success"), 1);
    agent.stop().await;
    server.stop().await;
}
