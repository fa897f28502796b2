//! The files kube-apiserver and the agents read: kubeconfigs and the egress selector configuration.

use super::{ClusterPki, EgressMode, FRONTEND_PORT};
use std::path::{Path, PathBuf};

pub(super) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    identity: &(PathBuf, PathBuf),
) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\ncurrent-context: e2e\n",
        ca.display(),
        identity.0.display(),
        identity.1.display()
    );
    std::fs::write(path, text)?;
    Ok(())
}

pub(super) fn egress_config(mode: EgressMode, uds: &Path, pki: &ClusterPki) -> String {
    let (protocol, transport) = match mode {
        EgressMode::GrpcUds => ("GRPC", format!("      uds:\n        udsName: {}\n", uds.display())),
        EgressMode::ConnectUds => ("HTTPConnect", format!("      uds:\n        udsName: {}\n", uds.display())),
        EgressMode::ConnectMtls => (
            "HTTPConnect",
            format!(
                "      tcp:\n        url: https://127.0.0.1:{FRONTEND_PORT}\n        tlsConfig:\n          caBundle: {}\n          clientKey: {}\n          clientCert: {}\n",
                pki.ca.display(),
                pki.kas_egress_client.1.display(),
                pki.kas_egress_client.0.display()
            ),
        ),
    };
    format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: {protocol}\n    transport:\n{transport}"
    )
}
