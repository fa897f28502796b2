//! Test support for fuzzing and property tests: drives the agent's real receive loop for one server stream
//! ([`crate::session::Session::serve`]) with packets from a fake server, without gRPC, against real endpoints on
//! loopback: an echo server, a server that accepts and never reads, one that accepts and closes at once, and a
//! closed port. Addresses are never taken from the input: every dial goes to one of these (or to an address that
//! fails before any lookup), so a scenario never resolves a name or leaves the machine.
//!
//! After every step [`Harness::check`] asserts bounds (connections and dials in flight never exceed what the
//! input could create, connection IDs are never reused); [`Harness::finish`] closes every connection, ends the
//! stream and asserts that no dial, connection, task or endpoint socket is left.
//!
//! Not part of the agent's API: compiled for this crate's tests and with the `fuzzing` feature (the `fuzz/`
//! crate's `agent_session` target).

// Test support: a broken invariant or harness set-up is a test failure, reported by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The harness awaits the one session task it spawns itself (its JoinHandle), so it needs no tracker.
#![allow(clippy::disallowed_methods)]

use crate::metrics::AgentMetrics;
use crate::session::Session;
use bytes::Bytes;
use konnectivity_proto::{Packet, PacketKind, packet};
use prost::Message;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// The largest DATA payload a scenario sends.
const MAX_DATA: usize = 64 * 1024;

/// Where a dial goes.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum Target {
    /// A listener that echoes what it reads.
    Echo,
    /// A listener that accepts and never reads.
    Silent,
    /// A listener that accepts and closes at once.
    Hangup,
    /// A loopback port nobody listens on.
    Closed,
    /// An address without a port.
    NoPort,
    /// An address with a port out of range.
    BadPort,
    /// A protocol other than TCP.
    Udp,
}

/// One step of a scenario. `conn` picks among the connection IDs the agent announced (modulo their count).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum Op {
    /// DIAL_REQ.
    Dial {
        /// Where.
        target: Target,
        /// The dial ID, modulo 8 (so that they collide).
        random: u8,
    },
    /// DATA on an announced connection.
    Data {
        /// Which.
        conn: u8,
        /// Length, times 16.
        len: u16,
    },
    /// CLOSE_REQ for an announced connection.
    Close {
        /// Which.
        conn: u8,
    },
    /// DIAL_CLS.
    CancelDial {
        /// The dial ID, modulo 8.
        random: u8,
    },
    /// Flow-control credit for an announced connection.
    Window {
        /// Which.
        conn: u8,
        /// Credit.
        credit: u32,
    },
    /// Any packet, built from parts; connection and dial IDs from a small range (unknown ones included).
    Raw {
        /// The `type` field.
        kind: i8,
        /// Which payload (0 none, 1..=7 in field order).
        payload: u8,
        /// Dial or connection ID.
        id: i8,
        /// DATA length.
        len: u8,
        /// DATA window update.
        window: u32,
    },
    /// Protobuf bytes (skipped unless they decode; a DIAL_REQ's address is replaced by a local one).
    Bytes(Vec<u8>),
    /// Whether the fake server takes what the agent sends.
    Reading {
        /// Reading or not.
        on: bool,
    },
    /// The agent starts draining.
    Drain,
    /// The agent closes everything (as its drain timeout does).
    CloseAll,
    /// Time passes (real time: at most 25 ms).
    Sleep {
        /// Milliseconds, modulo 26.
        millis: u8,
    },
}

/// Runs a scenario on a fresh runtime: every step with a check after it, then [`Harness::finish`]. Panics on
/// any violation.
pub fn run(ops: &[Op], flow_control: bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let mut harness = Harness::new(flow_control).await;
        for op in ops {
            harness.step(op).await;
            harness.check();
        }
        harness.finish().await;
    });
}

/// The endpoints a scenario dials.
struct Endpoints {
    echo: SocketAddr,
    silent: SocketAddr,
    hangup: SocketAddr,
    closed: SocketAddr,
    /// Echo connections open now.
    echo_open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Endpoints {
    async fn start(tracker: &TaskTracker) -> Self {
        let stop = CancellationToken::new();
        let echo_open = Arc::new(AtomicUsize::new(0));
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hangup = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let addrs = (echo.local_addr(), silent.local_addr(), hangup.local_addr());
        let (s, open) = (stop.clone(), echo_open.clone());
        let conns = tracker.clone();
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = echo.accept() => a,
                };
                let Ok((mut tcp, _)) = accepted else { continue };
                open.fetch_add(1, Ordering::SeqCst);
                let (open, s) = (open.clone(), s.clone());
                conns.spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = tokio::select! {
                            _ = s.cancelled() => break,
                            r = tcp.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                        };
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let s = stop.clone();
        tracker.spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    a = silent.accept() => if let Ok((tcp, _)) = a { held.push(tcp) },
                    a = hangup.accept() => drop(a),
                }
            }
        });
        Self {
            echo: addrs.0.expect("addr"),
            silent: addrs.1.expect("addr"),
            hangup: addrs.2.expect("addr"),
            closed,
            echo_open,
            stop,
        }
    }

    /// The DIAL_REQ for `target`, and whether it can connect.
    fn dial(&self, target: Target, random: i64) -> (Packet, bool) {
        let (address, ok) = match target {
            Target::Echo => (self.echo.to_string(), true),
            Target::Silent => (self.silent.to_string(), true),
            Target::Hangup => (self.hangup.to_string(), true),
            Target::Closed => (self.closed.to_string(), false),
            Target::NoPort => ("127.0.0.1".to_string(), false),
            Target::BadPort => ("127.0.0.1:99999".to_string(), false),
            Target::Udp => {
                let mut p = Packet::dial_request(self.echo.to_string(), random);
                if let Some(packet::Payload::DialRequest(d)) = &mut p.payload {
                    d.protocol = "udp".into();
                }
                return (p, false);
            }
        };
        (Packet::dial_request(address, random), ok)
    }
}

/// One agent session with a fake server around it.
pub struct Harness {
    session: Arc<Session>,
    endpoints: Endpoints,
    tracker: TaskTracker,
    endpoint_tracker: TaskTracker,
    inbound: Option<mpsc::UnboundedSender<Result<Packet, Status>>>,
    outbound: mpsc::Receiver<Packet>,
    drain: CancellationToken,
    reading: bool,
    metrics: AgentMetrics,
    serve: tokio::task::JoinHandle<()>,
    /// DIAL_REQs sent, and those to a listener (which may connect).
    dials: usize,
    connectable: usize,
    /// Dial IDs sent, and the successful answers' connection IDs (each at most once).
    randoms: HashSet<i64>,
    announced: Vec<i64>,
    answered: usize,
}

impl Harness {
    /// A session (with or without flow control) and its endpoints. Call inside a tokio runtime.
    pub async fn new(flow_control: bool) -> Self {
        let tracker = TaskTracker::new();
        let endpoint_tracker = TaskTracker::new();
        let endpoints = Endpoints::start(&endpoint_tracker).await;
        let mut config = crate::AgentConfig::new("127.0.0.1", 1, "unused-ca.crt".into());
        config.dial_timeout = Duration::from_secs(2);
        let metrics = AgentMetrics::new().expect("metrics");
        let (to_server, outbound) = mpsc::channel(64);
        let session = Session::new(
            "fuzz-server".into(),
            "127.0.0.1:1".into(),
            crate::session::Outbound { to_server, end: CancellationToken::new() },
            CancellationToken::new(),
            metrics.clone(),
            &config,
            flow_control,
            Default::default(),
            tracker.clone(),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let drain = CancellationToken::new();
        let serve = tokio::spawn(session.clone().serve(
            UnboundedReceiverStream::new(rx),
            drain.clone(),
            CancellationToken::new(),
        ));
        Self {
            session,
            endpoints,
            tracker,
            endpoint_tracker,
            inbound: Some(tx),
            outbound,
            drain,
            reading: true,
            metrics,
            serve,
            dials: 0,
            connectable: 0,
            randoms: HashSet::new(),
            announced: Vec::new(),
            answered: 0,
        }
    }

    fn send(&mut self, packet: Packet) {
        if let Some(tx) = &self.inbound {
            let _ = tx.send(Ok(packet));
        }
    }

    fn conn(&self, index: u8) -> Option<i64> {
        (!self.announced.is_empty()).then(|| self.announced[usize::from(index) % self.announced.len()])
    }

    fn dial(&mut self, target: Target, random: i64) {
        let (packet, connectable) = self.endpoints.dial(target, random);
        self.dials += 1;
        self.connectable += usize::from(connectable);
        self.randoms.insert(random);
        self.send(packet);
    }

    /// Applies one step, then lets the agent work on it for a moment.
    pub async fn step(&mut self, op: &Op) {
        match *op {
            Op::Dial { target, random } => {
                let random = i64::from(random % 8);
                self.dial(target, random);
                // Give the dial (on loopback: microseconds) a chance to be answered before the next step.
                let answered = self.answered;
                let deadline = Instant::now() + Duration::from_millis(100);
                while self.reading && self.answered == answered && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    self.pump();
                }
            }
            Op::Data { conn, len } => {
                let Some(id) = self.conn(conn) else { return };
                let len = (usize::from(len) * 16).min(MAX_DATA);
                self.send(Packet::data(id, Bytes::from(vec![0x42; len])));
            }
            Op::Close { conn } => {
                if let Some(id) = self.conn(conn) {
                    self.send(Packet::close_request(id));
                }
            }
            Op::CancelDial { random } => self.send(Packet::close_dial(i64::from(random % 8))),
            Op::Window { conn, credit } => {
                if let Some(id) = self.conn(conn) {
                    self.send(Packet::window_update(id, credit.max(1)));
                }
            }
            Op::Raw { kind, payload, id, len, window } => {
                let id = i64::from(id);
                let payload = match payload % 8 {
                    0 => None,
                    1 => {
                        // A dial goes where the harness says, never where the input says.
                        self.dial(Target::Closed, id);
                        return;
                    }
                    2 => Some(packet::Payload::DialResponse(konnectivity_proto::DialResponse {
                        error: String::new(),
                        connect_id: id,
                        random: id,
                    })),
                    3 => Some(packet::Payload::Data(konnectivity_proto::Data {
                        connect_id: id,
                        error: String::new(),
                        data: Bytes::from(vec![7; usize::from(len)]),
                        window_update: window,
                    })),
                    4 => Some(packet::Payload::CloseRequest(konnectivity_proto::CloseRequest { connect_id: id })),
                    5 => Some(packet::Payload::CloseResponse(konnectivity_proto::CloseResponse {
                        error: String::new(),
                        connect_id: id,
                    })),
                    6 => Some(packet::Payload::CloseDial(konnectivity_proto::CloseDial { random: id })),
                    _ => Some(packet::Payload::Drain(konnectivity_proto::Drain {})),
                };
                self.send(Packet { r#type: i32::from(kind), payload });
            }
            Op::Bytes(ref bytes) => {
                let Ok(packet) = Packet::decode(bytes.as_slice()) else { return };
                match packet.clone().kind() {
                    Ok(PacketKind::DialRequest(d)) => self.dial(Target::Closed, d.random),
                    // A payload-less or mismatched packet with a dial request inside is still never dialed.
                    _ if matches!(packet.payload, Some(packet::Payload::DialRequest(_))) => {}
                    _ => self.send(packet),
                }
            }
            Op::Reading { on } => self.reading = on,
            Op::Drain => self.drain.cancel(),
            Op::CloseAll => self.session.close_all("fuzz: closing everything"),
            Op::Sleep { millis } => tokio::time::sleep(Duration::from_millis(u64::from(millis % 26))).await,
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.pump();
    }

    /// Takes what the agent sent, if the fake server is reading.
    fn pump(&mut self) {
        while self.reading
            && let Ok(packet) = self.outbound.try_recv()
        {
            if let Ok(PacketKind::DialResponse(rsp)) = packet.kind() {
                self.answered += 1;
                assert!(self.randoms.contains(&rsp.random), "DIAL_RSP for dial {} never requested", rsp.random);
                if rsp.error.is_empty() {
                    assert!(rsp.connect_id > 0, "a successful DIAL_RSP without a connection ID");
                    assert!(
                        !self.announced.contains(&rsp.connect_id),
                        "connection ID {} announced twice",
                        rsp.connect_id
                    );
                    self.announced.push(rsp.connect_id);
                }
            }
        }
    }

    /// Asserts that the session's state is bounded by the input.
    pub fn check(&self) {
        let conns = self.session.connection_count();
        assert!(conns <= self.connectable, "{conns} connections from {} dials to listeners", self.connectable);
        let in_progress = self.session.in_progress();
        assert!(in_progress <= self.dials, "{in_progress} dials and connections in progress from {} dials", self.dials);
        assert!(self.answered <= self.dials, "{} DIAL_RSPs for {} DIAL_REQs", self.answered, self.dials);
        assert!(self.announced.len() <= self.connectable);
        let gauge = self.metrics.open_endpoint_connections();
        assert!(gauge >= 0.0 && gauge <= self.connectable as f64, "open_endpoint_connections = {gauge}");
    }

    /// Closes every connection (CLOSE_REQ), ends the stream, and asserts that nothing is left.
    pub async fn finish(mut self) {
        self.reading = true;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Connection IDs are allocated at DIAL_REQ, from 1: closing 1..=dials reaches every connection, even
        // one whose DIAL_RSP has not been read yet.
        loop {
            self.pump();
            if self.session.in_progress() == 0 && self.session.connection_count() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "connections not closed after CLOSE_REQ: {} open, {} in progress",
                self.session.connection_count(),
                self.session.in_progress()
            );
            if self.session.connection_count() > 0 {
                for id in 1..=self.dials as i64 {
                    self.send(Packet::close_request(id));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(self.metrics.open_endpoint_connections(), 0.0, "open_endpoint_connections after every close");
        self.inbound = None;
        let serve = std::mem::replace(&mut self.serve, tokio::spawn(async {}));
        tokio::time::timeout(Duration::from_secs(10), serve).await.expect("receive loop ends").expect("no panic");
        assert!(self.session.closed.is_cancelled());
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.expect("connection tasks end");
        while self.outbound.try_recv().is_ok() {}
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.endpoints.echo_open.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "echo endpoint still has connections open");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(self.session.connection_count(), 0);
        assert_eq!(self.session.in_progress(), 0);
        assert_eq!(Arc::strong_count(&self.session), 1, "the session's state is still referenced");
        self.endpoints.stop.cancel();
        self.endpoint_tracker.close();
        self.endpoint_tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenarios the `agent_session` fuzz target starts from: every kind of dial, data both ways, closes
    /// from both sides, unknown IDs, then the stream ends with connections open.
    #[test]
    fn lifecycle_leaves_nothing_behind() {
        use Op::*;
        for flow_control in [false, true] {
            run(
                &[
                    Dial { target: Target::Echo, random: 1 },
                    Dial { target: Target::Silent, random: 2 },
                    Dial { target: Target::Hangup, random: 3 },
                    Dial { target: Target::Closed, random: 4 },
                    Dial { target: Target::NoPort, random: 5 },
                    Dial { target: Target::BadPort, random: 5 },
                    Dial { target: Target::Udp, random: 6 },
                    Data { conn: 0, len: 4096 },
                    Data { conn: 1, len: 4096 },
                    Window { conn: 0, credit: 1 << 20 },
                    Raw { kind: 4, payload: 3, id: 99, len: 10, window: 0 },
                    Raw { kind: 2, payload: 4, id: -1, len: 0, window: 0 },
                    Close { conn: 0 },
                    Data { conn: 0, len: 1 },
                    CancelDial { random: 7 },
                    Sleep { millis: 20 },
                ],
                flow_control,
            );
        }
    }

    /// A stream that ends (or an agent that closes everything) while dials are in flight and the fake server
    /// does not read leaves no dial, connection or task.
    #[test]
    fn close_all_while_blocked_leaves_nothing_behind() {
        use Op::*;
        let mut ops = vec![Reading { on: false }];
        ops.extend((0..80).map(|i| Dial { target: Target::Echo, random: i }));
        ops.extend([Data { conn: 0, len: 100 }, Drain, CloseAll]);
        run(&ops, false);
    }
}
