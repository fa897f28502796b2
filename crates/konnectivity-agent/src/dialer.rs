//! Opening one `/AgentService/Connect` stream to a proxy-server address: TCP (the name resolved again at every
//! dial), TLS with ALPN (`--alpn-proto` values, then h2), the agent's metadata, and the server's
//! `serverid`/`servercount` answer.

use crate::config::{AgentConfig, ServerAddress};
use crate::error::AgentError;
use crate::session::Outbound;
use hyper_util::rt::TokioIo;
use konnectivity_proto::agent::AgentServiceClient;
use konnectivity_proto::names::{AGENT_ID, AGENT_IDENTIFIERS, SERVER_COUNT, SERVER_ID};
use konnectivity_proto::{Packet, flow};
use konnectivity_transport::error_chain::error_chain;
use konnectivity_transport::tls_reload::LiveConfig;
use rand::seq::SliceRandom;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long the agent waits for a server's response headers (the reference waits forever). A server answers at
/// once, except that with token authentication it first reviews the agent's token, for at most its
/// `TOKEN_REVIEW_TIMEOUT` (10 s: up to 5 s waiting for its TokenReview rate limit, then the review itself;
/// past the 5 s it refuses at once with a retry hint). 5 s more cover the server's scheduling under a storm
/// and the round trip. Shorter, an agent would give up on reviews still under way, and retry, asking again.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long TCP connect plus the TLS and HTTP/2 handshakes may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets queued towards one server stream.
const SERVER_QUEUE_PACKETS: usize = 256;

/// A configured server address, ready to dial.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) address: ServerAddress,
    /// The TLS name the server's certificate must carry: the address's host.
    server_name: rustls_pki_types::ServerName<'static>,
}

impl Target {
    /// Checks that the address's host can be a TLS server name.
    pub(crate) fn new(address: ServerAddress) -> Result<Self, AgentError> {
        let server_name = rustls_pki_types::ServerName::try_from(address.host.clone())
            .map_err(|e| AgentError::Config(format!("proxy-server address {address}: {e}")))?;
        Ok(Self { address, server_name })
    }
}

/// What every dial shares.
pub(crate) struct Dialer {
    pub(crate) config: Arc<AgentConfig>,
    /// The TLS client configuration of the moment (its files are watched and reloaded).
    pub(crate) tls: LiveConfig<rustls::ClientConfig>,
}

/// An open stream, before it is known whether its server is new.
pub(crate) struct Opened {
    pub(crate) server_id: String,
    pub(crate) flow_control: bool,
    pub(crate) server_count: u32,
    /// The sending half, for the session that will own the stream (dropped with the stream if none does).
    pub(crate) outbound: Outbound,
    pub(crate) inbound: tonic::Streaming<Packet>,
}

/// Resolves `address` now (names are not cached between dials: servers move) and connects to one of its IPs,
/// trying them in random order, so that a name listing several servers spreads agents like a load balancer.
async fn connect_tcp(address: &ServerAddress) -> std::io::Result<tokio::net::TcpStream> {
    let mut ips: Vec<SocketAddr> = tokio::net::lookup_host((address.host.as_str(), address.port)).await?.collect();
    ips.shuffle(&mut rand::rng());
    let mut last = None;
    for ip in ips {
        match tokio::net::TcpStream::connect(ip).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(std::io::Error::new(e.kind(), format!("{ip}: {e}"))),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{} resolves to no address", address.host))))
}

impl Dialer {
    /// Opens a stream to `target`. Its outbound half ends cleanly once [`Outbound::end`] fires.
    pub(crate) async fn open(&self, target: &Target) -> Result<Opened, AgentError> {
        let addr = target.address.to_string();
        let tls = tokio_rustls::TlsConnector::from(self.tls.current());
        let server_name = target.server_name.clone();
        let address = target.address.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            let server_name = server_name.clone();
            let address = address.clone();
            async move {
                let tcp = connect_tcp(&address).await?;
                konnectivity_transport::listen::tune_tcp(&tcp);
                let stream = tls.connect(server_name, tcp).await?;
                // As grpc-go: any protocol we offered will do (an ALPN-routing load balancer that terminates
                // TLS may pick an --alpn-proto value and pass HTTP/2 on); none at all is refused.
                if stream.get_ref().1.alpn_protocol().is_none() {
                    return Err(std::io::Error::other("server negotiated no ALPN protocol (gRPC over TLS needs one)"));
                }
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| AgentError::Connect { addr: addr.clone(), cause: error_chain(&e) })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(self.config.keepalive_time)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| AgentError::Connect { addr: addr.clone(), cause: error_chain(&e) })?;
        let mut client = AgentServiceClient::new(channel).max_decoding_message_size(4 << 20);

        let (outbound, packets) = Outbound::channel(SERVER_QUEUE_PACKETS);
        let mut request = tonic::Request::new(packets);
        let bad = |what: String| AgentError::BadHeaders { addr: addr.clone(), what };
        let md = request.metadata_mut();
        md.insert(
            AGENT_ID,
            self.config
                .agent_id
                .parse()
                .map_err(|_| AgentError::Config("--agent-id is not a valid header value".into()))?,
        );
        md.insert(
            AGENT_IDENTIFIERS,
            self.config
                .agent_identifiers
                .parse()
                .map_err(|_| AgentError::Config("--agent-identifiers is not a valid header value".into()))?,
        );
        md.insert(flow::METADATA_KEY, tonic::metadata::MetadataValue::from_static(flow::VERSION));
        if !self.config.egress_policy.allows_everything() {
            let fingerprint = self.config.egress_policy.fingerprint();
            md.insert(
                konnectivity_proto::names::EGRESS_POLICY,
                fingerprint.parse().map_err(|_| AgentError::Config("egress policy fingerprint".into()))?,
            );
        }
        if let Some(path) = &self.config.service_account_token_path {
            // Re-read at every connect: kubelet rotates projected tokens in place.
            let token = std::fs::read_to_string(path).map_err(|e| AgentError::Connect {
                addr: addr.clone(),
                cause: format!("reading --service-account-token-path {}: {e}", path.display()),
            })?;
            let value = format!("Bearer {}", token.trim()).parse().map_err(|_| AgentError::Connect {
                addr: addr.clone(),
                cause: format!("the token in {} is not a valid header value", path.display()),
            })?;
            md.insert("authorization", value);
        }
        let response = match tokio::time::timeout(HEADER_TIMEOUT, client.connect(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => return Err(AgentError::Stream { addr, status }),
            Err(_) => return Err(AgentError::HeaderTimeout { addr, after: HEADER_TIMEOUT }),
        };
        let header = |key: &str| -> Result<String, AgentError> {
            let values: Vec<_> = response.metadata().get_all(key).iter().collect();
            match values.as_slice() {
                [v] => v.to_str().map(str::to_string).map_err(|_| bad(format!("header {key} is not text"))),
                other => Err(bad(format!("expected one {key} header, got {}", other.len()))),
            }
        };
        let server_id = header(SERVER_ID)?;
        let server_count: u32 =
            header(SERVER_COUNT)?.parse().map_err(|_| bad(format!("{SERVER_COUNT} is not a number")))?;
        let flow_control =
            response.metadata().get(flow::METADATA_KEY).and_then(|v| v.to_str().ok()) == Some(flow::VERSION);
        Ok(Opened { server_id, flow_control, server_count, outbound, inbound: response.into_inner() })
    }
}
