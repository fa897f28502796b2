//! What answers at the cluster's addresses: in the cluster network a kubelet-like HTTPS server, a "pod" and an
//! admission webhook; in the control network, decoys on the same addresses that count every hit.

use super::*;
use crate::netns::NetNs;
use crate::targets::{Target, serve_listener};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Decoys in the control network on the cluster's addresses: they accept, count and answer 418.
pub(super) fn start_decoys(control: &NetNs, counters: &Arc<Counters>) -> anyhow::Result<Vec<Target>> {
    let mut servers = Vec::new();
    // Decoys: accept and count, in the control network.
    for addr in [(NODE_IP, KUBELET_PORT), (POD_IP, POD_PORT), (WEBHOOK_IP, WEBHOOK_PORT)] {
        let listener = control.listen(SocketAddr::from(addr))?;
        let c = counters.clone();
        servers.push(serve_listener(listener, move |mut tcp, _| {
            c.decoy_hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = tcp.write_all(b"HTTP/1.1 418 I'm a decoy in the control network\r\n\r\n").await;
            }
        })?);
    }
    Ok(servers)
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

/// Serves HTTP/1.1 on `listener`, over TLS when `tls` is given.
fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: F,
) -> anyhow::Result<Target>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<BoxBody>, std::io::Error>> + Send + 'static,
{
    Ok(serve_listener(listener, move |tcp, _| {
        let handler = handler.clone();
        let tls = tls.clone();
        async move {
            let service = hyper::service::service_fn(handler);
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(cfg) => {
                    if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        }
    })?)
}

struct StreamGuard(Arc<Counters>);
impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.log_streams_open.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) fn start_cluster_endpoints(
    cluster: &NetNs,
    pki: &ClusterPki,
    counters: &Arc<Counters>,
) -> anyhow::Result<Vec<Target>> {
    use konnectivity_transport::tls::{ClientAuth, server_config};
    let mut out = Vec::new();

    // The kubelet: HTTPS, client certificates required (as a kubelet does for kube-apiserver).
    let kubelet_tls =
        server_config(&pki.kubelet.0, &pki.kubelet.1, &ClientAuth::Require(pki.ca.clone()), &[b"http/1.1"])?;
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((NODE_IP, KUBELET_PORT)))?,
        Some(kubelet_tls),
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                c.kubelet_requests.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_string();
                let follow = req.uri().query().is_some_and(|q| q.contains("follow=true"));
                if path.starts_with("/containerLogs/") && follow {
                    // Like `kubectl logs -f`: a line every 100 ms until the reader goes away.
                    c.log_streams_open.fetch_add(1, Ordering::SeqCst);
                    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                    let c2 = c.clone();
                    tokio::spawn(async move {
                        let _guard = StreamGuard(c2.clone());
                        let mut n = 0u64;
                        loop {
                            n += 1;
                            let line = format!("log line {n} from the kubelet at {NODE_IP}\n");
                            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                                return;
                            }
                            c2.log_lines.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    return Ok(Response::new(BodyExt::boxed(body)));
                }
                Ok(text(StatusCode::OK, format!("kubelet {NODE_NAME} at {NODE_IP} served {path}\n")))
            }
        },
    )?);

    // The pod: plain HTTP.
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((POD_IP, POD_PORT)))?,
        None,
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                c.pod_requests.fetch_add(1, Ordering::SeqCst);
                Ok(text(StatusCode::OK, format!("pod at {POD_IP} served {}\n", req.uri().path())))
            }
        },
    )?);

    // The admission webhook: HTTPS, denies ConfigMaps named deny-*.
    let webhook_tls = server_config(&pki.webhook.0, &pki.webhook.1, &ClientAuth::None, &[b"http/1.1"])?;
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((WEBHOOK_IP, WEBHOOK_PORT)))?,
        Some(webhook_tls),
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                let body = req.into_body().collect().await.map_err(std::io::Error::other)?.to_bytes();
                let Ok(review) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return Ok(text(StatusCode::BAD_REQUEST, "not an AdmissionReview"));
                };
                c.webhook_reviews.fetch_add(1, Ordering::SeqCst);
                let request = &review["request"];
                let name = request["name"].as_str().or(request["object"]["metadata"]["name"].as_str()).unwrap_or("");
                let allowed = !name.starts_with("deny");
                let answer = serde_json::json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {
                        "uid": request["uid"], "allowed": allowed,
                        "status": {"code": if allowed { 200 } else { 403 },
                                   "message": format!("the e2e webhook at {WEBHOOK_IP} (reached through the tunnel) denies {name}")}
                    }
                });
                let mut r = text(StatusCode::OK, answer.to_string());
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                Ok(r)
            }
        },
    )?);
    Ok(out)
}
