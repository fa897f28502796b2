//! Peers that vanish: an agent process killed mid-transfer, a server restarted under a connected agent.

use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::http_target;
use konnectivity_testkit::ChildProcess;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A built binary of this workspace (the test command builds them first); fails the test, saying so, without it.
pub(crate) fn binary(name: &str) -> PathBuf {
    konnectivity_it::controlplane::workspace_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

fn spawn_agent(stack: &Stack, agent_port: u16, id: &str) -> ChildProcess {
    let mut cmd = Command::new(binary("proxy-agent"));
    cmd.args(stack.agent_process_flags(agent_port))
        .args([
            format!("--agent-id={id}"),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--sync-interval=100ms".into(),
            "--sync-interval-cap=500ms".into(),
            "--v=1".into(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildProcess::spawn("proxy-agent", &mut cmd).expect("spawn proxy-agent")
}

#[tokio::test]
async fn agent_killed_mid_transfer_fails_streams_promptly_and_a_new_agent_serves() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let mut agent = spawn_agent(&stack, server.agent_addr.port(), "victim");
    konnectivity_it::eventually!(15, server.handle.ready(), "agent process did not connect");

    // Three transfers in flight, each read continuously by its own task.
    let progress: Vec<_> = (0..3).map(|_| std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0))).collect();
    let mut readers = Vec::new();
    for counter in &progress {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        let mut conn = tunnel.dial(&host).await.expect("dial");
        conn.write_all(format!("GET /bytes/{} HTTP/1.1\r\nHost: {host}\r\n\r\n", 1u64 << 34).as_bytes())
            .await
            .expect("write");
        let counter = counter.clone();
        readers.push(tokio::spawn(async move {
            let _tunnel = tunnel;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => return Err(e),
                };
            }
        }));
    }
    let moving = || progress.iter().all(|c| c.load(std::sync::atomic::Ordering::Relaxed) > (1 << 20));
    konnectivity_it::eventually!(15, moving(), "transfers did not get going");
    agent.kill();
    let killed_at = Instant::now();
    for reader in readers {
        // Every stream must end with an error, promptly, not hang and not look like a clean EOF.
        let outcome = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("stream did not end within 10s of the agent's death")
            .expect("reader task");
        let err = outcome.expect_err("the stream ended cleanly, as if the transfer were complete");
        assert!(err.to_string().contains("disconnected"), "unexpected error: {err}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(10));
    assert_settled(&server, None).await;
    konnectivity_it::eventually!(10, !server.handle.ready(), "server still lists the dead agent");

    let _replacement = spawn_agent(&stack, server.agent_addr.port(), "replacement");
    konnectivity_it::eventually!(15, server.handle.ready(), "replacement agent did not connect");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial via replacement");
    let (status, body) = http::get(conn, &host, "/success").await.expect("get");
    assert_eq!((status, &body[..]), (200, &b"success"[..]));
    assert_settled(&server, None).await;
    server.stop().await;
}

#[tokio::test]
async fn agent_reconnects_to_a_restarted_server() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let port = server.agent_addr.port();
    server.stop().await;
    konnectivity_it::eventually!(10, !agent.handle.ready(), "agent did not notice the server stopped");

    let mut config = stack.server_config(Frontend::Uds);
    config.agent_port = port;
    let restarted_at = Instant::now();
    let server = stack.start_server(config).await.expect("restart on the same port");
    // The agent's backoff is capped at 500 ms here: it must be back well within that plus a handshake.
    konnectivity_it::eventually!(5, server.handle.ready() && agent.handle.ready(), "agent did not reconnect");
    let reconnect = restarted_at.elapsed();
    assert!(reconnect < Duration::from_secs(3), "reconnect took {reconnect:?}");

    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial after restart");
    let (status, _) = http::get(conn, &host, "/success").await.expect("get");
    assert_eq!(status, 200);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn binaries_explain_startup_failures_log_where_klog_would_and_show_help() {
    // Leases need kube-apiserver: outside a cluster and without --kubeconfig, both binaries say so and stop.
    let stack = Stack::new().expect("pki");
    let out = Command::new(binary("proxy-server"))
        .args([
            "--enable-lease-controller",
            "--uds-name=/tmp/x",
            "--server-port=0",
            "--cluster-cert=/c",
            "--cluster-key=/k",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no --kubeconfig given and not running in a cluster"), "{stderr}");
    let out = Command::new(binary("proxy-agent"))
        .args([format!("--ca-cert={}", stack.pki.ca.display()), "--count-server-leases".into()])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no --kubeconfig given and not running in a cluster"), "{stderr}");

    // --logtostderr=false --log-file: the log goes to the file, errors to stderr as well (klog's default
    // --stderrthreshold=ERROR).
    let log = stack.dir().join("server.log");
    let mut server = ChildProcess::spawn(
        "proxy-server",
        Command::new(binary("proxy-server"))
            .args([
                format!("--uds-name={}", stack.dir().join("s.sock").display()),
                "--server-port=0".into(),
                format!("--cluster-cert={}", stack.pki.server_cert.display()),
                format!("--cluster-key={}", stack.pki.server_key.display()),
                "--agent-port=0".into(),
                "--admin-port=0".into(),
                "--health-port=0".into(),
                "--logtostderr=false".into(),
                format!("--log-file={}", log.display()),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("spawn");
    konnectivity_it::eventually!(
        10,
        std::fs::read_to_string(&log).unwrap_or_default().contains("listening for agents"),
        "no start-up line in {}",
        log.display()
    );
    server.terminate();
    let status = server.wait().expect("wait");
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut server.take_stderr().expect("stderr"), &mut stderr).expect("read");
    assert!(!stderr.contains("listening for agents"), "info lines stay in the file: {stderr}");

    for bin in ["proxy-server", "proxy-agent", "proxy-test-client"] {
        let out = Command::new(binary(bin)).arg("--help").output().expect("run");
        assert!(out.status.success(), "{bin} --help failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"), "{bin} --help");
    }
}

#[tokio::test]
async fn proxy_test_client_binary_fetches_through_the_tunnel() {
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::TcpMtls).await.expect("stack");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let konnectivity_server::FrontendAddr::Tcp(frontend) = server.frontend_addr.clone() else { panic!("tcp frontend") };
    let out = tokio::process::Command::new(binary("proxy-test-client"))
        .args([
            format!("--ca-cert={}", stack.pki.ca.display()),
            format!("--client-cert={}", stack.pki.client_cert.display()),
            format!("--client-key={}", stack.pki.client_key.display()),
            "--proxy-host=127.0.0.1".into(),
            format!("--proxy-port={}", frontend.port()),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={}", target.addr.port()),
            "--request-path=success".into(),
            "--test-requests=2".into(),
        ])
        .output()
        .await
        .expect("run proxy-test-client");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "successsuccess");
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_server_and_agent_dropped_without_stop_shut_down() {
    // What a test that panics before its explicit stop leaves behind: nothing that still listens.
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::TcpMtls).await.expect("stack");
    let konnectivity_server::FrontendAddr::Tcp(frontend) = server.frontend_addr.clone() else { panic!("tcp frontend") };
    let (agent_port, agent_health) = (server.agent_addr, agent.health_addr.expect("agent health port"));
    drop(agent);
    drop(server);
    for addr in [agent_port, frontend, agent_health] {
        konnectivity_it::eventually!(
            10,
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts after its server or agent was dropped"
        );
    }
}
