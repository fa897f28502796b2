//! TLS hardening, over real sockets and real TLS: refused client certificates (counted), a thousand failed
//! handshakes that leak nothing, certificate, key and CA rotation on disk (server and agent) that leaves
//! established streams alone, `--cipher-suites`, and ALPN (`--alpn-proto` through ALPN-routing balancers, and the
//! refusal of clients that do not offer h2). Checks against the Go reference are in `interop.rs`.

use konnectivity_agent::ServerAddress;
use konnectivity_client::{ProxyAddress, Tunnel};
use konnectivity_it::stack::{Frontend, Stack, assert_settled};
use konnectivity_it::targets::echo_target;
use konnectivity_server::{FrontendAddr, FrontendListen, ServerConfig};
use konnectivity_testkit::pki::{Ca, Leaf, SecretDir};
use konnectivity_transport::tls::{self, CipherSuites};
use rustls::crypto::ring::cipher_suite as suite;
use rustls::{ClientConfig, RootCertStore, SupportedCipherSuite};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

mod balancers;
mod probe;
mod refusals;
mod rotation;
mod suites_and_alpn;

pub(crate) use balancers::AlpnRouter;
use balancers::TerminatingBalancer;
pub(crate) use probe::{Probe, probe_with};

/// How often the tests' servers and agents check their TLS files.
const RELOAD: Duration = Duration::from_millis(100);

fn der(pem: &str) -> Vec<u8> {
    tls::parse_certs(Path::new("test"), pem.as_bytes()).expect("PEM certificate")[0].to_vec()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

/// One round trip through an echo connection.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut S, message: &[u8]) {
    conn.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, message);
}

/// A CA of the test's own (so that it can sign expired, wrong-usage and rotated certificates), with a server
/// certificate and an agent certificate written under `dir`.
struct OwnPki {
    ca: Ca,
    ca_file: PathBuf,
    server: (PathBuf, PathBuf),
    agent: (String, String),
    agent_files: (PathBuf, PathBuf),
}

impl OwnPki {
    fn new(dir: &Path) -> Self {
        let ca = Ca::new("konnectivity-rs TLS test CA").expect("ca");
        let (server_cert, server_key) = ca.leaf(&Leaf::server("proxy-server")).expect("server cert");
        let agent = ca.leaf(&Leaf::client("proxy-agent")).expect("agent cert");
        Self {
            ca_file: write(dir, "own-ca.crt", &ca.pem()),
            server: (write(dir, "own-server.crt", &server_cert), write(dir, "own-server.key", &server_key)),
            agent_files: (write(dir, "own-agent.crt", &agent.0), write(dir, "own-agent.key", &agent.1)),
            agent,
            ca,
        }
    }

    /// `stack`'s server configuration for `frontend`, with this PKI on both listeners.
    fn server_config(&self, stack: &Stack, frontend: Frontend) -> ServerConfig {
        let mut config = stack.server_config(frontend);
        config.cluster_cert = self.server.0.clone();
        config.cluster_key = self.server.1.clone();
        config.cluster_ca = Some(self.ca_file.clone());
        if let FrontendListen::Tcp { cert, key, ca, .. } = &mut config.frontend {
            (*cert, *key, *ca) = (self.server.0.clone(), self.server.1.clone(), self.ca_file.clone());
        }
        config
    }
}

fn frontend_tcp(addr: &FrontendAddr) -> SocketAddr {
    match addr {
        FrontendAddr::Tcp(a) => *a,
        FrontendAddr::Uds(p) => panic!("expected a TCP frontend, got {}", p.display()),
    }
}
