//! Dialing as one egress selection of kube-apiserver does: a new single-use gRPC tunnel per connection, or a new
//! HTTP CONNECT request per connection.

use crate::address::ProxyAddress;
use crate::conn::TunnelConn;
use crate::error::DialError;
use crate::http_connect::{self, ConnectStream};
use crate::tunnel::Tunnel;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How connections are dialed through a proxy-server, as one egress selection says.
#[derive(Debug, Clone)]
pub enum EgressDialer {
    /// `proxyProtocol: GRPC`: each dial opens its own single-use tunnel (one connection to the server, one
    /// `Proxy` stream), as kube-apiserver does.
    Grpc(ProxyAddress),
    /// `proxyProtocol: HTTPConnect`: each dial opens its own connection to the server and sends `CONNECT`.
    HttpConnect {
        /// The server's frontend.
        proxy: ProxyAddress,
        /// The `User-Agent` of the `CONNECT` request.
        user_agent: String,
    },
}

impl EgressDialer {
    /// Opens a connection to `target` (`host:port`, resolved and dialed by an agent in the cluster network).
    pub async fn dial(&self, target: &str) -> Result<EgressConn, DialError> {
        match self {
            Self::Grpc(proxy) => {
                let tunnel = Tunnel::connect_single_use(proxy).await?;
                Ok(EgressConn::Grpc(tunnel.dial(target).await?))
            }
            Self::HttpConnect { proxy, user_agent } => {
                Ok(EgressConn::HttpConnect(http_connect::dial(proxy, target, user_agent).await?))
            }
        }
    }

    /// The proxy-server's frontend address.
    pub fn proxy(&self) -> &ProxyAddress {
        match self {
            Self::Grpc(proxy) | Self::HttpConnect { proxy, .. } => proxy,
        }
    }
}

/// A connection opened by an [`EgressDialer`]: `AsyncRead + AsyncWrite`.
#[derive(Debug)]
pub enum EgressConn {
    /// Through a gRPC tunnel.
    Grpc(TunnelConn),
    /// Through HTTP CONNECT.
    HttpConnect(ConnectStream),
}

impl AsyncRead for EgressConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Grpc(c) => Pin::new(c).poll_read(cx, buf),
            Self::HttpConnect(c) => Pin::new(c).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EgressConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Grpc(c) => Pin::new(c).poll_write(cx, buf),
            Self::HttpConnect(c) => Pin::new(c).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Grpc(c) => Pin::new(c).poll_flush(cx),
            Self::HttpConnect(c) => Pin::new(c).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Grpc(c) => Pin::new(c).poll_shutdown(cx),
            Self::HttpConnect(c) => Pin::new(c).poll_shutdown(cx),
        }
    }
}
