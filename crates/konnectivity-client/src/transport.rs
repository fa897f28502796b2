//! A tunnel's HTTP/2 connection underneath: closed by force when a connection's close gets stuck.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

/// A tunnel's HTTP/2 connection, and what closes it by force.
///
/// A connection whose close cannot reach the server (its CLOSE_REQ, and the stream's end, wait behind data that
/// flow control holds back, e.g. an upload into an endpoint that stopped reading) would otherwise keep its
/// HTTP/2 stream, and so the whole connection, open for as long as the endpoint does not read: hyper offers no
/// way to reset one stream once its response has arrived. When such a close times out, the connection is
/// closed by force: at once for a single-use tunnel (it carries nothing else), otherwise when the last handle
/// of the tunnel is dropped. The server then sees the connection end and cleans up.
#[derive(Default)]
pub(crate) struct Transport {
    pub(crate) kill: tokio_util::sync::CancellationToken,
    stuck: AtomicBool,
}

impl Transport {
    /// A connection's close timed out; `single_use`: the tunnel carries nothing else.
    pub(crate) fn close_stuck(&self, single_use: bool) {
        self.stuck.store(true, Ordering::SeqCst);
        if single_use {
            self.kill.cancel();
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if self.stuck.load(Ordering::SeqCst) {
            self.kill.cancel();
        }
    }
}

/// A transport that fails every read and write once `kill` is cancelled, which ends its HTTP/2 connection.
pub(crate) struct Killable<T> {
    inner: T,
    killed: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<T> Killable<T> {
    pub(crate) fn new(inner: T, kill: &tokio_util::sync::CancellationToken) -> Self {
        Self { inner, killed: Box::pin(kill.clone().cancelled_owned()) }
    }

    fn check(&mut self, cx: &mut std::task::Context<'_>) -> Result<(), std::io::Error> {
        match self.killed.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "tunnel connection closed by force (a connection's close timed out)",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Killable<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.check(cx)?;
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Killable<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.check(cx)?;
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    // Forwarded so that h2 keeps writing a frame's head and payload in one call (it falls back to copying
    // into its own buffer, or to two writes, when the transport says it cannot).
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.check(cx)?;
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.check(cx)?;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
