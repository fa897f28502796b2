//! The client side of kube-apiserver's egress selector: proxy-test-client reading an EgressSelectorConfiguration
//! file (all three transports kube-apiserver dials through a proxy-server, and a refused one), and the
//! `TunnelConnector` under hyper-util's legacy `Client`.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use konnectivity_client::{DialError, DialFailureReason, EgressDialer, EgressSelectorConfiguration, TunnelConnector};
use konnectivity_it::stack::{Frontend, ServerRun, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::http_target;
use konnectivity_server::FrontendAddr;

/// An EgressSelectorConfiguration whose `cluster` selection points at `server`'s frontend.
fn egress_file(stack: &Stack, server: &ServerRun, frontend: Frontend) -> std::path::PathBuf {
    let transport = match (&server.frontend_addr, frontend) {
        (FrontendAddr::Uds(p), _) => format!("      uds:\n        udsName: {}\n", p.display()),
        (FrontendAddr::Tcp(a), _) => format!(
            "      tcp:\n        url: https://localhost:{}\n        tlsConfig:\n          caBundle: {}\n          \
             clientCert: {}\n          clientKey: {}\n",
            a.port(),
            stack.pki.ca.display(),
            stack.pki.client_cert.display(),
            stack.pki.client_key.display(),
        ),
    };
    let protocol = if matches!(frontend, Frontend::Uds | Frontend::TcpMtls) { "GRPC" } else { "HTTPConnect" };
    let text = format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
         - name: cluster\n  connection:\n    proxyProtocol: {protocol}\n    transport:\n{transport}\
         - name: master\n  connection:\n    proxyProtocol: Direct\n"
    );
    let path = stack.dir().join("egress-selector.yaml");
    std::fs::write(&path, text).expect("write egress file");
    path
}

async fn run_test_client(file: &std::path::Path, target_port: u16) -> std::process::Output {
    tokio::process::Command::new(crate::faults::binary("proxy-test-client"))
        .args([
            format!("--egress-selector-config-file={}", file.display()),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={target_port}"),
            "--test-requests=2".into(),
        ])
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run proxy-test-client")
}

#[tokio::test]
async fn proxy_test_client_dials_as_the_egress_selector_file_says() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    for frontend in [Frontend::Uds, Frontend::ConnectUds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (server, agent) = server_and_agent(&stack, frontend).await.expect("stack");
        let file = egress_file(&stack, &server, frontend);
        let out = run_test_client(&file, target.addr.port()).await;
        assert!(out.status.success(), "{frontend:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "successsuccess", "{frontend:?}");
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn proxy_test_client_refuses_grpc_over_tcp_as_kube_apiserver_does() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::TcpMtls)).await.expect("server");
    let file = egress_file(&stack, &server, Frontend::TcpMtls);
    let out = run_test_client(&file, 9).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("GRPC over tcp") && stderr.contains("egress-selector.yaml"), "{stderr}");
    server.stop().await;
}

#[tokio::test]
async fn a_hyper_client_sends_its_requests_through_the_tunnel_connector() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    for frontend in [Frontend::Uds, Frontend::ConnectTcpMtls] {
        let stack = Stack::new().expect("pki");
        let (server, agent) = server_and_agent(&stack, frontend).await.expect("stack");
        let dialer = EgressSelectorConfiguration::load(&egress_file(&stack, &server, frontend))
            .and_then(|c| c.cluster_dialer("it"))
            .expect("dialer");
        assert!(matches!(
            (&dialer, frontend),
            (EgressDialer::Grpc(_), Frontend::Uds) | (EgressDialer::HttpConnect { .. }, Frontend::ConnectTcpMtls)
        ));
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(TunnelConnector::new(dialer));
        for path in ["success", "success", "bytes/100000"] {
            let uri: http::Uri = format!("http://127.0.0.1:{}/{path}", target.addr.port()).parse().expect("uri");
            let response = client.get(uri).await.unwrap_or_else(|e| panic!("{frontend:?} GET /{path}: {e:?}"));
            assert_eq!(response.status(), 200, "{frontend:?}");
            let body = response.into_body().collect().await.expect("body").to_bytes();
            if path == "success" {
                assert_eq!(body, "success");
            } else {
                assert_eq!(body.len(), 100_000);
            }
        }
        // A refused dial is the client's error, with the agent's reason inside.
        let refused: http::Uri = "http://127.0.0.1:9/".parse().expect("uri");
        let err = client.get(refused).await.expect_err("port 9 is closed");
        assert!(err.is_connect(), "{err:?}");
        let dial = std::error::Error::source(&err).and_then(|e| e.downcast_ref::<DialError>());
        assert_eq!(dial.map(|d| d.reason), Some(DialFailureReason::Endpoint), "{err:?}");
        drop(client); // closes the pooled connections, and with them their tunnels
        assert_settled(&server, Some(&agent)).await;
        agent.stop().await;
        server.stop().await;
    }
}
