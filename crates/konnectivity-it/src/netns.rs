//! Linux network namespaces for tests that need isolated networks (`ip netns`, root only).
//!
//! A [`NetNs`] is created with `ip netns add` and deleted when dropped. Code runs "inside" it on a short-lived
//! thread that joined the namespace with `setns(2)`: sockets created there (listeners, outgoing connections) stay
//! in the namespace after they are handed back, and processes spawned there start in it.

use anyhow::{Context, bail};
use konnectivity_testkit::ChildProcess;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a process started by [`NetNs::spawn_process`] gets to exit on SIGTERM when dropped, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether this process can create network namespaces: it runs as root and has iproute2's `ip`. The error says
/// what is missing.
pub fn available() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this test creates network namespaces and needs root (run it as root; scripts/test does)");
    }
    match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!("this test creates network namespaces and needs iproute2's `ip` (apt-get install iproute2)"),
    }
}

/// Fails the calling test, saying why, where network namespaces cannot be created: such a test must fail where
/// it cannot run, never pass without having run.
pub fn require() {
    if let Err(e) = available() {
        panic!("{e:#}");
    }
}

/// Runs `ip` with the given arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running `ip`")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Links two namespaces with a veth pair: interface `a_if` with address `a_addr` (CIDR) in `a`, `b_if` with
/// `b_addr` in `b`, both up.
pub fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) -> anyhow::Result<()> {
    ip(&["link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
    handle: File,
}

impl NetNs {
    /// Creates the namespace `name` (at most 15 characters is safest, as interface names are derived from it)
    /// with its loopback up. A stale namespace of the same name (left by a killed run) is replaced.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name]).context("creating a network namespace (tests of this kind need root)")?;
        let handle = File::open(format!("/run/netns/{name}")).with_context(|| format!("opening netns {name}"))?;
        let ns = Self { name: name.to_string(), handle };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let fd = self.handle.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread inside netns panicked"))?
        })
    }

    /// Spawns `cmd` inside the namespace.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<Child> {
        self.run(|| cmd.spawn())?.with_context(|| format!("spawning {:?} in netns {}", cmd.get_program(), self.name))
    }

    /// Spawns `cmd` inside the namespace with its stdout and stderr in a fresh file `log`. Dropped, it gets
    /// SIGTERM, and SIGKILL after 5 s.
    pub fn spawn_process(&self, name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<ChildProcess> {
        ChildProcess::log_to(cmd, &log)?;
        Ok(ChildProcess::new(name, self.spawn(cmd)?).with_log(log).graceful_on_drop(STOP_GRACE))
    }

    /// A command that runs `program` with `ip netns exec`, which also bind-mounts `/etc/netns/<ns>/*` over `/etc`
    /// (a per-namespace `/etc/hosts`, for name resolution that differs between networks).
    pub fn exec_with_etc(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name()]).arg(program);
        cmd
    }

    /// Binds a TCP listener inside the namespace (call from within a tokio runtime).
    pub fn listen(&self, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        let std = self.run(|| -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })??;
        Ok(tokio::net::TcpListener::from_std(std)?)
    }

    /// Opens a TCP connection from inside the namespace (blocking connect on a helper thread, at most `timeout`).
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<tokio::net::TcpStream> {
        // A dedicated thread, not spawn_blocking: a pooled thread must not be left inside the namespace.
        let fd = self.handle.try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = (|| -> anyhow::Result<std::net::TcpStream> {
                nix::sched::setns(fd.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                let s = std::net::TcpStream::connect_timeout(&addr, timeout)
                    .with_context(|| format!("connecting to {addr}"))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })();
            let _ = tx.send(r);
        });
        let std = rx.await.context("connect thread vanished")??;
        Ok(tokio::net::TcpStream::from_std(std)?)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
