//! The konnectivity-rs demo: a proxy-server (Unix-socket frontend, mTLS agent port), a proxy-agent and an HTTP
//! target, all on loopback, with a throwaway PKI. It sends real traffic through the tunnel, prints what each
//! request did, and exits 0 when every check passed. With `--stay` it keeps running and prints how to reach it.
//!
//! Everything runs in this one process, so its transfer figures are those of this binary's build profile (release
//! through `scripts/demo`), with client, server, agent and target sharing the machine: a sanity check, not a
//! benchmark. The side-by-side comparison with the reference is `scripts/bench` (docs/benchmarks.md).
use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use konnectivity_client::Tunnel;
use konnectivity_it::http::request;
use konnectivity_it::stack::{Frontend, Stack, server_and_agent};
use konnectivity_it::targets::{http_target, pattern, sha256_hex};
use std::time::{Duration, Instant};

/// Runs a proxy-server, a proxy-agent and an HTTP target on loopback and carries traffic through the tunnel.
#[derive(Debug, Parser)]
#[command(name = "konnectivity-demo", version, about)]
struct Args {
    /// Keep everything running after the checks (until Ctrl-C) and print how to use it.
    #[arg(long)]
    stay: bool,
    /// Size of the large download and upload, in MiB.
    #[arg(long, default_value_t = 20)]
    mib: usize,
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// The build profile of this binary, which is the profile of the server and agent it runs in-process.
const PROFILE: &str = if cfg!(debug_assertions) { "debug" } else { "release" };

/// The machine's CPUs and its one-minute load average (Linux), which the figures depend on as much as the code.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").ok();
    match load.as_deref().and_then(|l| l.split_whitespace().next()) {
        Some(load) => format!("{cpus} CPUs, load average {load}"),
        None => format!("{cpus} CPUs"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    konnectivity_process::logging::init_with("warn");
    let stack = Stack::new().context("generating the demo PKI")?;
    let (server, agent) =
        server_and_agent(&stack, Frontend::Uds).await.context("starting proxy-server and proxy-agent")?;
    let target = http_target("127.0.0.1:0").await.context("starting the HTTP target")?;
    let host = target.addr.to_string();
    let konnectivity_server::FrontendAddr::Uds(socket) = server.frontend_addr.clone() else {
        bail!("expected a UDS frontend")
    };

    println!("konnectivity-rs demo ({PROFILE} build; client, server, agent and target in this one process)");
    println!("  proxy-server  frontend unix:{}  agent port {} (mTLS)", socket.display(), server.agent_addr);
    println!("  proxy-agent   connected to server {:?}", agent.handle.connected_servers());
    println!("  target        http://{host} (reached only through the agent)");
    println!(
        "  path          client -> unix socket -> proxy-server -> agent stream (TLS) -> proxy-agent -> tcp {host}"
    );
    println!();

    let proxy = stack.proxy_address(&server)?;
    let mut failures = 0;

    // 1. A plain GET through a single-use tunnel, as kube-apiserver makes one.
    let t = Instant::now();
    let tunnel = Tunnel::connect_single_use(&proxy).await?;
    let conn = tunnel.dial(&host).await?;
    let (status, body) = request(conn, "GET", &host, "/success", Bytes::new()).await?;
    let ok = status == 200 && &body[..] == b"success";
    failures += usize::from(!ok);
    println!(
        "{} GET  /success            status {status}  {:>9} bytes  {:>8.2} ms",
        if ok { "ok  " } else { "FAIL" },
        body.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // 2. A large download, checked byte for byte.
    let size = args.mib << 20;
    let t = Instant::now();
    let tunnel = Tunnel::connect_single_use(&proxy).await?;
    let conn = tunnel.dial(&host).await?;
    let (status, body) = request(conn, "GET", &host, &format!("/bytes/{size}"), Bytes::new()).await?;
    let d = t.elapsed();
    let ok = status == 200 && body.len() == size && sha256_hex(&body) == sha256_hex(&pattern(size));
    failures += usize::from(!ok);
    println!(
        "{} GET  /bytes/{size:<10} status {status}  {:>9} bytes  {:>8.2} ms  {:.0} MB/s, sha256 {}",
        if ok { "ok  " } else { "FAIL" },
        body.len(),
        d.as_secs_f64() * 1e3,
        mbps(body.len(), d),
        if ok { "matches" } else { "DIFFERS" }
    );

    // 3. A large upload; the target answers with the length and checksum it received.
    let upload = Bytes::from(pattern(size));
    let t = Instant::now();
    let tunnel = Tunnel::connect_single_use(&proxy).await?;
    let conn = tunnel.dial(&host).await?;
    let (status, body) = request(conn, "POST", &host, "/upload", upload.clone()).await?;
    let d = t.elapsed();
    let ok = status == 200 && String::from_utf8_lossy(&body) == format!("{size} {}", sha256_hex(&upload));
    failures += usize::from(!ok);
    println!(
        "{} POST /upload              status {status}  {:>9} bytes  {:>8.2} ms  {:.0} MB/s, target saw {}",
        if ok { "ok  " } else { "FAIL" },
        size,
        d.as_secs_f64() * 1e3,
        mbps(size, d),
        String::from_utf8_lossy(&body).split(' ').next().unwrap_or("?")
    );

    // 4. Many dials over one reusable tunnel, concurrently.
    let t = Instant::now();
    let reusable = Tunnel::connect(&proxy).await?;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (tunnel, host) = (reusable.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            let conn = tunnel.dial(&host).await?;
            request(conn, "GET", &host, "/success", Bytes::new()).await
        }));
    }
    let mut good = 0;
    for task in tasks {
        if matches!(task.await?, Ok((200, ref b)) if &b[..] == b"success") {
            good += 1;
        }
    }
    let ok = good == 50;
    failures += usize::from(!ok);
    println!(
        "{} 50 concurrent GETs over one reusable tunnel: {good}/50 ok in {:.2} ms",
        if ok { "ok  " } else { "FAIL" },
        t.elapsed().as_secs_f64() * 1e3
    );

    // 5. Errors are reported, not hidden: a refused port.
    let closed = konnectivity_it::targets::closed_port()?;
    let refused = closed.addr;
    let tunnel = Tunnel::connect_single_use(&proxy).await?;
    let err = tunnel.dial(&refused.to_string()).await.err().context("dial to a closed port succeeded")?;
    let ok = err.message.contains("connection refused");
    failures += usize::from(!ok);
    println!(
        "{} dial {refused} (closed port): {} error: {}",
        if ok { "ok  " } else { "FAIL" },
        err.reason.as_str(),
        err.message
    );

    // 6. The same through a second server in HTTP CONNECT mode (kube-apiserver's HTTPConnect egress).
    let connect_stack = Stack::new().context("generating the demo PKI")?;
    let (connect_server, connect_agent) =
        server_and_agent(&connect_stack, Frontend::ConnectUds).await.context("starting the HTTP CONNECT server")?;
    let connect_proxy = connect_stack.proxy_address(&connect_server)?;
    let t = Instant::now();
    let conn = konnectivity_client::http_connect::dial(&connect_proxy, &host, "konnectivity-demo").await?;
    let (status, body) = request(conn, "GET", &host, &format!("/bytes/{size}"), Bytes::new()).await?;
    let d = t.elapsed();
    let ok = status == 200 && body.len() == size && sha256_hex(&body) == sha256_hex(&pattern(size));
    failures += usize::from(!ok);
    println!(
        "{} CONNECT {host} over unix:{} then GET /bytes/{size}: status {status}, {} bytes, {:.2} ms, {:.0} MB/s",
        if ok { "ok  " } else { "FAIL" },
        connect_stack.uds.display(),
        body.len(),
        d.as_secs_f64() * 1e3,
        mbps(body.len(), d)
    );
    let err = konnectivity_client::http_connect::dial(&connect_proxy, &refused.to_string(), "konnectivity-demo")
        .await
        .err()
        .context("CONNECT to a closed port succeeded")?;
    let ok = err.message.starts_with("502") && err.message.contains("connection refused");
    failures += usize::from(!ok);
    println!("{} CONNECT {refused} (closed port): {}", if ok { "ok  " } else { "FAIL" }, err.message);
    connect_agent.stop().await;
    connect_server.stop().await;

    // Nothing left behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.handle.pending_dials() + server.handle.established_connections() + agent.handle.endpoint_connections()
        > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left =
        (server.handle.pending_dials(), server.handle.established_connections(), agent.handle.endpoint_connections());
    let ok = left == (0, 0, 0);
    failures += usize::from(!ok);
    println!(
        "{} afterwards: server pending dials {}, connections {}; agent endpoint connections {}",
        if ok { "ok  " } else { "FAIL" },
        left.0,
        left.1,
        left.2
    );

    if args.stay {
        println!();
        // scripts/demo builds every binary of the workspace next to this one.
        let bin_dir = std::env::current_exe()?.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let test_client = bin_dir.join("proxy-test-client");
        if test_client.exists() {
            println!("Still running. Try, in another shell:");
        } else {
            let build = if cfg!(debug_assertions) { "cargo build --bins" } else { "cargo build --release --bins" };
            println!("Still running. Try, in another shell (after `{build}`):");
        }
        println!(
            "  {} --proxy-uds={} --request-host=127.0.0.1 --request-port={} --request-path=success",
            test_client.display(),
            socket.display(),
            target.addr.port()
        );
        if let Some(h) = server.health_addr {
            println!("  curl http://{h}/readyz; curl http://{h}/metrics");
        }
        println!("Press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    agent.stop().await;
    server.stop().await;
    ensure!(failures == 0, "{failures} demo check(s) failed");
    println!();
    println!("all demo checks passed");
    println!(
        "(MB/s above: {PROFILE} build, one process on loopback, {}; ours against the Go reference: docs/benchmarks.md)",
        machine()
    );
    println!(
        "Next: start kube-apiserver with --egress-selector-config-file=deploy/kubernetes/egress-selector/grpc-uds.yaml \
         next to a proxy-server (docs/deployment.md#kube-apiserver)"
    );
    Ok(())
}
