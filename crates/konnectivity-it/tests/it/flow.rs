//! Per-connection flow control between our server and agent: one connection whose reader stops must not slow
//! the others on the same agent stream, must not be cut off, and must not lose a byte.

use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::{http_target, pattern, sha256_hex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_stalled_reader_does_not_block_other_connections_and_loses_nothing() {
    const STALLED: usize = 32 << 20;
    const OTHER: usize = 64 << 20;
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();

    // The stalled connection: asks for 32 MiB, reads 1 byte, then nothing while the other transfer runs.
    let stalled_tunnel = stack.tunnel(&server).await.expect("tunnel");
    let mut stalled = stalled_tunnel.dial(&host).await.expect("dial");
    stalled
        .write_all(format!("GET /bytes/{STALLED} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut first = [0u8; 1];
    stalled.read_exact(&mut first).await.expect("first byte");

    // Another transfer through the same agent stream completes while the first is held. The bound only
    // guards against a hang; it is far above the reference's 5 s-per-stall behaviour times the transfer.
    let started = Instant::now();
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(60), http::get(conn, &host, &format!("/bytes/{OTHER}")))
            .await
            .expect("the second transfer hung behind the stalled reader")
            .expect("get");
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(OTHER)));
    let elapsed = started.elapsed();
    // No stall limit was hit: the server would have cut the stalled connection after 5 s.
    assert_eq!(server.handle.metrics().dial_failures(konnectivity_server::metrics::DialFailureReason::SendResponse), 0);

    // The stalled connection was neither cut nor lost data: read the rest and check every byte.
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).await.expect("read the held response");
    let mut whole = first.to_vec();
    whole.extend_from_slice(&rest);
    let text_end = whole.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
    assert_eq!(whole.len() - text_end, STALLED, "stalled response truncated");
    assert_eq!(sha256_hex(&whole[text_end..]), sha256_hex(&pattern(STALLED)));
    eprintln!("64 MiB beside a stalled reader took {elapsed:?}");
    drop(stalled);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn an_agent_that_overruns_its_credit_loses_only_that_connection() {
    use konnectivity_it::fake_agent::FakeAgent;
    use konnectivity_proto::{Packet, PacketKind};
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut agent = FakeAgent::connect_with(&stack.pki, server.agent_addr, "greedy", true).await.expect("fake agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "fake agent not registered");

    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let dial = tokio::spawn(async move {
        let conn = tunnel.dial("127.0.0.1:9").await.expect("dial");
        (conn, tunnel)
    });
    let req = agent.next().await.expect("DIAL_REQ");
    let Ok(PacketKind::DialRequest(req)) = req.kind() else { panic!("expected DIAL_REQ") };
    agent.to_server.send(Packet::dial_response(req.random, 1, "")).await.expect("DIAL_RSP");
    let (_conn, _tunnel) = dial.await.expect("dial task");

    // 12 MiB at once, never waiting for credit (the window is 4 MiB); the client reads nothing.
    let chunk = bytes::Bytes::from(vec![0u8; 256 * 1024]);
    for _ in 0..48 {
        agent.to_server.send(Packet::data(1, chunk.clone())).await.expect("DATA");
    }
    // The server closes that connection (CLOSE_REQ to the agent) instead of buffering without bound.
    loop {
        let p = agent.next().await.expect("a packet from the server");
        if matches!(p.kind(), Ok(PacketKind::CloseRequest(c)) if c.connect_id == 1) {
            break;
        }
    }
    drop(agent);
    assert_settled(&server, None).await;
    server.stop().await;
}
