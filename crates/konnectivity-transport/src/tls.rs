//! TLS material and rustls configurations. Only the ring provider is used, passed explicitly, so no process-wide
//! default has to be installed and no second provider can sneak in.

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol HTTP/2 (gRPC) peers negotiate; grpc-go refuses a TLS connection without it.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("reading {kind} {path}: {cause}")]
    Read {
        /// What the file should hold ("certificate", "private key", "CA bundle").
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error (printed in the message).
        cause: rustls_pki_types::pem::Error,
    },
    /// The file parsed but held no certificate.
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    /// A CA certificate was rejected by the trust store.
    #[error("CA certificate in {path} is not usable: {cause}")]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// Why rustls rejected it.
        cause: rustls::Error,
    },
    /// The certificate and key do not form a usable identity, or another rustls error.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|cause| TlsError::Read { kind: "certificate", path: path.into(), cause })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|cause| TlsError::Read { kind: "certificate", path: path.into(), cause })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|cause| TlsError::Read { kind: "private key", path: path.into(), cause })
}

/// Reads a CA bundle into a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|cause| TlsError::BadCa { path: path.into(), cause })?;
    }
    Ok(roots)
}

/// How a TLS server treats client certificates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A client certificate signed by this CA is required (mTLS).
    Require(PathBuf),
}

/// Builds a server config from a certificate chain and key file, with the given client-auth rule and ALPN list.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_auth: &ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert, key, client_auth, alpn, MinVersion::Tls12)
}

/// The lowest TLS version a server accepts (`--tls-min-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3 (the reference's default).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Like [`server_config`], with a minimum TLS version.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    client_auth: &ClientAuth,
    alpn: &[&[u8]],
    min_version: MinVersion,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = match min_version {
        MinVersion::Tls12 => ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?,
        MinVersion::Tls13 => {
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?
        }
    };
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Require(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds a client config trusting the CA in `ca`, presenting `identity` (cert, key) if given, offering `alpn`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}
