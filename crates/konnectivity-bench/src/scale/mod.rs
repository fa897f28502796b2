//! `konnectivity-bench --scale N,M`: one proxy-server (ours, then the reference's, alternating per round) with
//! N light simulated agents ([`sim`]) connected over real mTLS, in gRPC mode over the Unix-socket frontend:
//! - time until all N are connected, and the server's resident memory per connected agent;
//! - dial latency (a fresh tunnel and a 1 KiB request/response, p50 and p99) through the server to a target, with
//!   N agents to choose from;
//! - a restart: the server is killed (SIGKILL) and started again on the same ports; the time until every agent
//!   is back and the server is ready;
//! - HA (`--scale-ha`): three servers announcing `--server-count=3` and N agents dialing them at random, as
//!   through a load balancer: the time until every agent holds a stream to every server.
//!
//! Every figure is printed with the ratio ours ÷ reference measured in the same round.

pub mod sim;

use crate::procs::{self, Bins, Impl, Mode, ServerPorts};
use crate::scenarios::{self, Path, quantile};
use std::collections::BTreeMap;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What one scale run measures.
pub struct ScaleArgs {
    /// Agent counts.
    pub agents: Vec<usize>,
    /// Rounds.
    pub runs: usize,
    /// Dial samples per measurement.
    pub dials: usize,
    /// Agent counts for the HA scenario (three servers).
    pub ha: Vec<usize>,
    /// Where to write the markdown table.
    pub markdown: Option<std::path::PathBuf>,
    /// Where to write a chart of the ratios (SVG).
    pub svg: Option<std::path::PathBuf>,
}

/// Servers in the HA scenario.
const HA_SERVERS: usize = 3;
const HA_FIGURE: &str = "HA: every agent holds all 3 servers (s)";

type Figures = BTreeMap<(usize, &'static str, &'static str), Vec<f64>>;

/// Runs the scale scenarios against both servers.
pub async fn run(
    args: ScaleArgs,
    bins: &Bins,
    dir: &FsPath,
    pki: &konnectivity_testkit::pki::Pki,
    target: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let tls = Arc::new(agent_tls(pki)?);
    let mut figures = Figures::new();
    let started = Instant::now();
    let total = (args.agents.len() + args.ha.len()) * args.runs * 2;
    let mut done = 0;
    for round in 0..args.runs {
        let scenarios = args.agents.iter().map(|&n| (n, false)).chain(args.ha.iter().map(|&n| (n, true)));
        for (n, ha) in scenarios {
            for which in [Impl::Rust, Impl::Go] {
                done += 1;
                let eta = if done > 1 {
                    let per = started.elapsed().as_secs_f64() / (done - 1) as f64;
                    format!(", about {:.0} s left", per * (total - done + 1) as f64)
                } else {
                    String::new()
                };
                eprintln!(
                    "scale {done}/{total}: round {}/{}, {n} agents, {} {} ({:.0} s elapsed{eta})",
                    round + 1,
                    args.runs,
                    which.name(),
                    if ha { "servers, HA" } else { "server" },
                    started.elapsed().as_secs_f64()
                );
                let result = if ha {
                    high_availability(which, n, bins, dir, pki, tls.clone()).await
                } else {
                    one(which, n, bins, dir, pki, target, tls.clone(), args.dials).await
                };
                match result {
                    Ok(f) => {
                        for (metric, value) in f {
                            figures.entry((n, which.name(), metric)).or_default().push(value);
                        }
                    }
                    Err(e) => eprintln!("  {} with {n} agents: {e:#}", which.name()),
                }
            }
        }
    }
    let rows = rows(&args.agents, &args.ha, &figures);
    let table = table(&rows);
    println!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table)?;
    }
    if let Some(path) = &args.svg {
        let bars: Vec<_> = rows
            .iter()
            .filter_map(|r| match (r.ours, r.reference) {
                (Some(a), Some(b)) if b > 0.0 => {
                    Some(crate::chart::Bar { label: format!("{} agents: {}", r.agents, r.metric), ratio: a / b })
                }
                _ => None,
            })
            .collect();
        let note = format!(
            "konnectivity-bench --scale, median of {} round(s); left of 1× ours is smaller (better)",
            args.runs
        );
        std::fs::write(path, crate::chart::ratio_chart("Scale: ours ÷ reference", &note, &bars))?;
    }
    Ok(())
}

/// One figure's medians.
struct Row {
    agents: usize,
    metric: &'static str,
    ours: Option<f64>,
    reference: Option<f64>,
}

fn agent_tls(pki: &konnectivity_testkit::pki::Pki) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(cert?)?;
    }
    let certs = CertificateDer::pem_file_iter(&pki.agent_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.agent_key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Waits until `ok` holds, polling every 50 ms; false on timeout.
async fn until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok()
}

fn ready(ports: &ServerPorts) -> bool {
    procs::http_get(ports.health, "/readyz").is_some_and(|(status, _)| status == 200)
}

#[allow(clippy::too_many_arguments)] // the run's fixed context, passed once per measurement
async fn one(
    which: Impl,
    n: usize,
    bins: &Bins,
    dir: &FsPath,
    pki: &konnectivity_testkit::pki::Pki,
    target: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    dials: usize,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let uds = dir.join(format!("scale-{}.sock", std::process::id()));
    let ports = ServerPorts::free();
    let flags = procs::server_flags(pki, &uds, Mode::Grpc.flag(), &ports);
    let log = dir.join(format!("scale-server-{}.log", which.name()));
    let mut server = procs::spawn(&bins.path(which, "proxy-server"), &flags, &log)?;
    anyhow::ensure!(
        until(Duration::from_secs(30), || procs::http_get(ports.health, "/healthz").is_some()).await,
        "the server did not start"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = procs::rss_kib(&server);
    let dial = sim::Dial { servers: vec![([127, 0, 0, 1], ports.agent).into()], tls, want: 1 };
    let connect_started = Instant::now();
    let fleet = sim::Fleet::start(n, dial, 256);
    let all = until(Duration::from_secs(180), || fleet.connected.load(Ordering::Relaxed) >= n).await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    let mut out = Vec::new();
    let result = async {
        anyhow::ensure!(
            all,
            "{} of {n} agents connected after 180 s ({} failed attempts)",
            fleet.connected.load(Ordering::Relaxed),
            fleet.failures.load(Ordering::Relaxed)
        );
        out.push(("connect all (s)", connect_s));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = procs::rss_kib(&server);
        out.push(("server RSS (MiB)", rss_after as f64 / 1024.0));
        out.push(("server KiB per agent", rss_after.saturating_sub(rss_before) as f64 / n as f64));

        let path = Path::Grpc(konnectivity_client::ProxyAddress::Uds(uds.clone()));
        let mut lat = scenarios::fresh_dial_latency(&path, target, dials).await?;
        out.push(("dial + 1 KiB p50 (ms)", quantile(&mut lat, 0.5) * 1000.0));
        out.push(("dial + 1 KiB p99 (ms)", quantile(&mut lat, 0.99) * 1000.0));

        // The restart: SIGKILL, then the same flags on the same ports.
        server.kill();
        anyhow::ensure!(
            until(Duration::from_secs(30), || fleet.connected.load(Ordering::Relaxed) == 0).await,
            "agents still connected to a killed server"
        );
        let _ = std::fs::remove_file(&uds);
        let restarted = Instant::now();
        server = procs::spawn(&bins.path(which, "proxy-server"), &flags, &log)?;
        let back =
            until(Duration::from_secs(180), || fleet.connected.load(Ordering::Relaxed) >= n && ready(&ports)).await;
        anyhow::ensure!(back, "{} of {n} agents back 180 s after the restart", fleet.connected.load(Ordering::Relaxed));
        out.push(("restart: all back, ready (s)", restarted.elapsed().as_secs_f64()));
        Ok(())
    }
    .await;
    fleet.stop().await;
    server.kill();
    let _ = std::fs::remove_file(&uds);
    result.map(|()| out)
}

/// Three servers with `--server-count=3`, `n` agents dialing them at random: seconds until every agent holds
/// all three.
async fn high_availability(
    which: Impl,
    n: usize,
    bins: &Bins,
    dir: &FsPath,
    pki: &konnectivity_testkit::pki::Pki,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let mut servers = Vec::new();
    let mut agent_ports = Vec::new();
    for i in 0..HA_SERVERS {
        let uds = dir.join(format!("scale-ha-{}-{i}.sock", std::process::id()));
        let ports = ServerPorts::free();
        let mut flags = procs::server_flags(pki, &uds, Mode::Grpc.flag(), &ports);
        flags.push(format!("--server-count={HA_SERVERS}"));
        let log = dir.join(format!("scale-ha-server-{}-{i}.log", which.name()));
        servers.push((procs::spawn(&bins.path(which, "proxy-server"), &flags, &log)?, uds));
        anyhow::ensure!(
            until(Duration::from_secs(30), || procs::http_get(ports.health, "/healthz").is_some()).await,
            "server {i} did not start"
        );
        agent_ports.push(std::net::SocketAddr::from(([127, 0, 0, 1], ports.agent)));
    }
    let started = Instant::now();
    let fleet = sim::Fleet::start(n, sim::Dial { servers: agent_ports, tls, want: HA_SERVERS }, 256);
    let all = until(Duration::from_secs(300), || fleet.complete.load(Ordering::Relaxed) >= n).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (complete, streams) = (fleet.complete.load(Ordering::Relaxed), fleet.connected.load(Ordering::Relaxed));
    fleet.stop().await;
    for (mut server, uds) in servers {
        server.kill();
        let _ = std::fs::remove_file(uds);
    }
    anyhow::ensure!(all, "{complete} of {n} agents held all {HA_SERVERS} servers after 300 s ({streams} streams)");
    Ok(vec![(HA_FIGURE, elapsed)])
}

fn rows(agents: &[usize], ha: &[usize], figures: &Figures) -> Vec<Row> {
    let metrics = [
        "connect all (s)",
        "server RSS (MiB)",
        "server KiB per agent",
        "dial + 1 KiB p50 (ms)",
        "dial + 1 KiB p99 (ms)",
        "restart: all back, ready (s)",
    ];
    let median = |v: Option<&Vec<f64>>| -> Option<f64> {
        let mut v = v?.clone();
        if v.is_empty() {
            return None;
        }
        Some(quantile(&mut v, 0.5))
    };
    let scenarios = agents.iter().flat_map(|&n| metrics.iter().map(move |m| (n, *m)));
    scenarios
        .chain(ha.iter().map(|&n| (n, HA_FIGURE)))
        .map(|(n, metric)| Row {
            agents: n,
            metric,
            ours: median(figures.get(&(n, Impl::Rust.name(), metric))),
            reference: median(figures.get(&(n, Impl::Go.name(), metric))),
        })
        .collect()
}

fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| agents | figure | ours | reference | ours ÷ reference |\n|---:|---|---:|---:|---:|\n");
    for r in rows {
        let fmt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}"));
        let ratio = match (r.ours, r.reference) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "—".into(),
        };
        out.push_str(&format!("| {} | {} | {} | {} | {ratio} |\n", r.agents, r.metric, fmt(r.ours), fmt(r.reference)));
    }
    out
}
