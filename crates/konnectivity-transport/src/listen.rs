//! Listeners: Unix sockets with the reference's permissions, and TLS over TCP where every handshake runs in its
//! own task with a timeout, so one slow or hostile client never holds up the accept loop.

use crate::tls::ALPN_H2;
use crate::tls_reload::LiveConfig;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The Unix socket path exists and may not be deleted.
    #[error("unix socket {0} already exists (and --delete-existing-uds-file=false)")]
    SocketExists(PathBuf),
    /// Removing, binding or chmod-ing the socket failed.
    #[error("unix socket {path}: {cause}")]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// The underlying error (printed in the message).
        cause: io::Error,
    },
    /// Binding a TCP address failed.
    #[error("listen on {addr}: {cause}")]
    Tcp {
        /// The address.
        addr: String,
        /// The underlying error (printed in the message).
        cause: io::Error,
    },
}

/// Binds a Unix socket as the reference does: an existing file is removed first when `delete_existing` is
/// set, and the socket is made group-accessible (mode 0770) so kube-apiserver in the same group can use it.
///
/// The socket is never reachable with wider permissions, not even for an instant: it is bound inside a fresh
/// directory only the owner can enter (mode 0700, next to the final path), given its mode there, and only then
/// renamed into place. (A umask would do it too, but the umask is the whole process's.)
pub fn bind_uds(path: &Path, delete_existing: bool) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let unix = |cause| ListenError::Unix { path: path.into(), cause };
    if path.exists() || path.symlink_metadata().is_ok() {
        if !delete_existing {
            return Err(ListenError::SocketExists(path.into()));
        }
        std::fs::remove_file(path).map_err(unix)?;
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| unix(io::Error::other("the socket path has no file name")))?;
    let private = parent.join(format!(".{}.{}.bind", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(unix)?;
    let staged = private.join("socket");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o770))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(unix)
}

/// Binds a TCP listener on `bind:port`; an empty bind address means all interfaces (IPv6 and IPv4).
pub async fn bind_tcp(bind: &str, port: u16) -> Result<TcpListener, ListenError> {
    let addr = join_host_port(if bind.is_empty() { "::" } else { bind }, port);
    match TcpListener::bind(&addr).await {
        Ok(l) => Ok(l),
        // A host without IPv6 cannot bind "::"; fall back to IPv4 for the all-interfaces case.
        Err(_) if bind.is_empty() => {
            let v4 = join_host_port("0.0.0.0", port);
            TcpListener::bind(&v4).await.map_err(|cause| ListenError::Tcp { addr: v4, cause })
        }
        Err(cause) => Err(ListenError::Tcp { addr, cause }),
    }
}

/// Joins a host and a port, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// What a TLS connection's peer presented, available to gRPC handlers through the request extensions.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    /// The client's TCP address.
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, if it sent one.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Cancelled as soon as the connection reads EOF or fails, or is dropped. The HTTP/2 layer does not
    /// always tell a stream's handler promptly that its connection died; this does.
    pub transport_closed: CancellationToken,
    /// Cancelling it fails every later read and write of the connection, which closes it: for a connection
    /// the server has found dead (no FIN or RST will come), so that its socket is released now, not when TCP
    /// gives up.
    pub abort: CancellationToken,
}

/// An accepted, handshaken TLS connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: TlsConnectInfo,
    aborted: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl TlsConn {
    fn new(
        inner: TlsStream<TcpStream>,
        remote_addr: SocketAddr,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Self {
        let abort = CancellationToken::new();
        let aborted = Box::pin(abort.clone().cancelled_owned());
        Self {
            inner,
            info: TlsConnectInfo { remote_addr, peer_certs, transport_closed: CancellationToken::new(), abort },
            aborted,
        }
    }

    /// An error once [`TlsConnectInfo::abort`] was cancelled (registering the task to be woken then).
    fn poll_aborted(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.aborted.as_mut().poll(cx).is_ready().then(|| {
            self.info.transport_closed.cancel();
            io::Error::new(io::ErrorKind::ConnectionAborted, "connection aborted by the server")
        })
    }

    /// What the peer presented.
    pub fn info(&self) -> &TlsConnectInfo {
        &self.info
    }

    /// The ALPN protocol the handshake settled on.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.inner.get_ref().1.alpn_protocol()
    }
}

/// A stream connection whose socket can be watched for its peer hanging up while nobody reads it (the HTTP
/// CONNECT frontend does, when an upload waits for an endpoint that does not read).
pub trait SocketFd {
    /// A second handle on the connection's socket, for [`SocketWatch::hung_up`]; `None` if it cannot be made.
    fn watch(&self) -> Option<SocketWatch>;
}

/// A duplicate descriptor of a connection's socket, registered for readiness only. Dropping it closes only the
/// duplicate: the connection is untouched.
pub enum SocketWatch {
    /// A TCP (or TLS over TCP) connection's socket.
    Tcp(TcpStream),
    /// A Unix socket connection's.
    Unix(tokio::net::UnixStream),
}

impl SocketWatch {
    fn tcp(socket: &TcpStream) -> Option<Self> {
        use std::os::fd::AsFd;
        let dup = std::net::TcpStream::from(socket.as_fd().try_clone_to_owned().ok()?);
        // Non-blocking is a property of the shared file description: already set.
        TcpStream::from_std(dup).ok().map(Self::Tcp)
    }

    fn unix(socket: &tokio::net::UnixStream) -> Option<Self> {
        use std::os::fd::AsFd;
        let dup = std::os::unix::net::UnixStream::from(socket.as_fd().try_clone_to_owned().ok()?);
        tokio::net::UnixStream::from_std(dup).ok().map(Self::Unix)
    }

    /// Resolves once the peer has shut down its sending side or the connection failed (EPOLLRDHUP, EPOLLHUP),
    /// which the kernel reports even while unread bytes are queued ahead of the FIN, where a read would have to
    /// take those bytes first. Never resolves if the socket cannot be watched.
    pub async fn hung_up(&self) {
        use tokio::io::Interest;
        loop {
            let ready = match self {
                Self::Tcp(s) => s.ready(Interest::READABLE).await,
                Self::Unix(s) => s.ready(Interest::READABLE).await,
            };
            match ready {
                Ok(r) if r.is_read_closed() => return,
                Ok(_) => {
                    // Plain readability (bytes queued): clear it without reading, and wait for the next event.
                    let clear = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
                    let _ = match self {
                        Self::Tcp(s) => s.try_io(Interest::READABLE, clear),
                        Self::Unix(s) => s.try_io(Interest::READABLE, clear),
                    };
                }
                Err(_) => return std::future::pending().await,
            }
        }
    }
}

impl SocketFd for TlsConn {
    fn watch(&self) -> Option<SocketWatch> {
        SocketWatch::tcp(self.inner.get_ref().0)
    }
}

impl SocketFd for tokio::net::UnixStream {
    fn watch(&self) -> Option<SocketWatch> {
        SocketWatch::unix(self)
    }
}

impl SocketFd for TcpStream {
    fn watch(&self) -> Option<SocketWatch> {
        SocketWatch::tcp(self)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.poll_aborted(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.info.transport_closed.cancel()
            }
            Poll::Ready(Err(_)) => self.info.transport_closed.cancel(),
            _ => {}
        }
        r
    }
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.info.transport_closed.cancel();
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.poll_aborted(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.poll_aborted(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Sets the socket options every tunnel socket wants: no Nagle delay (the tunnel already batches), and TCP
/// keepalive so a peer that vanished without a FIN is eventually noticed.
pub fn tune_tcp(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&keepalive);
}

/// Called with a short reason (`timeout`, `no_certificate`, `bad_certificate`, `alpn`, `alert`, `protocol`,
/// `io`, `source_limit`) for every failed handshake, to count them.
pub type HandshakeFailureHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A short, bounded label for why a TLS handshake failed.
pub fn handshake_failure_reason(e: &io::Error) -> &'static str {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
        Some(rustls::Error::NoApplicationProtocol) => "alpn",
        Some(rustls::Error::AlertReceived(_)) => "alert",
        Some(_) => "protocol",
        None => "io",
    }
}

/// Why one handshake failed.
struct HandshakeFailure {
    reason: &'static str,
    message: String,
}

/// The ALPN protocols a client offered, for messages: `["foo", "h2"]`, or `none`.
fn show_alpn(offered: &Option<Vec<Vec<u8>>>) -> String {
    match offered {
        None => "none".into(),
        Some(list) => format!("{:?}", list.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>()),
    }
}

/// Runs the server side of one TLS handshake with the listener's configuration of the moment.
///
/// A listener that offers `h2` serves gRPC, and grpc-go (the reference) refuses a client that negotiates no ALPN
/// protocol there; so does this. A client whose ALPN list lacks every protocol of the listener is refused by
/// rustls with a `no_application_protocol` alert, as Go does.
async fn handshake(
    tcp: TcpStream,
    config: &LiveConfig<ServerConfig>,
) -> Result<TlsStream<TcpStream>, HandshakeFailure> {
    let io_failure = |e: io::Error, offered: &Option<Vec<Vec<u8>>>, ours: &[Vec<u8>]| {
        let reason = handshake_failure_reason(&e);
        let message = if reason == "alpn" {
            format!(
                "client offered ALPN protocols {}, none of which this listener speaks ({})",
                show_alpn(offered),
                show_alpn(&Some(ours.to_vec()))
            )
        } else {
            e.to_string()
        };
        HandshakeFailure { reason, message }
    };
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| io_failure(e, &None, &[]))?;
    let offered: Option<Vec<Vec<u8>>> = start.client_hello().alpn().map(|list| list.map(<[u8]>::to_vec).collect());
    let config = config.current();
    let needs_alpn = config.alpn_protocols.iter().any(|p| p == ALPN_H2);
    let ours = config.alpn_protocols.clone();
    let mut tls = start.into_stream(config).await.map_err(|e| io_failure(e, &offered, &ours))?;
    if needs_alpn && tls.get_ref().1.alpn_protocol().is_none() {
        // A close_notify first, as Go sends: the client sees a clean close rather than only a reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut tls)).await;
        return Err(HandshakeFailure {
            reason: "alpn",
            message: format!(
                "client negotiated no ALPN protocol (offered {}); gRPC over TLS needs h2",
                show_alpn(&offered)
            ),
        });
    }
    Ok(tls)
}

/// How a TLS listener accepts.
pub struct TlsAccept {
    /// The listener's name, in logs.
    pub what: &'static str,
    /// Told about every failed handshake (to count them).
    pub on_failure: Option<HandshakeFailureHook>,
    /// Handshakes in progress at most; the rest wait in the listen backlog.
    pub max_handshakes: usize,
    /// Handshakes in progress from one IP address at most; beyond it its new connections are closed at once.
    pub max_per_source: usize,
}

impl TlsAccept {
    /// A listener named `what`, nothing counted, [`DEFAULT_MAX_HANDSHAKES`] handshakes at once.
    pub fn named(what: &'static str) -> Self {
        Self {
            what,
            on_failure: None,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        }
    }
}

/// Default bound on a listener's TLS handshakes in progress from one IP address. Agents behind one NAT or a
/// load balancer that hides their addresses share it: a reconnect storm through it is slowed (they retry), not
/// refused for good.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 128;

/// Handshakes in progress per source address.
#[derive(Default)]
struct SourceCounts(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// A handshake's place in its source's count, given back when dropped.
struct SourceSlot {
    counts: Arc<SourceCounts>,
    ip: std::net::IpAddr,
}

impl SourceCounts {
    fn counts(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for `ip`, unless it holds `max` already.
    fn enter(self: Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<SourceSlot> {
        let mut counts = self.counts();
        let n = counts.entry(ip).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        drop(counts);
        Some(SourceSlot { counts: self, ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Default bound on a listener's TLS handshakes in progress. A handshake costs a task, a socket and some CPU;
/// clients beyond it wait in the backlog instead of starving the server of descriptors and time.
pub const DEFAULT_MAX_HANDSHAKES: usize = 512;

/// Accepts TCP connections and hands out handshaken TLS connections as a stream (for tonic's
/// `serve_with_incoming`). Each handshake uses the configuration `config` holds at that moment, so a reloaded
/// certificate applies to new connections only. Handshakes run in tasks tracked by `tracker`; failures are
/// logged with the peer and reason, reported to `accept.on_failure`, and harm nothing else; at most
/// `accept.max_handshakes` run at once. The stream ends when `shutdown` is cancelled.
pub fn tls_incoming(
    listener: TcpListener,
    config: impl Into<LiveConfig<ServerConfig>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    accept: TlsAccept,
) -> ReceiverStream<io::Result<TlsConn>> {
    let TlsAccept { what, on_failure, max_handshakes, max_per_source } = accept;
    let handshakes = Arc::new(tokio::sync::Semaphore::new(max_handshakes.max(1)));
    let (tx, rx) = mpsc::channel(64);
    let config = config.into();
    let accept_tracker = tracker.clone();
    tracker.spawn(async move {
        let mut backoff = Duration::from_millis(5);
        let sources = Arc::new(SourceCounts::default());
        loop {
            // At most `max_handshakes` at once: beyond it the loop accepts nothing more until one finishes, and
            // new connections wait in the listen backlog.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => { backoff = Duration::from_millis(5); a }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning, and keep serving.
                        tracing::warn!(listener = what, "accept failed: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            // And at most `max_per_source` of them from one address: one client cannot take every slot.
            let Some(source) = sources.clone().enter(peer.ip(), max_per_source) else {
                tracing::debug!(listener = what, %peer, "too many TLS handshakes from this address; connection closed");
                if let Some(hook) = &on_failure {
                    hook("source_limit");
                }
                continue;
            };
            tune_tcp(&tcp);
            let config = config.clone();
            let tx = tx.clone();
            let shutdown = shutdown.clone();
            let on_failure = on_failure.clone();
            accept_tracker.spawn(async move {
                let _permit = (permit, source);
                let tls = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, &config)) => match r {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(failure)) => {
                            tracing::warn!(listener = what, %peer, reason = failure.reason, "TLS handshake failed: {}", failure.message);
                            if let Some(hook) = &on_failure {
                                hook(failure.reason);
                            }
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(listener = what, %peer, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                            if let Some(hook) = &on_failure {
                                hook("timeout");
                            }
                            return;
                        }
                    },
                };
                let peer_certs = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                let conn = TlsConn::new(tls, peer, peer_certs);
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
