//! `konnectivity-bench`'s run: konnectivity-rs and the Go reference side by side, on loopback, in one run.
//!
//! For each stack (direct; our server and agent; the reference's; the mixed pairs), in gRPC and HTTP CONNECT
//! mode over the Unix-socket frontend, it starts fresh processes and measures bulk throughput each way with
//! the CPU seconds the server and agent spent, parallel throughput, 1 KiB request latency with a fresh dial
//! and on a kept connection, dial rate, idle memory per tunnel, and head-of-line blocking. Every stack runs
//! once per round and rounds interleave the stacks; each figure is the median of the rounds with min–max, and
//! ratios compare with the reference and with direct measured in the same invocation.

use crate::procs::{self, Bins, Impl, Mode};
use crate::scenarios::{self, Path, quantile};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Benchmarks konnectivity-rs against the Go reference (apiserver-network-proxy) on loopback.
#[derive(Debug, Parser)]
#[command(name = "konnectivity-bench", version, about)]
pub struct Args {
    /// Small sizes and one round: checks the tool end to end (CI); its figures mean little.
    #[arg(long)]
    pub quick: bool,
    /// Rounds (each stack once per round, interleaved).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where our proxy-server and proxy-agent are (build with `cargo build --release`).
    #[arg(long, default_value = "target/release")]
    pub rust_bin_dir: PathBuf,
    /// Where the reference's binaries are (`interop/build.sh`).
    #[arg(long, default_value = "interop/bin")]
    pub go_bin_dir: PathBuf,
    /// Only stacks whose name contains one of these (comma-separated), e.g. `direct,rust/rust`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the markdown table here (it is printed too).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// With `--scale`: write a chart of the ratios (ours ÷ reference) here, as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Idle-tunnel counts for the memory figure (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub idle: Vec<usize>,
    /// Internal: run only the target and print its address (the bench runs its target in a process of its
    /// own, so 10,000 idle tunnels do not need 20,000 descriptors in one process).
    #[arg(long, hide = true)]
    pub serve_target: bool,
    /// Instead of the side-by-side table: the scale scenarios, one server (ours and the reference's) with
    /// this many simulated agents (comma-separated counts, e.g. `1000,5000`): memory per agent, dial latency,
    /// recovery after a server restart. `--runs` rounds; `--quick` takes fewer dial samples.
    #[arg(long, value_delimiter = ',', value_name = "agents")]
    pub scale: Vec<usize>,
    /// With `--scale`: also the HA scenario, three servers and this many simulated agents (comma-separated
    /// counts, e.g. `2000`): the time until every agent holds all three.
    #[arg(long, value_delimiter = ',', value_name = "agents")]
    pub scale_ha: Vec<usize>,
    /// Dial samples per scale measurement (default 500; 50 with `--quick`).
    #[arg(long, value_name = "n")]
    pub scale_dials: Option<usize>,
}

struct Sizes {
    bulk: u64,
    par16: u64,
    par64: u64,
    latency_samples: usize,
    dial_rate_for: Duration,
    idle: Vec<usize>,
    hol: u64,
}

#[derive(Clone, Copy)]
struct StackSpec {
    server: Option<Impl>,
    agent: Option<Impl>,
    mode: Mode,
}

impl StackSpec {
    fn name(&self) -> String {
        match (self.server, self.agent) {
            (Some(s), Some(a)) => format!("{}/{} {}", s.name(), a.name(), self.mode.flag()),
            _ => "direct".into(),
        }
    }
}

type Results = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

fn record(results: &mut Results, stack: &str, metric: &str, value: f64) {
    results.entry(stack.to_string()).or_default().entry(metric.to_string()).or_default().push(value);
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Runs the benchmark and prints (and writes) its tables.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.serve_target {
        let addr = crate::target::start(CancellationToken::new()).await?;
        println!("{addr}");
        std::future::pending::<()>().await;
    }
    let sizes = if args.quick {
        Sizes {
            bulk: 64 << 20,
            par16: 4 << 20,
            par64: 1 << 20,
            latency_samples: 100,
            dial_rate_for: Duration::from_secs(1),
            idle: vec![200],
            hol: 32 << 20,
        }
    } else {
        Sizes {
            bulk: 1 << 30,
            par16: 64 << 20,
            par64: 16 << 20,
            latency_samples: 2000,
            dial_rate_for: Duration::from_secs(5),
            idle: vec![1000, 10_000],
            hol: 256 << 20,
        }
    };
    let sizes = Sizes { idle: if args.idle.is_empty() { sizes.idle } else { args.idle.clone() }, ..sizes };
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let bins = Bins { rust: args.rust_bin_dir.clone(), go: args.go_bin_dir.clone() };
    for (dir, name) in [
        (&bins.rust, "proxy-server"),
        (&bins.rust, "proxy-agent"),
        (&bins.go, "proxy-server"),
        (&bins.go, "proxy-agent"),
    ] {
        anyhow::ensure!(
            dir.join(name).exists(),
            "{} is missing (cargo build --release; interop/build.sh)",
            dir.join(name).display()
        );
    }

    let mut stacks = vec![StackSpec { server: None, agent: None, mode: Mode::Grpc }];
    for mode in [Mode::Grpc, Mode::Connect] {
        for (s, a) in [(Impl::Rust, Impl::Rust), (Impl::Go, Impl::Go), (Impl::Rust, Impl::Go), (Impl::Go, Impl::Rust)] {
            stacks.push(StackSpec { server: Some(s), agent: Some(a), mode });
        }
    }
    stacks.retain(|s| args.only.is_empty() || args.only.iter().any(|o| s.name().contains(o.as_str())));

    let dir = konnectivity_testkit::TempDir::new("konnectivity-bench")?;
    let pki = konnectivity_testkit::pki::Pki::generate(dir.path())?;
    let (_target_proc, target) = spawn_target()?;
    if !args.scale.is_empty() {
        // Thousands of agents need thousands of descriptors here, and as many in the server.
        konnectivity_process::entry::raise_open_file_limit();
        let scale = crate::scale::ScaleArgs {
            agents: args.scale.clone(),
            ha: args.scale_ha.clone(),
            svg: args.svg.clone(),
            runs,
            dials: args.scale_dials.unwrap_or(if args.quick { 50 } else { 500 }),
            markdown: args.markdown.clone(),
        };
        return crate::scale::run(scale, &bins, dir.path(), &pki, target).await;
    }
    let mut results = Results::new();

    let started = std::time::Instant::now();
    let total = runs * stacks.len();
    for round in 0..runs {
        for (i, spec) in stacks.iter().enumerate() {
            let name = spec.name();
            let done = round * stacks.len() + i;
            let elapsed = started.elapsed().as_secs_f64();
            let eta = if done > 0 {
                format!(", about {:.0} s left", elapsed / done as f64 * (total - done) as f64)
            } else {
                String::new()
            };
            eprintln!("{}/{total}: round {}/{runs}, {name} ({elapsed:.0} s elapsed{eta})", done + 1, round + 1);
            if let Err(e) = measure(spec, &bins, dir.path(), &pki, target, &sizes, &mut results).await {
                eprintln!("  {name}: {e:#}");
                record(&mut results, &name, "errors", 1.0);
            }
        }
    }
    let table = markdown(&results, &stacks, &sizes, runs);
    println!("{table}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &table)?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&json(&results))?)?;
    }
    Ok(())
}

/// Starts this binary as the target process and reads its address.
fn spawn_target() -> anyhow::Result<(konnectivity_testkit::ChildProcess, std::net::SocketAddr)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve-target")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("target stdout"))?;
    let target = konnectivity_testkit::ChildProcess::new("target", child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line.trim().parse()?;
    Ok((target, addr))
}

async fn measure(
    spec: &StackSpec,
    bins: &Bins,
    dir: &std::path::Path,
    pki: &konnectivity_testkit::pki::Pki,
    target: std::net::SocketAddr,
    sizes: &Sizes,
    results: &mut Results,
) -> anyhow::Result<()> {
    let name = spec.name();
    let running = match (spec.server, spec.agent) {
        (Some(s), Some(a)) => Some(procs::start(bins, dir, pki, s, a, spec.mode)?),
        _ => None,
    };
    let path = match &running {
        None => Path::Direct,
        Some(r) => match spec.mode {
            Mode::Grpc => Path::Grpc(konnectivity_client::ProxyAddress::Uds(r.uds.clone())),
            Mode::Connect => Path::Connect(konnectivity_client::ProxyAddress::Uds(r.uds.clone())),
        },
    };
    let cpu = || running.as_ref().map(|r| r.cpu_seconds()).unwrap_or(0.0);

    // Warm up (first dials, TLS session, allocator).
    scenarios::download(&path, target, 4 << 20).await?;

    let c0 = cpu();
    let t = scenarios::download(&path, target, sizes.bulk).await?;
    record(results, &name, "download MB/s, 1 conn", sizes.bulk as f64 / t / 1e6);
    if running.is_some() {
        record(results, &name, "download CPU-s/GiB, server+agent", (cpu() - c0) / (sizes.bulk as f64 / GIB));
    }
    let c0 = cpu();
    let t = scenarios::upload(&path, target, sizes.bulk).await?;
    record(results, &name, "upload MB/s, 1 conn", sizes.bulk as f64 / t / 1e6);
    if running.is_some() {
        record(results, &name, "upload CPU-s/GiB, server+agent", (cpu() - c0) / (sizes.bulk as f64 / GIB));
    }
    let t = scenarios::parallel_download(&path, target, 16, sizes.par16).await?;
    record(results, &name, "download MB/s, 16 conns", 16.0 * sizes.par16 as f64 / t / 1e6);
    let t = scenarios::parallel_download(&path, target, 64, sizes.par64).await?;
    record(results, &name, "download MB/s, 64 conns", 64.0 * sizes.par64 as f64 / t / 1e6);

    let mut lat = scenarios::fresh_dial_latency(&path, target, sizes.latency_samples).await?;
    record(results, &name, "new tunnel + 1 KiB, p50 ms", quantile(&mut lat, 0.5) * 1e3);
    record(results, &name, "new tunnel + 1 KiB, p99 ms", quantile(&mut lat, 0.99) * 1e3);
    let mut lat = scenarios::kept_latency(&path, target, sizes.latency_samples).await?;
    record(results, &name, "kept conn 1 KiB, p50 ms", quantile(&mut lat, 0.5) * 1e3);
    record(results, &name, "kept conn 1 KiB, p99 ms", quantile(&mut lat, 0.99) * 1e3);
    let rate = scenarios::dial_rate(&path, target, 8, sizes.dial_rate_for).await?;
    record(results, &name, "dials/s (8 dialers)", rate);

    if let Some(r) = &running {
        for &n in &sizes.idle {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (s0, a0) = r.rss_kib();
            let conns = scenarios::idle_tunnels(&path, target, n).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (s1, a1) = r.rss_kib();
            record(
                results,
                &name,
                &format!("idle KiB/tunnel, server ({n} tunnels)"),
                s1.saturating_sub(s0) as f64 / n as f64,
            );
            record(
                results,
                &name,
                &format!("idle KiB/tunnel, agent ({n} tunnels)"),
                a1.saturating_sub(a0) as f64 / n as f64,
            );
            record(results, &name, &format!("server RSS MiB with {n} tunnels"), s1 as f64 / 1024.0);
            drop(conns);
        }
        let patience = if sizes.hol <= 32 << 20 { Duration::from_secs(10) } else { Duration::from_secs(15) };
        let (alone, beside) = scenarios::head_of_line(&path, target, sizes.hol, patience).await?;
        record(results, &name, "head-of-line: bulk beside a stalled tunnel / alone", beside / alone);
    }
    drop(running);
    Ok(())
}

fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(results: &Results, stacks: &[StackSpec], sizes: &Sizes, runs: usize) -> String {
    let mut out = String::new();
    let metrics: Vec<String> = {
        let mut m: Vec<String> = Vec::new();
        for s in stacks {
            if let Some(r) = results.get(&s.name()) {
                for k in r.keys() {
                    if !m.contains(k) {
                        m.push(k.clone());
                    }
                }
            }
        }
        m
    };
    out.push_str(&format!(
        "konnectivity-bench: {runs} round(s); bulk {} MiB, 16×{} MiB, 64×{} MiB, {} latency samples, idle {:?}; median [min–max]\n\n",
        sizes.bulk as f64 / MIB,
        sizes.par16 as f64 / MIB,
        sizes.par64 as f64 / MIB,
        sizes.latency_samples,
        sizes.idle
    ));
    for mode in [Mode::Grpc, Mode::Connect] {
        let cols: Vec<&StackSpec> = stacks.iter().filter(|s| s.server.is_none() || s.mode == mode).collect();
        if cols.iter().all(|s| s.server.is_none()) {
            continue;
        }
        out.push_str(&format!("### {} mode (Unix-socket frontend)\n\n| figure |", mode.flag()));
        for c in &cols {
            out.push_str(&format!(" {} |", c.name()));
        }
        out.push_str(" ours ÷ reference |\n|---|");
        for _ in &cols {
            out.push_str("---|");
        }
        out.push_str("---|\n");
        let ours = format!("rust/rust {}", mode.flag());
        let reference = format!("go/go {}", mode.flag());
        for m in &metrics {
            out.push_str(&format!("| {m} |"));
            for c in &cols {
                match results.get(&c.name()).and_then(|r| r.get(m)) {
                    Some(v) if !v.is_empty() => {
                        let (med, lo, hi) = median_min_max(v);
                        if v.len() > 1 {
                            out.push_str(&format!(" {} [{}–{}] |", fmt(med), fmt(lo), fmt(hi)));
                        } else {
                            out.push_str(&format!(" {} |", fmt(med)));
                        }
                    }
                    _ => out.push_str(" |"),
                }
            }
            let ratio =
                match (results.get(&ours).and_then(|r| r.get(m)), results.get(&reference).and_then(|r| r.get(m))) {
                    (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => {
                        let (a, b) = (median_min_max(a).0, median_min_max(b).0);
                        if b != 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
                    }
                    _ => String::new(),
                };
            out.push_str(&format!(" {ratio} |\n"));
        }
        out.push('\n');
    }
    out
}

fn json(results: &Results) -> serde_json::Value {
    let mut stacks = serde_json::Map::new();
    for (stack, metrics) in results {
        let mut m = serde_json::Map::new();
        for (name, values) in metrics {
            let (med, lo, hi) = median_min_max(values);
            m.insert(name.clone(), serde_json::json!({ "median": med, "min": lo, "max": hi, "samples": values }));
        }
        stacks.insert(stack.clone(), serde_json::Value::Object(m));
    }
    serde_json::Value::Object(stacks)
}
