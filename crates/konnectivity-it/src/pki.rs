//! A throwaway PKI written to a directory: one CA, and server, agent and client certificates signed by it,
//! plus a second, unrelated CA with its own client certificate (for "wrong CA" tests).

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// Paths of the generated files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate everything below chains to.
    pub ca: PathBuf,
    /// Server certificate (SANs: localhost, 127.0.0.1, ::1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Agent client certificate.
    pub agent_cert: PathBuf,
    /// Agent key.
    pub agent_key: PathBuf,
    /// Frontend client certificate.
    pub client_cert: PathBuf,
    /// Frontend client key.
    pub client_key: PathBuf,
    /// A client certificate from an unrelated CA.
    pub rogue_cert: PathBuf,
    /// Its key.
    pub rogue_key: PathBuf,
}

fn leaf(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'_, KeyPair>,
) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

impl Pki {
    /// Generates the PKI into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let write = |name: &str, pem: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem)?;
            Ok(p)
        };
        let root = ca("konnectivity-rs test CA")?;
        let rogue_root = ca("unrelated CA")?;
        let (server_cert, server_key) = leaf("proxy-server", ExtendedKeyUsagePurpose::ServerAuth, &root)?;
        let (agent_cert, agent_key) = leaf("proxy-agent", ExtendedKeyUsagePurpose::ClientAuth, &root)?;
        let (client_cert, client_key) = leaf("kube-apiserver", ExtendedKeyUsagePurpose::ClientAuth, &root)?;
        let (rogue_cert, rogue_key) = leaf("rogue", ExtendedKeyUsagePurpose::ClientAuth, &rogue_root)?;
        Ok(Self {
            ca: write("ca.crt", &root.pem())?,
            server_cert: write("server.crt", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            agent_cert: write("agent.crt", &agent_cert)?,
            agent_key: write("agent.key", &agent_key)?,
            client_cert: write("client.crt", &client_cert)?,
            client_key: write("client.key", &client_key)?,
            rogue_cert: write("rogue.crt", &rogue_cert)?,
            rogue_key: write("rogue.key", &rogue_key)?,
        })
    }
}
