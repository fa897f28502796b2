//! Launching the stacks under test as real processes, and reading their CPU time and memory from /proc.

use konnectivity_testkit::pki::Pki;
use konnectivity_testkit::{ChildProcess, free_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Which implementation a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// konnectivity-rs.
    Rust,
    /// The Go reference.
    Go,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Rust => "rust",
            Impl::Go => "go",
        }
    }
}

/// The frontend protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Grpc,
    Connect,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Grpc => "grpc",
            Mode::Connect => "http-connect",
        }
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub rust: PathBuf,
    pub go: PathBuf,
}

impl Bins {
    /// The binary `name` of `which`.
    pub fn path(&self, which: Impl, name: &str) -> PathBuf {
        match which {
            Impl::Rust => self.rust.join(name),
            Impl::Go => self.go.join(name),
        }
    }
}

/// A running server and agent.
pub struct Running {
    pub server: ChildProcess,
    pub agent: ChildProcess,
    pub uds: PathBuf,
}

impl Running {
    /// CPU seconds used so far by server and agent together.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.server) + cpu_seconds(&self.agent)
    }
    /// Resident memory of (server, agent), in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        (rss_kib(&self.server), rss_kib(&self.agent))
    }
}

/// Starts `bin` with `args`, logging to `log`, quietly (`RUST_LOG=warn`).
pub fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<ChildProcess> {
    let mut cmd = Command::new(bin);
    cmd.args(args).env("RUST_LOG", "warn");
    Ok(ChildProcess::spawn_logged(bin.display().to_string(), &mut cmd, log.to_path_buf())?)
}

/// The loopback ports a proxy-server process listens on (its frontend is a Unix socket).
pub struct ServerPorts {
    /// Where agents connect.
    pub agent: u16,
    /// `/healthz`, `/readyz`.
    pub health: u16,
    /// `/metrics`.
    pub admin: u16,
}

impl ServerPorts {
    /// Free ports for each.
    pub fn free() -> Self {
        Self { agent: free_port(), health: free_port(), admin: free_port() }
    }
}

/// The reference's flags (which ours share) for a proxy-server in `mode` (`grpc` or `http-connect`) with its
/// frontend on `uds`, an mTLS agent port and health and admin ports on loopback, logging little.
pub fn server_flags(pki: &Pki, uds: &Path, mode: &str, ports: &ServerPorts) -> Vec<String> {
    vec![
        format!("--mode={mode}"),
        format!("--uds-name={}", uds.display()),
        "--server-port=0".into(),
        format!("--cluster-cert={}", pki.server_cert.display()),
        format!("--cluster-key={}", pki.server_key.display()),
        format!("--cluster-ca-cert={}", pki.ca.display()),
        format!("--agent-port={}", ports.agent),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--health-port={}", ports.health),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", ports.admin),
        "--admin-bind-address=127.0.0.1".into(),
        "--v=0".into(),
    ]
}

/// The reference's flags for a proxy-agent of a server on loopback `agent_port`, with its health and admin
/// ports, syncing every 100 ms, logging little.
pub fn agent_flags(pki: &Pki, agent_port: u16, health: u16, admin: u16) -> Vec<String> {
    vec![
        format!("--ca-cert={}", pki.ca.display()),
        format!("--agent-cert={}", pki.agent_cert.display()),
        format!("--agent-key={}", pki.agent_key.display()),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        "--health-server-host=127.0.0.1".into(),
        format!("--health-server-port={health}"),
        "--admin-bind-address=127.0.0.1".into(),
        format!("--admin-server-port={admin}"),
        "--sync-interval=100ms".into(),
        "--v=0".into(),
    ]
}

/// Starts `server` and `agent` (each Rust or Go) with the same reference flags, and waits until the agent is
/// connected (the server's `/readyz`).
pub fn start(bins: &Bins, dir: &Path, pki: &Pki, server: Impl, agent: Impl, mode: Mode) -> anyhow::Result<Running> {
    let uds = dir.join(format!("bench-{}.sock", std::process::id()));
    let ports = ServerPorts::free();
    let server_args = server_flags(pki, &uds, mode.flag(), &ports);
    let server = spawn(&bins.path(server, "proxy-server"), &server_args, &dir.join("server.log"))?;
    let agent_args = agent_flags(pki, ports.agent, free_port(), free_port());
    let agent = spawn(&bins.path(agent, "proxy-agent"), &agent_args, &dir.join("agent.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(ports.health, "/readyz").is_some_and(|(status, _)| status == 200) {
            return Ok(Running { server, agent, uds });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = |process: &ChildProcess| process.log_tail(5).lines().rev().collect::<Vec<_>>().join(" | ");
    anyhow::bail!("stack did not become ready; server log: {}; agent log: {}", tail(&server), tail(&agent))
}

/// `GET path` on a loopback port (HTTP/1.0, 5 s read timeout): the status and the whole response.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
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

fn cpu_seconds(process: &ChildProcess) -> f64 {
    let Some(pid) = process.pid() else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Linux reports these in USER_HZ, which is 100 on every architecture it supports.
    ticks as f64 / 100.0
}

/// Resident memory of `process`, in KiB.
pub fn rss_kib(process: &ChildProcess) -> u64 {
    let Some(pid) = process.pid() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}
