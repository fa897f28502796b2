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

mod cells;
mod failures;
mod ha_and_drain;
mod tls;

const SIZE: usize = 20 << 20;

fn go_bin(name: &str) -> PathBuf {
    konnectivity_it::controlplane::interop_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
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

/// The flags every Go server of these tests has: the stack's certificates, an mTLS agent port and health and
/// admin ports on loopback.
fn go_server_flags(stack: &Stack, agent_port: u16, health_port: u16) -> Vec<String> {
    vec![
        format!("--cluster-cert={}", stack.pki.server_cert.display()),
        format!("--cluster-key={}", stack.pki.server_key.display()),
        format!("--cluster-ca-cert={}", stack.pki.ca.display()),
        format!("--agent-port={agent_port}"),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--health-port={health_port}"),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", free_port()),
        "--admin-bind-address=127.0.0.1".into(),
    ]
}

fn go_server_with(stack: &Stack, mode: &str, tcp_frontend: bool, server_count: u32) -> GoServer {
    let (agent_port, health_port) = (free_port(), free_port());
    let frontend_port = tcp_frontend.then(free_port);
    let mut args = go_server_flags(stack, agent_port, health_port);
    args.extend([
        format!("--mode={mode}"),
        "--server-id=go-server".into(),
        format!("--server-count={server_count}"),
        "--v=2".into(),
    ]);
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

async fn wait_ready_healthz(port: u16, what: &ChildProcess) {
    wait_ok(port, "/healthz", what).await;
}

/// The 20 MiB download through the Go side's client for the mode, over the socket: kube-apiserver's egress
/// selector (HTTPConnect) or the Go konnectivity-client (gRPC); checks length and SHA-256.
async fn go_client_download(stack: &Stack, host: &str, connect_mode: bool) {
    let out = if connect_mode {
        egress_sha256(&egress_uds(stack, "HTTPConnect"), host).await
    } else {
        let args = [
            format!("--uds={}", stack.uds.display()),
            format!("--target={host}"),
            "--mode=sha256".into(),
            format!("--path=/bytes/{SIZE}"),
        ];
        go_client("grpc-client", &args).await
    };
    assert_eq!(out, want_sha());
}

/// `egress-client` fetching the 20 MiB body as `config` says: its output (length and SHA-256).
async fn egress_sha256(config: &std::path::Path, host: &str) -> String {
    let args =
        [format!("--config={}", config.display()), format!("--url=http://{host}/bytes/{SIZE}"), "--sha256".into()];
    go_client("egress-client", &args).await
}

/// The error text a dial to a closed port gets through `proxy`, gRPC or CONNECT.
async fn refused_dial_error(proxy: &ProxyAddress, connect_mode: bool) -> String {
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let refused = closed.addr.to_string();
    if connect_mode {
        http_connect::dial(proxy, &refused, "interop").await.expect_err("refused").message
    } else {
        Tunnel::connect_single_use(proxy).await.expect("tunnel").dial(&refused).await.expect_err("refused").message
    }
}
