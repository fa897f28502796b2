//! A dialed connection as a byte stream.

use crate::transport::Transport;
use bytes::Bytes;
use konnectivity_proto::{Packet, PacketKind};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// How long closing a connection waits for the server to confirm (the reference's `CloseTimeout`).
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Packets queued towards the server per connection.
pub(crate) const OUTBOUND_PACKETS: usize = 64;
/// Chunks queued for the reader per connection.
const INBOUND_CHUNKS: usize = 64;
/// The largest DATA packet a write produces: well under the 4 MiB message limit of Go peers.
const MAX_WRITE: usize = 1 << 20;

/// A connection through the tunnel: `AsyncRead + AsyncWrite`.
///
/// Reading returns the endpoint's bytes and then EOF once the endpoint or the server closes the connection
/// (an error if the server reports one, such as the agent disconnecting). Writes become DATA packets. The
/// protocol has no half-close: `shutdown()` flushes, and the connection is closed (CLOSE_REQ) when this value is
/// dropped.
pub struct TunnelConn {
    connect_id: i64,
    writer: PollSender<Packet>,
    reader: mpsc::Receiver<io::Result<Bytes>>,
    pending: Bytes,
    close_tx: mpsc::Sender<Packet>,
    eof: bool,
    /// `client_connections{status="ok"}` while the connection is open.
    _ok: crate::metrics::ConnectionGauge,
}

impl std::fmt::Debug for TunnelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConn").field("connect_id", &self.connect_id).field("eof", &self.eof).finish()
    }
}

impl TunnelConn {
    pub(crate) fn start(
        connect_id: i64,
        to_server: mpsc::Sender<Packet>,
        inbound: tonic::Streaming<Packet>,
        transport: Arc<Transport>,
        single_use: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(INBOUND_CHUNKS);
        tokio::spawn(serve(connect_id, inbound, tx, to_server.clone(), transport, single_use));
        Self {
            connect_id,
            writer: PollSender::new(to_server.clone()),
            reader: rx,
            pending: Bytes::new(),
            close_tx: to_server,
            eof: false,
            _ok: crate::metrics::ConnectionGauge::new("ok"),
        }
    }

    /// The connection's ID on its agent stream (for logs).
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }
}

/// Reads the stream's packets into the connection until it closes. The request side stays open (the server
/// treats a half-close as the end) until the connection is dropped and CLOSE_RSP arrives, or
/// [`CLOSE_TIMEOUT`] passes; then the tunnel's connection is closed by force (see [`Transport`]).
async fn serve(
    connect_id: i64,
    mut inbound: tonic::Streaming<Packet>,
    to_reader: mpsc::Sender<io::Result<Bytes>>,
    to_server: mpsc::Sender<Packet>,
    transport: Arc<Transport>,
    single_use: bool,
) {
    let mut reader = Some(to_reader);
    loop {
        let next = match &reader {
            Some(r) => tokio::select! {
                m = inbound.message() => m,
                // The reader was dropped (the connection is closing): wait for CLOSE_RSP, bounded.
                _ = r.closed() => { reader = None; continue; }
            },
            None => match tokio::time::timeout(CLOSE_TIMEOUT, inbound.message()).await {
                Ok(m) => m,
                Err(_) => {
                    tracing::debug!(connect_id, "no CLOSE_RSP within {:?}; closing the tunnel by force", CLOSE_TIMEOUT);
                    transport.close_stuck(single_use);
                    break;
                }
            },
        };
        match next {
            Ok(Some(packet)) => match {
                crate::metrics::received(packet.r#type);
                packet
            }
            .kind()
            {
                Ok(PacketKind::Data(d)) if d.connect_id == connect_id => {
                    if let Some(r) = &reader
                        && r.send(Ok(d.data)).await.is_err()
                    {
                        reader = None;
                    }
                }
                Ok(PacketKind::CloseResponse(c)) if c.connect_id == connect_id => {
                    if let Some(r) = reader.take()
                        && !c.error.is_empty()
                    {
                        let _ = r.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, c.error))).await;
                    }
                    break;
                }
                Ok(other) => tracing::debug!(connect_id, "ignoring {other:?}"),
                Err(e) => tracing::warn!(connect_id, "ignoring malformed packet: {e}"),
            },
            Ok(None) => {
                if let Some(r) = reader.take() {
                    let _ = r.send(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tunnel closed"))).await;
                }
                break;
            }
            Err(status) => {
                if let Some(r) = reader.take() {
                    let _ = r
                        .send(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("tunnel failed: {}", status.message()),
                        )))
                        .await;
                }
                break;
            }
        }
    }
    drop(to_server);
}

impl AsyncRead for TunnelConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.reader.poll_recv(cx)) {
                Some(Ok(bytes)) => self.pending = bytes,
                Some(Err(e)) => {
                    self.eof = true;
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for TunnelConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "tunnel connection closed");
        ready!(self.writer.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(MAX_WRITE);
        let packet = Packet::data(self.connect_id, Bytes::copy_from_slice(&buf[..n]));
        self.writer.send_item(packet).map_err(|_| closed())?;
        crate::metrics::sent(konnectivity_proto::PacketType::Data as i32);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Packets are handed to the HTTP/2 stream as they are written; nothing is held back here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The wire protocol has no half-close; the connection closes when dropped.
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelConn {
    fn drop(&mut self) {
        if !self.eof && self.close_tx.try_send(Packet::close_request(self.connect_id)).is_ok() {
            crate::metrics::sent(konnectivity_proto::PacketType::CloseReq as i32);
        }
    }
}
