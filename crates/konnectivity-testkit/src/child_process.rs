//! A child process owned by a test or the benchmark: stopped and reaped when dropped, so a failing test never
//! leaves one running.

pub use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process, stopped and reaped when dropped: at once with SIGKILL, or, after
/// [`ChildProcess::graceful_on_drop`], with SIGTERM and SIGKILL after a grace period. Its output may go to a log
/// file, whose tail error messages show.
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
    drop_grace: Option<Duration>,
}

impl ChildProcess {
    /// Takes ownership of an already spawned `child` (for one spawned in a special way, such as inside a network
    /// namespace).
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Self { name: name.into(), child: Some(child), log: None, drop_grace: None }
    }

    /// Spawns `cmd` as it is configured.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> std::io::Result<Self> {
        let name = name.into();
        let child = cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("spawning {name}: {e}")))?;
        Ok(Self::new(name, child))
    }

    /// Spawns `cmd` with no input and its stdout and stderr in a fresh file `log`.
    pub fn spawn_logged(name: impl Into<String>, cmd: &mut Command, log: PathBuf) -> std::io::Result<Self> {
        Self::log_to(cmd, &log)?;
        Ok(Self::spawn(name, cmd)?.with_log(log))
    }

    /// Points `cmd`'s stdin at nothing and its stdout and stderr at a fresh file `log` (for a command spawned some
    /// other way, then handed to [`ChildProcess::new`]).
    pub fn log_to(cmd: &mut Command, log: &Path) -> std::io::Result<()> {
        let file = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        Ok(())
    }

    /// Names the file its output goes to, for [`ChildProcess::log`] and [`ChildProcess::log_tail`].
    pub fn with_log(mut self, log: PathBuf) -> Self {
        self.log = Some(log);
        self
    }

    /// When dropped, SIGTERM first and SIGKILL only after `grace` (see [`ChildProcess::stop`]).
    pub fn graceful_on_drop(mut self, grace: Duration) -> Self {
        self.drop_grace = Some(grace);
        self
    }

    /// The name it was given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file, if it has one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The whole log (empty without one).
    pub fn log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        // kube-apiserver starts by printing every flag; those lines never explain a failure.
        let lines: Vec<_> = text.lines().filter(|l| !l.contains("] FLAG: --")).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its pid, until it is killed or stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (nothing once it was killed or stopped).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits (blocking) until it exits.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.wait(),
            None => Err(std::io::Error::other(format!("{} was already stopped", self.name))),
        }
    }

    /// Waits (without blocking the runtime) up to `limit` for it to exit; its exit status if it did.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Its stderr, when it was spawned with a piped one.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// Fails (with the log tail) if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.try_wait()? {
            anyhow::bail!("{} exited ({status}); log:\n{}", self.name, self.log_tail(30));
        }
        Ok(())
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait (blocking) up to `grace`, then SIGKILL; reaps it. Returns whether it exited within the grace
    /// period.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        match self.drop_grace {
            Some(grace) => {
                self.stop(grace);
            }
            None => self.kill(),
        }
    }
}
