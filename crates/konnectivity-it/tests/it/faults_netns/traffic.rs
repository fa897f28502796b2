//! Traffic the scenarios drive through the tunnel, and how they measure it.

use super::fabric::{Fabric, drain_counting, http_addr};
use konnectivity_it::targets::StreamHash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// File descriptors either process may hold above its baseline once everything has settled (lazily created
/// timers, a log file rotated, the admin connection of the scrape itself).
pub(super) const FD_SLACK: usize = 6;
/// How long the fabric may take to settle after a scenario's traffic has ended.
pub(super) const SETTLE: Duration = Duration::from_secs(15);
/// A body larger than any scenario reads: a transfer that only ends when something breaks.
pub(super) const ENDLESS: u64 = 1 << 34;

/// A download in flight, read continuously by a task of its own.
pub(super) struct Download {
    pub(super) progress: Arc<AtomicU64>,
    pub(super) task: JoinHandle<Result<(), std::io::Error>>,
}

/// A scenario that fails half-way must not leave its endless downloads running.
impl Drop for Download {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn start_download(f: &Fabric, size: u64) -> anyhow::Result<Download> {
    let host = http_addr();
    let (tunnel, mut conn) = f.dial(&host, Duration::from_secs(10)).await?;
    conn.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let task = tokio::spawn(async move {
        let _tunnel = tunnel;
        drain_counting(conn, p).await
    });
    Ok(Download { progress, task })
}

pub(super) async fn wait_progress(downloads: &[&Download], bytes: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while downloads.iter().any(|d| d.progress.load(Ordering::Relaxed) < bytes) {
        anyhow::ensure!(Instant::now() < deadline, "transfers did not reach {bytes} bytes within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How a transfer that should have been cut ended: `Err` if it hung past `within`.
pub(super) async fn ended_within(
    mut d: Download,
    within: Duration,
) -> anyhow::Result<(Duration, Result<(), std::io::Error>)> {
    let started = Instant::now();
    match tokio::time::timeout(within, &mut d.task).await {
        Ok(joined) => Ok((started.elapsed(), joined?)),
        Err(_) => anyhow::bail!("transfer still running {within:?} later (a hang)"),
    }
}

/// `GET /bytes/size` with `Connection: close`, body hashed as it streams; (sha256 of the body, time taken).
pub(super) async fn download_hashed(
    f: &Fabric,
    size: usize,
    within: Duration,
) -> anyhow::Result<(String, usize, Duration)> {
    let started = Instant::now();
    let host = http_addr();
    let (_tunnel, mut conn) = f.dial(&host, within).await?;
    conn.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let body = tokio::time::timeout(within.saturating_sub(started.elapsed()), read_body(&mut conn))
        .await
        .map_err(|_| anyhow::anyhow!("{size}-byte transfer not done within {within:?}"))??;
    Ok((body.0, body.1, started.elapsed()))
}

pub(super) async fn read_body(conn: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<(String, usize)> {
    let mut head = Vec::new();
    let mut hash = StreamHash::default();
    let mut in_body = false;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if in_body {
            hash.update(&buf[..n]);
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "bad response: {:?}", String::from_utf8_lossy(&head));
            hash.update(&head[end + 4..]);
            in_body = true;
        }
    }
    let len = hash.len;
    Ok((hash.hex(), len))
}

/// One echo round trip on an open connection.
pub(super) async fn echo_roundtrip(
    conn: &mut konnectivity_client::TunnelConn,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    conn.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    tokio::time::timeout(within, conn.read_exact(&mut got)).await??;
    anyhow::ensure!(&got == b"ping", "echo returned {got:?}");
    Ok(started.elapsed())
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(super) fn describe(r: &Result<(), std::io::Error>) -> String {
    match r {
        Ok(()) => "clean EOF".into(),
        Err(e) => format!("error: {e}"),
    }
}
