//! Egress policy: checked on the server before a dial is sent and on the agent after names are resolved.

use konnectivity_client::http_connect;
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled};
use konnectivity_it::targets::http_target;
use std::sync::Arc;

fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
    konnectivity_it::metrics::samples(registry, name).first().map(|m| m.get_counter().get_value()).unwrap_or(0.0)
}

#[tokio::test]
async fn denied_by_address_port_and_by_what_a_name_resolves_to_through_both_frontends() {
    let server_policy = r#"{"rules": [
        {"name": "blocked-ip", "action": "deny", "cidr": "127.0.0.3/32"},
        {"name": "no-discard", "action": "deny", "ports": "9"},
        {"name": "no-metadata-names", "action": "deny", "host": "*.internal"}
    ]}"#;
    // The agent allows one loopback address and denies the rest, v4 and v6: so "localhost" (resolved by the
    // agent, from /etc/hosts) is refused after resolution, which the server cannot see beforehand.
    let agent_policy = r#"{"rules": [
        {"action": "allow", "cidr": "127.0.0.2/32"},
        {"name": "loopback", "action": "deny", "cidr": ["127.0.0.0/8", "::1/128"]}
    ]}"#;
    let allowed = http_target("127.0.0.2:0").await.expect("target");
    for frontend in [Frontend::Uds, Frontend::ConnectUds] {
        let stack = Stack::new().expect("pki");
        let mut config = stack.server_config(frontend);
        config.egress_policy = Arc::new(EgressPolicy::parse(server_policy).expect("server policy"));
        let server = stack.start_server(config).await.expect("server");
        let mut agent_config = stack.agent_config(server.agent_addr);
        agent_config.egress_policy = Arc::new(EgressPolicy::parse(agent_policy).expect("agent policy"));
        let agent = stack.start_agent(agent_config).await.expect("agent");
        konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
        let proxy = stack.proxy_address(&server).expect("addr");
        let localhost = format!("localhost:{}", allowed.addr.port());

        // (destination, expected error text or None for success)
        let cases = [
            (allowed.addr.to_string(), None),
            (format!("127.0.0.3:{}", allowed.addr.port()), Some("denied by egress policy: blocked-ip")),
            ("127.0.0.2:9".to_string(), Some("denied by egress policy: no-discard")),
            (localhost, Some("denied by egress policy: loopback")),
            // By name, on the server, before anything is resolved (the name does not even exist).
            ("metadata.google.internal:80".to_string(), Some("denied by egress policy: no-metadata-names")),
        ];
        for (destination, denial) in &cases {
            let result = if frontend == Frontend::Uds {
                match konnectivity_client::Tunnel::connect_single_use(&proxy)
                    .await
                    .expect("tunnel")
                    .dial(destination)
                    .await
                {
                    Ok(conn) => Ok(http::get(conn, destination, "/success").await.expect("get").0),
                    Err(e) => Err(e.message),
                }
            } else {
                match http_connect::dial(&proxy, destination, "test").await {
                    Ok(conn) => Ok(http::get(conn, destination, "/success").await.expect("get").0),
                    Err(e) => Err(e.message),
                }
            };
            match (denial, result) {
                (None, Ok(status)) => assert_eq!(status, 200),
                (Some(text), Err(message)) => {
                    assert!(message.contains(text), "{frontend:?} {destination}: {message}");
                    if frontend == Frontend::ConnectUds {
                        assert!(message.starts_with("403 Forbidden"), "{destination}: {message}");
                    }
                }
                (want, got) => panic!("{frontend:?} {destination}: wanted {want:?}, got {got:?}"),
            }
        }
        assert_eq!(
            counter(
                server.handle.metrics().registry(),
                "konnectivity_network_proxy_server_egress_policy_denials_total"
            ),
            3.0
        );
        assert_eq!(
            counter(agent.handle.metrics().registry(), "konnectivity_network_proxy_agent_egress_policy_denials_total"),
            1.0
        );
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_bad_policy_file_stops_the_binary_with_the_reason() {
    let dir = konnectivity_testkit::TempDir::new("policy").expect("dir");
    let file = dir.path().join("policy.json");
    std::fs::write(&file, r#"{"rules": [{"action": "deny", "cidr": "10.0.0.0/99"}]}"#).expect("write");
    let out = std::process::Command::new(crate::faults::binary("proxy-server"))
        .args([
            "--uds-name=/tmp/never.sock".to_string(),
            "--server-port=0".into(),
            "--cluster-cert=/c".into(),
            "--cluster-key=/k".into(),
            format!("--egress-policy-file={}", file.display()),
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.json") && err.contains("prefix longer than the address"), "{err}");
}
