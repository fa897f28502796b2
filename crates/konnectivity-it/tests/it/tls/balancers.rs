//! Balancers in front of the agent port: one that routes on the ClientHello's ALPN list without terminating
//! TLS, and one that terminates TLS and re-encrypts.

use super::*;

/// An ALPN-routing TCP balancer in passthrough mode (HAProxy `req.ssl_alpn`, nginx `ssl_preread`): it reads the
/// ClientHello without terminating TLS, records the ALPN list offered, and forwards the connection (the hello
/// included) to `backend` if `proto` is in it; otherwise it closes the connection.
pub(crate) struct AlpnRouter {
    pub(crate) addr: SocketAddr,
    offered: Arc<Mutex<Vec<Vec<String>>>>,
    stop: CancellationToken,
}

impl AlpnRouter {
    pub(crate) async fn start(proto: &str, backend: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let offered = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (seen, token, proto) = (offered.clone(), stop.clone(), proto.to_string());
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok((c, _)) => c, Err(_) => continue },
                };
                let (seen, token, proto) = (seen.clone(), token.clone(), proto.clone());
                tokio::spawn(async move {
                    let Some((hello, alpn)) = read_client_hello(&mut client).await else { return };
                    let wants = alpn.contains(&proto);
                    seen.lock().expect("lock").push(alpn);
                    if !wants {
                        return;
                    }
                    let Ok(mut upstream) = TcpStream::connect(backend).await else { return };
                    if upstream.write_all(&hello).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        Self { addr, offered, stop }
    }

    /// The ALPN lists offered so far, one per connection.
    pub(crate) fn offered(&self) -> Vec<Vec<String>> {
        self.offered.lock().expect("lock").clone()
    }
}

impl Drop for AlpnRouter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads a ClientHello: the raw bytes read so far and the ALPN protocols it offers.
async fn read_client_hello(client: &mut TcpStream) -> Option<(Vec<u8>, Vec<String>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&chunk[..n]);
        let mut data = &chunk[..n];
        while !data.is_empty() {
            acceptor.read_tls(&mut data).ok()?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let alpn = accepted
                    .client_hello()
                    .alpn()
                    .map(|list| list.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
                    .unwrap_or_default();
                return Some((raw, alpn));
            }
            Ok(None) => {}
            Err(_) => return None,
        }
    }
}

/// A balancer that terminates TLS, negotiating only `proto` with clients, and re-encrypts to `backend` (with
/// ALPN h2 and the given client configuration), copying the bytes in between.
pub(super) struct TerminatingBalancer {
    pub(super) addr: SocketAddr,
    pub(super) negotiated: Arc<Mutex<Vec<Option<String>>>>,
    stop: CancellationToken,
}

impl TerminatingBalancer {
    pub(super) async fn start(
        proto: &str,
        cert: &Path,
        key: &Path,
        backend: SocketAddr,
        backend_tls: Arc<ClientConfig>,
    ) -> Self {
        let server = tls::server_config(cert, key, &tls::ClientAuth::None, &[proto.as_bytes()]).expect("tls");
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (seen, token) = (negotiated.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok((c, _)) => c, Err(_) => continue },
                };
                let (acceptor, backend_tls, seen, token) =
                    (acceptor.clone(), backend_tls.clone(), seen.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else { return };
                    let alpn = client.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    seen.lock().expect("lock").push(alpn);
                    let Ok(tcp) = TcpStream::connect(backend).await else { return };
                    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
                    let Ok(mut upstream) = tokio_rustls::TlsConnector::from(backend_tls).connect(name, tcp).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        Self { addr, negotiated, stop }
    }
}

impl Drop for TerminatingBalancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
