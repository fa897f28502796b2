//! A raw TLS client, to see exactly what a listener accepts and presents.

use super::*;

/// The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server that accepted the handshake answers it
/// with its own SETTINGS, one that refused it with an alert or a close.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A raw TLS client, to see exactly what a listener accepts and presents.
#[derive(Clone)]
pub(crate) struct Probe {
    trust: Vec<String>,
    identity: Option<(String, String)>,
    alpn: Vec<Vec<u8>>,
    tls12_suites: Option<Vec<SupportedCipherSuite>>,
}

/// What an accepted probe saw.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The server's leaf certificate (DER).
    pub(crate) peer: Vec<u8>,
    /// The negotiated suite.
    pub(crate) suite: rustls::CipherSuite,
    /// The negotiated ALPN protocol.
    pub(crate) alpn: Option<Vec<u8>>,
}

impl Probe {
    /// Trusts `ca_pem` (one or more certificates), presents no certificate, offers ALPN h2, TLS 1.2 and 1.3.
    pub(crate) fn trusting(ca_pem: &str) -> Self {
        Self { trust: vec![ca_pem.to_string()], identity: None, alpn: vec![b"h2".to_vec()], tls12_suites: None }
    }
    /// Presents this certificate and key (PEM).
    pub(crate) fn presenting(mut self, identity: &(String, String)) -> Self {
        self.identity = Some(identity.clone());
        self
    }
    /// Offers these ALPN protocols (none if empty).
    pub(crate) fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }
    /// Speaks TLS 1.2 only, offering these suites.
    pub(crate) fn tls12_with(mut self, suites: &[SupportedCipherSuite]) -> Self {
        self.tls12_suites = Some(suites.to_vec());
        self
    }

    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        let mut provider = rustls::crypto::ring::default_provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match &self.tls12_suites {
            Some(suites) => {
                provider.cipher_suites = suites.clone();
                &[&rustls::version::TLS12]
            }
            None => &[&rustls::version::TLS12, &rustls::version::TLS13],
        };
        let mut roots = RootCertStore::empty();
        for pem in &self.trust {
            for cert in tls::parse_certs(Path::new("trust"), pem.as_bytes()).expect("trust") {
                roots.add(cert).expect("root");
            }
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    tls::parse_certs(Path::new("cert"), cert.as_bytes()).expect("cert"),
                    tls::parse_key(Path::new("key"), key.as_bytes()).expect("key"),
                )
                .expect("client identity"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Arc::new(config)
    }

    /// Connects, handshakes and sends the HTTP/2 preface: accepted if the server answers it.
    pub(crate) async fn run(&self, addr: SocketAddr) -> Result<Accepted, String> {
        probe_with(addr, self.config()).await
    }
}

/// [`Probe::run`] with a prepared configuration.
pub(crate) async fn probe_with(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Accepted, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let mut tls = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("handshake: {e}")),
        Err(_) => return Err("handshake timed out".into()),
    };
    let (_, conn) = tls.get_ref();
    let accepted = Accepted {
        peer: conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default(),
        suite: conn.negotiated_cipher_suite().map(|s| s.suite()).ok_or("no suite")?,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    };
    // A TLS 1.3 server verifies the client's certificate after the client considers the handshake done: only
    // the answer to the first bytes tells.
    tls.write_all(H2_PREFACE).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(accepted),
        Ok(Ok(_)) => Err("closed after the handshake".into()),
        Ok(Err(e)) => Err(format!("after the handshake: {e}")),
        Err(_) => Err("no answer to the HTTP/2 preface".into()),
    }
}
