//! Light simulated agents: each is one real mTLS connection with one real `/AgentService/Connect` stream, as a
//! proxy-agent holds, and serves the dials a server sends it by really dialing and relaying, but without an
//! agent's process, metrics or health ports, so that thousands fit in the bench process.
//!
//! Every agent connects from its own loopback source address (127.x.y.z), as agents on different nodes would,
//! so per-source limits on the server see what they would see in a cluster. With several servers, each dial goes
//! to one at random (as through a load balancer) and an agent keeps dialing until it holds as many distinct
//! servers as it wants, closing a second stream to a server it already holds, as an agent does with
//! `servercount`. A lost stream is redialed with exponential backoff and full jitter (first wait up to 1 s, cap
//! 10 s), like an agent's sync loop.

use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use konnectivity_proto::agent::AgentServiceClient;
use konnectivity_proto::names::{AGENT_ID, SERVER_ID};
use konnectivity_proto::{Packet, PacketKind};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// A fleet of simulated agents and what it knows about them.
pub struct Fleet {
    /// Streams whose response headers arrived and that have not ended.
    pub connected: Arc<AtomicUsize>,
    /// Agents that hold a stream to as many distinct servers as they want.
    pub complete: Arc<AtomicUsize>,
    /// Stream attempts that failed (connect, TLS, headers).
    pub failures: Arc<AtomicUsize>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Where the agents connect and how.
#[derive(Clone)]
pub struct Dial {
    /// The servers' agent ports; each attempt picks one at random, as a load balancer in front of them would.
    pub servers: Vec<SocketAddr>,
    /// mTLS with an agent certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// Distinct servers each agent holds a stream to (the servers' count; 1 for a single server).
    pub want: usize,
}

impl Fleet {
    /// Starts `n` agents, at most `concurrency` connecting at once.
    pub fn start(n: usize, dial: Dial, concurrency: usize) -> Self {
        let connected = Arc::new(AtomicUsize::new(0));
        let complete = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        for i in 0..n {
            let agent = SimAgent {
                id: format!("sim-agent-{i}"),
                source: source_address(i),
                dial: dial.clone(),
                connected: connected.clone(),
                complete: complete.clone(),
                failures: failures.clone(),
            };
            tracker.spawn(agent.run(stop.clone(), gate.clone()));
        }
        Self { connected, complete, failures, stop, tracker }
    }

    /// Ends every agent's streams and waits for their tasks.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// 127.x.y.z from 127.1.0.2 upwards: distinct for the first 64,000 agents.
fn source_address(i: usize) -> IpAddr {
    let (hi, lo) = ((i / 250) % 256, i % 250 + 2);
    IpAddr::V4(Ipv4Addr::new(127, 1 + (i / 64_000) as u8, hi as u8, lo as u8))
}

struct SimAgent {
    id: String,
    source: IpAddr,
    dial: Dial,
    connected: Arc<AtomicUsize>,
    complete: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
}

/// Counts one while alive.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream whose response headers arrived.
struct Opened {
    server_id: String,
    tx: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
}

/// The server IDs an agent holds a stream to; a stream's task removes its own when it ends.
type Held = Arc<parking_lot::Mutex<std::collections::HashSet<String>>>;

impl SimAgent {
    /// Keeps a stream to `want` distinct servers: dials (a random server each time) until it has them, and again
    /// when one ends, with an agent's backoff.
    async fn run(self, stop: CancellationToken, gate: Arc<tokio::sync::Semaphore>) {
        let held: Held = Default::default();
        let ended = Arc::new(tokio::sync::Notify::new());
        let sessions = TaskTracker::new();
        let mut bound = BACKOFF_FIRST;
        let mut complete: Option<Counted> = None;
        loop {
            if held.lock().len() >= self.dial.want {
                complete.get_or_insert_with(|| Counted::new(&self.complete));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ended.notified() => {}
                }
                complete = None;
                // A stream ended: redial after a first backoff step, as an agent does.
                if !pause(BACKOFF_FIRST.mul_f64(rand::random::<f64>()), &stop).await {
                    break;
                }
                continue;
            }
            let permit = gate.clone().acquire_owned().await;
            let opened = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.open() => r,
            };
            drop(permit);
            match opened {
                Ok(opened) => {
                    bound = BACKOFF_FIRST;
                    if held.lock().insert(opened.server_id.clone()) {
                        let (held, ended, connected) = (held.clone(), ended.clone(), self.connected.clone());
                        let stop = stop.clone();
                        sessions.spawn(async move {
                            let _live = Counted::new(&connected);
                            let server_id = opened.server_id.clone();
                            serve(opened, &stop).await;
                            held.lock().remove(&server_id);
                            ended.notify_one();
                        });
                    } else if !pause(Duration::from_millis(200).mul_f64(rand::random::<f64>()), &stop).await {
                        // A server already held: this stream is dropped (closed) and another dial made soon.
                        break;
                    }
                }
                Err(_) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let wait = bound.mul_f64(rand::random::<f64>());
                    bound = (bound * 2).min(BACKOFF_CAP);
                    if !pause(wait, &stop).await {
                        break;
                    }
                }
            }
        }
        drop(complete);
        sessions.close();
        sessions.wait().await;
    }

    /// Opens one stream to a random server and waits for its response headers.
    async fn open(&self) -> anyhow::Result<Opened> {
        let tls = tokio_rustls::TlsConnector::from(self.dial.tls.clone());
        let server = self.dial.servers[rand::random_range(0..self.dial.servers.len())];
        let source = self.source;
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                let tcp = socket.connect(server).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::IpAddress(server.ip().into());
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(connector)
            .await?;
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<Packet>(64);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(AGENT_ID, self.id.parse()?);
        let response = tokio::time::timeout(Duration::from_secs(30), client.connect(request)).await??;
        let server_id =
            response.metadata().get(SERVER_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        Ok(Opened { server_id, tx, inbound: response.into_inner() })
    }
}

/// Sleeps `wait`; false if `stop` came first.
async fn pause(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Serves one stream's dials until it ends or `stop`.
async fn serve(opened: Opened, stop: &CancellationToken) {
    let Opened { tx, mut inbound, .. } = opened;
    let conns: Arc<parking_lot::Mutex<HashMap<i64, mpsc::Sender<Bytes>>>> = Default::default();
    let next_id = Arc::new(AtomicI64::new(1));
    let tasks = TaskTracker::new();
    let ended = stop.child_token();
    let _end = ended.clone().drop_guard();
    while let Some(Ok(packet)) = tokio::select! {
        p = inbound.next() => p,
        _ = stop.cancelled() => None,
    } {
        match packet.kind() {
            Ok(PacketKind::DialRequest(req)) => {
                let (tx, conns, next_id) = (tx.clone(), conns.clone(), next_id.clone());
                tasks.spawn(serve_dial(req.address, req.random, tx, conns, next_id, ended.clone()));
            }
            Ok(PacketKind::Data(data)) => {
                let to = conns.lock().get(&data.connect_id).cloned();
                match to {
                    Some(to) => {
                        let _ = to.send(data.data).await;
                    }
                    None => {
                        let _ = tx.send(Packet::close_response(data.connect_id, "unknown connection")).await;
                    }
                }
            }
            Ok(PacketKind::CloseRequest(req)) => {
                conns.lock().remove(&req.connect_id);
                let _ = tx.send(Packet::close_response(req.connect_id, "")).await;
            }
            _ => {}
        }
    }
    ended.cancel();
    tasks.close();
    tasks.wait().await;
}

/// Dials `address` for one DIAL_REQ and relays until either side ends.
async fn serve_dial(
    address: String,
    random: i64,
    tx: mpsc::Sender<Packet>,
    conns: Arc<parking_lot::Mutex<HashMap<i64, mpsc::Sender<Bytes>>>>,
    next_id: Arc<AtomicI64>,
    ended: CancellationToken,
) {
    let tcp = match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let _ = tx.send(Packet::dial_response(random, 0, e.to_string())).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Packet::dial_response(random, 0, "dial timeout")).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let (to_endpoint, mut from_server) = mpsc::channel::<Bytes>(16);
    conns.lock().insert(id, to_endpoint);
    if tx.send(Packet::dial_response(random, id, "")).await.is_err() {
        conns.lock().remove(&id);
        return;
    }
    let (mut rd, mut wr) = tcp.into_split();
    let upload = async {
        while let Some(chunk) = from_server.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let download = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Packet::data(id, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = upload => {}
        _ = download => {}
        _ = ended.cancelled() => {}
    }
    if conns.lock().remove(&id).is_some() {
        let _ = tx.send(Packet::close_response(id, "")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_loopback_addresses() {
        let all: std::collections::HashSet<_> = (0..10_000).map(source_address).collect();
        assert_eq!(all.len(), 10_000);
        assert!(all.iter().all(|a| a.is_loopback()));
    }
}
