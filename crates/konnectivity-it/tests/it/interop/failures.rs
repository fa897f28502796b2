//! Failures as the Go clients see them: no agent, an abandoned dial, a refused port, an agent that dies
//! mid-transfer, each compared with the reference.

use super::*;
use konnectivity_it::stack::ServerRun;

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
        let (rust_server, go, agent_port) = our_server_or_the_go_one(&stack, ours).await;
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

#[tokio::test]
async fn a_go_client_sees_the_same_outcome_when_the_agent_dies_mid_transfer() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let mut outcomes = Vec::new();
    for ours in [true, false] {
        let stack = Stack::new().expect("pki");
        let (rust_server, go, agent_port) = our_server_or_the_go_one(&stack, ours).await;
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

/// Our server (gRPC, on the stack's socket) when `ours`, else the Go one, ready: whichever runs, and its agent
/// port.
async fn our_server_or_the_go_one(stack: &Stack, ours: bool) -> (Option<ServerRun>, Option<GoServer>, u16) {
    if ours {
        let s = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
        let port = s.agent_addr.port();
        (Some(s), None, port)
    } else {
        let g = go_server(stack, "grpc");
        wait_ready_healthz(g.health_port, &g.proc).await;
        let port = g.agent_port;
        (None, Some(g), port)
    }
}
