//! Tunnels and dialing.

use crate::address::ProxyAddress;
use crate::conn::{self, TunnelConn};
use crate::error::{DialError, DialFailureReason};
use crate::transport::{Killable, Transport};
use hyper_util::rt::TokioIo;
use konnectivity_proto::proxy::ProxyServiceClient;
use konnectivity_proto::{Packet, PacketKind};
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// How long a dial waits for the server's answer (the reference's fixed backstop).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to a proxy-server's frontend.
#[derive(Clone)]
pub struct Tunnel {
    client: ProxyServiceClient<Channel>,
    single_use: Option<Arc<AtomicBool>>,
    /// Closes the HTTP/2 connection at once when a connection's close got stuck (see [`Transport`]).
    transport: Arc<Transport>,
    /// `client_connections{status="created"}` while any clone of this tunnel is alive.
    _created: Arc<crate::metrics::ConnectionGauge>,
}

impl Tunnel {
    /// Connects a reusable tunnel: every [`dial`](Self::dial) opens a new stream on one HTTP/2 connection.
    pub async fn connect(address: &ProxyAddress) -> Result<Self, DialError> {
        let transport = Arc::new(Transport::default());
        Ok(Self {
            client: ProxyServiceClient::new(channel(address, &transport.kill).await?),
            single_use: None,
            transport,
            _created: Arc::new(crate::metrics::ConnectionGauge::new("created")),
        })
    }

    /// Connects a single-use tunnel, like the reference's `CreateSingleUseGrpcTunnel`.
    pub async fn connect_single_use(address: &ProxyAddress) -> Result<Self, DialError> {
        let transport = Arc::new(Transport::default());
        Ok(Self {
            client: ProxyServiceClient::new(channel(address, &transport.kill).await?),
            single_use: Some(Arc::new(AtomicBool::new(false))),
            transport,
            _created: Arc::new(crate::metrics::ConnectionGauge::new("created")),
        })
    }

    /// Asks the server to connect to `address` (`host:port`, resolved in the cluster network) and returns the
    /// connection. Waits at most [`DIAL_TIMEOUT`]; wrap it in a timeout or drop the future to give up sooner
    /// (the dial is then abandoned with DIAL_CLS).
    pub async fn dial(&self, address: &str) -> Result<TunnelConn, DialError> {
        let _dialing = crate::metrics::ConnectionGauge::new("dialing");
        let result = self.dial_once(address).await;
        if let Err(e) = &result {
            crate::metrics::dial_failed(e.reason.as_str());
        }
        result
    }

    async fn dial_once(&self, address: &str) -> Result<TunnelConn, DialError> {
        if let Some(used) = &self.single_use
            && used.swap(true, Ordering::SeqCst)
        {
            return Err(DialError::new(DialFailureReason::TunnelStarted, "single-use dialer already dialed"));
        }
        let random: i64 = rand::rng().random_range(1..i64::MAX);
        let (to_server, rx) = mpsc::channel(conn::OUTBOUND_PACKETS);
        // Queue the DIAL_REQ before awaiting the call: a Go server sends its response headers only with its
        // first message, so the call cannot complete before the request is out.
        to_server
            .try_send(Packet::dial_request(address, random))
            .map_err(|_| DialError::new(DialFailureReason::Unknown, "dial request could not be queued"))?;
        crate::metrics::sent(konnectivity_proto::PacketType::DialReq as i32);
        // Abandoning the dial (timeout, or the caller dropping this future) sends DIAL_CLS.
        let mut guard = DialGuard { to_server: Some(to_server.clone()), random };
        let mut client = self.client.clone();
        let attempt = async {
            let response = client.proxy(ReceiverStream::new(rx)).await.map_err(|s| {
                DialError::new(DialFailureReason::StreamSetup, format!("opening the proxy stream: {}", s.message()))
            })?;
            let mut inbound = response.into_inner();
            loop {
                let packet = match inbound.message().await {
                    Ok(Some(p)) => {
                        crate::metrics::received(p.r#type);
                        p
                    }
                    Ok(None) => {
                        return Err(DialError::new(DialFailureReason::TunnelClosed, "tunnel closed while dialing"));
                    }
                    Err(s) => {
                        return Err(DialError::new(
                            DialFailureReason::TunnelClosed,
                            format!("tunnel failed while dialing: {}", s.message()),
                        ));
                    }
                };
                match packet.kind() {
                    Ok(PacketKind::DialResponse(rsp)) if rsp.random == random => {
                        if !rsp.error.is_empty() {
                            return Err(DialError::new(DialFailureReason::Endpoint, rsp.error));
                        }
                        return Ok((rsp.connect_id, inbound));
                    }
                    Ok(PacketKind::CloseDial(cls)) if cls.random == random => {
                        return Err(DialError::new(DialFailureReason::DialClosed, "dial closed"));
                    }
                    Ok(other) => tracing::debug!("ignoring {other:?} while dialing"),
                    Err(e) => tracing::warn!("ignoring malformed packet while dialing: {e}"),
                }
            }
        };
        let (connect_id, inbound) = match tokio::time::timeout(DIAL_TIMEOUT, attempt).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => {
                if e.reason != DialFailureReason::Timeout && e.reason != DialFailureReason::Context {
                    guard.disarm();
                }
                return Err(e);
            }
            Err(_) => {
                return Err(DialError::new(DialFailureReason::Timeout, format!("dial timeout after {DIAL_TIMEOUT:?}")));
            }
        };
        guard.disarm();
        Ok(TunnelConn::start(connect_id, to_server, inbound, self.transport.clone(), self.single_use.is_some()))
    }
}

/// Sends DIAL_CLS when a dial is abandoned before its answer.
struct DialGuard {
    to_server: Option<mpsc::Sender<Packet>>,
    random: i64,
}

impl DialGuard {
    fn disarm(&mut self) {
        self.to_server = None;
    }
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.to_server.take() {
            let _ = tx.try_send(Packet::close_dial(self.random));
        }
    }
}

async fn channel(address: &ProxyAddress, kill: &tokio_util::sync::CancellationToken) -> Result<Channel, DialError> {
    let setup = |e: String| DialError::new(DialFailureReason::Unknown, e);
    match address {
        ProxyAddress::Uds(path) => {
            let path = path.clone();
            let kill = kill.clone();
            let connector = tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                let kill = kill.clone();
                async move {
                    let uds = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(Killable::new(uds, &kill)))
                }
            });
            endpoint("http://localhost")?.connect_with_connector(connector).await.map_err(|e| {
                setup(format!(
                    "connecting to proxy-server at {address:?}: {}",
                    konnectivity_transport::error_chain::error_chain(&e)
                ))
            })
        }
        ProxyAddress::Tcp { host, port, tls, server_name } => {
            let target = konnectivity_transport::listen::join_host_port(host, *port);
            let name = server_name.clone().unwrap_or_else(|| host.clone());
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|e| setup(format!("TLS server name {name:?}: {e}")))?;
            let connector_tls = tokio_rustls::TlsConnector::from(tls.clone());
            let dial_target = target.clone();
            let kill = kill.clone();
            let connector = tower::service_fn(move |_: http::Uri| {
                let tls = connector_tls.clone();
                let name = name.clone();
                let target = dial_target.clone();
                let kill = kill.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(&target).await?;
                    let _ = tcp.set_nodelay(true);
                    Ok::<_, std::io::Error>(TokioIo::new(Killable::new(tls.connect(name, tcp).await?, &kill)))
                }
            });
            endpoint(&format!("http://{target}"))?.connect_with_connector(connector).await.map_err(|e| {
                setup(format!(
                    "connecting to proxy-server at {address:?}: {}",
                    konnectivity_transport::error_chain::error_chain(&e)
                ))
            })
        }
    }
}

fn endpoint(uri: &str) -> Result<Endpoint, DialError> {
    Ok(Endpoint::from_shared(uri.to_string())
        .map_err(|e| DialError::new(DialFailureReason::Unknown, format!("proxy address {uri}: {e}")))?
        .connect_timeout(DIAL_TIMEOUT)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20)))
}
