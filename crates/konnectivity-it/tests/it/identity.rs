//! An agent is who its credential says: with node credentials (a `system:node:<name>` certificate, or a
//! ServiceAccount token bound to a node), an agent cannot claim another node's host name or addresses, CIDRs or
//! the default route it was not granted, an agent ID another identity holds, or an unbounded number of agent IDs.
//! Every refusal is a `PermissionDenied`, counted by reason and audited with the agent's address and identity.

use hyper_util::rt::TokioIo;
use konnectivity_it::eventually;
use konnectivity_it::stack::{Frontend, ServerRun, Stack, assert_settled};
use konnectivity_proto::Packet;
use konnectivity_server::{AgentIdentityConfig, AuditConfig, AuditOutput, Grants, IdentityMode};
use konnectivity_testkit::pki::{Ca, Leaf};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// What an agent presents: a client certificate (cert, key) or a bearer token.
enum Credential<'a> {
    Cert(&'a (PathBuf, PathBuf)),
    Token(&'a str),
}

/// An open agent stream (kept open while held).
struct Stream {
    _to_server: mpsc::Sender<Packet>,
    _inbound: tonic::Streaming<Packet>,
}

/// Opens `/AgentService/Connect` as `agent_id` claiming `identifiers`; the server's verdict.
async fn connect(
    stack: &Stack,
    server: &ServerRun,
    credential: Credential<'_>,
    agent_id: &str,
    identifiers: &str,
) -> Result<Stream, tonic::Status> {
    let identity = match &credential {
        Credential::Cert((cert, key)) => Some((cert.as_path(), key.as_path())),
        Credential::Token(_) => None,
    };
    let tls = konnectivity_transport::tls::client_config(&stack.pki.ca, identity, &[b"h2".to_vec()]).expect("tls");
    let addr = server.agent_addr;
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tokio_rustls::TlsConnector::from(tls.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("channel");
    let (to_server, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("agentid", agent_id.parse().expect("id"));
    request.metadata_mut().insert("agentidentifiers", identifiers.parse().expect("identifiers"));
    if let Credential::Token(token) = credential {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("token"));
    }
    let response = konnectivity_proto::agent::AgentServiceClient::new(channel).connect(request).await?;
    Ok(Stream { _to_server: to_server, _inbound: response.into_inner() })
}

/// Asserts a refusal: `PermissionDenied` (unless said otherwise) whose message contains `needle`.
fn refused(result: Result<Stream, tonic::Status>, needle: &str) -> tonic::Status {
    let status = result.err().unwrap_or_else(|| panic!("accepted, but should be refused ({needle})"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(needle), "{:?} does not contain {needle:?}", status.message());
    status
}

fn refusals(server: &ServerRun, reason: &str) -> u64 {
    server.handle.metrics().identity_refusals(reason)
}

/// Every line of the audit log, parsed.
fn audit_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

fn identity_config(mode: IdentityMode, grants: &str) -> AgentIdentityConfig {
    let mut config = AgentIdentityConfig::new(mode);
    config.grants = Grants::parse(grants).expect("grants");
    config
}

/// Certificates: node-b's agent cannot take node-a's host, addresses, CIDRs, default route or agent ID, nor open
/// a flood of agent IDs; node-a's real agent serves traffic, and the audit log names its credential and address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_bind_agents_to_their_node() {
    let stack = Stack::new().expect("pki");
    let ca = Ca::new("node CA").expect("ca");
    let dir = stack.dir();
    let node_cert = |node: &str| {
        ca.write_leaf(dir, node, &Leaf::client(&format!("system:node:{node}")).organization("system:nodes"))
            .expect("cert")
    };
    let (node_a, node_b, gateway) = (node_cert("node-a"), node_cert("node-b"), node_cert("gw"));
    let shared = ca.write_leaf(dir, "shared", &Leaf::client("proxy-agent")).expect("shared cert");
    let audit = dir.join("audit.log");
    let mut config = stack.server_config(Frontend::Uds);
    config.cluster_ca = Some(ca.write(dir, "node-ca").expect("ca file"));
    config.audit = Some(AuditConfig::new(AuditOutput::File(audit.clone())));
    config.agent_identity = identity_config(
        IdentityMode::Auto,
        r#"{"grants": [{"node": "gw", "cidr": ["10.0.0.0/8"], "default-route": true}]}"#,
    );
    let server = stack.start_server(config).await.expect("server");

    // node-a's real agent, claiming its own name.
    let target = konnectivity_it::targets::echo_target("127.0.0.1:0").await.expect("echo");
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.agent_cert = Some(node_a.clone());
    agent_config.agent_id = "agent-a".into();
    agent_config.agent_identifiers = "host=node-a".into();
    let agent = stack.start_agent(agent_config).await.expect("agent");
    eventually!(10, server.handle.ready() && agent.handle.ready(), "node-a's agent did not connect");
    let agents = server.handle.agents();
    assert!(agents[0].identity.contains("\"system:node:node-a\" (node node-a)"), "{agents:?}");
    let view = server.handle.debug_connections();
    assert_eq!(view["agents"][0]["credential"]["bound"], true, "{view}");

    // Hijack attempts with node-b's certificate.
    let b = |id: String| {
        let (stack, server, node_b) = (&stack, &server, &node_b);
        async move { connect(stack, server, Credential::Cert(node_b), &id, "").await }
    };
    let b_claims = |q: &'static str| connect(&stack, &server, Credential::Cert(&node_b), "agent-b", q);
    refused(b_claims("host=node-a").await, "may not claim host=node-a");
    refused(b_claims("host=node-b&ipv4=127.0.0.2").await, "may not claim ipv4=127.0.0.2");
    refused(b_claims("cidr=10.0.0.0/8").await, "may not claim cidr=10.0.0.0/8");
    refused(b_claims("default-route=true").await, "may not claim default-route=true");
    refused(b("agent-a".into()).await, "agent ID \"agent-a\" is held by a connected agent of another identity");
    // A shared certificate cannot take a node's agent ID either (though its other claims are taken on trust).
    refused(
        connect(&stack, &server, Credential::Cert(&shared), "agent-a", "").await,
        "held by a connected agent of another identity",
    );
    // The granted gateway may claim its range and the default route; a wider range is refused.
    let gw = connect(&stack, &server, Credential::Cert(&gateway), "gw-1", "cidr=10.1.0.0/16&default-route=true")
        .await
        .expect("granted claims");
    refused(connect(&stack, &server, Credential::Cert(&gateway), "gw-2", "cidr=0.0.0.0/0").await, "cidr=0.0.0.0/0");

    // A flood of agent IDs from node-b's credential: two are held, every further one is refused.
    let mut held = vec![b("b-1".into()).await.expect("first ID"), b("b-2".into()).await.expect("second ID")];
    for n in 3..=20 {
        refused(b(format!("b-{n}")).await, "already holds 2 agent IDs");
    }
    // A second stream of an ID it holds is fine (a reconnect; the stale-stream probe decides about the old one).
    held.push(b("b-1".into()).await.expect("same ID again"));
    assert_eq!(server.handle.agent_count(), 4, "agent-a, gw-1, b-1, b-2: {:?}", server.handle.agents());

    for (reason, n) in
        [("host", 1), ("address", 1), ("cidr", 2), ("default_route", 1), ("agent_id_taken", 2), ("agent_id_limit", 18)]
    {
        assert_eq!(refusals(&server, reason), n, "{reason}");
    }
    // The other streams hold nothing: gone when dropped, and with them their agent IDs.
    drop((gw, held));
    eventually!(
        10,
        server.handle.agent_count() == 1,
        "refused or closed streams left agents: {:?}",
        server.handle.agents()
    );
    let b3 = b("b-3".into()).await.expect("IDs are freed when their streams end");
    drop(b3);
    eventually!(10, server.handle.agent_count() == 1, "b-3 left behind");
    // node-a's agent, alone again, carries a connection (its audit lines name its credential).
    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let mut conn = tunnel.dial(&target.addr.to_string()).await.expect("dial through agent-a");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        conn.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping");
    }
    drop(conn);
    drop(tunnel);
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;

    let lines = audit_lines(&audit);
    let refused_lines: Vec<&Value> = lines.iter().filter(|l| l["event"] == "agent_refused").collect();
    assert_eq!(refused_lines.len(), 25, "every refusal is audited");
    let host = refused_lines.iter().find(|l| l["reason"] == "host").expect("host refusal audited");
    assert_eq!(host["agent_id"], "agent-b");
    assert_eq!(host["agent_credential"], "certificate");
    assert_eq!(host["agent_identity"], "system:node:node-b");
    assert_eq!(host["agent_node"], "node-b");
    assert!(host["agent_peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{host}");
    assert!(host["error"].as_str().is_some_and(|e| e.contains("host=node-a")), "{host}");
    let open = lines.iter().find(|l| l["event"] == "open").expect("the connection was audited");
    assert_eq!(open["agent_id"], "agent-a");
    assert_eq!(open["agent_identity"], "system:node:node-a");
    assert_eq!(open["agent_node"], "node-a");
    assert!(open["agent_peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{open}");
    let close = lines.iter().find(|l| l["event"] == "close").expect("close audited");
    assert_eq!(close["agent_credential"], "certificate");
}

/// Strict mode refuses a certificate that names no node; trust mode (the reference's behaviour) lets any
/// certificate claim anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_shared_credentials_and_trust_takes_every_claim() {
    let stack = Stack::new().expect("pki");
    let mut config = stack.server_config(Frontend::Uds);
    config.agent_identity = identity_config(IdentityMode::Strict, r#"{"grants": []}"#);
    let server = stack.start_server(config).await.expect("strict server");
    let shared = (stack.pki.agent_cert.clone(), stack.pki.agent_key.clone());
    refused(connect(&stack, &server, Credential::Cert(&shared), "any", "").await, "names no node");
    assert_eq!(refusals(&server, "no_node_identity"), 1);
    assert_eq!(server.handle.agent_count(), 0);
    server.stop().await;

    let mut config = stack.server_config(Frontend::Uds);
    config.frontend =
        konnectivity_server::FrontendListen::Uds { path: stack.dir().join("t.sock"), delete_existing: true };
    config.agent_identity = identity_config(IdentityMode::Trust, r#"{"grants": []}"#);
    let server = stack.start_server(config).await.expect("trusting server");
    let claims = "host=node-a&ipv4=127.0.0.2&cidr=0.0.0.0/0&default-route=true";
    let one = connect(&stack, &server, Credential::Cert(&shared), "node-a", claims).await.expect("trusted");
    let two = connect(&stack, &server, Credential::Cert(&shared), "node-b", claims).await.expect("trusted");
    assert_eq!(server.handle.agent_count(), 2);
    drop((one, two));
    eventually!(10, server.handle.agent_count() == 0, "streams left behind");
    server.stop().await;
}

/// The nodes and tokens the stand-in kube-apiserver knows.
const NODES: &[(&str, &[(&str, &str)])] = &[
    ("node-a", &[("InternalIP", "10.9.0.1"), ("Hostname", "node-a.internal")]),
    ("node-b", &[("InternalIP", "10.9.0.2")]),
];
const AGENT_SA: &str = "system:serviceaccount:kube-system:konnectivity-agent";

/// A JWT-shaped token (the server reviews nothing else) carrying `label` for the stand-in to read.
fn jwt(label: &str) -> String {
    use base64::Engine;
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!(
        "{}.{}.sig",
        enc(serde_json::json!({"alg": "RS256"})),
        enc(serde_json::json!({"label": label, "exp": exp + 600}))
    )
}

/// The label of a token made by [`jwt`].
fn label_of(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap_or_default();
    let claims: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    claims["label"].as_str().unwrap_or_default().to_string()
}

/// A stand-in kube-apiserver over TLS: TokenReviews (a token labelled `token-<node>` is the agent ServiceAccount
/// bound to node `<node>`, `token-shared` the same account unbound) and Node GETs, counted.
fn kube_stand_in(stack: &Stack, node_gets: Arc<AtomicUsize>) -> konnectivity_it::targets::Target {
    use http_body_util::{BodyExt, Full};
    let tls = konnectivity_transport::tls::server_config(
        &stack.pki.server_cert,
        &stack.pki.server_key,
        &konnectivity_transport::tls::ClientAuth::None,
        &[b"http/1.1"],
    )
    .expect("tls");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    konnectivity_it::targets::serve_listener(listener, move |tcp, _| {
        let (tls, node_gets) = (tls.clone(), node_gets.clone());
        async move {
            let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let node_gets = node_gets.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let (status, json) = if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let token = label_of(review["spec"]["token"].as_str().unwrap_or_default());
                        let token = token.as_str();
                        let mut user = serde_json::json!({"username": AGENT_SA});
                        match token.strip_prefix("token-") {
                            Some("shared") => {}
                            Some(node) => {
                                user["extra"] = serde_json::json!({"authentication.kubernetes.io/node-name": [node]})
                            }
                            None => user = serde_json::json!({}),
                        }
                        let authenticated = token.starts_with("token-");
                        (200, serde_json::json!({"status": {"authenticated": authenticated, "user": user}}))
                    } else if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
                        node_gets.fetch_add(1, Ordering::SeqCst);
                        match NODES.iter().find(|(n, _)| *n == name) {
                            _ if name == "node-broken" => {
                                (500, serde_json::json!({"kind": "Status", "message": "etcd is on fire"}))
                            }
                            // As kube-apiserver answers a server whose RBAC has no `get nodes`.
                            _ if name == "node-forbidden" => {
                                (403, serde_json::json!({"kind": "Status", "message": "nodes is forbidden"}))
                            }
                            Some((_, addresses)) => {
                                let addresses: Vec<Value> = addresses
                                    .iter()
                                    .map(|(kind, address)| serde_json::json!({"type": kind, "address": address}))
                                    .collect();
                                (200, serde_json::json!({"status": {"addresses": addresses}}))
                            }
                            None => (404, serde_json::json!({"kind": "Status", "message": "nodes not found"})),
                        }
                    } else {
                        (404, serde_json::json!({"message": "not here"}))
                    };
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(bytes::Bytes::from(json.to_string())))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        }
    })
    .expect("stand-in")
}

/// A server authenticating agents by token against [`kube_stand_in`], in `mode`.
async fn token_server(
    stack: &Stack,
    node_gets: Arc<AtomicUsize>,
    mode: IdentityMode,
    audit: Option<&std::path::Path>,
) -> (konnectivity_it::targets::Target, ServerRun) {
    let kube = kube_stand_in(stack, node_gets);
    let kubeconfig = stack.dir().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster:\n    server: https://localhost:{}\n    \
             certificate-authority: {}\ncontexts:\n- name: k\n  context:\n    cluster: k\ncurrent-context: k\n",
            kube.addr.port(),
            stack.pki.ca.display()
        ),
    )
    .expect("kubeconfig");
    let mut config = stack.server_config(Frontend::Uds);
    config.cluster_ca = None;
    config.kube.kubeconfig = Some(kubeconfig);
    config.agent_auth = Some(konnectivity_server::config::AgentAuthConfig::new(
        "kube-system",
        "konnectivity-agent",
        "system:konnectivity-server",
    ));
    if let Some(audit) = audit {
        config.audit = Some(AuditConfig::new(AuditOutput::File(audit.to_path_buf())));
    }
    config.agent_identity = identity_config(mode, r#"{"grants": []}"#);
    (kube, stack.start_server(config).await.expect("server"))
}

/// A server without `get` on `nodes` (the reference's RBAC), in auto mode: a node-bound agent's address claims
/// are taken on trust (with a warning) rather than every such agent locked out; its agent-ID and name rules
/// still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_without_node_access_takes_address_claims_on_trust() {
    let stack = Stack::new().expect("pki");
    let (_kube, server) = token_server(&stack, Arc::new(AtomicUsize::new(0)), IdentityMode::Auto, None).await;
    let with = |label: &'static str, id: &'static str, q: &'static str| {
        let (stack, server) = (&stack, &server);
        async move { connect(stack, server, Credential::Token(&jwt(label)), id, q).await }
    };
    let f = with("token-node-forbidden", "agent-f", "host=node-forbidden&ipv4=10.9.0.8").await.expect("on trust");
    refused(with("token-node-b", "agent-f", "").await, "held by a connected agent of another identity");
    assert_eq!(refusals(&server, "node_lookup_error"), 0);
    drop(f);
    eventually!(10, server.handle.agent_count() == 0, "streams left behind: {:?}", server.handle.agents());
    assert_settled(&server, None).await;
    server.stop().await;
}

/// Tokens: a ServiceAccount token bound to node-b cannot claim node-a's addresses or names, nor its agent ID, nor
/// a flood of IDs; node-a's bound token may claim node-a's addresses (read once, then cached); an unbound token
/// is refused in strict mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_tokens_bind_agents_to_their_node() {
    let stack = Stack::new().expect("pki");
    let node_gets = Arc::new(AtomicUsize::new(0));
    let audit = stack.dir().join("audit.log");
    let (_kube, server) = token_server(&stack, node_gets.clone(), IdentityMode::Strict, Some(&audit)).await;
    let with = |label: &'static str, id: &'static str, q: &'static str| {
        let (stack, server) = (&stack, &server);
        async move { connect(stack, server, Credential::Token(&jwt(label)), id, q).await }
    };

    let a = with("token-node-a", "agent-a", "host=node-a&host=node-a.internal&ipv4=10.9.0.1").await.expect("own");
    let a2 = with("token-node-a", "agent-a2", "ipv4=10.9.0.1").await.expect("own again, from the cache");
    assert_eq!(node_gets.load(Ordering::SeqCst), 1, "node-a's addresses are read once");
    refused(with("token-node-b", "agent-b", "ipv4=10.9.0.1").await, "may not claim ipv4=10.9.0.1");
    refused(with("token-node-b", "agent-b", "host=node-a.internal").await, "may not claim host=node-a.internal");
    refused(with("token-node-b", "agent-a", "").await, "held by a connected agent of another identity");
    refused(with("token-node-z", "agent-z", "ipv4=10.9.0.9").await, "there is no node \"node-z\"");
    refused(with("token-shared", "agent-s", "").await, "names no node");
    // kube-apiserver cannot say: the agent is told to come back (Unavailable), not refused for good.
    let unsure = with("token-node-broken", "agent-x", "ipv4=10.9.0.7").await.err().expect("not admitted");
    assert_eq!(unsure.code(), tonic::Code::Unavailable, "{unsure:?}");
    assert!(unsure.message().contains("etcd is on fire"), "{unsure:?}");
    // No RBAC to read Nodes: strict mode cannot check, so it does not admit.
    let forbidden = with("token-node-forbidden", "agent-f", "ipv4=10.9.0.8").await.err().expect("not admitted");
    assert_eq!(forbidden.code(), tonic::Code::Unavailable, "{forbidden:?}");
    let b = with("token-node-b", "agent-b", "host=node-b&ipv4=10.9.0.2").await.expect("node-b's own");
    refused(with("token-node-a", "agent-a3", "").await, "already holds 2 agent IDs");
    for (reason, n) in [
        ("address", 1),
        ("host", 1),
        ("agent_id_taken", 1),
        ("unknown_node", 1),
        ("no_node_identity", 1),
        ("agent_id_limit", 1),
        ("node_lookup_error", 2),
    ] {
        assert_eq!(refusals(&server, reason), n, "{reason}");
    }
    assert_eq!(server.handle.agent_count(), 3);
    drop((a, a2, b));
    eventually!(10, server.handle.agent_count() == 0, "streams left behind: {:?}", server.handle.agents());
    assert_settled(&server, None).await;
    server.stop().await;
    let lines = audit_lines(&audit);
    let taken = lines.iter().find(|l| l["reason"] == "agent_id_taken").expect("audited");
    assert_eq!((taken["agent_credential"].as_str(), taken["agent_identity"].as_str()), (Some("token"), Some(AGENT_SA)));
    assert_eq!(taken["agent_node"], "node-b");
    assert_eq!(lines.iter().filter(|l| l["event"] == "agent_refused").count(), 8);
}

/// A ServiceAccount token bound to a pod on `node` (as a projected token is): kube-apiserver's TokenReview then
/// names the node.
async fn bound_token(cp: &konnectivity_it::controlplane::ControlPlane, pod: &str, node: &str) -> String {
    let auth = konnectivity_it::controlplane::TokenAuth::default();
    let (ns, sa) = (&auth.namespace, &auth.service_account);
    cp.create_token(ns, sa, &auth.audience, 600).await.expect("the ServiceAccount exists");
    let spec = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
        "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "konnectivity-rs.invalid/agent:none"}]}
    });
    let (status, body) =
        cp.kas_request("POST", &format!("/api/v1/namespaces/{ns}/pods"), Some(&spec)).await.expect("create pod");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let created: Value = serde_json::from_slice(&body).expect("pod");
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [auth.audience], "expirationSeconds": 600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": created["metadata"]["uid"]}}
    });
    let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
    let (status, body) = cp.kas_request("POST", &path, Some(&request)).await.expect("token request");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("token");
    v["status"]["token"].as_str().expect("a token").to_string()
}

/// Opens `/AgentService/Connect` from the cluster network with `token`, as `agent_id` claiming `identifiers`.
async fn cluster_connect(
    cp: &konnectivity_it::controlplane::ControlPlane,
    token: &str,
    agent_id: &str,
    identifiers: &str,
) -> Result<Stream, tonic::Status> {
    use konnectivity_it::controlplane::{AGENT_PORT, CONTROL_LINK};
    let tls = konnectivity_transport::tls::client_config(&cp.pki.ca, None, &[b"h2".to_vec()]).expect("tls");
    let tcp = cp.cluster.connect((CONTROL_LINK, AGENT_PORT).into(), std::time::Duration::from_secs(5)).await;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from(CONTROL_LINK).into());
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp.expect("tcp")).await.expect("tls handshake");
    let mut stream = Some(stream);
    let connector = tower::service_fn(move |_: http::Uri| {
        let s = stream.take();
        async move { s.map(TokioIo::new).ok_or_else(|| std::io::Error::other("used")) }
    });
    let channel = tonic::transport::Endpoint::from_static("http://agent-port")
        .connect_with_connector(connector)
        .await
        .expect("channel");
    let (to_server, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("agentid", agent_id.parse().expect("id"));
    request.metadata_mut().insert("agentidentifiers", identifiers.parse().expect("identifiers"));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("token"));
    let response = konnectivity_proto::agent::AgentServiceClient::new(channel).connect(request).await?;
    Ok(Stream { _to_server: to_server, _inbound: response.into_inner() })
}

/// With a real kube-apiserver: a token bound to a pod on the node is that node's identity (the TokenReview's
/// node-name), may claim the node's real address (read from its Node), and nothing else; the fixture's agent,
/// whose token is not bound, is a shared identity taken on trust and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kube_apiserver_bound_tokens_name_their_node() {
    use konnectivity_it::controlplane::{ControlPlane, EgressMode, NODE_IP, NODE_NAME, Options};
    let mut options = Options::new(EgressMode::GrpcUds);
    options.token_auth = Some(Default::default());
    let mut cp = ControlPlane::start(options).await.expect("control plane");
    let token = bound_token(&cp, "agent-on-node-1", NODE_NAME).await;

    let own = format!("host={NODE_NAME}&ipv4={NODE_IP}");
    let stream = cluster_connect(&cp, &token, "bound-1", &own).await.expect("its own node's name and address");
    refused(cluster_connect(&cp, &token, "bound-2", "ipv4=198.18.0.99").await, "may not claim ipv4=198.18.0.99");
    refused(cluster_connect(&cp, &token, "bound-2", "host=node-2").await, "may not claim host=node-2");
    refused(cluster_connect(&cp, &token, "bound-2", "default-route=true").await, "default-route=true");
    // The fixture's own agent holds its ID under the shared (unbound) identity.
    refused(cluster_connect(&cp, &token, "e2e-agent-1", "").await, "held by a connected agent of another identity");
    drop(stream);
    let metric = async |reason: &str| {
        let name = format!("konnectivity_network_proxy_server_agent_identity_refusals_total{{reason=\"{reason}\"}}");
        cp.server_metric(&name).await.unwrap_or(0.0)
    };
    for (reason, n) in [("address", 1.0), ("host", 1.0), ("default_route", 1.0), ("agent_id_taken", 1.0)] {
        assert_eq!(metric(reason).await, n, "{reason}");
    }
    let (status, body) =
        cp.kas_request("GET", &format!("/api/v1/nodes/{NODE_NAME}:10250/proxy/healthz"), None).await.expect("req");
    assert_eq!(status, 200, "the fixture's agent still serves: {}", String::from_utf8_lossy(&body));
    cp.assert_no_decoy_hits();
    assert!(cp.stop_kube_apiserver(), "kube-apiserver needed SIGKILL");
    cp.assert_settled(std::time::Duration::from_secs(10)).await.expect("settled");
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}
