//! The fault-injection fabric: a real `proxy-server` process in a "control" network namespace and a real
//! `proxy-agent` process (ours, or the Go reference) with its targets in a "cluster" namespace, one veth pair
//! between them, and what the scenarios need to break that link and to check what is left afterwards.
//!
//! ```text
//!   control netns (kfc<id>)                        cluster netns (kfk<id>)
//!   proxy-server  agent port 198.19.255.1:8132 ◀── proxy-agent (health :8093, admin :8094 on 127.0.0.1)
//!                 gRPC frontend: a Unix socket     targets on 198.18.0.10: HTTP :8080, echo :7, a reader that
//!                 (the test process dials it)       never reads :9000, a slow reader :9001; :8081 refuses
//!                 admin :8133, health :8134        198.18.0.99 drops every packet (blackhole)
//!           198.19.255.1/30 ◀────── veth vfc<id> / vfk<id> ──────▶ 198.19.255.2/30
//! ```
//!
//! Ports inside the namespaces are fixed: each scenario has namespaces of its own.

use anyhow::{Context, bail};
use konnectivity_client::{ProxyAddress, Tunnel, TunnelConn};
// The link and the server's and agent's ports are the control-plane fixture's.
pub use konnectivity_it::controlplane::{
    AGENT_ADMIN_PORT, AGENT_HEALTH_PORT, AGENT_PORT, CLUSTER_LINK, CONTROL_LINK, SERVER_ADMIN_PORT, SERVER_HEALTH_PORT,
};
use konnectivity_it::controlplane::{ClusterPki, interop_bin, metric, plain_get, workspace_bin};
use konnectivity_it::netns::{NetNs, veth};
use konnectivity_it::targets::{Target, echo_target_on, http_target_on, serve_listener};
use konnectivity_testkit::ChildProcess;
use konnectivity_testkit::TempDir;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Where the targets listen in the cluster network.
pub const TARGET_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// An address in the cluster network whose packets are all dropped: a dial to it hangs until a timeout.
pub const BLACKHOLE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 7;
/// Nothing listens there: dials are refused.
pub const REFUSED_PORT: u16 = 8081;
/// Accepts and never reads.
pub const STALLED_PORT: u16 = 9000;
/// Reads 16 KiB every 50 ms (about 320 KB/s).
pub const SLOW_PORT: u16 = 9001;

pub fn http_addr() -> String {
    format!("{TARGET_IP}:{HTTP_PORT}")
}
pub fn echo_addr() -> String {
    format!("{TARGET_IP}:{ECHO_PORT}")
}
pub fn refused_addr() -> String {
    format!("{TARGET_IP}:{REFUSED_PORT}")
}
pub fn blackhole_addr() -> String {
    format!("{BLACKHOLE_IP}:80")
}

/// Which proxy-agent runs in the cluster network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// This workspace's `proxy-agent`.
    Ours,
    /// The Go reference v0.36.0 (`interop/bin/proxy-agent`, built by `interop/build.sh`).
    Go,
}

/// What a scenario's fabric starts with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra (or overriding) proxy-server flags.
    pub server_args: Vec<String>,
    /// Extra (or overriding) proxy-agent flags.
    pub agent_args: Vec<String>,
    /// Which agent.
    pub agent: AgentKind,
}

impl Default for Options {
    fn default() -> Self {
        Self { server_args: Vec::new(), agent_args: Vec::new(), agent: AgentKind::Ours }
    }
}

/// The fabric's defaults: keepalive 1 s + 2 s on both sides (a dead peer is noticed within 3 s), a 3 s backend
/// dial timeout, fast agent reconnects.
pub const KEEPALIVE_BOUND: Duration = Duration::from_secs(3);

static NEXT: AtomicU64 = AtomicU64::new(0);

pub struct Fabric {
    pub name: &'static str,
    pub dir: TempDir,
    pub pki: ClusterPki,
    pub control: Arc<NetNs>,
    pub cluster: Arc<NetNs>,
    pub veth_cluster: String,
    pub uds: PathBuf,
    pub server: Option<ChildProcess>,
    pub agent: Option<ChildProcess>,
    pub options: Options,
    agent_starts: u32,
    server_starts: u32,
    /// The idle task count (`tokio_alive_tasks`) of each of our processes, by pid: taken the first time that
    /// process settles, and required again at every later settle.
    idle_tasks: std::sync::Mutex<std::collections::HashMap<u32, f64>>,
    /// Set by [`Fabric::shutdown`]: a fabric dropped without it (a failed scenario) keeps its logs.
    finished: bool,
    _targets: Vec<Target>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let keep = std::env::temp_dir().join(format!("krs-faults-failed-{}-{}", self.name, std::process::id()));
        if std::fs::create_dir_all(&keep).is_ok() {
            for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
                }
            }
            eprintln!("{}: logs kept in {}", self.name, keep.display());
        }
    }
}

impl Fabric {
    /// Builds both networks and the targets, starts the server and the agent, and waits until the server
    /// has the agent.
    pub async fn start(name: &'static str, options: Options) -> anyhow::Result<Self> {
        let id = format!("{}{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = TempDir::new(&format!("krs-faults-{name}"))?;
        let pki = ClusterPki::generate(dir.path())?;
        let control = Arc::new(NetNs::create(&format!("kfc{id}"))?);
        let cluster = Arc::new(NetNs::create(&format!("kfk{id}"))?);
        let (veth_control, veth_cluster) = (format!("vfc{id}"), format!("vfk{id}"));
        veth(
            &control,
            &veth_control,
            &format!("{CONTROL_LINK}/30"),
            &cluster,
            &veth_cluster,
            &format!("{CLUSTER_LINK}/30"),
        )?;
        for addr in [TARGET_IP, BLACKHOLE_IP] {
            cluster.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        let mut fabric = Self {
            name,
            uds: dir.path().join("konnectivity.sock"),
            dir,
            pki,
            control,
            cluster,
            veth_cluster,
            server: None,
            agent: None,
            options,
            agent_starts: 0,
            server_starts: 0,
            idle_tasks: Default::default(),
            finished: false,
            _targets: Vec::new(),
        };
        fabric.iptables(&fabric.cluster, &["-A", "OUTPUT", "-d", &BLACKHOLE_IP.to_string(), "-j", "DROP"])?;
        fabric.start_targets()?;
        fabric.start_server()?;
        fabric.wait_server_up(Duration::from_secs(20)).await?;
        fabric.start_agent()?;
        fabric.wait_backends(1, Duration::from_secs(20)).await?;
        Ok(fabric)
    }

    fn start_targets(&mut self) -> anyhow::Result<()> {
        let at = |port| SocketAddr::from((TARGET_IP, port));
        self._targets.push(http_target_on(self.cluster.listen(at(HTTP_PORT))?)?);
        self._targets.push(echo_target_on(self.cluster.listen(at(ECHO_PORT))?)?);
        // Holds each connection open and never reads from it.
        self._targets.push(serve_listener(self.cluster.listen(at(STALLED_PORT))?, |tcp, stop| async move {
            stop.cancelled().await;
            drop(tcp);
        })?);
        self._targets.push(serve_listener(self.cluster.listen(at(SLOW_PORT))?, |mut tcp, _| async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })?);
        Ok(())
    }

    /// Runs `iptables ARGS` inside `ns`.
    pub fn iptables(&self, ns: &NetNs, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip").args(["netns", "exec", ns.name(), "iptables", "-w"]).args(args).output()?;
        if !out.status.success() {
            bail!("iptables {} in {}: {}", args.join(" "), ns.name(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn server_args(&self) -> Vec<String> {
        let pki = &self.pki;
        let mut args = vec![
            "--mode=grpc".to_string(),
            format!("--uds-name={}", self.uds.display()),
            "--delete-existing-uds-file".into(),
            "--server-port=0".into(),
            format!("--cluster-cert={}", pki.server.0.display()),
            format!("--cluster-key={}", pki.server.1.display()),
            format!("--cluster-ca-cert={}", pki.ca.display()),
            "--agent-bind-address=0.0.0.0".into(),
            format!("--agent-port={AGENT_PORT}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-port={SERVER_ADMIN_PORT}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--health-port={SERVER_HEALTH_PORT}"),
            format!("--server-id=faults-{}", self.name),
            "--keepalive-time=1s".into(),
            "--keepalive-timeout=2s".into(),
            "--backend-dial-timeout=3s".into(),
            "--graceful-shutdown-timeout=2s".into(),
            "--v=2".into(),
        ];
        override_flags(&mut args, &self.options.server_args);
        args
    }

    fn agent_args(&self) -> Vec<String> {
        let pki = &self.pki;
        let mut args = vec![
            format!("--ca-cert={}", pki.ca.display()),
            format!("--agent-cert={}", pki.agent.0.display()),
            format!("--agent-key={}", pki.agent.1.display()),
            format!("--proxy-server-host={CONTROL_LINK}"),
            format!("--proxy-server-port={AGENT_PORT}"),
            format!("--agent-id=faults-agent-{}", self.name),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={AGENT_HEALTH_PORT}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={AGENT_ADMIN_PORT}"),
            "--sync-interval=100ms".into(),
            "--sync-interval-cap=1s".into(),
            "--keepalive-time=1s".into(),
            "--v=2".into(),
        ];
        if self.options.agent == AgentKind::Ours {
            args.push("--keepalive-timeout=2s".into());
            args.push("--drain-timeout=2s".into());
        }
        override_flags(&mut args, &self.options.agent_args);
        args
    }

    /// (Re)starts the server (a fresh log file per start).
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        self.server_starts += 1;
        let log = self.dir.path().join(format!("proxy-server-{}.log", self.server_starts));
        self.server = Some(self.control.spawn_process(
            "proxy-server",
            Command::new(workspace_bin("proxy-server")?).args(self.server_args()),
            log,
        )?);
        Ok(())
    }

    /// (Re)starts the agent (a fresh log file per start).
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.agent_starts += 1;
        let log = self.dir.path().join(format!("proxy-agent-{}.log", self.agent_starts));
        let bin = match self.options.agent {
            AgentKind::Ours => workspace_bin("proxy-agent")?,
            AgentKind::Go => interop_bin("proxy-agent")?,
        };
        self.agent = Some(self.cluster.spawn_process("proxy-agent", Command::new(bin).args(self.agent_args()), log)?);
        Ok(())
    }

    pub async fn wait_server_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = plain_get(&self.control, SERVER_HEALTH_PORT, "/healthz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("proxy-server not up within {within:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the server has `n` ready agents.
    pub async fn wait_backends(&self, n: u64, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let got = self.server_metric("konnectivity_network_proxy_server_ready_backend_connections").await.ok();
            if got == Some(n as f64) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!("server has {got:?} agents, want {n}, after {within:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tails of the current server and agent logs, for failure messages.
    pub fn logs(&self) -> String {
        [("proxy-server", &self.server), ("proxy-agent", &self.agent)]
            .iter()
            .map(|(name, p)| match p {
                Some(p) => format!("--- {name} ({}):\n{}", self.name, p.log_tail(25)),
                None => format!("--- {name}: not running"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn server_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.control, SERVER_ADMIN_PORT, name).await
    }

    pub async fn agent_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.cluster, AGENT_HEALTH_PORT, name).await
    }

    pub async fn server_debug(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = plain_get(&self.control, SERVER_ADMIN_PORT, "/debug/connections").await?;
        if status != 200 {
            bail!("server /debug/connections: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    pub async fn agent_debug(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = plain_get(&self.cluster, AGENT_ADMIN_PORT, "/debug/connections").await?;
        if status != 200 {
            bail!("agent /debug/connections: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// The peer addresses (`ip:port`) of the agent streams the server holds.
    pub async fn agent_peers(&self) -> anyhow::Result<Vec<String>> {
        let debug = self.server_debug().await?;
        Ok(debug["agents"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["peer"].as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// The frontend address (the server's Unix socket).
    pub fn proxy(&self) -> ProxyAddress {
        ProxyAddress::Uds(self.uds.clone())
    }

    /// A single-use tunnel and a dial through it, as kube-apiserver does, bounded by `within`.
    pub async fn dial(&self, address: &str, within: Duration) -> anyhow::Result<(Tunnel, TunnelConn)> {
        tokio::time::timeout(within, async {
            let tunnel = Tunnel::connect_single_use(&self.proxy()).await?;
            let conn = tunnel.dial(address).await?;
            Ok::<_, konnectivity_client::DialError>((tunnel, conn))
        })
        .await
        .with_context(|| format!("dial to {address} did not end within {within:?}"))?
        .map_err(|e| anyhow::anyhow!("dial to {address}: {e}"))
    }

    /// `GET /success` through a fresh tunnel, bounded by `within`.
    pub async fn get_success(&self, within: Duration) -> anyhow::Result<()> {
        let host = http_addr();
        let (_tunnel, conn) = self.dial(&host, within).await?;
        let (status, body) = tokio::time::timeout(within, konnectivity_it::http::get(conn, &host, "/success"))
            .await
            .context("GET /success timed out")??;
        if (status, &body[..]) != (200, &b"success"[..]) {
            bail!("GET /success: {status} {:?}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Open file descriptors of the server and the agent process.
    pub fn fds(&self) -> (usize, usize) {
        let count = |p: &Option<ChildProcess>| p.as_ref().and_then(ChildProcess::pid).map(fd_count).unwrap_or(0);
        (count(&self.server), count(&self.agent))
    }

    /// Resident memory (bytes) of the server and the agent process.
    pub fn rss(&self) -> (u64, u64) {
        let rss = |p: &Option<ChildProcess>| p.as_ref().and_then(ChildProcess::pid).map(rss_bytes).unwrap_or(0);
        (rss(&self.server), rss(&self.agent))
    }

    /// What the server and agent still hold: pending dials and established connections (metrics and
    /// `/debug/connections` of both), endpoint connections and dials in flight on the agent.
    pub async fn leftovers(&self) -> anyhow::Result<Leftovers> {
        let server = self.server_debug().await?;
        let mut left = Leftovers {
            pending_metric: self.server_metric("konnectivity_network_proxy_server_pending_backend_dials").await?,
            established_metric: self.server_metric("konnectivity_network_proxy_server_established_connections").await?,
            pending_debug: server["pending_dials"].as_array().map_or(0, Vec::len),
            connections_debug: server["connections"].as_array().map_or(0, Vec::len),
            ..Leftovers::default()
        };
        if self.options.agent == AgentKind::Ours && self.agent.is_some() {
            left.endpoint_metric =
                self.agent_metric("konnectivity_network_proxy_agent_open_endpoint_connections").await?;
            let agent = self.agent_debug().await?;
            for s in agent["servers"].as_array().into_iter().flatten() {
                left.agent_connections_debug += s["connections"].as_array().map_or(0, Vec::len);
                left.agent_dials_debug += s["dials_in_flight"].as_u64().unwrap_or(0) as usize;
            }
        }
        Ok(left)
    }

    /// The runtime tasks (`tokio_alive_tasks`) of our server and agent, by pid; the Go agent has none.
    async fn tasks(&self) -> anyhow::Result<Vec<(&'static str, u32, f64)>> {
        let mut tasks = Vec::new();
        if let Some(pid) = self.server.as_ref().and_then(ChildProcess::pid) {
            tasks.push(("server", pid, self.server_metric("tokio_alive_tasks").await?));
        }
        if let Some(pid) = self.agent.as_ref().and_then(ChildProcess::pid)
            && self.options.agent == AgentKind::Ours
        {
            tasks.push(("agent", pid, self.agent_metric("tokio_alive_tasks").await?));
        }
        Ok(tasks)
    }

    /// Waits until nothing is left (see [`Fabric::leftovers`]), both processes hold at most `slack` file
    /// descriptors more than `baseline`, and each of our processes runs no more tasks than when it first settled
    /// (plus [`TASK_SLACK`]); fails with what is left after `within`.
    pub async fn assert_settled(&self, baseline: (usize, usize), slack: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let left = self.leftovers().await?;
            let fds = self.fds();
            let fds_ok = fds.0 <= baseline.0 + slack && (self.agent.is_none() || fds.1 <= baseline.1 + slack);
            let tasks = self.tasks().await?;
            let over: Vec<String> = {
                let idle = self.idle_tasks.lock().unwrap_or_else(|e| e.into_inner());
                tasks
                    .iter()
                    .filter_map(|(who, pid, n)| {
                        let base = idle.get(pid)?;
                        (*n > base + TASK_SLACK).then(|| format!("{who} {n} tasks (idle {base})"))
                    })
                    .collect()
            };
            if left.is_empty() && fds_ok && over.is_empty() {
                let mut idle = self.idle_tasks.lock().unwrap_or_else(|e| e.into_inner());
                for (_, pid, n) in tasks {
                    idle.entry(pid).or_insert(n);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: not settled after {within:?}: {left:?}; fds server {} (baseline {}), agent {} (baseline {}); \
                     tasks {over:?}\n\
                     server /debug/connections: {}\n{}",
                    self.name,
                    fds.0,
                    baseline.0,
                    fds.1,
                    baseline.1,
                    self.server_debug().await.map(|d| d.to_string()).unwrap_or_default(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The fd baseline: both processes' counts once a first request has been served and everything settled.
    pub async fn baseline(&self) -> anyhow::Result<(usize, usize)> {
        self.get_success(Duration::from_secs(10)).await?;
        self.assert_settled((usize::MAX / 2, usize::MAX / 2), 0, Duration::from_secs(10)).await?;
        Ok(konnectivity_it::steady(Duration::from_secs(2), || self.fds()).await)
    }

    /// Cuts the link both ways (iptables DROP on the cluster side of the veth); [`Fabric::heal`] undoes it.
    pub fn partition(&self) -> anyhow::Result<()> {
        self.iptables(&self.cluster, &["-I", "INPUT", "1", "-i", &self.veth_cluster, "-j", "DROP"])?;
        self.iptables(&self.cluster, &["-I", "OUTPUT", "1", "-o", &self.veth_cluster, "-j", "DROP"])
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        self.iptables(&self.cluster, &["-D", "INPUT", "-i", &self.veth_cluster, "-j", "DROP"])?;
        self.iptables(&self.cluster, &["-D", "OUTPUT", "-o", &self.veth_cluster, "-j", "DROP"])
    }

    /// Drops every packet of one TCP connection of the agent (by its local port), both ways, without FIN or
    /// RST: the connection becomes half-open for both ends.
    pub fn blackhole_agent_port(&self, port: u16) -> anyhow::Result<()> {
        let p = port.to_string();
        self.iptables(&self.cluster, &["-I", "OUTPUT", "1", "-p", "tcp", "--sport", &p, "-j", "DROP"])?;
        self.iptables(&self.cluster, &["-I", "INPUT", "1", "-p", "tcp", "--dport", &p, "-j", "DROP"])
    }

    /// Stops both processes, agent first; returns the names of those that needed SIGKILL.
    pub fn shutdown(&mut self) -> Vec<&'static str> {
        self.finished = true;
        let mut slow = Vec::new();
        if let Some(mut a) = self.agent.take()
            && !a.stop(Duration::from_secs(5))
        {
            slow.push("proxy-agent");
        }
        if let Some(mut s) = self.server.take()
            && !s.stop(Duration::from_secs(5))
        {
            slow.push("proxy-server");
        }
        slow
    }
}

/// Tasks a settled process may run beyond its idle count: the scrape that reads the count, and a timer or probe
/// that happens to be running at that instant. A leak grows with every connection; this does not.
pub const TASK_SLACK: f64 = 2.0;

/// What a fabric still holds; all zero once settled.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Leftovers {
    pub pending_metric: f64,
    pub established_metric: f64,
    pub pending_debug: usize,
    pub connections_debug: usize,
    pub endpoint_metric: f64,
    pub agent_connections_debug: usize,
    pub agent_dials_debug: usize,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Replaces the flags of `args` that `extra` sets again (one value per flag) and appends the rest.
fn override_flags(args: &mut Vec<String>, extra: &[String]) {
    let name = |a: &String| a.split('=').next().unwrap_or_default().to_string();
    let overridden: Vec<String> = extra.iter().map(name).collect();
    args.retain(|a| !overridden.contains(&name(a)));
    args.extend(extra.iter().filter(|a| !a.ends_with("=<unset>")).cloned());
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Reads `conn` to its end, counting bytes into `progress`; the error, if it ended with one.
pub async fn drain_counting(
    mut conn: impl tokio::io::AsyncRead + Unpin,
    progress: Arc<AtomicU64>,
) -> Result<(), std::io::Error> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => {
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fails the scenario, saying why, where it cannot run: it needs root, `ip netns` and iptables. (It used to
/// return early and pass.)
pub fn require_fabric() {
    konnectivity_it::netns::require();
    let iptables = Command::new("iptables").arg("--version").output();
    assert!(
        iptables.is_ok_and(|out| out.status.success()),
        "fault-injection scenarios need iptables (apt-get install iptables; scripts/test checks for it)"
    );
}

/// A measured figure, printed in one greppable format (`FAULTS <scenario> <what>: <value>`), collected into
/// docs/reliability.md.
pub fn report(scenario: &str, what: &str, value: impl std::fmt::Display) {
    eprintln!("FAULTS {scenario} {what}: {value}");
}
