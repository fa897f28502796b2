//! Bad peers and bad packets: each gets a clear answer and harms nothing else.

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::http_target;
use konnectivity_proto::agent::{AgentService, AgentServiceServer};
use konnectivity_proto::proxy::ProxyServiceClient;
use konnectivity_proto::{Packet, PacketKind};
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn raw_frontend(stack: &Stack) -> ProxyServiceClient<tonic::transport::Channel> {
    let path = stack.uds.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower_service(path))
        .await
        .expect("connect uds");
    ProxyServiceClient::new(channel)
}

fn tower_service(path: std::path::PathBuf) -> impl tower_service_like::Service {
    tower_service_like::uds(path)
}

/// A tiny stand-in for `tower::service_fn` so the test crate needs no direct tower dependency.
mod tower_service_like {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll};

    pub trait Service:
        tonic::codegen::Service<
            ::http::Uri,
            Response = TokioIo<tokio::net::UnixStream>,
            Error = std::io::Error,
            Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<tokio::net::UnixStream>>> + Send>>,
        > + Send
        + Clone
        + 'static
    {
    }

    #[derive(Clone)]
    pub struct Uds(std::path::PathBuf);

    pub fn uds(path: std::path::PathBuf) -> Uds {
        Uds(path)
    }

    impl tonic::codegen::Service<::http::Uri> for Uds {
        type Response = TokioIo<tokio::net::UnixStream>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ::http::Uri) -> Self::Future {
            let path = self.0.clone();
            Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
        }
    }

    impl Service for Uds {}
}

#[tokio::test]
async fn frontend_data_before_dial_gets_backend_not_initialized() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let mut client = raw_frontend(&stack).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(Packet::data(7, bytes::Bytes::from_static(b"early"))).await.expect("queue");
    let mut inbound = client.proxy(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let packet = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("answer")
        .expect("ok")
        .expect("packet");
    match packet.kind() {
        Ok(PacketKind::CloseResponse(c)) => {
            assert_eq!(c.connect_id, 7);
            assert_eq!(c.error, "backend not initialized");
        }
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }
    // CLOSE_REQ before a dial on a fresh stream: "backend uninitialized", and the stream keeps serving.
    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(Packet::close_request(3)).await.expect("queue");
    let mut inbound2 = client.proxy(ReceiverStream::new(rx2)).await.expect("stream").into_inner();
    let packet = inbound2.message().await.expect("ok").expect("packet");
    assert!(matches!(packet.kind(), Ok(PacketKind::CloseResponse(c)) if c.error == "backend uninitialized"));
    drop((tx, tx2));
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_frontend_message_closes_only_its_stream() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();

    // A healthy connection open across the bad stream's life.
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let mut healthy = tunnel.dial(&target.addr.to_string()).await.expect("dial");

    let mut client = raw_frontend(&stack).await.max_encoding_message_size(16 << 20);
    let (tx, rx) = mpsc::channel(4);
    tx.send(Packet::data(1, bytes::Bytes::from(vec![0u8; 5 << 20]))).await.expect("queue");
    let result = client.proxy(ReceiverStream::new(rx)).await;
    let failed = match result {
        Err(status) => status,
        Ok(resp) => match resp.into_inner().message().await {
            Err(status) => status,
            Ok(other) => panic!("oversized message was accepted: {other:?}"),
        },
    };
    assert!(
        failed.message().contains("message length too large")
            || failed.code() == tonic::Code::ResourceExhausted
            || failed.code() == tonic::Code::OutOfRange,
        "unexpected status: {failed:?}"
    );
    drop(tx);

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    healthy
        .write_all(format!("GET /success HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut resp = Vec::new();
    healthy.read_to_end(&mut resp).await.expect("read");
    assert!(String::from_utf8_lossy(&resp).ends_with("success"), "{}", String::from_utf8_lossy(&resp));
    drop(healthy);
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial after bad stream");
    assert_eq!(http::get(conn, &host, "/success").await.expect("get").0, 200);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn agent_without_valid_client_certificate_is_refused() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    // No client certificate at all, then one from an unrelated CA.
    let mut no_cert = stack.agent_config(server.agent_addr);
    no_cert.agent_cert = None;
    let mut rogue = stack.agent_config(server.agent_addr);
    rogue.agent_cert = Some((stack.pki.rogue_cert.clone(), stack.pki.rogue_key.clone()));
    for config in [no_cert, rogue] {
        let agent = stack.start_agent(config).await.expect("agent");
        let failures = || {
            let name = "konnectivity_network_proxy_agent_server_connection_failure_count";
            let samples = konnectivity_it::metrics::samples(agent.handle.metrics().registry(), name);
            samples.iter().map(|m| m.get_counter().get_value()).sum::<f64>()
        };
        konnectivity_it::eventually!(10, failures() >= 2.0, "agent did not fail to connect twice");
        assert!(!agent.handle.ready());
        assert_eq!(server.handle.agent_count(), 0, "server accepted an unauthenticated agent");
        agent.stop().await;
    }
    // The refusals are counted, by reason.
    let name = "konnectivity_network_proxy_server_tls_handshake_failures_total";
    let samples = konnectivity_it::metrics::samples(server.handle.metrics().registry(), name);
    let failures: f64 = samples.iter().map(|m| m.get_counter().get_value()).sum();
    assert!(failures >= 2.0, "handshake failures counted: {failures}");
    // The server still serves a valid agent.
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "valid agent refused");
    agent.stop().await;
    server.stop().await;
}

/// A fake proxy-server: sends the agent the packets a test gives it and reports what the agent answers.
struct FakeServer {
    to_agent: std::sync::Mutex<Option<mpsc::Receiver<Packet>>>,
    from_agent: mpsc::Sender<Packet>,
}

#[tonic::async_trait]
impl AgentService for FakeServer {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<Packet, tonic::Status>> + Send>>;
    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<Packet>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let Some(rx) = self.to_agent.lock().expect("lock").take() else {
            return Err(tonic::Status::unavailable("one stream only"));
        };
        let mut inbound = request.into_inner();
        let from_agent = self.from_agent.clone();
        tokio::spawn(async move {
            while let Ok(Some(p)) = inbound.message().await {
                if from_agent.send(p).await.is_err() {
                    break;
                }
            }
        });
        use futures_util::StreamExt;
        let mut resp = tonic::Response::new(Box::pin(ReceiverStream::new(rx).map(Ok)) as Self::ConnectStream);
        resp.metadata_mut().insert("serverid", "fake".parse().expect("header"));
        resp.metadata_mut().insert("servercount", "1".parse().expect("header"));
        Ok(resp)
    }
}

#[tokio::test]
async fn agent_answers_unknown_connection_ids_as_the_reference() {
    let stack = Stack::new().expect("pki");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let tls = konnectivity_transport::tls::server_config(
        &stack.pki.server_cert,
        &stack.pki.server_key,
        &konnectivity_transport::tls::ClientAuth::Require(stack.pki.ca.clone()),
        &[konnectivity_transport::tls::ALPN_H2],
    )
    .expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = konnectivity_transport::listen::tls_incoming(
        listener,
        tls,
        shutdown.clone(),
        tracker.clone(),
        konnectivity_transport::listen::TlsAccept::named("fake"),
    );
    let (to_agent, to_agent_rx) = mpsc::channel(16);
    let (from_agent_tx, mut from_agent) = mpsc::channel(16);
    let fake = FakeServer { to_agent: std::sync::Mutex::new(Some(to_agent_rx)), from_agent: from_agent_tx };
    let token = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(fake))
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned()),
    );
    let agent = stack.start_agent(stack.agent_config(addr)).await.expect("agent");
    konnectivity_it::eventually!(10, agent.handle.ready(), "agent did not connect to the fake server");

    to_agent.send(Packet::data(99, bytes::Bytes::from_static(b"who?"))).await.expect("send");
    let p = next(&mut from_agent).await;
    assert!(
        matches!(p.clone().kind(), Ok(PacketKind::CloseResponse(c)) if c.connect_id == 99 && c.error == "unrecognized connectID"),
        "got {p:?}"
    );
    to_agent.send(Packet::close_request(98)).await.expect("send");
    let p = next(&mut from_agent).await;
    assert!(
        matches!(p.clone().kind(), Ok(PacketKind::CloseResponse(c)) if c.connect_id == 98 && c.error == "Unknown connectID"),
        "got {p:?}"
    );
    // A malformed packet (type says DATA, payload is a CLOSE_REQ) is dropped; the stream keeps working.
    to_agent
        .send(Packet { r#type: konnectivity_proto::PacketType::Data as i32, payload: Packet::close_request(1).payload })
        .await
        .expect("send");
    let refused = konnectivity_it::targets::closed_port().expect("closed port");
    let refused_addr = refused.addr;
    to_agent.send(Packet::dial_request(refused_addr.to_string(), 5)).await.expect("send");
    let p = next(&mut from_agent).await;
    match p.kind() {
        Ok(PacketKind::DialResponse(d)) => {
            assert_eq!(d.random, 5);
            assert_eq!(d.connect_id, 0);
            assert!(d.error.contains("connection refused"), "{}", d.error);
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
    agent.stop().await;
    shutdown.cancel();
    let _ = server.await;
}

async fn next(rx: &mut mpsc::Receiver<Packet>) -> Packet {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("agent answered").expect("packet")
}

#[tokio::test]
async fn tls13_only_server_refuses_a_tls12_client_and_serves_agents() {
    use konnectivity_transport::tls;
    let stack = Stack::new().expect("pki");
    let mut config = stack.server_config(Frontend::Uds);
    config.tls_min_version = tls::MinVersion::Tls13;
    let server = stack.start_server(config).await.expect("server");
    // Our agent offers 1.2 and 1.3 and gets 1.3.
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect over TLS 1.3");
    // A client that only speaks TLS 1.2 is refused at the handshake.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let roots = tls::load_roots(&stack.pki.ca).expect("roots");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tls::load_certs(&stack.pki.agent_cert).expect("cert"),
            tls::load_key(&stack.pki.agent_key).expect("key"),
        )
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(server.agent_addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let result = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client)).connect(name, tcp).await;
    assert!(result.is_err(), "a TLS 1.2 handshake succeeded against a TLS 1.3-only server");
    agent.stop().await;
    server.stop().await;
}

/// A connection that closes before the frontend's first DATA for it (here the endpoint hangs up at once) is
/// not a protocol error: the late DATA is dropped, with no "mismatched connection IDs" close, and the stream
/// stays usable.
#[tokio::test]
async fn data_for_a_connection_closed_before_the_first_data_is_dropped_quietly() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = konnectivity_it::targets::serve_listener(listener, |tcp, _| async move { drop(tcp) }).expect("target");

    let mut client = raw_frontend(&stack).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(Packet::dial_request(target.addr.to_string(), 42)).await.expect("queue");
    let mut inbound = client.proxy(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("answer")
            .expect("ok")
            .expect("packet")
    };
    let connect_id = match next().await.kind() {
        Ok(PacketKind::DialResponse(r)) if r.error.is_empty() => r.connect_id,
        other => panic!("expected a successful DIAL_RSP, got {other:?}"),
    };
    match next().await.kind() {
        Ok(PacketKind::CloseResponse(c)) => assert_eq!((c.connect_id, c.error.as_str()), (connect_id, "")),
        other => panic!("expected the endpoint's CLOSE_RSP, got {other:?}"),
    }
    konnectivity_it::eventually!(5, server.handle.established_connections() == 0, "connection not closed");

    tx.send(Packet::data(connect_id, bytes::Bytes::from_static(b"late"))).await.expect("queue");
    let after = tokio::time::timeout(Duration::from_millis(500), inbound.message()).await;
    assert!(after.is_err(), "late DATA was answered: {after:?}");

    // The stream was not stopped as a protocol error: it ends cleanly when the frontend ends it.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("stream ends");
    assert!(matches!(end, Ok(None)), "stream ended with {end:?}");
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}
