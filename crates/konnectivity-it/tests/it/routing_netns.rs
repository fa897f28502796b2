//! Agent selection across isolated networks: two "clusters" (network namespaces) with one agent each, using
//! the same pod IP and the same host names' worth of confusion, behind one proxy-server in a third namespace.
//! The bytes that come back say which cluster answered, so a wrong route cannot pass unnoticed; decoys on the
//! same addresses in the server's own network count any bypass.

use konnectivity_client::{ProxyAddress, Tunnel};
use konnectivity_it::controlplane::{ClusterPki, metric, workspace_bin};
use konnectivity_it::netns::{NetNs, veth};
use konnectivity_it::targets::{Target, serve_listener};
use konnectivity_testkit::TempDir;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONTROL: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const NET_A: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 5);
const NET_B: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 5);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 5);
const PORT: u16 = 8080;

/// Answers every connection with one HTTP response whose body names `who` and the address it was reached on.
fn responder(ns: &NetNs, addr: Ipv4Addr, who: &'static str, hits: Arc<AtomicU64>) -> Target {
    let listener = ns.listen(SocketAddr::from((addr, PORT))).expect("listen");
    serve_listener(listener, move |mut tcp, _| {
        hits.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let body = format!("{who} {addr}:{PORT}");
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = tcp.write_all(resp.as_bytes()).await;
        }
    })
    .expect("serve")
}

/// Writes `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts`; removed on drop.
struct HostsFile(std::path::PathBuf);
impl HostsFile {
    fn new(ns: &NetNs, entries: &str) -> Self {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns/<ns>");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{entries}\n")).expect("hosts");
        Self(dir)
    }
}
impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static N: AtomicU64 = AtomicU64::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_host_dest_cidr_and_default_route_across_two_clusters_with_the_same_pod_ip() {
    konnectivity_it::netns::require();
    let id = format!("{}{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
    let dir = TempDir::new("krs-routing").expect("dir");
    let pki = ClusterPki::generate(dir.path()).expect("pki");
    let control = NetNs::create(&format!("krs-rc{id}")).expect("netns");
    let cluster_a = NetNs::create(&format!("krs-ra{id}")).expect("netns");
    let cluster_b = NetNs::create(&format!("krs-rb{id}")).expect("netns");
    // Cluster A: 198.19.255.2/30 to the control side's 198.19.255.1; cluster B: its own /30, and a route to the
    // server's address through it.
    for (cluster, tag, local, remote) in [
        (&cluster_a, "a", "198.19.255.2/30", "198.19.255.1/30"),
        (&cluster_b, "b", "198.19.254.2/30", "198.19.254.1/30"),
    ] {
        let (vc, vk) = (format!("rc{tag}{id}"), format!("rk{tag}{id}"));
        veth(&control, &vc, remote, cluster, &vk, local).expect("veth");
    }
    cluster_b.ip(&["route", "add", &format!("{CONTROL}/32"), "via", "198.19.254.1"]).expect("route");

    // The same pod IP in both clusters (and a decoy on it in the control network); one range per cluster.
    let hits = |_: ()| Arc::new(AtomicU64::new(0));
    let (a_hits, b_hits, decoy_hits) = (hits(()), hits(()), hits(()));
    let mut targets = Vec::new();
    for addr in [POD, NET_A] {
        cluster_a.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]).expect("addr");
        targets.push(responder(&cluster_a, addr, "cluster-a", a_hits.clone()));
    }
    for addr in [POD, NET_B, ELSEWHERE] {
        cluster_b.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]).expect("addr");
        targets.push(responder(&cluster_b, addr, "cluster-b", b_hits.clone()));
    }
    for addr in [POD, NET_A, NET_B, ELSEWHERE] {
        control.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]).expect("addr");
        targets.push(responder(&control, addr, "DECOY", decoy_hits.clone()));
    }
    // Each cluster's DNS says its node is the pod IP.
    let _hosts_a = HostsFile::new(&cluster_a, &format!("{POD} node-a"));
    let _hosts_b = HostsFile::new(&cluster_b, &format!("{POD} node-b"));

    let uds = dir.path().join("proxy.sock");
    let server_args: Vec<String> = vec![
        "--mode=grpc".into(),
        format!("--uds-name={}", uds.display()),
        "--server-port=0".into(),
        format!("--cluster-cert={}", pki.server.0.display()),
        format!("--cluster-key={}", pki.server.1.display()),
        format!("--cluster-ca-cert={}", pki.ca.display()),
        "--agent-port=8132".into(),
        "--admin-port=8133".into(),
        "--health-port=8134".into(),
        "--proxy-strategies=destHost,destCIDR,defaultRoute".into(),
        "--server-id=routing".into(),
    ];
    let _server = control
        .spawn_process(
            "proxy-server",
            std::process::Command::new(workspace_bin("proxy-server").expect("bin")).args(&server_args),
            dir.path().join("server.log"),
        )
        .expect("server");
    let agent = |name: &str, identifiers: &str, ns: &NetNs| {
        let args: Vec<String> = vec![
            format!("--ca-cert={}", pki.ca.display()),
            format!("--agent-cert={}", pki.agent.0.display()),
            format!("--agent-key={}", pki.agent.1.display()),
            format!("--proxy-server-host={CONTROL}"),
            "--proxy-server-port=8132".into(),
            format!("--agent-id={name}"),
            format!("--agent-identifiers={identifiers}"),
            "--health-server-port=8093".into(),
            "--admin-server-port=8094".into(),
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=1s".into(),
        ];
        ns.spawn_process(
            name,
            ns.exec_with_etc(&workspace_bin("proxy-agent").expect("bin")).args(&args),
            dir.path().join(format!("{name}.log")),
        )
        .expect("agent")
    };
    let _agent_a = agent("node-a", "host=node-a&cidr=198.18.10.0/24", &cluster_a);
    let _agent_b = agent("node-b", "host=node-b&cidr=198.18.20.0/24&default-route=true", &cluster_b);
    konnectivity_it::eventually!(
        20,
        metric(&control, 8133, "konnectivity_network_proxy_server_ready_backend_connections").await.ok() == Some(2.0),
        "agents did not connect; server log:\n{}",
        _server.log_tail(20)
    );

    let get = async |target: &str| -> String {
        let tunnel = Tunnel::connect_single_use(&ProxyAddress::Uds(uds.clone())).await.expect("tunnel");
        let conn = tunnel.dial(target).await.unwrap_or_else(|e| panic!("dial {target}: {e}"));
        let (status, body) = konnectivity_it::http::get(conn, target, "/").await.expect("get");
        assert_eq!(status, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    // destHost: the host names each agent announced; each resolves to the pod IP *in its own cluster*.
    assert_eq!(get("node-a:8080").await, format!("cluster-a {POD}:8080"));
    assert_eq!(get("node-b:8080").await, format!("cluster-b {POD}:8080"));
    // destCIDR: each agent's range.
    assert_eq!(get(&format!("{NET_A}:8080")).await, format!("cluster-a {NET_A}:8080"));
    assert_eq!(get(&format!("{NET_B}:8080")).await, format!("cluster-b {NET_B}:8080"));
    // defaultRoute: an address no host or range names goes to the agent marked default-route, even the
    // shared pod IP.
    assert_eq!(get(&format!("{ELSEWHERE}:8080")).await, format!("cluster-b {ELSEWHERE}:8080"));
    assert_eq!(get(&format!("{POD}:8080")).await, format!("cluster-b {POD}:8080"));
    assert_eq!((a_hits.load(Ordering::SeqCst), b_hits.load(Ordering::SeqCst)), (2, 4));
    assert_eq!(decoy_hits.load(Ordering::SeqCst), 0, "the control network's decoys were hit");

    // Nothing left on the server once the clients are gone.
    let held = async || {
        let established =
            metric(&control, 8133, "konnectivity_network_proxy_server_established_connections").await.expect("metric");
        let pending =
            metric(&control, 8133, "konnectivity_network_proxy_server_pending_backend_dials").await.expect("m");
        (established, pending)
    };
    konnectivity_it::eventually!(
        10,
        held().await == (0.0, 0.0),
        "server still holds (connections, dials) {:?}",
        held().await
    );
}
