//! The control plane's certificates: the kind of set a cluster has (kube-apiserver, its clients, kubelet, a
//! webhook, proxy-server and proxy-agent), signed by one CA made with the test kit's PKI, and the
//! ServiceAccount signing key.

use super::{CONTROL_LINK, NODE_IP, NODE_NAME};
use konnectivity_testkit::pki::{Ca, Leaf};
use std::path::{Path, PathBuf};

/// Every certificate and key the fixture uses, all from one CA, written to the fixture's directory. Each pair is
/// (certificate path, key path).
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The CA (trusted by everything).
    pub ca: PathBuf,
    /// kube-apiserver serving certificate and key.
    pub kas: (PathBuf, PathBuf),
    /// An administrator client certificate (O=system:masters).
    pub admin: (PathBuf, PathBuf),
    /// kube-apiserver's client certificate towards kubelets.
    pub kas_kubelet_client: (PathBuf, PathBuf),
    /// kube-apiserver's client certificate towards proxy-server (HTTPConnect over mTLS).
    pub kas_egress_client: (PathBuf, PathBuf),
    /// The kubelet-like server's certificate (IP SAN = the node IP).
    pub kubelet: (PathBuf, PathBuf),
    /// The webhook's certificate (DNS SAN webhook.default.svc).
    pub webhook: (PathBuf, PathBuf),
    /// proxy-server's certificate (agent port and TCP frontend).
    pub server: (PathBuf, PathBuf),
    /// proxy-agent's client certificate.
    pub agent: (PathBuf, PathBuf),
    /// The ServiceAccount token signing key (ECDSA P-256, PKCS#8).
    pub sa_key: PathBuf,
    /// Its public key.
    pub sa_pub: PathBuf,
}

impl ClusterPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let root = Ca::new("konnectivity-rs e2e CA")?;
        let link = CONTROL_LINK.to_string();
        let node = NODE_IP.to_string();
        let kas_sans = [
            "127.0.0.1",
            &link,
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "10.96.0.1",
        ];
        let sa = rcgen::KeyPair::generate()?;
        let (sa_key, sa_pub) = (dir.join("sa.key"), dir.join("sa.pub"));
        std::fs::write(&sa_key, sa.serialize_pem())?;
        std::fs::write(&sa_pub, sa.public_key_pem())?;
        Ok(Self {
            kas: root.write_leaf(dir, "kube-apiserver", &Leaf::server("kube-apiserver").sans(&kas_sans))?,
            admin: root.write_leaf(
                dir,
                "admin",
                &Leaf::client("e2e-admin").organization("system:masters").sans(&[]),
            )?,
            kas_kubelet_client: root.write_leaf(
                dir,
                "kas-kubelet-client",
                &Leaf::client("kube-apiserver-kubelet-client").organization("system:masters").sans(&[]),
            )?,
            kas_egress_client: root.write_leaf(dir, "kas-egress-client", &Leaf::client("kube-apiserver").sans(&[]))?,
            kubelet: root.write_leaf(dir, "kubelet", &Leaf::server(NODE_NAME).sans(&[&node]))?,
            webhook: root.write_leaf(dir, "webhook", &Leaf::server("webhook").sans(&["webhook.default.svc"]))?,
            server: root.write_leaf(
                dir,
                "proxy-server",
                &Leaf::server("proxy-server").sans(&["127.0.0.1", &link, "localhost"]),
            )?,
            agent: root.write_leaf(dir, "proxy-agent", &Leaf::client("proxy-agent").sans(&[]))?,
            sa_key,
            sa_pub,
            ca: root.write(dir, "ca")?,
        })
    }
}
