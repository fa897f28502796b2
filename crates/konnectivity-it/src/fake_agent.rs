//! A scripted agent: holds a real `/AgentService/Connect` stream (mTLS) and lets a test read what the server
//! sends and answer (or not) by hand, to reach states a well-behaved agent never produces.

use hyper_util::rt::TokioIo;
use konnectivity_proto::Packet;
use konnectivity_proto::agent::AgentServiceClient;
use konnectivity_testkit::pki::Pki;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A connected fake agent.
pub struct FakeAgent {
    /// Packets to send to the server.
    pub to_server: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
}

impl FakeAgent {
    /// Connects to a server's agent port as agent `agent_id`, with the PKI's agent certificate.
    pub async fn connect(pki: &Pki, agent_addr: SocketAddr, agent_id: &str) -> anyhow::Result<Self> {
        Self::connect_with(pki, agent_addr, agent_id, false).await
    }

    /// Like [`FakeAgent::connect`], optionally offering konnectivity-rs flow control (then ignoring it, if the
    /// test wants a peer that overruns its credit).
    pub async fn connect_with(
        pki: &Pki,
        agent_addr: SocketAddr,
        agent_id: &str,
        flow_control: bool,
    ) -> anyhow::Result<Self> {
        let tls = konnectivity_transport::tls::client_config(
            &pki.ca,
            Some((&pki.agent_cert, &pki.agent_key)),
            &[konnectivity_transport::tls::ALPN_H2.to_vec()],
        )?;
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tokio_rustls::TlsConnector::from(tls.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(agent_addr).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{agent_addr}"))?
            .connect_with_connector(connector)
            .await?;
        let (to_server, rx) = mpsc::channel(64);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("agentid", agent_id.parse()?);
        request.metadata_mut().insert("agentidentifiers", "".parse()?);
        if flow_control {
            request
                .metadata_mut()
                .insert(konnectivity_proto::flow::METADATA_KEY, konnectivity_proto::flow::VERSION.parse()?);
        }
        let response = AgentServiceClient::new(channel).connect(request).await?;
        Ok(Self { to_server, inbound: response.into_inner() })
    }

    /// The next packet from the server, within 10 s.
    pub async fn next(&mut self) -> anyhow::Result<Packet> {
        match tokio::time::timeout(Duration::from_secs(10), self.inbound.message()).await {
            Ok(Ok(Some(p))) => Ok(p),
            Ok(Ok(None)) => anyhow::bail!("server ended the stream"),
            Ok(Err(s)) => anyhow::bail!("stream failed: {s}"),
            Err(_) => anyhow::bail!("no packet from the server within 10s"),
        }
    }
}
