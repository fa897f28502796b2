//! The egress policy's known holes, closed: with the recommended profile (deny loopback and link-local), every
//! spelling of "this node's loopback" is refused, whether the agent enforces the policy too or only the server
//! does, through both frontends; and names the server cannot check are given only to agents that enforce the
//! same policy.

use konnectivity_client::{ProxyAddress, Tunnel, http_connect};
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_it::stack::{AgentRun, Frontend, ServerRun, Stack, assert_settled};
use std::sync::Arc;

/// The profile docs/security.md recommends.
const RECOMMENDED: &str = r#"{"rules": [
    {"name": "loopback", "action": "deny", "cidr": ["127.0.0.0/8", "::1/128"]},
    {"name": "link-local", "action": "deny", "cidr": ["169.254.0.0/16", "fe80::/10"]}
]}"#;

/// Every way of writing the node's own loopback that Linux or a resolver would take there.
fn loopback_spellings(port: u16) -> Vec<String> {
    [
        "0.0.0.0",
        "0",
        "[::]",
        "[::ffff:0.0.0.0]",
        "localhost",
        "127.1",
        "2130706433",
        "[::1%1]",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "127.0.0.1",
        "[::1]",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect()
}

async fn dial(frontend: Frontend, proxy: &ProxyAddress, destination: &str) -> Result<(), String> {
    if frontend == Frontend::Uds {
        let tunnel = Tunnel::connect_single_use(proxy).await.map_err(|e| e.to_string())?;
        tunnel.dial(destination).await.map(drop).map_err(|e| e.to_string())
    } else {
        http_connect::dial(proxy, destination, "policy-test").await.map(drop).map_err(|e| e.to_string())
    }
}

async fn start(stack: &Stack, frontend: Frontend, server: &str, agent: Option<&str>) -> (ServerRun, AgentRun) {
    let mut config = stack.server_config(frontend);
    config.egress_policy = Arc::new(EgressPolicy::parse(server).expect("server policy"));
    let server = stack.start_server(config).await.expect("server");
    let mut agent_config = stack.agent_config(server.agent_addr);
    if let Some(policy) = agent {
        agent_config.egress_policy = Arc::new(EgressPolicy::parse(policy).expect("agent policy"));
    }
    let agent = stack.start_agent(agent_config).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready() && agent.handle.ready(), "agent did not connect");
    (server, agent)
}

#[tokio::test]
async fn every_spelling_of_loopback_is_refused_with_the_policy_on_server_and_agent_or_server_only() {
    // A service on the node's loopback that the tunnel must never reach.
    let service = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("node-local service");
    let port = service.local_addr().expect("addr").port();
    for agent_policy in [Some(RECOMMENDED), None] {
        for frontend in [Frontend::Uds, Frontend::ConnectUds] {
            let stack = Stack::new().expect("stack");
            let (server, agent) = start(&stack, frontend, RECOMMENDED, agent_policy).await;
            let proxy = stack.proxy_address(&server).expect("proxy address");
            for destination in loopback_spellings(port) {
                let result = dial(frontend, &proxy, &destination).await;
                let error = result.err().unwrap_or_else(|| {
                    panic!("{destination} reached the node's loopback ({frontend:?}, agent policy {agent_policy:?})")
                });
                assert!(
                    error.contains("denied by egress policy") || error.contains("Forbidden") || error.contains("403"),
                    "{destination}: refused for another reason: {error}"
                );
            }
            assert_settled(&server, Some(&agent)).await;
            agent.stop().await;
            server.stop().await;
        }
    }
    // Nothing was ever accepted by the service.
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(200), service.accept()).await;
    assert!(accepted.is_err(), "a connection reached the node-local service");
}

/// A name whose verdict depends on what it resolves to goes only to an agent that enforces the server's policy.
#[tokio::test]
async fn names_go_only_to_agents_that_enforce_the_same_policy() {
    let target = konnectivity_it::targets::http_target("127.0.0.1:0").await.expect("target");
    let destination = format!("localhost:{}", target.addr.port());
    // Allows 127.0.0.0/8 only: a name may be allowed, but only its resolution says.
    let policy = r#"{"default": "deny", "rules": [{"name": "loopback-ok", "action": "allow", "cidr": "127.0.0.0/8"}]}"#;
    let named = "node.invalid:80";
    // An agent with a policy of its own that is not the server's.
    let other = r#"{"rules": [{"name": "no-ssh", "action": "deny", "ports": "22"}]}"#;
    for (agent_policy, name_allowed) in [(Some(policy), true), (None, false), (Some(other), false)] {
        let stack = Stack::new().expect("stack");
        let (server, agent) = start(&stack, Frontend::Uds, policy, agent_policy).await;
        let proxy = stack.proxy_address(&server).expect("proxy address");
        // An IP literal the server decides itself: allowed whatever the agent enforces.
        dial(Frontend::Uds, &proxy, &target.addr.to_string()).await.expect("IP literal");
        // localhost is loopback for the policy without a resolver: decided on the server too.
        let local = dial(Frontend::Uds, &proxy, &destination).await;
        assert!(local.is_ok(), "localhost refused: {local:?}");
        // A name: the agent must enforce this very policy.
        let error = dial(Frontend::Uds, &proxy, named).await.expect_err("the name does not exist");
        let refused_by_server = error.contains("does not enforce this server's egress policy");
        assert_eq!(!refused_by_server, name_allowed, "agent policy {agent_policy:?}: {error}");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}
