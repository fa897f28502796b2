//! The HTTP CONNECT frontend: exact bytes, status mapping, a client we did not write (curl), parallel
//! transfers, a stalled client, a client that leaves while its dial is pending.

use konnectivity_client::http_connect;
use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::{banner_target, echo_target, http_target, pattern, sha256_hex};
use konnectivity_server::CONNECTION_ESTABLISHED;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn raw_connect(stack: &Stack, target: &str) -> UnixStream {
    let mut s = UnixStream::connect(&stack.uds).await.expect("connect uds");
    // kube-apiserver's request: Host is 127.0.0.1 whatever the target; the target is the request-target.
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    s
}

async fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    out
}

#[tokio::test]
async fn exact_bytes_over_uds_and_nothing_before_or_after_the_200() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::ConnectUds).await.expect("stack");

    // A server-first target: its banner races the 200 in the reference; here the 200 always comes first.
    let banner = banner_target("127.0.0.1:0", b"SSH-2.0-test\r\n").await.expect("banner");
    for _ in 0..20 {
        let mut s = raw_connect(&stack, &banner.addr.to_string()).await;
        let mut got = vec![0u8; CONNECTION_ESTABLISHED.len() + 14];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await.expect("in time").expect("read");
        assert_eq!(&got[..CONNECTION_ESTABLISHED.len()], CONNECTION_ESTABLISHED, "{}", String::from_utf8_lossy(&got));
        assert_eq!(&got[CONNECTION_ESTABLISHED.len()..], b"SSH-2.0-test\r\n");
    }

    // A client-first target: the whole exchange is exactly the 200 line followed by the HTTP response.
    let target = http_target("127.0.0.1:0").await.expect("target");
    let mut s = raw_connect(&stack, &target.addr.to_string()).await;
    let mut head = vec![0u8; CONNECTION_ESTABLISHED.len()];
    s.read_exact(&mut head).await.expect("200");
    assert_eq!(head, CONNECTION_ESTABLISHED);
    s.write_all(b"GET /success HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.expect("write");
    let rest = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.ends_with("\r\n\r\nsuccess"), "{rest}");

    // Bytes sent together with the CONNECT head are forwarded, not lost.
    let mut s = UnixStream::connect(&stack.uds).await.expect("connect");
    let both = format!(
        "CONNECT {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /success HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        target.addr
    );
    s.write_all(both.as_bytes()).await.expect("write");
    let all = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert!(
        all.starts_with("HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK\r\n") && all.ends_with("success"),
        "{all}"
    );

    // A non-CONNECT request is refused as the reference does.
    let mut s = UnixStream::connect(&stack.uds).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let r = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert!(
        r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n")
            && r.ends_with("this proxy only supports CONNECT passthrough\n"),
        "{r}"
    );

    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn dial_errors_map_to_the_reference_statuses() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::ConnectUds)).await.expect("server");

    // No agent: the reference's bytes exactly.
    let mut s = raw_connect(&stack, "127.0.0.1:9").await;
    let r = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert_eq!(
        r,
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: No agent available"
    );

    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let refused = closed.addr;
    let mut s = raw_connect(&stack, &refused.to_string()).await;
    let r = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{r}");
    assert!(r.contains("connection refused"), "{r}");

    // A name that fails to resolve without any network traffic: glibc rejects the empty label locally.
    let mut s = raw_connect(&stack, "nonexistent..invalid:80").await;
    let r = String::from_utf8(read_all(&mut s).await).expect("utf8");
    assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{r}");
    assert!(r.contains("no such host"), "{r}");

    // Through the library: the status and text reach the caller.
    let proxy = stack.proxy_address(&server).expect("addr");
    let err = http_connect::dial(&proxy, &refused.to_string(), "test").await.expect_err("refused");
    assert!(
        err.message.starts_with("502 Bad Gateway") && err.message.contains("connection refused"),
        "{}",
        err.message
    );
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn curl_fetches_a_page_through_the_mtls_tcp_connect_frontend() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::ConnectTcpMtls).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let konnectivity_server::FrontendAddr::Tcp(frontend) = server.frontend_addr.clone() else { panic!("tcp") };
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "20", "--proxytunnel", "--noproxy", ""])
        .arg("--proxy")
        .arg(format!("https://localhost:{}", frontend.port()))
        .arg("--proxy-cacert")
        .arg(&stack.pki.ca)
        .arg("--proxy-cert")
        .arg(&stack.pki.client_cert)
        .arg("--proxy-key")
        .arg(&stack.pki.client_key)
        .arg(format!("http://{}/success", target.addr))
        .output()
        .await
        .expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "success");

    // Without a client certificate the TLS handshake is refused.
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--max-time", "20", "--proxytunnel", "--noproxy", ""])
        .arg("--proxy")
        .arg(format!("https://localhost:{}", frontend.port()))
        .arg("--proxy-cacert")
        .arg(&stack.pki.ca)
        .arg(format!("http://{}/success", target.addr))
        .output()
        .await
        .expect("run curl");
    assert!(!out.status.success(), "a client without certificate got through");
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn hundred_parallel_tunnels_move_ten_mib_each_way_intact() {
    const SIZE: usize = 10 << 20;
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::ConnectUds).await.expect("stack");
    let echo = echo_target("127.0.0.1:0").await.expect("echo");
    let proxy = stack.proxy_address(&server).expect("addr");
    let payload = bytes::Bytes::from(pattern(SIZE));
    let want = sha256_hex(&payload);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (proxy, target, payload) = (proxy.clone(), echo.addr.to_string(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let conn = http_connect::dial(&proxy, &target, "test").await.expect("connect");
            let (mut rd, mut wr) = tokio::io::split(conn);
            let writer = tokio::spawn(async move {
                for chunk in payload.chunks(256 * 1024) {
                    wr.write_all(chunk).await.expect("write");
                }
                wr
            });
            let mut back = vec![0u8; SIZE];
            rd.read_exact(&mut back).await.expect("echo back");
            drop(writer.await.expect("writer"));
            sha256_hex(&back)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), want);
    }
    assert_settled(&server, Some(&agent)).await;
    konnectivity_it::eventually!(
        10,
        echo.open_connections() == 0,
        "echo connections left: {}",
        echo.open_connections()
    );
    assert_eq!(
        server
            .handle
            .metrics()
            .registry()
            .gather()
            .iter()
            .find(|f| f.name().ends_with("server_http_connections"))
            .map(|f| f.get_metric()[0].get_gauge().get_value()),
        Some(0.0)
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_connect_client_does_not_slow_other_tunnels() {
    const STALLED: usize = 32 << 20;
    const OTHER: usize = 64 << 20;
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::ConnectUds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();

    let mut stalled = raw_connect(&stack, &host).await;
    let mut head = vec![0u8; CONNECTION_ESTABLISHED.len()];
    stalled.read_exact(&mut head).await.expect("200");
    stalled
        .write_all(format!("GET /bytes/{STALLED} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Hold it: the socket stays open and unread until the other transfer is done.

    let proxy = stack.proxy_address(&server).expect("addr");
    let conn = http_connect::dial(&proxy, &host, "test").await.expect("connect");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(60), http::get(conn, &host, &format!("/bytes/{OTHER}")))
            .await
            .expect("the other tunnel hung behind the stalled client")
            .expect("get");
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(OTHER)));

    let all = read_all(&mut stalled).await;
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert_eq!(all.len() - body_at, STALLED, "stalled client's response was cut");
    assert_eq!(sha256_hex(&all[body_at..]), sha256_hex(&pattern(STALLED)));
    drop(stalled);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn proxy_test_client_in_http_connect_mode_over_uds_and_mtls() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    for frontend in [Frontend::ConnectUds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (server, agent) = server_and_agent(&stack, frontend).await.expect("stack");
        let mut args = vec![
            "--mode=http-connect".to_string(),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={}", target.addr.port()),
            "--request-path=success".into(),
        ];
        match &server.frontend_addr {
            konnectivity_server::FrontendAddr::Uds(p) => args.push(format!("--proxy-uds={}", p.display())),
            konnectivity_server::FrontendAddr::Tcp(a) => args.extend([
                format!("--ca-cert={}", stack.pki.ca.display()),
                format!("--client-cert={}", stack.pki.client_cert.display()),
                format!("--client-key={}", stack.pki.client_key.display()),
                "--proxy-host=localhost".into(),
                format!("--proxy-port={}", a.port()),
            ]),
        }
        let out = tokio::process::Command::new(crate::faults::binary("proxy-test-client"))
            .args(&args)
            .output()
            .await
            .expect("run");
        assert!(out.status.success(), "{frontend:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "success");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_its_dial_is_pending_is_noticed() {
    use konnectivity_it::fake_agent::FakeAgent;
    use konnectivity_proto::PacketKind;
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::ConnectUds)).await.expect("server");
    // An agent that receives the DIAL_REQ and never answers it.
    let mut agent = FakeAgent::connect(&stack.pki, server.agent_addr, "silent").await.expect("fake agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "fake agent not registered");

    let s = raw_connect(&stack, "127.0.0.1:9").await;
    let dial = agent.next().await.expect("DIAL_REQ");
    let Ok(PacketKind::DialRequest(req)) = dial.kind() else { panic!("expected DIAL_REQ") };
    assert_eq!(req.address, "127.0.0.1:9");
    assert_eq!(server.handle.pending_dials(), 1);

    drop(s); // the client gives up
    let cls = agent.next().await.expect("DIAL_CLS");
    assert!(matches!(cls.kind(), Ok(PacketKind::CloseDial(c)) if c.random == req.random), "expected DIAL_CLS");
    assert_settled(&server, None).await;
    assert_eq!(
        server.handle.metrics().dial_failures(konnectivity_server::metrics::DialFailureReason::FrontendClose),
        1
    );

    // A late DIAL_RSP (as a Go agent, which ignores DIAL_CLS, would send) is answered with CLOSE_REQ.
    agent.to_server.send(konnectivity_proto::Packet::dial_response(req.random, 7, "")).await.expect("send");
    let close = agent.next().await.expect("CLOSE_REQ");
    assert!(matches!(close.kind(), Ok(PacketKind::CloseRequest(c)) if c.connect_id == 7), "expected CLOSE_REQ");
    assert_settled(&server, None).await;
    server.stop().await;
}

/// An upload into an endpoint that never reads waits for flow-control credit, so nothing reads the client's
/// socket; when the client then hangs up, the server still notices (from the socket's readiness, not a read)
/// and closes the tunnel after the hangup grace, on both frontends. A client that stays keeps its tunnel.
///
/// Over TCP the client here closes with a reset (SO_LINGER 0): a client that closes with its own send queue
/// full has its FIN queued behind bytes the server's zero receive window does not let through, so the server
/// cannot see that close until the endpoint reads (or the client's kernel gives up on the orphaned socket and
/// the server's TCP keepalive finds it gone). Over the Unix socket, kube-apiserver's usual way in, a close is
/// seen at once.
#[tokio::test]
async fn a_client_that_hangs_up_during_a_stalled_upload_is_noticed() {
    const GRACE: Duration = Duration::from_secs(1);
    for frontend in [Frontend::ConnectUds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let mut config = stack.server_config(frontend);
        config.connect_hangup_grace = GRACE;
        let server = stack.start_server(config).await.expect("server");
        let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
        konnectivity_it::eventually!(10, server.handle.ready(), "agent not registered");
        // Accepts and holds every connection, never reading.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = konnectivity_it::targets::serve_listener(listener, |tcp, stop| async move {
            stop.cancelled().await;
            drop(tcp);
        })
        .expect("target");
        let host = target.addr.to_string();

        let proxy = stack.proxy_address(&server).expect("addr");
        let conn = http_connect::dial(&proxy, &host, "test").await.expect("connect");
        if let http_connect::ConnectStream::Tls(tls) = &conn {
            tls.get_ref().0.set_zero_linger().expect("SO_LINGER 0");
        }
        let (rd, mut wr) = tokio::io::split(conn);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // The upload fills the endpoint's window and waits for credit.
        let waits = || server.handle.metrics().flow_control_waits();
        konnectivity_it::eventually!(20, waits() > 0, "{frontend:?}: the upload never waited for credit");
        // A client that is still there keeps its tunnel well past the grace.
        tokio::time::sleep(GRACE * 2).await;
        assert_eq!(server.handle.established_connections(), 1, "{frontend:?}: tunnel of a live client closed");

        writer.abort();
        let _ = writer.await;
        drop(rd);
        let gone = std::time::Instant::now();
        // The grace, then the agent's own limit for delivering what it holds to an endpoint that does not read.
        konnectivity_it::eventually!(
            20,
            server.handle.established_connections() == 0,
            "{frontend:?}: the hung-up client's tunnel is still open"
        );
        let took = gone.elapsed();
        println!("CONNECT {frontend:?}: tunnel of a client that hung up mid-stall closed after {took:.2?}");
        assert!(took >= GRACE / 2, "{frontend:?}: closed before the grace ({took:?})");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}
