//! Agent selection: `--proxy-strategies` in order, with the agents' identifiers.

use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, dials};
use konnectivity_it::targets::http_target;
use konnectivity_server::routing::Strategy;

#[tokio::test]
async fn strategies_route_by_identifiers_and_fall_through_in_order() {
    let stack = Stack::new().expect("pki");
    let mut config = stack.server_config(Frontend::Uds);
    config.proxy_strategies = vec![Strategy::DestHost, Strategy::DestCidr, Strategy::DefaultRoute];
    let server = stack.start_server(config).await.expect("server");
    let mut a = stack.agent_config(server.agent_addr);
    a.agent_id = "node-a".into();
    a.agent_identifiers = "host=node-a&ipv4=127.0.0.2".into();
    let mut b = stack.agent_config(server.agent_addr);
    b.agent_id = "node-b".into();
    b.agent_identifiers = "ipv4=127.0.0.3&cidr=127.0.0.0%2F24&default-route=true".into();
    let (a, b) = (stack.start_agent(a).await.expect("agent a"), stack.start_agent(b).await.expect("agent b"));
    konnectivity_it::eventually!(10, server.handle.agent_count() == 2, "agents did not connect");

    // Targets on three loopback addresses: one per agent's ipv4 identifier, one only a CIDR covers.
    let (ta, tb, tc) = (
        http_target("127.0.0.2:0").await.expect("target a"),
        http_target("127.0.0.3:0").await.expect("target b"),
        http_target("127.0.0.4:0").await.expect("target c"),
    );
    let get = |addr: std::net::SocketAddr| {
        let stack = &stack;
        let server = &server;
        async move {
            let tunnel = stack.tunnel(server).await.expect("tunnel");
            let conn = tunnel.dial(&addr.to_string()).await.expect("dial");
            http::get(conn, &addr.to_string(), "/success").await.expect("get").0
        }
    };
    for _ in 0..5 {
        assert_eq!(get(ta.addr).await, 200);
    }
    assert_eq!((dials(&a), dials(&b)), (5, 0), "destHost: 127.0.0.2 is node-a's");
    for _ in 0..5 {
        assert_eq!(get(tb.addr).await, 200);
    }
    assert_eq!((dials(&a), dials(&b)), (5, 5), "destHost: 127.0.0.3 is node-b's");
    // 127.0.0.4 matches no host: destCIDR picks node-b (127.0.0.0/24).
    for _ in 0..3 {
        assert_eq!(get(tc.addr).await, 200);
    }
    assert_eq!((dials(&a), dials(&b)), (5, 8), "destCIDR");

    // ready_backends per strategy.
    let ready = |strategy: &str| -> f64 {
        let registry = server.handle.metrics().registry();
        let sample =
            konnectivity_it::metrics::labelled(registry, "konnectivity_network_proxy_server_ready_backends", strategy);
        sample.map(|m| m.get_gauge().get_value()).unwrap_or(-1.0)
    };
    assert_eq!((ready("destHost"), ready("destCIDR"), ready("defaultRoute")), (2.0, 1.0, 1.0));

    // A host nobody advertises, outside every CIDR, with only node-b on the default route.
    b.stop().await;
    konnectivity_it::eventually!(10, server.handle.agent_count() == 1, "node-b still listed");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let err = tunnel.dial(&tc.addr.to_string()).await.expect_err("no strategy matches");
    assert_eq!(err.message, "No agent available");
    assert_settled(&server, Some(&a)).await;
    a.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn default_strategy_prefers_the_least_loaded_agent() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let mut a = stack.agent_config(server.agent_addr);
    a.agent_id = "busy".into();
    let mut b = stack.agent_config(server.agent_addr);
    b.agent_id = "idle".into();
    let (a, b) = (stack.start_agent(a).await.expect("agent a"), stack.start_agent(b).await.expect("agent b"));
    konnectivity_it::eventually!(10, server.handle.agent_count() == 2, "agents did not connect");
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    // Hold connections open; each new one goes to whichever agent has fewer, so they split evenly.
    let mut held = Vec::new();
    for _ in 0..10 {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        held.push((tunnel.dial(&host).await.expect("dial"), tunnel));
    }
    let (da, db) = (dials(&a), dials(&b));
    assert_eq!((da, db), (5, 5), "least-loaded selection split 10 held connections as {da}/{db}");
    drop(held);
    assert_settled(&server, Some(&a)).await;
    a.stop().await;
    b.stop().await;
    server.stop().await;
}
