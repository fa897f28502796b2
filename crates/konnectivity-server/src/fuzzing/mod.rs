//! Test support for fuzzing and property tests: drives the server's real stream loops (the one that reads an
//! agent's `/AgentService/Connect` stream and the one that reads a frontend's `/ProxyService/Proxy` stream)
//! with packets fed in directly, without sockets or gRPC, and checks the tunnel state after every step.
//!
//! A scenario is a list of [`Op`]s: agents and frontends come and go, send well-formed or malformed packets,
//! stop and resume reading, and time passes (the clock is tokio's paused clock, so timeouts fire at once).
//! After every step [`Harness::check`] asserts that the state is consistent and bounded by what the input could
//! have created; [`Harness::finish`] then ends every stream and asserts that nothing is left: no pending dial,
//! no connection, no queue, no task, no reference to a stream's state.
//!
//! Not part of the server's API: compiled for this crate's tests and with the `fuzzing` feature (the `fuzz/`
//! crate's `server_state` target).

// Test support: a broken invariant or harness set-up is a test failure, reported by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ops;

pub use ops::{Answer, Op, RawPacket, StreamEnd};
use ops::{DIAL_IDS, MAX_AGENTS, MAX_DATA, MAX_FRONTENDS};

use crate::audit::{AuditLog, ClientIdentity};
use crate::backend::identifiers::AgentIdentifiers;
use crate::backend::manager::BackendManager;
use crate::backend::service::serve_agent;
use crate::backend::stream::{AgentStreamInfo, AgentTransport, Backend};
use crate::frontend::grpc;
use crate::frontend::session::Session;
use crate::metrics::ServerMetrics;
use crate::tunnels::queue::{FRONTEND_QUEUE_LIMIT, FRONTEND_STALL_LIMIT, FrontendQueue, Queued};
use crate::tunnels::table::Tunnels;
use bytes::Bytes;
use konnectivity_egress_policy::EgressPolicy;
use konnectivity_proto::{Packet, PacketKind, flow};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Runs a scenario: every step, a check after each, then [`Harness::finish`]. Panics on any violation.
pub fn run(ops: &[Op], backend_dial_timeout: Option<Duration>) {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("tokio runtime");
    rt.block_on(async {
        let mut harness = Harness::new(backend_dial_timeout);
        for op in ops {
            harness.step(op).await;
            harness.check();
        }
        harness.finish().await;
    });
}

struct AgentSide {
    backend: Arc<Backend>,
    /// Packets to the server; dropped for EOF.
    inbound: Option<mpsc::UnboundedSender<Result<Packet, Status>>>,
    /// What the server queued for this agent; dropped once the server ends the stream.
    outbound: Option<mpsc::Receiver<Packet>>,
    transport: CancellationToken,
    reading: bool,
    task: JoinHandle<()>,
    /// Dial IDs of the DIAL_REQs it received.
    dials: Vec<i64>,
    /// Connection IDs it answered with.
    conns: Vec<i64>,
    next_connect_id: i64,
}

struct FrontendSide {
    frontend: Arc<FrontendQueue>,
    inbound: Option<mpsc::UnboundedSender<Result<Packet, Status>>>,
    outbound: Option<mpsc::UnboundedReceiver<Queued>>,
    reading: bool,
    task: JoinHandle<()>,
    /// Connection IDs from the successful DIAL_RSPs it received.
    connect_ids: Vec<i64>,
}

/// A server's tunnel state with fake agents and frontends around it.
pub struct Harness {
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    backend_dial_timeout: Option<Duration>,
    agents: Vec<AgentSide>,
    frontends: Vec<FrontendSide>,
    /// DIAL_REQs frontends sent: pending dials can never exceed it.
    dial_requests: usize,
    /// Successful DIAL_RSPs agents sent: connections can never exceed it.
    dial_successes: usize,
}

fn pick<T>(items: &mut [T], index: u8) -> Option<&mut T> {
    if items.is_empty() {
        return None;
    }
    let n = usize::from(index) % items.len();
    items.get_mut(n)
}

fn pick_id(ids: &[i64], index: u8) -> Option<i64> {
    (!ids.is_empty()).then(|| ids[usize::from(index) % ids.len()])
}

impl Harness {
    /// A server state with the default routing strategy, no egress policy and no audit log. Call inside a
    /// tokio runtime (with a paused clock, so that the timeouts of a scenario cost no real time).
    pub fn new(backend_dial_timeout: Option<Duration>) -> Self {
        let shutdown = CancellationToken::new();
        let metrics = ServerMetrics::new().expect("metrics");
        let backends = BackendManager::new(metrics.clone(), vec![crate::routing::Strategy::Default]);
        let tunnels = Arc::new(Tunnels::new(
            backends,
            metrics,
            Arc::new(EgressPolicy::allow_all()),
            AuditLog::disabled(),
            shutdown.clone(),
        ));
        Self {
            tunnels,
            shutdown,
            tracker: TaskTracker::new(),
            backend_dial_timeout,
            agents: Vec::new(),
            frontends: Vec::new(),
            dial_requests: 0,
            dial_successes: 0,
        }
    }

    /// Number of agent streams opened so far.
    pub fn agents(&self) -> usize {
        self.agents.len()
    }

    /// Number of frontend streams opened so far.
    pub fn frontends(&self) -> usize {
        self.frontends.len()
    }

    /// Dials pending now.
    pub fn pending_dials(&self) -> usize {
        self.tunnels.pending_count()
    }

    /// Connections on every agent stream now (open or closing).
    pub fn connections(&self) -> usize {
        self.tunnels.connection_count()
    }

    /// Sends a packet from agent stream `agent` (picked modulo the count), counting successful DIAL_RSPs.
    fn agent_send(&mut self, agent: u8, packet: Packet) {
        let Some(a) = pick(&mut self.agents, agent) else { return };
        if let Ok(PacketKind::DialResponse(rsp)) = packet.clone().kind()
            && rsp.error.is_empty()
            && rsp.connect_id != 0
        {
            self.dial_successes += 1;
        }
        if let Some(tx) = &a.inbound {
            let _ = tx.send(Ok(packet));
        }
    }

    /// Sends a packet from frontend `frontend` (picked modulo the count), counting DIAL_REQs.
    fn frontend_send(&mut self, frontend: u8, packet: Packet) {
        let Some(f) = pick(&mut self.frontends, frontend) else { return };
        if let Ok(PacketKind::DialRequest(_)) = packet.clone().kind() {
            self.dial_requests += 1;
        }
        if let Some(tx) = &f.inbound {
            let _ = tx.send(Ok(packet));
        }
    }

    /// Applies one step (its effects happen as the runtime runs: call [`Harness::settle`]). One arm per kind of
    /// step, each a few lines: long because the scenario language is, not because any step is complex.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::AgentConnect { id, flow_control } => self.connect_agent(id, flow_control),
            Op::AgentEnd { agent, how } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                match how {
                    StreamEnd::Eof => a.inbound = None,
                    StreamEnd::Error => {
                        if let Some(tx) = a.inbound.take() {
                            let _ = tx.send(Err(Status::unavailable("fuzz: stream failed")));
                        }
                    }
                    StreamEnd::TransportLost => a.transport.cancel(),
                }
            }
            Op::AgentAnswer { agent, dial, answer } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                let Some(random) = pick_id(&a.dials, dial) else { return };
                let packet = match answer {
                    Answer::Connected => {
                        let id = a.next_connect_id;
                        a.next_connect_id += 1;
                        a.conns.push(id);
                        Packet::dial_response(random, id, "")
                    }
                    Answer::Refused => Packet::dial_response(random, 0, "dial tcp 10.0.0.1:80: connect: refused"),
                    Answer::NoConnectId => Packet::dial_response(random, 0, ""),
                    Answer::ReusedConnectId => match a.conns.last() {
                        Some(&id) => Packet::dial_response(random, id, ""),
                        None => return,
                    },
                };
                self.agent_send(agent, packet);
            }
            Op::AgentData { agent, conn, len } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                let Some(id) = pick_id(&a.conns, conn) else { return };
                let len = (usize::from(len) * 16).min(MAX_DATA);
                self.agent_send(agent, Packet::data(id, Bytes::from(vec![0xa5; len])));
            }
            Op::AgentWindow { agent, conn, credit } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                let Some(id) = pick_id(&a.conns, conn) else { return };
                self.agent_send(agent, Packet::window_update(id, credit.max(1)));
            }
            Op::AgentClose { agent, conn, error } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                let Some(id) = pick_id(&a.conns, conn) else { return };
                self.agent_send(agent, Packet::close_response(id, if error { "endpoint reset" } else { "" }));
            }
            Op::AgentCancel { agent, dial } => {
                let Some(a) = pick(&mut self.agents, agent) else { return };
                let Some(random) = pick_id(&a.dials, dial) else { return };
                self.agent_send(agent, Packet::close_dial(random));
            }
            Op::AgentDrain { agent } => self.agent_send(agent, Packet::drain()),
            Op::AgentRaw { agent, ref packet } => {
                if let Some(p) = packet.to_packet() {
                    self.agent_send(agent, p);
                }
            }
            Op::AgentReading { agent, on } => {
                if let Some(a) = pick(&mut self.agents, agent) {
                    a.reading = on;
                }
            }
            Op::FrontendOpen => self.open_frontend(),
            Op::FrontendEnd { frontend, how } => {
                let Some(f) = pick(&mut self.frontends, frontend) else { return };
                match how {
                    StreamEnd::Eof => f.inbound = None,
                    StreamEnd::Error | StreamEnd::TransportLost => {
                        if let Some(tx) = f.inbound.take() {
                            let _ = tx.send(Err(Status::cancelled("fuzz: stream failed")));
                        }
                    }
                }
            }
            Op::FrontendDial { frontend, random } => {
                let random = i64::from(random % DIAL_IDS);
                self.frontend_send(frontend, Packet::dial_request("10.0.0.1:80", random));
            }
            Op::FrontendData { frontend, len } => {
                let Some(f) = pick(&mut self.frontends, frontend) else { return };
                let id = f.connect_ids.first().copied().unwrap_or(1);
                let len = (usize::from(len) * 16).min(MAX_DATA);
                self.frontend_send(frontend, Packet::data(id, Bytes::from(vec![0x3c; len])));
            }
            Op::FrontendClose { frontend } => {
                let Some(f) = pick(&mut self.frontends, frontend) else { return };
                let id = f.connect_ids.first().copied().unwrap_or(1);
                self.frontend_send(frontend, Packet::close_request(id));
            }
            Op::FrontendCancel { frontend, random } => {
                self.frontend_send(frontend, Packet::close_dial(i64::from(random % DIAL_IDS)));
            }
            Op::FrontendRaw { frontend, ref packet } => {
                if let Some(p) = packet.to_packet() {
                    self.frontend_send(frontend, p);
                }
            }
            Op::FrontendReading { frontend, on } => {
                if let Some(f) = pick(&mut self.frontends, frontend) {
                    f.reading = on;
                }
            }
            Op::Sleep { .. } => {}
        }
    }

    fn connect_agent(&mut self, id: u8, flow_control: bool) {
        if self.agents.len() >= MAX_AGENTS {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let transport = CancellationToken::new();
        let info = AgentStreamInfo {
            serial: self.tunnels.next_serial(),
            agent_id: format!("agent-{}", id % 4),
            identifiers: AgentIdentifiers::default(),
            peer: "fuzz".into(),
            flow_control,
            egress_policy: None,
            identity: crate::identity::StreamIdentity::trusted(crate::identity::AgentIdentity::anonymous()),
        };
        let (backend, outbound) = Backend::new(
            info,
            self.shutdown.child_token(),
            AgentTransport { closed: transport.clone(), abort: CancellationToken::new() },
            self.tunnels.metrics.clone(),
            self.tracker.clone(),
        );
        // As `AgentEndpoint::connect` does.
        // Trusted streams own no agent IDs and have no cap: attaching cannot be refused.
        let Ok(guard) = self.tunnels.attach_agent(backend.clone()) else { return };
        let task = self.tracker.spawn(serve_agent(guard, UnboundedReceiverStream::new(rx), self.tunnels.clone()));
        self.agents.push(AgentSide {
            backend,
            inbound: Some(tx),
            outbound: Some(outbound),
            transport,
            reading: true,
            task,
            dials: Vec::new(),
            conns: Vec::new(),
            next_connect_id: 1,
        });
    }

    fn open_frontend(&mut self) {
        if self.frontends.len() >= MAX_FRONTENDS {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (session, outbound) =
            Session::open(&self.tunnels, "grpc", ClientIdentity::Uds(None), self.backend_dial_timeout);
        let frontend = session.queue().clone();
        let task = self.tracker.spawn(grpc::serve(session, UnboundedReceiverStream::new(rx), self.shutdown.clone()));
        self.frontends.push(FrontendSide {
            frontend,
            inbound: Some(tx),
            outbound: Some(outbound),
            reading: true,
            task,
            connect_ids: Vec::new(),
        });
    }

    /// Takes what the server queued for the fake peers that are reading, as the gRPC layer would; returns
    /// whether anything was taken.
    fn pump(&mut self) -> bool {
        let mut progress = false;
        for f in &mut self.frontends {
            // The response stream ends when the frontend is closed (`take_until` in `ProxyEndpoint::proxy`);
            // what is still queued is dropped with it.
            if f.frontend.closed.is_cancelled() {
                progress |= f.outbound.take().is_some();
                continue;
            }
            let Some(rx) = &mut f.outbound else { continue };
            while f.reading
                && let Ok(queued) = rx.try_recv()
            {
                f.frontend.on_sent(&queued);
                if let Ok(PacketKind::DialResponse(rsp)) = queued.packet.kind()
                    && rsp.error.is_empty()
                    && rsp.connect_id != 0
                {
                    f.connect_ids.push(rsp.connect_id);
                }
                progress = true;
            }
        }
        for a in &mut self.agents {
            if a.backend.closed.is_cancelled() {
                progress |= a.outbound.take().is_some();
                continue;
            }
            let Some(rx) = &mut a.outbound else { continue };
            while a.reading
                && let Ok(packet) = rx.try_recv()
            {
                if let Ok(PacketKind::DialRequest(req)) = packet.kind() {
                    a.dials.push(req.random);
                }
                progress = true;
            }
        }
        progress
    }

    /// Lets every task run until nothing moves (the runtime's clock is paused: a sleep returns only once every
    /// other task is idle), taking what the peers read.
    pub async fn settle(&mut self) {
        for _ in 0..1000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if !self.pump() {
                return;
            }
        }
    }

    /// Lets `d` pass, then settles.
    pub async fn sleep(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
        self.settle().await;
    }

    /// Applies a step and settles, sleeping for [`Op::Sleep`].
    pub async fn step(&mut self, op: &Op) {
        self.apply(op);
        if let Op::Sleep { millis } = op {
            self.sleep(Duration::from_millis(u64::from(*millis) * 8)).await;
        }
        self.settle().await;
    }

    /// Asserts that the state is consistent and bounded by the input. Call after [`Harness::settle`].
    pub fn check(&self) {
        let t = &self.tunnels;
        // Both directions of the table agree (every dial and connection is listed by its frontend and its agent
        // stream, every listed one exists), and each agent stream's connection count is right.
        let (pending, connections) = t.check_consistency();
        assert!(pending <= self.dial_requests, "{pending} pending dials from {} DIAL_REQs", self.dial_requests);
        assert_eq!(t.metrics.pending_backend_dials(), pending as f64, "pending_backend_dials gauge");
        assert!(
            connections <= self.dial_successes,
            "{connections} connections from {} successful DIAL_RSPs",
            self.dial_successes
        );
        assert_eq!(t.metrics.established_connections(), connections as f64, "established_connections gauge");
        let live = t.backends.all();
        for a in &self.agents {
            let b = &a.backend;
            if b.closed.is_cancelled() && a.task.is_finished() {
                assert!(!t.knows_stream(b.serial), "agent stream {} ended; the table still holds it", b.serial);
                assert_eq!(b.connection_count(), 0, "agent stream {} ended with connections", b.serial);
                assert!(!live.iter().any(|l| l.serial == b.serial), "ended agent stream {} still routable", b.serial);
            }
        }
        let queue_bound = FRONTEND_QUEUE_LIMIT.max(2 * flow::WINDOW as usize) + flow::cost(MAX_DATA) as usize;
        for f in &self.frontends {
            let fe = &f.frontend;
            let queued = fe.queued();
            assert!(queued <= queue_bound, "frontend {} holds {queued} units queued", fe.serial);
            if f.reading && f.outbound.is_some() {
                assert_eq!(queued, 0, "frontend {} is reading, yet {queued} units stay queued", fe.serial);
            }
            if f.task.is_finished() {
                assert!(!t.knows_stream(fe.serial), "frontend {} ended; the table still holds it", fe.serial);
            }
        }
    }

    /// Ends every stream and asserts that nothing is left: no pending dial, no connection, no queue, no task,
    /// no reference to any stream's state.
    pub async fn finish(mut self) {
        for f in &mut self.frontends {
            f.reading = true;
            f.inbound = None;
        }
        for a in &mut self.agents {
            a.reading = true;
        }
        self.settle().await;
        self.check();
        for a in &mut self.agents {
            a.inbound = None;
        }
        self.settle().await;
        // Whatever waits on a timer (a stalled frontend, a dial deadline) is over after this.
        self.sleep(FRONTEND_STALL_LIMIT * 2).await;
        self.check();
        let t = &self.tunnels;
        assert_eq!(t.pending_count(), 0, "pending dials left after every stream ended");
        assert_eq!(self.connections(), 0, "connections left after every stream ended");
        assert_eq!(t.backends.agent_count(), 0, "agents left registered");
        assert_eq!(t.metrics.established_connections(), 0.0);
        assert_eq!(t.metrics.pending_backend_dials(), 0.0);
        for a in &self.agents {
            assert!(a.task.is_finished(), "agent stream {} is still being read", a.backend.serial);
            assert!(a.outbound.is_none(), "agent stream {} was never ended by the server", a.backend.serial);
        }
        for f in &self.frontends {
            assert!(f.task.is_finished(), "frontend {} is still being read", f.frontend.serial);
            assert!(f.frontend.closed.is_cancelled(), "frontend {} never closed", f.frontend.serial);
        }
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(60), self.tracker.wait()).await.expect("tasks left running");
        self.settle().await;
        // Nothing else holds a stream's state: no map, no link, no task (a cycle would show here).
        for a in &self.agents {
            assert_eq!(Arc::strong_count(&a.backend), 1, "agent stream {} state is still referenced", a.backend.serial);
        }
        for f in &self.frontends {
            assert_eq!(Arc::strong_count(&f.frontend), 1, "frontend {} state is still referenced", f.frontend.serial);
        }
    }
}

#[cfg(test)]
mod tests;
