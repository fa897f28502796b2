//! The audit log (`--audit-log-path`): one JSON line per connection opened, per dial that failed, and per
//! connection closed, with the client's identity and exact byte counts. Each test reads the file after the
//! server has stopped (the stop waits for the writer), so every line is there.

use konnectivity_client::http_connect;
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_it::fake_agent::FakeAgent;
use konnectivity_it::stack::{Frontend, ServerRun, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::{closed_port, echo_target, http_target};
use konnectivity_proto::{Packet, PacketKind};
use konnectivity_server::{AuditConfig, AuditOutput, ServerConfig};
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A server configuration for `frontend` that writes its audit log into the stack's directory.
fn audited(stack: &Stack, frontend: Frontend) -> (ServerConfig, PathBuf) {
    let path = stack.dir().join("audit.log");
    let mut config = stack.server_config(frontend);
    config.audit = Some(AuditConfig::new(AuditOutput::File(path.clone())));
    (config, path)
}

/// Every line of the audit log, parsed (each must be one JSON object).
fn lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("audit log");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

fn counter(server: &ServerRun, name: &str, label: &str) -> f64 {
    let sample = konnectivity_it::metrics::labelled(server.handle.metrics().registry(), name, label);
    sample.map(|m| m.get_counter().get_value()).unwrap_or(f64::NAN)
}

/// `2025-01-31T23:59:59.123Z`.
fn assert_rfc3339_millis(time: &Value) {
    let t = time.as_str().expect("time is a string");
    let b = t.as_bytes();
    assert!(
        t.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && t.ends_with('Z'),
        "not RFC 3339 UTC with milliseconds: {t}"
    );
}

/// Connects through `frontend` to `destination` (a single-use gRPC tunnel or an HTTP CONNECT stream).
async fn open(stack: &Stack, server: &ServerRun, frontend: Frontend, destination: &str) -> Result<Box<dyn Io>, String> {
    let proxy = stack.proxy_address(server).expect("proxy address");
    if matches!(frontend, Frontend::ConnectUds | Frontend::ConnectTcpMtls) {
        return http_connect::dial(&proxy, destination, "audit-test")
            .await
            .map(|c| Box::new(c) as Box<dyn Io>)
            .map_err(|e| e.message);
    }
    let tunnel = konnectivity_client::Tunnel::connect_single_use(&proxy).await.expect("tunnel");
    tunnel
        .dial(destination)
        .await
        .map(|c| Box::new(WithTunnel { conn: c, _tunnel: tunnel }) as Box<dyn Io>)
        .map_err(|e| e.message)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A tunneled connection that keeps its tunnel alive as long as it lives.
struct WithTunnel {
    conn: konnectivity_client::TunnelConn,
    _tunnel: konnectivity_client::Tunnel,
}
impl AsyncRead for WithTunnel {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}
impl AsyncWrite for WithTunnel {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.conn).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.conn).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

/// The client identity the audit log must show for `frontend`.
fn assert_client(stack: &Stack, frontend: Frontend, line: &Value) {
    let f = &line["frontend"];
    let mode =
        if matches!(frontend, Frontend::ConnectUds | Frontend::ConnectTcpMtls) { "http-connect" } else { "grpc" };
    assert_eq!(f["mode"], mode, "{line}");
    match frontend {
        Frontend::Uds | Frontend::ConnectUds => {
            // The client is this test process (SO_PEERCRED), running as the owner of the files it creates.
            assert_eq!(f["transport"], "uds", "{line}");
            assert_eq!(f["pid"].as_u64(), Some(u64::from(std::process::id())), "{line}");
            let uid = std::fs::metadata(stack.dir()).expect("dir").uid();
            assert_eq!(f["uid"].as_u64(), Some(u64::from(uid)), "{line}");
            assert!(f["gid"].is_u64(), "{line}");
        }
        Frontend::TcpMtls | Frontend::ConnectTcpMtls => {
            // The client certificate's subject (the test PKI's frontend certificate).
            assert_eq!(f["transport"], "tcp", "{line}");
            assert_eq!(f["subject"], "CN=kube-apiserver", "{line}");
            assert!(f["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{line}");
        }
    }
}

#[tokio::test]
async fn http_gets_are_audited_open_and_close_with_exact_byte_counts_through_every_frontend() {
    const CLOSING: &str = "GET /success HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n";
    const KEEP_ALIVE: &str = "GET /success HTTP/1.1\r\nHost: target\r\n\r\n";
    for frontend in [Frontend::Uds, Frontend::TcpMtls, Frontend::ConnectUds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (config, path) = audited(&stack, frontend);
        let server_id = config.server_id.clone();
        let server = stack.start_server(config).await.expect("server");
        let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
        konnectivity_it::eventually!(10, server.handle.ready() && agent.handle.ready(), "agent did not connect");
        let agent_id = server.handle.agents()[0].agent_id.clone();
        let target = http_target("127.0.0.1:0").await.expect("target");
        let destination = target.addr.to_string();

        // 1. The target closes after its response (Connection: close): the agent closes the connection.
        let mut conn = open(&stack, &server, frontend, &destination).await.expect("dial");
        conn.write_all(CLOSING.as_bytes()).await.expect("write");
        let mut closing_response = Vec::new();
        conn.read_to_end(&mut closing_response).await.expect("read to the end");
        assert!(closing_response.ends_with(b"\r\n\r\nsuccess"), "{}", String::from_utf8_lossy(&closing_response));
        drop(conn);
        assert_settled(&server, Some(&agent)).await;

        // 2. The client closes once it has the response.
        let mut conn = open(&stack, &server, frontend, &destination).await.expect("dial");
        conn.write_all(KEEP_ALIVE.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        while !response.ends_with(b"success") {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "early EOF");
            response.extend_from_slice(&buf[..n]);
        }
        drop(conn);
        assert_settled(&server, Some(&agent)).await;
        assert_eq!(counter(&server, "konnectivity_network_proxy_server_audit_events_total", "open"), 2.0);
        assert_eq!(counter(&server, "konnectivity_network_proxy_server_audit_events_total", "close"), 2.0);
        assert_eq!(counter(&server, "konnectivity_network_proxy_server_audit_events_dropped_total", "queue_full"), 0.0);
        agent.stop().await;
        server.stop().await;

        let log = lines(&path);
        let events: Vec<&str> = log.iter().map(|l| l["event"].as_str().unwrap_or("?")).collect();
        assert_eq!(events, ["open", "close", "open", "close"], "{frontend:?}: {log:#?}");
        let expected =
            [(CLOSING, closing_response.len(), "agent closed"), (KEEP_ALIVE, response.len(), "client closed")];
        for (pair, (request, response_len, reason)) in log.chunks(2).zip(expected) {
            let (open, close) = (&pair[0], &pair[1]);
            for line in [open, close] {
                assert_rfc3339_millis(&line["time"]);
                assert_client(&stack, frontend, line);
                assert_eq!(line["server_id"], server_id.as_str(), "{line}");
                assert_eq!(line["destination"], destination.as_str(), "{line}");
                assert_eq!(line["agent_id"], agent_id.as_str(), "{line}");
                assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
                assert!(line.get("error").is_none(), "{line}");
            }
            assert!(open["dial_id"].as_i64().is_some_and(|id| id != 0), "{open}");
            assert!(open["connect_id"].as_i64().is_some_and(|id| id > 0), "{open}");
            assert_eq!((&close["dial_id"], &close["connect_id"]), (&open["dial_id"], &open["connect_id"]));
            assert!(open.get("bytes_client_to_target").is_none() && open.get("reason").is_none(), "{open}");
            assert_eq!(close["reason"], reason, "{frontend:?}: {close}");
            assert_eq!(close["bytes_client_to_target"].as_u64(), Some(request.len() as u64), "{frontend:?}: {close}");
            assert_eq!(close["bytes_target_to_client"].as_u64(), Some(response_len as u64), "{frontend:?}: {close}");
        }
    }
}

#[tokio::test]
async fn a_refused_dial_is_audited_with_the_agents_error() {
    for frontend in [Frontend::Uds, Frontend::ConnectUds] {
        let stack = Stack::new().expect("pki");
        let (config, path) = audited(&stack, frontend);
        let server = stack.start_server(config).await.expect("server");
        let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
        konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
        let closed = closed_port().expect("closed port");
        let destination = closed.addr.to_string();
        let error = open(&stack, &server, frontend, &destination).await.err().expect("refused");
        assert!(error.contains("connection refused"), "{error}");
        assert_settled(&server, Some(&agent)).await;
        assert_eq!(counter(&server, "konnectivity_network_proxy_server_audit_events_total", "dial_failed"), 1.0);
        agent.stop().await;
        server.stop().await;

        let log = lines(&path);
        assert_eq!(log.len(), 1, "{log:#?}");
        let line = &log[0];
        assert_eq!(line["event"], "dial_failed", "{line}");
        assert_eq!(line["reason"], "dial error", "{line}");
        assert!(line["error"].as_str().is_some_and(|e| e.contains("connection refused")), "{line}");
        assert_eq!(line["destination"], destination.as_str(), "{line}");
        assert!(line["agent_id"].is_string() && line["dial_id"].is_i64(), "{line}");
        assert!(line.get("connect_id").is_none() && line.get("bytes_client_to_target").is_none(), "{line}");
        assert_client(&stack, frontend, line);
    }
}

#[tokio::test]
async fn a_dial_denied_by_egress_policy_or_without_agent_is_audited() {
    let policy = r#"{"rules": [{"name": "blocked", "action": "deny", "cidr": "127.0.0.3/32"}]}"#;
    for frontend in [Frontend::Uds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (mut config, path) = audited(&stack, frontend);
        config.egress_policy = Arc::new(EgressPolicy::parse(policy).expect("policy"));
        let server = stack.start_server(config).await.expect("server");

        // No agent yet.
        let error = open(&stack, &server, frontend, "127.0.0.2:80").await.err().expect("no agent");
        assert!(error.contains("No agent available"), "{error}");

        let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
        konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
        let error = open(&stack, &server, frontend, "127.0.0.3:80").await.err().expect("denied");
        assert!(error.contains("denied by egress policy: blocked"), "{error}");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;

        let log = lines(&path);
        assert_eq!(log.len(), 2, "{log:#?}");
        let (no_agent, denied) = (&log[0], &log[1]);
        assert_eq!(
            (&no_agent["event"], &no_agent["reason"]),
            (&"dial_failed".into(), &"no agent".into()),
            "{no_agent}"
        );
        assert_eq!(no_agent["error"], "No agent available", "{no_agent}");
        assert_eq!(no_agent["destination"], "127.0.0.2:80", "{no_agent}");
        assert_eq!(denied["event"], "dial_failed", "{denied}");
        assert_eq!(denied["reason"], "denied by egress policy", "{denied}");
        assert_eq!(denied["error"], "denied by egress policy: blocked", "{denied}");
        assert_eq!(denied["destination"], "127.0.0.3:80", "{denied}");
        // Refused before any agent was involved.
        assert!(denied.get("agent_id").is_none() && no_agent.get("agent_id").is_none(), "{log:#?}");
        for line in &log {
            assert_client(&stack, frontend, line);
            assert_rfc3339_millis(&line["time"]);
        }
    }
}

#[tokio::test]
async fn an_agent_lost_mid_transfer_is_audited_with_the_bytes_so_far() {
    for frontend in [Frontend::Uds, Frontend::ConnectUds] {
        let stack = Stack::new().expect("pki");
        let (config, path) = audited(&stack, frontend);
        let server = stack.start_server(config).await.expect("server");
        let mut agent = FakeAgent::connect(&stack.pki, server.agent_addr, "doomed").await.expect("fake agent");
        konnectivity_it::eventually!(10, server.handle.ready(), "fake agent not registered");

        let dial = {
            let (stack_proxy, destination) = (stack.proxy_address(&server).expect("addr"), "10.9.9.9:80");
            let connect = matches!(frontend, Frontend::ConnectUds);
            tokio::spawn(async move {
                if connect {
                    Box::new(http_connect::dial(&stack_proxy, destination, "t").await.expect("dial")) as Box<dyn Io>
                } else {
                    let tunnel = konnectivity_client::Tunnel::connect_single_use(&stack_proxy).await.expect("tunnel");
                    let conn = tunnel.dial(destination).await.expect("dial");
                    Box::new(WithTunnel { conn, _tunnel: tunnel }) as Box<dyn Io>
                }
            })
        };
        let req = agent.next().await.expect("DIAL_REQ");
        let Ok(PacketKind::DialRequest(req)) = req.kind() else { panic!("expected DIAL_REQ") };
        agent.to_server.send(Packet::dial_response(req.random, 1, "")).await.expect("DIAL_RSP");
        let mut conn = dial.await.expect("dial task");

        conn.write_all(b"hello").await.expect("write");
        let data = agent.next().await.expect("DATA");
        assert!(matches!(data.kind(), Ok(PacketKind::Data(d)) if &d.data[..] == b"hello"), "expected DATA");
        agent.to_server.send(Packet::data(1, bytes::Bytes::from(vec![7u8; 1000]))).await.expect("DATA");
        let mut got = vec![0u8; 1000];
        conn.read_exact(&mut got).await.expect("read");

        drop(agent); // mid-transfer: the agent's connection goes away
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the client's connection did not end after the agent left");
        assert_settled(&server, None).await;
        server.stop().await;

        let log = lines(&path);
        let events: Vec<&str> = log.iter().map(|l| l["event"].as_str().unwrap_or("?")).collect();
        assert_eq!(events, ["open", "close"], "{log:#?}");
        let close = &log[1];
        assert_eq!(close["reason"], "agent disconnected", "{close}");
        assert_eq!(close["error"], "agent doomed disconnected", "{close}");
        assert_eq!(close["agent_id"], "doomed", "{close}");
        assert_eq!(close["destination"], "10.9.9.9:80", "{close}");
        assert_eq!((close["dial_id"].as_i64(), close["connect_id"].as_i64()), (Some(req.random), Some(1)), "{close}");
        assert_eq!(close["bytes_client_to_target"].as_u64(), Some(5), "{close}");
        assert_eq!(close["bytes_target_to_client"].as_u64(), Some(1000), "{close}");
        assert_client(&stack, frontend, close);
    }
}

#[tokio::test]
async fn connections_open_at_stop_are_closed_by_the_shutdown_and_the_writer_ends() {
    let stack = Stack::new().expect("pki");
    let (config, path) = audited(&stack, Frontend::Uds);
    let server = stack.start_server(config).await.expect("server");
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
    let echo = echo_target("127.0.0.1:0").await.expect("echo");
    let mut conn = open(&stack, &server, Frontend::Uds, &echo.addr.to_string()).await.expect("dial");
    conn.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.expect("echo");
    // The stop itself asserts that no task is left, the audit writer's included.
    server.stop().await;
    drop(conn);
    agent.stop().await;

    let log = lines(&path);
    let events: Vec<&str> = log.iter().map(|l| l["event"].as_str().unwrap_or("?")).collect();
    assert_eq!(events, ["open", "close"], "{log:#?}");
    assert_eq!(log[1]["reason"], "server shutdown", "{}", log[1]);
    assert_eq!(
        (log[1]["bytes_client_to_target"].as_u64(), log[1]["bytes_target_to_client"].as_u64()),
        (Some(4), Some(4))
    );
}

#[tokio::test]
async fn server_and_agent_without_audit_log_write_nothing_and_export_no_audit_metrics() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let mut conn = open(&stack, &server, Frontend::Uds, &target.addr.to_string()).await.expect("dial");
    conn.write_all(b"GET /success HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    assert_settled(&server, Some(&agent)).await;
    let families = server.handle.metrics().registry().gather();
    assert!(families.iter().all(|f| !f.name().contains("audit")), "audit metrics exported while disabled");
    assert!(
        std::fs::read_dir(stack.dir()).expect("dir").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("audit"))
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_binary_writes_audit_lines_to_stdout_with_a_dash() {
    use tokio::io::AsyncBufReadExt;
    let stack = Stack::new().expect("pki");
    let mut child = tokio::process::Command::new(crate::faults::binary("proxy-server"))
        .args([
            format!("--uds-name={}", stack.uds.display()),
            "--server-port=0".into(),
            format!("--cluster-cert={}", stack.pki.server_cert.display()),
            format!("--cluster-key={}", stack.pki.server_key.display()),
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--server-id=stdout-test".into(),
            "--audit-log-path=-".into(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn proxy-server");
    konnectivity_it::eventually!(10, stack.uds.exists(), "the server did not create its socket");
    let proxy = konnectivity_client::ProxyAddress::Uds(stack.uds.clone());
    let tunnel = konnectivity_client::Tunnel::connect_single_use(&proxy).await.expect("tunnel");
    let error = tunnel.dial("127.0.0.1:9").await.expect_err("no agent");
    assert_eq!(error.message, "No agent available");

    let stdout = child.stdout.take().expect("stdout");
    let mut stdout = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), stdout.next_line())
        .await
        .expect("an audit line on stdout within 10s")
        .expect("read stdout")
        .expect("a line");
    let line: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!((&line["event"], &line["reason"]), (&"dial_failed".into(), &"no agent".into()), "{line}");
    assert_eq!((&line["server_id"], &line["destination"]), (&"stdout-test".into(), &"127.0.0.1:9".into()), "{line}");
    assert_eq!(line["frontend"]["pid"].as_u64(), Some(u64::from(std::process::id())), "{line}");
    child.kill().await.expect("kill");
}

#[tokio::test]
async fn dials_left_unanswered_are_audited_as_timeout_or_frontend_gone() {
    let stack = Stack::new().expect("pki");
    let (mut config, path) = audited(&stack, Frontend::ConnectUds);
    config.backend_dial_timeout = Some(std::time::Duration::from_millis(300));
    let server = stack.start_server(config).await.expect("server");
    // An agent that takes every DIAL_REQ and never answers.
    let mut agent = FakeAgent::connect(&stack.pki, server.agent_addr, "silent").await.expect("fake agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "fake agent not registered");

    // The client waits: --backend-dial-timeout fails the dial.
    let proxy = stack.proxy_address(&server).expect("addr");
    let error = http_connect::dial(&proxy, "10.0.0.1:443", "t").await.expect_err("timeout");
    assert!(error.message.starts_with("504"), "{}", error.message);
    assert!(matches!(agent.next().await.expect("DIAL_REQ").kind(), Ok(PacketKind::DialRequest(_))));

    // The client leaves while its dial is pending.
    let mut s = tokio::net::UnixStream::connect(&stack.uds).await.expect("connect");
    s.write_all(b"CONNECT 10.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
    loop {
        // Past the first dial's DIAL_CLS to the second DIAL_REQ.
        if matches!(agent.next().await.expect("packet").kind(), Ok(PacketKind::DialRequest(r)) if r.address == "10.0.0.2:443")
        {
            break;
        }
    }
    drop(s);
    assert_settled(&server, None).await;
    server.stop().await;

    let log = lines(&path);
    let summary: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|l| {
            (
                l["event"].as_str().unwrap_or("?"),
                l["reason"].as_str().unwrap_or("?"),
                l["destination"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("dial_failed", "timeout", "10.0.0.1:443"), ("dial_failed", "frontend gone", "10.0.0.2:443")],
        "{log:#?}"
    );
    assert!(log.iter().all(|l| l["agent_id"] == "silent"), "{log:#?}");
    assert_eq!(log[0]["error"], konnectivity_proto::names::BACKEND_DIAL_TIMEOUT, "{}", log[0]);
    assert!(log[0]["duration_ms"].as_f64().is_some_and(|d| d >= 300.0), "{}", log[0]);
}
