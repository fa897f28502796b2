//! The soak's load: bulk transfers, request/response exchanges and dial churn, run by workers until stopped,
//! counting what succeeds, what fails by construction and what fails unexplained.

use crate::scenarios::{self, Path};
use crate::target;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Counts, shared by the load tasks.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) ok: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Failures expected by construction: dials to the refused port.
    pub(super) refused_as_expected: AtomicU64,
    /// Failures while an agent restart was in progress (injected).
    pub(super) during_restart: AtomicU64,
    /// Failures nothing explains.
    pub(super) unexpected: AtomicU64,
}

/// Whether an agent restart is in progress (failures then are injected faults), with its end.
#[derive(Default)]
pub(super) struct RestartWindow {
    pub(super) until: std::sync::Mutex<Option<Instant>>,
}

impl RestartWindow {
    pub(super) fn open(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + Duration::from_secs(3600));
    }
    /// The restart is over: failures are unexpected again after a grace period.
    pub(super) fn close(&self, grace: Duration) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + grace);
    }
    pub(super) fn active(&self) -> bool {
        self.until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }
}

pub(super) struct Load {
    pub(super) path: Path,
    pub(super) target: SocketAddr,
    pub(super) refused: SocketAddr,
    pub(super) counters: Counters,
    pub(super) restart: RestartWindow,
    pub(super) errors: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: &str, e: &anyhow::Error) {
        if self.restart.active() {
            self.counters.during_restart.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.unexpected.fetch_add(1, Ordering::Relaxed);
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.len() < 20 {
                errors.push(format!("{what}: {e:#}"));
            }
        }
    }
    fn ok(&self, bytes: u64) {
        self.counters.ok.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

async fn with_timeout<T>(d: Duration, f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(d, f).await.map_err(|_| anyhow::anyhow!("timed out after {d:?}"))?
}

pub(super) async fn bulk_worker(load: Arc<Load>, bytes: u64, stop: CancellationToken) {
    let mut upload = false;
    while !stop.is_cancelled() {
        let r = if upload {
            with_timeout(Duration::from_secs(60), scenarios::upload(&load.path, load.target, bytes)).await
        } else {
            with_timeout(Duration::from_secs(60), scenarios::download(&load.path, load.target, bytes)).await
        };
        match r {
            Ok(_) => load.ok(bytes),
            Err(e) => load.fail(if upload { "upload" } else { "download" }, &e),
        }
        upload = !upload;
    }
}

pub(super) async fn request_worker(load: Arc<Load>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let r = with_timeout(Duration::from_secs(20), async {
            let mut c = load.path.dial(load.target).await?;
            c.write_all(b"R\n").await?;
            let msg = vec![0x61u8; target::MESSAGE];
            let mut back = vec![0u8; target::MESSAGE];
            for _ in 0..10 {
                c.write_all(&msg).await?;
                c.read_exact(&mut back).await?;
                anyhow::ensure!(back == msg, "response differs from request");
            }
            c.shutdown().await?;
            Ok(())
        })
        .await;
        match r {
            Ok(()) => load.ok(20 * target::MESSAGE as u64),
            Err(e) => load.fail("request", &e),
        }
    }
}

pub(super) async fn churn_worker(load: Arc<Load>, n: usize, stop: CancellationToken) {
    let mut i = 0u64;
    while !stop.is_cancelled() {
        i += 1;
        if (i + n as u64).is_multiple_of(4) {
            // An injected fault: a dial to a port nobody listens on must fail, and fail cleanly.
            match with_timeout(Duration::from_secs(20), load.path.dial(load.refused)).await {
                Ok(_) => load.fail("refused dial", &anyhow::anyhow!("a dial to a closed port succeeded")),
                Err(_) => {
                    load.counters.refused_as_expected.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        let r = with_timeout(Duration::from_secs(20), async {
            let mut c = load.path.dial(load.target).await?;
            c.write_all(b"E\nhello").await?;
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await?;
            anyhow::ensure!(&back == b"hello", "echo differs");
            // Half the connections are dropped without a clean close.
            if i.is_multiple_of(2) {
                c.shutdown().await?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(()) => load.ok(10),
            Err(e) => load.fail("churn", &e),
        }
    }
}
