//! Token authentication under load (issue 20): a reconnect storm of hundreds of token-authenticated agents, and
//! a flood of streams with bad tokens, against a stand-in kube-apiserver that answers TokenReviews over TLS and
//! counts them. With the default limits (`--token-review-qps=50`, `--token-review-burst=100`) every agent of the
//! storm is in within seconds, with one review per distinct token; the flood costs a valid agent a few seconds
//! at most.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use konnectivity_it::eventually;
use konnectivity_it::stack::{AgentRun, Frontend, ServerRun, Stack};
use konnectivity_server::ServerConfig;
use konnectivity_server::config::AgentAuthConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const USERNAME: &str = "system:serviceaccount:kube-system:konnectivity-agent";

/// A stand-in kube-apiserver: answers `POST /apis/authentication.k8s.io/v1/tokenreviews` over TLS, accepting
/// tokens whose signature part is `good` as the agents' ServiceAccount, and counting reviews per token.
struct FakeKube {
    addr: SocketAddr,
    reviews: Arc<Mutex<HashMap<String, usize>>>,
    stop: CancellationToken,
}

impl FakeKube {
    async fn start(stack: &Stack) -> Self {
        let tls = konnectivity_transport::tls::server_config(
            &stack.pki.server_cert,
            &stack.pki.server_key,
            &konnectivity_transport::tls::ClientAuth::None,
            &[b"http/1.1"],
        )
        .expect("tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reviews = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        let (counts, token) = (reviews.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((tcp, _)) => tcp, Err(_) => continue },
                };
                let (tls, counts, token) =
                    (tokio_rustls::TlsAcceptor::from(tls.clone()), counts.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| review(req, counts.clone()));
                    let conn =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! { _ = conn => {}, _ = token.cancelled() => {} }
                });
            }
        });
        Self { addr, reviews, stop }
    }

    /// A kubeconfig for it, trusting the stack's CA.
    fn kubeconfig(&self, stack: &Stack) -> PathBuf {
        let path = stack.dir().join(format!("kube-{}.kubeconfig", self.addr.port()));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://{}\n    \
                 certificate-authority: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n\
                 current-context: fake\n",
                self.addr,
                stack.pki.ca.display()
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// Reviews made so far, and the most of one token.
    fn counts(&self) -> (usize, usize) {
        let reviews = self.reviews.lock().expect("counts");
        (reviews.values().sum(), reviews.values().copied().max().unwrap_or(0))
    }

    fn reset(&self) {
        self.reviews.lock().expect("counts").clear();
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn review(
    req: http::Request<hyper::body::Incoming>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
) -> Result<http::Response<Full<Bytes>>, hyper::Error> {
    let path_ok =
        req.method() == http::Method::POST && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews";
    let body = req.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = json["spec"]["token"].as_str().unwrap_or_default().to_string();
    if !path_ok || token.is_empty() {
        let mut response = http::Response::new(Full::new(Bytes::from_static(b"{\"message\":\"bad request\"}")));
        *response.status_mut() = http::StatusCode::BAD_REQUEST;
        return Ok(response);
    }
    *counts.lock().expect("counts").entry(token.clone()).or_default() += 1;
    // kube-apiserver takes a few milliseconds to check a signature.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let status = if token.ends_with(".good") {
        serde_json::json!({"authenticated": true, "user": {"username": USERNAME}, "audiences": ["konnectivity"]})
    } else {
        serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
    };
    let answer = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status});
    Ok(http::Response::new(Full::new(Bytes::from(answer.to_string()))))
}

/// A JWT-shaped token, distinct per `n`, whose signature says whether the stand-in accepts it.
fn token(n: usize, good: bool) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let claims = serde_json::json!({"sub": USERNAME, "aud": ["konnectivity"], "exp": exp, "jti": n});
    format!("{}.{}.{}", b64(serde_json::json!({"alg": "RS256"})), b64(claims), if good { "good" } else { "bad" })
}

/// A token-authenticating server (default review limits) on `agent_port` (0: any).
fn server_config(stack: &Stack, kube: &FakeKube, agent_port: u16) -> ServerConfig {
    let mut config = stack.server_config(Frontend::Uds);
    config.cluster_ca = None;
    config.agent_port = agent_port;
    config.kube.kubeconfig = Some(kube.kubeconfig(stack));
    config.agent_auth = Some(AgentAuthConfig::new("kube-system", "konnectivity-agent", "konnectivity"));
    config
}

/// Starts an agent of server `addr` with token `n`, the default reconnect backoff and no listeners.
async fn token_agent(stack: &Stack, addr: SocketAddr, n: usize) -> AgentRun {
    let path = stack.dir().join(format!("token-{n}"));
    std::fs::write(&path, token(n, true)).expect("token file");
    let mut config = stack.agent_config(addr);
    config.agent_cert = None;
    config.service_account_token_path = Some(path);
    (config.sync_interval, config.sync_interval_cap) = (Duration::from_secs(1), Duration::from_secs(10));
    (config.health, config.admin) = (None, None);
    stack.start_agent(config).await.expect("agent")
}

fn auth_results(server: &ServerRun) -> String {
    let text = prometheus::TextEncoder::new().encode_to_string(&server.handle.metrics().registry().gather());
    text.unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("konnectivity_network_proxy_server_agent_authentications_total{"))
        .map(|l| l.trim_start_matches("konnectivity_network_proxy_server_agent_authentications_total"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until `server` holds `agents` agent streams; returns how long that took.
async fn all_in(server: &ServerRun, agents: usize, what: &str) -> Duration {
    let start = Instant::now();
    eventually!(
        60,
        server.handle.agent_count() >= agents,
        "{what}: {} of {agents} agents in",
        server.handle.agent_count()
    );
    start.elapsed()
}

const STORM: usize = 300;

/// 300 agents arrive at once at a fresh server (a start), then reconnect at once to its successor on the same
/// port (a restart: the review cache is gone). Both times every agent is authenticated within seconds, and
/// kube-apiserver sees one review per distinct token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_costs_one_review_per_token_and_seconds() {
    assert!(
        konnectivity_agent::HEADER_TIMEOUT >= konnectivity_server::TOKEN_REVIEW_TIMEOUT + Duration::from_secs(5),
        "agents must wait for response headers longer than a server may take to review their token"
    );
    let stack = Stack::new().expect("stack");
    let kube = FakeKube::start(&stack).await;
    let server = stack.start_server(server_config(&stack, &kube, 0)).await.expect("server");
    let port = server.agent_addr.port();
    let agents = futures_util::future::join_all((0..STORM).map(|n| token_agent(&stack, server.agent_addr, n))).await;
    let took = all_in(&server, STORM, "start").await;
    let (reviews, most) = kube.counts();
    eprintln!(
        "start: {STORM} agents in after {took:?}; {reviews} reviews (at most {most} per token); {}",
        auth_results(&server)
    );
    assert_eq!((reviews, most), (STORM, 1), "one review per token");

    kube.reset();
    server.stop().await;
    let server = stack.start_server(server_config(&stack, &kube, port)).await.expect("restarted server");
    let took = all_in(&server, STORM, "restart").await;
    let (reviews, most) = kube.counts();
    eprintln!(
        "restart: {STORM} agents back after {took:?}; {reviews} reviews (at most {most} per token); {}",
        auth_results(&server)
    );
    assert_eq!((reviews, most), (STORM, 1), "one review per token");
    assert!(took < Duration::from_secs(60));

    futures_util::future::join_all(agents.into_iter().map(AgentRun::stop)).await;
    eventually!(10, server.handle.agent_count() == 0, "agent streams left on the server");
    server.stop().await;
}

/// How a flood connection behaves.
#[derive(Clone)]
struct Flood {
    agent_addr: SocketAddr,
    ca: PathBuf,
    /// JWT-shaped bad tokens (else tokens that are not JWTs at all).
    jwt: bool,
    /// How long a stream waits for the server's answer before it is dropped.
    hold: Duration,
    /// Until cancelled, every stream that ends is replaced by a new one (after `pause`); already cancelled, each
    /// slot opens one stream only.
    until: CancellationToken,
    pause: Duration,
}

impl Flood {
    /// One connection from 127.0.0.2 to the agent port carrying 4 streams at once (the server's limit per
    /// connection), each with a distinct bad token.
    async fn connection(self, first: usize) {
        let Ok(tls) = konnectivity_transport::tls::client_config(&self.ca, None, &[b"h2".to_vec()]) else { return };
        let agent_addr = self.agent_addr;
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tokio_rustls::TlsConnector::from(tls.clone());
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind("127.0.0.2:0".parse().map_err(std::io::Error::other)?)?;
                let tcp = socket.connect(agent_addr).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
            }
        });
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{agent_addr}")) else { return };
        let Ok(channel) = endpoint.connect_with_connector(connector).await else { return };
        futures_util::future::join_all((0..4).map(|slot| {
            let mut client = konnectivity_proto::agent::AgentServiceClient::new(channel.clone());
            let flood = self.clone();
            async move {
                for round in 0.. {
                    let n = first + slot + round * 1_000_000;
                    let token = if flood.jwt { token(n, false) } else { format!("garbage-{n}") };
                    let (_tx, rx) = tokio::sync::mpsc::channel::<konnectivity_proto::Packet>(1);
                    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    request.metadata_mut().insert("agentid", "flood".parse().expect("id"));
                    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("value"));
                    let _ = tokio::time::timeout(flood.hold, client.connect(request)).await;
                    if flood.until.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(flood.pause).await;
                }
            }
        }))
        .await;
    }

    /// 300 streams on 75 connections.
    async fn run(self) {
        futures_util::future::join_all((0..STORM).step_by(4).map(|n| self.clone().connection(n))).await;
    }
}

/// What a flooding stream slot waits before its next stream.
const PAUSE: Duration = Duration::from_millis(100);

/// 300 streams with bad tokens, opened at once from one address: first tokens not even shaped like JWTs (refused
/// without a review), then JWT-shaped ones, each stream replaced by a new one with a new token as soon as it
/// ends (answered, or dropped after 2 s). A valid agent started from another address once the review burst is
/// spent is in within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_does_not_hold_up_a_valid_agent() {
    let stack = Stack::new().expect("stack");
    let kube = FakeKube::start(&stack).await;
    let server = stack.start_server(server_config(&stack, &kube, 0)).await.expect("server");
    let addr = server.agent_addr;

    let done = CancellationToken::new();
    done.cancel();
    let flood = |jwt, hold, until| Flood { agent_addr: addr, ca: stack.pki.ca.clone(), jwt, hold, until, pause: PAUSE };
    flood(false, Duration::from_secs(5), done).run().await;
    let text = auth_results(&server);
    assert!(text.contains(&format!("{{result=\"denied\"}} {STORM}")), "every stream refused: {text}");
    assert_eq!(kube.counts().0, 0, "tokens that are not JWTs are refused without a review");

    let flooding = CancellationToken::new();
    let flood = tokio::spawn(flood(true, Duration::from_secs(2), flooding.clone()).run());
    // The burst is spent: from now on reviews are paced, and the flood's queue up.
    eventually!(20, kube.counts().0 > 150, "the flood's tokens are reviewed");
    let start = Instant::now();
    let agent = token_agent(&stack, addr, 0).await;
    eventually!(30, server.handle.agent_count() == 1, "the valid agent is not in");
    let took = start.elapsed();
    flooding.cancel();
    flood.await.expect("flood");
    let (reviews, most) = kube.counts();
    eprintln!(
        "flood: the valid agent was in after {took:?}; {reviews} reviews (at most {most} per token); {}",
        auth_results(&server)
    );
    assert!(took < Duration::from_secs(5), "the flood held the valid agent up for {took:?}");
    assert_eq!(most, 1, "no token was reviewed twice");

    agent.stop().await;
    eventually!(10, server.handle.agent_count() == 0, "agent streams left on the server");
    server.stop().await;
}
