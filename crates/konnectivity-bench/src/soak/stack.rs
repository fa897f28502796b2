//! The stack the soak runs against: real proxy-server and proxy-agent processes on loopback, the agent restarted
//! on demand, and their figures from /proc and the server's /metrics.

use super::Args;
use crate::procs::{ServerPorts, agent_flags, http_get, server_flags};
use konnectivity_testkit::ChildProcess;
use konnectivity_testkit::pki::Pki;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One process's figures at a sample.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ProcStats {
    pub(super) rss_kib: u64,
    pub(super) fds: usize,
    pub(super) threads: u64,
}

pub(super) fn proc_stats(process: &ChildProcess) -> ProcStats {
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
pub(super) fn thread_names(process: &ChildProcess) -> Vec<String> {
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

/// The server and agent processes under load, and what restarting the agent needs.
pub(super) struct Stack {
    pub(super) server: ChildProcess,
    pub(super) agent: ChildProcess,
    pub(super) agent_args: Vec<String>,
    pub(super) agent_bin: PathBuf,
    pub(super) server_health: u16,
    pub(super) server_admin: u16,
    pub(super) dir: PathBuf,
    pub(super) uds: PathBuf,
}

/// Starts `bin`; its stderr is appended to `log` (one log across the agent's restarts).
fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<ChildProcess> {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
    Ok(ChildProcess::spawn(bin.display().to_string(), &mut cmd)?.with_log(log.to_path_buf()))
}

/// A gauge's value from the server's /metrics.
pub(super) fn server_gauge(stack: &Stack, name: &str) -> Option<f64> {
    let (_, text) = http_get(stack.server_admin, "/metrics")?;
    text.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.split_whitespace().last()?.parse().ok()
}

impl Stack {
    /// Starts the server and the agent from `args.bin_dir` with the reference's flags; returns once the agent is
    /// connected.
    pub(super) fn start(args: &Args, pki: &Pki, dir: &Path) -> anyhow::Result<Self> {
        let uds = dir.join("soak.sock");
        let ports = ServerPorts::free();
        let (server_health, server_admin) = (ports.health, ports.admin);
        let server_args = server_flags(pki, &uds, &args.mode, &ports);
        let server = spawn(&args.bin_dir.join("proxy-server"), &server_args, &dir.join("server.log"))?;
        // Ports 0: nothing reads the agent's health or admin port.
        let agent_args = agent_flags(pki, ports.agent, 0, 0);
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
    pub(super) fn restart_agent(&mut self) -> anyhow::Result<Duration> {
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
