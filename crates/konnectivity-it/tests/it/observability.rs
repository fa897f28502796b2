//! Metrics, health and debug endpoints: the reference's metric families (name, type, HELP, labels) after a
//! scripted scenario, the values that scenario must leave, readiness, and `/debug/connections`.

use konnectivity_it::http;
use konnectivity_it::stack::{Frontend, Stack, assert_settled};
use konnectivity_it::targets::http_target;
use konnectivity_testkit::{ChildProcess, free_port};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every family the reference exports under our prefix, with its type, HELP and label names. A scrape may hold
/// fewer (vectors without series are not listed, as in client_golang) but never a different one.
const GOLDEN: &[(&str, &str, &str, &[&str])] = &[
    (
        "konnectivity_network_proxy_server_dial_duration_seconds",
        "histogram",
        "Latency of dial to the remote endpoint in seconds",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_frontend_write_duration_seconds",
        "histogram",
        "Latency of write to the frontend in seconds",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_grpc_connections",
        "gauge",
        "Number of current grpc connections, partitioned by service method.",
        &["service_method"],
    ),
    ("konnectivity_network_proxy_server_http_connections", "gauge", "Number of current HTTP CONNECT connections", &[]),
    (
        "konnectivity_network_proxy_server_ready_backend_connections",
        "gauge",
        "Number of konnectivity agent connected to the proxy server. DEPRECATED, please use ready_backends",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_ready_backends",
        "gauge",
        "Number of konnectivity agent connected to the proxy server",
        &["proxy_strategy"],
    ),
    (
        "konnectivity_network_proxy_server_pending_backend_dials",
        "gauge",
        "Current number of pending backend dial requests",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_established_connections",
        "gauge",
        "Current number of established end-to-end connections (post-dial).",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_full_receive_channels",
        "gauge",
        "Number of current connections blocked by a full receive channel, partitioned by service method.",
        &["service_method"],
    ),
    (
        "konnectivity_network_proxy_server_dial_failure_count",
        "counter",
        "Number of dial failures observed. Multiple failures can occur for a single dial request.",
        &["reason"],
    ),
    (
        "konnectivity_network_proxy_server_culled_leases_count",
        "counter",
        "Count of expired leases that the lease garbage collection controller has culled.",
        &[],
    ),
    (
        "konnectivity_network_proxy_server_lease_delete_latency_seconds",
        "histogram",
        "Latency of lease deletion calls by the garbage collection controller in seconds.",
        &["http_status_code"],
    ),
    (
        "konnectivity_network_proxy_server_lease_delete_total",
        "counter",
        "Count of lease delection calls by the garbage collection controller. Labeled by HTTP status code and reason.",
        &["http_status_code", "reason"],
    ),
    (
        "konnectivity_network_proxy_server_lease_list_latency_seconds",
        "histogram",
        "Latency of lease list calls by the garbage collection controller in seconds.",
        &["http_status_code"],
    ),
    (
        "konnectivity_network_proxy_server_lease_list_total",
        "counter",
        "Count of lease deletion calls by the garbage collection controller. Labeled by HTTP status code and reason.",
        &["http_status_code", "reason"],
    ),
    (
        "konnectivity_network_proxy_server_stream_packets_total",
        "counter",
        "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        &["segment", "packet_type"],
    ),
    (
        "konnectivity_network_proxy_server_stream_errors_total",
        "counter",
        "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
        &["segment", "code", "packet_type"],
    ),
    (
        "konnectivity_network_proxy_agent_dial_duration_seconds",
        "histogram",
        "Latency of dial to the remote endpoint in seconds",
        &[],
    ),
    (
        "konnectivity_network_proxy_agent_server_connection_failure_count",
        "counter",
        "Count of failures to send to or receive from the proxy server, labeled by the direction (from_server or to_server). DEPRECATED, please use stream_events_error_total",
        &["direction"],
    ),
    (
        "konnectivity_network_proxy_agent_endpoint_dial_failure_total",
        "counter",
        "Number of failures dialing the remote endpoint, by reason (example: timeout).",
        &["reason"],
    ),
    (
        "konnectivity_network_proxy_agent_open_server_connections",
        "gauge",
        "Current number of open server connections.",
        &[],
    ),
    (
        "konnectivity_network_proxy_agent_known_server_count",
        "gauge",
        "Current number of servers agent is trying to connect to.",
        &[],
    ),
    (
        "konnectivity_network_proxy_agent_open_endpoint_connections",
        "gauge",
        "Current number of open endpoint connections.",
        &[],
    ),
    (
        "konnectivity_network_proxy_agent_lease_lists_total",
        "counter",
        "Count of server lease list calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
        &["http_response_code", "reason"],
    ),
    (
        "konnectivity_network_proxy_agent_lease_watches_total",
        "counter",
        "Count of server lease watch calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
        &["http_response_code", "reason"],
    ),
    (
        "konnectivity_network_proxy_agent_lease_list_latency_seconds",
        "histogram",
        "Latency of server lease listing in seconds",
        &["http_response_code"],
    ),
    (
        "konnectivity_network_proxy_agent_stream_packets_total",
        "counter",
        "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        &["segment", "packet_type"],
    ),
    (
        "konnectivity_network_proxy_agent_stream_errors_total",
        "counter",
        "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
        &["segment", "code", "packet_type"],
    ),
    (
        "konnectivity_network_proxy_client_dial_failure_total",
        "counter",
        "Number of dial failures observed, by reason (example: remote endpoint error)",
        &["reason"],
    ),
    (
        "konnectivity_network_proxy_client_client_connections",
        "gauge",
        "Number of open client connections, by status (Example: dialing)",
        &["status"],
    ),
    (
        "konnectivity_network_proxy_client_stream_packets_total",
        "counter",
        "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        &["segment", "packet_type"],
    ),
    (
        "konnectivity_network_proxy_client_stream_errors_total",
        "counter",
        "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
        &["segment", "code", "packet_type"],
    ),
];

/// Our own additions, under the same namespace with names the reference does not use.
const EXTENSIONS: &[(&str, &str, &[&str])] = &[
    ("konnectivity_network_proxy_server_tunnel_bytes_total", "counter", &["direction"]),
    ("konnectivity_network_proxy_server_frontend_stall_closes_total", "counter", &[]),
    ("konnectivity_network_proxy_server_flow_control_waits_total", "counter", &[]),
    ("konnectivity_network_proxy_server_tls_handshake_failures_total", "counter", &["listener", "reason"]),
    ("konnectivity_network_proxy_server_tls_reloads_total", "counter", &["listener", "result"]),
    ("konnectivity_network_proxy_agent_tls_reloads_total", "counter", &["result"]),
    ("konnectivity_network_proxy_agent_tunnel_bytes_total", "counter", &["direction"]),
    ("konnectivity_network_proxy_agent_flow_control_waits_total", "counter", &[]),
    ("konnectivity_network_proxy_server_egress_policy_denials_total", "counter", &[]),
    ("konnectivity_network_proxy_agent_egress_policy_denials_total", "counter", &[]),
    ("konnectivity_network_proxy_agent_server_dials_total", "counter", &["result"]),
];

/// client_golang's process collector families, and our runtime's task count.
const PROCESS: &[(&str, &str)] = &[
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_virtual_memory_max_bytes", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_start_time_seconds", "gauge"),
    // Ours, Go's go_goroutines counterpart.
    ("tokio_alive_tasks", "gauge"),
];

#[derive(Debug, Default)]
struct Family {
    help: String,
    kind: String,
    labels: BTreeSet<String>,
    /// Samples by their label string (without histogram suffixes for histograms).
    samples: BTreeMap<String, f64>,
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("in time").expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().help = help.replace("\\\\", "\\").to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().kind = kind.to_string();
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, "0"));
            let (name, labels) =
                series.split_once('{').map(|(n, l)| (n, l.trim_end_matches('}'))).unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s).filter(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
                })
                .unwrap_or(name);
            let f = families.entry(family.to_string()).or_default();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let key = pair.split('=').next().unwrap_or("");
                if key != "le" {
                    f.labels.insert(key.to_string());
                }
            }
            if family == name {
                f.samples.insert(labels.to_string(), value.parse().unwrap_or(f64::NAN));
            }
        }
    }
    families
}

fn check_against_golden(families: &BTreeMap<String, Family>, prefix: &str, required: &[&str]) {
    for (name, f) in families.iter().filter(|(n, _)| n.starts_with("konnectivity_network_proxy_")) {
        if let Some((_, kind, labels)) = EXTENSIONS.iter().find(|e| e.0 == name) {
            assert_eq!(f.kind, *kind, "{name} type");
            assert_eq!(f.labels, labels.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>(), "{name} labels");
            assert!(GOLDEN.iter().all(|g| g.0 != name), "{name} shadows a reference metric");
            continue;
        }
        let golden = GOLDEN.iter().find(|g| g.0 == name).unwrap_or_else(|| panic!("{name} is not a reference metric"));
        assert_eq!(f.kind, golden.1, "{name} type");
        assert_eq!(f.help, golden.2, "{name} HELP");
        let labels: BTreeSet<String> = golden.3.iter().map(|l| l.to_string()).collect();
        assert_eq!(f.labels, labels, "{name} labels");
    }
    for name in required {
        assert!(families.contains_key(&format!("{prefix}{name}")), "{prefix}{name} missing");
    }
    for (name, kind) in PROCESS {
        assert_eq!(families.get(*name).map(|f| f.kind.as_str()), Some(*kind), "{name}");
    }
}

fn value(families: &BTreeMap<String, Family>, name: &str, labels: &str) -> f64 {
    families.get(name).and_then(|f| f.samples.get(labels)).copied().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn metrics_health_and_debug_endpoints_after_a_scripted_scenario() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let (health, admin) = (server.health_addr.expect("health"), server.admin_addr.expect("admin"));
    // Not ready until an agent connects.
    let (status, _, body) = get(health, "/readyz").await;
    assert_eq!((status, body.as_str()), (500, "no connection to any proxy agent"));
    assert_eq!(get(health, "/healthz").await.0, 200);

    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not connect");
    assert_eq!(get(health, "/readyz").await.0, 200);
    assert_eq!(get(health, "/ready").await.0, 200);
    let agent_health = agent.health_addr.expect("agent health");
    let (status, _, body) = get(agent_health, "/readyz?verbose").await;
    assert_eq!(status, 200);
    assert!(body.contains("[+]ping ok") && body.contains("[+]server-connected ok"), "{body}");
    let (status, head, _) = get(agent.admin_addr.expect("agent admin"), "/metrics").await;
    assert_eq!(status, 301);
    assert!(head.contains(&format!(":{}/metrics", agent_health.port())), "{head}");

    // The scenario: successful dials, a refused dial, a dial cancelled at once, an agent restart.
    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    for _ in 0..3 {
        let tunnel = stack.tunnel(&server).await.expect("tunnel");
        let conn = tunnel.dial(&host).await.expect("dial");
        assert_eq!(http::get(conn, &host, "/success").await.expect("get").0, 200);
    }
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let refused = closed.addr.to_string();
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    assert!(tunnel.dial(&refused).await.is_err());

    // A held connection shows in /debug/connections with its IDs and bytes, on both sides.
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let mut held = tunnel.dial(&host).await.expect("dial");
    held.write_all(format!("GET /bytes/5000 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.expect("write");
    let mut got = 0;
    let mut buf = vec![0u8; 8192];
    while got < 5000 {
        got += held.read(&mut buf).await.expect("read");
    }
    let (_, _, body) = get(admin, "/debug/connections").await;
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let conn = &view["connections"][0];
    assert_eq!(conn["connect_id"], serde_json::json!(held.connect_id()), "{view}");
    assert_eq!(conn["address"], serde_json::json!(host));
    assert_eq!(conn["frontend"], "grpc");
    assert!(conn["bytes_to_frontend"].as_u64().unwrap_or(0) >= 5000, "{view}");
    assert!(conn["bytes_to_agent"].as_u64().unwrap_or(0) > 30, "{view}");
    assert_eq!(view["agents"][0]["flow_control"], true);
    let (_, _, body) = get(agent.admin_addr.expect("agent admin"), "/debug/connections").await;
    let agent_view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let aconn = &agent_view["servers"][0]["connections"][0];
    assert_eq!(aconn["connect_id"], serde_json::json!(held.connect_id()), "{agent_view}");
    assert!(aconn["bytes_to_server"].as_u64().unwrap_or(0) >= 5000);
    drop(held);
    assert_settled(&server, Some(&agent)).await;
    let (_, _, body) = get(admin, "/debug/connections").await;
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["connections"], serde_json::json!([]), "{view}");
    assert_eq!(view["pending_dials"], serde_json::json!([]));

    // Agent restart.
    agent.stop().await;
    konnectivity_it::eventually!(10, !server.handle.ready(), "server still ready without agent");
    let agent = stack.start_agent(stack.agent_config(server.agent_addr)).await.expect("agent again");
    konnectivity_it::eventually!(10, server.handle.ready(), "agent did not reconnect");
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let conn = tunnel.dial(&host).await.expect("dial through the restarted agent");
    assert_eq!(http::get(conn, &host, "/success").await.expect("get").0, 200);
    assert_settled(&server, Some(&agent)).await;

    let (_, _, text) = get(admin, "/metrics").await;
    let server_families = parse(&text);
    check_against_golden(
        &server_families,
        "konnectivity_network_proxy_server_",
        &[
            "dial_duration_seconds",
            "grpc_connections",
            "ready_backends",
            "pending_backend_dials",
            "established_connections",
            "dial_failure_count",
            "stream_packets_total",
            "culled_leases_count",
        ],
    );
    assert_eq!(
        value(&server_families, "konnectivity_network_proxy_server_dial_failure_count", "reason=\"error_response\""),
        1.0
    );
    assert_eq!(value(&server_families, "konnectivity_network_proxy_server_established_connections", ""), 0.0);
    assert_eq!(value(&server_families, "konnectivity_network_proxy_server_pending_backend_dials", ""), 0.0);
    assert_eq!(
        value(&server_families, "konnectivity_network_proxy_server_ready_backends", "proxy_strategy=\"default\""),
        1.0
    );
    assert_eq!(
        value(&server_families, "konnectivity_network_proxy_server_grpc_connections", "service_method=\"Connect\""),
        1.0
    );
    let bytes = |direction: &str| {
        value(
            &server_families,
            "konnectivity_network_proxy_server_tunnel_bytes_total",
            &format!("direction=\"{direction}\""),
        )
    };
    assert!(
        bytes("to_frontend") >= 5000.0 && bytes("to_agent") > 100.0,
        "{} {}",
        bytes("to_frontend"),
        bytes("to_agent")
    );
    // The health port serves the same registry.
    assert_eq!(parse(&get(health, "/metrics").await.2).len(), server_families.len());

    let agent_health = agent.health_addr.expect("agent health");
    let (_, _, text) = get(agent_health, "/metrics").await;
    let agent_families = parse(&text);
    check_against_golden(
        &agent_families,
        "konnectivity_network_proxy_agent_",
        &[
            "dial_duration_seconds",
            "open_server_connections",
            "known_server_count",
            "open_endpoint_connections",
            "stream_packets_total",
        ],
    );
    assert_eq!(value(&agent_families, "konnectivity_network_proxy_agent_open_endpoint_connections", ""), 0.0);
    assert_eq!(value(&agent_families, "konnectivity_network_proxy_agent_open_server_connections", ""), 1.0);

    // The client library's metrics, registered as kube-apiserver registers the reference's.
    let registry = prometheus::Registry::new();
    konnectivity_client::metrics::register(&registry).expect("register client metrics");
    let mut text = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut text).expect("encode");
    let client_families = parse(&String::from_utf8_lossy(&text));
    for (name, f) in &client_families {
        let golden = GOLDEN.iter().find(|g| g.0 == name).unwrap_or_else(|| panic!("{name} is not a reference metric"));
        assert_eq!((f.kind.as_str(), f.help.as_str()), (golden.1, golden.2), "{name}");
    }
    assert!(
        value(&client_families, "konnectivity_network_proxy_client_dial_failure_total", "reason=\"endpoint\"") >= 1.0
    );
    assert!(client_families.contains_key("konnectivity_network_proxy_client_stream_packets_total"));

    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn agent_is_not_ready_without_a_server() {
    let stack = Stack::new().expect("pki");
    let closed = konnectivity_it::targets::closed_port().expect("closed port");
    let nowhere = closed.addr;
    let agent = stack.start_agent(stack.agent_config(nowhere)).await.expect("agent");
    let (status, _, body) = get(agent.health_addr.expect("health"), "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("[-]server-connected failed: no servers connected"), "{body}");
    assert_eq!(get(agent.health_addr.expect("health"), "/healthz").await.0, 200);
    agent.stop().await;
}

#[tokio::test]
async fn a_cpu_profile_from_a_running_server_parses_with_go_tool_pprof() {
    let stack = Stack::new().expect("pki");
    let (admin, health, agent_port) = (free_port(), free_port(), free_port());
    let mut server = ChildProcess::spawn(
        "proxy-server",
        std::process::Command::new(crate::faults::binary("proxy-server"))
            .args([
                format!("--uds-name={}", stack.uds.display()),
                "--server-port=0".into(),
                format!("--cluster-cert={}", stack.pki.server_cert.display()),
                format!("--cluster-key={}", stack.pki.server_key.display()),
                format!("--agent-port={agent_port}"),
                "--agent-bind-address=127.0.0.1".into(),
                format!("--health-port={health}"),
                "--health-bind-address=127.0.0.1".into(),
                format!("--admin-port={admin}"),
                "--enable-profiling".into(),
                "--enable-contention-profiling".into(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .expect("spawn proxy-server");
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
    konnectivity_it::eventually!(
        10,
        tokio::net::TcpStream::connect(admin_addr).await.is_ok(),
        "admin port never opened"
    );
    // Give the profiler something to see: metric scrapes on the health port while it samples.
    let health_addr: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    let load = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        while std::time::Instant::now() < deadline {
            let _ = get(health_addr, "/metrics").await;
        }
    });
    let mut s = tokio::net::TcpStream::connect(admin_addr).await.expect("connect");
    s.write_all(b"GET /debug/pprof/profile?seconds=1 HTTP/1.0\r\nHost: x\r\n\r\n").await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("in time").expect("read");
    load.await.expect("load");
    let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(
        raw.starts_with(b"HTTP/1.1 200") || raw.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&raw[..body_at])
    );
    let file = stack.dir().join("cpu.pprof");
    std::fs::write(&file, &raw[body_at..]).expect("write profile");
    let out = tokio::process::Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&file)
        .output()
        .await
        .expect("go tool pprof");
    server.kill();
    assert!(out.status.success(), "go tool pprof failed: {}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("flat") && report.contains("Type: cpu"), "{report}");
    // Our own code shows up, symbolized.
    assert!(report.contains("konnectivity") || report.contains("prometheus") || report.contains("hyper"), "{report}");
}
