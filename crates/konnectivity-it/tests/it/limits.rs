//! Bounds on what clients can hold before they have done anything useful: TLS handshakes in progress per
//! listener (`--max-concurrent-handshakes`) and HTTP CONNECT connections handled at once
//! (`--max-connect-connections`). Beyond a bound the listener accepts nothing more until a slot frees, so clients
//! wait in the kernel's backlog; nothing is refused or lost.

use konnectivity_it::eventually;
use konnectivity_it::stack::{self, Frontend, Stack};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// With room for two handshakes on the agent port, two clients that connect and say nothing hold the agent out
/// until one of them leaves; then it connects at once.
#[tokio::test]
async fn stalled_handshakes_hold_the_agent_port_only_to_the_bound() {
    let stack = Stack::new().expect("stack");
    let mut config = stack.server_config(Frontend::Uds);
    config.max_handshakes = 2;
    let server = stack.start_server(config).await.expect("server");
    let first = TcpStream::connect(server.agent_addr).await.expect("stalled client 1");
    let _second = TcpStream::connect(server.agent_addr).await.expect("stalled client 2");
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    // Two handshakes are in progress (both clients silent): the agent's connection waits in the backlog.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!server.handle.ready(), "the agent connected although both handshake slots were held");
    drop(first);
    eventually!(10, server.handle.ready() && agent.handle.ready(), "the agent did not connect once a slot freed");
    agent.stop().await;
    server.stop().await;
}

/// With room for one CONNECT connection, a second client is not served while the first holds its tunnel, and is
/// served as soon as the first closes.
#[tokio::test]
async fn connect_connections_beyond_the_bound_wait_their_turn() {
    let stack = Stack::new().expect("stack");
    let mut config = stack.server_config(Frontend::ConnectUds);
    config.max_connect_connections = 1;
    let server = stack.start_server(config).await.expect("server");
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    eventually!(10, server.handle.ready() && agent.handle.ready(), "agent not connected");
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("target");
    let target_addr = target.local_addr().expect("addr");
    let accepting = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = target.accept().await {
            kept.push(s);
        }
    });
    let request = format!("CONNECT {target_addr} HTTP/1.1\r\nHost: {target_addr}\r\n\r\n");
    let connect = |path: std::path::PathBuf, request: String| async move {
        let mut s = UnixStream::connect(path).await.expect("connect to the frontend");
        s.write_all(request.as_bytes()).await.expect("request");
        s
    };
    let mut first = connect(stack.uds.clone(), request.clone()).await;
    let mut head = [0u8; 39];
    first.read_exact(&mut head).await.expect("first answer");
    assert_eq!(&head[..], konnectivity_server::CONNECTION_ESTABLISHED);
    let mut second = connect(stack.uds.clone(), request.clone()).await;
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_secs(2), second.read(&mut byte)).await;
    assert!(waited.is_err(), "the second CONNECT was served while the only slot was taken");
    drop(first);
    let mut head = [0u8; 39];
    tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut head))
        .await
        .expect("the second CONNECT was not served once the slot freed")
        .expect("second answer");
    assert_eq!(&head[..], konnectivity_server::CONNECTION_ESTABLISHED);
    drop(second);
    stack::assert_settled(&server, Some(&agent)).await;
    accepting.abort();
    agent.stop().await;
    server.stop().await;
}

/// A port free on loopback now (bound and released; the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The soft open-file limit of process `pid`, from /proc.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).expect("soft limit")
}

/// A server started with the soft open-file limit at 1,024 (as common service managers leave it) raises it to
/// the hard limit, as the Go runtime does; and 3,000 idle TCP connections on its agent port do not slow a
/// kube-apiserver CONNECT on its frontend.
#[tokio::test]
async fn thousands_of_idle_agent_port_connections_do_not_delay_a_connect() {
    let stack = Stack::new().expect("stack");
    let (agent_port, health, admin) = (free_port(), free_port(), free_port());
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| l.lines().find(|l| l.starts_with("Max open files")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .expect("our hard open-file limit");
    let server_bin = crate::faults::binary("proxy-server");
    let mut server = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg("--")
        .arg(server_bin)
        .args([
            "--mode=http-connect".to_string(),
            format!("--uds-name={}", stack.uds.display()),
            "--server-port=0".into(),
            format!("--cluster-cert={}", stack.pki.server_cert.display()),
            format!("--cluster-key={}", stack.pki.server_key.display()),
            format!("--cluster-ca-cert={}", stack.pki.ca.display()),
            format!("--agent-port={agent_port}"),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--health-port={health}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--admin-port={admin}"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn proxy-server under prlimit");
    let pid = server.id().expect("server pid");
    eventually!(10, stack.uds.exists(), "the server did not create its socket");
    let limit = soft_open_files(pid);
    assert_eq!(limit.to_string(), hard, "the server kept its soft open-file limit ({limit}) below the hard one");
    let agent_addr: std::net::SocketAddr = format!("127.0.0.1:{agent_port}").parse().expect("addr");
    let agent = stack.start_agent(stack.agent_config(agent_addr)).await.expect("agent");
    eventually!(10, agent.handle.ready(), "agent did not connect");
    let target = konnectivity_it::targets::http_target("127.0.0.1:0").await.expect("target");

    // 3,000 connections that never say a word (each attempt bounded: beyond the backlog the kernel drops SYNs).
    let mut idle = Vec::new();
    let attempts: Vec<_> =
        (0..3000).map(|_| tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(agent_addr))).collect();
    for attempt in futures_util::future::join_all(attempts).await {
        if let Ok(Ok(s)) = attempt {
            idle.push(s);
        }
    }
    let started = std::time::Instant::now();
    let mut conn = konnectivity_client::http_connect::dial(
        &konnectivity_client::ProxyAddress::Uds(stack.uds.clone()),
        &target.addr.to_string(),
        "limits-test",
    )
    .await
    .expect("CONNECT during the flood");
    let took = started.elapsed();
    conn.write_all(b"GET /success HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).await.expect("reply");
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
    assert!(took < Duration::from_secs(1), "the CONNECT took {took:?} with {} idle agent-port connections", idle.len());
    drop(idle);
    agent.stop().await;
    let _ = server.kill().await;
}
