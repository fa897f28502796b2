//! Serving the configured frontend protocol on the frontend listener: one generic serve over the listener kinds
//! (a Unix socket, or mutual-TLS TCP), for either protocol.

use crate::audit::ClientIdentity;
use crate::config::FrontendMode;
use crate::credentials::ClientAllowList;
use crate::frontend::grpc::ProxyEndpoint;
use crate::frontend::http_connect::ConnectFrontend;
use crate::tunnels::table::Tunnels;
use futures_util::{Stream, StreamExt};
use konnectivity_proto::proxy::ProxyServiceServer;
use konnectivity_transport::h2_authority::AuthorityFix;
use konnectivity_transport::listen::{SocketFd, TlsConn};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::Instrument;

/// A connection accepted on the frontend listener.
pub(crate) trait FrontendIo: AsyncRead + AsyncWrite + SocketFd + Unpin + Send + 'static {
    /// What the gRPC server reads the connection through.
    type Grpc: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// Who the client is, for the audit log and logs.
    fn client(&self) -> ClientIdentity;
    /// The connection as the gRPC server takes it.
    fn into_grpc(self) -> Self::Grpc;
}

impl FrontendIo for UnixStream {
    // grpc-go sends the percent-encoded socket path as :authority, which h2 refuses: the shim fixes it.
    type Grpc = AuthorityFix<UnixStream>;
    fn client(&self) -> ClientIdentity {
        ClientIdentity::unix(self)
    }
    fn into_grpc(self) -> Self::Grpc {
        AuthorityFix::new(self)
    }
}

impl FrontendIo for TlsConn {
    type Grpc = TlsConn;
    fn client(&self) -> ClientIdentity {
        ClientIdentity::tls(self.info())
    }
    fn into_grpc(self) -> Self::Grpc {
        self
    }
}

/// What serving a frontend needs.
pub(crate) struct FrontendServing {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) mode: FrontendMode,
    pub(crate) backend_dial_timeout: Option<Duration>,
    pub(crate) hangup_grace: Duration,
    pub(crate) keepalive_time: Duration,
    /// HTTP CONNECT connections handled at once at most; the rest wait in the listen backlog.
    pub(crate) max_connect_handlers: usize,
    /// gRPC: HTTP/2 streams per connection at most.
    pub(crate) max_streams: u32,
    /// Which mTLS clients may use the frontend beyond the CA's verdict.
    pub(crate) allowed: Arc<ClientAllowList>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl FrontendServing {
    /// Serves the configured protocol on `incoming` until shutdown.
    pub(crate) fn serve<IO: FrontendIo>(
        &self,
        incoming: impl Stream<Item = std::io::Result<IO>> + Send + Unpin + 'static,
    ) {
        let token = self.shutdown.clone();
        match self.mode {
            FrontendMode::Grpc => {
                let service = ProxyServiceServer::new(ProxyEndpoint {
                    tunnels: self.tunnels.clone(),
                    backend_dial_timeout: self.backend_dial_timeout,
                    allowed: self.allowed.clone(),
                    shutdown: self.shutdown.clone(),
                    tracker: self.tracker.clone(),
                });
                let router = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(self.keepalive_time))
                    .max_concurrent_streams(Some(self.max_streams))
                    .initial_stream_window_size(Some(4 << 20))
                    .initial_connection_window_size(Some(8 << 20))
                    .add_service(service);
                let incoming = incoming.map(|r| r.map(IO::into_grpc));
                self.tracker.spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, token.cancelled_owned()).await {
                        tracing::error!("frontend gRPC server: {e}");
                    }
                });
            }
            FrontendMode::HttpConnect => {
                let frontend = Arc::new(ConnectFrontend {
                    tunnels: self.tunnels.clone(),
                    backend_dial_timeout: self.backend_dial_timeout,
                    hangup_grace: self.hangup_grace,
                    allowed: self.allowed.clone(),
                    shutdown: self.shutdown.clone(),
                });
                let limit = Arc::new(Semaphore::new(self.max_connect_handlers.max(1)));
                self.tracker.spawn(serve_connect(incoming, frontend, limit, token, self.tracker.clone()));
            }
        }
    }
}

/// Runs one CONNECT handler task per accepted connection, at most `limit` at once, until `shutdown`.
async fn serve_connect<IO: FrontendIo>(
    mut incoming: impl Stream<Item = std::io::Result<IO>> + Send + Unpin + 'static,
    frontend: Arc<ConnectFrontend>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    handlers: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = incoming.next() => n,
        };
        match next {
            Some(Ok(io)) => {
                let peer = io.client();
                let span = tracing::debug_span!("connect", %peer);
                let frontend = frontend.clone();
                handlers.spawn(
                    async move {
                        let _permit = permit;
                        frontend.handle(io, peer).await;
                    }
                    .instrument(span),
                );
            }
            Some(Err(e)) => {
                tracing::warn!("frontend accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None => return,
        }
    }
}
