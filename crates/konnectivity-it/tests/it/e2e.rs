//! End to end with a real kube-apiserver (and etcd), in two network namespaces whose only link is the agent's
//! connection to proxy-server, with the cluster's addresses duplicated as decoys in the control network (see
//! `konnectivity_it::controlplane`). kube-apiserver's egress selector sends its cluster traffic to our
//! proxy-server in each of its three configurations.

use http_body_util::BodyExt;
use konnectivity_it::controlplane::{ControlPlane, EgressMode, NODE_IP, NODE_NAME, Options, POD_IP, WEBHOOK_IP};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Node proxy, service proxy and a validating webhook, all through the tunnel; a log stream cut by the client.
async fn kube_apiserver_reaches_the_cluster(mode: EgressMode, stream_for: Duration) {
    let mut cp = ControlPlane::start(Options::new(mode)).await.expect("control plane");

    // Node proxy → the kubelet-like server (HTTPS, client certificate checked) at the node's InternalIP.
    let (status, body) = cp
        .kas_request("GET", &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/healthz"), None)
        .await
        .expect("node proxy");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        status,
        200,
        "node proxy: {body}\nserver log:\n{}",
        cp.server.as_ref().map(|s| s.log_tail(20)).unwrap_or_default()
    );
    assert_eq!(body, format!("kubelet {NODE_NAME} at {NODE_IP} served /healthz\n"));
    assert_eq!(cp.counters.kubelet_requests.load(Ordering::SeqCst), 1);

    // Service proxy → the pod behind the Service's EndpointSlice.
    // (kube-apiserver finds endpoints through an informer: it may take a moment to see the new slice.)
    let mut answer;
    konnectivity_it::eventually!(
        15,
        {
            answer = cp
                .kas_request("GET", "/api/v1/namespaces/default/services/http:pod-svc:main/proxy/hello", None)
                .await
                .expect("service proxy");
            answer.0 != 503
        },
        "the service proxy still answers 503: {}",
        String::from_utf8_lossy(&answer.1)
    );
    let (status, body) = answer;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "service proxy: {body}");
    assert_eq!(body, format!("pod at {POD_IP} served /hello\n"));

    // A validating webhook referenced by Service: kube-apiserver calls it through the tunnel.
    cp.register_webhook().await.expect("webhook configuration");
    let configmap = |name: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"konnectivity-e2e": "webhook"}},
            "data": {"k": "v"}
        })
    };
    // The configuration takes effect once kube-apiserver's informer has it: retry until the webhook is called.
    let mut n = 0;
    konnectivity_it::eventually!(
        20,
        {
            n += 1;
            let (status, body) = cp
                .kas_request("POST", "/api/v1/namespaces/default/configmaps", Some(&configmap(&format!("allowed-{n}"))))
                .await
                .expect("create configmap");
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
            cp.counters.webhook_reviews.load(Ordering::SeqCst) > 0
        },
        "the webhook was never called"
    );
    let (status, body) = cp
        .kas_request("POST", "/api/v1/namespaces/default/configmaps", Some(&configmap("deny-me")))
        .await
        .expect("create configmap");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!("the e2e webhook at {WEBHOOK_IP} (reached through the tunnel) denies deny-me")),
        "{body}"
    );
    let (status, _) = cp
        .kas_request("POST", "/api/v1/namespaces/default/configmaps", Some(&configmap("allowed-last")))
        .await
        .expect("create configmap");
    assert_eq!(status, 201);

    // A long streaming response (kubectl logs -f): lines keep flowing, and the stream ends at both ends when
    // the client goes away.
    let resp = cp
        .kas_send(
            "GET",
            &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/containerLogs/default/pod/c?follow=true"),
            None,
        )
        .await
        .expect("log stream");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let start = Instant::now();
    let (mut lines, mut last_line_at) = (0usize, Instant::now());
    let mut longest_gap = Duration::ZERO;
    while start.elapsed() < stream_for {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the log stream stalled for 5 s")
            .expect("the log stream ended")
            .expect("log stream error");
        if let Some(data) = frame.data_ref() {
            lines += data.iter().filter(|&&b| b == b'\n').count();
            longest_gap = longest_gap.max(last_line_at.elapsed());
            last_line_at = Instant::now();
        }
    }
    let expected = (stream_for.as_millis() / 100) as usize;
    assert!(lines * 10 >= expected * 8, "{lines} lines in {stream_for:?}, expected about {expected}");
    assert!(longest_gap < Duration::from_secs(2), "the stream paused for {longest_gap:?}");
    assert_eq!(cp.counters.log_streams_open.load(Ordering::SeqCst), 1);
    drop(body);
    konnectivity_it::eventually!(
        10,
        cp.counters.log_streams_open.load(Ordering::SeqCst) == 0,
        "the kubelet's log stream outlived its client"
    );

    cp.assert_no_decoy_hits();
    // kube-apiserver keeps idle connections to the kubelet, the pod and the webhook; once it is gone, every
    // tunneled connection must be gone too.
    let established =
        cp.server_metric("konnectivity_network_proxy_server_established_connections").await.expect("metric");
    assert!(cp.stop_kube_apiserver(), "kube-apiserver needed SIGKILL");
    cp.assert_settled(Duration::from_secs(10)).await.expect("settled");
    eprintln!("{mode:?}: {established} tunneled connections held by kube-apiserver before it stopped, none after");
    eprintln!(
        "{mode:?}: kubelet requests {}, pod requests {}, webhook reviews {}, {lines} log lines in {stream_for:?}",
        cp.counters.kubelet_requests.load(Ordering::SeqCst),
        cp.counters.pod_requests.load(Ordering::SeqCst),
        cp.counters.webhook_reviews.load(Ordering::SeqCst),
    );
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_through_grpc_over_uds() {
    kube_apiserver_reaches_the_cluster(EgressMode::GrpcUds, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_through_http_connect_over_uds() {
    kube_apiserver_reaches_the_cluster(EgressMode::ConnectUds, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_through_http_connect_over_mtls_tcp() {
    kube_apiserver_reaches_the_cluster(EgressMode::ConnectMtls, Duration::from_secs(3)).await;
}

/// Without an agent, kube-apiserver's cluster requests fail clearly (and still never reach the decoys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_kube_apiserver_gets_an_error_not_the_decoy() {
    let mut options = Options::new(EgressMode::GrpcUds);
    options.agent = false;
    let mut cp = ControlPlane::start(options).await.expect("control plane");
    let (status, body) =
        cp.kas_request("GET", &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/healthz"), None).await.expect("request");
    let body = String::from_utf8_lossy(&body);
    assert!(status >= 500, "{status}: {body}");
    assert!(body.contains("No agent available"), "{body}");
    cp.assert_no_decoy_hits();
    assert!(cp.stop_kube_apiserver(), "kube-apiserver needed SIGKILL");
    cp.assert_settled(Duration::from_secs(10)).await.expect("settled");
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}

/// Opens `/AgentService/Connect` from the cluster network with server-only TLS (no client certificate) and the
/// given `authorization` values; returns the server's verdict.
async fn token_connect(cp: &ControlPlane, authorization: &[String]) -> Result<(), tonic::Status> {
    use konnectivity_it::controlplane::{AGENT_PORT, CONTROL_LINK};
    let tls = konnectivity_transport::tls::client_config(&cp.pki.ca, None, &[b"h2".to_vec()]).expect("tls");
    let tcp = cp.cluster.connect((CONTROL_LINK, AGENT_PORT).into(), Duration::from_secs(5)).await.expect("tcp");
    let name = rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from(CONTROL_LINK).into());
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.expect("tls handshake");
    let mut stream = Some(stream);
    let connector = tower::service_fn(move |_: http::Uri| {
        let s = stream.take();
        async move { s.map(hyper_util::rt::TokioIo::new).ok_or_else(|| std::io::Error::other("used")) }
    });
    let channel = tonic::transport::Endpoint::from_static("http://agent-port")
        .connect_with_connector(connector)
        .await
        .expect("channel");
    let (_tx, rx) = tokio::sync::mpsc::channel::<konnectivity_proto::Packet>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("agentid", "token-test".parse().expect("id"));
    for value in authorization {
        request.metadata_mut().append("authorization", value.parse().expect("header value"));
    }
    konnectivity_proto::agent::AgentServiceClient::new(channel).connect(request).await.map(|_| ())
}

/// A ServiceAccount token signed with the cluster's own key, but expired (TokenRequest cannot issue one).
fn expired_token(cp: &ControlPlane, ns: &str, sa: &str, audience: &str) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let header = b64(serde_json::json!({"alg": "ES256", "typ": "JWT"}));
    let claims = b64(serde_json::json!({
        "iss": konnectivity_it::controlplane::SA_ISSUER, "aud": [audience],
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "00000000-0000-0000-0000-000000000000"}}
    }));
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(&cp.pki.sa_key).expect("sa key");
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key.secret_pkcs8_der(),
        &rng,
    )
    .expect("ecdsa key");
    let input = format!("{header}.{claims}");
    let sig = signer.sign(&rng, input.as_bytes()).expect("sign");
    format!("{input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Token authentication against the real TokenReview API: the agent with the right token serves traffic; every
/// kind of wrong token is refused with a clear status while the good agent keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_authenticate_with_service_account_tokens() {
    let mut options = Options::new(EgressMode::GrpcUds);
    options.token_auth = Some(Default::default());
    let mut cp = ControlPlane::start(options).await.expect("control plane");
    let auth = konnectivity_it::controlplane::TokenAuth::default();

    let node_proxy = async |cp: &ControlPlane| {
        let (status, body) =
            cp.kas_request("GET", &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/healthz"), None).await.expect("req");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    node_proxy(&cp).await;

    let good = cp.create_token(&auth.namespace, &auth.service_account, &auth.audience, 3600).await.expect("token");
    let wrong_audience =
        cp.create_token(&auth.namespace, &auth.service_account, "someone-else", 3600).await.expect("t");
    let wrong_sa = cp.create_token(&auth.namespace, "intruder", &auth.audience, 3600).await.expect("t");
    let wrong_ns = cp.create_token("default", &auth.service_account, &auth.audience, 3600).await.expect("t");
    let expired = expired_token(&cp, &auth.namespace, &auth.service_account, &auth.audience);
    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("wrong audience", vec![bearer(&wrong_audience)], "is invalid for the target audiences"),
        (
            "wrong service account",
            vec![bearer(&wrong_sa)],
            "\"intruder\" service account. Expected \"konnectivity-agent\"",
        ),
        ("wrong namespace", vec![bearer(&wrong_ns)], "\"default\" namespace. Expected \"kube-system\""),
        ("expired token", vec![bearer(&expired)], "expired"),
        ("no Bearer prefix", vec![good.clone()], "received token does not have \"Bearer \" prefix"),
        ("two tokens", vec![bearer(&good), bearer(&good)], "too many (2) tokens are received"),
        ("no token", vec![], "Authentication context was not found in metadata"),
    ];
    for (what, values, expect) in &cases {
        let err = token_connect(&cp, values).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err:?}");
        assert!(err.message().contains(expect), "{what}: {:?} does not contain {expect:?}", err.message());
        eprintln!("{what}: refused: {}", err.message());
    }
    // The good token works, and a reconnect with it is served from the review cache.
    token_connect(&cp, &[bearer(&good)]).await.expect("good token accepted");
    token_connect(&cp, &[bearer(&good)]).await.expect("good token accepted again");
    let count = async |result: &str| {
        let name = format!("konnectivity_network_proxy_server_agent_authentications_total{{result=\"{result}\"}}");
        cp.server_metric(&name).await.unwrap_or(0.0)
    };
    let (ok, cached, denied) = (count("ok").await, count("cached").await, count("denied").await);
    eprintln!("authentications: ok {ok}, cached {cached}, denied {denied}");
    assert!(ok >= 1.0, "the agent's first review");
    assert!(cached >= 1.0, "a reconnect with the same token is served from the cache");
    assert_eq!(denied, cases.len() as f64);
    let server_log = cp.server.as_ref().map(|s| s.log()).unwrap_or_default();
    assert!(server_log.contains("agent authentication failed"), "failures are logged");

    // The real agent is still connected and serving.
    cp.wait_backends(1, Duration::from_secs(5)).await.expect("agent still there");
    node_proxy(&cp).await;
    cp.assert_no_decoy_hits();
    assert!(cp.stop_kube_apiserver(), "kube-apiserver needed SIGKILL");
    cp.assert_settled(Duration::from_secs(10)).await.expect("settled");
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}

/// The server leases in kube-system, by holder.
async fn server_leases(cp: &ControlPlane) -> Vec<serde_json::Value> {
    let (status, body) = cp
        .kas_request(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases?labelSelector=k8s-app%3Dkonnectivity-server",
            None,
        )
        .await
        .expect("list leases");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list: serde_json::Value = serde_json::from_slice(&body).expect("json");
    list["items"].as_array().cloned().unwrap_or_default()
}

async fn wait_for<F: AsyncFn() -> bool>(what: &str, within: Duration, cond: F) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Leases against the real kube-apiserver: every server holds and renews a Lease, an agent behind a load
/// balancer counts them and connects to every server, a killed server's lease expires and is collected, a
/// stopped server deletes its own, and new servers are found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_hold_leases_and_agents_count_them() {
    use konnectivity_it::controlplane::AGENT_PORT;
    let mut options = Options::new(EgressMode::GrpcUds);
    options.agent = false;
    options.server_args = [
        "--enable-lease-controller",
        "--lease-namespace=kube-system",
        "--lease-duration=4s",
        "--lease-renew-interval=1s",
        "--lease-gc-interval=1s",
        // Deliberately wrong: with leases the agent must not rely on it.
        "--server-count=1",
    ]
    .map(String::from)
    .to_vec();
    let mut cp = ControlPlane::start(options).await.expect("control plane");
    let p2 = cp.start_extra_server(2, &[]).expect("server 2");
    let p3 = cp.start_extra_server(3, &[]).expect("server 3");
    let backends = cp.start_balancer(8100, vec![AGENT_PORT, p2, p3]).expect("balancer");
    wait_for("three server leases", Duration::from_secs(20), async || server_leases(&cp).await.len() == 3).await;
    let leases = server_leases(&cp).await;
    let mut holders: Vec<String> =
        leases.iter().map(|l| l["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string()).collect();
    holders.sort();
    assert_eq!(holders, ["e2e-server-1", "e2e-server-2", "e2e-server-3"]);
    for l in &leases {
        let holder = l["spec"]["holderIdentity"].as_str().unwrap_or_default();
        assert_eq!(l["metadata"]["name"], format!("konnectivity-proxy-server-{holder}"));
        assert_eq!(l["spec"]["leaseDurationSeconds"], 4);
        assert!(l["spec"]["renewTime"].is_string());
    }

    // The agent dials one address (the balancer) and finds every server by counting leases.
    cp.start_agent(&[
        "--proxy-server-port=8100".into(),
        "--count-server-leases".into(),
        "--lease-namespace=kube-system".into(),
        "--lease-poll-interval=300ms".into(),
        // At the end it stops while kube-apiserver still holds kept-alive tunnels through it (see below).
        "--drain-timeout=2s".into(),
    ])
    .await
    .expect("agent");
    async fn agent_metric(cp: &ControlPlane, name: &str) -> f64 {
        cp.agent_metric(name).await.unwrap_or(-1.0)
    }
    wait_for("agent connected to 3 servers", Duration::from_secs(20), async || {
        agent_metric(&cp, "konnectivity_network_proxy_agent_open_server_connections").await == 3.0
    })
    .await;
    assert_eq!(agent_metric(&cp, "konnectivity_network_proxy_agent_known_server_count").await, 3.0);
    let lists =
        agent_metric(&cp, "konnectivity_network_proxy_agent_lease_lists_total{http_response_code=\"200\"}").await;
    assert!(lists >= 1.0, "lease lists counted: {lists}");
    let node_proxy = async |cp: &ControlPlane| {
        let (status, body) =
            cp.kas_request("GET", &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/healthz"), None).await.expect("req");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    node_proxy(&cp).await;

    // Server 3 dies without cleaning up: its lease expires (4 s) and another server collects it.
    let killed_at = Instant::now();
    cp.extra_servers[1].kill();
    backends.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != p3);
    wait_for("the dead server's lease collected", Duration::from_secs(20), async || {
        server_leases(&cp).await.len() == 2
    })
    .await;
    let collected_after = killed_at.elapsed();
    let culled = cp.server_metric("konnectivity_network_proxy_server_culled_leases_count").await.unwrap_or(0.0)
        + cp.extra_server_metric(2, "konnectivity_network_proxy_server_culled_leases_count").await.unwrap_or(0.0);
    assert_eq!(culled, 1.0, "exactly one lease culled");
    wait_for("agent counts 2 servers", Duration::from_secs(10), async || {
        agent_metric(&cp, "konnectivity_network_proxy_agent_known_server_count").await == 2.0
            && agent_metric(&cp, "konnectivity_network_proxy_agent_open_server_connections").await == 2.0
    })
    .await;
    node_proxy(&cp).await;

    // Server 2 stops cleanly: it deletes its own lease at once (long before the 4 s expiry).
    let stopped_at = Instant::now();
    assert!(cp.extra_servers[0].stop(Duration::from_secs(10)), "server 2 stops on SIGTERM");
    backends.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != p2);
    let leases = server_leases(&cp).await;
    assert_eq!(leases.len(), 1, "server 2 deleted its lease on the way out ({:?} after SIGTERM)", stopped_at.elapsed());
    assert_eq!(leases[0]["spec"]["holderIdentity"], "e2e-server-1");

    // Two new servers: the agent finds them through the same balancer.
    let p4 = cp.start_extra_server(4, &[]).expect("server 4");
    let p5 = cp.start_extra_server(5, &[]).expect("server 5");
    backends.lock().unwrap_or_else(|e| e.into_inner()).extend([p4, p5]);
    let grown_at = Instant::now();
    wait_for("agent connected to the new set of 3", Duration::from_secs(20), async || {
        agent_metric(&cp, "konnectivity_network_proxy_agent_known_server_count").await == 3.0
            && agent_metric(&cp, "konnectivity_network_proxy_agent_open_server_connections").await == 3.0
    })
    .await;
    eprintln!(
        "leases: dead server's lease collected {collected_after:?} after SIGKILL; agent at 3 servers again {:?} \
         after two were added",
        grown_at.elapsed()
    );
    node_proxy(&cp).await;

    // All along the agent watched: one LIST at start (a relist only on 410 Gone), where polling every 300 ms
    // would have listed dozens of times by now; and kube-apiserver holds its WATCH.
    let lists_now =
        agent_metric(&cp, "konnectivity_network_proxy_agent_lease_lists_total{http_response_code=\"200\"}").await;
    assert!(lists_now <= lists + 1.0, "the agent kept listing: {lists} LISTs at first, {lists_now} now");
    let watches =
        agent_metric(&cp, "konnectivity_network_proxy_agent_lease_watches_total{http_response_code=\"200\"}").await;
    assert!(watches >= 1.0, "lease watches counted: {watches}");
    let (status, body) = cp.kas_request("GET", "/metrics", None).await.expect("kube-apiserver metrics");
    assert_eq!(status, 200);
    let held: f64 = String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_longrunning_requests{")
                && l.contains("resource=\"leases\"")
                && l.contains("verb=\"WATCH\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(held >= 1.0, "kube-apiserver holds no lease WATCH ({held})");
    eprintln!("leases: the agent sent {lists_now} LIST(s) and opened {watches} WATCH(es) in the whole test");
    cp.assert_no_decoy_hits();
    // The agent first: kube-apiserver's graceful stop waits for open WATCHes (it would for the reference's
    // informer too), longer than this test's 10 s. With the agent gone, nothing may be left on the server.
    let mut agent = cp.agent.take().expect("agent");
    assert!(agent.stop(Duration::from_secs(10)), "agent stops on SIGTERM");
    cp.assert_settled(Duration::from_secs(10)).await.expect("settled");
    assert!(cp.stop_kube_apiserver(), "kube-apiserver needed SIGKILL");
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}

/// The sum of a metric's series in a Prometheus text exposition whose labels contain every `label="value"` given.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What an agent counting server Leases costs kube-apiserver at steady state, ours and then the reference's
/// agent against the same real kube-apiserver: LISTs of Leases in a 20 s window (beyond the server's own, which
/// the server counts), and the WATCHes held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_counting_costs_kube_apiserver_one_watch_and_no_periodic_list_ours_and_the_reference() {
    let mut options = Options::new(EgressMode::GrpcUds);
    options.agent = false;
    options.server_args = ["--enable-lease-controller", "--lease-namespace=kube-system"].map(String::from).to_vec();
    let mut cp = ControlPlane::start(options).await.expect("control plane");
    wait_for("the server's lease", Duration::from_secs(20), async || server_leases(&cp).await.len() == 1).await;
    let kas_metrics = async |cp: &ControlPlane| {
        let (status, body) = cp.kas_request("GET", "/metrics", None).await.expect("kube-apiserver metrics");
        assert_eq!(status, 200);
        String::from_utf8_lossy(&body).to_string()
    };
    let lease_lists = async |cp: &ControlPlane| {
        let kas =
            metric_sum(&kas_metrics(cp).await, "apiserver_request_total", &["resource=\"leases\"", "verb=\"LIST\""]);
        let server = cp.server_metric("konnectivity_network_proxy_server_lease_list_total").await.unwrap_or(0.0);
        (kas, server)
    };
    let window = Duration::from_secs(20);
    let lease_watches = async |cp: &ControlPlane| {
        metric_sum(&kas_metrics(cp).await, "apiserver_longrunning_requests", &["resource=\"leases\"", "verb=\"WATCH\""])
    };
    // kube-apiserver's own (before any agent).
    let baseline = lease_watches(&cp).await;
    let ours = konnectivity_it::controlplane::workspace_bin("proxy-agent").expect("our agent");
    let reference = konnectivity_it::controlplane::interop_bin("proxy-agent").expect("the reference agent");
    let mut figures = Vec::new();
    for (who, bin) in [("ours", ours), ("reference", reference)] {
        cp.start_agent_from(bin, &["--count-server-leases".into(), "--lease-namespace=kube-system".into()])
            .await
            .expect("agent");
        wait_for("the agent connected", Duration::from_secs(20), async || {
            cp.agent_metric("konnectivity_network_proxy_agent_open_server_connections").await.unwrap_or(0.0) == 1.0
        })
        .await;
        // Past the first LIST: the WATCH that follows it is open.
        wait_for("the agent's lease WATCH", Duration::from_secs(20), async || lease_watches(&cp).await > baseline)
            .await;
        let (kas_before, server_before) = lease_lists(&cp).await;
        tokio::time::sleep(window).await;
        let (kas_after, server_after) = lease_lists(&cp).await;
        let agent_lists = (kas_after - kas_before) - (server_after - server_before);
        let watches = lease_watches(&cp).await - baseline;
        eprintln!(
            "lease load, {who} agent: {agent_lists} LIST(s) in {window:?} at steady state, {watches} WATCH(es) held"
        );
        figures.push((who, agent_lists, watches));
        let mut agent = cp.agent.take().expect("agent");
        if who == "ours" {
            assert!(agent.stop(Duration::from_secs(30)), "our agent stops on SIGTERM");
        } else {
            // The reference's agent drains on SIGTERM and then waits for a second signal.
            agent.kill();
        }
    }
    for (who, lists, watches) in figures {
        assert_eq!(lists, 0.0, "the {who} agent listed Leases at steady state");
        assert_eq!(watches, 1.0, "the {who} agent holds one Lease WATCH");
    }
    cp.assert_settled(Duration::from_secs(10)).await.expect("settled");
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}
