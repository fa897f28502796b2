//! Interop with the real Go reference (apiserver-network-proxy v0.36.0): its proxy-server, proxy-agent and
//! test client, kube-apiserver's konnectivity-client, and its egress selector, all built from the Go module
//! proxy by `interop/build.sh` (which `scripts/test` runs first). Every cell moves a real HTTP exchange and a
//! 20 MiB byte-checked transfer.

use crate::http;
use konnectivity_client::{ProxyAddress, Tunnel, http_connect};
use konnectivity_it::stack::{Frontend, Stack, assert_settled};
use konnectivity_it::targets::{http_target, pattern, sha256_hex};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 20 << 20;

fn go_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/bin").join(name);
    assert!(p.exists(), "{} is missing: run interop/build.sh (scripts/test does)", p.display());
    p
}

/// A free loopback port the Go server accepts (it refuses ports above 49151).
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if (1024..=49151).contains(&port) {
            return port;
        }
    }
}

/// A child process killed (and reaped) when dropped; its stderr goes to a file shown on failure.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &str, args: &[String], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(go_bin(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Self { child, log }
    }
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of `GET path` on a loopback HTTP port, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    String::from_utf8_lossy(&buf).split(' ').nth(1)?.parse().ok()
}

async fn wait_ready(port: u16, what: &Proc) {
    for _ in 0..1500 {
        if http_status(port, "/readyz").await == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not ready within 30s; log:\n{}", what.log_tail());
}

fn go_agent(stack: &Stack, agent_port: u16, id: &str, identifiers: &str) -> (Proc, u16) {
    let health = free_port();
    let args = vec![
        format!("--ca-cert={}", stack.pki.ca.display()),
        format!("--agent-cert={}", stack.pki.agent_cert.display()),
        format!("--agent-key={}", stack.pki.agent_key.display()),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        format!("--agent-id={id}"),
        format!("--agent-identifiers={identifiers}"),
        "--health-server-host=127.0.0.1".into(),
        format!("--health-server-port={health}"),
        "--admin-bind-address=127.0.0.1".into(),
        format!("--admin-server-port={}", free_port()),
        "--sync-interval=200ms".into(),
        "--sync-interval-cap=1s".into(),
        "--v=2".into(),
    ];
    (Proc::spawn("proxy-agent", &args, stack.dir().join(format!("go-agent-{id}.log"))), health)
}

struct GoServer {
    proc: Proc,
    agent_port: u16,
    health_port: u16,
}

fn go_server(stack: &Stack, mode: &str) -> GoServer {
    let (agent_port, health_port) = (free_port(), free_port());
    let args = vec![
        format!("--mode={mode}"),
        format!("--uds-name={}", stack.uds.display()),
        "--server-port=0".into(),
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
        "--v=2".into(),
    ];
    let proc = Proc::spawn("proxy-server", &args, stack.dir().join("go-server.log"));
    GoServer { proc, agent_port, health_port }
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
        for _ in 0..1500 {
            if server.handle.ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(server.handle.ready(), "Go agent did not connect; log:\n{}", agent.log_tail());
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
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = closed.local_addr().expect("addr").to_string();
        drop(closed);
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
        }
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = closed.local_addr().expect("addr").to_string();
        drop(closed);
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
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let refused = closed.local_addr().expect("addr").to_string();
    drop(closed);
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
