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

mod load;
mod stack;

use crate::scenarios::Path;
use clap::Parser;
use konnectivity_client::ProxyAddress;
use load::{Counters, Load, RestartWindow, bulk_worker, churn_worker, request_worker};
use stack::{ProcStats, Stack, proc_stats, server_gauge, thread_names};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Soak test of konnectivity-rs: mixed load for a while against real processes, watching RSS, fds and threads.
#[derive(Debug, Parser)]
#[command(name = "konnectivity-soak", version)]
pub struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub duration: u64,
    /// Seconds of load before the RSS baseline is taken.
    #[arg(long, default_value_t = 180)]
    pub warmup: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    pub sample_every: u64,
    /// Seconds between agent restarts (0: never).
    #[arg(long, default_value_t = 300)]
    pub agent_restart_every: u64,
    /// Where proxy-server and proxy-agent are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Frontend mode: grpc or http-connect.
    #[arg(long, default_value = "grpc")]
    pub mode: String,
    /// Bytes per bulk transfer.
    #[arg(long, default_value_t = 32 << 20)]
    pub bulk_bytes: u64,
    /// Concurrent small-request workers.
    #[arg(long, default_value_t = 8)]
    pub request_workers: usize,
    /// Concurrent dial-churn workers.
    #[arg(long, default_value_t = 4)]
    pub churn_workers: usize,
}

/// Descriptors an idle server may hold beyond its idle count before the load (a certificate file being re-read
/// at that instant, a metrics scrape), and threads (tokio's blocking pool keeps a thread the periodic TLS reload
/// uses). A leak is a count that grows with the load; these do not.
const FD_SLACK: usize = 2;
const THREAD_SLACK: u64 = 2;
/// Runtime tasks likewise (the scrape that reads the figure is one).
const TASK_SLACK: f64 = 2.0;

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

/// Runs the soak; whether every check of the verdict passed.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    let tmp = konnectivity_testkit::TempDir::new("konnectivity-soak")?;
    let pki = konnectivity_testkit::pki::Pki::generate(tmp.path())?;
    let stop_target = CancellationToken::new();
    let target = crate::target::start(stop_target.clone()).await?;
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
    Ok(pass)
}
