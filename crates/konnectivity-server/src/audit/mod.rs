//! The audit log: one JSON line when a tunneled connection opens or its dial fails, and one when an opened
//! connection closes (format in docs/security.md). Never payload bytes.
//!
//! Recording an event never waits: the record goes on a bounded queue read by a dedicated writer thread
//! ([`writer`]); if the queue is full the line is dropped and counted, as are lines the disk refused. The
//! writer stops at server stop, after every connection's last event, once it has written what was queued.

mod identity;
mod records;
mod writer;

pub(crate) use identity::ClientIdentity;
pub(crate) use records::{AuditedAgent, Closed, Tunneled};

use crate::config::{AuditConfig, AuditOutput};
use parking_lot::Mutex;
use prometheus::IntCounter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// The agent dialed the destination; the connection is established.
    Open,
    /// The dial did not produce a connection.
    DialFailed,
    /// An opened connection closed.
    Close,
    /// An agent stream was refused for what it claimed (its agent ID or identifiers are not its credential's).
    AgentRefused,
}

impl Event {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::DialFailed => "dial_failed",
            Self::Close => "close",
            Self::AgentRefused => "agent_refused",
        }
    }
}

/// Why a dial produced no connection (the `reason` of a `dial_failed` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialFailure {
    /// The agent could not dial (the error says why: refused, unreachable, no such host, …).
    DialError,
    /// No agent was connected that could take the dial.
    NoAgent,
    /// `--backend-dial-timeout` passed.
    Timeout,
    /// The egress policy refuses the destination.
    Denied,
    /// The agent's stream ended before it answered.
    AgentDisconnected,
    /// The agent cancelled the dial (DIAL_CLS).
    AgentCancelled,
    /// The client cancelled the dial (DIAL_CLS).
    ClientCancelled,
    /// The client's stream or socket ended before the answer.
    FrontendGone,
    /// The client reused a dial ID that is still pending.
    DuplicateDialId,
    /// The server is stopping.
    ServerShutdown,
}

impl DialFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::DialError => "dial error",
            Self::NoAgent => "no agent",
            Self::Timeout => "timeout",
            Self::Denied => "denied by egress policy",
            Self::AgentDisconnected => "agent disconnected",
            Self::AgentCancelled => "agent cancelled",
            Self::ClientCancelled => "client cancelled",
            Self::FrontendGone => "frontend gone",
            Self::DuplicateDialId => "duplicate dial id",
            Self::ServerShutdown => "server shutdown",
        }
    }
}

/// Why an opened connection closed (the `reason` of a `close` line): the first cause recorded wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client closed it (CLOSE_REQ, or the CONNECT client closed its socket).
    ClientClosed,
    /// The agent closed it (the destination closed, or the agent gave up on it).
    AgentClosed,
    /// The agent's stream ended with the connection open.
    AgentDisconnected,
    /// The client's stream ended without closing the connection first.
    FrontendEnded,
    /// The client stopped reading for the stall limit (or its agent overran flow control).
    FrontendStalled,
    /// The client broke the protocol (e.g. DATA for a connection ID it does not own).
    ProtocolError,
    /// The server is stopping.
    ServerShutdown,
}

impl CloseReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client closed",
            Self::AgentClosed => "agent closed",
            Self::AgentDisconnected => "agent disconnected",
            Self::FrontendEnded => "frontend ended",
            Self::FrontendStalled => "frontend stalled",
            Self::ProtocolError => "protocol error",
            Self::ServerShutdown => "server shutdown",
        }
    }
}

/// One audit event, as queued for the writer (formatting happens there).
pub(crate) struct Record {
    pub(crate) time: SystemTime,
    pub(crate) event: Event,
    /// `grpc` or `http-connect`.
    pub(crate) mode: &'static str,
    pub(crate) client: ClientIdentity,
    /// The destination as the client asked for it.
    pub(crate) destination: String,
    /// The agent the dial was sent to.
    pub(crate) agent: Option<std::sync::Arc<AuditedAgent>>,
    pub(crate) dial_id: i64,
    pub(crate) connect_id: Option<i64>,
    /// A [`DialFailure`] or [`CloseReason`] phrase.
    pub(crate) reason: Option<&'static str>,
    /// The error text the client got (dial_failed), or the one the close carried.
    pub(crate) error: Option<String>,
    /// Close only: tunneled bytes each way.
    pub(crate) bytes_client_to_target: u64,
    pub(crate) bytes_target_to_client: u64,
    /// Open and dial_failed: since the dial started. Close: since the connection opened.
    pub(crate) duration: Duration,
}

/// An agent stream refused (formatting happens in the writer).
pub(crate) struct AgentRecord {
    pub(crate) time: SystemTime,
    pub(crate) agent: AuditedAgent,
    /// The refusal's label.
    pub(crate) reason: &'static str,
    /// What the agent was told.
    pub(crate) error: String,
}

/// What goes on the writer's queue.
pub(crate) enum Line {
    /// A tunneled connection's event.
    Tunnel(Record),
    /// An agent stream's event.
    Agent(AgentRecord),
}

impl Line {
    fn event(&self) -> Event {
        match self {
            Self::Tunnel(r) => r.event,
            Self::Agent(_) => Event::AgentRefused,
        }
    }
}

/// The counters the audit log moves (`audit_events_total`, `audit_events_dropped_total`).
#[derive(Clone)]
pub(crate) struct AuditCounters {
    pub(crate) open: IntCounter,
    pub(crate) dial_failed: IntCounter,
    pub(crate) close: IntCounter,
    pub(crate) agent_refused: IntCounter,
    pub(crate) dropped_queue_full: IntCounter,
    pub(crate) dropped_write_error: IntCounter,
    pub(crate) dropped_closed: IntCounter,
}

struct WriterThread {
    done: tokio::sync::oneshot::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

/// The audit log of one server (disabled unless configured).
pub(crate) struct AuditLog {
    /// The queue to the writer; `None` when disabled or closed.
    queue: Mutex<Option<SyncSender<Line>>>,
    enabled: bool,
    counters: Option<AuditCounters>,
    writer: Mutex<Option<WriterThread>>,
    /// Set while records are being dropped for a full queue (to warn once per episode).
    overflowing: AtomicBool,
}

impl AuditLog {
    /// An audit log that records nothing.
    pub(crate) fn disabled() -> Self {
        Self {
            queue: Mutex::new(None),
            enabled: false,
            counters: None,
            writer: Mutex::new(None),
            overflowing: AtomicBool::new(false),
        }
    }

    /// Opens the output and starts the writer thread.
    pub(crate) fn start(config: &AuditConfig, server_id: &str, counters: AuditCounters) -> std::io::Result<Self> {
        let output = match &config.output {
            AuditOutput::Stdout => writer::Output::Stdout,
            AuditOutput::File(path) => writer::Output::File(
                writer::RotatingFile::open(path, config.max_size, config.max_backups)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("audit log {}: {e}", path.display())))?,
            ),
        };
        Self::with_output(output, config.queue_capacity, server_id, counters)
    }

    fn with_output(
        output: writer::Output,
        capacity: usize,
        server_id: &str,
        counters: AuditCounters,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let writer = writer::Writer::new(output, server_id.to_string(), counters.dropped_write_error.clone());
        let thread = std::thread::Builder::new().name("audit-log".into()).spawn(move || {
            writer.run(rx);
            let _ = done_tx.send(());
        })?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            enabled: true,
            counters: Some(counters),
            writer: Mutex::new(Some(WriterThread { done, thread })),
            overflowing: AtomicBool::new(false),
        })
    }

    /// Whether events are recorded (callers skip building records otherwise).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Queues a tunnel record for the writer, or drops and counts it if the queue is full. Never waits.
    pub(crate) fn record(&self, record: Record) {
        self.queue_line(Line::Tunnel(record));
    }

    /// Queues an agent record, as [`AuditLog::record`].
    pub(crate) fn record_agent(&self, record: AgentRecord) {
        self.queue_line(Line::Agent(record));
    }

    fn queue_line(&self, record: Line) {
        let Some(counters) = &self.counters else { return };
        match record.event() {
            Event::Open => counters.open.inc(),
            Event::DialFailed => counters.dial_failed.inc(),
            Event::Close => counters.close.inc(),
            Event::AgentRefused => counters.agent_refused.inc(),
        }
        let queue = self.queue.lock();
        let Some(tx) = queue.as_ref() else {
            counters.dropped_closed.inc();
            return;
        };
        match tx.try_send(record) {
            Ok(()) => {
                if self.overflowing.load(Ordering::Relaxed) {
                    self.overflowing.store(false, Ordering::Relaxed);
                }
            }
            Err(TrySendError::Full(_)) => {
                counters.dropped_queue_full.inc();
                if !self.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("audit log queue is full: dropping lines (counted) until the writer catches up");
                }
            }
            Err(TrySendError::Disconnected(_)) => counters.dropped_closed.inc(),
        }
    }

    /// Stops the writer once it has written what is queued, waiting at most `timeout` (a writer stuck on a
    /// hung disk is left behind with a warning). Later records are dropped and counted.
    pub(crate) async fn stop(&self, timeout: Duration) {
        drop(self.queue.lock().take());
        let Some(writer) = self.writer.lock().take() else { return };
        match tokio::time::timeout(timeout, writer.done).await {
            // The thread has sent its last signal and returns at once: joining does not block.
            Ok(_) => {
                let _ = writer.thread.join();
            }
            Err(_) => {
                tracing::warn!("the audit log writer did not finish within {timeout:?}; queued lines may be lost")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::mpsc;

    fn counters() -> AuditCounters {
        let c = |name: &str| IntCounter::new(name, "test").expect("counter");
        AuditCounters {
            open: c("open"),
            dial_failed: c("dial_failed"),
            close: c("close"),
            agent_refused: c("agent_refused"),
            dropped_queue_full: c("full"),
            dropped_write_error: c("write_error"),
            dropped_closed: c("closed"),
        }
    }

    fn record(n: i64) -> Record {
        Record {
            time: SystemTime::now(),
            event: Event::Close,
            mode: "grpc",
            client: ClientIdentity::Uds(None),
            destination: "10.0.0.5:10250".into(),
            agent: Some(std::sync::Arc::new(AuditedAgent {
                id: "agent-a".into(),
                peer: "10.0.0.9:41000".into(),
                credential: "certificate",
                identity: "system:node:node-a".into(),
                node: Some("node-a".into()),
            })),
            dial_id: n,
            connect_id: Some(n),
            reason: Some(CloseReason::ClientClosed.as_str()),
            error: None,
            bytes_client_to_target: 10,
            bytes_target_to_client: 20,
            duration: Duration::from_millis(5),
        }
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("audit-test-{}-{}", std::process::id(), rand::random::<u64>()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dial_ids(path: &std::path::Path) -> Vec<i64> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("each line is JSON");
                v["dial_id"].as_i64().expect("dial_id")
            })
            .collect()
    }

    #[tokio::test]
    async fn rotates_by_size_and_keeps_max_backups() {
        let dir = TempDir::new();
        let path = dir.0.join("audit.log");
        let line_len = record(100).json_line("s1").len() as u64;
        let config = AuditConfig {
            output: AuditOutput::File(path.clone()),
            // Three lines fit in a file, a fourth rotates.
            max_size: line_len * 3 + line_len / 2,
            max_backups: 2,
            queue_capacity: 1000,
        };
        let counters = counters();
        let log = AuditLog::start(&config, "s1", counters.clone()).expect("start");
        for n in 100..120 {
            log.record(record(n));
        }
        log.stop(Duration::from_secs(5)).await;

        let (current, one, two) =
            (dial_ids(&path), dial_ids(&writer::backup(&path, 1)), dial_ids(&writer::backup(&path, 2)));
        assert!(!writer::backup(&path, 3).exists(), "only two backups are kept");
        for file in [&path, &writer::backup(&path, 1), &writer::backup(&path, 2)] {
            let size = std::fs::metadata(file).expect("file").len();
            assert!(size <= config.max_size, "{} is {size} bytes", file.display());
        }
        // 20 lines, 3 per file: the newest 2 in the current file, then 3 in each backup, oldest in .2.
        assert_eq!(current, vec![118, 119]);
        assert_eq!(one, vec![115, 116, 117]);
        assert_eq!(two, vec![112, 113, 114]);
        assert_eq!((counters.close.get(), counters.dropped_queue_full.get()), (20, 0));

        // An existing file is appended to, and counts towards the size limit.
        let log = AuditLog::start(&config, "s1", counters.clone()).expect("restart");
        log.record(record(120));
        log.record(record(121));
        log.stop(Duration::from_secs(5)).await;
        assert_eq!(dial_ids(&path), vec![121]);
        assert_eq!(dial_ids(&writer::backup(&path, 1)), vec![118, 119, 120]);
        assert_eq!(dial_ids(&writer::backup(&path, 2)), vec![115, 116, 117]);
    }

    #[tokio::test]
    async fn no_backups_means_the_file_starts_afresh() {
        let dir = TempDir::new();
        let path = dir.0.join("audit.log");
        let line_len = record(1).json_line("s1").len() as u64;
        let config = AuditConfig {
            output: AuditOutput::File(path.clone()),
            max_size: line_len * 2,
            max_backups: 0,
            queue_capacity: 100,
        };
        let log = AuditLog::start(&config, "s1", counters()).expect("start");
        for n in 1..=5 {
            log.record(record(n));
        }
        log.stop(Duration::from_secs(5)).await;
        assert_eq!(dial_ids(&path), vec![5]);
        assert!(!writer::backup(&path, 1).exists());
    }

    /// A writer that blocks in `write` until released, reporting when it got there.
    struct Blocking {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
        out: std::sync::Arc<parking_lot::Mutex<Vec<u8>>>,
    }
    impl Write for Blocking {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            self.out.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let out = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let blocking = Blocking { entered: entered_tx, release: release_rx, out: out.clone() };
        let counters = counters();
        let log = AuditLog::with_output(writer::Output::Custom(Box::new(blocking)), 2, "s1", counters.clone())
            .expect("start");
        log.record(record(1));
        // The writer holds record 1 and is stuck writing it: the queue (2) takes two more, the rest drop.
        entered.recv_timeout(Duration::from_secs(5)).expect("writer reached write");
        let started = std::time::Instant::now();
        for n in 2..=11 {
            log.record(record(n));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "recording waited for the writer");
        assert_eq!(counters.dropped_queue_full.get(), 8);
        assert_eq!(counters.close.get(), 11);
        for _ in 0..3 {
            let _ = release.send(());
        }
        log.stop(Duration::from_secs(5)).await;
        let text = String::from_utf8(out.lock().clone()).expect("utf8");
        let ids: Vec<i64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["dial_id"].as_i64().expect("id"))
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
        // After close nothing is queued any more; it is counted, not lost silently.
        log.record(record(12));
        assert_eq!(counters.dropped_closed.get(), 1);
    }

    #[tokio::test]
    async fn a_failing_output_counts_lost_lines() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let counters = counters();
        let log =
            AuditLog::with_output(writer::Output::Custom(Box::new(Broken)), 16, "s1", counters.clone()).expect("start");
        for n in 0..5 {
            log.record(record(n));
        }
        log.stop(Duration::from_secs(5)).await;
        assert_eq!(counters.dropped_write_error.get(), 5);
    }

    #[test]
    fn a_line_has_every_field_in_order() {
        let mut r = record(7);
        r.error = Some("agent a disconnected".into());
        let line = r.json_line("server-1");
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["event"], "close");
        assert_eq!(v["server_id"], "server-1");
        assert_eq!(v["frontend"], serde_json::json!({"mode": "grpc", "transport": "uds"}));
        assert_eq!(v["destination"], "10.0.0.5:10250");
        assert_eq!((v["bytes_client_to_target"].as_u64(), v["bytes_target_to_client"].as_u64()), (Some(10), Some(20)));
        assert_eq!(v["duration_ms"].as_f64(), Some(5.0));
        assert_eq!(v["error"], "agent a disconnected");
        let keys: Vec<&str> = [
            "\"time\"",
            "\"event\"",
            "\"server_id\"",
            "\"frontend\"",
            "\"destination\"",
            "\"agent_id\"",
            "\"agent_peer\"",
            "\"agent_credential\"",
            "\"agent_identity\"",
            "\"agent_node\"",
            "\"dial_id\"",
            "\"connect_id\"",
            "\"reason\"",
            "\"error\"",
            "\"bytes_client_to_target\"",
            "\"duration_ms\"",
        ]
        .to_vec();
        let positions: Vec<usize> = keys.iter().map(|k| line.find(k).expect(k)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
    }
}
