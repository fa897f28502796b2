//! The HTTP CONNECT frontend (`--mode=http-connect`), as kube-apiserver's `HTTPConnect` egress uses it.
//!
//! Each client connection is handled by one task that owns the socket: it reads the CONNECT head, dials
//! through an agent, answers exactly `HTTP/1.1 200 Connection Established\r\n\r\n` (and nothing before it: DATA
//! can only follow the DIAL_RSP through this task's own queue), then pipes. Unlike the reference, agent data
//! is written to the socket here and never in the agent's receive loop, so one slow client cannot stall the
//! others; a client that disconnects while its dial is pending is noticed and its dial abandoned; and a client
//! that hangs up while its upload waits for an endpoint that does not read is noticed too (see
//! [`HANGUP_GRACE`]), where the reference keeps the tunnel until the endpoint reads or goes away.

use crate::audit::{ClientIdentity, CloseReason, DialFailure};
use crate::backend::Backend;
use crate::state::{DialStartError, Frontend, Tunnels};
use bytes::BytesMut;
use konnectivity_proto::names::BACKEND_DIAL_TIMEOUT;
use konnectivity_proto::{Packet, PacketKind, flow};
use konnectivity_transport::listen::SocketFd;
use rand::Rng;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head (the reference's `ReadHeaderTimeout`).
pub const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head accepted (the reference's `MaxHeaderBytes`).
const MAX_HEAD: usize = 1 << 20;
/// Client bytes buffered while the dial is pending (a client normally sends nothing before the 200).
const MAX_EARLY_DATA: usize = 1 << 20;
/// Client read size (the reference reads 32 KiB).
const CLIENT_READ: usize = 64 * 1024;

/// How long a tunnel whose client has hung up (its socket reports the peer's FIN or a reset) may wait for the
/// endpoint to take the client's remaining bytes before it is closed. The bytes already read from the client are
/// waiting for flow-control credit, so the endpoint has not read for a while. A client that only shut down its
/// sending side still has its last bytes delivered while the endpoint makes progress within this time (the
/// tunnel then closes, as on any client EOF, like the reference's).
pub const HANGUP_GRACE: Duration = Duration::from_secs(30);

/// How long an upload waits for credit before the client's socket is watched for a hangup.
const WATCH_AFTER: Duration = Duration::from_millis(500);

/// The exact success answer kube-apiserver expects; nothing may follow it until the client speaks.
pub const CONNECTION_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// The HTTP status the reference gives a dial error text (case-insensitive substring rules).
pub fn dial_error_status(error: &str) -> u16 {
    let e = error.to_lowercase();
    if e.contains(konnectivity_transport::egress_policy::DENIED) {
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
    pub(crate) shutdown: CancellationToken,
}

/// Decrements `http_connections` when a handler ends, however it ends.
struct ConnectionGauge(Arc<Tunnels>);
impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.metrics.http_connections(-1.0);
    }
}

impl ConnectFrontend {
    /// Serves one client connection until it ends.
    pub(crate) async fn handle<IO>(self: Arc<Self>, mut io: IO, peer: ClientIdentity)
    where
        IO: AsyncRead + AsyncWrite + SocketFd + Unpin + Send,
    {
        self.tunnels.metrics.http_connections(1.0);
        let _gauge = ConnectionGauge(self.tunnels.clone());
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
        let tunnels = &self.tunnels;
        let (frontend, mut rx) = Frontend::new(tunnels.next_serial(), "http-connect", peer);
        let peer = &frontend.client;
        let random: i64 = rand::rng().random_range(1..i64::MAX);
        let backend = match tunnels.start_dial(&frontend, &target, random, self.backend_dial_timeout).await {
            Ok(b) => b,
            Err(DialStartError::NoAgent) => {
                // Byte for byte the reference's answer.
                let msg = format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: {}",
                    DialStartError::NoAgent.message()
                );
                let _ = io.write_all(msg.as_bytes()).await;
                let _ = io.shutdown().await;
                return;
            }
            Err(e) => {
                let status = match e {
                    DialStartError::Timeout => 504,
                    DialStartError::Denied(_) => 403,
                    _ => 502,
                };
                let body = format!("Failed to tunnel dial request: {}\r\n", e.message());
                let _ = write_response(&mut io, status, "text/plain; charset=utf-8", &[], &body).await;
                return;
            }
        };

        // Wait for the agent's answer, watching the client and the agent stream meanwhile.
        let deadline = self.backend_dial_timeout.map(|t| Instant::now() + t);
        let connect_id = loop {
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                packet = rx.recv() => {
                    let Some((_, packet)) = packet else { return tunnels.frontend_ended(&frontend, [random], CloseReason::FrontendEnded) };
                    match packet.kind() {
                        Ok(PacketKind::DialResponse(rsp)) if rsp.random == random => {
                            if rsp.error.is_empty() {
                                break rsp.connect_id;
                            }
                            let status = dial_error_status(&rsp.error);
                            let _ = write_response(&mut io, status, "text/plain; charset=utf-8", &[("Connection", "close")], &rsp.error).await;
                            return tunnels.frontend_ended(&frontend, [random], CloseReason::FrontendEnded);
                        }
                        Ok(PacketKind::CloseDial(_)) => return tunnels.frontend_ended(&frontend, [random], CloseReason::FrontendEnded),
                        _ => {}
                    }
                }
                read = io.read_buf(&mut early), if early.len() < MAX_EARLY_DATA => {
                    if matches!(read, Ok(0) | Err(_)) {
                        tracing::debug!(%peer, %target, "client left before its dial was answered");
                        return tunnels.frontend_ended(&frontend, [random], CloseReason::ClientClosed);
                    }
                }
                _ = backend.closed.cancelled() => {
                    let body = "Backend context error: context canceled\r\n";
                    let _ = write_response(&mut io, 502, "text/plain; charset=utf-8", &[], body).await;
                    return tunnels.frontend_ended(&frontend, [random], CloseReason::FrontendEnded);
                }
                _ = timer => {
                    let me = frontend.serial;
                    if let Some(dial) = tunnels.take_pending(random, |d| d.frontend.serial == me) {
                        tunnels.metrics.dial_failure(crate::metrics::DialFailureReason::BackendDialTimeout);
                        tunnels.audit_pending_failed(random, &dial, DialFailure::Timeout, BACKEND_DIAL_TIMEOUT);
                        backend.send_control(Packet::close_dial(random), tunnels);
                    }
                    let body = format!("Backend dial timeout: {BACKEND_DIAL_TIMEOUT}\r\n");
                    let _ = write_response(&mut io, 504, "text/plain; charset=utf-8", &[], &body).await;
                    return tunnels.frontend_ended(&frontend, [random], CloseReason::FrontendEnded);
                }
                _ = self.shutdown.cancelled() => return tunnels.frontend_ended(&frontend, [random], CloseReason::ServerShutdown),
            }
        };

        if io.write_all(CONNECTION_ESTABLISHED).await.is_err() {
            return tunnels.frontend_ended(&frontend, [random], CloseReason::ClientClosed);
        }
        tracing::debug!(%peer, %target, connect_id, "connection established");
        let link = frontend.link(backend.serial, connect_id);
        let io = Arc::new(Mutex::new(io));
        let (mut rd, mut wr) = (Shared(io.clone()), Shared(io));
        let to_agent = pipe_to_agent(&mut rd, early, &backend, connect_id, link, self.hangup_grace, tunnels);
        let to_client = async {
            while let Some((queued_at, packet)) = rx.recv().await {
                match &packet.payload {
                    Some(konnectivity_proto::packet::Payload::Data(d)) if d.connect_id == connect_id => {
                        if wr.write_all(&d.data).await.is_err() {
                            return;
                        }
                        frontend.on_sent(&packet, queued_at, tunnels);
                    }
                    Some(
                        konnectivity_proto::packet::Payload::CloseResponse(_)
                        | konnectivity_proto::packet::Payload::CloseDial(_),
                    ) => return,
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
            _ = frontend.closed.cancelled() => {
                tracing::debug!(connect_id, "connection stopped");
                CloseReason::FrontendEnded
            }
            _ = self.shutdown.cancelled() => CloseReason::ServerShutdown,
        };
        let _ = wr.shutdown().await;
        tunnels.frontend_ended(&frontend, [random], reason);
    }
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

/// Takes `need` units of the endpoint's credit for `connect_id`. While it waits, nothing reads the client's
/// socket, so the socket is watched for a hangup ([`konnectivity_transport::listen::SocketWatch::hung_up`],
/// made only once the wait has lasted [`WATCH_AFTER`]: an endpoint that is merely slower than the client makes
/// many short waits, none of which needs one); after one, the endpoint has `grace` to make room. `false`: no
/// credit will come (the connection is closing, or the grace passed).
async fn take_credit<IO: SocketFd>(
    window: &Semaphore,
    need: u32,
    client: &Shared<IO>,
    grace: Duration,
    connect_id: i64,
) -> bool {
    let acquire = window.acquire_many(need);
    tokio::pin!(acquire);
    let hung_up = async {
        tokio::time::sleep(WATCH_AFTER).await;
        let watch = client.io().watch();
        match watch {
            Some(w) => w.hung_up().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        permit = &mut acquire => return permit.map(SemaphorePermit::forget).is_ok(),
        _ = hung_up => {}
    }
    match tokio::time::timeout(grace, acquire).await {
        Ok(permit) => permit.map(SemaphorePermit::forget).is_ok(),
        Err(_) => {
            tracing::debug!(connect_id, "client hung up while the endpoint had read nothing for {grace:?}; closing");
            false
        }
    }
}

/// Forwards client bytes (first those that came with the head) as DATA, honouring the agent's credit. Returns
/// when the client has finished or gone, the agent is gone, or the client hung up while the endpoint took
/// nothing for the hangup grace.
async fn pipe_to_agent<IO: AsyncRead + SocketFd + Unpin>(
    rd: &mut Shared<IO>,
    early: BytesMut,
    backend: &Arc<Backend>,
    connect_id: i64,
    link: Option<Arc<crate::state::Link>>,
    hangup_grace: Duration,
    tunnels: &Tunnels,
) {
    let upload_window = link.as_ref().and_then(|l| l.upload_window.clone());
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
        if let Some(window) = &upload_window {
            let need = flow::cost(chunk.len());
            if window.available_permits() < need as usize {
                tunnels.metrics.flow_control_wait();
            }
            if !take_credit(window, need, rd, hangup_grace, connect_id).await {
                return;
            }
        }
        let len = chunk.len() as u64;
        if backend.send(Packet::data(connect_id, chunk), tunnels).await.is_err() {
            return;
        }
        if let Some(l) = &link {
            l.to_agent.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
        tunnels.metrics.bytes_to_agent(len as usize);
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
