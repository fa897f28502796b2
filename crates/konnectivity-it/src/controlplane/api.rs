//! kube-apiserver as the administrator sees it: requests over TLS from the control network, kubectl, tokens, and
//! the cluster objects (Node, Pods, Services, EndpointSlices, the webhook configuration) the fixture creates.

use super::*;
use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

impl ControlPlane {
    /// One request to kube-apiserver as the administrator; returns status and body.
    pub async fn kas_request(
        &self,
        method: &str,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let resp = self.kas_send(method, path, json).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// One request to kube-apiserver as the administrator, returning the response as it streams.
    pub async fn kas_send(
        &self,
        method: &str,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut sender = self.kas_connection().await?;
        let body = json.map(|j| Bytes::from(j.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{KAS_PORT}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, */*")
            .body(Full::new(body))?;
        Ok(sender.send_request(req).await?)
    }

    /// Creates an object (POST to `collection`), failing with the response unless it is 201 (or 409, exists).
    pub async fn create(&self, collection: &str, obj: serde_json::Value) -> anyhow::Result<()> {
        let (status, body) = self.kas_request("POST", collection, Some(&obj)).await?;
        if status != 201 && status != 409 {
            bail!("POST {collection}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Runs kubectl in the control network with the admin kubeconfig; returns (success, stdout+stderr).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display())).args(args).stdin(Stdio::null());
        let out = self.control.run(|| cmd.output())??;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// A ServiceAccount token from the TokenRequest API.
    pub async fn create_token(&self, ns: &str, sa: &str, audience: &str, seconds: u64) -> anyhow::Result<String> {
        self.create(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            serde_json::json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}
            }),
        )
        .await?;
        let req = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds}
        });
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
        let (status, body) = self.kas_request("POST", &path, Some(&req)).await?;
        if status != 201 {
            bail!("POST {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        v["status"]["token"].as_str().map(str::to_string).context("TokenRequest without a token")
    }

    pub(super) async fn create_cluster_objects(&self) -> anyhow::Result<()> {
        use serde_json::json;
        self.create(
            "/api/v1/nodes",
            json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}
            }),
        )
        .await?;
        // Node status is the kubelet's to write; set the address and kubelet port as it would.
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}, {"type": "Hostname", "address": NODE_NAME}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}}
        }});
        let resp = self.kas_patch(&format!("/api/v1/nodes/{NODE_NAME}/status"), &status).await?;
        if resp.0 != 200 {
            bail!("patching node status: {}: {}", resp.0, String::from_utf8_lossy(&resp.1));
        }
        // kube-apiserver's service proxy only uses endpoint addresses that point at a Pod with that IP, so the
        // "pods" exist as objects too (bound to the node, status written as the kubelet would).
        self.create(
            "/api/v1/namespaces/default/serviceaccounts",
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}
            }),
        )
        .await?;
        for (name, ip, port, target) in
            [("pod-svc", POD_IP, 80, POD_PORT), ("webhook", WEBHOOK_IP, WEBHOOK_PORT, WEBHOOK_PORT)]
        {
            let pod = format!("{name}-pod");
            self.create(
                "/api/v1/namespaces/default/pods",
                json!({
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": {"app": name}},
                    "spec": {"nodeName": NODE_NAME, "automountServiceAccountToken": false,
                             "containers": [{"name": "main", "image": "konnectivity-rs.invalid/e2e:none"}]}
                }),
            )
            .await?;
            let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}]}});
            let (code, body) =
                self.kas_patch(&format!("/api/v1/namespaces/default/pods/{pod}/status"), &status).await?;
            if code != 200 {
                bail!("patching pod {pod} status: {code}: {}", String::from_utf8_lossy(&body));
            }
            let target_ref = json!({"kind": "Pod", "namespace": "default", "name": pod});
            self.create(
                "/api/v1/namespaces/default/services",
                json!({
                    "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                    "spec": {"ports": [{"name": "main", "port": port, "targetPort": target, "protocol": "TCP"}]}
                }),
            )
            .await?;
            self.create("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME, "targetRef": target_ref}],
                "ports": [{"name": "main", "port": target, "protocol": "TCP"}]
            }))
            .await?;
            // Endpoints too: some kube-apiserver paths still read them.
            self.create("/api/v1/namespaces/default/endpoints", json!({
                "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name},
                "subsets": [{"addresses": [{"ip": ip.to_string(), "nodeName": NODE_NAME, "targetRef": target_ref}], "ports": [{"name": "main", "port": target, "protocol": "TCP"}]}]
            }))
            .await?;
        }
        Ok(())
    }

    /// JSON merge patch.
    pub async fn kas_patch(&self, path: &str, patch: &serde_json::Value) -> anyhow::Result<(u16, Bytes)> {
        let mut sender = self.kas_connection().await?;
        let req = Request::builder()
            .method("PATCH")
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{KAS_PORT}"))
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(Full::new(Bytes::from(patch.to_string())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// A fresh HTTP/1.1 connection to kube-apiserver, over TLS as the administrator, from the control network.
    async fn kas_connection(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp =
            self.control.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, KAS_PORT)), Duration::from_secs(5)).await?;
        let tls = tokio_rustls::TlsConnector::from(self.kas_client.clone())
            .connect(ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into()), tcp)
            .await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Registers the e2e webhook (service reference, through the tunnel) for ConfigMaps labelled
    /// `konnectivity-e2e=webhook`: it denies those named `deny-*`.
    pub async fn register_webhook(&self) -> anyhow::Result<()> {
        let ca = std::fs::read(&self.pki.ca)?;
        self.create("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "konnectivity-e2e"},
            "webhooks": [{
                "name": "e2e.konnectivity-rs.test",
                "clientConfig": {
                    "service": {"namespace": "default", "name": "webhook", "port": WEBHOOK_PORT, "path": "/validate"},
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca)
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
                "objectSelector": {"matchLabels": {"konnectivity-e2e": "webhook"}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10
            }]
        }))
        .await
    }
}
