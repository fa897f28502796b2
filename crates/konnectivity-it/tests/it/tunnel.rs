//! The core tunnel: HTTP through both frontends, large transfers, dial errors, cancellation.

use bytes::Bytes;
use konnectivity_client::{DialFailureReason, Tunnel};
use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::{echo_target, http_target, pattern, sha256_hex};
use konnectivity_server::metrics::DialFailureReason as ServerReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_through(frontend: Frontend) {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, frontend).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&target.addr.to_string()).await.expect("dial");
    let (status, body) = http::get(conn, &target.addr.to_string(), "/success").await.expect("get");
    assert_eq!((status, &body[..]), (200, &b"success"[..]));
    assert_settled(&server, Some(&agent)).await;
    assert_eq!(server.handle.metrics().dial_failures(ServerReason::ErrorResponse), 0);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn http_get_through_uds_frontend() {
    get_through(Frontend::Uds).await;
}

#[tokio::test]
async fn http_get_through_mtls_tcp_frontend() {
    get_through(Frontend::TcpMtls).await;
}

#[tokio::test]
async fn ipv6_target_and_raw_echo_with_split_reads() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let echo = echo_target("[::1]:0").await.expect("echo on ::1");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let mut conn = tunnel.dial(&echo.addr.to_string()).await.expect("dial [::1]");
    for round in 0..20u8 {
        let msg = vec![round; 1000 + usize::from(round) * 37];
        conn.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back).await.expect("read");
        assert_eq!(back, msg);
    }
    drop(conn);
    assert_settled(&server, Some(&agent)).await;
    assert_eq!(echo.open_connections(), 0, "echo target still has the connection");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn twenty_mib_download_and_upload_arrive_intact() {
    const SIZE: usize = 20 << 20;
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();

    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial");
    let (status, body) = http::get(conn, &host, &format!("/bytes/{SIZE}")).await.expect("download");
    assert_eq!(status, 200);
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SIZE)), "download corrupted");

    let upload = Bytes::from(pattern(SIZE));
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial");
    let (status, body) = http::request(conn, "POST", &host, "/upload", upload.clone()).await.expect("upload");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body), format!("{SIZE} {}", sha256_hex(&upload)));

    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn reusable_tunnel_carries_many_dials() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let tunnel = Tunnel::connect(&stack.proxy_address(&server).expect("addr")).await.expect("tunnel");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (tunnel, host) = (tunnel.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            let conn = tunnel.dial(&host).await.expect("dial");
            http::get(conn, &host, "/success").await.expect("get")
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").1, Bytes::from_static(b"success"));
    }
    assert_settled(&server, Some(&agent)).await;

    // A single-use tunnel refuses a second dial.
    let single = stack.tunnel(&server).await.expect("tunnel");
    let first = single.dial(&host).await.expect("first dial");
    let err = single.dial(&host).await.expect_err("second dial");
    assert_eq!(err.reason, DialFailureReason::TunnelStarted);
    drop(first);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn refused_dial_reports_connection_refused_and_leaves_nothing() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let addr = closed.addr;
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let err = tunnel.dial(&addr.to_string()).await.expect_err("refused");
    assert_eq!(err.reason, DialFailureReason::Endpoint);
    assert!(err.message.contains("connection refused"), "{}", err.message);
    assert_settled(&server, Some(&agent)).await;
    assert_eq!(server.handle.metrics().dial_failures(ServerReason::ErrorResponse), 1);
    assert_eq!(agent.handle.metrics().endpoint_dial_failures("unknown"), 1);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn dial_without_agent_fails_with_no_agent_available() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let err = tunnel.dial("127.0.0.1:9").await.expect_err("no agent");
    assert_eq!(err.reason, DialFailureReason::Endpoint);
    assert_eq!(err.message, "No agent available");
    assert_settled(&server, None).await;
    assert_eq!(server.handle.metrics().dial_failures(ServerReason::NoAgent), 1);
    server.stop().await;
}

#[tokio::test]
async fn fifty_tunnels_cancelled_mid_response_leave_nothing_behind() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = tunnel.dial(&host).await.expect("dial");
            let req = format!("GET /bytes/{} HTTP/1.1\r\nHost: {host}\r\n\r\n", 64 << 20);
            conn.write_all(req.as_bytes()).await.expect("write");
            let mut buf = vec![0u8; 32 * 1024];
            let mut got = 0;
            while got < 100_000 {
                let n = conn.read(&mut buf).await.expect("read");
                assert!(n > 0, "early EOF");
                got += n;
            }
            // Cancel mid-response: drop the connection and the tunnel.
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_settled(&server, Some(&agent)).await;
    konnectivity_it::eventually!(
        10,
        target.open_connections() == 0,
        "target connections: {}",
        target.open_connections()
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn dial_abandoned_by_caller_is_cleaned_up() {
    // Callers that give up on a dial at varying moments (before the DIAL_REQ leaves, while the agent dials,
    // just after the answer): whatever the moment, no dial, connection or target socket may be left behind.
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    for _ in 0..20 {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        let address = target.addr.to_string();
        let dial = tunnel.dial(&address);
        // Give up almost at once; sometimes before the DIAL_REQ leaves, sometimes after the answer.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(300), dial).await;
    }
    assert_settled(&server, Some(&agent)).await;
    konnectivity_it::eventually!(
        10,
        target.open_connections() == 0,
        "target connections: {}",
        target.open_connections()
    );
    agent.stop().await;
    server.stop().await;
}
