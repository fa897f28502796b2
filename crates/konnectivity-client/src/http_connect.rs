//! Dialing through a proxy-server in HTTP CONNECT mode (`--mode=http-connect`), as kube-apiserver's
//! `HTTPConnect` egress does: one Unix or mutual-TLS connection per dial, `CONNECT host:port HTTP/1.1`, then
//! raw bytes.

use crate::address::ProxyAddress;
use crate::error::{DialError, DialFailureReason};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Largest response head accepted from the proxy.
const MAX_HEAD: usize = 64 * 1024;

/// A connection established with HTTP CONNECT: `AsyncRead + AsyncWrite`, with real half-close (`shutdown`).
pub enum ConnectStream {
    /// Over the proxy's Unix socket.
    Unix(UnixStream),
    /// Over mutual TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for ConnectStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unix(_) => "ConnectStream::Unix",
            Self::Tls(_) => "ConnectStream::Tls",
        })
    }
}

fn fail(reason: DialFailureReason, message: String) -> DialError {
    DialError { reason, message }
}

/// Opens a connection to the proxy and asks it to CONNECT to `target` (`host:port`). The response head is read
/// byte by byte, so nothing that follows it is consumed: a server that sends bytes after its 200 before the
/// client speaks is breaking kube-apiserver's expectations, and the caller sees those bytes.
pub async fn dial(proxy: &ProxyAddress, target: &str, user_agent: &str) -> Result<ConnectStream, DialError> {
    let unknown =
        |e: io::Error| fail(DialFailureReason::Unknown, format!("connecting to proxy-server at {proxy:?}: {e}"));
    let mut stream = match proxy {
        ProxyAddress::Uds(path) => ConnectStream::Unix(UnixStream::connect(path).await.map_err(unknown)?),
        ProxyAddress::Tcp { host, port, tls, server_name } => {
            let mut config = (**tls).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = server_name.clone().unwrap_or_else(|| host.clone());
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|e| fail(DialFailureReason::Unknown, format!("TLS server name {name:?}: {e}")))?;
            let tcp = TcpStream::connect(konnectivity_transport::listen::join_host_port(host, *port))
                .await
                .map_err(unknown)?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(unknown)?;
            ConnectStream::Tls(Box::new(tls))
        }
    };
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {user_agent}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(unknown)?;

    let mut head = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(fail(DialFailureReason::Unknown, "proxy response head too large".into()));
        }
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            Ok(_) => {
                return Err(fail(
                    DialFailureReason::TunnelClosed,
                    "proxy closed the connection before answering".into(),
                ));
            }
            Err(e) => return Err(unknown(e)),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let code = match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => response.code.unwrap_or(0),
        _ => return Err(fail(DialFailureReason::Unknown, "malformed proxy response".into())),
    };
    if code == 200 {
        return Ok(stream);
    }
    // Dial errors come as a plain-text body closed by the server.
    let mut body = Vec::new();
    let _ = (&mut stream).take(MAX_HEAD as u64).read_to_end(&mut body).await;
    let reason = response.reason.unwrap_or("");
    let text = String::from_utf8_lossy(&body).trim_end().to_string();
    Err(fail(DialFailureReason::Endpoint, format!("{code} {reason}: {text}")))
}

impl AsyncRead for ConnectStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnectStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
