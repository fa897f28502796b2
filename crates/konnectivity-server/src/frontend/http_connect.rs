//! The HTTP CONNECT frontend (`--mode=http-connect`), as kube-apiserver's `HTTPConnect` egress uses it.
//!
//! Each client connection is handled by one task that owns the socket: it reads the CONNECT head, dials
//! through an agent, answers exactly `HTTP/1.1 200 Connection Established\r\n\r\n` (and nothing before it: DATA
//! can only follow the DIAL_RSP through this task's own queue), then pipes. Unlike the reference, agent data
//! is written to the socket here and never in the agent's receive loop, so one slow client cannot stall the
//! others; a client that disconnects while its dial is pending is noticed and its dial abandoned; and a client
//! that hangs up while its upload waits for an endpoint that does not read is noticed too (see
//! [`crate::config::DEFAULT_HANGUP_GRACE`]), where the reference keeps the tunnel until the endpoint reads or
//! goes away.

use crate::audit::{ClientIdentity, CloseReason};
use crate::credentials::ClientAllowList;
use crate::frontend::session::{self, Session, Upload};
use crate::tunnels::link::Link;
use crate::tunnels::queue::Queued;
use crate::tunnels::table::{DialStartError, Tunnels};
use bytes::BytesMut;
use konnectivity_proto::names::BACKEND_DIAL_TIMEOUT;
use konnectivity_proto::{PacketKind, packet};
use konnectivity_transport::listen::SocketFd;
use rand::Rng;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head (the reference's `ReadHeaderTimeout`).
pub const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head accepted (the reference's `MaxHeaderBytes`).
const MAX_HEAD: usize = 1 << 20;
/// Client bytes buffered while the dial is pending (a client normally sends nothing before the 200).
const MAX_EARLY_DATA: usize = 1 << 20;
/// Client read size (the reference reads 32 KiB).
const CLIENT_READ: usize = 64 * 1024;

/// How long an upload waits for credit before the client's socket is watched for a hangup.
const WATCH_AFTER: Duration = Duration::from_millis(500);

/// The exact success answer kube-apiserver expects; nothing may follow it until the client speaks.
pub const CONNECTION_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// The HTTP status the reference gives a dial error text (case-insensitive substring rules).
pub fn dial_error_status(error: &str) -> u16 {
    let e = error.to_lowercase();
    if e.contains(konnectivity_egress_policy::DENIED) {
        // Ours: the agent's policy refused the resolved address.
        403
    } else if e.contains("timeout") || e.contains("deadline exceeded") {
        504
    } else if e.contains("too many open files") {
        503
    } else {
        502
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Shared settings of the CONNECT handlers.
pub(crate) struct ConnectFrontend {
    pub(crate) tunnels: Arc<Tunnels>,
    pub(crate) backend_dial_timeout: Option<Duration>,
    pub(crate) hangup_grace: Duration,
    /// Which mTLS clients may open tunnels.
    pub(crate) allowed: Arc<ClientAllowList>,
    pub(crate) shutdown: CancellationToken,
}

impl ConnectFrontend {
    /// Serves one client connection until it ends.
    pub(crate) async fn handle<IO>(self: Arc<Self>, mut io: IO, peer: ClientIdentity)
    where
        IO: AsyncRead + AsyncWrite + SocketFd + Unpin + Send,
    {
        let _gauge = self.tunnels.metrics.http_connection();
        if let Err(why) = self.allowed.admits(peer.certs()) {
            tracing::warn!(%peer, "frontend client refused: {why}");
            let body = format!("client not allowed: {why}\n");
            let _ = write_response(&mut io, 403, "text/plain; charset=utf-8", &[("Connection", "close")], &body).await;
            return;
        }
        let mut buf = BytesMut::with_capacity(4096);
        let head = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = tokio::time::timeout(READ_HEADER_TIMEOUT, read_head(&mut io, &mut buf)) => match r {
                Ok(h) => h,
                Err(_) => {
                    tracing::debug!(%peer, "no request head within {READ_HEADER_TIMEOUT:?}");
                    return;
                }
            },
        };
        let (method, target, head_len) = match head {
            Head::Complete { method, target, len } => (method, target, len),
            Head::Closed => return,
            Head::Invalid(status) => {
                let body = format!("{status} {}", reason(status));
                let _ = write_response(&mut io, status, "text/plain; charset=utf-8", &[("Connection", "close")], &body)
                    .await;
                return;
            }
        };
        tracing::debug!(%peer, %method, %target, "request");
        if method != "CONNECT" {
            let body = "this proxy only supports CONNECT passthrough\n";
            let len = body.len().to_string();
            let extra =
                [("X-Content-Type-Options", "nosniff"), ("Content-Length", len.as_str()), ("Connection", "close")];
            let _ = write_response(&mut io, 405, "text/plain; charset=utf-8", &extra, body).await;
            return;
        }
        let early = buf.split_off(head_len);
        self.connect(io, target, early, peer).await;
    }

    async fn connect<IO>(&self, mut io: IO, target: String, mut early: BytesMut, peer: ClientIdentity)
    where
        IO: AsyncRead + AsyncWrite + SocketFd + Unpin + Send,
    {
        let (mut session, mut rx) = Session::open(&self.tunnels, "http-connect", peer, self.backend_dial_timeout);
        let random: i64 = rand::rng().random_range(1..i64::MAX);
        if let Err(e) = session.dial(&target, random).await {
            refuse(&mut io, &e).await;
            return;
        }
        let Some(connect_id) = self.answer(&mut session, &mut rx, &mut io, &mut early, &target).await else { return };
        if io.write_all(CONNECTION_ESTABLISHED).await.is_err() {
            session.ending_because(CloseReason::ClientClosed);
            return;
        }
        let peer = &session.queue().client;
        tracing::debug!(%peer, %target, connect_id, "connection established");
        let link = session.link(connect_id);
        let io = Arc::new(Mutex::new(io));
        let (mut rd, mut wr) = (Shared(io.clone()), Shared(io));
        let queue = session.queue().clone();
        let to_agent = pipe_to_agent(&session, &mut rd, early, connect_id, link.as_ref(), self.hangup_grace);
        let to_client = async {
            while let Some(queued) = rx.recv().await {
                match &queued.packet.payload {
                    Some(packet::Payload::Data(d)) if d.connect_id == connect_id => {
                        if wr.write_all(&d.data).await.is_err() {
                            return;
                        }
                        queue.on_sent(&queued);
                    }
                    Some(packet::Payload::CloseResponse(_) | packet::Payload::CloseDial(_)) => return,
                    _ => {}
                }
            }
        };
        let reason = tokio::select! {
            _ = to_agent => {
                tracing::debug!(connect_id, "client closed");
                CloseReason::ClientClosed
            }
            // The agent's CLOSE_RSP (its close is audited already), or the client socket failed.
            _ = to_client => {
                tracing::debug!(connect_id, "agent closed");
                CloseReason::ClientClosed
            }
            _ = queue.closed.cancelled() => {
                tracing::debug!(connect_id, "connection stopped");
                CloseReason::FrontendEnded
            }
            _ = self.shutdown.cancelled() => CloseReason::ServerShutdown,
        };
        let _ = wr.shutdown().await;
        session.ending_because(reason);
    }

    /// Waits for the agent's answer to the dial, watching the client, the agent stream and the dial's deadline
    /// meanwhile, and answers the client when the dial fails. The connect ID, if the dial succeeded.
    async fn answer<IO>(
        &self,
        session: &mut Session,
        rx: &mut mpsc::UnboundedReceiver<Queued>,
        io: &mut IO,
        early: &mut BytesMut,
        target: &str,
    ) -> Option<i64>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let backend = session.backend()?.clone();
        loop {
            tokio::select! {
                queued = rx.recv() => {
                    let queued = queued?;
                    match queued.packet.kind() {
                        Ok(PacketKind::DialResponse(rsp)) if rsp.error.is_empty() => return Some(rsp.connect_id),
                        Ok(PacketKind::DialResponse(rsp)) => {
                            let status = dial_error_status(&rsp.error);
                            let close = [("Connection", "close")];
                            let _ = write_response(io, status, "text/plain; charset=utf-8", &close, &rsp.error).await;
                            return None;
                        }
                        Ok(PacketKind::CloseDial(_)) => return None,
                        _ => {}
                    }
                }
                read = io.read_buf(early), if early.len() < MAX_EARLY_DATA => {
                    if matches!(read, Ok(0) | Err(_)) {
                        tracing::debug!(peer = %session.queue().client, %target, "client left before its dial was answered");
                        session.ending_because(CloseReason::ClientClosed);
                        return None;
                    }
                }
                _ = backend.closed.cancelled() => {
                    let body = "Backend context error: context canceled\r\n";
                    let _ = write_response(io, 502, "text/plain; charset=utf-8", &[], body).await;
                    return None;
                }
                _ = session::sleep_until(session.next_deadline()) => {
                    session.expire_dials();
                    let body = format!("Backend dial timeout: {BACKEND_DIAL_TIMEOUT}\r\n");
                    let _ = write_response(io, 504, "text/plain; charset=utf-8", &[], &body).await;
                    return None;
                }
                _ = self.shutdown.cancelled() => {
                    session.ending_because(CloseReason::ServerShutdown);
                    return None;
                }
            }
        }
    }
}

/// Answers a client whose dial could not be sent to an agent.
async fn refuse<IO: AsyncWrite + Unpin>(io: &mut IO, e: &DialStartError) {
    if let DialStartError::NoAgent = e {
        // Byte for byte the reference's answer.
        let msg = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: {}",
            e.message()
        );
        let _ = io.write_all(msg.as_bytes()).await;
        let _ = io.shutdown().await;
        return;
    }
    let status = match e {
        DialStartError::Timeout => 504,
        DialStartError::Denied(_) => 403,
        _ => 502,
    };
    let body = format!("Failed to tunnel dial request: {}\r\n", e.message());
    let _ = write_response(io, status, "text/plain; charset=utf-8", &[], &body).await;
}

/// The client socket, shared by the two directions of a tunnel (as `tokio::io::split` does) and by the hangup
/// watch, which needs the socket itself.
struct Shared<IO>(Arc<Mutex<IO>>);

impl<IO> Shared<IO> {
    fn io(&self) -> std::sync::MutexGuard<'_, IO> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Shared<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io()).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Shared<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io()).poll_shutdown(cx)
    }
}

/// What ends an upload's wait for the endpoint's credit: while it waits, nothing reads the client's socket, so
/// the socket is watched for a hangup ([`konnectivity_transport::listen::SocketWatch::hung_up`], made only once
/// the wait has lasted [`WATCH_AFTER`]: an endpoint that is merely slower than the client makes many short
/// waits, none of which needs one); after one, the endpoint has `grace` to make room.
async fn hung_up_for<IO: SocketFd>(client: &Shared<IO>, grace: Duration, connect_id: i64) {
    tokio::time::sleep(WATCH_AFTER).await;
    let watch = client.io().watch();
    match watch {
        Some(w) => w.hung_up().await,
        None => std::future::pending().await,
    }
    tokio::time::sleep(grace).await;
    tracing::debug!(connect_id, "client hung up while the endpoint had read nothing for {grace:?}; closing");
}

/// Forwards client bytes (first those that came with the head) as DATA, honouring the agent's credit. Returns
/// when the client has finished or gone, the agent is gone, or the client hung up while the endpoint took
/// nothing for the hangup grace.
async fn pipe_to_agent<IO: AsyncRead + SocketFd + Unpin>(
    session: &Session,
    rd: &mut Shared<IO>,
    early: BytesMut,
    connect_id: i64,
    link: Option<&Arc<Link>>,
    hangup_grace: Duration,
) {
    let mut pending = Some(early.freeze()).filter(|b| !b.is_empty());
    let mut buf = BytesMut::with_capacity(CLIENT_READ);
    loop {
        let chunk = match pending.take() {
            Some(c) => c,
            None => {
                if buf.capacity() < CLIENT_READ / 4 {
                    buf.reserve(CLIENT_READ);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => buf.split().freeze(),
                }
            }
        };
        let give_up = hung_up_for(rd, hangup_grace, connect_id);
        if session.upload(link, connect_id, chunk, give_up).await != Upload::Sent {
            return;
        }
    }
}

enum Head {
    Complete { method: String, target: String, len: usize },
    Closed,
    Invalid(u16),
}

async fn read_head<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> Head {
    loop {
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let (Some(method), Some(target)) = (req.method, req.path) else { return Head::Invalid(400) };
                if method == "CONNECT" && !is_authority(target) {
                    return Head::Invalid(400);
                }
                return Head::Complete { method: method.to_string(), target: target.to_string(), len };
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Head::Invalid(431),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Head::Invalid(431),
            Err(_) => return Head::Invalid(400),
        }
    }
}

/// `host:port` or `[v6]:port`, as a CONNECT request-target must be.
fn is_authority(target: &str) -> bool {
    let port = if let Some(rest) = target.strip_prefix('[') {
        rest.split_once("]:").map(|(_, p)| p)
    } else {
        target.rsplit_once(':').filter(|(h, _)| !h.is_empty() && !h.contains(':')).map(|(_, p)| p)
    };
    port.is_some_and(|p| p.parse::<u16>().is_ok())
}

async fn write_response<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Type: {content_type}\r\n\r\n{body}"));
    io.write_all(out.as_bytes()).await?;
    io.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_follows_the_reference() {
        assert_eq!(dial_error_status("dial tcp 1.2.3.4:80: i/o timeout"), 504);
        assert_eq!(dial_error_status("context deadline exceeded"), 504);
        assert_eq!(dial_error_status("dial tcp: socket: too many open files"), 503);
        assert_eq!(dial_error_status("dial tcp 127.0.0.1:1: connect: connection refused"), 502);
        assert_eq!(dial_error_status("dial tcp: lookup nope.invalid: no such host"), 502);
        assert_eq!(dial_error_status("something else"), 502);
    }

    #[test]
    fn authority_form() {
        assert!(is_authority("10.0.0.1:443"));
        assert!(is_authority("kubelet.example:10250"));
        assert!(is_authority("[::1]:80"));
        assert!(!is_authority("/path"));
        assert!(!is_authority("host"));
        assert!(!is_authority("::1:80"));
        assert!(!is_authority("host:http"));
    }

    #[tokio::test]
    async fn head_parsing_keeps_bytes_after_the_head() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nearly").await.expect("write");
        let mut buf = BytesMut::new();
        match read_head(&mut server, &mut buf).await {
            Head::Complete { method, target, len } => {
                assert_eq!((method.as_str(), target.as_str()), ("CONNECT", "10.0.0.1:443"));
                assert_eq!(&buf[len..], b"early");
            }
            _ => panic!("head not parsed"),
        }
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.expect("write");
        assert!(matches!(read_head(&mut server, &mut BytesMut::new()).await, Head::Invalid(400)));
    }
}
