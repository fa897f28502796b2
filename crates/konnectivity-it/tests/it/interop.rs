//! Interop with the real Go reference (apiserver-network-proxy v0.36.0): its proxy-server, proxy-agent and
//! test client, kube-apiserver's konnectivity-client, and its egress selector, all built from the Go module
//! proxy by `interop/build.sh` (which `scripts/test` runs first). Every cell moves a real HTTP exchange and a
//! 20 MiB byte-checked transfer.

use konnectivity_client::{ProxyAddress, Tunnel, http_connect};
use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled};
use konnectivity_it::targets::{http_target, pattern, sha256_hex};
use konnectivity_testkit::{ChildProcess, free_port};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 20 << 20;

fn go_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/bin").join(name);
    assert!(p.exists(), "{} is missing: run interop/build.sh (scripts/test does)", p.display());
    p
}

/// Starts one of the Go binaries, its output in `log` (its tail shows in failure messages); killed when dropped.
fn go_process(bin: &str, args: &[String], log: PathBuf) -> ChildProcess {
    ChildProcess::spawn_logged(bin, Command::new(go_bin(bin)).args(args), log).unwrap_or_else(|e| panic!("{e}"))
}

/// The lines of a log tail shown in failure messages.
const LOG_TAIL: usize = 15;

/// The status of `GET path` on a loopback HTTP port, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    String::from_utf8_lossy(&buf).split(' ').nth(1)?.parse().ok()
}

/// Waits up to 30 s until `GET path` on loopback `port` answers 200; fails with `what`'s log otherwise.
async fn wait_ok(port: u16, path: &str, what: &ChildProcess) {
    konnectivity_it::eventually!(
        30,
        http_status(port, path).await == Some(200),
        "no 200 from {path}; log:\n{}",
        what.log_tail(LOG_TAIL)
    );
}

async fn wait_ready(port: u16, what: &ChildProcess) {
    wait_ok(port, "/readyz", what).await;
}

fn go_agent(stack: &Stack, agent_port: u16, id: &str, identifiers: &str) -> (ChildProcess, u16) {
    let health = free_port();
    let args = [
        stack.agent_process_flags(agent_port),
        vec![
            format!("--agent-id={id}"),
            format!("--agent-identifiers={identifiers}"),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={health}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=1s".into(),
            "--v=2".into(),
        ],
    ]
    .concat();
    (go_process("proxy-agent", &args, stack.dir().join(format!("go-agent-{id}.log"))), health)
}

struct GoServer {
    proc: ChildProcess,
    agent_port: u16,
    health_port: u16,
    /// The mTLS TCP frontend port, when the server has one instead of the socket.
    frontend_port: Option<u16>,
}

fn go_server(stack: &Stack, mode: &str) -> GoServer {
    go_server_with(stack, mode, false, 1)
}

fn go_server_with(stack: &Stack, mode: &str, tcp_frontend: bool, server_count: u32) -> GoServer {
    let (agent_port, health_port) = (free_port(), free_port());
    let frontend_port = tcp_frontend.then(free_port);
    let mut args = vec![
        format!("--mode={mode}"),
        format!("--cluster-cert={}", stack.pki.server_cert.display()),
        format!("--cluster-key={}", stack.pki.server_key.display()),
        format!("--cluster-ca-cert={}", stack.pki.ca.display()),
        format!("--agent-port={agent_port}"),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--health-port={health_port}"),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", free_port()),
        "--admin-bind-address=127.0.0.1".into(),
        "--server-id=go-server".into(),
        format!("--server-count={server_count}"),
        "--v=2".into(),
    ];
    match frontend_port {
        Some(port) => args.extend([
            format!("--server-port={port}"),
            "--server-bind-address=127.0.0.1".into(),
            format!("--server-cert={}", stack.pki.server_cert.display()),
            format!("--server-key={}", stack.pki.server_key.display()),
            format!("--server-ca-cert={}", stack.pki.ca.display()),
        ]),
        None => args.extend([format!("--uds-name={}", stack.uds.display()), "--server-port=0".into()]),
    }
    let proc = go_process("proxy-server", &args, stack.dir().join("go-server.log"));
    GoServer { proc, agent_port, health_port, frontend_port }
}

/// A Prometheus sample's value from a loopback `/metrics` page (`name` includes any labels).
async fn metric(port: u16, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Runs one of our Go client programs and returns its stdout, or panics with its stderr.
async fn go_client(bin: &str, args: &[String]) -> String {
    let out = tokio::process::Command::new(go_bin(bin)).args(args).output().await.expect("run go client");
    assert!(out.status.success(), "{bin} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a Go client expected to fail and returns its stderr.
async fn go_client_error(bin: &str, args: &[String]) -> String {
    let out = tokio::process::Command::new(go_bin(bin)).args(args).output().await.expect("run go client");
    assert!(!out.status.success(), "{bin} {args:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn egress_config(stack: &Stack, name: &str, body: &str) -> PathBuf {
    let path = stack.dir().join(name);
    let yaml = format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n{body}\n- name: controlplane\n  connection:\n    proxyProtocol: Direct\n- name: etcd\n  connection:\n    proxyProtocol: Direct\n"
    );
    std::fs::write(&path, yaml).expect("write egress config");
    path
}

fn egress_uds(stack: &Stack, protocol: &str) -> PathBuf {
    let body =
        format!("    proxyProtocol: {protocol}\n    transport:\n      uds:\n        udsName: {}", stack.uds.display());
    egress_config(stack, &format!("egress-{protocol}-uds.yaml"), &body)
}

fn want_sha() -> String {
    format!("{SIZE} {}", sha256_hex(&pattern(SIZE)))
}

/// An HTTP exchange and a 20 MiB checked download through a Rust client, gRPC or CONNECT.
async fn rust_client_cell(proxy: &ProxyAddress, connect_mode: bool, host: &str) {
    for (path, check) in [("/success".to_string(), None), (format!("/bytes/{SIZE}"), Some(sha256_hex(&pattern(SIZE))))]
    {
        let (status, body) = if connect_mode {
            let conn = http_connect::dial(proxy, host, "interop").await.expect("CONNECT");
            http::get(conn, host, &path).await.expect("get")
        } else {
            let tunnel = Tunnel::connect_single_use(proxy).await.expect("tunnel");
            let conn = tunnel.dial(host).await.expect("dial");
            http::get(conn, host, &path).await.expect("get")
        };
        assert_eq!(status, 200, "{path}");
        match check {
            None => assert_eq!(&body[..], b"success"),
            Some(sha) => assert_eq!(sha256_hex(&body), sha, "{path} corrupted"),
        }
    }
}

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
        let uds = stack.uds.display().to_string();
        if connect_mode {
            let config = egress_uds(&stack, "HTTPConnect");
            let out = go_client(
                "egress-client",
                &[
                    format!("--config={}", config.display()),
                    format!("--url=http://{host}/bytes/{SIZE}"),
                    "--sha256".into(),
                ],
            )
            .await;
            assert_eq!(out, want_sha());
        } else {
            let out = go_client(
                "grpc-client",
                &[
                    format!("--uds={uds}"),
                    format!("--target={host}"),
                    "--mode=sha256".into(),
                    format!("--path=/bytes/{SIZE}"),
                ],
            )
            .await;
            assert_eq!(out, want_sha());
        }
        // The Go agent's dial error text reaches our clients.
        let closed = konnectivity_it::targets::closed_port().expect("closed port");
        let refused = closed.addr.to_string();
        let err = if connect_mode {
            http_connect::dial(&proxy, &refused, "interop").await.expect_err("refused").message
        } else {
            Tunnel::connect_single_use(&proxy).await.expect("tunnel").dial(&refused).await.expect_err("refused").message
        };
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
        let uds = stack.uds.display().to_string();
        if connect_mode {
            let config = egress_uds(&stack, "HTTPConnect");
            let out = go_client(
                "egress-client",
                &[
                    format!("--config={}", config.display()),
                    format!("--url=http://{host}/bytes/{SIZE}"),
                    "--sha256".into(),
                ],
            )
            .await;
            assert_eq!(out, want_sha());
        } else {
            let out = go_client(
                "grpc-client",
                &[
                    format!("--uds={uds}"),
                    format!("--target={host}"),
                    "--mode=sha256".into(),
                    format!("--path=/bytes/{SIZE}"),
                ],
            )
            .await;
            assert_eq!(out, want_sha());
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
            let config = egress_uds(&stack, "GRPC");
            let out = go_client(
                "egress-client",
                &[
                    format!("--config={}", config.display()),
                    format!("--url=http://{host}/bytes/{SIZE}"),
                    "--sha256".into(),
                ],
            )
            .await;
            assert_eq!(out, want_sha());
        }
        let closed = konnectivity_it::targets::closed_port().expect("closed port");
        let refused = closed.addr.to_string();
        let err = if connect_mode {
            http_connect::dial(&proxy, &refused, "interop").await.expect_err("refused").message
        } else {
            Tunnel::connect_single_use(&proxy).await.expect("tunnel").dial(&refused).await.expect_err("refused").message
        };
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
        let out = go_client(
            "egress-client",
            &[format!("--config={}", config.display()), format!("--url=http://{host}/bytes/{SIZE}"), "--sha256".into()],
        )
        .await;
        assert_eq!(out, want_sha(), "{frontend:?}");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn go_client_sees_no_agent_available_from_our_server() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let err = go_client_error(
        "grpc-client",
        &[format!("--uds={}", stack.uds.display()), "--target=127.0.0.1:9".into(), "--fail-fast".into()],
    )
    .await;
    assert!(err.contains("No agent available"), "{err}");
    assert_settled(&server, None).await;
    server.stop().await;
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
    let out = go_client(
        "egress-client",
        &[format!("--config={}", config.display()), format!("--url=http://{host}/bytes/{SIZE}"), "--sha256".into()],
    )
    .await;
    assert_eq!(out, want_sha());
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

/// The reason label the Go client gives a failed dial, from grpc-client's stderr.
fn reason_of(stderr: &str) -> String {
    stderr.lines().find_map(|l| l.strip_prefix("dial failure reason: ")).unwrap_or("<none>").to_string()
}

#[tokio::test]
async fn the_go_client_sees_the_same_failure_reasons_from_our_server_as_from_the_reference() {
    use konnectivity_it::fake_agent::FakeAgent;
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let refused = closed.addr.to_string();
    let mut seen: Vec<Vec<String>> = Vec::new();
    for ours in [true, false] {
        let stack = Stack::new().expect("pki");
        let uds = format!("--uds={}", stack.uds.display());
        // Our server, or the Go one; agents connect to `agent_port`.
        let (rust_server, go, agent_port) = if ours {
            let s = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
            let port = s.agent_addr.port();
            (Some(s), None, port)
        } else {
            let g = go_server(&stack, "grpc");
            wait_ready_healthz(g.health_port, &g.proc).await;
            let port = g.agent_port;
            (None, Some(g), port)
        };
        let mut reasons = Vec::new();
        // No agent.
        let err =
            go_client_error("grpc-client", &[uds.clone(), "--target=127.0.0.1:9".into(), "--fail-fast".into()]).await;
        assert!(err.contains("No agent available"), "{err}");
        reasons.push(reason_of(&err));
        // A dial the agent never answers, abandoned by the caller's deadline.
        let silent = FakeAgent::connect(&stack.pki, format!("127.0.0.1:{agent_port}").parse().expect("addr"), "silent")
            .await
            .expect("fake agent");
        let err = go_client_error(
            "grpc-client",
            &[uds.clone(), "--target=127.0.0.1:9".into(), "--fail-fast".into(), "--timeout=1s".into()],
        )
        .await;
        reasons.push(reason_of(&err));
        drop(silent);
        // A refused port, through a real agent (ours).
        let agent = stack
            .start_agent(stack.agent_config(format!("127.0.0.1:{agent_port}").parse().expect("addr")))
            .await
            .expect("agent");
        konnectivity_it::eventually!(15, agent.handle.ready(), "agent did not connect");
        let err =
            go_client_error("grpc-client", &[uds.clone(), format!("--target={refused}"), "--fail-fast".into()]).await;
        assert!(err.contains("connection refused"), "{err}");
        reasons.push(reason_of(&err));
        agent.stop().await;
        if let Some(s) = rust_server {
            assert_settled(&s, None).await;
            s.stop().await;
        }
        drop(go);
        seen.push(reasons);
    }
    assert_eq!(seen[0], seen[1], "Go client's failure reasons: ours {:?} vs reference {:?}", seen[0], seen[1]);
    assert_eq!(seen[0], ["endpoint", "context", "endpoint"]);
}

async fn wait_ready_healthz(port: u16, what: &ChildProcess) {
    wait_ok(port, "/healthz", what).await;
}

#[tokio::test]
async fn mixed_ha_pair_behind_a_load_balancer_every_agent_reaches_every_server() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let stack = Stack::new().expect("pki");
    // Our server on a TCP frontend (the Go one has the socket), both told there are two servers.
    let mut config = stack.server_config(Frontend::TcpMtls);
    config.server_id = "rust-server".into();
    config.server_count = 2;
    let rust_server = stack.start_server(config).await.expect("our server");
    let go = go_server_with(&stack, "grpc", false, 2);
    wait_ready_healthz(go.health_port, &go.proc).await;
    let lb = konnectivity_it::targets::tcp_balancer(vec![
        rust_server.agent_addr,
        format!("127.0.0.1:{}", go.agent_port).parse().expect("addr"),
    ])
    .await
    .expect("balancer");

    let mut agent_config = stack.agent_config(lb.addr);
    agent_config.agent_id = "rust-agent".into();
    let rust_agent = stack.start_agent(agent_config).await.expect("our agent");
    let (go_agent, go_agent_health) = go_agent(&stack, lb.addr.port(), "go-agent", "");

    konnectivity_it::eventually!(
        30,
        rust_agent.handle.connected_servers().len() == 2,
        "our agent reaches {:?}",
        rust_agent.handle.connected_servers()
    );
    konnectivity_it::eventually!(
        30,
        rust_server.handle.agent_count() == 2,
        "our server has {:?}",
        rust_server.handle.agents().iter().map(|a| a.agent_id.clone()).collect::<Vec<_>>()
    );
    konnectivity_it::eventually!(
        30,
        metric(go.health_port, "konnectivity_network_proxy_server_ready_backend_connections").await == Some(2.0),
        "Go server: {}",
        go.proc.log_tail(LOG_TAIL)
    );
    konnectivity_it::eventually!(
        30,
        metric(go_agent_health, "konnectivity_network_proxy_agent_open_server_connections").await == Some(2.0),
        "Go agent: {}",
        go_agent.log_tail(LOG_TAIL)
    );
    let mut servers = rust_agent.handle.connected_servers();
    servers.sort();
    assert_eq!(servers, ["go-server", "rust-server"]);

    // Both servers serve dials (each may pick either agent).
    for _ in 0..4 {
        rust_client_cell(&stack.proxy_address(&rust_server).expect("addr"), false, &host).await;
        let out = go_client(
            "grpc-client",
            &[format!("--uds={}", stack.uds.display()), format!("--target={host}"), "--path=/success".into()],
        )
        .await;
        assert_eq!(out, "success");
    }
    assert_settled(&rust_server, None).await;
    drop(go_agent);
    rust_agent.stop().await;
    rust_server.stop().await;
}

#[tokio::test]
async fn our_agent_drains_from_the_go_server_on_sigterm() {
    const BIG: usize = 1 << 30;
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let stack = Stack::new().expect("pki");
    let go = go_server(&stack, "grpc");
    wait_ready_healthz(go.health_port, &go.proc).await;

    // Our agent as a real process, so the signal path is the binary's.
    let health = free_port();
    let mut ours = ChildProcess::spawn_logged(
        "proxy-agent",
        Command::new(crate::faults::binary("proxy-agent")).args(stack.agent_process_flags(go.agent_port)).args([
            "--agent-id=rust-agent".into(),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={health}"),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
            // The 1 GiB transfer below must not be cut by the default 25s.
            "--drain-timeout=5m".into(),
        ]),
        stack.dir().join("rust-agent.log"),
    )
    .expect("spawn our agent");
    wait_ready(go.health_port, &go.proc).await;

    // An in-flight transfer, necessarily through our agent (the only one yet), read continuously: the Go
    // server reads an agent's packets in order, so an unread connection would hold up the DRAIN too.
    let tunnel = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
    let mut inflight = tunnel.dial(&host).await.expect("dial");
    inflight
        .write_all(format!("GET /bytes/{BIG} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        let _tunnel = tunnel;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            inflight.read_exact(&mut byte).await.expect("head");
            head.push(byte[0]);
        }
        let mut hash = konnectivity_it::targets::StreamHash::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = inflight.read(&mut buf).await.expect("in-flight read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            seen.store(hash.len, std::sync::atomic::Ordering::Relaxed);
        }
        (hash.len, hash.hex())
    });
    konnectivity_it::eventually!(15, progress.load(std::sync::atomic::Ordering::Relaxed) > 0, "transfer did not start");

    let (go_agent, _) = go_agent(&stack, go.agent_port, "go-agent", "");
    konnectivity_it::eventually!(
        30,
        metric(go.health_port, "konnectivity_network_proxy_server_ready_backend_connections").await == Some(2.0),
        "the Go server does not have both agents; Go agent's log:\n{}",
        go_agent.log_tail(LOG_TAIL)
    );

    let dial_count = "konnectivity_network_proxy_agent_dial_duration_seconds_count";
    let dials_before = metric(health, dial_count).await.expect("our agent's metrics");
    // SIGTERM: our agent sends DRAIN; the Go server logs that it marked the backend draining.
    ours.terminate();
    konnectivity_it::eventually!(
        30,
        go.proc.log().contains("marked backend as draining"),
        "the Go server never saw DRAIN; its log:\n{}",
        go.proc.log_tail(LOG_TAIL)
    );

    // New dials go to the other agent.
    for _ in 0..10 {
        let t = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
        let conn = t.dial(&host).await.expect("dial during drain");
        assert_eq!(http::get(conn, &host, "/success").await.expect("get").0, 200);
    }
    assert_eq!(metric(health, dial_count).await, Some(dials_before), "a new dial went to the draining agent");

    // The in-flight transfer was still running across the drain, and completes through the draining agent.
    assert!(!reader.is_finished(), "the transfer ended before the drain; the test proves nothing");
    let (len, sha) =
        tokio::time::timeout(Duration::from_secs(120), reader).await.expect("transfer finished").expect("reader");
    assert_eq!(len, BIG, "in-flight transfer cut by the drain");
    assert_eq!(sha, konnectivity_it::targets::pattern_sha256(BIG), "in-flight transfer damaged by the drain");

    // With nothing left to carry, our agent exits by itself (the reference needs a second signal).
    let exited = ours.exit_within(Duration::from_secs(10)).await;
    let status = exited.unwrap_or_else(|| panic!("our agent did not exit after draining; log:\n{}", ours.log()));
    assert!(status.success(), "agent exit status {status:?}");
    drop(go_agent);
}

#[tokio::test]
async fn a_go_client_sees_the_same_outcome_when_the_agent_dies_mid_transfer() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let mut outcomes = Vec::new();
    for ours in [true, false] {
        let stack = Stack::new().expect("pki");
        let (rust_server, go, agent_port) = if ours {
            let s = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
            let port = s.agent_addr.port();
            (Some(s), None, port)
        } else {
            let g = go_server(&stack, "grpc");
            wait_ready_healthz(g.health_port, &g.proc).await;
            let port = g.agent_port;
            (None, Some(g), port)
        };
        // Our agent as a process, killed with SIGKILL while the Go client downloads 1 GiB through it.
        let mut agent = ChildProcess::spawn(
            "proxy-agent",
            Command::new(crate::faults::binary("proxy-agent"))
                .args(stack.agent_process_flags(agent_port))
                .args(["--health-server-port=0", "--admin-server-port=0", "--sync-interval=100ms"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("spawn our agent");
        match (&rust_server, &go) {
            (Some(s), _) => konnectivity_it::eventually!(15, s.handle.ready(), "agent did not connect"),
            (_, Some(g)) => wait_ready(g.health_port, &g.proc).await,
            _ => unreachable!(),
        }
        let client = tokio::process::Command::new(go_bin("grpc-client"))
            .args([
                format!("--uds={}", stack.uds.display()),
                format!("--target={host}"),
                "--mode=sha256".into(),
                format!("--path=/bytes/{}", 1u64 << 30),
                "--timeout=60s".into(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run grpc-client");
        konnectivity_it::eventually!(30, target.open_connections() > 0, "the transfer did not start");
        agent.kill();
        let out = tokio::time::timeout(Duration::from_secs(30), client.wait_with_output())
            .await
            .expect("the Go client hung after the agent died")
            .expect("client output");
        assert!(!out.status.success(), "a truncated transfer looked complete");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        outcomes.push(if err.contains("unexpected EOF") { "unexpected EOF".to_string() } else { err });
        if let Some(s) = rust_server {
            assert_settled(&s, None).await;
            s.stop().await;
        }
        drop(go);
        konnectivity_it::eventually!(10, target.open_connections() == 0, "target connections left");
    }
    assert_eq!(outcomes[0], outcomes[1], "ours vs reference");
    assert_eq!(outcomes[0], "unexpected EOF");
}

/// ALPN and `--cipher-suites` against the reference: the Go server refuses clients without h2 as ours does, our
/// agent's `--alpn-proto` reaches it through an ALPN router, the Go agent's reaches ours, and the Go server's
/// `--cipher-suites` narrows TLS 1.2 as ours does.
#[tokio::test]
async fn alpn_and_cipher_suites_agree_with_the_reference() {
    use crate::tls::{AlpnRouter, Probe};
    use rustls::crypto::ring::cipher_suite as suite;
    let stack = Stack::new().expect("pki");
    let read = |p: &PathBuf| std::fs::read_to_string(p).expect("read pem");
    let identity = (read(&stack.pki.agent_cert), read(&stack.pki.agent_key));
    let probe = Probe::trusting(&read(&stack.pki.ca)).presenting(&identity);

    let go = go_server(&stack, "grpc");
    wait_ready_healthz(go.health_port, &go.proc).await;
    let go_agent_port: std::net::SocketAddr = format!("127.0.0.1:{}", go.agent_port).parse().expect("addr");
    let err = probe.clone().alpn(&["konnectivity"]).run(go_agent_port).await.expect_err("Go: no h2 offered");
    assert!(err.contains("NoApplicationProtocol"), "the Go server refused differently: {err}");
    probe.clone().alpn(&[]).run(go_agent_port).await.expect_err("Go: no ALPN at all");
    let ok = probe.clone().alpn(&["konnectivity", "h2"]).run(go_agent_port).await.expect("Go: h2 among others");
    assert_eq!(ok.alpn.as_deref(), Some(&b"h2"[..]));

    // Our agent, --alpn-proto=konnectivity, through an ALPN router to the Go server.
    let router = AlpnRouter::start("konnectivity", go_agent_port).await;
    let mut config = stack.agent_config(go_agent_port);
    config.servers = vec![konnectivity_agent::ServerAddress::new("127.0.0.1", router.addr.port())];
    config.alpn_protos = vec!["konnectivity".into()];
    let agent = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(15, agent.handle.ready(), "our agent did not reach the Go server via the router");
    assert_eq!(agent.handle.connected_servers(), ["go-server"]);
    assert_eq!(router.offered()[0], ["konnectivity", "h2"]);
    let target = konnectivity_it::targets::echo_target("127.0.0.1:0").await.expect("echo");
    let tunnel = Tunnel::connect_single_use(&ProxyAddress::Uds(stack.uds.clone())).await.expect("tunnel");
    let mut conn = tunnel.dial(&target.addr.to_string()).await.expect("dial");
    conn.write_all(b"alpn").await.expect("write");
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"alpn");
    drop((conn, tunnel));
    agent.stop().await;
    drop(router);
    drop(go);

    // The Go agent, --alpn-proto=konnectivity, through an ALPN router to our server.
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let router = AlpnRouter::start("konnectivity", server.agent_addr).await;
    let args = [
        stack.agent_process_flags(router.addr.port()),
        vec![
            "--alpn-proto=konnectivity".into(),
            "--agent-id=go-alpn-agent".into(),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={}", free_port()),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
            "--v=2".into(),
        ],
    ]
    .concat();
    let go_agent = go_process("proxy-agent", &args, stack.dir().join("go-alpn-agent.log"));
    konnectivity_it::eventually!(
        15,
        server.handle.ready(),
        "the Go agent did not reach our server; log:\n{}",
        go_agent.log_tail(LOG_TAIL)
    );
    assert_eq!(router.offered()[0], ["konnectivity", "h2"], "the Go agent's ALPN list");
    drop(go_agent);
    drop(router);
    server.stop().await;

    // --cipher-suites on the Go server: the same outcomes as ours (tls::cipher_suites_restrict_tls12_on_both_listeners).
    let (agent_port, health_port) = (free_port(), free_port());
    let args = vec![
        format!("--cluster-cert={}", stack.pki.server_cert.display()),
        format!("--cluster-key={}", stack.pki.server_key.display()),
        format!("--cluster-ca-cert={}", stack.pki.ca.display()),
        format!("--agent-port={agent_port}"),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--health-port={health_port}"),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", free_port()),
        "--admin-bind-address=127.0.0.1".into(),
        format!("--uds-name={}", stack.dir().join("cipher.sock").display()),
        "--server-port=0".into(),
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_AES_128_GCM_SHA256".into(),
    ];
    let go = go_process("proxy-server", &args, stack.dir().join("go-cipher-server.log"));
    wait_ready_healthz(health_port, &go).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{agent_port}").parse().expect("addr");
    probe
        .clone()
        .tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256])
        .run(addr)
        .await
        .expect_err("Go: a suite not allowed");
    let ok = probe.clone().tls12_with(&[suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]).run(addr).await;
    assert_eq!(ok.expect("Go: the allowed suite").suite, rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
    let tls13 = probe.run(addr).await.expect("Go: TLS 1.3 is not restricted");
    assert!(format!("{:?}", tls13.suite).starts_with("TLS13_"), "{:?}", tls13.suite);
}
