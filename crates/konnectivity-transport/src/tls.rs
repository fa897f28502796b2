//! TLS material and rustls configurations. Only the ring provider is used, passed explicitly, so no process-wide
//! default has to be installed and no second provider can sneak in.
//!
//! A listener's or dialer's configuration is described by a spec ([`ServerTlsSpec`], [`ClientTlsSpec`]) and
//! built from the contents of its files ([`FileContents`]), so that `tls_reload` can rebuild it whenever the
//! files change on disk.

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};
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
    /// The certificate and key do not form a usable identity (the key does not match the certificate, or is of
    /// an unsupported kind).
    #[error("certificate {cert} and key {key} are not a usable pair: {cause}")]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused them.
        cause: rustls::Error,
    },
    /// Another rustls error.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ring provider with its TLS 1.2 suites narrowed to `suites` (TLS 1.3 suites are never narrowed).
fn provider_with(suites: &CipherSuites) -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(allowed) = &suites.tls12 {
        provider.cipher_suites.retain(|s| s.tls13().is_some() || allowed.iter().any(|a| a.suite() == s.suite()));
    }
    Arc::new(provider)
}

/// What this server does with one of Go's cipher-suite names.
enum GoSuite {
    /// A TLS 1.2 suite rustls implements.
    Tls12(SupportedCipherSuite),
    /// A TLS 1.3 suite: accepted, without effect (Go does not let TLS 1.3 suites be configured either).
    Tls13,
    /// A suite Go knows but rustls does not implement; the text says what it lacks.
    Unsupported(&'static str),
}

/// The TLS 1.2 suites `--cipher-suites` can select: Go's names (`tls.CipherSuites()`) of the suites rustls
/// implements, in the order the docs list them.
pub const SUPPORTED_TLS12_SUITES: [&str; 6] = [
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Go's TLS 1.3 suite names, accepted by `--cipher-suites` without effect.
pub const TLS13_SUITES: [&str; 3] =
    ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"];

fn go_suite(name: &str) -> Option<GoSuite> {
    use rustls::crypto::ring::cipher_suite as ring;
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => GoSuite::Tls12(ring::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => GoSuite::Tls12(ring::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        // Go keeps the names without "_SHA256" as aliases of the same suites (and Kubernetes accepts them).
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            GoSuite::Tls12(ring::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => GoSuite::Tls12(ring::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => GoSuite::Tls12(ring::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            GoSuite::Tls12(ring::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_AES_128_GCM_SHA256" | "TLS_AES_256_GCM_SHA384" | "TLS_CHACHA20_POLY1305_SHA256" => GoSuite::Tls13,
        // Go's tls.CipherSuites() (the reference accepts these).
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA" => GoSuite::Unsupported("CBC mode; rustls implements only AEAD suites"),
        // Go's tls.InsecureCipherSuites() (the reference refuses these as insecure too).
        "TLS_RSA_WITH_RC4_128_SHA" | "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA" | "TLS_ECDHE_RSA_WITH_RC4_128_SHA" => {
            GoSuite::Unsupported("RC4 is broken; Go lists it as insecure")
        }
        "TLS_RSA_WITH_3DES_EDE_CBC_SHA" | "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA" => {
            GoSuite::Unsupported("3DES is weak; Go lists it as insecure")
        }
        "TLS_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA256"
        | "TLS_RSA_WITH_AES_128_GCM_SHA256"
        | "TLS_RSA_WITH_AES_256_GCM_SHA384" => {
            GoSuite::Unsupported("RSA key exchange has no forward secrecy; Go lists it as insecure")
        }
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256" | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256" => {
            GoSuite::Unsupported("CBC mode with SHA-256; Go lists it as insecure")
        }
        _ => return None,
    })
}

/// Why a `--cipher-suites` list was refused.
#[derive(Debug, thiserror::Error)]
pub enum CipherSuiteError {
    /// A suite Go knows that this server cannot offer.
    #[error(
        "cipher suite {name} is not supported ({why}); supported TLS 1.2 suites: {}; TLS 1.3 suites are always enabled",
        SUPPORTED_TLS12_SUITES.join(", ")
    )]
    Unsupported {
        /// The name given.
        name: String,
        /// What rustls lacks.
        why: &'static str,
    },
    /// Not a name from Go's crypto/tls.
    #[error(
        "unknown cipher suite {name:?} (names are Go's, from tls.CipherSuites()); supported TLS 1.2 suites: {}; TLS 1.3 suites are always enabled",
        SUPPORTED_TLS12_SUITES.join(", ")
    )]
    Unknown {
        /// The name given.
        name: String,
    },
}

/// The TLS 1.2 cipher suites a server offers (`--cipher-suites`). TLS 1.3 suites are not restricted, as in Go.
#[derive(Debug, Clone, Default)]
pub struct CipherSuites {
    /// `None`: rustls's defaults (every AEAD ECDHE suite). `Some`: only these.
    tls12: Option<Vec<SupportedCipherSuite>>,
}

impl CipherSuites {
    /// Parses Go cipher-suite names (`tls.CipherSuites()`, plus Go's `_SHA256`-less ChaCha20 aliases). An empty
    /// list keeps the defaults; TLS 1.3 names are accepted and change nothing (Go ignores them too); names Go
    /// knows that rustls does not implement (CBC, 3DES, RC4, RSA key exchange) and unknown names are refused.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, CipherSuiteError> {
        let mut tls12 = Vec::new();
        let mut any = false;
        for name in names.iter().map(|n| n.as_ref().trim()).filter(|n| !n.is_empty()) {
            any = true;
            match go_suite(name) {
                Some(GoSuite::Tls12(suite)) => {
                    if !tls12.iter().any(|s: &SupportedCipherSuite| s.suite() == suite.suite()) {
                        tls12.push(suite);
                    }
                }
                Some(GoSuite::Tls13) => {}
                Some(GoSuite::Unsupported(why)) => {
                    return Err(CipherSuiteError::Unsupported { name: name.to_string(), why });
                }
                None => return Err(CipherSuiteError::Unknown { name: name.to_string() }),
            }
        }
        Ok(Self { tls12: any.then_some(tls12) })
    }

    /// Whether the list names no TLS 1.2 suite at all (only TLS 1.3 ones): TLS 1.2 clients then cannot connect,
    /// as with Go.
    pub fn excludes_tls12(&self) -> bool {
        self.tls12.as_ref().is_some_and(Vec::is_empty)
    }
}

/// Parses every certificate in PEM text read from `path`.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|cause| TlsError::Read {
        kind: "certificate",
        path: path.into(),
        cause,
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in PEM text read from `path`.
pub fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|cause| TlsError::Read { kind: "private key", path: path.into(), cause })
}

/// Parses a CA bundle read from `path` into a trust store.
pub fn parse_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(path, pem)? {
        roots.add(cert).map_err(|cause| TlsError::BadCa { path: path.into(), cause })?;
    }
    Ok(roots)
}

fn read(kind: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        kind,
        path: path.into(),
        cause: rustls_pki_types::pem::Error::Io(e),
    })
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read("certificate", path)?)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read("private key", path)?)
}

/// Reads a CA bundle into a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    parse_roots(path, &read("CA bundle", path)?)
}

/// The contents of the files a TLS configuration is built from, read together, so that a configuration is
/// built from one consistent snapshot of them.
#[derive(Debug)]
pub struct FileContents {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl FileContents {
    /// Reads `files` (what each should hold, and its path); a path listed twice is read once.
    pub fn read(files: &[(&'static str, PathBuf)]) -> Result<Self, TlsError> {
        let mut out: Vec<(PathBuf, Vec<u8>)> = Vec::with_capacity(files.len());
        for (kind, path) in files {
            if !out.iter().any(|(p, _)| p == path) {
                out.push((path.clone(), read(kind, path)?));
            }
        }
        Ok(Self { files: out })
    }

    /// Like [`FileContents::read`], without blocking the async threads.
    pub async fn read_async(files: &[(&'static str, PathBuf)]) -> Result<Self, TlsError> {
        let mut out: Vec<(PathBuf, Vec<u8>)> = Vec::with_capacity(files.len());
        for (kind, path) in files {
            if !out.iter().any(|(p, _)| p == path) {
                let contents = tokio::fs::read(path).await.map_err(|e| TlsError::Read {
                    kind,
                    path: path.clone(),
                    cause: rustls_pki_types::pem::Error::Io(e),
                })?;
                out.push((path.clone(), contents));
            }
        }
        Ok(Self { files: out })
    }

    /// The contents of `path`, which must have been read. (Empty for a path that was not: the parser then
    /// reports it as holding nothing usable.)
    pub fn get(&self, path: &Path) -> &[u8] {
        self.files.iter().find(|(p, _)| p == path).map(|(_, c)| c.as_slice()).unwrap_or_default()
    }

    /// A digest of every path and its contents: equal when nothing changed. Only the digest is kept between
    /// reloads, not the contents (which include a private key).
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // DefaultHasher::new() uses fixed keys: the same contents always give the same digest.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.files.hash(&mut h);
        h.finish()
    }
}

/// How a TLS server treats client certificates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A client certificate signed by this CA is required (mTLS).
    Require(PathBuf),
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

/// Everything a TLS server listener is built from: its files and its policy.
#[derive(Debug, Clone)]
pub struct ServerTlsSpec {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Whether clients must present a certificate, and the CA bundle it must chain to.
    pub client_auth: ClientAuth,
    /// ALPN protocols, in preference order.
    pub alpn: Vec<Vec<u8>>,
    /// The lowest TLS version.
    pub min_version: MinVersion,
    /// The TLS 1.2 suites offered.
    pub cipher_suites: CipherSuites,
}

impl ServerTlsSpec {
    /// A spec with the defaults: TLS 1.2 and 1.3, every AEAD suite.
    pub fn new(cert: &Path, key: &Path, client_auth: ClientAuth, alpn: &[&[u8]]) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_auth,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            min_version: MinVersion::Tls12,
            cipher_suites: CipherSuites::default(),
        }
    }

    /// The files it reads, with what each holds.
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = vec![("certificate", self.cert.clone()), ("private key", self.key.clone())];
        if let ClientAuth::Require(ca) = &self.client_auth {
            files.push(("CA bundle", ca.clone()));
        }
        files
    }

    /// Builds the configuration from the files' contents.
    pub fn build(&self, files: &FileContents) -> Result<ServerConfig, TlsError> {
        let provider = provider_with(&self.cipher_suites);
        let builder = ServerConfig::builder_with_provider(provider.clone());
        let builder = match self.min_version {
            MinVersion::Tls12 => builder.with_safe_default_protocol_versions()?,
            MinVersion::Tls13 => builder.with_protocol_versions(&[&rustls::version::TLS13])?,
        };
        let builder = match &self.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Require(ca) => {
                let roots = parse_roots(ca, files.get(ca))?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let certs = parse_certs(&self.cert, files.get(&self.cert))?;
        let key = parse_key(&self.key, files.get(&self.key))?;
        let mut config = builder.with_single_cert(certs, key).map_err(|cause| TlsError::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            cause,
        })?;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    /// Reads the files and builds the configuration.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        Ok(Arc::new(self.build(&FileContents::read(&self.files())?)?))
    }
}

/// Everything a TLS client (the agent's dialer) is built from.
#[derive(Debug, Clone)]
pub struct ClientTlsSpec {
    /// The CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// A client certificate and key to present, if any.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

impl ClientTlsSpec {
    /// The files it reads, with what each holds.
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = vec![("CA bundle", self.ca.clone())];
        if let Some((cert, key)) = &self.identity {
            files.push(("certificate", cert.clone()));
            files.push(("private key", key.clone()));
        }
        files
    }

    /// Builds the configuration from the files' contents.
    pub fn build(&self, files: &FileContents) -> Result<ClientConfig, TlsError> {
        let roots = parse_roots(&self.ca, files.get(&self.ca))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let certs = parse_certs(cert, files.get(cert))?;
                let private = parse_key(key, files.get(key))?;
                builder.with_client_auth_cert(certs, private).map_err(|cause| TlsError::Identity {
                    cert: cert.clone(),
                    key: key.clone(),
                    cause,
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    /// Reads the files and builds the configuration.
    pub fn load(&self) -> Result<Arc<ClientConfig>, TlsError> {
        Ok(Arc::new(self.build(&FileContents::read(&self.files())?)?))
    }
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

/// Like [`server_config`], with a minimum TLS version.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    client_auth: &ClientAuth,
    alpn: &[&[u8]],
    min_version: MinVersion,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut spec = ServerTlsSpec::new(cert, key, client_auth.clone(), alpn);
    spec.min_version = min_version;
    spec.load()
}

/// Builds a client config trusting the CA in `ca`, presenting `identity` (cert, key) if given, offering `alpn`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsError> {
    ClientTlsSpec { ca: ca.into(), identity: identity.map(|(c, k)| (c.into(), k.into())), alpn: alpn.to_vec() }.load()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_go_name_is_mapped_or_explained() {
        // Go 1.26's tls.CipherSuites() and tls.InsecureCipherSuites(), verbatim.
        let secure = [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
            "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
            "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        ];
        let insecure = [
            "TLS_RSA_WITH_RC4_128_SHA",
            "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
            "TLS_RSA_WITH_AES_128_CBC_SHA",
            "TLS_RSA_WITH_AES_256_CBC_SHA",
            "TLS_RSA_WITH_AES_128_CBC_SHA256",
            "TLS_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
            "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
            "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
            "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
        ];
        for name in secure.iter().chain(&insecure) {
            assert!(go_suite(name).is_some(), "{name} is not in the table");
        }
        for name in SUPPORTED_TLS12_SUITES {
            let Some(GoSuite::Tls12(suite)) = go_suite(name) else { panic!("{name} is not a TLS 1.2 suite") };
            // rustls names its suites as the IANA registry does, which is Go's spelling.
            assert_eq!(format!("{:?}", suite.suite()), name);
        }
        let mapped = secure.iter().filter(|n| matches!(go_suite(n), Some(GoSuite::Tls12(_)))).count();
        assert_eq!(mapped, SUPPORTED_TLS12_SUITES.len());
        for name in TLS13_SUITES {
            assert!(matches!(go_suite(name), Some(GoSuite::Tls13)));
        }
    }

    #[test]
    fn parsing() {
        assert!(CipherSuites::parse::<&str>(&[]).expect("empty").tls12.is_none());
        assert!(CipherSuites::parse(&[""]).expect("blank").tls12.is_none());
        let s = CipherSuites::parse(&[
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ])
        .expect("alias");
        assert_eq!(s.tls12.as_ref().map(Vec::len), Some(1));
        assert!(!s.excludes_tls12());
        assert!(CipherSuites::parse(&["TLS_AES_256_GCM_SHA384"]).expect("1.3 only").excludes_tls12());
        let err = CipherSuites::parse(&["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"]).expect_err("cbc").to_string();
        assert!(err.contains("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA is not supported (CBC mode"), "{err}");
        assert!(err.contains("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "), "{err}");
        let err = CipherSuites::parse(&["TLS_RSA_WITH_AES_128_GCM_SHA256"]).expect_err("rsa kx").to_string();
        assert!(err.contains("RSA key exchange"), "{err}");
        let err = CipherSuites::parse(&["TLS_FOO"]).expect_err("unknown").to_string();
        assert!(err.contains("unknown cipher suite \"TLS_FOO\""), "{err}");
    }

    #[test]
    fn provider_narrows_only_tls12() {
        let s = CipherSuites::parse(&["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]).expect("parse");
        let p = provider_with(&s);
        let tls12: Vec<_> = p.cipher_suites.iter().filter(|s| s.tls13().is_none()).map(|s| s.suite()).collect();
        assert_eq!(tls12, [rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]);
        assert_eq!(p.cipher_suites.iter().filter(|s| s.tls13().is_some()).count(), 3);
        assert_eq!(provider_with(&CipherSuites::default()).cipher_suites.len(), 9);
    }
}
