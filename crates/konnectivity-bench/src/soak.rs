//! `konnectivity-soak`: a long mixed load against real proxy-server and proxy-agent processes on loopback,
//! watching for leaks (docs/reliability.md).
//!
//! For `--duration` it runs, at once: bulk transfers both ways, small request/response exchanges on fresh
//! tunnels, dial churn (connect, echo a little, close) including dials to a refused port, and it restarts the
//! agent (SIGKILL, then a new process) every `--agent-restart-every`. Every `--sample-every` it records the
//! server's and agent's RSS, open descriptors and threads (from /proc), the server's runtime tasks (its
//! `tokio_alive_tasks` metric) and the request counts, and prints a trend table. The verdict: server RSS growth
//! after the warm-up under 5% (median of the first three samples against the last three), server threads not
//! growing under load, server descriptors, threads and tasks back to their idle level (within a slack of 2) once
//! the load stops, no connection or pending dial left on the server, and no
//! failed request beyond the injected faults (dials to the refused port, requests cut by an agent restart).
#![forbid(unsafe_code)]

#[allow(dead_code)]
mod scenarios;
#[allow(dead_code)]
mod target;

use clap::Parser;
use konnectivity_client::ProxyAddress;
use konnectivity_testkit::{ChildProcess, free_port};
use scenarios::Path;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Soak test of konnectivity-rs: mixed load for a while against real processes, watching RSS, fds and threads.
#[derive(Debug, Parser)]
#[command(name = "konnectivity-soak", version)]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 1800)]
    duration: u64,
    /// Seconds of load before the RSS baseline is taken.
    #[arg(long, default_value_t = 180)]
    warmup: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    sample_every: u64,
    /// Seconds between agent restarts (0: never).
    #[arg(long, default_value_t = 300)]
    agent_restart_every: u64,
    /// Where proxy-server and proxy-agent are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Frontend mode: grpc or http-connect.
    #[arg(long, default_value = "grpc")]
    mode: String,
    /// Bytes per bulk transfer.
    #[arg(long, default_value_t = 32 << 20)]
    bulk_bytes: u64,
    /// Concurrent small-request workers.
    #[arg(long, default_value_t = 8)]
    request_workers: usize,
    /// Concurrent dial-churn workers.
    #[arg(long, default_value_t = 4)]
    churn_workers: usize,
}

/// Descriptors an idle server may hold beyond its idle count before the load (a certificate file being re-read
/// at that instant, a metrics scrape), and threads (tokio's blocking pool keeps a thread the periodic TLS reload
/// uses). A leak is a count that grows with the load; these do not.
const FD_SLACK: usize = 2;
const THREAD_SLACK: u64 = 2;
/// Runtime tasks likewise (the scrape that reads the figure is one).
const TASK_SLACK: f64 = 2.0;

/// One process's figures at a sample.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStats {
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn proc_stats(process: &ChildProcess) -> ProcStats {
    let Some(pid) = process.pid() else { return ProcStats::default() };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcStats {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
    }
}

/// The names of a process's threads.
fn thread_names(process: &ChildProcess) -> Vec<String> {
    let Some(pid) = process.pid() else { return Vec::new() };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut names: Vec<String> = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// Counts, shared by the load tasks.
#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    bytes: AtomicU64,
    /// Failures expected by construction: dials to the refused port.
    refused_as_expected: AtomicU64,
    /// Failures while an agent restart was in progress (injected).
    during_restart: AtomicU64,
    /// Failures nothing explains.
    unexpected: AtomicU64,
}

/// Whether an agent restart is in progress (failures then are injected faults), with its end.
#[derive(Default)]
struct RestartWindow {
    until: std::sync::Mutex<Option<Instant>>,
}

impl RestartWindow {
    fn open(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + Duration::from_secs(3600));
    }
    /// The restart is over: failures are unexpected again after a grace period.
    fn close(&self, grace: Duration) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + grace);
    }
    fn active(&self) -> bool {
        self.until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }
}

struct Load {
    path: Path,
    target: SocketAddr,
    refused: SocketAddr,
    counters: Counters,
    restart: RestartWindow,
    errors: std::sync::Mutex<Vec<String>>,
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

async fn bulk_worker(load: Arc<Load>, bytes: u64, stop: CancellationToken) {
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

async fn request_worker(load: Arc<Load>, stop: CancellationToken) {
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

async fn churn_worker(load: Arc<Load>, n: usize, stop: CancellationToken) {
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

struct Stack {
    server: ChildProcess,
    agent: ChildProcess,
    agent_args: Vec<String>,
    agent_bin: PathBuf,
    server_health: u16,
    server_admin: u16,
    dir: PathBuf,
    uds: PathBuf,
}

/// Starts `bin`; its stderr is appended to `log` (one log across the agent's restarts).
fn spawn(bin: &FsPath, args: &[String], log: &FsPath) -> anyhow::Result<ChildProcess> {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
    Ok(ChildProcess::spawn(bin.display().to_string(), &mut cmd)?.with_log(log.to_path_buf()))
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// A gauge's value from the server's /metrics.
fn server_gauge(stack: &Stack, name: &str) -> Option<f64> {
    let (_, text) = http_get(stack.server_admin, "/metrics")?;
    text.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.split_whitespace().last()?.parse().ok()
}

impl Stack {
    fn start(args: &Args, pki: &konnectivity_testkit::pki::Pki, dir: &FsPath) -> anyhow::Result<Self> {
        let uds = dir.join("soak.sock");
        let (agent_port, server_health, server_admin) = (free_port(), free_port(), free_port());
        let server_args = vec![
            format!("--mode={}", args.mode),
            format!("--uds-name={}", uds.display()),
            "--server-port=0".into(),
            format!("--cluster-cert={}", pki.server_cert.display()),
            format!("--cluster-key={}", pki.server_key.display()),
            format!("--cluster-ca-cert={}", pki.ca.display()),
            format!("--agent-port={agent_port}"),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--health-port={server_health}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--admin-port={server_admin}"),
            "--admin-bind-address=127.0.0.1".into(),
            "--v=0".into(),
        ];
        let server = spawn(&args.bin_dir.join("proxy-server"), &server_args, &dir.join("server.log"))?;
        let agent_args = vec![
            format!("--ca-cert={}", pki.ca.display()),
            format!("--agent-cert={}", pki.agent_cert.display()),
            format!("--agent-key={}", pki.agent_key.display()),
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={agent_port}"),
            "--health-server-host=127.0.0.1".into(),
            "--health-server-port=0".into(),
            "--admin-bind-address=127.0.0.1".into(),
            "--admin-server-port=0".into(),
            "--sync-interval=100ms".into(),
            "--v=0".into(),
        ];
        let agent_bin = args.bin_dir.join("proxy-agent");
        let agent = spawn(&agent_bin, &agent_args, &dir.join("agent.log"))?;
        let stack =
            Self { server, agent, agent_args, agent_bin, server_health, server_admin, dir: dir.to_path_buf(), uds };
        stack.wait_ready(Duration::from_secs(30))?;
        Ok(stack)
    }

    fn wait_ready(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if http_get(self.server_health, "/readyz").is_some_and(|(s, _)| s == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("no agent connected within {patience:?} (logs in {})", self.dir.display())
    }

    /// Kills the agent and starts a new one; returns once it is connected.
    fn restart_agent(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.agent.kill();
        // The server notices the old stream's end first (else its /readyz still counts the dead agent), then the
        // new agent connects.
        let deadline = Instant::now() + Duration::from_secs(30);
        while server_gauge(self, "konnectivity_network_proxy_server_ready_backend_connections") != Some(0.0) {
            anyhow::ensure!(Instant::now() < deadline, "the server still counts the killed agent after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = spawn(&self.agent_bin, &self.agent_args, &self.dir.join("agent.log"))?;
        self.wait_ready(Duration::from_secs(30))?;
        Ok(started.elapsed())
    }
}

struct Sample {
    at: Duration,
    server: ProcStats,
    /// The server's `tokio_alive_tasks`.
    server_tasks: Option<f64>,
    agent: ProcStats,
    ok: u64,
    bytes: u64,
    refused: u64,
    during_restart: u64,
    unexpected: u64,
    restarts: u32,
}

/// The end-of-run checks, as printed lines, and whether all passed.
struct Verdict {
    lines: Vec<String>,
    pass: bool,
}

impl Default for Verdict {
    fn default() -> Self {
        Self { lines: Vec::new(), pass: true }
    }
}

impl Verdict {
    /// A check: `what`, then the first word of `(ok, fail)` that applies.
    fn check(&mut self, what: String, ok: bool, (ok_text, fail_text): (&str, &str)) {
        self.pass &= ok;
        self.lines.push(format!("{what}: {}", if ok { ok_text } else { fail_text }));
    }

    /// A figure without a pass/fail of its own.
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }
}

/// A metric value read from a scrape, or `?` when the scrape failed.
fn count(value: Option<f64>) -> String {
    value.map_or("?".into(), |v| format!("{v:.0}"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_row(s: &Sample) {
    println!(
        "| {:>6.1} | {:>8.1} | {:>4} | {:>3} | {:>5} | {:>8.1} | {:>4} | {:>3} | {:>9} | {:>9.0} | {:>7} | {:>7} | {:>5} | {:>3} |",
        s.at.as_secs_f64() / 60.0,
        mib(s.server.rss_kib),
        s.server.fds,
        s.server.threads,
        count(s.server_tasks),
        mib(s.agent.rss_kib),
        s.agent.fds,
        s.agent.threads,
        s.ok,
        s.bytes as f64 / (1024.0 * 1024.0),
        s.refused,
        s.during_restart,
        s.unexpected,
        s.restarts
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = konnectivity_testkit::TempDir::new("konnectivity-soak")?;
    let pki = konnectivity_testkit::pki::Pki::generate(tmp.path())?;
    let stop_target = CancellationToken::new();
    let target = target::start(stop_target.clone()).await?;
    // A port that refuses for the whole run: bound but never listening, so no other process (the machine's other
    // tests) can take it and no outgoing connection can get it as its source port and connect to itself (a port
    // merely left free did both, now and then, over 75 000 dials).
    let refused_socket = tokio::net::TcpSocket::new_v4()?;
    refused_socket.bind("127.0.0.1:0".parse()?)?;
    let refused = refused_socket.local_addr()?;
    let mut stack = Stack::start(&args, &pki, tmp.path())?;
    let proxy = ProxyAddress::Uds(stack.uds.clone());
    let path = match args.mode.as_str() {
        "grpc" => Path::Grpc(proxy),
        "http-connect" => Path::Connect(proxy),
        other => anyhow::bail!("--mode={other}: want grpc or http-connect"),
    };
    // Let the server settle (its TLS files are re-read every 5 s, on tokio's blocking pool), then take the idle
    // figures the end is compared with.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let idle_before = proc_stats(&stack.server);
    let idle_tasks_before = server_gauge(&stack, "tokio_alive_tasks");
    println!(
        "konnectivity-soak: {} s of mixed load ({}), agent restarts every {} s, samples every {} s, warm-up {} s",
        args.duration, args.mode, args.agent_restart_every, args.sample_every, args.warmup
    );
    println!(
        "idle server before the load: RSS {:.1} MiB, {} fds, {} threads, {} tasks",
        mib(idle_before.rss_kib),
        idle_before.fds,
        idle_before.threads,
        count(idle_tasks_before)
    );

    let load = Arc::new(Load {
        path,
        target,
        refused,
        counters: Counters::default(),
        restart: RestartWindow::default(),
        errors: std::sync::Mutex::new(Vec::new()),
    });
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(tokio::spawn(bulk_worker(load.clone(), args.bulk_bytes, stop.clone())));
    }
    for _ in 0..args.request_workers {
        workers.push(tokio::spawn(request_worker(load.clone(), stop.clone())));
    }
    for n in 0..args.churn_workers {
        workers.push(tokio::spawn(churn_worker(load.clone(), n, stop.clone())));
    }

    println!();
    println!(
        "| min    | srv MiB  | fds  | thr | tasks | agt MiB  | fds  | thr | requests  | MiB moved | refused | restart | unexp | rst |"
    );
    println!(
        "|--------|----------|------|-----|-------|----------|------|-----|-----------|-----------|---------|---------|-------|-----|"
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let mut next_sample = start + Duration::from_secs(args.sample_every);
    let mut next_restart =
        (args.agent_restart_every > 0).then(|| start + Duration::from_secs(args.agent_restart_every));
    let mut samples = Vec::new();
    let mut restarts = 0u32;
    let mut restart_times = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(at) = next_restart
            && now >= at
        {
            load.restart.open();
            let took = tokio::task::block_in_place(|| stack.restart_agent())?;
            // Requests that were cut take up to their own timeouts to fail: count those as injected too.
            load.restart.close(Duration::from_secs(25));
            restarts += 1;
            restart_times.push(took);
            next_restart = Some(Instant::now() + Duration::from_secs(args.agent_restart_every));
        }
        if now >= next_sample {
            let c = &load.counters;
            let s = Sample {
                at: start.elapsed(),
                server: proc_stats(&stack.server),
                server_tasks: server_gauge(&stack, "tokio_alive_tasks"),
                agent: proc_stats(&stack.agent),
                ok: c.ok.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                refused: c.refused_as_expected.load(Ordering::Relaxed),
                during_restart: c.during_restart.load(Ordering::Relaxed),
                unexpected: c.unexpected.load(Ordering::Relaxed),
                restarts,
            };
            print_row(&s);
            samples.push(s);
            next_sample += Duration::from_secs(args.sample_every);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(90), w).await;
    }

    // Once the load is over, nothing may be left on the server, and its descriptors and threads go back to idle.
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    let (mut established, mut pending, mut idle_tasks_after);
    let tasks_ok = |after: Option<f64>| matches!((idle_tasks_before, after), (Some(b), Some(a)) if a <= b + TASK_SLACK);
    loop {
        established = server_gauge(&stack, "konnectivity_network_proxy_server_established_connections");
        pending = server_gauge(&stack, "konnectivity_network_proxy_server_pending_backend_dials");
        idle_tasks_after = server_gauge(&stack, "tokio_alive_tasks");
        let idle = proc_stats(&stack.server);
        // Threads too: tokio's blocking pool keeps an idle thread for 10 s.
        let settled = established == Some(0.0)
            && pending == Some(0.0)
            && tasks_ok(idle_tasks_after)
            && idle.fds <= idle_before.fds + FD_SLACK
            && idle.threads <= idle_before.threads + THREAD_SLACK;
        if settled || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let idle_after = proc_stats(&stack.server);
    let thread_names = thread_names(&stack.server);
    stop_target.cancel();
    drop(refused_socket);

    let c = &load.counters;
    println!();
    println!(
        "load: {} requests ok, {:.0} MiB moved, {} refused dials failed as expected, {} failures during {} agent \
         restarts (reconnected in {}), {} unexpected failures",
        c.ok.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
        c.refused_as_expected.load(Ordering::Relaxed),
        c.during_restart.load(Ordering::Relaxed),
        restarts,
        restart_times.iter().map(|d| format!("{:.2}s", d.as_secs_f64())).collect::<Vec<_>>().join(", "),
        c.unexpected.load(Ordering::Relaxed)
    );
    for e in load.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  unexpected: {e}");
    }
    println!(
        "idle server after the load: RSS {:.1} MiB, {} fds, {} threads ({}), {} tasks; established {}, pending dials {}",
        mib(idle_after.rss_kib),
        idle_after.fds,
        idle_after.threads,
        thread_names.join(", "),
        count(idle_tasks_after),
        count(established),
        count(pending)
    );

    // The verdict.
    let after_warmup: Vec<&Sample> = samples.iter().filter(|s| s.at >= Duration::from_secs(args.warmup)).collect();
    let mut verdict = Verdict::default();
    if after_warmup.len() >= 2 {
        // Medians of the first and of the last three samples: RSS moves by a MiB or two from one sample to the
        // next with what the allocator holds at that moment.
        let median = |samples: Vec<u64>| {
            let mut samples = samples;
            samples.sort_unstable();
            samples[samples.len() / 2] as f64
        };
        let base = median(after_warmup.iter().take(3).map(|s| s.server.rss_kib).collect());
        let end = median(after_warmup.iter().rev().take(3).map(|s| s.server.rss_kib).collect());
        let growth = (end - base) / base * 100.0;
        verdict.check(
            format!("server RSS after warm-up {:.1} -> {:.1} MiB ({growth:+.1}%)", base / 1024.0, end / 1024.0),
            growth < 5.0,
            ("ok (< 5%)", "FAIL (>= 5%)"),
        );
        let fds: Vec<usize> = after_warmup.iter().map(|s| s.server.fds).collect();
        let (lo, hi) = (fds.iter().min().copied().unwrap_or(0), fds.iter().max().copied().unwrap_or(0));
        verdict.note(format!("server fds under load after warm-up: {lo}..{hi}"));
        let tasks: Vec<f64> = after_warmup.iter().filter_map(|s| s.server_tasks).collect();
        let (lo, hi) = tasks.iter().fold((f64::MAX, 0.0f64), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
        verdict.note(format!("server tasks under load after warm-up: {lo:.0}..{hi:.0}"));
        // Threads must not grow under load: the last third of the samples has no more than the first third.
        let third = after_warmup.len().div_ceil(3);
        let first = after_warmup.iter().take(third).map(|s| s.server.threads).max().unwrap_or(0);
        let last = after_warmup.iter().rev().take(third).map(|s| s.server.threads).max().unwrap_or(0);
        verdict.check(
            format!("server threads under load, first/last third: {first}/{last}"),
            last <= first,
            ("ok (flat)", "FAIL (growing)"),
        );
    } else {
        verdict.check("too few samples after the warm-up for an RSS trend".into(), false, ("", "FAIL (run longer)"));
    }
    const FLAT: (&str, &str) = ("ok (flat)", "FAIL");
    verdict.check(
        format!("server fds idle before/after: {}/{}", idle_before.fds, idle_after.fds),
        idle_after.fds <= idle_before.fds + FD_SLACK,
        FLAT,
    );
    verdict.check(
        format!("server threads idle before/after: {}/{}", idle_before.threads, idle_after.threads),
        idle_after.threads <= idle_before.threads + THREAD_SLACK,
        FLAT,
    );
    verdict.check(
        format!("server tasks idle before/after: {}/{}", count(idle_tasks_before), count(idle_tasks_after)),
        tasks_ok(idle_tasks_after),
        FLAT,
    );
    verdict.check(
        format!("server connections/pending dials left: {}/{}", count(established), count(pending)),
        established == Some(0.0) && pending == Some(0.0),
        ("ok", "FAIL"),
    );
    let unexpected = c.unexpected.load(Ordering::Relaxed);
    verdict.check(format!("failures beyond the injected faults: {unexpected}"), unexpected == 0, ("ok", "FAIL"));
    println!();
    for v in &verdict.lines {
        println!("verdict: {v}");
    }
    let pass = verdict.pass;
    println!("verdict: {}", if pass { "PASS" } else { "FAIL" });
    drop(stack);
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}
