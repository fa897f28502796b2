//! HTTP/1.1 over any byte stream through the tunnel (a `TunnelConn`, a CONNECT stream).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Sends one request over `conn` and returns status and body.
pub async fn request<IO>(conn: IO, method: &str, host: &str, path: &str, body: Bytes) -> anyhow::Result<(u16, Bytes)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    let driver = tokio::spawn(connection);
    let req =
        ::http::Request::builder().method(method).uri(path).header(::http::header::HOST, host).body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    drop(sender);
    driver.abort();
    Ok((status, body))
}

/// GET `path` over `conn`.
pub async fn get<IO>(conn: IO, host: &str, path: &str) -> anyhow::Result<(u16, Bytes)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    request(conn, "GET", host, path, Bytes::new()).await
}
