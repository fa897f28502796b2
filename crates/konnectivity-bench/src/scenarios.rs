//! The measurements. Each takes a way to open a connection to the target (direct, or through a stack) and
//! returns numbers; CPU and memory of the stack's processes are read around them by the caller.

use crate::target::MESSAGE;
use konnectivity_client::{ProxyAddress, Tunnel, http_connect};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A byte stream to the target.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}
/// A boxed [`Conn`].
pub type BoxConn = Pin<Box<dyn Conn>>;

/// How connections reach the target.
#[derive(Clone)]
pub enum Path {
    /// Straight to the target.
    Direct,
    /// Through a proxy-server in gRPC mode (one single-use tunnel per connection, as kube-apiserver).
    Grpc(ProxyAddress),
    /// Through a proxy-server in HTTP CONNECT mode.
    Connect(ProxyAddress),
}

impl Path {
    /// Opens a connection to `target` this way.
    pub async fn dial(&self, target: SocketAddr) -> anyhow::Result<BoxConn> {
        Ok(match self {
            Path::Direct => {
                let s = tokio::net::TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                Box::pin(s)
            }
            Path::Grpc(proxy) => {
                let tunnel = Tunnel::connect_single_use(proxy).await?;
                Box::pin(tunnel.dial(&target.to_string()).await?)
            }
            Path::Connect(proxy) => {
                Box::pin(http_connect::dial(proxy, &target.to_string(), "konnectivity-bench").await?)
            }
        })
    }
}

/// Downloads `bytes` over one connection; returns seconds.
pub async fn download(path: &Path, target: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut c = path.dial(target).await?;
    let start = Instant::now();
    c.write_all(format!("D {bytes}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = c.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "download cut at {got} of {bytes} bytes");
        got += n as u64;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Uploads `bytes` over one connection and waits for the target's acknowledgement; returns seconds.
pub async fn upload(path: &Path, target: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut c = path.dial(target).await?;
    let start = Instant::now();
    c.write_all(format!("U {bytes}\n").as_bytes()).await?;
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        c.write_all(&chunk[..k]).await?;
        left -= k as u64;
    }
    let mut ok = [0u8; 3];
    c.read_exact(&mut ok).await?;
    anyhow::ensure!(&ok == b"ok\n", "upload not acknowledged");
    Ok(start.elapsed().as_secs_f64())
}

/// `n` parallel downloads of `each` bytes; returns seconds for all.
pub async fn parallel_download(path: &Path, target: SocketAddr, n: usize, each: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let path = path.clone();
        tasks.push(tokio::spawn(async move { download(&path, target, each).await }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Latencies (seconds) of `n` requests of 1 KiB each with a fresh connection per request.
pub async fn fresh_dial_latency(path: &Path, target: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let msg = vec![7u8; MESSAGE];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut c = path.dial(target).await?;
        c.write_all(b"R\n").await?;
        c.write_all(&msg).await?;
        let mut back = vec![0u8; MESSAGE];
        c.read_exact(&mut back).await?;
        out.push(start.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Latencies (seconds) of `n` 1 KiB request/responses on one kept connection.
pub async fn kept_latency(path: &Path, target: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let msg = vec![7u8; MESSAGE];
    let mut c = path.dial(target).await?;
    c.write_all(b"R\n").await?;
    let mut back = vec![0u8; MESSAGE];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        c.write_all(&msg).await?;
        c.read_exact(&mut back).await?;
        out.push(start.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Dials completed per second by `workers` concurrent dialers during `dur` (each dial carries one round trip).
pub async fn dial_rate(path: &Path, target: SocketAddr, workers: usize, dur: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let msg = vec![1u8; 16];
            while start.elapsed() < dur {
                let mut c = path.dial(target).await?;
                c.write_all(b"E\n").await?;
                c.write_all(&msg).await?;
                let mut back = [0u8; 16];
                c.read_exact(&mut back).await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Opens `n` tunnels to the echo target and checks each carries a byte; returns them, open and idle.
pub async fn idle_tunnels(path: &Path, target: SocketAddr, n: usize) -> anyhow::Result<Vec<BoxConn>> {
    let mut conns = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        let path = path.clone();
        batch.push(tokio::spawn(async move {
            let mut c = path.dial(target).await?;
            c.write_all(b"E\nx").await?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await?;
            Ok::<_, anyhow::Error>(c)
        }));
        if batch.len() == 64 || i + 1 == n {
            for t in batch.drain(..) {
                conns.push(t.await??);
            }
        }
    }
    Ok(conns)
}

/// Head-of-line: bulk download throughput next to a tunnel whose reader has stopped, and alone (MB/s each).
/// A bulk transfer that cannot even start or finish within `patience` (the reference's agent stream stalls
/// behind the unread tunnel, so the new dial's answer never comes) counts as 0.
pub async fn head_of_line(
    path: &Path,
    target: SocketAddr,
    bytes: u64,
    patience: Duration,
) -> anyhow::Result<(f64, f64)> {
    let alone = download(path, target, bytes).await?;
    let mut stalled = path.dial(target).await?;
    stalled.write_all(format!("D {}\n", 1u64 << 40).as_bytes()).await?;
    let mut first = [0u8; 1];
    stalled.read_exact(&mut first).await?;
    // Let the stalled tunnel fill every buffer it can before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let beside = tokio::time::timeout(patience, download(path, target, bytes)).await;
    drop(stalled);
    let beside_mbps = match beside {
        Ok(Ok(secs)) => bytes as f64 / secs / 1e6,
        Ok(Err(_)) | Err(_) => 0.0,
    };
    Ok((bytes as f64 / alone / 1e6, beside_mbps))
}

/// The `q`-quantile of samples (sorted in place).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}
