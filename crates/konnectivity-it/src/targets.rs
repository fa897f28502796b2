//! Targets in the "cluster network": an HTTP server with a few routes and a TCP echo server. Both count their
//! open connections so tests can check that nothing is left behind.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The deterministic bytes `/bytes/N` serves: a repeating pattern that catches reordering and loss.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A running target.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Target {
    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct OpenGuard(Arc<AtomicUsize>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `handle` for every connection accepted on `bind` until the target is dropped, counting open
/// connections. Each handler gets the connection and the target's stop token.
async fn serve_each<F, Fut>(bind: &str, handle: F) -> std::io::Result<Target>
where
    F: Fn(tokio::net::TcpStream, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_listener(TcpListener::bind(bind).await?, handle)
}

/// Like `serve_each`, on a listener the caller bound (e.g. inside a network namespace).
pub fn serve_listener<F, Fut>(listener: TcpListener, handle: F) -> std::io::Result<Target>
where
    F: Fn(tokio::net::TcpStream, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let open = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (o, s) = (open.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = s.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            o.fetch_add(1, Ordering::SeqCst);
            let guard = OpenGuard(o.clone());
            let work = handle(tcp, s.clone());
            let s = s.clone();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    _ = work => {}
                    _ = s.cancelled() => {}
                }
            });
        }
    });
    Ok(Target { addr, open, stop })
}

/// Starts an HTTP/1.1 target on `bind` (e.g. "127.0.0.1:0" or "[::1]:0"). Routes:
/// `GET /success` → "success"; `GET /bytes/N` → N pattern bytes, streamed in 64 KiB chunks;
/// `POST /upload` → "<len> <sha256>" of the body; anything else → 404.
pub async fn http_target(bind: &str) -> std::io::Result<Target> {
    serve_each(bind, |tcp, _| async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(route))
            .await;
    })
    .await
}

/// The HTTP target of [`http_target`] on a listener the caller bound (e.g. inside a network namespace).
pub fn http_target_on(listener: TcpListener) -> std::io::Result<Target> {
    serve_listener(listener, |tcp, _| async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(route))
            .await;
    })
}

/// The echo target of [`echo_target`] on a listener the caller bound.
pub fn echo_target_on(listener: TcpListener) -> std::io::Result<Target> {
    serve_listener(listener, |mut tcp, _| async move {
        let (mut rd, mut wr) = tcp.split();
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
    })
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

async fn route(req: Request<Incoming>) -> Result<Response<BoxBody>, std::io::Error> {
    let path = req.uri().path().to_string();
    if req.method() == http::Method::POST && path == "/upload" {
        let mut hasher = Sha256::new();
        let mut len = 0usize;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                len += data.len();
                hasher.update(data);
            }
        }
        let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        return Ok(full(StatusCode::OK, format!("{len} {hex}")));
    }
    if path == "/success" {
        return Ok(full(StatusCode::OK, "success"));
    }
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        let chunk = 64 * 1024;
        let stream = futures_util::stream::iter((0..n).step_by(chunk).map(move |start| {
            let end = (start + chunk).min(n);
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(
                (start..end).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
            )))
        }));
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
        return Ok(r);
    }
    Ok(full(StatusCode::NOT_FOUND, "not found"))
}

/// Starts a TCP echo target on `bind`.
pub async fn echo_target(bind: &str) -> std::io::Result<Target> {
    serve_each(bind, |mut tcp, _| async move {
        let (mut rd, mut wr) = tcp.split();
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
    })
    .await
}

/// Starts a target that greets each connection with `banner` before reading anything (a server-first protocol
/// such as SSH or SMTP), then echoes.
pub async fn banner_target(bind: &str, banner: &'static [u8]) -> std::io::Result<Target> {
    serve_each(bind, move |mut tcp, _| async move {
        if tcp.write_all(banner).await.is_err() {
            return;
        }
        let (mut rd, mut wr) = tcp.split();
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
    })
    .await
}

/// A TCP load balancer on loopback, as an operator would put in front of several proxy-servers: each accepted
/// connection goes to the next backend in turn and bytes are copied both ways.
pub async fn tcp_balancer(backends: Vec<SocketAddr>) -> std::io::Result<Target> {
    tcp_balancer_over(Arc::new(std::sync::Mutex::new(backends))).await
}

/// Like [`tcp_balancer`], over a list of backends the test may change while it runs.
pub async fn tcp_balancer_over(backends: Arc<std::sync::Mutex<Vec<SocketAddr>>>) -> std::io::Result<Target> {
    let next = Arc::new(AtomicUsize::new(0));
    serve_each("127.0.0.1:0", move |mut client, _| {
        let backend = {
            let list = backends.lock().unwrap_or_else(|e| e.into_inner());
            list.get(next.fetch_add(1, Ordering::SeqCst) % list.len().max(1)).copied()
        };
        async move {
            let Some(backend) = backend else { return };
            let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else { return };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    })
    .await
}

/// Incremental SHA-256 over a stream, to check large transfers without holding them in memory.
#[derive(Default)]
pub struct StreamHash {
    hasher: Sha256,
    /// Bytes hashed so far.
    pub len: usize,
}

impl StreamHash {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len();
    }
    /// The hex digest.
    pub fn hex(self) -> String {
        self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// SHA-256 of `pattern(len)`, computed in chunks.
pub fn pattern_sha256(len: usize) -> String {
    let mut h = StreamHash::default();
    let mut start = 0;
    while start < len {
        let end = (start + (1 << 20)).min(len);
        let chunk: Vec<u8> = (start..end).map(|i| (i % 251) as u8).collect();
        h.update(&chunk);
        start = end;
    }
    h.hex()
}

/// A loopback port that refuses connections for as long as this value lives: its socket is bound but never
/// listens, so no other test can take the port meanwhile (dropping a listener to make a "closed port" races
/// with tests that bind in parallel).
pub struct ClosedPort {
    _socket: socket2::Socket,
    /// The refusing address.
    pub addr: SocketAddr,
}

/// Reserves a refusing loopback port.
pub fn closed_port() -> std::io::Result<ClosedPort> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let addr = socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an inet address"))?;
    Ok(ClosedPort { _socket: socket, addr })
}
