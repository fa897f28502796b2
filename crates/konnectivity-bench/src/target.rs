//! The benchmark's target, in the bench process: a tiny line protocol so the target costs as little as possible.
//!
//! The client's first line says what it wants: `D <n>` the target sends n bytes and closes; `U <n>` the target
//! reads n bytes and answers `ok\n`; `R` request/response: for every 1 KiB received, 1 KiB back; `E` echo.

use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Size of a request/response message in the latency scenarios.
pub const MESSAGE: usize = 1024;

/// Starts the target; it stops when `stop` is cancelled.
pub async fn start(stop: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => { tokio::time::sleep(std::time::Duration::from_millis(5)).await; continue } },
            };
            let _ = tcp.set_nodelay(true);
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = serve(tcp) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn serve(tcp: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut rd = BufReader::with_capacity(256 * 1024, tcp);
    let mut line = String::new();
    rd.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().and_then(|n| n.parse::<u64>().ok())) {
        (Some("D"), Some(mut n)) => {
            let chunk = vec![0x5au8; 256 * 1024];
            let tcp = rd.get_mut();
            while n > 0 {
                let k = n.min(chunk.len() as u64) as usize;
                tcp.write_all(&chunk[..k]).await?;
                n -= k as u64;
            }
            tcp.shutdown().await
        }
        (Some("U"), Some(n)) => {
            let mut sink = (&mut rd).take(n);
            let got = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
            if got == n {
                rd.get_mut().write_all(b"ok\n").await?;
            }
            Ok(())
        }
        (Some("R"), _) => {
            let mut buf = vec![0u8; MESSAGE];
            loop {
                if rd.read_exact(&mut buf).await.is_err() {
                    return Ok(());
                }
                rd.get_mut().write_all(&buf).await?;
            }
        }
        (Some("E"), _) => {
            let (mut r, mut w) = tokio::io::split(rd);
            tokio::io::copy(&mut r, &mut w).await.map(|_| ())
        }
        _ => Ok(()),
    }
}
