//! Light simulated agents: each is one real mTLS connection with one real `/AgentService/Connect` stream, as a
//! proxy-agent holds, and serves the dials a server sends it by really dialing and relaying, but without an
//! agent's process, metrics or health ports, so that thousands fit in the bench process.
//!
//! Every agent connects from its own loopback source address (127.x.y.z), as agents on different nodes would,
//! so per-source limits on the server see what they would see in a cluster. A lost stream is redialed with
//! exponential backoff and full jitter (first wait up to 1 s, cap 10 s), like an agent's sync loop.

use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use konnectivity_proto::agent::AgentServiceClient;
use konnectivity_proto::names::AGENT_ID;
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
    /// Stream attempts that failed (connect, TLS, headers).
    pub failures: Arc<AtomicUsize>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Where the agents connect and how.
#[derive(Clone)]
pub struct Dial {
    /// The server's agent port.
    pub server: SocketAddr,
    /// mTLS with an agent certificate.
    pub tls: Arc<rustls::ClientConfig>,
}

impl Fleet {
    /// Starts `n` agents, at most `concurrency` connecting at once at first.
    pub fn start(n: usize, dial: Dial, concurrency: usize) -> Self {
        let connected = Arc::new(AtomicUsize::new(0));
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
                failures: failures.clone(),
            };
            tracker.spawn(agent.run(stop.clone(), gate.clone()));
        }
        Self { connected, failures, stop, tracker }
    }

    /// Ends every agent's stream and waits for their tasks.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// 127.0.x.y from 127.0.0.2 upwards (x: 0–255, y: 2–251): distinct for the first 64,000 agents.
fn source_address(i: usize) -> IpAddr {
    let (hi, lo) = ((i / 250) % 256, i % 250 + 2);
    IpAddr::V4(Ipv4Addr::new(127, 1 + (i / 64_000) as u8, hi as u8, lo as u8))
}

struct SimAgent {
    id: String,
    source: IpAddr,
    dial: Dial,
    connected: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
}

/// Counts a connected stream while alive.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SimAgent {
    async fn run(self, stop: CancellationToken, gate: Arc<tokio::sync::Semaphore>) {
        let mut bound = BACKOFF_FIRST;
        loop {
            let permit = gate.clone().acquire_owned().await;
            let ended = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.session(permit.ok(), &stop) => r,
            };
            match ended {
                Ok(()) => bound = BACKOFF_FIRST,
                Err(_) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            let wait = bound.mul_f64(rand::random::<f64>());
            bound = (bound * 2).min(BACKOFF_CAP);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One stream: `Err` if it never got going, `Ok` when an established stream ended.
    async fn session(
        &self,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let tls = tokio_rustls::TlsConnector::from(self.dial.tls.clone());
        let (server, source) = (self.dial.server, self.source);
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
        drop(permit);
        self.connected.fetch_add(1, Ordering::Relaxed);
        let _live = Live(self.connected.clone());
        let mut inbound = response.into_inner();
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
        Ok(())
    }
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
