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
